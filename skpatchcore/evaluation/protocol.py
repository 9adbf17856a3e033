"""Evaluating a fitted model on a labelled test set.

- :func:`evaluate` -- image AUROC, pixel AUROC, AUPRO and per-defect image
  AUROC of a test set (what :func:`~skpatchcore.io.datasets.load_mvtec`
  returns, or lists of images, labels and masks), and one row of scores
  per image as a pandas ``DataFrame``.
- :func:`evaluate_model` -- the same metrics of an MVTec-layout test set,
  optionally with the result folder that ``skpatchcore evaluate`` writes
  (``metrics.json``, ``scores.csv``, heatmaps and plots).
- :func:`masks_at_map_geometry` -- ground-truth masks brought to the
  anomaly-map geometry of a model.
- :func:`format_metrics` -- the metrics as the lines the command prints.

Pixel metrics are computed on the backbone's input view: each mask is
resized (and centre-cropped) like its image. Unreadable test images are
left out of the metrics and listed in ``metrics["unreadable"]`` unless
``fail_fast=True``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from sklearn.utils import Bunch

from .._scoring import check_readable, iter_scored
from ..io.atomic import atomic_write
from ..io.result_folder import staged_result_folder
from .report import (
    EVALUATE_COLUMNS,
    EVALUATE_OUTPUTS,
    colour_range,
    prediction_cells,
    save_heatmap,
    text_cell,
    unique_names,
    write_plots,
)

if TYPE_CHECKING:
    import pandas

__all__ = ["evaluate", "evaluate_model", "format_metrics", "masks_at_map_geometry"]


class _Scored(NamedTuple):
    """A scored test set: NaN scores and maps where an image could not be read."""

    test: Bunch
    labels: np.ndarray  # int, 1 = anomalous
    scores: np.ndarray  # score_samples (higher = more normal)
    maps: np.ndarray  # (n_images, H, W) at the map geometry
    errors: list  # None, or why the image could not be read
    keep: np.ndarray  # indices of the scored images
    masks: np.ndarray  # ground truth of the scored images at the map geometry
    offset: float
    metrics: dict


def evaluate(
    model,
    data: Bunch | None = None,
    *,
    images: Sequence | None = None,
    labels=None,
    masks: Sequence | None = None,
    defect_types: Sequence[str] | None = None,
    fpr_limit: float = 0.3,
    progress: bool = False,
    fail_fast: bool = False,
) -> tuple[dict, pandas.DataFrame]:
    """Metrics of a fitted model on a labelled test set, and its per-image scores.

    Pass either `data` or `images` and `labels` (with optional `masks` and
    `defect_types`).

    Parameters
    ----------
    model : PatchCorePipeline
        A fitted pipeline.
    data : Bunch, default=None
        Output of :func:`skpatchcore.io.datasets.load_mvtec` (its
        ``test_images``, ``test_labels``, ``test_defect_types``,
        ``test_masks`` and ``category``).
    images : sequence of str, path-like or ndarray, default=None
        Test images.
    labels : array-like of shape (n_images,), default=None
        1 (or True) for anomalous, 0 for normal images.
    masks : sequence of (str, path-like, ndarray or None), default=None
        Ground truth of each image at the image's own size (nonzero marks a
        defect); None for an image without defect pixels. Without masks the
        pixel metrics are None.
    defect_types : sequence of str, default=None
        Kind of each image (``"good"`` for normal ones); gives
        ``metrics["image_auroc_per_defect"]``.
    fpr_limit : float, default=0.3
        Integration limit of AUPRO.
    progress : bool, default=False
        Show a progress bar on stderr.
    fail_fast : bool, default=False
        Raise at the first unreadable image. Otherwise unreadable images are
        left out of the metrics, listed in ``metrics["unreadable"]`` and get
        NaN scores and an ``error`` in the DataFrame.

    Returns
    -------
    metrics : dict
        As :func:`evaluate_model` returns: ``image_auroc``, ``pixel_auroc``,
        ``aupro`` (each None where undefined, e.g. one class only),
        ``image_auroc_per_defect``, ``threshold``, ``accuracy``, counts,
        ``seconds``, ``n_unreadable`` and ``unreadable``.
    scores : pandas.DataFrame
        One row per image, in order: ``path`` (None for arrays),
        ``defect_type``, ``label``, ``score_samples``, ``decision_function``
        (below 0 is anomalous), ``prediction`` (-1 anomalous, 1 normal, as
        :meth:`~skpatchcore.PatchCorePipeline.predict`; missing for an
        unreadable image) and ``error``.

    Raises
    ------
    ValueError
        If the inputs disagree in length, labels are not binary, a mask's
        size differs from its image's, or no image could be read.

    Examples
    --------
    >>> from skpatchcore.io.datasets import load_mvtec
    >>> from skpatchcore.evaluation import evaluate
    >>> metrics, scores = evaluate(model, load_mvtec("mvtec/bottle"))  # doctest: +SKIP
    >>> metrics["image_auroc"], scores.groupby("defect_type")["decision_function"].mean()  # doctest: +SKIP
    """
    test = _test_set(data, images, labels, masks, defect_types)
    scored = _score_test_set(model, test, fpr_limit, progress, fail_fast)
    return scored.metrics, _score_frame(scored)


def evaluate_model(
    model,
    data: Bunch,
    output: str | os.PathLike | None = None,
    plots: bool = False,
    heatmaps: bool = False,
    fpr_limit: float = 0.3,
    progress: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    extra: dict | None = None,
    fail_fast: bool = False,
) -> dict:
    """Score an MVTec-layout test set, compute the benchmark metrics, write the results.

    Parameters
    ----------
    model : PatchCorePipeline
        A fitted pipeline.
    data : Bunch
        Output of :func:`skpatchcore.io.datasets.load_mvtec`.
    output : str or path-like, default=None
        Folder for ``metrics.json`` and ``scores.csv`` (nothing is written
        when None). Everything is written into a staging folder beside it,
        which replaces the whole folder in one step when complete
        (:mod:`skpatchcore.io.result_folder`); a folder holding files other
        than results of ``score`` / ``evaluate`` is refused.
    plots : bool, default=False
        Also write ``roc.png`` and ``worst_examples.png`` (needs matplotlib).
    heatmaps : bool, default=False
        Also write ``heatmaps/<stem>.png`` overlays (needs matplotlib).
    fpr_limit : float, default=0.3
        Integration limit of AUPRO.
    progress : bool, default=False
        Show a progress bar on stderr.
    vmin, vmax : float, default=None
        Heatmap colour limits; 0 and twice the model's threshold when None.
    extra : dict, default=None
        Further entries for the metrics (and ``metrics.json``).
    fail_fast : bool, default=False
        Raise at the first unreadable test image. Otherwise unreadable images
        are left out of the metrics and listed in ``metrics["unreadable"]``
        and in the ``error`` column of ``scores.csv``.

    Returns
    -------
    metrics : dict
        ``category``, ``n_test_images``, ``n_anomalous``, ``image_auroc``,
        ``pixel_auroc``, ``aupro`` (None where undefined, e.g. a test set
        without defects), ``aupro_fpr_limit``, ``image_auroc_per_defect``,
        ``threshold``, ``n_predicted_anomalous``, ``accuracy``,
        ``map_size``, ``seconds`` (scoring time), ``n_unreadable`` and
        ``unreadable`` (``{"path", "error"}`` dicts), then `extra`.
    """
    if (plots or heatmaps) and output is not None:
        from .figures import require_matplotlib

        require_matplotlib()
    low, high = colour_range(model, vmin, vmax)
    with ExitStack() as stack:
        staging = None if output is None else stack.enter_context(staged_result_folder(output, EVALUATE_OUTPUTS))
        scored = _score_test_set(model, data, fpr_limit, progress, fail_fast)
        metrics = scored.metrics
        metrics.update(extra or {})
        if staging is not None:
            _write_results(staging, model, scored, plots, heatmaps, low, high)
    return metrics


def masks_at_map_geometry(
    features, masks: Sequence, images: Sequence | None = None
) -> np.ndarray:
    """Ground-truth masks brought to the anomaly-map geometry of a model.

    Each mask is resized (and centre-cropped) exactly as the transformer
    resizes its image, with nearest-neighbour sampling; with
    ``crop_size=None`` that is a square resize to ``resize x resize``.

    Parameters
    ----------
    features : PatchFeatureTransformer
        The fitted first step of the pipeline.
    masks : sequence of (str, path-like, ndarray or None)
        Mask files or 2-D arrays (nonzero marks a defect); None for a good
        image (an all-False mask).
    images : sequence of (str, path-like or ndarray), default=None
        The image of each mask: when given, every mask must have its image's
        size (upright, as the transformer reads it).

    Returns
    -------
    masks : ndarray of shape (n_masks, H, W), bool, or list of ndarray
        ``(H, W)`` is ``features.input_size_``. For a tiled transformer
        (``tile_size`` set), whose maps are at each image's own size, a
        list of the masks as they are (bool).

    Raises
    ------
    ValueError
        If `images` is given and differs from `masks` in length, or a mask's
        size differs from its image's.
    """
    from ..io.images import image_size, mask_to_bool, preprocess_mask, read_mask

    if images is not None and len(images) != len(masks):
        raise ValueError(f"Got {len(masks)} masks for {len(images)} images.")
    height, width = features.input_size_
    tiled = getattr(features, "tile_size", None) is not None
    result = [None] * len(masks) if tiled else np.zeros((len(masks), height, width), dtype=bool)
    upright = getattr(features, "exif_transpose", True)
    for i, mask in enumerate(masks):
        if mask is None:
            if tiled:
                if images is None:
                    raise ValueError("A tiled model's masks are at their images' sizes: pass the images too.")
                result[i] = np.zeros(image_size(images[i], upright), dtype=bool)
            continue
        array = mask_to_bool(np.asarray(mask)) if isinstance(mask, np.ndarray) else read_mask(mask)
        if images is not None and array.shape != image_size(images[i], upright):
            name = _name(images[i])
            raise ValueError(
                f"masks[{i}] has size {array.shape[0]}x{array.shape[1]} but its image"
                f"{'' if name is None else ' ' + repr(name)} is "
                f"{'x'.join(map(str, image_size(images[i], upright)))} (height x width); "
                "a mask must have its image's size."
            )
        result[i] = array if tiled else preprocess_mask(array, features.resize_, features.crop_size_)
    return result


def format_metrics(metrics: dict) -> str:
    """The metrics of :func:`evaluate_model` as the lines printed by ``skpatchcore evaluate``.

    Parameters
    ----------
    metrics : dict

    Returns
    -------
    text : str
    """
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


# --------------------------------------------------------------------------
# scoring and metrics


def _test_set(data, images, labels, masks, defect_types) -> Bunch:
    """`data`, or a Bunch like :func:`~skpatchcore.io.datasets.load_mvtec`'s built from the lists."""
    lists = (images, labels, masks, defect_types)
    if data is not None:
        if any(item is not None for item in lists):
            raise ValueError("Pass either data or images, labels, masks and defect_types, not both.")
        return data
    if images is None or labels is None:
        raise ValueError("evaluate needs data (see skpatchcore.io.datasets.load_mvtec) or images and labels.")
    images = list(images)
    n_images = len(images)
    labels = np.asarray(labels)
    if labels.shape != (n_images,):
        raise ValueError(f"labels has shape {labels.shape}; expected ({n_images},), one label per image.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); found {np.unique(labels)[:5].tolist()}.")
    masks = [None] * n_images if masks is None else list(masks)
    defect_types = [None] * n_images if defect_types is None else list(defect_types)
    for name, values in (("masks", masks), ("defect_types", defect_types)):
        if len(values) != n_images:
            raise ValueError(f"Got {len(values)} {name} for {n_images} images.")
    return Bunch(test_images=images, test_labels=labels.astype(int), test_defect_types=defect_types,
                 test_masks=masks, category=None)


