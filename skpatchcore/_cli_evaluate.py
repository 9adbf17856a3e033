"""``skpatchcore evaluate``: benchmark metrics of a model on an MVTec-layout
test set, with its scores.csv, heatmaps and plots.

Unreadable test images are left out of the metrics, listed in
``metrics.json`` and ``scores.csv`` and make the exit status
:data:`~skpatchcore._cli_common.EXIT_PARTIAL`; the results replace earlier
ones only when complete (see :func:`skpatchcore._atomic.staged_outputs`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ._atomic import atomic_path, atomic_write, staged_outputs
from ._cli_common import (
    CommandError,
    apply_pixel_limit,
    apply_run_options,
    check_readable,
    info,
    load_model,
    progress_enabled,
)
from ._cli_score import (
    colour_range,
    iter_scored,
    model_view,
    prediction_cells,
    report_failures,
    save_heatmap,
    unique_names,
)

#: ``evaluate`` CSV columns (``error`` is empty for scored images).
EVALUATE_COLUMNS = ("path", "defect_type", "label", "anomaly_score", "decision", "prediction", "error")
#: What ``evaluate`` writes into its output folder (replaced together at the end).
EVALUATE_OUTPUTS = ("metrics.json", "scores.csv", "heatmaps", "roc.png", "worst_examples.png")
#: Examples of each kind shown in ``evaluate --plots``'s worst_examples.png.
N_WORST = 3


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``skpatchcore evaluate`` with parsed arguments; returns the exit status."""
    from .datasets import load_mvtec

    apply_pixel_limit(args)
    model = load_model(args.model, args.device, args.allow_pickle)
    apply_run_options(model, args)
    data = load_mvtec(args.category_dir)
    info(args, f"Evaluating {args.model} on {len(data.test_images)} test images of {data.category!r}")
    metrics = evaluate_model(
        model, data, output=args.output, plots=args.plots, heatmaps=args.heatmaps,
        fpr_limit=args.fpr_limit, progress=progress_enabled(args),
        vmin=args.vmin, vmax=args.vmax, extra={"model": str(args.model)}, fail_fast=args.fail_fast,
    )
    print(format_metrics(metrics), flush=True)
    if args.output is not None:
        written = ["metrics.json", "scores.csv"]
        written += ["roc.png", "worst_examples.png"] if args.plots else []
        written += ["heatmaps/"] if args.heatmaps else []
        info(args, f"Wrote {', '.join(written)} in {args.output}")
    failures = [(item["path"], item["error"]) for item in metrics["unreadable"]]
    listing = None if args.output is None else Path(args.output) / "scores.csv"
    return report_failures(failures, metrics["n_test_images"], listing)


