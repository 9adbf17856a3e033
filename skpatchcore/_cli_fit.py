"""``skpatchcore fit``: fit PatchCore on a folder of normal images and save it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from ._cli_common import (
    CommandError,
    check_readable,
    check_scheduler,
    choose_layers,
    collect_images,
    describe_weights,
    info,
    parse_weights,
    progress_enabled,
)


def run_fit(args: argparse.Namespace) -> int:
    """Run ``skpatchcore fit`` with parsed arguments; returns the exit status."""
    import joblib

    from .pipeline import make_patchcore

    output = Path(args.output)
    if output.is_dir():
        raise CommandError(f"-o {str(output)!r} is a folder; give a model file name such as model.joblib")
    crop_size = None if args.no_crop else args.crop_size
    if crop_size is not None and crop_size > args.resize:
        raise CommandError(
            f"--crop-size {crop_size} is larger than --resize {args.resize}; "
            f"pass --crop-size N with N <= {args.resize}, or --no-crop"
        )
    images = collect_images(args.train_dir)
    check_readable(images)
    check_scheduler(args.scheduler)
    weights = parse_weights(args.weights)
    model = make_patchcore(
        backbone=args.backbone,
        layers=choose_layers(args.layers, args.backbone),
        weights=weights,
        sampling_ratio=args.sampling_ratio,
        n_neighbors=args.n_neighbors,
        random_state=args.random_state,
        device=args.device,
        resize=args.resize,
        crop_size=crop_size,
        interpolation=args.interpolation,
        batch_size=args.batch_size,
        progress=progress_enabled(args),
        working_memory=args.working_memory,
        n_jobs=args.n_jobs,
        scheduler=args.scheduler,
    )
    info(args, f"Fitting PatchCore on {len(images)} images ({args.backbone}, weights: {describe_weights(weights)})")
    elapsed = fit_model(model, images)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, output)
    info(args, fit_summary(model, len(images), elapsed))
    info(args, f"Saved {output} ({_human_size(output.stat().st_size)})")
    return 0


def fit_model(model, images: Sequence[str]) -> float:
    """Fit, switch the progress bar off for the saved model, return seconds."""
    start = time.perf_counter()
    model.fit(list(images))
    # The saved model runs in this process wherever it is loaded: no progress bars, no cluster.
    model.set_params(features__progress=False, coreset__progress=False, scheduler=None)
    return time.perf_counter() - start


def fit_summary(model, n_images: int, seconds: float) -> str:
    """Lines describing a fitted pipeline: backbone, geometry, memory bank, threshold."""
    features = model.steps[0][1]
    coreset = model.steps[1][1] if len(model.steps) > 2 else None
    detector = model.steps[-1][1]
    height, width, dims = features.feature_shape_
    n_bank = detector.memory_bank_.shape[0]
    n_patches = n_images * height * width
    side = features.input_size_
    geometry = (
        f"resize {features.resize}, no crop" if features.crop_size is None
        else f"resize {features.resize}, centre crop {features.crop_size}"
    )
    ratio = f" (sampling ratio {coreset.sampling_ratio:g})" if coreset is not None else ""
    backbone = features.backbone if isinstance(features.backbone, str) else type(features.backbone).__name__
    return "\n".join([
        f"Fitted in {seconds:.1f} s on {n_images} images",
        f"  backbone     {backbone}, layers {' '.join(features.layers)}, "
        f"weights: {describe_weights(features.weights)}",
        f"  input        {side[0]}x{side[1]} ({geometry}), patch grid {height}x{width}, {dims} dims",
        f"  memory bank  {n_bank} of {n_patches} patches{ratio}",
        f"  threshold    anomaly score > {-detector.offset_:.4g} is flagged anomalous",
    ])


def _human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
