"""Conformal p-values and the results DataFrame."""

import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from skpatchcore import PatchCoreDetector, make_patchcore, results_frame
from skpatchcore.detector import conformal_pvalues


@pytest.fixture(scope="module")
def fitted(synthetic):
    return make_patchcore(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.25,
                          random_state=0).fit(synthetic.train_images)


# ------------------------------------------------------------------ p-values
def test_conformal_pvalues_by_hand():
    calibration = [1.0, 2.0, 2.0, 3.0]
    # s = 0.5: all 4 >= s -> 5/5; s = 2: three (2, 2, 3) -> 4/5; s = 2.5: one -> 2/5; s = 7: none -> 1/5.
    np.testing.assert_allclose(conformal_pvalues([0.5, 2.0, 2.5, 7.0], calibration), [1.0, 0.8, 0.4, 0.2])
    with pytest.raises(ValueError, match="at least one calibration score"):
        conformal_pvalues([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        conformal_pvalues([np.nan], calibration)


def test_detector_pvalues_follow_the_formula(rng):
    detector = PatchCoreDetector().fit(rng.normal(size=(200, 3)))
    X = rng.normal(size=(50, 3)) * np.linspace(0.1, 4.0, 50)[:, None]
    X[-1] = 50.0  # far from every training row
    pvalues = detector.pvalues(X)
    anomaly = -detector.score_samples(X)
    calibration = detector.calibration_scores_
    expected = [(1 + np.sum(calibration >= s)) / (calibration.size + 1) for s in anomaly]
    np.testing.assert_allclose(pvalues, expected)
    assert np.all((pvalues > 0) & (pvalues <= 1))
    assert pvalues.min() >= 1 / (calibration.size + 1)
    order = np.argsort(anomaly)
    assert np.all(np.diff(pvalues[order]) <= 0)  # non-increasing in the anomaly score
    assert pvalues[np.argmax(anomaly)] == pytest.approx(1 / (calibration.size + 1))


def test_pvalues_of_new_normal_samples_are_roughly_uniform():
    rng = np.random.default_rng(1)
    detector = PatchCoreDetector(random_state=0).fit(rng.normal(size=(1000, 2)))
    pvalues = detector.pvalues(rng.normal(size=(4000, 2)))
    for alpha in (0.05, 0.1, 0.25, 0.5):
        assert abs(np.mean(pvalues <= alpha) - alpha) < 0.03, alpha
    assert stats.kstest(pvalues, "uniform").statistic < 0.04
    # ...and far from uniform on anomalies.
    assert np.mean(detector.pvalues(rng.normal(size=(200, 2)) + 6.0) <= 0.01) > 0.95


def test_pipeline_pvalues_rank_defects_first(fitted, synthetic):
    pvalues = fitted.pvalues(synthetic.test_images)
    np.testing.assert_allclose(pvalues, fitted[-1].pvalues_from_scores(fitted.score_samples(synthetic.test_images)))
    assert np.median(pvalues[synthetic.test_labels == 1]) < np.median(pvalues[synthetic.test_labels == 0])
    assert np.all((pvalues > 0) & (pvalues <= 1))


# ------------------------------------------------------------- results frame
def test_results_frame_matches_the_individual_methods(fitted, synthetic, tmp_path):
    images = synthetic.test_images[:6]
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(str(tmp_path / f"part{i}.png"))
        Image.fromarray(image).save(paths[-1])
    mixed = [*paths, *images[3:]]
    frame = results_frame(fitted, mixed)
    assert list(frame.columns) == ["path", "score", "decision", "prediction", "p_value"]
    assert len(frame) == len(images)
    assert frame["path"][:3].tolist() == paths and frame["path"][3:].isna().all()
    np.testing.assert_allclose(frame["score"], fitted.score_samples(mixed))
    np.testing.assert_allclose(frame["decision"], fitted.decision_function(mixed))
    np.testing.assert_array_equal(frame["prediction"], fitted.predict(mixed))
    np.testing.assert_allclose(frame["p_value"], fitted.pvalues(mixed))


def test_results_frame_of_a_tabular_detector_keeps_the_index(rng):
    import pandas as pd

    detector = PatchCoreDetector().fit(rng.normal(size=(100, 2)))
    X = pd.DataFrame(rng.normal(size=(5, 2)), index=list("abcde"))
    frame = results_frame(detector, X.to_numpy())
    assert frame["path"].isna().all() and len(frame) == 5
    np.testing.assert_array_equal(frame["prediction"], detector.predict(X.to_numpy()))
    assert list(results_frame(detector, X).index) == list("abcde")


def test_results_frame_errors(rng, monkeypatch):
    from sklearn.exceptions import NotFittedError
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(TypeError, match="PatchCoreDetector"):
        results_frame(StandardScaler().fit(rng.normal(size=(5, 2))), rng.normal(size=(5, 2)))
    with pytest.raises(NotFittedError):
        results_frame(PatchCoreDetector(), rng.normal(size=(5, 2)))
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="results_frame needs pandas"):
        results_frame(PatchCoreDetector().fit(rng.normal(size=(20, 2))), rng.normal(size=(5, 2)))
