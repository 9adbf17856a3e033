"""scikit-learn's own estimator checks: all of them on 2-D data, the data-free ones on images."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks
from sklearn.utils._testing import create_memmap_backed_data
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatchcore import CoresetSampler, PatchCoreDetector, PatchCorePipeline, make_patchcore

from _helpers import small_transformer

# CoresetSampler.fit_transform returns the selected rows (the memory bank the
# next pipeline step stores) while transform passes features through: by
# design the two differ, which these checks forbid. With sampling_ratio=1.0
# every row is selected and the sampler passes every check (second instance).
ROWS_DIFFER = "fit_transform returns the coreset rows (half of them here), transform passes X through"
SAMPLER_XFAIL = {
    "check_transformer_general": ROWS_DIFFER,
    "check_transformer_data_not_an_array": ROWS_DIFFER,
    "check_set_output_transform_pandas": ROWS_DIFFER + ": fewer rows than the input index",
    "check_global_output_transform_pandas": ROWS_DIFFER + ": fewer rows than the input index",
}

# PatchCoreDetector is a novelty detector (like LocalOutlierFactor with
# novelty=True): training rows are the memory bank, so scoring the training
# set gives each row distance 0 to itself and every row is predicted normal.
# offset_ is calibrated with rows left out instead, as PatchCore needs. The
# check's other assertions run in check_outliers_train_novelty below.
DETECTOR_XFAIL = {
    "check_outliers_train": "novelty detector: in-sample training rows match themselves (distance 0); "
                            "see test_outliers_train_except_in_sample_predictions",
}


# PatchCorePipeline on tabular steps: everything a Pipeline of these steps
# does is checked, except where the pipeline is for images by design.
NORMAL_ONLY = "fit(X, y) keeps the samples with y == 0 (normal) only; the check's labels leave none"
NOT_ROWS = "input that is neither an array nor a DataFrame is taken for a list of images"
IN_PLACE = "steps are fitted in place, as by sklearn.pipeline.Pipeline (which these checks skip)"
PIPELINE_XFAIL = {
    **DETECTOR_XFAIL,
    "check_estimators_overwrite_params": IN_PLACE,
    "check_dont_overwrite_parameters": IN_PLACE,
    "check_estimators_dtypes": NORMAL_ONLY,
    "check_dtype_object": NORMAL_ONLY,
    "check_fit2d_1sample": NORMAL_ONLY,
    "check_fit2d_1feature": NORMAL_ONLY,
    "check_complex_data": NOT_ROWS,
    "check_estimator_sparse_tag": NOT_ROWS,
    "check_estimator_sparse_array": NOT_ROWS,
    "check_estimator_sparse_matrix": NOT_ROWS,
    "check_classifier_data_not_an_array": NOT_ROWS,
}


def tabular_pipeline(sampling_ratio=0.5):
    return PatchCorePipeline([
        ("scale", StandardScaler()),
        ("coreset", CoresetSampler(sampling_ratio=sampling_ratio, random_state=0)),
        ("detector", PatchCoreDetector(random_state=0)),
    ])


def expected_failed_checks(estimator):
    if isinstance(estimator, CoresetSampler):
        return SAMPLER_XFAIL if estimator.sampling_ratio < 1 else {}
    if isinstance(estimator, PatchCorePipeline):
        return PIPELINE_XFAIL
    return DETECTOR_XFAIL


@parametrize_with_checks(
    [
        CoresetSampler(sampling_ratio=0.5, random_state=0),
        CoresetSampler(sampling_ratio=1.0, random_state=0),
        CoresetSampler(sampling_ratio=0.5, random_fraction=0.5, random_state=0),
        PatchCoreDetector(random_state=0),
        tabular_pipeline(),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def check_outliers_train_novelty(name, estimator_orig, readonly_memmap=True):
    """``sklearn.utils.estimator_checks.check_outliers_train`` for a novelty detector.

    The same steps and assertions, except the two about predictions on the
    training set itself, which cannot hold for a memory-bank detector: each
    training row is in the bank, at distance 0 from itself, so every
    training row is predicted normal (``np.unique(y_pred) == [-1, 1]`` fails)
    and no training row is an outlier whatever ``contamination`` says. Those
    two are replaced by what does hold: in-sample predictions are all +1,
    and ``contamination`` sets the share of the held-out calibration scores
    above the threshold.
    """
    n_samples = 300
    X, _ = make_blobs(n_samples=n_samples, random_state=0)
    X = np.random.RandomState(7).permutation(X)
    if readonly_memmap:
        X = create_memmap_backed_data(X)
    estimator = clone(estimator_orig)
    estimator_checks.set_random_state(estimator)
    estimator.fit(X)
    estimator.fit(X.tolist())

    y_pred = estimator.predict(X)
    assert y_pred.shape == (n_samples,)
    assert y_pred.dtype.kind == "i"
    assert_array_equal(np.unique(y_pred), [1])  # replaces unique == [-1, 1]: see the docstring
    # ...while rows away from the training data are flagged.
    assert_array_equal(estimator.predict(X[:5] + 100.0), -1)

    decision = estimator.decision_function(X)
    scores = estimator.score_samples(X)
    for output in [decision, scores]:
        assert output.dtype == np.dtype("float")
        assert output.shape == (n_samples,)
    with pytest.raises(ValueError):
        estimator.predict(X.T)
    dec_pred = (decision >= 0).astype(int)
    dec_pred[dec_pred == 0] = -1
    assert_array_equal(dec_pred, y_pred)
    with pytest.raises(ValueError):
        estimator.decision_function(X.T)
    detector = estimator[-1] if hasattr(estimator, "steps") else estimator
    np.testing.assert_allclose(scores - detector.offset_, decision)
    with pytest.raises(ValueError):
        estimator.score_samples(X.T)

    # contamination: replaces the share of outliers among the training rows.
    expected_outliers = 30
    prefix = "detector__" if detector is not estimator else ""
    estimator.set_params(**{prefix + "contamination": expected_outliers / n_samples})
    estimator.fit(X)
    n_calibration = detector.calibration_scores_.size
    above = np.sum(detector.calibration_scores_ > -detector.offset_)
    assert abs(above - expected_outliers * n_calibration / n_samples) <= 1


@pytest.mark.parametrize("estimator", [PatchCoreDetector(random_state=0), tabular_pipeline()],
                         ids=["detector", "pipeline"])
def test_outliers_train_except_in_sample_predictions(estimator):
    check_outliers_train_novelty(type(estimator).__name__, estimator)
    check_outliers_train_novelty(type(estimator).__name__, estimator, readonly_memmap=False)


# ------------------------------------------------------------------ images
# PatchFeatureTransformer and the image pipeline take images, not 2-D rows:
# their tags say so (two_d_array=False), and parametrize_with_checks then
# skips every check but cloning. The checks that need no data, or whose fit
# reads no data (the transformer's fit only builds the backbone), run here.
IMAGE_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
]
#: Checks that fit the transformer on 2-D rows, which its fit ignores.
FIT_IGNORES_X = [
    "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_positive_only_tag_during_fit",
]
#: The remaining API checks, and why they cannot apply to images.
NOT_APPLICABLE = {
    "check_fit_score_takes_y": "calls fit_transform on 2-D rows, which are not images",
    "check_estimators_unfitted": "only checks predict/decision_function, which a transformer does not have",
    "check_n_features_in_after_fitting": "image input has no n_features_in_ (returns early for image tags)",
}


def image_estimators():
    return [small_transformer(), make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None)]


@pytest.mark.parametrize("estimator", image_estimators(), ids=["transformer", "pipeline"])
@pytest.mark.parametrize("check_name", IMAGE_CHECKS + FIT_IGNORES_X)
def test_image_estimators_pass_the_checks_that_apply(estimator, check_name):
    if check_name in FIT_IGNORES_X and isinstance(estimator, PatchCorePipeline):
        pytest.skip("the pipeline's fit reads images")
    getattr(estimator_checks, check_name)(type(estimator).__name__, estimator)


def test_every_api_check_is_run_or_explained():
    for estimator in image_estimators():
        names = {getattr(check, "__name__", None) for check in estimator_checks._yield_api_checks(estimator)}
        covered = set(IMAGE_CHECKS) | set(FIT_IGNORES_X) | set(NOT_APPLICABLE)
        assert names <= covered, sorted(names - covered)
