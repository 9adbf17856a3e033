"""``skpatchcore score``: scores.csv and heatmap overlays for images, with the
scoring and heatmap helpers that ``evaluate`` uses too.

Unreadable images do not stop a run: they get a row with an ``error`` cell,
are counted at the end and make the exit status :data:`EXIT_PARTIAL`
(``--fail-fast`` stops at the first one instead). The results are written
into a staging folder and replace the previous ``scores.csv`` and
``heatmaps/`` only when complete.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._atomic import atomic_write, staged_outputs
from ._cli_common import (
    EXIT_PARTIAL,
    CommandError,
    apply_pixel_limit,
    apply_run_options,
    check_readable,
    collect_images,
    info,
    load_model,
    progress_enabled,
    warn,
)
from .images import UnreadableImageError

#: ``score`` CSV columns (``error`` is empty for scored images).
SCORE_COLUMNS = ("path", "anomaly_score", "decision", "prediction", "error")
#: What ``score`` writes into its output folder (replaced together at the end).
SCORE_OUTPUTS = ("scores.csv", "heatmaps")
#: Unreadable images listed one by one on stderr (the rest only in scores.csv).
N_LISTED_FAILURES = 10


class ScoredChunk(NamedTuple):
    """One chunk of :func:`iter_scored`: every input path, with NaN / None gaps for failures."""

    start: int
    paths: list[str]
    scores: np.ndarray  # score_samples, NaN where the image could not be read
    maps: list | np.ndarray  # NaN maps (array) or None (list) where it could not be read
    errors: list[str | None]  # None, or why the image could not be read


def run_score(args: argparse.Namespace) -> int:
    """Run ``skpatchcore score`` with parsed arguments; returns the exit status."""
    apply_pixel_limit(args)
    model = load_model(args.model, args.device, args.allow_pickle)
    apply_run_options(model, args)
    images = collect_images(args.inputs)
    if args.fail_fast:
        check_readable(images)
    write_images = not args.no_images
    if write_images:
        from .plotting import _require_matplotlib

        try:
            _require_matplotlib()
        except ImportError as error:
            raise CommandError(f"{error} Or pass --no-images.") from error
    output = Path(args.output)
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    vmin, vmax = colour_range(model, args.vmin, args.vmax)
    names = unique_names(images)
    n_anomalous = 0
    failures: list[tuple[str, str]] = []
    start_time = time.perf_counter()
    with staged_outputs(output, SCORE_OUTPUTS) as staging:
        with atomic_write(staging / "scores.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SCORE_COLUMNS)
            scored = iter_scored(
                model, images, original_size=features.crop_size is None,
                progress=progress_enabled(args), fail_fast=args.fail_fast,
            )
            for chunk in scored:
                for i, (path, score, error) in enumerate(zip(chunk.paths, chunk.scores, chunk.errors)):
                    if error is not None:
                        failures.append((path, error))
                        writer.writerow([path, "", "", "", error])
                        continue
                    n_anomalous += int(score - offset < 0)
                    writer.writerow([path, *prediction_cells(score, offset), ""])
                    if write_images:
                        target = staging / "heatmaps" / names[chunk.start + i]
                        save_heatmap(target, features, path, chunk.maps[i], vmin, vmax)
    elapsed = time.perf_counter() - start_time
    n_scored = len(images) - len(failures)
    info(args, f"Scored {n_scored} images in {elapsed:.1f} s: {n_anomalous} anomalous, "
               f"{n_scored - n_anomalous} normal")
    info(args, f"Wrote {output / 'scores.csv'}"
               + (f" and {n_scored} heatmaps in {output / 'heatmaps'}" if write_images else ""))
    return report_failures(failures, len(images), output / "scores.csv")


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


def iter_scored(
    model, images: Sequence[str], original_size: bool, progress: bool, fail_fast: bool = True
) -> Iterator[ScoredChunk]:
    """Score images in the model's chunks, reporting unreadable ones instead of stopping.

    The images go through :meth:`~skpatchcore.PatchCorePipeline.iter_score_and_maps`
    (chunks sized by the model's ``working_memory``, on its Dask scheduler
    when one is set).

    Parameters
    ----------
    model : PatchCorePipeline
    images : sequence of str
    original_size : bool
        Passed to ``iter_score_and_maps``.
    progress : bool
        Show a progress bar on stderr.
    fail_fast : bool, default=True
        Raise the first unreadable image's error. Otherwise, once scoring
        fails on an unreadable file, the images not yet scored are decoded
        one by one, the readable ones are scored and the others reported in
        ``errors``.

    Yields
    ------
    chunk : ScoredChunk
        Consecutive positions of `images`, with NaN / None gaps for failures.
    """
    from tqdm import tqdm

    features = model.steps[0][1]
    features.set_params(progress=False)
    with tqdm(total=len(images), desc="Scoring", unit="img", disable=not progress, file=sys.stderr) as bar:
        done = 0
        try:
            for indices, scores, maps in model.iter_score_and_maps(list(images), original_size=original_size):
                yield ScoredChunk(done, list(images[indices.start:indices.stop]), scores, maps,
                                  [None] * len(indices))
                done = indices.stop
                bar.update(len(indices))
        except (UnreadableImageError, FileNotFoundError):
            if fail_fast:
                raise
            rest = list(images[done:])
            errors = [_read_error(features, path) for path in rest]
            if all(error is None for error in errors):
                raise  # not a file that fails to decode: a real error
            for chunk in _score_readable(model, rest, errors, original_size):
                yield chunk._replace(start=done + chunk.start)
                bar.update(len(chunk.paths))


def _read_error(features, path: str) -> str | None:
    """Why `path` cannot be turned into backbone input, or None if it can."""
    try:
        features._preprocess(path)
    except (UnreadableImageError, FileNotFoundError) as error:
        return " ".join(str(error).split())
    return None


def _score_readable(model, paths: list[str], errors: list[str | None], original_size: bool) -> Iterator[ScoredChunk]:
    """Score the readable `paths` in the model's chunks: consecutive chunks from 0, NaN / None gaps."""
    readable = [position for position, error in enumerate(errors) if error is None]
    map_size = model.steps[0][1].input_size_
    start = 0

    def chunk_until(stop: int, positions, scores, maps) -> ScoredChunk:
        chunk_scores = np.full(stop - start, np.nan)
        chunk_maps = [None] * (stop - start) if original_size else np.full(
            (stop - start, *map_size), np.nan, dtype=np.float32)
        for position, score, anomaly_map in zip(positions, scores, maps):
            chunk_scores[position - start] = score
            chunk_maps[position - start] = anomaly_map
        return ScoredChunk(start, paths[start:stop], chunk_scores, chunk_maps, errors[start:stop])

    if readable:
        chunks = model.iter_score_and_maps([paths[i] for i in readable], original_size=original_size)
        for indices, scores, maps in chunks:
            positions = readable[indices.start:indices.stop]
            yield chunk_until(positions[-1] + 1, positions, scores, maps)
            start = positions[-1] + 1
    if start < len(paths):
        yield chunk_until(len(paths), [], [], [])


