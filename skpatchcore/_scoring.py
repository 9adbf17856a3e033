"""Scoring a list of images chunk by chunk, reporting unreadable images instead of stopping.

Used by :mod:`skpatchcore.evaluation` and the ``score`` command (also with ``--onnx``): every input
position comes back once, in order, with NaN / None gaps and an error
message where the image could not be read.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from .io.images import UnreadableImageError, image_size


class ScoredChunk(NamedTuple):
    """One chunk of :func:`iter_scored`: every input path, with NaN / None gaps for failures."""

    start: int
    paths: list[str]
    scores: np.ndarray  # score_samples, NaN where the image could not be read
    maps: list | np.ndarray  # NaN maps (array) or None (list) where it could not be read
    errors: list[str | None]  # None, or why the image could not be read


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


def iter_scored_onnx(
    runtime, images: Sequence[str], original_size: bool, progress: bool, fail_fast: bool = True
) -> Iterator[ScoredChunk]:
    """:func:`iter_scored` for an :class:`~skpatchcore.onnx_runtime.OnnxPatchCore` (no torch).

    Images are read and preprocessed one by one, ``runtime.batch_size`` at a
    time; the readable ones of each batch are scored together and the
    unreadable ones reported in ``errors`` (or, with `fail_fast`, raised).
    """
    from .onnx_runtime import resize_map

    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="Scoring", unit="img", file=sys.stderr)
    else:  # the minimal runtime (onnxruntime, numpy, Pillow) has no tqdm
        bar = contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))
    with bar as bar:
        for start in range(0, len(images), runtime.batch_size):
            paths = list(images[start:start + runtime.batch_size])
            inputs, errors = [], []
            for path in paths:
                try:
                    inputs.append(runtime.preprocess(path))
                    errors.append(None)
                except (UnreadableImageError, FileNotFoundError) as error:
                    if fail_fast:
                        raise
                    errors.append(" ".join(str(error).split()))
            readable = [i for i, error in enumerate(errors) if error is None]
            scores = np.full(len(paths), np.nan)
            maps: list = [None] * len(paths)
            if readable:
                anomaly, grids = runtime.run(np.stack(inputs))
                scores[readable] = -anomaly
                for i, grid in zip(readable, grids):
                    maps[i] = resize_map(grid, image_size(paths[i], runtime.exif_transpose)) if original_size else grid
            yield ScoredChunk(start, paths, scores, maps, errors)
            bar.update(len(paths))


def _read_error(features, path: str) -> str | None:
    """Why `path` cannot be turned into backbone input, or None if it can."""
    try:
        features.preprocess([path])
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


def check_readable(paths: Sequence[str]) -> None:
    """Open every image header now, so that a bad file fails before the slow work."""
    for path in paths:
        image_size(path)
