"""scikit-learn's own estimator checks on 2-D data."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatchcore import CoresetSampler, PatchCoreDetector

# CoresetSampler.fit_transform returns the selected rows (the memory bank the
# next pipeline step stores) while transform passes features through: by
# design the two differ, which these checks forbid.
SAMPLER_XFAIL = {
    "check_transformer_general": "fit_transform returns the coreset rows, transform passes X through",
    "check_transformer_data_not_an_array": "fit_transform returns the coreset rows, transform passes X through",
}


# PatchCoreDetector is a novelty detector (like LocalOutlierFactor with
# novelty=True): training rows are the memory bank, so scoring the training
# set gives each row distance 0 to itself and every row is predicted normal.
# offset_ is calibrated with rows left out instead, as PatchCore needs.
DETECTOR_XFAIL = {
    "check_outliers_train": "novelty detector: in-sample training rows match themselves (distance 0)",
}


def expected_failed_checks(estimator):
    if isinstance(estimator, CoresetSampler):
        return SAMPLER_XFAIL
    return DETECTOR_XFAIL


@parametrize_with_checks(
    [CoresetSampler(sampling_ratio=0.5, random_state=0), PatchCoreDetector(random_state=0)],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