def prediction_cells(score_sample: float, offset: float) -> list[str]:
    """The ``anomaly_score``, ``decision`` and ``prediction`` CSV cells of one image.

    ``decision = score_sample - offset``; below 0 is anomalous.
    """
    decision = float(score_sample) - offset
    return [repr(-float(score_sample)), repr(decision), "anomalous" if decision < 0 else "normal"]


def colour_range(model, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Heatmap colour limits shared by all images: 0 to twice the threshold.

    The threshold (minus ``offset_``) is the highest anomaly score of the
    calibration images, so normal regions stay in the blue half of the
    colour map and only patches above the threshold turn yellow to red.
    """
    threshold = float(-model.steps[-1][1].offset_)
    low = 0.0 if vmin is None else float(vmin)
    high = max(2.0 * threshold, low + 1e-6) if vmax is None else float(vmax)
    return low, high


def model_view(features, image) -> np.ndarray:
    """The image as the backbone sees it (resized, cropped), float RGB in [0, 1]."""
    from .images import preprocess_image

    array = preprocess_image(
        image, features.resize, features.crop_size, features.interpolation, features.mean, features.std,
        features.exif_transpose,
    )
    mean = np.asarray(features.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(features.std, dtype=np.float32)[:, None, None]
    return np.clip(np.moveaxis(array * std + mean, 0, -1), 0.0, 1.0)


def save_heatmap(target: Path, features, image_path: str, anomaly_map, vmin: float, vmax: float) -> None:
    """Overlay on the original image without a crop, else on the cropped view."""
    from .plotting import save_overlay_png

    if features.crop_size is not None:
        image = model_view(features, image_path)
    else:  # the original image, turned upright only if the model turned it
        from .images import read_image

        image = np.asarray(read_image(image_path, getattr(features, "exif_transpose", True)))
    save_overlay_png(target, image, anomaly_map, vmin, vmax)


def unique_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per path; colliding stems get ``_2``, ``_3``... suffixes."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, k = stem, 1
        while name.lower() in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name.lower())
        names.append(f"{name}.png")
    return names
