"""Synthetic defects and choosing a configuration from normal images only."""

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import NormalOnlyKFold, synthetic_defect_scorer
from skpatchcore.synthetic import (
    ALL_DEFECT_KINDS,
    DEFECT_KINDS,
    MAX_AREA,
    UNEVEN_MAX_AREA,
    UNEVEN_MIN_AREA,
    add_synthetic_defects,
)

from _helpers import small_model


@pytest.fixture(scope="module")
def normal_images(synthetic):
    return np.concatenate([synthetic.train_images, synthetic.test_images[:8]])  # 24 normal images


@pytest.mark.parametrize("kind", ALL_DEFECT_KINDS)
def test_each_kind_changes_the_image_inside_its_mask_only(kind, rng):
    images = rng.integers(100, 156, size=(4, 70, 110, 3), dtype=np.uint8)  # non-square
    images[1] = 180  # a donor that differs from the others
    data = add_synthetic_defects(images, kinds=[kind], defect_fraction=0.5, random_state=3)
    assert data.labels.sum() == 2 and data.kinds.count(kind) == 2
    for index in np.flatnonzero(data.labels):
        mask = data.masks[index]
        low, high = (0.5 * UNEVEN_MIN_AREA, 1.5 * UNEVEN_MAX_AREA) if kind == "uneven" else (0, 1.5 * MAX_AREA)
        assert mask.shape == (70, 110) and low < mask.mean() <= high
        change = np.abs(data.images[index].astype(int) - images[index]).sum(axis=2)
        assert change[mask].mean() > 10 * max(change[~mask].mean(), 0.1)
    for index in np.flatnonzero(data.labels == 0):
        np.testing.assert_array_equal(data.images[index], images[index])
        assert not data.masks[index].any()


def test_uneven_is_large_and_diffuse_and_only_painted_when_asked_for(rng):
    images = rng.integers(100, 156, size=(8, 96, 96, 3), dtype=np.uint8)
    assert "uneven" not in DEFECT_KINDS and "uneven" not in add_synthetic_defects(images, random_state=0).kinds
    uneven = add_synthetic_defects(images, kinds=["uneven"], random_state=0)
    small = add_synthetic_defects(images, kinds=["intensity"], random_state=0)
    for data in (uneven, small):
        assert data.labels.sum() == 4
    assert min(uneven.masks[i].mean() for i in np.flatnonzero(uneven.labels)) > 2 * MAX_AREA
    # Diffuse: a wide soft edge, so pixels just outside the mask are changed too, unlike a sharp blob.
    def ring_change(data):
        from scipy import ndimage

        changes = []
        for i in np.flatnonzero(data.labels):
            ring = ndimage.binary_dilation(data.masks[i], iterations=3) & ~data.masks[i]
            changes.append(np.abs(data.images[i].astype(int) - images[i]).sum(axis=2)[ring].mean())
        return np.mean(changes)

    assert ring_change(uneven) > 0


def test_synthetic_defects_are_reproducible_and_read_files(synthetic, tmp_path):
    from PIL import Image

    paths = []
    for i, image in enumerate(synthetic.train_images[:6]):
        paths.append(str(tmp_path / f"good_{i}.png"))
        Image.fromarray(image[:, :80]).save(paths[-1])
    first = add_synthetic_defects(paths, random_state=5)
    again = add_synthetic_defects(paths, random_state=5)
    other = add_synthetic_defects(paths, random_state=6)
    assert first.images[0].shape == (96, 80, 3)
    assert first.kinds == again.kinds
    for a, b in zip(first.images, again.images):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first.images, other.images))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kinds=["dent"]), "kinds must be"),
        (dict(kinds="crack"), r"kinds'? (parameter of synthetic_defect_scorer )?must be"),
        (dict(defect_fraction=1.0), "defect_fraction"),
    ],
)
def test_bad_synthetic_options(kwargs, match, synthetic):
    with pytest.raises(ValueError, match=match):
        add_synthetic_defects(synthetic.train_images[:4], **kwargs)
    with pytest.raises(ValueError, match=match):
        synthetic_defect_scorer(**kwargs)


def test_one_image_is_refused(synthetic):
    with pytest.raises(ValueError, match="at least 2 images"):
        add_synthetic_defects(synthetic.train_images[:1])
    with pytest.raises(InvalidParameterError, match="'metric' parameter of synthetic_defect_scorer must be"):
        synthetic_defect_scorer(metric="f1")


def test_grid_search_on_normal_images_only(normal_images):
    """GridSearchCV runs with no labelled defect, and its scores are the scorer's on each fold."""
    scorer = synthetic_defect_scorer(metric="mean_auroc", random_state=0)
    cv = NormalOnlyKFold(n_splits=2, shuffle=True, random_state=0)
    grid = {"features__aggregation": ["mean_pool", "concat"]}
    search = GridSearchCV(small_model(), grid, cv=cv, scoring=scorer).fit(normal_images)
    by_hand = []
    for aggregation in grid["features__aggregation"]:
        folds = [scorer(small_model(aggregation=aggregation).fit(normal_images[train]), normal_images[test])
                 for train, test in cv.split(normal_images)]
        by_hand.append(np.mean(folds))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], by_hand)
    assert search.best_params_["features__aggregation"] == grid["features__aggregation"][int(np.argmax(by_hand))]


def test_a_map_sigma_search_with_all_kinds_picks_smoother_maps(normal_images):
    """GridSearchCV over map_sigma scored with all five kinds: the parameter reaches the maps, smoother ones win."""
    cv = NormalOnlyKFold(n_splits=2, shuffle=True, random_state=0)
    grid = {"detector__map_sigma": [0.0, 8.0]}
    uneven = GridSearchCV(small_model(), grid, cv=cv, scoring=synthetic_defect_scorer(
        metric="pixel_auroc", kinds=ALL_DEFECT_KINDS, random_state=0)).fit(normal_images)
    assert uneven.best_params_ == {"detector__map_sigma": 8.0}
    sharp, smooth = uneven.cv_results_["mean_test_score"]
    assert smooth - sharp > 0.01


def test_the_scorer_separates_a_working_model_from_a_blind_one(normal_images):
    train, test = normal_images[:16], normal_images[16:]
    model = small_model().fit(train)
    image_scorer = synthetic_defect_scorer(metric="image_auroc", kinds=["intensity", "crack"])
    pixel_scorer = synthetic_defect_scorer(metric="pixel_auroc", kinds=["intensity", "crack"])
    assert image_scorer(model, test) > 0.8
    assert pixel_scorer(model, test) > 0.8

    class Blind:
        """Scores every image and pixel alike."""

        def __getitem__(self, index):
            return model[index]

        def score_samples(self, X):
            return np.zeros(len(X))

        def score_and_maps(self, X, original_size=False):
            return np.zeros(len(X)), np.zeros((len(X), 96, 96), dtype=np.float32)

    assert image_scorer(Blind(), test) == 0.5
    assert pixel_scorer(Blind(), test) == 0.5
    # Labelled anomalies in the test fold are left out: the same score as without them.
    labels = np.r_[np.zeros(8, dtype=int), 1]
    with_anomaly = np.concatenate([test, test[:1]])
    assert image_scorer(model, with_anomaly, labels) == image_scorer(model, test)