def evaluate_model(
    model,
    data,
    output: Path | None = None,
    plots: bool = False,
    heatmaps: bool = False,
    fpr_limit: float = 0.3,
    progress: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    extra: dict | None = None,
    fail_fast: bool = False,
) -> dict:
    """Score an MVTec-layout test set and compute the benchmark metrics.

    Parameters
    ----------
    model : PatchCorePipeline
        A fitted pipeline.
    data : Bunch
        Output of :func:`skpatchcore.datasets.load_mvtec`.
    output : Path, default=None
        Folder for ``metrics.json`` and ``scores.csv`` (nothing is written
        when None). Everything is written into a staging folder first and
        replaces the previous results (see :data:`EVALUATE_OUTPUTS`) only
        when complete.
    plots : bool, default=False
        Also write ``roc.png`` and ``worst_examples.png``.
    heatmaps : bool, default=False
        Also write ``heatmaps/<stem>.png`` overlays.
    fpr_limit : float, default=0.3
        Integration limit of AUPRO.
    progress : bool, default=False
    vmin, vmax : float, default=None
        Heatmap colour limits (see :func:`skpatchcore._cli_score.colour_range`).
    extra : dict, default=None
        Further entries for ``metrics.json``.
    fail_fast : bool, default=False
        Raise at the first unreadable test image. Otherwise unreadable images
        are left out of the metrics and listed in ``metrics["unreadable"]``
        and in the ``error`` column of ``scores.csv``.

    Returns
    -------
    metrics : dict
        ``image_auroc``, ``pixel_auroc``, ``aupro`` (None where undefined, e.g.
        a test set without defects), per-defect image AUROC and counts,
        ``n_unreadable`` and ``unreadable`` (``{"path", "error"}`` dicts).
    """
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    images = list(data.test_images)
    labels = np.asarray(data.test_labels, dtype=int)
    if fail_fast:
        check_readable(images)
    if (plots or heatmaps) and output is not None:
        from .plotting import _require_matplotlib

        _require_matplotlib()
    low, high = colour_range(model, vmin, vmax)
    height, width = features.input_size_
    maps = np.empty((len(images), height, width), dtype=np.float32)
    anomaly = np.empty(len(images), dtype=np.float64)
    errors: list[str | None] = [None] * len(images)
    names = unique_names(images)
    start_time = time.perf_counter()
    with ExitStack() as stack:
        staging = writer = None
        if output is not None:
            staging = stack.enter_context(staged_outputs(output, EVALUATE_OUTPUTS))
            handle = stack.enter_context(atomic_write(staging / "scores.csv", "w", newline="", encoding="utf-8"))
            writer = csv.writer(handle)
            writer.writerow(EVALUATE_COLUMNS)
        for scored in iter_scored(model, images, False, progress, fail_fast=fail_fast):
            stop = scored.start + len(scored.paths)
            maps[scored.start:stop] = scored.maps
            anomaly[scored.start:stop] = -scored.scores
            errors[scored.start:stop] = scored.errors
            for i in range(scored.start, stop):
                row = [images[i], data.test_defect_types[i], int(labels[i])]
                if errors[i] is not None:
                    if writer is not None:
                        writer.writerow([*row, "", "", "", errors[i]])
                    continue
                if writer is not None:
                    writer.writerow([*row, *prediction_cells(-anomaly[i], offset), ""])
                if heatmaps and staging is not None:
                    save_heatmap(staging / "heatmaps" / names[i], features, images[i], maps[i], low, high)
        seconds = time.perf_counter() - start_time
        scored_idx = np.flatnonzero([error is None for error in errors])
        if scored_idx.size == 0:
            raise CommandError(f"none of the {len(images)} test images could be read; the first: {errors[0]}")
        metrics = _metrics(data, features, images, labels, anomaly, maps, scored_idx, offset, fpr_limit)
        masks = metrics.pop("_masks")
        metrics["seconds"] = round(seconds, 3)
        metrics["n_unreadable"] = len(images) - int(scored_idx.size)
        metrics["unreadable"] = [{"path": path, "error": error} for path, error in zip(images, errors) if error]
        if extra:
            metrics.update(extra)
        if staging is not None:
            with atomic_write(staging / "metrics.json", "w", encoding="utf-8") as handle:
                handle.write(json.dumps(metrics, indent=2) + "\n")
            if plots:
                keep = scored_idx
                _write_plots(staging, features, [images[i] for i in keep], labels[keep], anomaly[keep],
                             masks, maps[keep], low, high)
    return metrics


def _metrics(data, features, images, labels, anomaly, maps, keep, offset, fpr_limit) -> dict:
    """The metrics of the images at indices `keep` (those that could be read)."""
    from .metrics import aupro, image_auroc, pixel_auroc

    masks = masks_at_map_geometry(features, [data.test_masks[i] for i in keep])
    labels, anomaly, maps = labels[keep], anomaly[keep], maps[keep]
    predicted = anomaly > -offset
    metrics = {
        "category": data.category,
        "n_test_images": len(images),
        "n_anomalous": int(labels.sum()),
        "image_auroc": _safe_metric(lambda: image_auroc(labels, anomaly)),
        "pixel_auroc": _safe_metric(lambda: pixel_auroc(masks, maps)),
        "aupro": _safe_metric(lambda: aupro(masks, maps, fpr_limit=fpr_limit)),
        "aupro_fpr_limit": fpr_limit,
        "image_auroc_per_defect": {},
        "threshold": -offset,
        "n_predicted_anomalous": int(predicted.sum()),
        "accuracy": float(np.mean(predicted == (labels == 1))),
        "map_size": list(features.input_size_),
    }
    types = np.asarray(data.test_defect_types)[keep]
    for defect in sorted(set(types) - {"good"}):
        subset = (types == "good") | (types == defect)
        metrics["image_auroc_per_defect"][defect] = _safe_metric(
            lambda subset=subset: image_auroc(labels[subset], anomaly[subset])
        )
    metrics["_masks"] = masks
    return metrics


