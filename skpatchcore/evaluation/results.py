"""Everything a model says about a set of samples, as one pandas DataFrame.

pandas is imported only inside :func:`results_frame`: the rest of the
package works without it.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ..detector import PatchCoreDetector
from ..io.images import as_image_list
from ..pipeline import image_features_step

__all__ = ["results_frame"]

#: The columns of :func:`results_frame`, in order.
COLUMNS = ("path", "score", "decision", "prediction", "p_value")


def _require_pandas():
    try:
        import pandas
    except ImportError as error:
        raise ImportError(
            "results_frame needs pandas, which is not installed: pip install pandas."
        ) from error
    return pandas


def final_detector(model) -> PatchCoreDetector:
    """The fitted :class:`PatchCoreDetector` that scores for `model` (itself or a pipeline's last step)."""
    detector = model.steps[-1][1] if isinstance(model, Pipeline) else model
    if not isinstance(detector, PatchCoreDetector):
        raise TypeError(
            "Expected a PatchCoreDetector or a pipeline ending with one (make_patchcore); "
            f"got {type(model).__name__}."
        )
    check_is_fitted(detector, "offset_")
    return detector


def results_frame(model, X):
    """Score samples once and gather every per-sample output in a DataFrame.

    One row per sample, in the order of ``X``, from a single scoring pass
    (one backbone pass for images):

    ========== ===============================================================
    path       the image's file path (str) when given as a path, else missing
    score      ``score_samples``: higher means more normal
    decision   ``decision_function`` (``score - offset_``): negative for
               predicted anomalies
    prediction ``predict``: +1 normal, -1 anomalous
    p_value    conformal p-value (:meth:`PatchCoreDetector.pvalues`): small
               means unlikely to be normal
    ========== ===============================================================

    Sort by ``p_value`` (or ``score``) to review the most anomalous samples
    first, or write the frame with ``to_csv``.

    Parameters
    ----------
    model : PatchCorePipeline, Pipeline or PatchCoreDetector
        A fitted model whose last step is a :class:`PatchCoreDetector`.
    X : images, or what the model scores
        Image paths or arrays for an image pipeline; rows (an array or a
        DataFrame, whose index the result keeps) for a tabular model.

    Returns
    -------
    results : pandas.DataFrame of shape (n_samples, 5)
        Columns ``path``, ``score``, ``decision``, ``prediction``, ``p_value``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector, results_frame
    >>> rng = np.random.default_rng(0)
    >>> detector = PatchCoreDetector().fit(rng.normal(size=(200, 4)))
    >>> results_frame(detector, [[0, 0, 0, 0], [9, 9, 9, 9]])["prediction"].tolist()
    [1, -1]
    """
    pd = _require_pandas()
    detector = final_detector(model)
    index = X.index if isinstance(X, pd.DataFrame) else None
    if image_features_step(model) is not None:
        X = as_image_list(X)  # a generator is read once
        paths = [os.fspath(item) if isinstance(item, (str, os.PathLike)) else None for item in X]
    else:
        paths = None
    scores = np.asarray(model.score_samples(X), dtype=np.float64)
    decision = scores - detector.offset_
    if paths is None:
        paths = [None] * len(scores)
    return pd.DataFrame(
        {
            "path": np.array(paths, dtype=object),
            "score": scores,
            "decision": decision,
            "prediction": np.where(decision < 0, -1, 1),
            "p_value": detector.pvalues_from_scores(scores),
        },
        index=index,
    )