def _score_test_set(model, test: Bunch, fpr_limit: float, progress: bool, fail_fast: bool) -> _Scored:
    """Score every test image and compute the metrics of those that could be read."""
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    images = list(test.test_images)
    labels = np.asarray(test.test_labels, dtype=int)
    if fail_fast:
        check_readable(images)
    height, width = features.input_size_
    tiled = getattr(features, "tile_size", None) is not None  # maps at each image's own size
    maps = [None] * len(images) if tiled else np.empty((len(images), height, width), dtype=np.float32)
    scores = np.empty(len(images), dtype=np.float64)
    errors: list[str | None] = [None] * len(images)
    start_time = time.perf_counter()
    for chunk in iter_scored(model, images, tiled, progress, fail_fast=fail_fast):
        stop = chunk.start + len(chunk.paths)
        maps[chunk.start:stop] = chunk.maps
        scores[chunk.start:stop] = chunk.scores
        errors[chunk.start:stop] = chunk.errors
    seconds = time.perf_counter() - start_time
    keep = np.flatnonzero([error is None for error in errors])
    if keep.size == 0:
        raise ValueError(f"none of the {len(images)} test images could be read; the first: {errors[0]}")
    masks = masks_at_map_geometry(features, [test.test_masks[i] for i in keep], [images[i] for i in keep])
    types = np.asarray(list(test.test_defect_types), dtype=object)[keep]
    metrics = {"category": test.category, "n_test_images": len(images)}
    kept_maps = [maps[i] for i in keep] if tiled else maps[keep]
    metrics.update(_metrics(labels[keep], -scores[keep], types, masks, kept_maps, offset, fpr_limit))
    metrics["map_size"] = "original" if tiled else list(features.input_size_)
    metrics["seconds"] = round(seconds, 3)
    metrics["n_unreadable"] = len(images) - int(keep.size)
    metrics["unreadable"] = [{"path": _name(image), "error": error}
                             for image, error in zip(images, errors) if error]
    return _Scored(test, labels, scores, maps, errors, keep, masks, offset, metrics)


