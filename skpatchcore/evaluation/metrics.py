"""Evaluation metrics for anomaly detection and localisation.

All functions follow the MVTec AD convention: a label or mask value of 1
marks an anomalous sample or pixel, 0 a normal one, and scores (or anomaly
maps) are *higher for more anomalous* inputs.

- :func:`image_auroc` -- area under the ROC curve of image-level scores.
- :func:`pixel_auroc` -- area under the ROC curve of all pixels pooled.
- :func:`aupro` -- normalised area under the per-region-overlap (PRO) curve
  up to a false-positive-rate limit (Bergmann et al., MVTec AD).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "aupro"]

# 8-connectivity, as in the MVTec AD reference evaluation code.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image-level anomaly scores.

    Parameters
    ----------
    labels : array-like of shape (n_samples,)
        Ground truth, 1 (or True) for anomalous and 0 (or False) for normal
        samples.
    scores : array-like of shape (n_samples,)
        Anomaly scores, higher means more anomalous.

    Returns
    -------
    auroc : float
        Area under the ROC curve, in [0, 1].

    Raises
    ------
    ValueError
        If the inputs are not 1-D, have different lengths, if labels are not
        binary, if only one class is present or if scores are not finite.

    Examples
    --------
    >>> from skpatchcore.evaluation.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            "labels and scores must be 1-D arrays, got shapes "
            f"{labels.shape} and {scores.shape}."
        )
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(
            "labels and scores have mismatched lengths: "
            f"{labels.shape[0]} != {scores.shape[0]}."
        )
    labels = _binary(labels, "labels")
    if not np.issubdtype(scores.dtype, np.number) and scores.dtype != bool:
        raise ValueError(f"scores must be numeric, got dtype {scores.dtype}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values.")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.shape[0]:
        raise ValueError(
            "Only one class present in labels "
            f"({'anomalous' if n_pos else 'normal'} only); "
            "AUROC needs both normal (0) and anomalous (1) samples."
        )
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve of all pixels of all images pooled.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth masks. Boolean, 0/1 or 0/255 values; nonzero marks an
        anomalous pixel. Images in a list may have different sizes.
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher means more anomalous; each must have the shape
        of its mask.

    Returns
    -------
    auroc : float
        Pixel-level area under the ROC curve, in [0, 1].

    Raises
    ------
    ValueError
        If masks and maps differ in number or shape, a mask is not binary,
        a map is not finite, or only one class of pixel is present.

    Notes
    -----
    All pixels are gathered into one ``float32`` score vector and one boolean
    label vector; the ROC curve is computed from a single sort, with tied
    scores handled like :func:`sklearn.metrics.roc_auc_score`. Peak extra
    memory is about 20 bytes per pixel.
    """
    scores, labels = pixel_scores_and_labels(masks, maps)
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "Only one class present in masks "
            f"({'anomalous' if n_pos else 'normal'} pixels only); "
            "AUROC needs both normal and anomalous pixels."
        )
    order, ends = _descending_order(scores)
    del scores
    sorted_labels = labels[order]
    del order, labels
    tps = np.cumsum(sorted_labels, dtype=np.int64)[ends]
    del sorted_labels
    fps = ends + 1 - tps
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    return float(trapezoid(tpr, fpr))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve.

    The PRO metric of the MVTec AD benchmark (Bergmann et al., 2021) weights
    every connected anomalous region equally, regardless of its size. At a
    threshold ``t`` the per-region overlap is the mean, over all regions of
    all images, of the fraction of the region's pixels with ``map >= t``;
    the false-positive rate is the fraction of normal pixels (of all images)
    with ``map >= t``. The PRO-vs-FPR curve is integrated from 0 to
    `fpr_limit` with the trapezoidal rule and divided by `fpr_limit`.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth masks. Boolean, 0/1 or 0/255 values; nonzero marks an
        anomalous pixel. Regions are the 8-connected components of each
        image's mask. Images in a list may have different sizes.
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher means more anomalous; each must have the shape
        of its mask.
    fpr_limit : float, default=0.3
        Upper integration limit on the false-positive rate, in (0, 1].

    Returns
    -------
    aupro : float
        Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit`,
        in [0, 1].

    Raises
    ------
    ValueError
        If masks and maps differ in number or shape, a mask is not binary,
        a map is not finite, `fpr_limit` is outside (0, 1], there is no
        anomalous region or there is no normal pixel.

    Notes
    -----
    The curve is computed exactly at every distinct score from one sort of
    all pixels: cumulative sums of the normal-pixel indicator give the false
    positives and cumulative sums of ``1 / region_size`` over region pixels
    give the summed overlaps. Maps are pooled as ``float32``. Only the last
    point of each run of tied scores is kept, ``(0, 0)`` is prepended, and
    the PRO at exactly `fpr_limit` is linearly interpolated.

    References
    ----------
    P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger. "The MVTec
    Anomaly Detection Dataset: A Comprehensive Real-World Dataset for
    Unsupervised Anomaly Detection". IJCV 129, 1038-1059 (2021).
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    pairs = _pairs(masks, maps)
    total = sum(m.size for m, _ in pairs)
    scores = np.empty(total, dtype=np.float32)
    weights = np.zeros(total, dtype=np.float64)
    n_regions = 0
    start = 0
    for mask, amap in pairs:
        stop = start + mask.size
        scores[start:stop] = amap.ravel()
        regions, n = ndimage.label(mask, structure=_STRUCTURE)
        if n:
            sizes = np.bincount(regions.ravel())
            inv = np.zeros(n + 1, dtype=np.float64)
            inv[1:] = 1.0 / sizes[1:]
            weights[start:stop] = inv[regions.ravel()]
            n_regions += n
        start = stop
    _check_finite(scores)
    if n_regions == 0:
        raise ValueError(
            "masks contain no anomalous region (no nonzero pixel); "
            "the PRO curve is undefined."
        )
    n_normal = int(np.count_nonzero(weights == 0.0))
    if n_normal == 0:
        raise ValueError(
            "masks contain no normal pixel; the false-positive rate is undefined."
        )

    order, ends = _descending_order(scores)
    del scores
    sorted_weights = weights[order]
    del order, weights
    fps = np.cumsum(sorted_weights == 0.0, dtype=np.int64)[ends]
    np.cumsum(sorted_weights, out=sorted_weights)
    overlap = sorted_weights[ends]
    del sorted_weights

    fpr = np.concatenate(([0.0], fps / n_normal))
    pro = np.concatenate(([0.0], overlap / n_regions))
    pro = np.minimum(pro, 1.0)  # guard against float round-off above 1

    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if x[-1] < fpr_limit and k < fpr.size:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    return float(trapezoid(y, x)) / fpr_limit


def _binary(values: np.ndarray, name: str) -> np.ndarray:
    """Return `values` as a bool array, checking they are 0/1 (or bool)."""
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            f"{name} must be numeric or boolean, got dtype {values.dtype}."
        )
    bad = ~((values == 0) | (values == 1))
    if np.any(bad):
        offending = np.unique(values[bad])[:5]
        raise ValueError(
            f"{name} must be binary, 0 (normal) or 1 (anomalous); "
            f"found values {offending.tolist()}."
        )
    return values == 1


def _as_images(arrays, name: str) -> list[np.ndarray]:
    """Split an (n, H, W) array or a sequence of 2-D arrays into 2-D arrays."""
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        arrays = np.asarray(arrays)
        if arrays.ndim != 3:
            raise ValueError(
                f"{name} must be an array of shape (n_images, H, W) or a list "
                f"of 2-D arrays, got an array of shape {arrays.shape}."
            )
        return list(arrays)
    images = [np.asarray(a) for a in arrays]
    for i, a in enumerate(images):
        if a.ndim != 2:
            raise ValueError(
                f"{name}[{i}] must be a 2-D array (H, W), got shape {a.shape}."
            )
    return images


def _mask(mask: np.ndarray, index: int) -> np.ndarray:
    """Convert a bool, 0/1 or 0/255 mask to bool, rejecting other values."""
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.number):
        raise ValueError(
            f"masks[{index}] must be numeric or boolean, got dtype {mask.dtype}."
        )
    if mask.size == 0:
        return mask.astype(bool)
    top = mask.max()
    if top not in (0, 1, 255) or not np.all((mask == 0) | (mask == top)):
        raise ValueError(
            f"masks[{index}] is not binary: expected values 0/1, 0/255 or "
            f"bool, found {np.unique(mask)[:5].tolist()}"
            f"{'...' if np.unique(mask).size > 5 else ''}."
        )
    return mask != 0


def _pairs(masks, maps) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate masks and maps and return (bool mask, map) pairs."""
    mask_list = _as_images(masks, "masks")
    map_list = _as_images(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(
            "masks and maps have mismatched lengths: "
            f"{len(mask_list)} != {len(map_list)}."
        )
    if not mask_list:
        raise ValueError("masks and maps are empty.")
    pairs = []
    for i, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise ValueError(
                f"Shape of masks[{i}] {mask.shape} differs from shape of "
                f"maps[{i}] {amap.shape}."
            )
        if not np.issubdtype(amap.dtype, np.number) and amap.dtype != bool:
            raise ValueError(f"maps[{i}] must be numeric, got dtype {amap.dtype}.")
        pairs.append((_mask(mask, i), amap))
    return pairs


def pixel_scores_and_labels(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate all maps into float32 scores and all masks into bool labels."""
    pairs = _pairs(masks, maps)
    total = sum(m.size for m, _ in pairs)
    scores = np.empty(total, dtype=np.float32)
    labels = np.empty(total, dtype=bool)
    start = 0
    for mask, amap in pairs:
        stop = start + mask.size
        scores[start:stop] = amap.ravel()
        labels[start:stop] = mask.ravel()
        start = stop
    _check_finite(scores)
    return scores, labels


def _check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        raise ValueError("maps contain NaN or infinite values.")


def _descending_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort indices by descending score and the last index of each tie run.

    Returns
    -------
    order : ndarray of int
        Indices that sort `scores` in descending order.
    ends : ndarray of int
        Positions (in sorted order) of the last element of each run of equal
        scores, i.e. one per distinct threshold, increasing.
    """
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    ends = np.append(ends, sorted_scores.size - 1)
    return order, ends
