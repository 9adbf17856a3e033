"""Memory-bank nearest-neighbour anomaly scoring (PatchCore, section 3.3)."""

from __future__ import annotations

import numbers
import threading
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._budget import images_per_chunk
from ._device import resolve_device
from ._doc_link import DocLinkMixin
from ._param_constraints import DEVICE, N_JOBS, WORKING_MEMORY, NumberInterval, positive_int
from ._validation import PatchRows, validate_features
from .conformal import conformal_pvalues
from .io.versioning import VersionedStateMixin
from .search import BankSearch, bfloat16_speedup

#: ``algorithm="auto"`` on a CPU (see :meth:`PatchCoreDetector.search_algorithm`):
#: calls below this many multiply-adds (queries x bank rows x dims) search
#: exactly; larger ones use the bfloat16 shortlist where this CPU multiplies
#: bfloat16 at least 1.5x faster than float32, and pynndescent where it does
#: not or where the bank has at least 50,000 rows (docs/archive/benchmarks-notebook.md).
AUTO_SMALL_WORK = 1e9
#: Banks below this many multiply-adds per query (rows x dims) are always
#: searched exactly: an index would cost more to build (and, for pynndescent,
#: to compile, once per process) than it saves.
AUTO_SMALL_BANK_WORK = 1e6
ALGORITHMS = ("auto", "exact", "bf16", "pynndescent")
AUTO_BF16_MIN_SPEEDUP = 1.5
AUTO_NNDESCENT_BANK_ROWS = 50_000
#: Patches per image (or group of tiles) searched exactly again after an
#: approximate search, so that image scores equal exact search (grows x2 until
#: certified): the approximate search nearly always ranks the true maximum
#: among an image's first two, and each exact query scans the whole bank.
EXACT_MAXIMA_PATCHES = 2
#: Images' scores alone (no maps) search the patches on every this many rows
#: and columns first; the others are bounded by the bank rows found for the
#: searched patches around them (docs/algorithm.rst, "Image scores without maps").
SPARSE_GRID_STEP = 2
#: Feature values that a search of selected patches copies at once (16 MiB of float32).
SELECTION_BLOCK_ENTRIES = 1 << 22
#: Bytes per patch that the sparse search and the maxima's certification keep
#: (positions, bounds, flags; see :func:`scoring_bytes_per_patch`).
SCORING_BOOKKEEPING_BYTES = 64
#: Candidates that pynndescent tracks for images' scores alone (no maps):
#: each image's maximum is made exact afterwards, so a coarser search of the
#: other patches suffices; maps, which show every patch's score, keep
#: :data:`~skpatchcore.search.MIN_NNDESCENT_CANDIDATES`.
SCORES_ONLY_NNDESCENT_CANDIDATES = 4
#: The same when images come in groups that share one certification (a tiled
#: image's tiles): far more patches per exact re-search, so a still coarser
#: search pays.
GROUPED_SCORES_ONLY_NNDESCENT_CANDIDATES = 1
#: Images (or rows, for 2-D input) scored to calibrate ``offset_``.
CALIBRATION_GROUPS = 64
CALIBRATION_ROWS = 2048
#: Standard deviation of the Gaussian smoothing of anomaly maps, in pixels.
MAP_SIGMA = 4.0
#: Guards the swap of a detector's bank and its search structures (:meth:`PatchCoreDetector._bank_search`).
_BANK_LOCK = threading.Lock()


def _no_fit_predict(estimator) -> bool:
    raise AttributeError(
        "PatchCoreDetector is a novelty detector and has no fit_predict: every training "
        "sample is in the memory bank, so it would match itself. Fit on normal data and "
        "predict new data; offset_ is calibrated with training samples left out."
    )


