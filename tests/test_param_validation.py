"""Every parameter of every public estimator is checked at fit with scikit-learn's InvalidParameterError."""

import functools
import inspect
from numbers import Integral

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils._param_validation import InvalidParameterError, make_constraint

import skpatchcore
from skpatchcore import (
    CoresetSampler,
    NormalOnlyKFold,
    PatchCoreDetector,
    PatchCorePipeline,
    PatchFeatureTransformer,
    synthetic_defect_scorer,
)
from skpatchcore._param_constraints import NumberInterval

from _helpers import small_model, small_transformer

ROWS = np.random.default_rng(0).normal(size=(40, 5))
IMAGES = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)


class BadType:
    """No parameter accepts this."""

    def __repr__(self):
        return "BadType()"


def public_parameterised_classes():
    """Every public estimator and splitter of the package."""
    return {obj for name in skpatchcore.__all__ if inspect.isclass(obj := getattr(skpatchcore, name))
            and issubclass(obj, (BaseEstimator, BaseCrossValidator))}


def parameter_names(cls):
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def with_parameter(make, name, value):
    """A new valid instance with one parameter changed (as set_params does, for splitters too)."""
    estimator = make()
    setattr(estimator, name, value)
    return estimator


#: One valid, fast instance of each public estimator / splitter, and the data its fit methods take.
CASES = {
    PatchFeatureTransformer: (small_transformer, None),
    CoresetSampler: (lambda: CoresetSampler(random_state=0), ROWS),
    PatchCoreDetector: (lambda: PatchCoreDetector(random_state=0), ROWS),
    PatchCorePipeline: (lambda: small_model(resize=64), IMAGES),
    NormalOnlyKFold: (lambda: NormalOnlyKFold(2), ROWS),
}


def fit_methods(estimator, X):
    """Calls of every method of `estimator` that validates its parameters."""
    if isinstance(estimator, NormalOnlyKFold):
        return {"split": lambda: list(estimator.split(X)), "get_n_splits": estimator.get_n_splits}
    names = [name for name in ("fit", "partial_fit", "fit_transform") if hasattr(estimator, name)]
    return {name: functools.partial(getattr(estimator, name), X) for name in names}


def test_every_public_estimator_is_walked():
    assert public_parameterised_classes() == set(CASES)


@pytest.mark.parametrize("cls", list(CASES), ids=lambda cls: cls.__name__)
def test_constraints_name_every_parameter(cls):
    assert set(cls._parameter_constraints) == set(parameter_names(cls))


def _cases_by_parameter():
    for cls in CASES:
        for name in parameter_names(cls):
            yield pytest.param(cls, name, id=f"{cls.__name__}-{name}")


@pytest.mark.parametrize("cls, parameter", list(_cases_by_parameter()))
def test_a_wrong_type_is_an_invalid_parameter_error(cls, parameter):
    make, X = CASES[cls]
    estimator = with_parameter(make, parameter, BadType())
    for call in fit_methods(estimator, X).values():
        with pytest.raises(InvalidParameterError, match=rf"The '{parameter}' parameter of {cls.__name__} must be "
                                                        r".* Got BadType\(\) instead"):
            call()


def _numeric_parameters(kind=None):
    """The parameters with a numeric constraint (of `kind`, Integral or Real; any when None)."""
    for case in _cases_by_parameter():
        cls, parameter = case.values
        constraints = [make_constraint(c) for c in cls._parameter_constraints[parameter]]
        if any(isinstance(c, NumberInterval) and kind in (None, c.type) for c in constraints):
            yield case


@pytest.mark.parametrize("cls, parameter", list(_numeric_parameters()))
def test_a_bool_is_not_a_number(cls, parameter):
    make, X = CASES[cls]
    for value in (True, False):
        estimator = with_parameter(make, parameter, value)
        for call in fit_methods(estimator, X).values():
            with pytest.raises(InvalidParameterError, match=rf"'{parameter}' parameter .*\(not a bool\).* Got {value}"):
                call()


