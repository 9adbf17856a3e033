"""Patch-feature input of the coreset and detector steps: validation and pooled rows."""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import validate_data


class PatchRows(np.ndarray):
    """Feature rows that remember which image (and which input row) each came from.

    A plain ``ndarray`` subclass. :meth:`CoresetSampler.fit_transform` returns
    it so that :class:`PatchCoreDetector` can calibrate its threshold by
    leaving whole images out; any numpy operation that makes a new array
    drops the extra attributes.

    Attributes
    ----------
    image_index : ndarray of int or None
        For every row, the index of its source image.
    row_index : ndarray of int or None
        For every row, its index among all pooled input rows
        (``image * h * w + position`` for image features).
    """

    def __new__(cls, rows: np.ndarray, image_index: np.ndarray | None, row_index: np.ndarray | None = None):
        obj = np.asarray(rows).view(cls)
        obj.image_index = image_index
        obj.row_index = row_index
        return obj

    def __array_finalize__(self, obj):
        self.image_index = None
        self.row_index = None

    def __reduce__(self):
        # Keep the indices through pickling (joblib caches, Pipeline(memory=...), Dask).
        constructor, arguments, state = super().__reduce__()
        return constructor, arguments, (state, self.image_index, self.row_index)

    def __setstate__(self, state):
        array_state, self.image_index, self.row_index = state
        super().__setstate__(array_state)


def pool_patches(X) -> tuple[np.ndarray, np.ndarray | None]:
    """Flatten ``(n, h, w, D)`` features to ``(n * h * w, D)`` rows (a view when possible).

    Returns
    -------
    rows : ndarray of shape (n_rows, D)
    image_index : ndarray of shape (n_rows,) or None
        Source image of each row for 4-D input, ``None`` for 2-D input.
    """
    X = np.asarray(X)
    if X.ndim == 4:
        n_images, height, width, n_dims = X.shape
        rows = X.reshape(-1, n_dims)
        return rows, np.repeat(np.arange(n_images), height * width)
    return X, None


def validate_features(estimator, X, reset: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate 2-D rows or 4-D patch features and return pooled rows.

    Features keep float32/float64; anything else becomes float64. NaN,
    infinity, empty input and a changed feature size raise ``ValueError``.
    """
    X_array = X if isinstance(X, np.ndarray) else None
    if X_array is not None and X_array.ndim == 4:
        if min(X_array.shape) == 0:
            raise ValueError(f"Found empty patch features of shape {X_array.shape}.")
        rows, image_index = pool_patches(X_array)
    elif X_array is not None and X_array.ndim not in (1, 2):
        raise ValueError(
            f"Expected 2-D rows (n_samples, n_features) or 4-D patch features "
            f"(n_images, h, w, n_features); got an array of shape {X_array.shape}. "
            "Reshape your data."
        )
    else:
        rows, image_index = X, None
    rows = validate_data(
        estimator, rows, reset=reset, dtype=[np.float32, np.float64], order="C"
    )
    return rows, image_index