def masks_at_map_geometry(features, mask_paths: Sequence[str | None]) -> np.ndarray:
    """Ground-truth masks brought to the anomaly-map geometry of a model.

    Each mask is resized (and centre-cropped) exactly as the transformer
    resizes its image, with nearest-neighbour sampling; with
    ``crop_size=None`` that is a square resize to ``resize x resize``.

    Parameters
    ----------
    features : PatchFeatureTransformer
        The fitted first step of the pipeline.
    mask_paths : sequence of (str or None)
        Mask files; None for a good image (an all-False mask).

    Returns
    -------
    masks : ndarray of shape (n_masks, H, W), bool
        ``(H, W)`` is ``features.input_size_``.
    """
    from .images import preprocess_mask

    height, width = features.input_size_
    masks = np.zeros((len(mask_paths), height, width), dtype=bool)
    for i, path in enumerate(mask_paths):
        masks[i] = preprocess_mask(path, features.resize, features.crop_size)
    return masks


def format_metrics(metrics: dict) -> str:
    """The metrics of :func:`evaluate_model` as the lines printed by ``evaluate``."""
    def value(number: float | None) -> str:
        return "n/a" if number is None else f"{number:.3f}"

    lines = [
        f"image AUROC   {value(metrics.get('image_auroc'))}",
        f"pixel AUROC   {value(metrics.get('pixel_auroc'))}",
        f"AUPRO@{metrics['aupro_fpr_limit']:g}     {value(metrics.get('aupro'))}",
    ]
    per_defect = metrics.get("image_auroc_per_defect") or {}
    if per_defect:
        lines.append("image AUROC per defect: " + ", ".join(
            f"{name} {value(number)}" for name, number in per_defect.items()
        ))
    lines.append(
        f"threshold {metrics['threshold']:.4g}: {metrics['n_predicted_anomalous']} of "
        f"{metrics['n_test_images']} flagged anomalous ({metrics['n_anomalous']} defective), "
        f"accuracy {metrics['accuracy']:.3f}"
    )
    return "\n".join(lines)


def _safe_metric(function: Callable[[], float]) -> float | None:
    try:
        return float(function())
    except ValueError:  # one class only, no defect region...
        return None


def _write_plots(output, features, images, labels, anomaly, masks, maps, vmin, vmax) -> None:
    from .plotting import plot_examples, plot_roc_curves

    if 0 < labels.sum() < labels.size:
        with_pixels = bool(masks.any()) and not masks.all()
        figure = plot_roc_curves(
            labels, anomaly, masks if with_pixels else None, maps if with_pixels else None
        )
        with atomic_path(output / "roc.png") as temporary:
            figure.savefig(temporary, dpi=100, format="png")
    normal = np.flatnonzero(labels == 0)
    defective = np.flatnonzero(labels == 1)
    worst = [(i, "highest-scored good") for i in normal[np.argsort(-anomaly[normal])][:N_WORST]]
    worst += [(i, "lowest-scored defective") for i in defective[np.argsort(anomaly[defective])][:N_WORST]]
    figure = plot_examples(
        [model_view(features, images[i]) for i, _ in worst],
        [maps[i] for i, _ in worst],
        masks=[masks[i] if labels[i] else None for i, _ in worst],
        scores=[anomaly[i] for i, _ in worst],
        titles=[f"{kind}: {Path(images[i]).name}" for i, kind in worst],
        vmin=vmin,
        vmax=vmax,
    )
    with atomic_path(output / "worst_examples.png") as temporary:
        figure.savefig(temporary, dpi=80, format="png")