def _metrics(labels, anomaly, types, masks, maps, offset: float, fpr_limit: float) -> dict:
    """Metrics of scored images: anomaly scores (higher = more anomalous) and maps."""
    from .metrics import aupro, image_auroc, pixel_auroc

    predicted = anomaly > -offset
    metrics = {
        "n_anomalous": int(labels.sum()),
        "image_auroc": _safe_metric(lambda: image_auroc(labels, anomaly)),
        "pixel_auroc": _safe_metric(lambda: pixel_auroc(masks, maps)),
        "aupro": _safe_metric(lambda: aupro(masks, maps, fpr_limit=fpr_limit)),
        "aupro_fpr_limit": fpr_limit,
        "image_auroc_per_defect": {},
        "threshold": -offset,
        "n_predicted_anomalous": int(predicted.sum()),
        "accuracy": float(np.mean(predicted == (labels == 1))),
    }
    for defect in sorted({kind for kind in types[labels == 1] if kind is not None}):
        subset = (labels == 0) | (types == defect)
        metrics["image_auroc_per_defect"][defect] = _safe_metric(
            lambda subset=subset: image_auroc(labels[subset], anomaly[subset])
        )
    return metrics


def _safe_metric(function: Callable[[], float]) -> float | None:
    try:
        return float(function())
    except ValueError:  # one class only, no defect region...
        return None


