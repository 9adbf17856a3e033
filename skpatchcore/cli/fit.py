"""``skpatchcore fit``: fit PatchCore on a folder of normal images and save it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from .._scoring import check_readable
from ..io.atomic import atomic_path
from ..io.model_file import SUFFIX
from ._common import (
    CommandError,
    apply_pixel_limit,
    check_scheduler,
    choose_layers,
    collect_images,
    describe_weights,
    info,
    parse_weights,
    progress_enabled,
    writable_output_file,
)

#: ``fit -o`` suffixes that ask for a joblib (pickle) file instead of the safe format.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def run_fit(args: argparse.Namespace) -> int:
    """Run ``skpatchcore fit`` with parsed arguments; returns the exit status."""
    from ..pipeline import make_patchcore

    apply_pixel_limit(args)
    output = writable_output_file(args.output, f"model{SUFFIX}")
    crop_size = None if args.no_crop else ("auto" if args.crop_size is None else args.crop_size)
    if args.no_crop and args.crop_size is not None:
        raise CommandError("--crop-size and --no-crop contradict each other; pass one of them")
    if isinstance(crop_size, int) and args.resize is not None and crop_size > args.resize:
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
        recipe=args.recipe,
        resize="auto" if args.resize is None else args.resize,
        crop_size=crop_size,
        interpolation=args.interpolation or "auto",
        scales=tuple(args.scales),
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        tile_scale=args.tile_scale,
        exif_transpose=args.exif_transpose,
        batch_size=args.batch_size,
        progress=progress_enabled(args),
        working_memory=args.working_memory,
        n_jobs=args.n_jobs,
        scheduler=args.scheduler,
    )
    model.set_params(coreset__random_fraction=args.random_fraction)
    info(args, f"Fitting PatchCore on {len(images)} images ({args.backbone}, weights: {describe_weights(weights)})")
    elapsed = fit_model(model, images)
    save_model(model, output)
    info(args, fit_summary(model, len(images), elapsed))
    kind = "joblib pickle: 'score' and 'evaluate' read it only with --allow-pickle" if _is_pickle_name(output) \
        else "safe format"
    info(args, f"Saved {output} ({_human_size(output.stat().st_size)}, {kind})")
    return 0


def _is_pickle_name(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def save_model(model, path: str | Path) -> Path:
    """Write a fitted model atomically: joblib for a pickle suffix, else the safe format.

    Parameters
    ----------
    model : PatchCorePipeline
    path : str or Path
        A name ending in ``.joblib``, ``.pkl`` or ``.pickle`` gets a
        :func:`joblib.dump` file; any other name the safe format of
        :func:`skpatchcore.save` (suggested suffix ``.skpc``). Either way
        the file is written to a temporary file in the same folder and
        renamed into place, so an interrupted save keeps an existing file.

    Returns
    -------
    path : Path
    """
    from ..io.model_file import save

    path = Path(path)
    if not _is_pickle_name(path):
        return save(model, path)
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        joblib.dump(model, temporary)
    return path


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
        f"resize {features.resize_}, no crop" if features.crop_size_ is None
        else f"resize {features.resize_}, centre crop {features.crop_size_}"
    )
    if getattr(features, "tile_size", None) is not None:
        geometry = (f"tiles of {features.tile_size} px, overlap {features.tile_overlap:g}, "
                    f"image scale {features.tile_scale:g}")
        n_patches = coreset.n_rows_seen_ if coreset is not None else n_patches  # every tile's patches
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
