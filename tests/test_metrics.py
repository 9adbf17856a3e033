"""Tests for skpatchcore.evaluation.metrics against naive reference implementations."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from skpatchcore.evaluation.metrics import aupro, image_auroc, pixel_auroc


def _random_data(seed, n=4, shape=(12, 14), with_region=True):
    """Small masks with a few rectangular/irregular regions and noisy maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, *shape), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
            h, w = rng.integers(1, 4, size=2)
            masks[i, y : y + h, x : x + w] = True
    if with_region and not masks.any():
        masks[0, 2:4, 3:6] = True
    # overlapping signal + noise, rounded so that many scores are tied
    maps = np.round(masks * 0.8 + rng.random(masks.shape), 1)
    return masks, maps


def _naive_aupro(masks, maps, fpr_limit=0.3):
    """Threshold-by-threshold PRO curve, as in the MVTec reference code."""
    regions = []
    for mask, amap in zip(masks, maps):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labeled == k] for k in range(1, n + 1)]
    normal = np.concatenate(
        [amap[~mask.astype(bool)] for mask, amap in zip(masks, maps)]
    )
    fprs, pros = [0.0], [0.0]
    thresholds = np.unique(np.concatenate([np.ravel(m) for m in maps]))[::-1]
    for t in thresholds:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    i = np.flatnonzero(fprs <= fpr_limit)[-1]
    x, y = list(fprs[: i + 1]), list(pros[: i + 1])
    if fprs[i] < fpr_limit:  # linear interpolation of the PRO at fpr_limit
        slope = (pros[i + 1] - pros[i]) / (fprs[i + 1] - fprs[i])
        x.append(fpr_limit)
        y.append(pros[i] + slope * (fpr_limit - fprs[i]))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return trapezoid(y, x) / fpr_limit


# --------------------------------------------------------------------------
# image_auroc


def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.5 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_auroc(labels.astype(bool), scores) == pytest.approx(
        roc_auc_score(labels, scores)
    )
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0
    assert image_auroc([0, 1], [1.0, 0.0]) == 0.0


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 1], [0.1, 0.2], "mismatched lengths"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "binary"),
        ([-1, 1, 1], [0.1, 0.2, 0.3], "binary"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "one class"),
        ([0, 0], [0.1, 0.2], "one class"),
        ([0, 1], [0.1, np.nan], "NaN"),
    ],
)
def test_image_auroc_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(labels, scores)


# --------------------------------------------------------------------------
# pixel_auroc


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn(seed):
    masks, maps = _random_data(seed)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/1 and 0/255 masks, float32 maps
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected)
    assert pixel_auroc(masks.astype(np.uint8) * 255, maps.astype(np.float32)) == (
        pytest.approx(expected)
    )


def test_pixel_auroc_list_of_different_sizes():
    rng = np.random.default_rng(1)
    masks = [rng.random((5, 7)) < 0.3, rng.random((9, 4)) < 0.3, np.zeros((3, 3), bool)]
    maps = [m * 0.5 + rng.random(m.shape) for m in masks]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]),
        np.concatenate([a.ravel() for a in maps]),
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


def test_pixel_auroc_perfect_and_inverse():
    masks, _ = _random_data(3)
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks) == 0.0
    assert pixel_auroc(masks, np.zeros(masks.shape)) == 0.5


@pytest.mark.parametrize(
    "masks, maps, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "Shape of masks\\[0\\]"),
        ([np.eye(4), np.eye(3)], [np.eye(4), np.eye(4)], "Shape of masks\\[1\\]"),
        (np.zeros((2, 4, 4)), np.zeros((3, 4, 4)), "mismatched lengths"),
        (np.full((1, 3, 3), 0.5), np.zeros((1, 3, 3)), "not binary"),
        (np.array([[[0, 1], [2, 0]]]), np.zeros((1, 2, 2)), "not binary"),
        (np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), "one class"),
        (np.ones((1, 3, 3)), np.zeros((1, 3, 3)), "one class"),
        (np.eye(3)[None], np.full((1, 3, 3), np.nan), "NaN"),
        (np.eye(3), np.eye(3), "shape \\(n_images, H, W\\)"),
        ([np.ones(3)], [np.ones(3)], "2-D"),
    ],
)
def test_pixel_auroc_errors(masks, maps, match):
    with pytest.raises(ValueError, match=match):
        pixel_auroc(masks, maps)


# --------------------------------------------------------------------------
# aupro


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_naive(seed, fpr_limit):
    masks, maps = _random_data(seed)
    expected = _naive_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_continuous_scores_and_lists():
    rng = np.random.default_rng(7)
    masks = [np.zeros((10, 8), bool), np.zeros((6, 11), bool)]
    masks[0][1:3, 1:3] = True
    masks[0][6:9, 4:8] = True
    masks[1][2:5, 2:9] = True
    maps = [m * 0.7 + rng.random(m.shape) for m in masks]
    expected = _naive_aupro(masks, maps)
    masks_255 = [m.astype(np.uint8) * 255 for m in masks]
    assert aupro(masks_255, maps) == pytest.approx(expected)


def test_aupro_regions_use_8_connectivity():
    # two diagonal pixels form ONE region; a large region gets the same weight
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True
    mask[0, 4:8, 4:8] = True
    amap = np.zeros((1, 8, 8))
    amap[0, 1, 1] = amap[0, 2, 2] = 1.0  # only the small region is found
    # the first threshold finds 1 of 2 regions at FPR 0 (with 4-connectivity
    # it would be 2 of 3); the next accepts everything at FPR 1
    expected = _naive_aupro(mask, amap, 1.0)
    assert aupro(mask, amap, fpr_limit=1.0) == pytest.approx(expected)
    # PRO 0.5 at FPR 0, then linear to (1, 1): at FPR 0.3 the PRO is 0.65
    assert aupro(mask, amap, fpr_limit=0.3) == pytest.approx((0.5 + 0.65) / 2)


def test_aupro_perfect_and_inverse():
    masks, _ = _random_data(2)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)
    # uninformative constant map: the whole curve is the point (1, 1)
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


def test_aupro_random_maps_near_diagonal():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 32, 32), bool)
    masks[:, 8:20, 10:22] = True
    maps = rng.random(masks.shape)
    # PRO ~= FPR for random maps, so the normalised area is ~ fpr_limit / 2
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)


@pytest.mark.parametrize(
    "masks, maps, kwargs, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), {}, "no anomalous region"),
        (np.ones((2, 4, 4)), np.zeros((2, 4, 4)), {}, "no normal pixel"),
        (np.eye(4)[None], np.zeros((1, 4, 5)), {}, "Shape of masks\\[0\\]"),
        (np.eye(4)[None], np.zeros((2, 4, 4)), {}, "mismatched lengths"),
        (np.eye(4)[None] * 3, np.zeros((1, 4, 4)), {}, "not binary"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"fpr_limit": 0}, "fpr_limit"),
        (np.eye(4)[None], np.zeros((1, 4, 4)), {"fpr_limit": 1.5}, "fpr_limit"),
        (np.eye(4)[None], np.full((1, 4, 4), np.inf), {}, "infinite"),
    ],
)
def test_aupro_errors(masks, maps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aupro(masks, maps, **kwargs)
