"""Greedy k-center coreset subsampling of patch features (PatchCore, section 3.2)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted
from tqdm.auto import tqdm

from ._device import resolve_device
from ._doc_link import DocLinkMixin
from ._param_constraints import DEVICE, FRACTION, N_JOBS, NumberInterval, positive_int
from ._random_seeds import derived_rng, draw_seeds
from ._validation import PatchRows, pool_patches, validate_features
from .coreset_strategy import (
    STRATEGIES,
    SharedProgress,
    chunk_bounds,
    chunk_rows,
    map_in_threads,
    n_threads,
    resolve_strategy,
)
from .io.versioning import VersionedStateMixin

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


def _unpicked(n_rows: int, picks: np.ndarray) -> np.ndarray:
    """Indices in ``range(n_rows)`` that are not in `picks` (ascending)."""
    mask = np.ones(n_rows, dtype=bool)
    mask[picks] = False
    return np.flatnonzero(mask)


def _random_rows_first(random_rows: np.ndarray, picks: np.ndarray, radii: np.ndarray):
    """The bank's rows and radii with `random_rows` (radius ``inf``: every merge keeps them) before `picks`."""
    return (np.concatenate([random_rows, picks]),
            np.concatenate([np.full(len(random_rows), np.inf), radii]))


def _fitted_on_rows(sampler) -> bool:
    """Whether the sampler is unfitted or was fitted on 2-D rows (not on image features)."""
    return getattr(sampler, "n_images_seen_", None) is None