class PatchCoreDetector(DocLinkMixin, VersionedStateMixin, OutlierMixin, BaseEstimator):
    """PatchCore anomaly detector: nearest-neighbour distance to a memory bank.

    ``fit`` stores what it receives as the memory bank: 2-D rows (e.g. the
    coreset chosen by :class:`CoresetSampler`) or 4-D patch features
    ``(n_images, h, w, D)``, whose patches are pooled. This is PatchCore's scoring step [1]_.
    Scoring follows the scikit-learn outlier-detection conventions
    (``score_samples``: higher means more normal), as for
    ``LocalOutlierFactor(novelty=True)`` [2]_ and ``IsolationForest`` [3]_.

    * 4-D input: each patch is scored by its distance to the nearest bank
      row; an image's anomaly score is its largest patch score (optionally
      reweighted, eq. 7 of the paper); ``score_samples`` returns minus that.
    * 2-D input: every row is one sample scored by its own nearest-neighbour
      distance, which makes the estimator a coreset k-NN novelty detector
      for tabular data.

    Distances are true Euclidean distances; the official implementation
    (faiss ``IndexFlatL2``) reports squared distances. Image scores rank the
    same for ``n_neighbors=1`` (same image AUROC); anomaly maps differ
    slightly, since the Gaussian smoothing averages distances rather than
    squared distances.

    A fitted detector can be scored from several threads at once (the
    search structures are built once, under a lock, on first use); a
    ``partial_fit`` or ``fit`` running meanwhile replaces the bank in one
    step, and each scoring call searches either the old bank or the new one
    (``docs/serving.rst``).

    Parameters
    ----------
    n_neighbors : int, default=1
        Bank neighbours whose mean distance scores a patch.
    algorithm : {"auto", "exact", "bf16", "pynndescent"}, default="auto"
        ``"exact"``: chunked float32 brute force. ``"bf16"``: brute force in
        bfloat16, in the bank's principal subspace, shortlists 8 candidates
        per patch, whose exact float32 distances decide
        (:class:`~skpatchcore.search.BFloat16Shortlist`). ``"pynndescent"``:
        an approximate neighbour graph, built on first use. With either
        approximation, image scores of 4-D input are still exact: each
        image's highest patches are searched again exactly until no other
        patch can exceed them; the other patch scores (the maps) may be
        slightly too high where a neighbour was missed. ``"auto"``: exact on
        a GPU and for small calls; otherwise pynndescent for banks of
        >= 50,000 rows, else ``"bf16"`` where this CPU multiplies bfloat16
        >= 1.5x faster than float32, else pynndescent.
    reweight : bool, default=False
        Apply the paper's eq. 7 to image scores: the largest patch score is
        scaled by ``1 - softmax`` weight of its nearest bank row among that
        row's ``reweight_neighbors`` bank neighbours. Off by default, as in
        the official code.
    reweight_neighbors : int, default=9
        Size of that neighbourhood (anomalib's choice; the paper's ``b``).
    map_sigma : float, default=4.0
        Standard deviation, in pixels of the map, of the Gaussian smoothing
        of anomaly maps (the official code's 4); 0 turns smoothing off.
        Image scores do not depend on it. Tune it like any other parameter,
        e.g. with :func:`~skpatchcore.model_selection.synthetic_defect_scorer`.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_`` from calibration scores: training images (or rows)
        scored without matching themselves. Each calibration image is
        scored against the bank rows that came from *other* training images
        (leave-image-out; needs 4-D input or the :class:`PatchRows` that
        :class:`CoresetSampler` returns); plain 2-D rows are scored without
        their own row (leave-one-out). At most 64 training images (or 2,048
        rows) are drawn for this, with ``random_state``. ``"auto"`` puts the threshold at the
        largest calibration score (every training image is normal); a float
        ``c`` puts it at the ``1 - c`` quantile. In-sample scores, which are
        about zero, are never used.
    device : str, default="auto"
        Device of the exact search: CUDA when available.
    working_memory : float or None, default=None
        Memory budget in MiB for scoring 4-D input: images are searched and
        mapped in chunks whose temporary arrays fit in it. None uses
        scikit-learn's ``working_memory`` setting (``sklearn.set_config``).
    n_jobs : int or None, default=None
        Threads of pynndescent's index construction and of its batched
        queries (scikit-learn style: -1 all cores). None follows torch's
        current setting (in a pipeline, the pipeline's ``n_jobs``).
    random_state : int, RandomState instance or None, default=None
        Seeds pynndescent and the choice of calibration images.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (n_bank, n_features), float32
        The stored normal rows that every sample is compared with: the
        rows given to ``fit`` (4-D input pooled to one row per patch), plus
        those added by ``partial_fit``. In a pipeline, the coreset chosen by
        :class:`CoresetSampler`.
    bank_image_index_ : ndarray of shape (n_bank,) or None
        Source image of every bank row (from 4-D input or :class:`PatchRows`);
        None for plain rows. Calibration leaves these images out.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    calibration_scores_ : ndarray
        Anomaly scores (positive) of the calibration images or rows; also
        the reference of the conformal p-values (:meth:`pvalues`).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of 2-D DataFrame input (e.g. through a pipeline with
        ``set_output(transform="pandas")``), when they are all strings.

    See Also
    --------
    CoresetSampler : Chooses the memory bank (the greedy coreset).
    PatchCorePipeline : Images in, scores, maps and decisions out.
    sklearn.neighbors.LocalOutlierFactor : With ``novelty=True``, a novelty
        detector that also compares new samples with their nearest training
        samples, by local density rather than by distance.
    sklearn.ensemble.IsolationForest : A tree-based outlier detector, with
        the same ``contamination`` / ``offset_`` / ``decision_function``
        conventions.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
       https://arxiv.org/abs/2106.08265
    .. [2] M. M. Breunig, H.-P. Kriegel, R. T. Ng and J. Sander, "LOF:
       Identifying Density-Based Local Outliers", SIGMOD 2000.
    .. [3] F. T. Liu, K. M. Ting and Z.-H. Zhou, "Isolation Forest",
       ICDM 2008.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector
    >>> rng = np.random.default_rng(0)
    >>> detector = PatchCoreDetector().fit(rng.normal(size=(200, 4)))
    >>> detector.predict([[0, 0, 0, 0], [9, 9, 9, 9]])
    array([ 1, -1])
    """

    def __init__(
        self,
        n_neighbors=1,
        algorithm="auto",
        reweight=False,
        reweight_neighbors=9,
        map_sigma=MAP_SIGMA,
        contamination="auto",
        device="auto",
        working_memory=None,
        n_jobs=None,
        random_state=None,
    ):
        self.n_neighbors = n_neighbors
        self.algorithm = algorithm
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.map_sigma = map_sigma
        self.contamination = contamination
        self.device = device
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.random_state = random_state

    _parameter_constraints: dict = {
        "n_neighbors": [positive_int()],
        "algorithm": [StrOptions(set(ALGORITHMS))],
        "reweight": ["boolean"],
        "reweight_neighbors": [positive_int()],
        # Below infinity: an infinite sigma would make every map flat.
        "map_sigma": [NumberInterval(Real, 0, np.inf, closed="left")],
        "contamination": [StrOptions({"auto"}), NumberInterval(Real, 0, 0.5, closed="right")],
        "device": DEVICE,
        "working_memory": WORKING_MEMORY,
        "n_jobs": N_JOBS,
        "random_state": ["random_state"],
    }

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Store the memory bank and calibrate the decision threshold.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)
            Bank rows (e.g. a coreset) or patch features of normal images.
            The rows are copied, except for a float32
            :class:`~skpatchcore._validation.PatchRows` bank (what a
            :class:`CoresetSampler` hands over in a pipeline), which is
            stored as it is so that a large bank is not held twice.
        y : ignored

        Returns
        -------
        self : PatchCoreDetector
        """
        rows, image_index = _rows_and_images(self, X, reset=True)
        self._store_bank(rows, image_index, copy=not isinstance(X, PatchRows))
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add normal rows or images to the memory bank and recalibrate.

        The rows are appended as they are (no coreset selection: use
        :meth:`PatchCorePipeline.partial_fit` to merge them into a coreset
        bank); new images get image numbers after the ones already seen, so
        calibration still leaves whole images out.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)
        y : ignored

        Returns
        -------
        self : PatchCoreDetector
        """
        if not hasattr(self, "memory_bank_"):
            return self.fit(X, y)
        rows, image_index = _rows_and_images(self, X, reset=False)
        old_index, n_old = self.bank_image_index_, self.memory_bank_.shape[0]
        if old_index is None and image_index is None:
            combined = None
        else:
            old = np.arange(n_old) if old_index is None else np.asarray(old_index)
            new = np.arange(rows.shape[0]) if image_index is None else np.asarray(image_index)
            combined = np.concatenate([old, new + (int(old.max()) + 1 if old.size else 0)])
        self._store_bank(np.concatenate([self.memory_bank_, np.asarray(rows, dtype=np.float32)]), combined, copy=False)
        return self

    def _store_bank(self, rows: np.ndarray, image_index: np.ndarray | None, copy: bool = True) -> None:
        _check_magnitude(rows)
        if rows.shape[0] < self.n_neighbors + 1:
            raise ValueError(
                f"The memory bank needs at least n_neighbors + 1 = {self.n_neighbors + 1} rows; "
                f"got {rows.shape[0]} sample(s)."
            )
        bank = np.array if copy else np.ascontiguousarray  # the latter copies only what it must
        search = BankSearch(bank(rows, dtype=np.float32))
        image_index = None if image_index is None else np.asarray(image_index, dtype=np.int64)
        calibration = self._calibration_scores(search, image_index)
        if self.contamination == "auto":
            threshold = float(calibration.max())
        else:
            threshold = float(np.quantile(calibration, 1.0 - self.contamination))
        # Everything is computed before it is published: scoring in other threads sees the old bank or the new.
        with _BANK_LOCK:
            self._search = search
            self.memory_bank_ = search.bank
        self.bank_image_index_ = image_index
        self.calibration_scores_ = calibration
        self.offset_ = -threshold

    def _calibration_scores(self, search: BankSearch, image_index: np.ndarray | None) -> np.ndarray:
        """Scores of training images (rows) against ``search.bank`` without themselves."""
        rng = check_random_state(self.random_state)
        n_bank = search.bank.shape[0]
        groups = np.arange(n_bank) if image_index is None else np.asarray(image_index)
        unique = np.unique(groups)
        limit = CALIBRATION_ROWS if image_index is None else CALIBRATION_GROUPS
        if unique.size < 2:
            raise ValueError(
                "Calibration needs bank rows from at least two training images; "
                f"got rows from {unique.size}."
            )
        if unique.size > limit:
            unique = np.sort(rng.choice(unique, limit, replace=False))
        chosen = np.flatnonzero(np.isin(groups, unique))
        distances, nearest = self._neighbors_in_other_groups(search, chosen, groups)
        row_scores = distances.sum(axis=1) / self.n_neighbors
        if self.reweight:
            queries = search.bank[chosen]
        group_ids = np.searchsorted(unique, groups[chosen])
        scores = np.full(unique.size, -np.inf)
        np.maximum.at(scores, group_ids, row_scores)
        if self.reweight:
            order = np.lexsort((-row_scores, group_ids))
            top = order[np.r_[True, group_ids[order][1:] != group_ids[order][:-1]]]
            scores = scores * self._reweight_factors(search, queries[top], nearest[top])
        return scores.astype(np.float64)

    def _neighbors_in_other_groups(self, search: BankSearch, chosen: np.ndarray,
                                   groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances of bank rows `chosen` to their `n_neighbors` nearest rows of other groups, and the nearest.

        Exact search (``algorithm`` "auto" or "exact") skips the query's own
        group inside the search, so its cost does not depend on the groups'
        sizes; a few thousand queries, where building pynndescent's index
        for a large bank costs far more than brute force. The approximate
        searches look for ``n_neighbors`` plus the largest group's size and
        drop the query's own group.
        """
        queries = search.bank[chosen]
        if self.algorithm in ("auto", "exact"):
            distances, indices = search.exact_kneighbors(
                queries, self.n_neighbors, resolve_device(self.device), groups=(groups[chosen], groups)
            )
            if not np.all(np.isfinite(distances)):
                raise ValueError(f"Too few bank rows outside each training image for n_neighbors={self.n_neighbors}.")
            return distances, indices[:, 0]
        largest_group = int(np.max(np.unique(groups[chosen], return_counts=True)[1]))
        k = min(len(groups), self.n_neighbors + largest_group)
        distances, indices = self._kneighbors(search, queries, k)
        other = groups[indices] != groups[chosen][:, None]
        keep = other & (np.cumsum(other, axis=1) <= self.n_neighbors)  # the first n_neighbors of other groups
        if np.any(keep.sum(axis=1) < self.n_neighbors):
            raise ValueError(f"Too few bank rows outside each training image for n_neighbors={self.n_neighbors}.")
        nearest = indices[np.arange(len(chosen)), np.argmax(other, axis=1)]
        return distances[keep].reshape(len(chosen), self.n_neighbors), nearest

    # -------------------------------------------------------------- search
    def _bank_search(self) -> BankSearch:
        """The fitted bank with its search structures, built on first use (one object per bank)."""
        check_is_fitted(self, "memory_bank_")
        search = self.__dict__.get("_search")
        if search is None or search.bank is not self.memory_bank_:
            with _BANK_LOCK:  # a loaded or unpickled detector: one BankSearch, whichever thread comes first
                search = self.__dict__.get("_search")
                if search is None or search.bank is not self.memory_bank_:
                    search = self._search = BankSearch(self.memory_bank_)
        return search

    def search_algorithm(self, n_queries: int) -> str:
        """The nearest-neighbour search that a call with `n_queries` rows uses.

        The ``algorithm`` parameter, or for ``"auto"`` the rule: exact on a
        GPU, for small calls (< 1e9 multiply-adds) and small banks (< 1e6
        multiply-adds per query, rows x dims); otherwise pynndescent for
        banks of >= 50,000 rows, the bfloat16 shortlist where bfloat16
        products are >= 1.5x faster than float32, and pynndescent where they
        are not (CPUs without AVX512-BF16 or AMX, where exact float32 search
        is the slower one).

        Parameters
        ----------
        n_queries : int
            Rows (patches) searched in one call; a call on image features
            searches ``n_images * h * w`` rows.

        Returns
        -------
        algorithm : {"exact", "bf16", "pynndescent"}

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import PatchCoreDetector
        >>> detector = PatchCoreDetector(device="cpu").fit(np.random.rand(100, 8).astype(np.float32))
        >>> detector.search_algorithm(784)
        'exact'
        """
        return self._choose_algorithm(n_queries, self._bank_search())

    def _choose_algorithm(self, n_queries: int, search: BankSearch) -> str:
        """:meth:`search_algorithm` for the bank of `search` (a bank not yet published, during fit)."""
        if isinstance(n_queries, bool) or not isinstance(n_queries, numbers.Integral) or n_queries < 0:
            raise ValueError(f"n_queries must be a non-negative int, got {n_queries!r}.")
        if self.algorithm != "auto":
            return self.algorithm
        n_bank, n_dims = search.bank.shape
        if (resolve_device(self.device).type == "cuda" or n_queries * n_bank * n_dims < AUTO_SMALL_WORK
                or n_bank * n_dims < AUTO_SMALL_BANK_WORK):
            return "exact"
        if n_bank >= AUTO_NNDESCENT_BANK_ROWS:
            return "pynndescent"
        return "bf16" if bfloat16_speedup() >= AUTO_BF16_MIN_SPEEDUP else "pynndescent"

    def _kneighbors(self, search: BankSearch, queries: np.ndarray, k: int, algorithm: str | None = None,
                    n_candidates: int | None = None):
        algorithm = algorithm or self._choose_algorithm(len(queries), search)
        if algorithm == "bf16":
            return search.shortlist().kneighbors(queries, k)
        if algorithm == "pynndescent":
            return search.nndescent_kneighbors(queries, k, self.random_state, self.n_jobs, n_candidates)
        return search.exact_kneighbors(queries, k, resolve_device(self.device))

    def kneighbors(self, X, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank rows of every row or patch.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)
        n_neighbors : int or None, default=None
            Neighbours per row, at least 1 and at most the bank size; None
            uses the ``n_neighbors`` parameter.

        Returns
        -------
        distances : ndarray of shape (n_rows_or_patches, n_neighbors)
        indices : ndarray of shape (n_rows_or_patches, n_neighbors)
            Row indices into ``memory_bank_``.
        """
        search = self._bank_search()
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        n_bank = search.bank.shape[0]
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral) or not (
            1 <= n_neighbors <= n_bank
        ):
            raise ValueError(
                f"n_neighbors must be an int in [1, {n_bank}] (the memory bank's rows) or None, "
                f"got {n_neighbors!r}."
            )
        rows, _ = validate_features(self, X, reset=False)
        return self._kneighbors(search, rows, int(n_neighbors))

    # ------------------------------------------------------------- scoring
    def _reweight_factors(self, search: BankSearch, queries: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Eq. 7: ``1 - softmax`` weight of the nearest bank row among its neighbours."""
        bank = search.bank
        b = min(self.reweight_neighbors, bank.shape[0])
        bank_neighbors = search.structure(("bank_neighbors", b), lambda: self._kneighbors(search, bank, b)[1])
        support = bank_neighbors[nearest]
        # The nearest row comes first among its own neighbours (distance 0).
        support = np.concatenate([nearest[:, None], support[:, 1:]], axis=1)
        distances = np.linalg.norm(
            bank[support].astype(np.float64) - queries[:, None, :].astype(np.float64), axis=2
        )
        shifted = np.exp(distances - distances.max(axis=1, keepdims=True))
        return 1.0 - shifted[:, 0] / shifted.sum(axis=1)

    def _score(self, X, maps: bool = True, groups=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Anomaly scores (positive) per sample, and patch-score grids for 4-D input.

        ``maps=False``: the grids serve only to find each image's largest
        patch score; `groups` (one label per image of 4-D input): only each
        group's largest patch score is made exact (see
        :meth:`score_and_patch_scores`).
        """
        search = self._bank_search()  # one bank for the whole call, even if partial_fit replaces it meanwhile
        if isinstance(X, np.ndarray) and X.ndim == 4:
            parts = [self._score_rows(search, X[chunk], maps, None if groups is None else groups[chunk])
                     for chunk in self._image_chunks(X, 0)]
            scores, grids = zip(*parts)
            return np.concatenate(scores), np.concatenate(grids)
        return self._score_rows(search, X, maps, groups)

    def _image_chunks(self, X, map_pixels: int):
        """Slices of 4-D features' images, consecutive chunks that fit ``working_memory``.

        The budget holds each chunk's search (:func:`scoring_bytes_per_patch`
        for every patch) and its ``map_pixels``-pixel anomaly maps.
        """
        n_images, height, width = np.shape(X)[:3]
        per_image = height * width * scoring_bytes_per_patch(self.n_neighbors) + 8 * map_pixels
        step = images_per_chunk(per_image, max(1, n_images), self.working_memory)
        if n_images == 0:
            yield slice(0, 0)  # validation names the problem
        for start in range(0, n_images, step):
            yield slice(start, start + step)

    def _score_rows(self, search: BankSearch, X, maps: bool = True,
                    groups=None) -> tuple[np.ndarray, np.ndarray | None]:
        rows, image_index = validate_features(self, X, reset=False)
        algorithm = self._choose_algorithm(len(rows), search)
        if image_index is None:  # rows' scores (2-D input) are the search's own
            distances, indices = self._kneighbors(search, rows, self.n_neighbors, algorithm)
            scores = distances.mean(axis=1).astype(np.float64)
            if self.reweight:
                scores *= self._reweight_factors(search, rows, indices[:, 0])
            return scores, None
        # Images' largest patch scores are made exact below, so image scores alone search more coarsely;
        # maps keep the search's default.
        n_candidates = None
        if not maps:
            n_candidates = (SCORES_ONLY_NNDESCENT_CANDIDATES if groups is None
                            else GROUPED_SCORES_ONLY_NNDESCENT_CANDIDATES)
        n_images, height, width = np.asarray(X).shape[:3]
        # On a GPU exact search stays one batched product over every patch; the sparse grid is for CPUs.
        sparse = not maps and (algorithm != "exact" or resolve_device(self.device).type == "cpu")
        if sparse or algorithm != "exact":
            members = _patches_by_group(np.arange(n_images) if groups is None else np.asarray(groups),
                                        height * width)
            searched = np.zeros(len(rows), dtype=bool)  # searched exactly already
        if sparse:
            distances, indices = self._search_sparse_grid_first(search, rows, (n_images, height, width), members,
                                                                searched, algorithm, n_candidates)
        else:
            distances, indices = self._kneighbors(search, rows, self.n_neighbors, algorithm, n_candidates)
        patch_scores = distances.mean(axis=1)
        if algorithm != "exact":
            self._make_maxima_exact(search, rows, members, patch_scores, distances, indices, searched, algorithm)
        flat = patch_scores.reshape(n_images, height * width)
        top = np.argmax(flat, axis=1)
        scores = flat[np.arange(n_images), top].astype(np.float64)
        if self.reweight:
            top_rows = np.arange(n_images) * height * width + top
            scores *= self._reweight_factors(search, rows[top_rows], indices[top_rows, 0])
        return scores, flat.reshape(n_images, height, width)

    def _search_sparse_grid_first(self, search: BankSearch, rows: np.ndarray, grid_shape: tuple[int, int, int],
                                  members: np.ndarray, searched: np.ndarray, algorithm: str,
                                  n_candidates: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest rows of every patch, for image scores alone: most patches are only bounded.

        The patches on every :data:`SPARSE_GRID_STEP`-th row and column are
        searched first, and each group's largest score among them is made
        exact: a lower bound of the group's maximum. Every other patch is
        measured against the rows found for the (up to four) searched patches
        around it, which bounds its score from above; a patch whose bound is
        at most its group's lower bound cannot raise the maximum and is not
        searched. The others are searched as usual. Neighbouring patches
        mostly share their nearest rows, so few remain.

        Returns the distances and indices of every patch (rows of
        ``rows``): upper bounds as an approximate search gives them;
        ``searched`` marks those made exact.
        """
        n_images, height, width = grid_shape
        n_patches = height * width
        anchors = _sparse_grid_anchors(height, width)
        in_sparse_grid = anchors[:, 0] == np.arange(n_patches)
        image_start = (np.arange(n_images) * n_patches)[:, None]
        first = (image_start + np.flatnonzero(in_sparse_grid)).ravel()
        rest = (image_start + np.flatnonzero(~in_sparse_grid)).ravel()
        distances = np.empty((len(rows), self.n_neighbors), dtype=np.float32)
        indices = np.empty((len(rows), self.n_neighbors), dtype=np.int64)
        self._search_selection(search, rows, first, distances, indices, searched, algorithm, n_candidates)
        first_scores = np.full(len(rows), -np.inf)
        first_scores[first] = distances[first].mean(axis=1)
        if algorithm != "exact":
            self._make_maxima_exact(search, rows, members, first_scores, distances, indices, searched, algorithm)
        group_lower = np.where(members >= 0, first_scores[members], -np.inf).max(axis=1)
        patch_group = np.empty(len(rows), dtype=np.int64)
        patch_group[members[members >= 0]] = np.nonzero(members >= 0)[0]
        lower = group_lower[patch_group[rest]]
        bound = np.full(len(rest), np.inf)
        rest_position = rest % n_patches  # within its image's grid
        for anchor in anchors.T:  # the sparse patches around each patch
            still_open = np.flatnonzero((bound > lower) & (anchor[rest_position] >= 0))
            for block in _selection_blocks(len(still_open), rows.shape[1]):
                chosen = still_open[block]
                patches = rest[chosen]
                anchor_rows = indices[patches - rest_position[chosen] + anchor[rest_position[chosen]]]
                anchor_distances, anchor_indices = search.distances_to_rows(rows[patches], anchor_rows)
                anchor_scores = anchor_distances.mean(axis=1)
                closer = anchor_scores < bound[chosen]
                bound[chosen[closer]] = anchor_scores[closer]
                distances[patches[closer]], indices[patches[closer]] = anchor_distances[closer], anchor_indices[closer]
        self._search_selection(search, rows, rest[bound > lower], distances, indices, searched, algorithm,
                               n_candidates)
        return distances, indices

    def _search_selection(self, search: BankSearch, rows: np.ndarray, selection: np.ndarray, distances: np.ndarray,
                          indices: np.ndarray, searched: np.ndarray, algorithm: str,
                          n_candidates: int | None) -> None:
        """Search ``rows[selection]``, a block at a time, into ``distances`` and ``indices``.

        ``searched`` flags the selection where the search is exact.
        """
        for block in _selection_blocks(len(selection), rows.shape[1]):
            chosen = selection[block]
            distances[chosen], indices[chosen] = self._kneighbors(search, rows[chosen], self.n_neighbors, algorithm,
                                                                  n_candidates)
        if algorithm == "exact":
            searched[selection] = True

    def _make_maxima_exact(self, search: BankSearch, rows: np.ndarray, members: np.ndarray,
                           patch_scores: np.ndarray, distances: np.ndarray, indices: np.ndarray,
                           searched: np.ndarray, algorithm: str) -> None:
        """Give every group of patches exactly the largest patch score that exact search gives.

        An approximate search returns true distances to *some* bank rows, so
        each patch score is an upper bound of the exact one. Each group's
        highest-scoring patches are searched again exactly, except those
        whose bound cannot beat the group's largest exact score so far; once
        that score is at least the highest bound left unchecked, no other
        patch of the group can beat it and its maximum is exact.
        ``members`` (n_groups, width) holds each group's patch positions,
        -1 past its end (see :func:`_patches_by_group`); a patch scored
        ``-inf`` is left out. ``patch_scores``, ``distances``, ``indices``
        and ``searched`` (which patches are exact already; one row per
        patch) are updated in place. After the bfloat16 shortlist, the exact
        search is the shortlist's own, pruned with its PCA lower bound (much
        cheaper than brute force, see docs/archive/benchmarks-notebook.md).
        """
        n_groups, width = members.shape
        pending = np.arange(n_groups)
        n_checked = min(EXACT_MAXIMA_PATCHES, width)
        # Each group's largest exact patch score so far.
        exact_best = np.where((members >= 0) & searched[members], patch_scores[members], -np.inf).max(axis=1)
        while pending.size:
            mine = members[pending]
            bounds = np.where(mine >= 0, patch_scores[mine], -np.inf)
            order = np.argsort(-bounds, axis=1, kind="stable")
            top = order[:, :n_checked]
            chosen = np.take_along_axis(mine, top, axis=1)
            # Searched patches are never chosen again: their exact scores are at most exact_best.
            positions = chosen[np.take_along_axis(bounds, top, axis=1) > exact_best[pending, None]]
            searched[positions] = True
            if algorithm == "bf16":
                exact = search.shortlist().exact_kneighbors(rows[positions], self.n_neighbors,
                                                            distances[positions, -1])
            else:
                exact = self._kneighbors(search, rows[positions], self.n_neighbors, "exact")
            distances[positions], indices[positions] = exact
            patch_scores[positions] = exact[0].mean(axis=1)
            if n_checked == width:
                break
            # Chosen patches left unsearched have bounds at most exact_best, so this maximum stays exact.
            best_checked = np.where(chosen >= 0, patch_scores[chosen], -np.inf).max(axis=1)
            exact_best[pending] = np.maximum(exact_best[pending], best_checked)
            best_unchecked = bounds[np.arange(len(pending)), order[:, n_checked]]
            pending = pending[exact_best[pending] < best_unchecked]
            n_checked = min(2 * n_checked, width)

    @available_if(_no_fit_predict)
    def fit_predict(self, X, y=None):  # pragma: no cover - never available
        """Not available: see :func:`_no_fit_predict`."""

    def score_samples(self, X) -> np.ndarray:
        """Opposite of the anomaly score: higher means more normal.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Minus the PatchCore score (an image's largest patch distance, or
            a row's nearest-neighbour distance).
        """
        return -self._score(X, maps=False)[0]

    def decision_function(self, X) -> np.ndarray:
        """Shifted opposite of the anomaly score: negative for predicted anomalies.

        ``score_samples(X) - offset_``, where ``offset_`` is the threshold
        calibrated at ``fit`` on training images (or rows) scored without
        themselves (see ``contamination``). As with scikit-learn's outlier
        detectors, 0 is the decision boundary and higher means more normal.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)

        Returns
        -------
        decision : ndarray of shape (n_samples,)
            Negative for samples predicted anomalous, zero or positive for
            normal ones.
        """
        return self.score_samples(X) - self.offset_

    def pvalues(self, X) -> np.ndarray:
        """Conformal p-values: how unusual each sample is among the calibration samples.

        The p-value of a sample with anomaly score ``s`` (``-score_samples``)
        is ``(1 + #{c >= s}) / (n + 1)`` over the ``n`` scores ``c`` of
        ``calibration_scores_``, the training images (or rows) scored
        without themselves (see ``contamination``); see
        :func:`~skpatchcore.conformal.conformal_pvalues`.

        A small p-value means the sample is unlikely to be normal: if the new
        sample and the calibration images are exchangeable (drawn alike from
        the normal data), ``P(p <= alpha) <= alpha`` for every ``alpha``, so
        flagging the samples with ``p <= alpha`` flags at most a fraction
        ``alpha`` of normal samples. Calibration images are scored against a
        bank without their own patches, which makes their scores, if
        anything, larger than a new normal image's, and the p-values
        conservative. The smallest possible p-value is ``1 / (n + 1)``
        (about 0.015 with the 64 calibration images of a large training set).

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)

        Returns
        -------
        pvalues : ndarray of shape (n_samples,)
            Values in ``(0, 1]``, non-increasing in the anomaly score.
        """
        return self.pvalues_from_scores(self.score_samples(X))

    def pvalues_from_scores(self, scores) -> np.ndarray:
        """Conformal p-values of samples whose ``score_samples`` are known.

        For scores computed already (``PatchCorePipeline.score_and_maps``):
        ``pvalues(X)`` equals ``pvalues_from_scores(score_samples(X))``.

        Parameters
        ----------
        scores : array-like of shape (n_samples,)
            ``score_samples`` values (higher means more normal).

        Returns
        -------
        pvalues : ndarray of shape (n_samples,)
        """
        check_is_fitted(self, "calibration_scores_")
        return conformal_pvalues(-np.asarray(scores, dtype=np.float64), self.calibration_scores_)

    def predict(self, X) -> np.ndarray:
        """Predict whether each sample is normal (+1) or anomalous (-1).

        A sample is anomalous when its anomaly score exceeds the calibrated
        threshold (``decision_function(X) < 0``). For a threshold of your
        own, compare ``-score_samples(X)`` with it, or flag small
        :meth:`pvalues`.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features) or (n_images, h, w, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            +1 for normal samples, -1 for anomalies.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def patch_scores(self, X) -> np.ndarray:
        """Distance of every patch to the memory bank.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)

        Returns
        -------
        patch_scores : ndarray of shape (n_images, h, w), float32
        """
        _check_four_d(X)
        return self._score(X)[1]

    def score_and_patch_scores(self, X, *, maps: bool = True, groups=None) -> tuple[np.ndarray, np.ndarray]:
        """``score_samples`` and :meth:`patch_scores` from one nearest-neighbour search.

        What a tiled pipeline needs per tile: the image score (with
        ``reweight``, eq. 7 applied to the tile's largest patch) and the
        unsmoothed patch-score grid to stitch.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)
        maps : bool, default=True
            False when the grids serve only to find each image's largest
            patch score, as :meth:`score_samples` needs them: that maximum
            and the image scores are the same either way (exact search's),
            but on a CPU most patches are then bounded by their neighbours'
            nearest rows instead of searched (docs/algorithm.rst, "Image
            scores without maps"), and pynndescent's search tracks fewer
            candidates, so the other patch scores may be larger than with
            ``maps=True``.
        groups : array-like of shape (n_images,), default=None
            The larger image that each of ``X``'s images belongs to, such as
            a tiled pipeline's tiles: only the largest patch score of each
            group is then made exact after an approximate search (one
            certification per group instead of per image). The image that
            holds it gets its exact score; the group's other images may get
            lower ``score_samples`` (larger patch scores) than exact search
            gives. None: each image is its own group.

        Returns
        -------
        score_samples : ndarray of shape (n_images,)
            Higher means more normal.
        patch_scores : ndarray of shape (n_images, h, w), float32
            Higher means more anomalous.
        """
        _check_four_d(X)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (len(X),):
                raise ValueError(f"groups must hold one label per image of X ({len(X)}), "
                                 f"got an array of shape {groups.shape}.")
        scores, grids = self._score(X, maps, groups)
        return -scores, grids

    def anomaly_maps(self, X, output_size) -> np.ndarray:
        """Pixel anomaly maps: patch scores upsampled and smoothed.

        As the official code: bilinear upsampling of the patch-score grid to
        ``output_size``, then a Gaussian filter with sigma ``map_sigma``
        pixels (4 by default).

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)
        output_size : int or (int, int)
            Map size, normally the backbone input size
            (``PatchFeatureTransformer.input_size_``).

        Returns
        -------
        maps : ndarray of shape (n_images, H, W), float32
        """
        return self.score_and_maps(X, output_size)[1]

    def score_and_maps(self, X, output_size) -> tuple[np.ndarray, np.ndarray]:
        """``score_samples`` and ``anomaly_maps`` from one nearest-neighbour search.

        Mind the signs: the two outputs point in opposite directions, each
        following its own convention. The image scores are scikit-learn's
        ``score_samples``, **higher means more normal** (minus the PatchCore
        anomaly score); the maps are PatchCore's anomaly maps, **higher means
        more anomalous**. ``-score_samples`` is the anomaly score to pass to
        metrics such as :func:`~skpatchcore.evaluation.metrics.image_auroc`.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, n_features)
        output_size : int or (int, int)
            Map size (see :meth:`anomaly_maps`).

        Returns
        -------
        score_samples : ndarray of shape (n_images,)
            Higher means more normal.
        maps : ndarray of shape (n_images, H, W), float32
            Higher means more anomalous.
        """
        _check_four_d(X)
        search = self._bank_search()
        size = _map_size(output_size)
        scores, maps = [], []
        for chunk in self._image_chunks(X, size[0] * size[1]):
            chunk_scores, grids = self._score_rows(search, X[chunk])
            scores.append(-chunk_scores)
            maps.append(upsample_patch_scores(grids, size, self.map_sigma))
        return np.concatenate(scores), np.concatenate(maps)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_search", None)  # search structures are rebuilt on first use
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags


def _check_four_d(X) -> None:
    if np.ndim(X) != 4:
        raise ValueError(
            "Patch scores and anomaly maps need image features of shape "
            f"(n_images, h, w, n_features); got an array with {np.ndim(X)} dimensions."
        )


def _patches_by_group(groups: np.ndarray, n_patches: int) -> np.ndarray:
    """Patch positions of each group of images, one row per group, -1 past a group's end.

    Image ``i``'s patches are positions ``i * n_patches`` to
    ``(i + 1) * n_patches - 1`` of the flattened features; groups are
    numbered in order of their labels.
    """
    _, group, counts = np.unique(groups, return_inverse=True, return_counts=True)
    by_group = np.argsort(group, kind="stable")
    slot = np.arange(len(groups)) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.full((len(counts), counts.max(), n_patches), -1, dtype=np.int64)
    members[group[by_group], slot] = by_group[:, None] * n_patches + np.arange(n_patches)
    return members.reshape(len(counts), -1)


def scoring_bytes_per_patch(n_neighbors: int) -> int:
    """Bytes that scoring holds per patch besides its features.

    The search's distances and indices (12 bytes a neighbour), the patch
    score, and the bookkeeping of the sparse search and of the maxima's
    certification (positions, bounds and flags: :data:`SCORING_BOOKKEEPING_BYTES`).
    """
    return 12 * n_neighbors + 4 + SCORING_BOOKKEEPING_BYTES


def _selection_blocks(n_selected: int, n_dims: int):
    """Slices of a selection of rows, each copying at most :data:`SELECTION_BLOCK_ENTRIES` values."""
    step = max(1, SELECTION_BLOCK_ENTRIES // n_dims)
    return (slice(start, start + step) for start in range(0, n_selected, step))


def _sparse_grid_anchors(height: int, width: int) -> np.ndarray:
    """The sparse grid's patches around each patch of a ``height`` x ``width`` grid.

    The sparse grid holds the patches on every :data:`SPARSE_GRID_STEP`-th
    row and column, from the first. Returns an array of shape
    ``(height * width, 4)``: the flat positions of the sparse patches at
    the corners of the cell that holds each patch, -1 where a corner
    repeats an earlier one. A sparse patch is its own first corner.
    """
    step = SPARSE_GRID_STEP
    row, column = np.divmod(np.arange(height * width), width)
    corners = []
    for low, size in ((row, height), (column, width)):
        start = low - low % step
        end = np.where(low % step, np.minimum(start + step, (size - 1) - (size - 1) % step), start)
        corners.append((start, end))
    (top, bottom), (left, right) = corners
    anchors = np.stack([top * width + left, bottom * width + left, top * width + right, bottom * width + right],
                       axis=1)
    for k in range(1, 4):
        anchors[(anchors[:, :k] == anchors[:, k : k + 1]).any(axis=1), k] = -1
    return anchors


def upsample_patch_scores(grids: np.ndarray, output_size, sigma: float = MAP_SIGMA) -> np.ndarray:
    """Bilinear upsampling to ``output_size`` and Gaussian smoothing.

    Parameters
    ----------
    grids : ndarray of shape (n_images, h, w)
    output_size : int or (int, int)
    sigma : float, default=4.0
        Standard deviation of the Gaussian filter in output pixels; 0 for none.

    Returns
    -------
    maps : ndarray of shape (n_images, H, W), float32
    """
    size = _map_size(output_size)
    with torch.inference_mode():
        upsampled = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))[:, None],
            size=size,
            mode="bilinear",
            align_corners=False,
        )[:, 0].numpy()
    if sigma == 0:
        return upsampled.astype(np.float32, copy=False)
    return np.stack([gaussian_filter(grid, sigma=sigma) for grid in upsampled]).astype(np.float32)


