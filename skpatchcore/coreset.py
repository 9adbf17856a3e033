"""Greedy k-center coreset subsampling of patch features (PatchCore, section 3.2)."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from ._persistence import VersionedStateMixin
from .backbones import resolve_device


class PatchRows(np.ndarray):
    """Feature rows that remember which image each row came from.

    A plain ``ndarray`` subclass. :meth:`CoresetSampler.fit_transform` returns
    it so that :class:`PatchCoreDetector` can calibrate its threshold by
    leaving whole images out; any numpy operation that makes a new array
    drops the extra attribute.

    Attributes
    ----------
    image_index : ndarray of int or None
        For every row, the index of its source image.
    """

    def __new__(cls, rows: np.ndarray, image_index: np.ndarray | None):
        obj = np.asarray(rows).view(cls)
        obj.image_index = image_index
        return obj

    def __array_finalize__(self, obj):
        self.image_index = None

    def __reduce__(self):
        # Keep image_index through pickling (joblib caches, Pipeline(memory=...)).
        constructor, arguments, state = super().__reduce__()
        return constructor, arguments, (state, self.image_index)

    def __setstate__(self, state):
        array_state, self.image_index = state
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


class CoresetSampler(VersionedStateMixin, TransformerMixin, BaseEstimator):
    """Greedy k-center coreset of patch features.

    Picks the subset of rows whose nearest-neighbour coverage of all rows is
    (approximately) best: the approximate greedy coreset of PatchCore
    (Roth et al. 2022, algorithm 1) as in the official code. Rows are
    randomly projected to ``projection_dim`` dimensions; every row's distance
    to the coreset starts as its mean distance to ``n_starting_points`` random
    rows; then ``int(n_rows * sampling_ratio)`` times the row farthest from
    the coreset is added.

    In a pipeline the sampler is asymmetric on purpose: ``fit_transform``
    returns the selected rows (the memory bank that the next step stores),
    while ``transform`` returns its input unchanged so that new images reach
    the detector with all their patches.

    Parameters
    ----------
    sampling_ratio : float in (0, 1], default=0.1
        Fraction of rows kept (at least one). ``1.0`` keeps every row.
    method : {"greedy", "random"}, default="greedy"
        ``"random"`` draws rows uniformly (a baseline).
    projection_dim : int or None, default=128
        Dimension of the random projection used for the distances;
        ``None``, or a value >= the feature size, uses the features as
        they are (exact greedy coreset).
    n_starting_points : int, default=10
        Random rows whose mean distance initialises the coverage distances.
    device : str, default="auto"
        ``"auto"`` runs the greedy loop on CUDA when available; on the CPU a
        compiled kernel that gives the same picks as the naive loop is used.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the starting points (no global seeding).
    progress : bool, default=False
        Show a progress bar of the greedy picks (CPU kernel).

    Attributes
    ----------
    coreset_indices_ : ndarray of shape (n_selected,)
        Indices of the selected rows among the pooled input rows
        (``n_images * h * w`` rows for 4-D input).
    coverage_radius_ : float
        Largest distance (in the projected space) from any input row to its
        nearest selected row after the last pick. ``nan`` for ``"random"``.
    n_features_in_ : int
        Feature size of a row.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import CoresetSampler
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> bank = CoresetSampler(sampling_ratio=0.05, random_state=0).fit_transform(X)
    >>> bank.shape
    (50, 16)
    """

    def __init__(
        self,
        sampling_ratio=0.1,
        method="greedy",
        projection_dim=128,
        n_starting_points=10,
        device="auto",
        random_state=None,
        progress=False,
    ):
        self.sampling_ratio = sampling_ratio
        self.method = method
        self.projection_dim = projection_dim
        self.n_starting_points = n_starting_points
        self.device = device
        self.random_state = random_state
        self.progress = progress

    def _validate_params(self) -> None:
        ratio = self.sampling_ratio
        if not isinstance(ratio, numbers.Real) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"sampling_ratio must be in (0, 1], got {ratio!r}.")
        if self.method not in ("greedy", "random"):
            raise ValueError(f"method must be 'greedy' or 'random', got {self.method!r}.")
        if self.projection_dim is not None and (
            not isinstance(self.projection_dim, numbers.Integral) or self.projection_dim < 1
        ):
            raise ValueError(f"projection_dim must be a positive int or None, got {self.projection_dim!r}.")
        if not isinstance(self.n_starting_points, numbers.Integral) or self.n_starting_points < 1:
            raise ValueError(f"n_starting_points must be a positive int, got {self.n_starting_points!r}.")

    def fit(self, X, y=None):
        """Select the coreset rows.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)
            Patch features; 4-D input is pooled over images and positions.
        y : ignored

        Returns
        -------
        self : CoresetSampler
        """
        self._validate_params()
        rows, _ = validate_features(self, X, reset=True)
        self._select(rows)
        return self

    def _select(self, rows: np.ndarray) -> None:
        rng = check_random_state(self.random_state)
        n_rows = rows.shape[0]
        n_selected = max(1, int(n_rows * self.sampling_ratio))
        if self.method == "random" or n_selected >= n_rows:
            if n_selected >= n_rows:
                self.coreset_indices_ = np.arange(n_rows)
                self.coverage_radius_ = 0.0
            else:
                self.coreset_indices_ = np.sort(rng.choice(n_rows, n_selected, replace=False))
                self.coverage_radius_ = float("nan")
            return
        starts = rng.choice(n_rows, min(self.n_starting_points, n_rows), replace=False)
        projected = self._project(rows, rng)
        device = resolve_device(self.device)
        # Imported here: numba is only needed to fit, not to load and score.
        from ._greedy import greedy_numba, greedy_torch

        if device.type == "cuda":
            picks, radius = greedy_torch(projected, starts, n_selected, device)
        else:
            with tqdm(total=n_selected, desc="Coreset", unit="pick", disable=not self.progress) as bar:
                picks, radius, _ = greedy_numba(projected, starts.astype(np.int64), n_selected, bar)
        self.coreset_indices_ = picks
        self.coverage_radius_ = float(radius)

    def _project(self, rows: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """Random linear projection, initialised like ``torch.nn.Linear``."""
        n_dims = rows.shape[1]
        if self.projection_dim is None or self.projection_dim >= n_dims:
            return np.ascontiguousarray(rows, dtype=np.float32)
        bound = 1.0 / np.sqrt(n_dims)
        matrix = rng.uniform(-bound, bound, size=(n_dims, self.projection_dim)).astype(np.float32)
        import torch

        with torch.inference_mode():
            return (torch.from_numpy(np.asarray(rows, dtype=np.float32)) @ torch.from_numpy(matrix)).numpy()

    def fit_transform(self, X, y=None, **fit_params):
        """Select the coreset and return the selected rows (the memory bank).

        Returns
        -------
        rows : PatchRows of shape (n_selected, n_features)
            The selected rows; for 4-D input ``rows.image_index`` tells each
            row's source image.
        """
        self._validate_params()
        rows, image_index = validate_features(self, X, reset=True)
        self._select(rows)
        selected = rows[self.coreset_indices_]
        source = None if image_index is None else image_index[self.coreset_indices_]
        return PatchRows(selected, source)

    def transform(self, X):
        """Return ``X`` unchanged (after validation): new images keep all patches.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)

        Returns
        -------
        X : ndarray
            The input features.
        """
        check_is_fitted(self, "coreset_indices_")
        rows, _ = validate_features(self, X, reset=False)
        if isinstance(X, np.ndarray) and X.ndim == 4:
            return X
        return rows

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