def test_numeric_constraints_are_never_bare_sklearn_intervals():
    """scikit-learn's Interval(Integral) takes True for 1: every numeric parameter uses NumberInterval."""
    from sklearn.utils._param_validation import Interval

    for cls in CASES:
        for parameter, constraints in cls._parameter_constraints.items():
            for constraint in constraints:
                if isinstance(constraint, Interval):
                    assert isinstance(constraint, NumberInterval), (cls.__name__, parameter)


@pytest.mark.parametrize("cls", [PatchFeatureTransformer, CoresetSampler, PatchCoreDetector],
                         ids=lambda cls: cls.__name__)
def test_an_unknown_device_names_itself(cls):
    make, X = CASES[cls]
    estimator = make().set_params(device="banana")
    with pytest.raises(InvalidParameterError, match=r"'device' parameter .* device string that torch knows.* "
                                                    r"Got 'banana' instead"):
        estimator.fit(X)


def test_device_strings_that_torch_knows_are_valid_parameters():
    import torch

    for device in ("auto", "cpu", torch.device("cpu")):
        CoresetSampler(device=device, random_state=0).fit(ROWS)
    # A device this machine may lack is a valid parameter; it fails where it is used, naming the problem.
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PatchCoreDetector(device="cuda:1").fit(ROWS).kneighbors(ROWS[:2])


@pytest.mark.parametrize("n_jobs", [0, 1.5, "2"])
def test_n_jobs_and_progress_are_checked_at_fit(n_jobs):
    with pytest.raises(InvalidParameterError, match="'n_jobs' parameter of PatchFeatureTransformer"):
        small_transformer(n_jobs=n_jobs).fit()
    with pytest.raises(InvalidParameterError, match="'progress' parameter of CoresetSampler"):
        CoresetSampler(progress="yes").fit(ROWS)


def test_nested_steps_are_validated_by_the_pipeline_fit():
    model = small_model(resize=64).set_params(coreset__sampling_ratio=True)
    with pytest.raises(InvalidParameterError, match="'sampling_ratio' parameter of CoresetSampler"):
        model.fit(IMAGES)
    model = small_model(resize=64).set_params(detector__n_neighbors=True)
    with pytest.raises(InvalidParameterError, match="'n_neighbors' parameter of PatchCoreDetector"):
        model.fit(IMAGES)


def test_cross_parameter_checks_keep_their_messages():
    with pytest.raises(ValueError, match="layers must be a non-empty tuple of layer names"):
        small_transformer(layers=()).fit()
    with pytest.raises(ValueError, match="scales must be a tuple of positive numbers whose first is 1.0"):
        small_transformer(scales=(0.5,)).fit()
    with pytest.raises(ValueError, match=r"memory bank needs at least n_neighbors \+ 1 = 6 rows"):
        PatchCoreDetector(n_neighbors=5).fit(ROWS[:4])


def test_partial_fit_is_there_for_image_pipelines_only():
    from sklearn.preprocessing import StandardScaler

    assert hasattr(small_model(), "partial_fit")
    tabular = PatchCorePipeline([("scale", StandardScaler()), ("detector", PatchCoreDetector())])
    assert not hasattr(tabular, "partial_fit")
    assert not hasattr(clone(tabular), "partial_fit")


@pytest.mark.parametrize("parameter", ["metric", "kinds", "defect_fraction", "random_state"])
def test_synthetic_defect_scorer_checks_its_parameters(parameter):
    with pytest.raises(InvalidParameterError, match=rf"The '{parameter}' parameter of synthetic_defect_scorer"):
        synthetic_defect_scorer(**{parameter: BadType()})
    if parameter in ("defect_fraction", "random_state"):
        with pytest.raises(InvalidParameterError, match=r"\(not a bool\)"):
            synthetic_defect_scorer(**{parameter: True})


@pytest.mark.parametrize("cls, parameter", list(_numeric_parameters(Integral)))
def test_an_integer_parameter_refuses_a_float(cls, parameter):
    make, X = CASES[cls]
    for call in fit_methods(with_parameter(make, parameter, 2.5), X).values():
        with pytest.raises(InvalidParameterError, match=rf"'{parameter}' parameter .* Got 2.5 instead"):
            call()
