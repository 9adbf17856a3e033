"""The three estimators together: end to end, GridSearchCV, persistence."""

import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

from skpatchcore import IncompatibleModelError, NormalOnlyKFold, PatchCorePipeline, anomaly_auroc_scorer
from skpatchcore.evaluation.metrics import aupro, image_auroc, pixel_auroc

from _helpers import small_model


@pytest.fixture(scope="module")
def fitted(synthetic):
    return small_model().fit(synthetic.train_images)


def test_end_to_end_detects_and_localises_generated_defects(fitted, synthetic):
    scores, maps = fitted.score_and_maps(synthetic.test_images)
    assert maps.shape == (len(synthetic.test_images), 96, 96)
    # Random-weight features still separate these visible defects.
    assert image_auroc(synthetic.test_labels, -scores) > 0.9
    assert pixel_auroc(synthetic.test_masks, maps) > 0.85
    assert aupro(synthetic.test_masks, maps) > 0.5
    predictions = fitted.predict(synthetic.test_images)
    assert set(np.unique(predictions)) <= {-1, 1}
    # Most good parts pass and most defective parts are flagged.
    assert np.mean(predictions[synthetic.test_labels == 0] == 1) >= 0.75
    assert np.mean(predictions[synthetic.test_labels == 1] == -1) >= 0.75


def test_pipeline_methods_agree(fitted, synthetic):
    images = synthetic.test_images[:4]
    scores, maps = fitted.score_and_maps(images)
    np.testing.assert_allclose(fitted.score_samples(images), scores)
    np.testing.assert_allclose(fitted.anomaly_maps(images), maps)
    np.testing.assert_allclose(fitted.decision_function(images), scores - fitted[-1].offset_)


def test_maps_at_original_size(fitted, synthetic):
    images = [synthetic.test_images[0][:80, :60], synthetic.test_images[1]]
    maps = fitted.anomaly_maps(images, original_size=True)
    assert [m.shape for m in maps] == [(80, 60), (96, 96)]
    cropped = small_model(resize=110, crop_size=96).fit(synthetic.train_images[:4])
    with pytest.raises(ValueError, match="crop_size=None"):
        cropped.anomaly_maps(images, original_size=True)


def test_normal_only_kfold():
    y = np.array([0] * 9 + [1] * 4)
    splits = list(NormalOnlyKFold(n_splits=3).split(np.zeros(13), y))
    assert len(splits) == 3
    held_out = []
    for train, test in splits:
        assert np.all(y[train] == 0)
        assert set(np.flatnonzero(y == 1)) <= set(test)
        assert not set(train) & set(test)
        held_out.extend(np.intersect1d(test, np.flatnonzero(y == 0)))
    assert sorted(held_out) == list(range(9))
    # Normal samples only (y all 0, or no y): plain folds of them.
    for y_normal in (np.zeros(5), None):
        folds = list(NormalOnlyKFold(3).split(np.zeros(5), y_normal))
        assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(5))
    with pytest.raises(ValueError, match="at least n_splits=3 normal samples"):
        list(NormalOnlyKFold(3).split(np.zeros(4), [0, 0, 1, 1]))


def test_grid_search_tunes_the_coreset_ratio(synthetic):
    X = np.concatenate([synthetic.train_images[:10], synthetic.test_images])
    y = np.concatenate([np.zeros(10, dtype=int), synthetic.test_labels])
    search = GridSearchCV(
        small_model(),
        {"coreset__sampling_ratio": [0.02, 0.25]},
        scoring=anomaly_auroc_scorer,
        cv=NormalOnlyKFold(n_splits=2),
    )
    search.fit(X, y)
    assert np.all(search.cv_results_["mean_test_score"] > 0.8)
    # The search's scores, recomputed by hand: same splits, fits on the normal training folds.
    splits = list(NormalOnlyKFold(n_splits=2).split(X, y))
    by_hand = {}
    for ratio in (0.02, 0.25):
        folds = [anomaly_auroc_scorer(small_model(sampling_ratio=ratio).fit(X[train]), X[test], y[test])
                 for train, test in splits]
        by_hand[ratio] = np.mean(folds)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], [by_hand[0.02], by_hand[0.25]])
    best = max(by_hand, key=by_hand.get)
    assert search.best_params_["coreset__sampling_ratio"] == best
    # The refit model uses the best ratio on the normal samples only.
    refit = search.best_estimator_
    assert isinstance(refit, PatchCorePipeline)
    assert refit[1].sampling_ratio == best
    n_patches = int(np.sum(y == 0)) * int(np.prod(refit[0].feature_shape_[:2]))
    assert refit[-1].memory_bank_.shape[0] == int(n_patches * best)


