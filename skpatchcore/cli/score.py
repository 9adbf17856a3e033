"""``skpatchcore score``: scores.csv and heatmap overlays for images.

With ``--onnx model.onnx`` the images are scored by the exported graph
(:mod:`skpatchcore.onnx_runtime`: onnxruntime, numpy and Pillow, no torch),
into the same ``scores.csv``.

Unreadable images do not stop a run: they get a row with an ``error`` cell,
are counted at the end and make the exit status :data:`EXIT_PARTIAL`
(``--fail-fast`` stops at the first one instead). The results are written
into a staging folder that replaces the output folder as a whole when
complete (:mod:`skpatchcore.io.result_folder`).
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path

from .._scoring import check_readable, iter_scored, iter_scored_onnx
from ..evaluation.report import colour_range, prediction_cells, save_heatmap, text_cell, unique_names
from ..io.atomic import atomic_write
from ..io.result_folder import staged_result_folder
from ._common import (
    EXIT_PARTIAL,
    CommandError,
    apply_pixel_limit,
    apply_run_options,
    collect_images,
    info,
    load_model,
    progress_enabled,
    warn,
)

#: ``score`` CSV columns (``error`` is empty for scored images; ``heatmap``: the heat map's path in the
#: output folder, empty without one).
SCORE_COLUMNS = ("path", "anomaly_score", "decision", "prediction", "error", "heatmap")
#: What ``score`` writes into its output folder (replaced together at the end).
SCORE_OUTPUTS = ("scores.csv", "heatmaps")
#: Unreadable images listed one by one on stderr (the rest only in scores.csv).
N_LISTED_FAILURES = 10


def run_score(args: argparse.Namespace) -> int:
    """Run ``skpatchcore score`` with parsed arguments; returns the exit status.

    With ``--onnx`` the images are scored by
    :class:`~skpatchcore.onnx_runtime.OnnxPatchCore`, without importing torch.
    """
    apply_pixel_limit(args)
    if args.onnx is not None:
        model = load_onnx_model(args.onnx, args.n_jobs, args.batch_size)
        features = model
    else:
        model = load_model(args.model, args.device, args.allow_pickle)
        apply_run_options(model, args)
        features = model.steps[0][1]
    images = collect_images(args.inputs)
    if args.fail_fast:
        check_readable(images)
    write_images = not args.no_images
    if write_images:
        from ..evaluation.figures import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as error:
            raise CommandError(f"{error} Or pass --no-images.") from error
    output = Path(args.output)
    offset = float(model.offset_ if args.onnx is not None else model.steps[-1][1].offset_)
    vmin, vmax = colour_range(model, args.vmin, args.vmax)
    names = unique_names(images)
    n_anomalous = 0
    failures: list[tuple[str, str]] = []
    start_time = time.perf_counter()
    with staged_result_folder(output, SCORE_OUTPUTS) as staging:
        with atomic_write(staging / "scores.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SCORE_COLUMNS)
            scorer = iter_scored_onnx if args.onnx is not None else iter_scored
            scored = scorer(
                model, images, original_size=features.crop_size_ is None,
                progress=progress_enabled(args), fail_fast=args.fail_fast,
            )
            for chunk in scored:
                for i, (path, score, error) in enumerate(zip(chunk.paths, chunk.scores, chunk.errors)):
                    if error is not None:
                        failures.append((path, error))
                        writer.writerow([text_cell(path), "", "", "", text_cell(error), ""])
                        continue
                    n_anomalous += int(score - offset < 0)
                    heatmap = f"heatmaps/{names[chunk.start + i]}" if write_images else ""
                    writer.writerow([text_cell(path), *prediction_cells(score, offset), "", heatmap])
                    if write_images:
                        save_heatmap(staging / heatmap, features, path, chunk.maps[i], vmin, vmax)
    elapsed = time.perf_counter() - start_time
    n_scored = len(images) - len(failures)
    info(args, f"Scored {n_scored} images in {elapsed:.1f} s: {n_anomalous} anomalous, "
               f"{n_scored - n_anomalous} normal")
    info(args, f"Wrote {output / 'scores.csv'}"
               + (f" and {n_scored} heatmaps in {output / 'heatmaps'}" if write_images else ""))
    return report_failures(failures, len(images), output / "scores.csv")


def load_onnx_model(path, n_jobs: int | None, batch_size: int | None):
    """Open an exported model for ``score --onnx`` (``--n-jobs``: onnxruntime threads)."""
    from ..onnx_runtime import OnnxPatchCore

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"ONNX model file not found: {str(path)!r}")
    threads = None if n_jobs is None or n_jobs < 0 else n_jobs
    try:
        return OnnxPatchCore(path, n_threads=threads, batch_size=batch_size or 8)
    except ImportError as error:
        raise CommandError(str(error)) from error


def report_failures(failures: Sequence[tuple[str, str]], n_images: int, listing: Path | None) -> int:
    """Warn about unreadable images on stderr; the exit status (0, or EXIT_PARTIAL)."""
    if not failures:
        return 0
    where = f" (all listed in the error column of {listing})" if listing is not None else ""
    warn(f"{len(failures)} of {n_images} images could not be read and were not scored{where}:")
    for _, error in failures[:N_LISTED_FAILURES]:
        warn(f"  {error}")
    if len(failures) > N_LISTED_FAILURES:
        warn(f"  ... and {len(failures) - N_LISTED_FAILURES} more")
    return EXIT_PARTIAL
