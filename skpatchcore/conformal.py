"""Conformal p-values of anomaly scores (numpy only).

Kept apart from :mod:`skpatchcore.detector` so that the torch-free runtime
(:mod:`skpatchcore.onnx_runtime`) computes p-values with the same function;
``skpatchcore.detector.conformal_pvalues`` is the same object.
"""

from __future__ import annotations

import numpy as np

__all__ = ["conformal_pvalues"]


def conformal_pvalues(anomaly_scores, calibration_scores) -> np.ndarray:
    """Conformal p-values of anomaly scores against calibration scores.

    ``p(s) = (1 + #{c >= s}) / (n + 1)`` for each anomaly score ``s`` and
    the ``n`` calibration scores ``c`` (Vovk et al. 2005; Bates et al. 2023,
    "Testing for outliers with conformal p-values"). When the scored sample
    and the calibration samples are exchangeable, ``P(p <= alpha) <= alpha``.

    Parameters
    ----------
    anomaly_scores : array-like of shape (n_samples,)
        Higher means more anomalous (``-score_samples``).
    calibration_scores : array-like of shape (n_calibration,)
        Anomaly scores of normal samples not used to build the scorer
        (``PatchCoreDetector.calibration_scores_``).

    Returns
    -------
    pvalues : ndarray of shape (n_samples,)
        In ``[1 / (n + 1), 1]``.

    Examples
    --------
    >>> from skpatchcore.conformal import conformal_pvalues
    >>> conformal_pvalues([0.5, 2.0, 9.0], [1.0, 2.0, 3.0])
    array([1.  , 0.75, 0.25])
    """
    calibration = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    scores = np.asarray(anomaly_scores, dtype=np.float64)
    if calibration.size == 0:
        raise ValueError("conformal_pvalues needs at least one calibration score.")
    if np.isnan(calibration).any() or np.isnan(scores).any():
        raise ValueError("conformal_pvalues got NaN scores.")
    at_least = calibration.size - np.searchsorted(calibration, scores, side="left")
    return (1.0 + at_least) / (calibration.size + 1.0)