def test_anomaly_auroc_scorer_orientation(fitted, synthetic):
    auroc = anomaly_auroc_scorer(fitted, synthetic.test_images, synthetic.test_labels)
    assert auroc > 0.9  # sklearn's "roc_auc" on decision_function would give 1 - auroc
    with pytest.raises(ValueError, match="use synthetic_defect_scorer"):
        anomaly_auroc_scorer(fitted, synthetic.test_images[:3], np.zeros(3))


def test_saved_model_scores_identically_in_a_fresh_process(fitted, synthetic, tmp_path):
    path = tmp_path / "model.joblib"
    images = tmp_path / "images.npy"
    joblib.dump(fitted, path)
    np.save(images, synthetic.test_images[:5])
    expected = fitted.score_samples(synthetic.test_images[:5])
    code = (
        "import joblib, numpy as np, sys;"
        f"m = joblib.load({str(path)!r});"
        f"np.save({str(tmp_path / 'scores.npy')!r}, m.score_samples(np.load({str(images)!r})));"
        # The traced backbone needs no torchvision (whose import costs ~1.6 s).
        "assert 'torchvision' not in sys.modules, 'torchvision imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "", "NO_PROXY": "*", "HOME": str(tmp_path)})
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), expected)
    # A random-weight ResNet-18 truncated after layer3 plus a small bank.
    assert path.stat().st_size < 20e6


def test_incompatible_saved_model_is_refused(fitted, tmp_path):
    state = fitted[-1].__getstate__()
    state["_skpatchcore_format"] = 999
    clone = object.__new__(type(fitted[-1]))
    with pytest.raises(IncompatibleModelError, match="model format 999"):
        clone.__setstate__(state)
    # The same through pickle: a file written by a different model format.
    blob = pickle.dumps(fitted[-1]).replace(b"_skpatchcore_format", b"_skpatchcore_formaX")
    with pytest.raises(IncompatibleModelError, match="Refit the model"):
        pickle.loads(blob)


def test_fit_with_labels_uses_normal_samples_only(synthetic):
    X = np.concatenate([synthetic.train_images[:6], synthetic.test_images[-4:]])
    y = np.array([0] * 6 + [1] * 4)
    labelled = small_model(sampling_ratio=1.0).fit(X, y)
    normal_only = small_model(sampling_ratio=1.0).fit(synthetic.train_images[:6])
    np.testing.assert_array_equal(labelled[-1].memory_bank_, normal_only[-1].memory_bank_)
    with pytest.raises(ValueError, match="every sample as anomalous"):
        small_model().fit(X[:2], [1, 1])
    with pytest.raises(ValueError, match="one label per image"):
        small_model().fit(X, y[:3])


def test_patch_rows_keep_their_images_through_pickling(fitted, synthetic):
    from skpatchcore import CoresetSampler

    features = fitted[0].transform(synthetic.train_images[:3])
    rows = CoresetSampler(sampling_ratio=0.5, random_state=0).fit_transform(features)
    again = pickle.loads(pickle.dumps(rows))
    np.testing.assert_array_equal(again, rows)
    np.testing.assert_array_equal(again.image_index, rows.image_index)
