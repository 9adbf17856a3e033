"""Greedy k-center coreset subsampling of patch features (PatchCore, section 3.2)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
import warnings
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted
from tqdm.auto import tqdm

from ._device import resolve_device
from ._doc_link import DocLinkMixin
from ._persistence import VersionedStateMixin
from ._validation import PatchRows, pool_patches, validate_features


#: ``chunk_sampling_ratio=None``: the chunk coresets together keep this many times
#: ``sampling_ratio`` of all rows...
CHUNK_OVERSAMPLING = 4
#: ...but no more than this fraction...
OVERSAMPLED_RATIO_LIMIT = 0.04
#: ...or this many times ``sampling_ratio`` if that is larger: room for the merge
#: to drop the rows that several chunks repeat.
MIN_OVERSAMPLING = 1.5
#: A chunk's greedy order runs to this many times ``chunk_sampling_ratio`` of its
#: rows, so that chunks with more varied patches can give more rows to the union.
ALLOCATION_HEADROOM = 1.5


class ChunkCoreset(NamedTuple):
    """The greedy coreset of one chunk of images, ready to be merged.

    Attributes
    ----------
    rows : ndarray of shape (n_selected, n_features), float32
        Selected feature rows.
    image_index : ndarray of shape (n_selected,)
        Source image of every row (global numbering).
    row_index : ndarray of shape (n_selected,)
        Index of every row among all pooled input rows (global numbering).
    n_rows : int
        Rows the chunk had before selection.
    n_images : int
        Images the chunk had.
    radius : float
        Largest distance (projected space) from a row of the chunk to the
        nearest selected row.
    radii : ndarray of shape (n_selected,) or None, default=None
        For every row, in greedy order, its distance to the rows picked
        before it when it was picked (non-increasing). None for rows that
        are kept whole (random picks, an existing memory bank without
        radii).
    projected : ndarray of shape (n_selected, n_projected) or None, default=None
        The rows in the sampler's projected space (what the merge reads,
        so that the full rows can stay on disk); None: projected when
        needed.
    """

    rows: np.ndarray
    image_index: np.ndarray
    row_index: np.ndarray
    n_rows: int
    n_images: int
    radius: float
    radii: np.ndarray | None = None
    projected: np.ndarray | None = None


def _fitted_on_rows(sampler) -> bool:
    """Whether the sampler is unfitted or was fitted on 2-D rows (not on image features)."""
    return getattr(sampler, "n_images_seen_", None) is None


class CoresetSampler(DocLinkMixin, VersionedStateMixin, TransformerMixin, BaseEstimator):
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

    Features that do not fit in memory at once are reduced chunk by chunk
    (composable coresets, see :meth:`chunk_coreset`, :meth:`allocate` and
    :meth:`merge`): each chunk orders its rows by the same greedy selection;
    the union keeps ``chunk_sampling_ratio`` of all rows, taking from every
    chunk the rows it picked at the largest distances (one distance
    threshold for all chunks, so varied chunks give more rows); the merge
    keeps ``int(n_rows * sampling_ratio)`` rows of all the rows seen, those
    of largest radius once rows repeated across chunks are discounted
    (``merge_method="radius"``), or by one more greedy pass (``merge_method="greedy"``).
    :class:`~skpatchcore.PatchCorePipeline` does this when the features
    exceed its ``working_memory``, in ``partial_fit`` and on Dask.

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
    chunk_sampling_ratio : float in (0, 1] or None, default=None
        Fraction of all rows that the union of the chunk coresets keeps
        before the merge keeps ``sampling_ratio`` of them. None:
        ``4 * sampling_ratio``, but at most 0.04 or ``1.5 * sampling_ratio``
        if that is larger (0.04 for 1%, 0.15 for 10%). A union only as
        large as the final ratio spends picks on every chunk's own common
        patterns and covers rare normal patterns worse (lower AUROC, see
        docs/archive/benchmarks-notebook.md); a larger one lets the merge choose, at a cost
        that grows with its size. Each chunk's greedy order runs to 1.5
        times this fraction of its rows.
    merge_method : {"radius", "greedy"}, default="radius"
        How :meth:`merge` chooses the bank among the union of chunk
        coresets (a fit within the budget is one greedy pass and never
        merges). ``"radius"`` keeps the rows of largest effective radius:
        a row's radius in its chunk's greedy order, lowered to its distance
        to the nearest union row of larger radius, so that a pattern that
        several chunks picked counts once, as in one greedy pass over all
        rows. ``"greedy"`` runs one more greedy pass over the union (the
        composable-coreset construction, with its approximation guarantee;
        slower on large unions). Both deviate from the paper, which has
        one pass over all rows; see docs/scaling.rst.
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
    coreset_radii_ : ndarray of shape (n_selected,)
        Every selected row's radius when it was selected (its distance to
        the rows selected before it; after ``merge_method="radius"`` its effective
        radius), non-increasing; ``inf`` where none was computed (random
        selection, every row kept). ``partial_fit`` ranks the current bank
        by them.
    coverage_radius_ : float
        Largest distance (in the projected space) from any input row to its
        nearest selected row after the last pick; after a greedy merge of
        chunk coresets an upper bound (largest chunk radius plus the merge's
        radius). ``nan`` for ``"random"`` and after ``merge_method="radius"``.
    n_rows_seen_ : int
        Input rows the coreset was chosen from (all chunks and
        ``partial_fit`` calls).
    n_images_seen_ : int or None
        Images those rows came from (``None`` for 2-D input).
    seed_ : int
        Seed of the projection and starting points of chunked selection,
        drawn from ``random_state`` at ``fit``; chunk coresets depend only on
        it and on their first image, so a chunk recomputed elsewhere (a Dask
        worker, a retried task) selects the same rows.
    n_features_in_ : int
        Feature size of a row.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of 2-D DataFrame input, when they are all strings.

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
        chunk_sampling_ratio=None,
        merge_method="radius",
        device="auto",
        random_state=None,
        progress=False,
    ):
        self.sampling_ratio = sampling_ratio
        self.method = method
        self.projection_dim = projection_dim
        self.n_starting_points = n_starting_points
        self.chunk_sampling_ratio = chunk_sampling_ratio
        self.merge_method = merge_method
        self.device = device
        self.random_state = random_state
        self.progress = progress

    def _validate_params(self) -> None:
        for name in ("sampling_ratio", "chunk_sampling_ratio"):
            ratio = getattr(self, name)
            if name == "chunk_sampling_ratio" and ratio is None:
                continue
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {ratio!r}.")
        if self.method not in ("greedy", "random"):
            raise ValueError(f"method must be 'greedy' or 'random', got {self.method!r}.")
        if self.merge_method not in ("radius", "greedy"):
            raise ValueError(f"merge_method must be 'radius' or 'greedy', got {self.merge_method!r}.")
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
        self._fit_rows(X)
        return self

    def _fit_rows(self, X) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate, select the coreset and set the fitted attributes; return the pooled rows."""
        self._validate_params()
        rows, image_index = validate_features(self, X, reset=True)
        self._select(rows)
        self.seed_ = _draw_seed(self.random_state)  # after the picks: they stay as before chunking existed
        self.n_rows_seen_ = int(rows.shape[0])
        self.n_images_seen_ = None if image_index is None else int(np.asarray(X).shape[0])
        return rows, image_index

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
            self.coreset_radii_ = np.full(len(self.coreset_indices_), np.inf)
            return
        starts = rng.choice(n_rows, min(self.n_starting_points, n_rows), replace=False)
        projected = _project(rows, self._projection_matrix(rows.shape[1], rng))
        self.coreset_indices_, self.coverage_radius_, self.coreset_radii_ = self._greedy(projected, starts, n_selected)

    def _greedy(
        self, projected: np.ndarray, starts: np.ndarray, n_selected: int
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Greedy picks, the radius after the last one, and every pick's radius when picked."""
        device = resolve_device(self.device)
        # Imported here: numba is only needed to fit, not to load and score.
        from ._greedy import greedy_numba, greedy_torch

        radii = np.empty(n_selected, dtype=np.float64)
        if device.type == "cuda":
            picks, radius = greedy_torch(projected, starts, n_selected, device, radii=radii)
        else:
            with tqdm(total=n_selected, desc="Coreset", unit="pick", disable=not self.progress) as bar:
                picks, radius, _ = greedy_numba(projected, starts.astype(np.int64), n_selected, bar, radii=radii)
        return picks, float(radius), radii

    def _projection_matrix(self, n_dims: int, rng: np.random.RandomState) -> np.ndarray | None:
        """Random linear projection, initialised like ``torch.nn.Linear``; None for no projection."""
        if self.projection_dim is None or self.projection_dim >= n_dims:
            return None
        bound = 1.0 / np.sqrt(n_dims)
        return rng.uniform(-bound, bound, size=(n_dims, self.projection_dim)).astype(np.float32)

    def fit_transform(self, X, y=None, **fit_params):
        """Select the coreset and return the selected rows (the memory bank).

        Returns
        -------
        rows : PatchRows of shape (n_selected, n_features)
            The selected rows; for 4-D input ``rows.image_index`` tells each
            row's source image.
        """
        rows, image_index = self._fit_rows(X)
        selected = rows[self.coreset_indices_]
        if image_index is None and _get_output_config("transform", self)["dense"] == "pandas":
            # set_output(transform="pandas"): the selected rows keep their own index labels.
            import pandas as pd

            if isinstance(X, pd.DataFrame):
                return pd.DataFrame(selected, index=X.index[self.coreset_indices_], columns=self.get_feature_names_out())
        source = None if image_index is None else image_index[self.coreset_indices_]
        return PatchRows(selected, source, np.asarray(self.coreset_indices_))

    # ------------------------------------------------------ chunked selection
    def begin_chunks(self) -> CoresetSampler:
        """Start a chunked selection: validate the parameters and draw ``seed_``.

        Call it once before :meth:`chunk_coreset` (the pipeline does);
        :meth:`merge` then sets the fitted attributes.

        Returns
        -------
        self : CoresetSampler
        """
        self._validate_params()
        self.seed_ = _draw_seed(self.random_state)
        return self

    def chunk_coreset(self, X, first_image: int = 0) -> ChunkCoreset:
        """Greedy order of one chunk of image features (does not change the sampler).

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)
            Patch features of consecutive images.
        first_image : int, default=0
            Global index of the chunk's first image: rows are numbered
            globally, and the chunk's random starting points depend on it.

        Returns
        -------
        coreset : ChunkCoreset
            The first ``int(n_rows * 1.5 * chunk_ratio())`` greedy picks with
            their radii (at least one row), for :meth:`allocate`; with
            ``method="random"``, ``int(n_rows * chunk_ratio())`` random rows.
        """
        check_is_fitted(self, "seed_")
        features = np.asarray(X)
        if features.ndim != 4 or min(features.shape) == 0:
            raise ValueError(
                f"chunk_coreset needs patch features of shape (n_images, h, w, n_features); got {features.shape}."
            )
        rows, local_image = pool_patches(features)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows = rows.shape[0]
        first_row = int(first_image) * n_rows // features.shape[0]
        rng = _derived_rng(self.seed_, 1, first_row)
        radii = None
        if self.method == "random":
            n_selected = min(n_rows, max(1, int(n_rows * self.chunk_ratio())))
            picks, radius = np.sort(rng.choice(n_rows, n_selected, replace=False)), float("nan")
        else:
            n_selected = min(n_rows, max(1, int(n_rows * min(1.0, ALLOCATION_HEADROOM * self.chunk_ratio()))))
            starts = rng.choice(n_rows, min(self.n_starting_points, n_rows), replace=False)
            projected = _project(rows, self._shared_projection(rows.shape[1]))
            picks, radius, radii = self._greedy(projected, starts, n_selected)
            projected = projected[picks]
        return ChunkCoreset(
            rows=rows[picks], image_index=local_image[picks] + int(first_image),
            row_index=picks + first_row, n_rows=n_rows, n_images=int(features.shape[0]), radius=radius,
            radii=radii, projected=None if self.method == "random" else projected,
        )

    def allocate(self, parts: Sequence[ChunkCoreset], n_rows_total: int) -> list[ChunkCoreset]:
        """Cut chunk coresets down to the union's share of ``n_rows_total`` rows.

        Keeps ``int(n_rows_total * chunk_ratio())`` rows in all: every row
        without radii (an existing bank, random picks), at least each chunk's
        first pick, then the picks made at the largest radii over all chunks
        (ties: earlier chunk, earlier pick). Every chunk keeps a prefix of its
        greedy order, so it still covers its rows within the radius of its
        first dropped pick, which becomes its ``radius``. The result does
        not depend on the order of `parts`, so chunks can be allocated as
        they arrive (the memory held stays near the union's share).

        Parameters
        ----------
        parts : sequence of ChunkCoreset
        n_rows_total : int
            Rows of all chunks of the fit, including those still to come.

        Returns
        -------
        parts : list of ChunkCoreset
            Sorted by their first row.
        """
        parts = sorted(parts, key=lambda part: int(part.row_index[0]) if len(part.row_index) else -1)
        ranked = [part for part in parts if part.radii is not None and len(part.radii) > 1]
        is_ranked = {id(part) for part in ranked}
        n_fixed = sum(1 if id(part) in is_ranked else len(part.rows) for part in parts)
        n_free = int(n_rows_total * self.chunk_ratio()) - n_fixed
        radii = [np.asarray(part.radii[1:], dtype=np.float64) for part in ranked]
        if not ranked or n_free >= sum(len(values) for values in radii):
            return parts
        order = np.argsort(-np.concatenate(radii), kind="stable")[:max(0, n_free)]
        kept = np.bincount(np.repeat(np.arange(len(ranked)), [len(values) for values in radii])[order],
                           minlength=len(ranked))
        cut = {id(part): 1 + int(n) for part, n in zip(ranked, kept)}
        return [_prefix(part, cut[id(part)]) if id(part) in cut else part for part in parts]

    def merge(self, parts: Sequence[ChunkCoreset]) -> PatchRows:
        """Choose the memory bank among the union of chunk coresets; sets the fitted attributes.

        The union is first cut to its share by :meth:`allocate`. The merge
        keeps ``int(n_rows * sampling_ratio)`` rows, ``n_rows`` being the
        rows of all chunks together (``ChunkCoreset.n_rows``), or the whole
        union when it is no larger; how depends on ``merge_method``:

        - ``"radius"``: the rows of largest effective radius, the smaller of
          a row's radius in its chunk's greedy order and its distance to the
          nearest union row of larger radius. This replays what one greedy
          pass over all rows does to a pattern that several chunks picked:
          only its first copy keeps its radius. ``coverage_radius_`` is
          not computed (``nan``): bounding it would cost a search of every
          union row among the kept ones.
        - ``"greedy"``: one more greedy pass over the union. If every chunk
          keeps at least as many rows as the bank, greedy selection over the
          union of greedy chunk coresets covers every input row within 4
          times the optimal k-center radius (composable coresets; Indyk et
          al. 2014, Malkomes et al. 2015), against 2 times for one greedy
          pass; ``coverage_radius_`` is a bound: largest chunk radius plus
          the merge's radius (triangle inequality).

        Only the parts' projected rows are read during the selection; the
        full rows are gathered for the kept rows only, so parts whose rows
        are memory-mapped (:class:`~skpatchcore._union.SpilledUnion`) stay
        on disk.

        Parameters
        ----------
        parts : sequence of ChunkCoreset
            From :meth:`chunk_coreset`, or an existing bank (``partial_fit``).

        Returns
        -------
        bank : PatchRows of shape (n_selected, n_features)
            The selected rows with their ``image_index`` and ``row_index``.
        """
        from ._union import gather_rows, largest_effective_radii

        check_is_fitted(self, "seed_")
        if len(parts) == 0:
            raise ValueError("merge needs at least one chunk coreset.")
        n_rows_total = int(sum(part.n_rows for part in parts))
        parts = self.allocate(parts, n_rows_total)
        n_union = sum(len(part.rows) for part in parts)
        image_index = np.concatenate([part.image_index for part in parts])
        row_index = np.concatenate([part.row_index for part in parts])
        n_selected = max(1, int(n_rows_total * self.sampling_ratio))
        chunk_radius = float(np.max([part.radius for part in parts]))  # nan if any is unknown
        radii = np.concatenate([np.full(len(part.rows), np.inf) if part.radii is None else part.radii
                                for part in parts])
        if n_selected >= n_union:  # every row, by decreasing radius (the order partial_fit ranks by)
            picks, radius = np.argsort(-radii, kind="stable"), 0.0
            radii = radii[picks]
        elif self.method == "random":
            rng = _derived_rng(self.seed_, 2, n_rows_total)
            picks, radius = np.sort(rng.choice(n_union, n_selected, replace=False)), float("nan")
            radii = np.full(n_selected, np.inf)
        elif self.merge_method == "radius":
            picks, radii = largest_effective_radii([self._projected(part) for part in parts], radii, n_selected)
            radius = float("nan")
        else:
            rng = _derived_rng(self.seed_, 2, n_rows_total)
            starts = rng.choice(n_union, min(self.n_starting_points, n_union), replace=False)
            projected = np.concatenate([self._projected(part) for part in parts])
            picks, radius, radii = self._greedy(projected, starts, n_selected)
        self.n_features_in_ = int(parts[0].rows.shape[1])
        self.coreset_indices_ = row_index[picks]
        self.coreset_radii_ = np.asarray(radii, dtype=np.float64)
        self.coverage_radius_ = chunk_radius + radius
        self.n_rows_seen_ = n_rows_total
        self.n_images_seen_ = int(sum(part.n_images for part in parts))
        return PatchRows(gather_rows(parts, picks), image_index[picks], row_index[picks])

    def _projected(self, part: ChunkCoreset) -> np.ndarray:
        """A part's rows in the shared projected space."""
        if part.projected is not None:
            return part.projected
        return _project(part.rows, self._shared_projection(part.rows.shape[1]))

    def chunk_ratio(self) -> float:
        """The fraction of its rows a chunk coreset keeps (``chunk_sampling_ratio`` resolved)."""
        if self.chunk_sampling_ratio is not None:
            return float(self.chunk_sampling_ratio)
        ratio = float(self.sampling_ratio)
        return min(1.0, CHUNK_OVERSAMPLING * ratio, max(MIN_OVERSAMPLING * ratio, OVERSAMPLED_RATIO_LIMIT))

    def _shared_projection(self, n_dims: int) -> np.ndarray | None:
        """The projection every chunk and the merge share (drawn from ``seed_``)."""
        return self._projection_matrix(n_dims, _derived_rng(self.seed_, 0))

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

    @available_if(_fitted_on_rows)
    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """The input feature names: the sampler keeps columns as they are.

        Defined for 2-D rows only (image features have no column names), so
        that ``set_output(transform="pandas")`` gives DataFrames of rows,
        while 4-D patch features and :class:`PatchRows` pass through unchanged
        whatever the output configuration.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Defaults to ``feature_names_in_``, or ``x0, x1, ...`` when the
            sampler was fitted without column names.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self, "n_features_in_")
        return _check_feature_names_in(self, input_features)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _project(rows: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """``rows @ matrix`` in float32 (the rows themselves when `matrix` is None)."""
    if matrix is None:
        return np.ascontiguousarray(rows, dtype=np.float32)
    import torch

    rows = np.asarray(rows, dtype=np.float32)
    with torch.inference_mode(), warnings.catch_warnings():
        # Read-only input (a memory-mapped feature file) is only read by the product; torch
        # warns about any non-writable array it wraps.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return (torch.from_numpy(rows) @ torch.from_numpy(matrix)).numpy()


def _prefix(part: ChunkCoreset, n_kept: int) -> ChunkCoreset:
    """The first `n_kept` picks of a chunk coreset; its radius becomes the first dropped pick's."""
    if n_kept >= len(part.rows):
        return part
    return part._replace(
        rows=part.rows[:n_kept], image_index=part.image_index[:n_kept], row_index=part.row_index[:n_kept],
        radius=float(part.radii[n_kept]), radii=part.radii[:n_kept],
        projected=None if part.projected is None else part.projected[:n_kept],
    )


def _draw_seed(random_state) -> int:
    """One integer seed from `random_state` (fresh entropy when None)."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _derived_rng(seed: int, *keys: int) -> np.random.RandomState:
    """An independent random stream for (`seed`, `keys`): same keys, same stream."""
    state = np.random.SeedSequence([int(seed), *(int(key) for key in keys)]).generate_state(1)[0]
    return np.random.RandomState(int(state))