def _map_size(output_size) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair."""
    if isinstance(output_size, numbers.Integral):
        return int(output_size), int(output_size)
    height, width = output_size
    return int(height), int(width)


def _rows_and_images(estimator, X, reset: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated rows and each row's source image (4-D input or :class:`PatchRows`), else None."""
    image_index = getattr(X, "image_index", None) if isinstance(X, PatchRows) else None
    rows, pooled_index = validate_features(estimator, X, reset=reset)
    return rows, (pooled_index if pooled_index is not None else image_index)


def _check_magnitude(rows: np.ndarray) -> None:
    """Refuse bank values whose float32 distances would overflow to infinity.

    Squared distances between rows of ``d`` features whose values reach
    ``m`` reach ``4 d m^2``; above the float32 range the threshold would
    become infinite and every sample would pass as normal.
    """
    n_features = max(1, rows.shape[1])
    limit = float(np.sqrt(np.finfo(np.float32).max / (4.0 * n_features)))
    largest = float(np.max(np.abs(rows))) if rows.size else 0.0
    if largest > limit:
        raise ValueError(
            f"Feature values reach {largest:.3g}; distances between rows of {n_features} such features "
            f"overflow float32 (values must stay below about {limit:.2g}). Scale the data first, "
            "e.g. with sklearn.preprocessing.StandardScaler in a pipeline."
        )