def _name(image) -> str | None:
    """A path as text; None for an array image."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


# --------------------------------------------------------------------------
# results


def _score_frame(scored: _Scored) -> pandas.DataFrame:
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError(
            "evaluate returns its per-image scores as a pandas DataFrame: pip install 'skpatchcore[pandas]' "
            "(or use evaluate_model, which needs no pandas)."
        ) from error

    decision = scored.scores - scored.offset
    prediction = pd.array(
        [pd.NA if np.isnan(value) else (-1 if value < 0 else 1) for value in decision], dtype="Int64"
    )
    return pd.DataFrame({
        "path": [_name(image) for image in scored.test.test_images],
        "defect_type": list(scored.test.test_defect_types),
        "label": scored.labels,
        "score_samples": scored.scores,
        "decision_function": decision,
        "prediction": prediction,
        "error": scored.errors,
    })


def _write_results(staging: Path, model, scored: _Scored, plots: bool, heatmaps: bool, low, high) -> None:
    """``scores.csv``, ``metrics.json`` and, when asked, heatmaps and plots into `staging`."""
    features = model.steps[0][1]
    test = scored.test
    images = list(test.test_images)
    names = unique_names(images)
    with atomic_write(staging / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(EVALUATE_COLUMNS)
        for i, image in enumerate(images):
            row = [text_cell(image), text_cell(test.test_defect_types[i]), int(scored.labels[i])]
            if scored.errors[i] is not None:
                writer.writerow([*row, "", "", "", text_cell(scored.errors[i]), ""])
                continue
            heatmap = f"heatmaps/{names[i]}" if heatmaps else ""
            writer.writerow([*row, *prediction_cells(scored.scores[i], scored.offset), "", heatmap])
            if heatmaps:
                save_heatmap(staging / heatmap, features, image, scored.maps[i], low, high)
    with atomic_write(staging / "metrics.json", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(scored.metrics, indent=2) + "\n")
    if plots:
        keep = scored.keep
        write_plots(staging, features, [images[i] for i in keep], scored.labels[keep], -scored.scores[keep],
                    scored.masks, [scored.maps[i] for i in keep], low, high)