class CoresetSampler(DocLinkMixin, VersionedStateMixin, TransformerMixin, BaseEstimator):
    """Greedy k-center coreset of patch features.

    Picks the subset of rows whose nearest-neighbour coverage of all rows is
    (approximately) best: the approximate greedy coreset of PatchCore [1]_
    (algorithm 1, after the k-center coreset of [2]_) as in the official code. Rows are
    randomly projected to ``projection_dim`` dimensions; every row's distance
    to the coreset starts as its mean distance to ``n_starting_points`` random
    rows; then ``int(n_rows * sampling_ratio)`` times the row farthest from
    the coreset is added.

    In a pipeline the sampler is asymmetric on purpose: ``fit_transform``
    returns the selected rows (the memory bank that the next step stores),
    while ``transform`` returns its input unchanged so that new images reach
    the detector with all their patches.

    Features that do not fit in memory at once are reduced chunk by chunk
    (composable coresets [3]_, see :meth:`chunk_coreset`, :meth:`allocate` and
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
    random_fraction : float in [0, 1), default=0.0
        Fraction of the bank's rows drawn uniformly at random from all rows;
        the greedy selection picks the rest. 0 is the paper's coreset. Greedy
        k-center bounds the largest distance of a row to the bank but need
        not keep any row inside a dense cluster, so the most common patterns
        (a flat background, bare substrate) can sit near the coverage radius
        from the bank, and the anomaly maps of normal images are then high
        wherever they show; random rows fall mostly into those clusters and
        cover them exactly. A deviation from the paper, for the anomaly maps
        of images dominated by a few patterns (see docs/large_images.rst).
        Only with ``method="greedy"``. Random rows are kept through every merge
        (their radius is ``inf``); in a chunked fit each row is drawn with
        probability ``sampling_ratio * random_fraction``, so their number
        varies slightly around that share.
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
        coresets (a fit of ``strategy="single_pass"`` within the budget
        never merges). ``"radius"`` keeps the rows of largest effective
        radius: a row's radius in its chunk's greedy order, lowered to its
        distance to the nearest union row of larger radius, so that a
        pattern that several chunks picked counts once, as in one greedy
        pass over all rows; unions of more than 131,072 rows are compared
        within groups of consecutive chunks of that size, so that the cost
        grows linearly. ``"greedy"`` runs one more greedy pass over the union (the
        composable-coreset construction, with its approximation guarantee;
        slower on large unions). Both deviate from the paper, which has
        one pass over all rows; see docs/scaling.rst.
    strategy : {"auto", "single_pass", "chunks"}, default="auto"
        How :meth:`fit` selects greedily among rows held in memory.
        ``"single_pass"`` is the paper's and the official code's one greedy
        pass over all rows, whose cost grows with rows x picks (the square
        of the training set at a fixed ratio). ``"chunks"`` orders chunks of
        about 16,384 rows (fewer above a 10% ratio; whole images) by greedy selection in parallel
        threads (:meth:`chunk_coresets`) and merges their union as a
        chunked fit does (:meth:`merge`, ``merge_method``); its cost grows
        linearly with the rows. ``"auto"`` chooses one pass while rows x
        picks is at most 4e9 (e.g. the 1% coreset of 800 images of 784
        patches), chunks beyond (see :mod:`skpatchcore.coreset_strategy`).
        The rule does not depend on the cores, so the bank does not
        either. ``"chunks"`` deviates from the paper like every chunked
        fit (see docs/scaling.rst); ``"single_pass"`` keeps the paper's
        algorithm at any size.
    n_jobs : int or None, default=None
        Threads that compute chunk coresets at once (``strategy``, and
        :meth:`chunk_coresets` in a pipeline's chunked fit); scikit-learn
        style, -1 for all cores. None uses as many as torch does (the
        pipeline's ``n_jobs`` during its fit; else all cores). The result
        does not depend on it.
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
        selection, the random rows of ``random_fraction``, every row kept).
        ``partial_fit`` ranks the current bank by them.
    coverage_radius_ : float
        Largest distance (in the projected space) from any input row to its
        nearest selected row after the last pick; after a greedy merge of
        chunk coresets an upper bound (largest chunk radius plus the merge's
        radius); with ``random_fraction`` the greedy picks' radius, also an
        upper bound. ``nan`` for ``"random"`` and after ``merge_method="radius"``.
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

    See Also
    --------
    PatchCoreDetector : Stores the selected rows as its memory bank.
    PatchCorePipeline : Runs the chunked selection within a memory budget.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
       https://arxiv.org/abs/2106.08265
    .. [2] O. Sener and S. Savarese, "Active Learning for Convolutional
       Neural Networks: A Core-Set Approach", ICLR 2018.
    .. [3] P. Indyk, S. Mahabadi, M. Mahdian and V. S. Mirrokni, "Composable
       Core-sets for Diversity and Coverage Maximization", PODS 2014.

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
        random_fraction=0.0,
        chunk_sampling_ratio=None,
        merge_method="radius",
        strategy="auto",
        n_jobs=None,
        device="auto",
        random_state=None,
        progress=False,
    ):
        self.sampling_ratio = sampling_ratio
        self.method = method
        self.projection_dim = projection_dim
        self.n_starting_points = n_starting_points
        self.random_fraction = random_fraction
        self.chunk_sampling_ratio = chunk_sampling_ratio
        self.merge_method = merge_method
        self.strategy = strategy
        self.n_jobs = n_jobs
        self.device = device
        self.random_state = random_state
        self.progress = progress

    _parameter_constraints: dict = {
        "sampling_ratio": [FRACTION],
        "method": [StrOptions({"greedy", "random"})],
        "projection_dim": [positive_int(), None],
        "n_starting_points": [positive_int()],
        "random_fraction": [NumberInterval(Real, 0, 1, closed="left")],
        "chunk_sampling_ratio": [FRACTION, None],
        "merge_method": [StrOptions({"radius", "greedy"})],
        "device": DEVICE,
        "random_state": ["random_state"],
        "progress": ["boolean"],
        "strategy": [StrOptions(set(STRATEGIES))],
        "n_jobs": N_JOBS,
    }

    @_fit_context(prefer_skip_nested_validation=True)
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
        """Validate the input, select the coreset and set the fitted attributes; return the pooled rows."""
        rows, image_index = validate_features(self, X, reset=True)
        n_rows = int(rows.shape[0])
        n_images = None if image_index is None else int(np.asarray(X).shape[0])
        if self._uses_chunks(n_rows, max(1, int(n_rows * self.sampling_ratio))):
            self.seed_ = draw_seeds(self.random_state, 1)[0]
            per_image = 1 if n_images is None else n_rows // n_images
            units = n_rows // per_image
            bounds = chunk_bounds(units, per_image, self._chunk_rows())
            self.merge(self._chunk_parts(rows, per_image, bounds, first_image=0))
        else:
            self._select(rows)
            self.seed_ = draw_seeds(self.random_state, 1)[0]  # after the picks: they stay as before chunking existed
        self.n_rows_seen_ = n_rows
        self.n_images_seen_ = n_images
        return rows, image_index

    def _uses_chunks(self, n_rows: int, n_picks: int) -> bool:
        """Whether a greedy selection of `n_picks` of `n_rows` rows runs as chunk coresets (``strategy``)."""
        return (self.method == "greedy" and n_picks < n_rows
                and resolve_strategy(self.strategy, n_rows, n_picks) == "chunks")

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
        n_random = int(n_selected * self.random_fraction)
        picks, self.coverage_radius_, radii = self._greedy(projected, starts, n_selected - n_random)
        if n_random:  # drawn after the greedy picks, among the rows they left
            random_rows = np.sort(rng.choice(_unpicked(n_rows, picks), n_random, replace=False))
            picks, radii = _random_rows_first(random_rows, picks, radii)
        self.coreset_indices_, self.coreset_radii_ = picks, radii

    def _greedy(
        self, projected: np.ndarray, starts: np.ndarray, n_selected: int, bar=None
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Greedy picks, the radius after the last one, and every pick's radius when picked.

        `bar` is a progress bar shared by several selections (else one is
        made here when ``progress`` is set).
        """
        device = resolve_device(self.device)
        # Imported here: numba is only needed to fit, not to load and score.
        from ._greedy import greedy_numba, greedy_torch

        radii = np.empty(n_selected, dtype=np.float64)
        if device.type == "cuda":
            picks, radius = greedy_torch(projected, starts, n_selected, device, radii=radii)
        elif bar is not None:
            picks, radius, _ = greedy_numba(projected, starts.astype(np.int64), n_selected, bar, radii=radii)
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

    @_fit_context(prefer_skip_nested_validation=True)
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
                index = X.index[self.coreset_indices_]
                return pd.DataFrame(selected, index=index, columns=self.get_feature_names_out())
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
        self.seed_ = draw_seeds(self.random_state, 1)[0]
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
        rows, per_image, n_images = self._chunk_input(X)
        return self._chunk_parts(rows, per_image, [(0, n_images)], first_image)[0]

    def chunk_coresets(self, X, first_image: int = 0) -> list[ChunkCoreset]:
        """Chunk coresets of consecutive images, split by ``strategy`` and computed in threads.

        Under ``strategy="single_pass"``, and under ``"auto"`` when the
        chunk's greedy order is small (rows x picks at most 4e9), the one
        :meth:`chunk_coreset` of `X`; otherwise the chunk coresets of
        consecutive runs of about 16,384 rows (fewer above a 10% ratio, see
        :func:`~skpatchcore.coreset_strategy.chunk_rows`; whole images), each exactly
        :meth:`chunk_coreset` of its images, computed on ``n_jobs`` threads.
        A chunked fit then merges far fewer picks per row: each chunk's
        greedy order costs its own rows times its picks.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)
        first_image : int, default=0
            Global index of the first image (see :meth:`chunk_coreset`).

        Returns
        -------
        coresets : list of ChunkCoreset
            In image order.
        """
        rows, per_image, n_images = self._chunk_input(X)
        n_rows = rows.shape[0]
        n_picks = max(1, int(n_rows * self._chunk_pick_fraction()))
        bounds = ([(0, n_images)] if not self._uses_chunks(n_rows, n_picks)
                  else chunk_bounds(n_images, per_image, self._chunk_rows()))
        return self._chunk_parts(rows, per_image, bounds, first_image)

    def _chunk_input(self, X) -> tuple[np.ndarray, int, int]:
        """Pooled rows of 4-D chunk features, the rows per image and the images."""
        check_is_fitted(self, "seed_")
        features = np.asarray(X)
        if features.ndim != 4 or min(features.shape) == 0:
            raise ValueError(
                f"chunk_coreset needs patch features of shape (n_images, h, w, n_features); got {features.shape}."
            )
        rows, _ = pool_patches(features)
        n_images = int(features.shape[0])
        return rows, rows.shape[0] // n_images, n_images

    def _chunk_parts(self, rows: np.ndarray, per_image: int, bounds: Sequence[tuple[int, int]],
                     first_image: int) -> list[ChunkCoreset]:
        """The chunk coresets of the image ranges `bounds` of `rows`, computed in threads.

        Each range is projected and seeded in this thread; the greedy
        orders run on :func:`~skpatchcore.coreset_strategy.n_threads` threads.
        """
        n_picks = sum(self._chunk_picks((stop - start) * per_image) for start, stop in bounds)
        on_cpu = resolve_device(self.device).type != "cuda"
        threads = n_threads(self.n_jobs) if on_cpu and len(bounds) > 1 else 1
        with tqdm(total=n_picks, desc="Coreset", unit="pick", disable=not self.progress) as bar:
            bar = SharedProgress(bar)
            jobs = (self._chunk_job(rows[start * per_image:stop * per_image], per_image, first_image + start)
                    for start, stop in bounds)
            return list(map_in_threads(lambda job: job(bar), jobs, threads))

    def _chunk_pick_fraction(self) -> float:
        """The fraction of its rows a chunk's greedy order runs to: 1.5 times ``chunk_ratio()``, at most 1."""
        return min(1.0, ALLOCATION_HEADROOM * self.chunk_ratio())

    def _chunk_rows(self) -> int:
        """Rows of one chunk coreset under ``strategy="chunks"`` (:func:`~skpatchcore.coreset_strategy.chunk_rows`)."""
        return chunk_rows(self._chunk_pick_fraction())

    def _chunk_picks(self, n_rows: int) -> int:
        """Rows a chunk of `n_rows` rows keeps (greedy order to 1.5 times ``chunk_ratio()``)."""
        if self.method == "random":
            return min(n_rows, max(1, int(n_rows * self.chunk_ratio())))
        return min(n_rows, max(1, int(n_rows * self._chunk_pick_fraction())))

    def _chunk_job(self, rows: np.ndarray, per_image: int, first_image: int):
        """Prepare one chunk coreset (projection, seeds); return the function that selects it."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows = rows.shape[0]
        first_row = int(first_image) * per_image
        rng = derived_rng(self.seed_, 1, first_row)
        n_selected = self._chunk_picks(n_rows)

        def coreset(picks, radius, radii=None, projected=None) -> ChunkCoreset:
            return ChunkCoreset(
                rows=rows[picks], image_index=picks // per_image + int(first_image), row_index=picks + first_row,
                n_rows=n_rows, n_images=n_rows // per_image, radius=radius, radii=radii, projected=projected,
            )

        if self.method == "random":
            part = coreset(np.sort(rng.choice(n_rows, n_selected, replace=False)), float("nan"))
            return lambda bar: part
        starts = rng.choice(n_rows, min(self.n_starting_points, n_rows), replace=False)
        projected = _project(rows, self._shared_projection(rows.shape[1]))

        def job(bar) -> ChunkCoreset:
            picks, radius, radii = self._greedy(projected, starts, n_selected, bar)
            if self.random_fraction:  # random rows first, radius inf: every allocation and merge keeps them
                draw = derived_rng(self.seed_, 3, first_row).random(n_rows)
                candidates = _unpicked(n_rows, picks)
                random_rows = candidates[draw[candidates] < self.sampling_ratio * self.random_fraction]
                picks, radii = _random_rows_first(random_rows, picks, radii)
            return coreset(picks, radius, radii, projected[picks])

        return job

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
          only its first copy keeps its radius. A union of more than
          ``MERGE_GROUP_ROWS`` (131,072) rows is split into groups of
          consecutive chunks of about that many rows, and rows are compared
          within their group only (the cost grows linearly with the union;
          :func:`~skpatchcore._union.largest_effective_radii_by_group`).
          ``coverage_radius_`` is not computed (``nan``): bounding it would
          cost a search of every union row among the kept ones.
        - ``"greedy"``: one more greedy pass over the union (rows of
          infinite radius, such as the random rows of ``random_fraction``,
          are kept, and the pass picks the rest). If every chunk
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
        from ._union import gather_rows, largest_effective_radii_by_group

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
            rng = derived_rng(self.seed_, 2, n_rows_total)
            picks, radius = np.sort(rng.choice(n_union, n_selected, replace=False)), float("nan")
            radii = np.full(n_selected, np.inf)
        elif self.merge_method == "radius":
            picks, radii = largest_effective_radii_by_group([self._projected(part) for part in parts], radii,
                                                            n_selected)
            radius = float("nan")
        else:  # rows of infinite radius (random rows, a bank kept whole) stay; the greedy pass picks the rest
            fixed = np.flatnonzero(np.isinf(radii))
            free = np.flatnonzero(~np.isinf(radii)) if len(fixed) else np.arange(n_union)
            n_greedy = max(0, n_selected - len(fixed))
            rng = derived_rng(self.seed_, 2, n_rows_total)
            starts = rng.choice(len(free), min(self.n_starting_points, len(free)), replace=False)
            projected = np.concatenate([self._projected(part) for part in parts])
            projected = projected[free] if len(fixed) else projected
            picks, radius, radii = (self._greedy(projected, starts, n_greedy) if n_greedy and len(free)
                                    else (np.zeros(0, np.int64), float("nan"), np.zeros(0)))
            picks = np.concatenate([fixed[:n_selected], free[picks]])
            radii = np.concatenate([np.full(min(len(fixed), n_selected), np.inf), radii])
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
        return self._projection_matrix(n_dims, derived_rng(self.seed_, 0))

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
