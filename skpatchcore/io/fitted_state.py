"""Checks of a fitted estimator's state as it comes out of a model file.

A file that passes its checksum can still hold arrays of the wrong type or
shape, or NaN values: the checksum protects against damage, not against
someone who rewrites the file (see ``docs/security.rst``). Scoring such a
model would fail deep inside torch, or return NaN silently.
:func:`check_fitted_state` compares every fitted attribute that scoring uses
with what ``fit`` produces (dtype, number of dimensions, sizes that must
agree, finite values) and names the first one that differs.
"""

from __future__ import annotations

import math
from itertools import pairwise
from numbers import Integral, Real

import numpy as np

__all__ = ["check_fitted_state"]


class _Check:
    """Collects the checks of one estimator, under a name for messages."""

    def __init__(self, estimator, where: str):
        self.estimator = estimator
        self.where = where

    def fail(self, attribute: str, problem: str):
        raise ValueError(f"{self.where}.{attribute} {problem}")

    def array(self, attribute: str, kinds: str, dtype=None, ndim: int = 1, finite: bool = False,
              required: bool = True) -> np.ndarray | None:
        value = getattr(self.estimator, attribute, None)
        if value is None:
            if required:
                self.fail(attribute, "is missing")
            return None
        if not isinstance(value, np.ndarray):
            self.fail(attribute, f"is a {type(value).__name__}, not an array")
        if value.dtype.kind not in kinds or (dtype is not None and value.dtype != np.dtype(dtype)):
            kind_names = {"i": "integer", "iu": "integer", "f": "float"}
            expected = np.dtype(dtype).name if dtype is not None else kind_names.get(kinds, kinds)
            self.fail(attribute, f"has dtype {value.dtype.name}; fit stores {expected}")
        if value.ndim != ndim:
            self.fail(attribute, f"has shape {value.shape}; fit stores a {ndim}-D array")
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            self.fail(attribute, f"holds {int((~np.isfinite(value)).sum())} NaN or infinite value(s)")
        return value

    def number(self, attribute: str, integer: bool = False, positive: bool = False, finite: bool = True,
               required: bool = True):
        value = getattr(self.estimator, attribute, None)
        if value is None:
            if required:
                self.fail(attribute, "is missing")
            return None
        kind = Integral if integer else Real
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(attribute, f"is {value!r:.60}, not {'an integer' if integer else 'a number'}")
        if finite and not math.isfinite(value):
            self.fail(attribute, f"is {value!r}, not a finite number")
        if positive and not value > 0:
            self.fail(attribute, f"is {value!r}, not positive")
        return value

    def sizes(self, attribute: str, length: int) -> tuple | None:
        value = getattr(self.estimator, attribute, None)
        if not isinstance(value, tuple) or len(value) != length or not all(
                isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in value):
            self.fail(attribute, f"is {value!r:.60}, not a tuple of {length} positive integers")
        return value


def _check_transformer(check: _Check) -> None:
    estimator = check.estimator
    for attribute in ("mean_", "std_"):
        value = getattr(estimator, attribute, None)
        if not isinstance(value, tuple) or not value or not all(
                isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            check.fail(attribute, f"is {value!r:.60}, not a tuple of finite numbers")
    if not all(v > 0 for v in estimator.std_):
        check.fail("std_", f"is {estimator.std_!r}; standard deviations must be positive")
    check.sizes("input_size_", 2)
    check.sizes("feature_shape_", 3)


def _check_sampler(check: _Check) -> None:
    n_rows = check.number("n_rows_seen_", integer=True, positive=True)
    indices = check.array("coreset_indices_", "iu")
    if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        check.fail("coreset_indices_", f"holds indices outside [0, n_rows_seen_={n_rows})")
    radii = check.array("coreset_radii_", "f", required=False)
    if radii is not None and radii.shape != indices.shape:
        check.fail("coreset_radii_", f"has shape {radii.shape}; coreset_indices_ has {indices.shape}")
    check.number("n_features_in_", integer=True, positive=True)


def _check_detector(check: _Check) -> None:
    bank = check.array("memory_bank_", "f", dtype=np.float32, ndim=2, finite=True)
    n_features = check.number("n_features_in_", integer=True, positive=True)
    if bank.shape[1] != n_features:
        check.fail("memory_bank_", f"has {bank.shape[1]} features per row; n_features_in_ is {n_features}")
    n_neighbors = getattr(check.estimator, "n_neighbors", 1)
    if isinstance(n_neighbors, Integral) and bank.shape[0] < n_neighbors + 1:
        check.fail("memory_bank_", f"has {bank.shape[0]} rows; n_neighbors + 1 = {n_neighbors + 1} are needed")
    image_index = check.array("bank_image_index_", "iu", required=False)
    if image_index is not None and image_index.shape != bank.shape[:1]:
        check.fail("bank_image_index_", f"has shape {image_index.shape}; the memory bank has {bank.shape[0]} rows")
    check.array("calibration_scores_", "f", finite=True)
    check.number("offset_")


def check_fitted_state(estimator, where: str = "model") -> None:
    """Check the fitted attributes of a loaded skpatchcore estimator.

    Parameters
    ----------
    estimator : PatchCorePipeline, PatchFeatureTransformer, CoresetSampler or PatchCoreDetector
        Fitted (or, for a pipeline, with fitted steps); an unfitted one is
        not checked.
    where : str, default="model"
        Name of `estimator` in messages (``"model.detector"``...).

    Raises
    ------
    ValueError
        Naming the first attribute whose type, dtype, number of dimensions
        or size differs from what ``fit`` stores, that holds NaN or infinite
        values where ``fit`` never does, or whose size disagrees with the
        next step of a pipeline.
    """
    from ..coreset import CoresetSampler
    from ..detector import PatchCoreDetector
    from ..features import PatchFeatureTransformer
    from ..pipeline import PatchCorePipeline

    if isinstance(estimator, PatchCorePipeline):
        steps = [(name, step) for name, step in estimator.steps if step not in (None, "passthrough")]
        for name, step in steps:
            check_fitted_state(step, f"{where}.{name}")
        widths = [(name, _output_width(step)) for name, step in steps]
        widths = [(name, width) for name, width in widths if width is not None]
        for (first, width), (second, expected) in pairwise(widths):
            if width != expected:
                raise ValueError(
                    f"{where}.{first} gives {width} features per patch but {where}.{second} expects {expected}"
                )
        return
    checks = {PatchFeatureTransformer: _check_transformer, CoresetSampler: _check_sampler,
              PatchCoreDetector: _check_detector}
    marker = {PatchFeatureTransformer: "feature_shape_", CoresetSampler: "coreset_indices_",
              PatchCoreDetector: "memory_bank_"}
    for cls, check in checks.items():
        if isinstance(estimator, cls) and hasattr(estimator, marker[cls]):
            check(_Check(estimator, where))


def _output_width(step) -> int | None:
    """Features per patch that `step` gives (transformer) or takes (sampler, detector)."""
    shape = getattr(step, "feature_shape_", None)
    if isinstance(shape, tuple) and shape:
        return shape[-1]
    return getattr(step, "n_features_in_", None)
