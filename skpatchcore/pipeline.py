"""The PatchCore pipeline, a normal-only CV splitter and an AUROC scorer."""

from __future__ import annotations

import copy
import tempfile

import numpy as np
from sklearn.base import _fit_context
from sklearn.pipeline import Pipeline
from sklearn.utils import _safe_indexing
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._budget import check_disk, check_memory, images_per_chunk, resolve_working_memory
from ._doc_link import DocLinkMixin
from ._maps import resize_map
from ._param_constraints import N_JOBS, WORKING_MEMORY
from ._random_seeds import int_seeds
from ._threads import torch_threads
from ._union import SpilledUnion
from .coreset import ALLOCATION_HEADROOM, ChunkCoreset, CoresetSampler
from .detector import PatchCoreDetector, scoring_bytes_per_patch
from .features import PatchFeatureTransformer
from .io.images import as_image_list, image_size
from .tiling import MapStitcher, number_by_image


def _check_chunkable(pipeline) -> bool:
    """``partial_fit`` is there for the steps features -> coreset -> detector only."""
    if not pipeline._chunkable():
        raise AttributeError(
            "partial_fit needs the steps PatchFeatureTransformer -> CoresetSampler -> PatchCoreDetector "
            "(as make_patchcore builds them)."
        )
    return True


class PatchCorePipeline(DocLinkMixin, Pipeline):
    """A scikit-learn ``Pipeline`` with PatchCore's pixel-level outputs, in bounded memory.

    PatchCore [1]_ as one estimator: images in; image scores, pixel anomaly
    maps and calibrated decisions out.

    Everything a ``Pipeline`` does works unchanged (``score_samples``,
    ``decision_function``, ``predict``, ``GridSearchCV``, ``joblib``). Added:
    :meth:`anomaly_maps`, :meth:`score_and_maps` and
    :meth:`iter_score_and_maps` (one backbone pass for scores and maps),
    :meth:`pvalues` (conformal p-values) and :meth:`partial_fit`. The first
    step must produce patch features (a
    :class:`PatchFeatureTransformer`), the last must be a
    :class:`PatchCoreDetector`; with a :class:`CoresetSampler` between them
    the fit runs in bounded memory.

    Memory is a budget, not a function of the number of images. Images are
    scored in chunks whose features and maps fit in ``working_memory``. Fit
    extracts features chunk by chunk, reduces each chunk with the greedy
    coreset, keeps the union of the chunk coresets on disk (only their
    projections in memory) and merges it (:meth:`CoresetSampler.merge`);
    when all the features fit in the budget, the sampler selects among them
    all at once: one greedy pass over everything, as the official code does,
    or, for large selections under its ``strategy="auto"``, chunk coresets
    computed in threads and merged the same way. Beyond the budget only the
    memory bank grows (``sampling_ratio`` of the patches).

    ``fit(X, y)`` learns from normal samples only: when labels are given,
    samples with ``y != 0`` are left out. This keeps the memory bank clean
    when ``GridSearchCV`` refits the best model on a labelled set.

    Parameters
    ----------
    steps : list of (str, estimator)
        As ``sklearn.pipeline.Pipeline``.
    memory, verbose, transform_input
        As ``sklearn.pipeline.Pipeline`` (a ``memory`` cache makes fit take
        the plain ``Pipeline`` route, without chunks).
    working_memory : float or None, default=None
        Memory budget in MiB for the arrays that grow with the number of
        images (patch features, chunk coresets before selection, maps).
        None uses scikit-learn's setting (``sklearn.set_config(working_memory=...)``,
        1024 MiB unless changed), as ``IsolationForest`` does.
    n_jobs : int or None, default=None
        torch threads for feature extraction and search (scikit-learn
        style: -1 all cores). None leaves torch's setting; on Dask workers
        None means the worker's share of its machine's cores.
    scheduler : str or None, default=None
        Address of a Dask scheduler (``"tcp://host:8786"``, or a
        ``LocalCluster``'s ``scheduler_address``): fit and scoring of image
        lists then run on its workers (extra ``skpatchcore[dask]``; see
        :mod:`skpatchcore.distributed`). None runs in this process. Dask
        collections (``dask.bag``, a ``dask.dataframe`` column of paths) are
        scored lazily on the current Dask scheduler whatever this is.

    See Also
    --------
    make_patchcore : Builds this pipeline with PatchCore's three steps.
    PatchCoreDetector : The last step: memory bank, scores, threshold.
    sklearn.neighbors.LocalOutlierFactor : A nearest-neighbour novelty
        detector for tabular data (``novelty=True``).
    sklearn.ensemble.IsolationForest : A tree-based outlier detector for
        tabular data.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
       https://arxiv.org/abs/2106.08265

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> model = make_patchcore(backbone="resnet18", weights=None, sampling_ratio=0.01)
    >>> type(model).__name__, [name for name, _ in model.steps]
    ('PatchCorePipeline', ['features', 'coreset', 'detector'])
    """

    _parameter_constraints: dict = {
        **Pipeline._parameter_constraints,
        "working_memory": WORKING_MEMORY,
        "n_jobs": N_JOBS,
        "scheduler": [str, None],
    }

    def __init__(self, steps, *, transform_input=None, memory=None, verbose=False,
                 working_memory=None, n_jobs=None, scheduler=None):
        super().__init__(steps, transform_input=transform_input, memory=memory, verbose=verbose)
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.scheduler = scheduler

    # ------------------------------------------------------------------ fit
    # prefer_skip_nested_validation=False: each step validates its own parameters when it is fitted.
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, **params):
        """Fit on the normal samples of ``X`` (all of them when ``y`` is None).

        Parameters
        ----------
        X : images
            As accepted by :class:`PatchFeatureTransformer`.
        y : array-like of shape (n_samples,), default=None
            0 for normal, anything else for anomalous; anomalous samples are
            not used.
        **params
            Passed to ``Pipeline.fit`` (which then fits without chunks).

        Returns
        -------
        self : PatchCorePipeline
        """
        X, y = _normal_samples(X, y)
        if params or self.memory is not None or not self._chunkable():
            if _is_tiled(self.steps[0][1]):
                raise ValueError(
                    "A tiled PatchFeatureTransformer (tile_size set) needs the pipeline's own fit: the steps "
                    "features -> coreset -> detector, no memory cache and no fit parameters."
                )
            with torch_threads(self.n_jobs):
                return super().fit(X, y, **params)
        images = as_image_list(X)
        features, sampler, detector = (step for _, step in self.steps)
        with torch_threads(self.n_jobs):
            features.fit()
            counts = self._tile_counts(images)
            n_inputs = len(images) if counts is None else int(counts.sum())
            chunk = self._fit_chunk(n_inputs)
            self._check_fit_memory(n_inputs, chunk)
            if chunk >= n_inputs and self.scheduler is None:
                # Everything fits in the budget: the sampler's strategy (one greedy pass, or chunks in threads).
                bank = sampler.fit_transform(features.transform(images))
                if counts is not None:  # tiles -> their images, so calibration leaves whole images out
                    bank.image_index = np.repeat(np.arange(len(images)), counts)[bank.image_index]
            else:
                sampler.begin_chunks()
                bank = self._chunked_bank(images, chunk, first_image=0, first_tile=None if counts is None else 0)
            detector.fit(bank)
        return self

    def _tile_counts(self, images: list) -> np.ndarray | None:
        """Tiles of every image for a tiled transformer (read from the images' sizes), else None."""
        features = self.steps[0][1]
        if not _is_tiled(features):
            return None
        return np.array([features.tile_layout(image).n_tiles for image in images], dtype=np.int64)

    @available_if(_check_chunkable)
    @_fit_context(prefer_skip_nested_validation=False)
    def partial_fit(self, X, y=None):
        """Add normal images to a fitted model without re-reading the old ones.

        The new images' chunk coresets are merged with the current memory
        bank (:meth:`CoresetSampler.merge`; the bank's rows compete by the
        radii they were selected with), keeping ``sampling_ratio`` of all
        patches seen, and the threshold is recalibrated. An unfitted
        pipeline is fitted.

        Parameters
        ----------
        X : images
            As accepted by :class:`PatchFeatureTransformer`.
        y : array-like of shape (n_samples,), default=None
            0 for normal; other samples are left out.

        Returns
        -------
        self : PatchCorePipeline
        """
        features, sampler, detector = (step for _, step in self.steps)
        if not hasattr(detector, "memory_bank_"):
            return self.fit(X, y)
        check_is_fitted(sampler, "n_rows_seen_")
        if detector.bank_image_index_ is None or sampler.n_images_seen_ is None:
            raise ValueError("partial_fit adds images to a model fitted on images; this one was fitted on rows.")
        X, y = _normal_samples(X, y)
        images = as_image_list(X)
        current = ChunkCoreset(
            rows=detector.memory_bank_, image_index=detector.bank_image_index_,
            row_index=np.asarray(sampler.coreset_indices_), n_rows=sampler.n_rows_seen_,
            n_images=sampler.n_images_seen_, radius=sampler.coverage_radius_, radii=_bank_radii(sampler),
        )
        with torch_threads(self.n_jobs):
            counts = self._tile_counts(images)
            if counts is None:
                chunk = self._fit_chunk(len(images))
                bank = self._chunked_bank(images, chunk, sampler.n_images_seen_, held=[current])
            else:  # the coreset numbers tiles, the bank's image index numbers images
                chunk = self._fit_chunk(int(counts.sum()))
                first_image = int(detector.bank_image_index_.max()) + 1
                bank = self._chunked_bank(images, chunk, first_image, held=[current], first_tile=sampler.n_images_seen_)
            detector.fit(bank)
        return self

    def _chunkable(self) -> bool:
        """Whether the steps are features -> coreset -> detector (the chunked fit's structure)."""
        kinds = (PatchFeatureTransformer, CoresetSampler, PatchCoreDetector)
        steps = self.steps if isinstance(self.steps, (list, tuple)) else []  # fit's validation names a bad value
        return len(steps) == 3 and all(isinstance(step, kind) for (_, step), kind in zip(steps, kinds))

    def _fit_chunk(self, n_images: int) -> int:
        """Images per fit chunk: as few chunks as the budget allows, the remainder spread over them.

        A chunk's greedy order costs its rows times its picks, so two chunks
        of 381 images cost about half of one of 747 and one of 15.
        """
        fitting = images_per_chunk(self._fit_bytes_per_image(), n_images, self.working_memory)
        n_chunks = -(-max(1, n_images) // fitting)
        return -(-max(1, n_images) // n_chunks)

    def _fit_bytes_per_image(self) -> int:
        """Features, their projection, the greedy state and the picked copy of one image."""
        height, width, n_dims = self.steps[0][1].feature_shape_
        sampler = self.steps[1][1]
        projected = n_dims if sampler.projection_dim is None else min(n_dims, sampler.projection_dim)
        picked = min(1.0, ALLOCATION_HEADROOM * sampler.chunk_ratio())
        return int(height * width * (4 * n_dims * (1 + picked) + 4 * projected + 32))

    def _check_fit_memory(self, n_images: int, chunk: int) -> None:
        """Refuse at once a fit whose memory or temporary disk space cannot be had."""
        height, width, n_dims = self.steps[0][1].feature_shape_
        sampler = self.steps[1][1]
        n_rows = n_images * height * width
        projected = n_dims if sampler.projection_dim is None else min(n_dims, sampler.projection_dim)
        union_rows = int(n_rows * sampler.chunk_ratio())
        bank_bytes = int(n_rows * sampler.sampling_ratio) * n_dims * 4
        # The chunk's work, the union's projections and bookkeeping, the bank and the detector's copy.
        needed = min(chunk, n_images) * self._fit_bytes_per_image() + union_rows * (4 * projected + 24) + 2 * bank_bytes
        what = (f"Fitting {n_images} images ({min(chunk, n_images)} at a time, working_memory="
                f"{resolve_working_memory(self.working_memory):g} MiB)")
        check_memory(needed, what)
        if chunk < n_images or self.scheduler is not None:
            check_disk(union_rows * n_dims * 4, tempfile.gettempdir(), what)

    def _chunked_bank(self, images: list, chunk: int, first_image: int, held=(), first_tile: int | None = None):
        """The chunk coresets of `images` (in this process or on Dask) merged with `held` into a bank.

        The union of the chunk coresets is collected as they arrive in a
        :class:`~skpatchcore._union.SpilledUnion` (full rows on disk), whose
        folder is removed when the merge is done or the fit fails. With a
        tiled transformer, `chunk` counts tiles, the coreset numbers the
        tiles from `first_tile` on, and every part's ``image_index`` is
        turned into its tiles' image numbers (from `first_image` on).
        """
        features, sampler = self.steps[0][1], self.steps[1][1]
        height, width, _ = features.feature_shape_
        counts = self._tile_counts(images)
        n_inputs = len(images) if counts is None else int(counts.sum())
        n_rows_total = sum(part.n_rows for part in held) + n_inputs * height * width
        with SpilledUnion(sampler, n_rows_total, held) as union:
            if self.scheduler is not None:
                from .distributed import chunk_coresets

                if counts is not None:  # tasks take whole images: as many as the tile budget allows
                    chunk = max(1, chunk // max(1, int(counts.max(initial=1))))
                chunk_coresets(self.scheduler, features, sampler, images, chunk, first_image, self.n_jobs, union,
                               first_tile=first_tile)
            elif counts is not None:
                start = first_tile
                for tile_image, _, tile_features in features.iter_tiles(images, chunk):
                    for part in sampler.chunk_coresets(tile_features, start):
                        union.add(number_by_image(part, tile_image, start, first_image))
                    start += len(tile_features)
            else:
                for start in range(0, len(images), chunk):
                    for part in sampler.chunk_coresets(features.transform(images[start:start + chunk]),
                                                       first_image + start):
                        union.add(part)
            return sampler.merge(union.parts)

    # -------------------------------------------------------------- scoring
    def _features_and_detector(self):
        check_is_fitted(self)
        first = image_features_step(self)
        if first is None:
            raise TypeError(
                "This pipeline does not score images: its first step must be a fitted PatchFeatureTransformer "
                "and its last step a PatchCoreDetector."
            )
        return first, self.steps[-1][1]

    def _score_chunk(self) -> int:
        """Images per scoring chunk: features, search results and maps in the budget."""
        first, detector = self._features_and_detector()
        height, width, n_dims = first.feature_shape_
        map_height, map_width = first.input_size_
        per_patch = 4 * n_dims + scoring_bytes_per_patch(detector.n_neighbors)
        per_image = height * width * per_patch + 8 * map_height * map_width
        return images_per_chunk(per_image, 1 << 62, self.working_memory)

    def _tiled_score_chunks(self, images: list) -> tuple[int, int]:
        """Images per scoring chunk and tiles per feature chunk of a tiled model.

        The maps of a chunk's images (at their own size) and one image's
        pixels come first out of ``working_memory``; the tiles' features and
        search results get the rest.
        """
        first, detector = self._features_and_detector()
        layouts = [first.tile_layout(image) for image in images]
        # The stitching canvas becomes the map in place; a tile_scale != 1 resizes it into a second array.
        largest = max((int(np.prod(layout.padded_size))
                       + (int(np.prod(layout.image_size)) if layout.scaled_size != layout.image_size else 0)
                       for layout in layouts), default=1)
        budget = resolve_working_memory(self.working_memory)
        map_chunk = images_per_chunk(4 * largest, max(1, len(images)), budget / 2)
        pixels = 3 * max((int(np.prod(layout.scaled_size)) for layout in layouts), default=1)
        left = budget - (map_chunk * 4 * largest + pixels) / 2**20
        height, width, n_dims = first.feature_shape_
        per_tile = height * width * (4 * n_dims + scoring_bytes_per_patch(detector.n_neighbors))
        if left * 2**20 < per_tile:
            raise ValueError(
                f"working_memory={budget:g} MiB cannot hold the map and pixels of the largest image "
                f"({layouts[int(np.argmax([np.prod(layout.image_size) for layout in layouts]))].image_size}) "
                f"and one tile's features; raise working_memory or score without maps."
            )
        return map_chunk, images_per_chunk(per_tile, 1 << 62, left)

    def iter_score_and_maps(self, X, original_size: bool = False, maps: bool = True):
        """Score images chunk by chunk: yield ``(indices, score_samples, maps)``.

        Memory stays within ``working_memory`` however many images are
        scored, since each chunk's maps can be used (written to files) and
        dropped before the next chunk. :meth:`score_and_maps`,
        ``score_samples``, ``decision_function`` and ``predict`` are built on
        it, and so are the command line and the benchmarks.

        Parameters
        ----------
        X : images
            As accepted by :class:`PatchFeatureTransformer`.
        original_size : bool, default=False
            See :meth:`score_and_maps`.
        maps : bool, default=True
            False skips the maps (yields ``None``), as ``score_samples`` does.

        Yields
        ------
        indices : range
            Positions in ``X`` of the chunk's images.
        score_samples : ndarray of shape (n_chunk,)
            Higher means more normal.
        maps : ndarray of shape (n_chunk, H, W), list of ndarray, or None
        """
        first, _ = self._features_and_detector()
        if original_size and first.crop_size_ is not None:
            raise ValueError(
                "original_size=True needs crop_size=None: a centre-cropped map does not "
                "cover the whole original image."
            )
        images = as_image_list(X)
        chunk = self._score_chunk() if not _is_tiled(first) else self._tiled_score_chunks(images)[0]
        if self.scheduler is not None:
            from .distributed import score_chunks

            results = score_chunks(self.scheduler, self, images, chunk, maps, original_size, self.n_jobs)
        else:
            results = (
                score_chunk(self, images[start:start + chunk], maps, original_size)
                for start in range(0, len(images), chunk)
            )
        for start, (scores, chunk_maps) in zip(range(0, len(images), chunk), results):
            yield range(start, min(start + chunk, len(images))), scores, chunk_maps

    def score_and_maps(self, X, original_size: bool = False) -> tuple[np.ndarray, list | np.ndarray]:
        """Image scores and pixel anomaly maps with a single backbone pass.

        Parameters
        ----------
        X : images
            As accepted by :class:`PatchFeatureTransformer`.
        original_size : bool, default=False
            ``False``: maps at the backbone input size (after resize and crop),
            as the official code evaluates them. ``True``: each map is
            resized (bilinear) to its image's original size; only meaningful
            without a centre crop (``crop_size=None``). A tiled model
            (``tile_size`` set) stitches every map at its image's own size
            either way; ``False`` then stacks them, which needs images of
            one size.

        Returns
        -------
        score_samples : ndarray of shape (n_images,)
            Higher means more normal (minus the anomaly score), as
            scikit-learn's ``score_samples``.
        maps : ndarray of shape (n_images, H, W) or list of ndarray
            Anomaly maps, **higher means more anomalous**: the opposite
            direction of the scores next to them; a list when
            ``original_size=True``. They grow with the number of images:
            for many images use :meth:`iter_score_and_maps`.
        """
        scores, maps = [], []
        for _, chunk_scores, chunk_maps in self.iter_score_and_maps(X, original_size=original_size):
            scores.append(chunk_scores)
            maps.extend(chunk_maps) if original_size else maps.append(chunk_maps)
        return np.concatenate(scores), (maps if original_size else np.concatenate(maps))

    def anomaly_maps(self, X, original_size: bool = False):
        """Pixel anomaly maps (higher means more anomalous); see :meth:`score_and_maps`."""
        return self.score_and_maps(X, original_size=original_size)[1]

    def score_samples(self, X):
        """Opposite of the anomaly score (higher means more normal), in chunks of images.

        Parameters
        ----------
        X : images, or a Dask collection of image paths
            A ``dask.bag`` or ``dask.dataframe`` column gives a lazy result
            of the same kind (see :mod:`skpatchcore.distributed`).

        Returns
        -------
        scores : ndarray of shape (n_images,)
        """
        if _is_dask_collection(X):
            from .distributed import score_collection

            return score_collection(self, X, "score_samples")
        if image_features_step(self) is None:
            return super().score_samples(X)
        parts = [scores for _, scores, _ in self.iter_score_and_maps(X, maps=False)]
        return np.concatenate(parts)

    def decision_function(self, X):
        """Shifted opposite of the anomaly score: negative for predicted anomalies.

        ``score_samples(X) - offset_`` of the last step (a
        :class:`PatchCoreDetector`, whose threshold ``offset_`` was
        calibrated at ``fit``); images are scored in chunks, as by
        :meth:`score_samples`.

        Parameters
        ----------
        X : images, rows for a pipeline of tabular steps, or a Dask collection of image paths
            A Dask collection gives a lazy result of the same kind.

        Returns
        -------
        decision : ndarray of shape (n_samples,)
            Negative for samples predicted anomalous.
        """
        if _is_dask_collection(X):
            from .distributed import score_collection

            return score_collection(self, X, "decision_function")
        if image_features_step(self) is None:
            return super().decision_function(X)
        return self.score_samples(X) - self.steps[-1][1].offset_

    def predict(self, X, **params):
        """Predict whether each sample is normal (+1) or anomalous (-1).

        A sample is anomalous when ``decision_function(X) < 0``: its
        anomaly score exceeds the threshold calibrated at ``fit``.

        Parameters
        ----------
        X : images, rows for a pipeline of tabular steps, or a Dask collection of image paths
            A Dask collection gives a lazy result of the same kind.
        **params
            Passed to ``Pipeline.predict`` (which then predicts without
            chunks).

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            +1 for normal samples, -1 for anomalies.
        """
        if _is_dask_collection(X):
            from .distributed import score_collection

            return score_collection(self, X, "predict")
        if params or image_features_step(self) is None:
            return super().predict(X, **params)
        return np.where(self.decision_function(X) < 0, -1, 1)

    def pvalues(self, X) -> np.ndarray:
        """Conformal p-values of the samples (small: unlikely to be normal).

        ``score_samples`` compared with the detector's held-out calibration
        scores; see :meth:`PatchCoreDetector.pvalues` for the formula and
        when it is valid.

        Parameters
        ----------
        X : images, or rows for a pipeline of tabular steps

        Returns
        -------
        pvalues : ndarray of shape (n_samples,)
            Values in ``(0, 1]``.
        """
        detector = self.steps[-1][1]
        if not isinstance(detector, PatchCoreDetector):
            raise TypeError("pvalues needs a PatchCoreDetector as the last pipeline step.")
        return detector.pvalues_from_scores(self.score_samples(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        first = self.steps[0][1] if self.steps else None
        if isinstance(first, PatchFeatureTransformer):
            # Images in, like the first step (Pipeline copies only its pairwise/sparse tags).
            tags.input_tags = copy.deepcopy(first.__sklearn_tags__().input_tags)
        return tags


def image_features_step(model) -> PatchFeatureTransformer | None:
    """The feature step of a fitted model that scores images, or None for any other model.

    The one test of "does this model score images?" (the pipeline's
    scoring methods, :func:`~skpatchcore.evaluation.results.results_frame` and the
    displays use it): `model` is a ``Pipeline`` whose first step was fitted
    on images (it has ``input_size_``, as a fitted
    :class:`PatchFeatureTransformer` has) and whose last step is a
    :class:`PatchCoreDetector`. Pipelines of tabular steps, detectors and
    unfitted pipelines give None.

    Parameters
    ----------
    model : estimator

    Returns
    -------
    features : PatchFeatureTransformer or None
    """
    if not isinstance(model, Pipeline) or not model.steps:
        return None
    first, last = model.steps[0][1], model.steps[-1][1]
    return first if isinstance(last, PatchCoreDetector) and hasattr(first, "input_size_") else None


def score_chunk(model: PatchCorePipeline, images: list, with_maps: bool, original_size: bool):
    """Scores (and maps) of one chunk of images: one backbone pass, one search.

    The unit of work of :meth:`PatchCorePipeline.iter_score_and_maps`, run in
    this process or on a Dask worker.

    Returns
    -------
    score_samples : ndarray of shape (n_images,)
    maps : ndarray, list of ndarray or None
    """
    first, detector = model._features_and_detector()
    if _is_tiled(first):
        return score_tiles(model, images, with_maps, original_size)
    with torch_threads(model.n_jobs):
        features = images
        for _, _, transformer in model._iter(with_final=False):
            features = transformer.transform(features)
        if not with_maps:
            return detector.score_samples(features), None
        scores, maps = detector.score_and_maps(features, first.input_size_)
    if original_size:
        upright = getattr(first, "exif_transpose", True)
        maps = [resize_map(m, image_size(image, upright)) for m, image in zip(maps, images)]
    return scores, maps


def score_tiles(model: PatchCorePipeline, images: list, with_maps: bool, original_size: bool = True):
    """Scores (and stitched maps) of images seen by a tiled transformer.

    Every tile is scored as an untiled image would be; an image's score is
    that of its tile holding its most anomalous patch (the paper's max over
    patches, eq. 6, over all its tiles; with ``reweight``, eq. 7 on that
    patch), and its map is stitched from its tiles' patch scores at its own
    size (:class:`~skpatchcore.tiling.MapStitcher`). Tiles are scored a
    chunk at a time, so memory holds one chunk's features, the pixels of one
    image and the maps of `images` (see ``_tiled_score_chunks``).

    Returns
    -------
    score_samples : ndarray of shape (n_images,)
    maps : list of ndarray, ndarray of shape (n_images, H, W), or None
        A list when ``original_size``; else stacked, which needs images of
        one size.
    """
    first, detector = model._features_and_detector()
    middle = [step for _, _, step in model._iter(with_final=False)][1:]
    n_images = len(images)
    if with_maps and not original_size and len({image_size(image, first.exif_transpose) for image in images}) > 1:
        raise ValueError("A tiled model's maps are at each image's own size and these images differ in size: "
                         "pass original_size=True to get a list of maps.")
    anomaly, best_patch = np.full(n_images, -np.inf), np.full(n_images, -np.inf)
    stitchers, maps = {}, [None] * n_images
    with torch_threads(model.n_jobs):
        _, tile_chunk = model._tiled_score_chunks(images)
        for tile_image, origins, features in first.iter_tiles(images, tile_chunk):
            for step in middle:
                features = step.transform(features)
            # Scores alone need each image's maximum exact, not each tile's; maps keep every tile's.
            scores, grids = detector.score_and_patch_scores(features, maps=with_maps,
                                                            groups=None if with_maps else tile_image)
            patch_max = grids.reshape(len(grids), -1).max(axis=1)
            for index in np.unique(tile_image):
                mine = np.flatnonzero(tile_image == index)
                top = mine[np.argmax(patch_max[mine])]
                if patch_max[top] > best_patch[index]:
                    best_patch[index], anomaly[index] = patch_max[top], -scores[top]
                if with_maps:
                    if index not in stitchers:
                        stitchers[index] = MapStitcher(first.tile_layout(images[index]), detector.map_sigma)
                    stitchers[index].add(grids[mine], origins[mine])
            for index in [i for i in stitchers if i < tile_image[-1]]:  # every tile of these is in
                maps[index] = stitchers.pop(index).result()
        for index in list(stitchers):
            maps[index] = stitchers.pop(index).result()
    if not with_maps:
        return -anomaly, None
    return -anomaly, (maps if original_size else np.stack(maps))



def _bank_radii(sampler: CoresetSampler) -> np.ndarray | None:
    """The bank's radii for ``partial_fit``'s radius merge; None keeps the bank whole (greedy merge)."""
    radii = getattr(sampler, "coreset_radii_", None)  # absent in models saved before it existed
    if sampler.merge_method != "radius" or radii is None or len(radii) != len(sampler.coreset_indices_):
        return None
    return radii


def _normal_samples(X, y):
    """``X`` and ``y`` without the samples whose label is not 0."""
    if y is None:
        return X, y
    labels = np.asarray(y)
    # Arrays and DataFrames (tabular steps) are indexed as they are; other collections are image lists.
    samples = X if isinstance(X, np.ndarray) or hasattr(X, "iloc") else as_image_list(X)
    if labels.shape != (len(samples),):
        raise ValueError(f"y has shape {labels.shape}; expected ({len(samples)},), one label per image.")
    normal = np.flatnonzero(labels == 0)
    if normal.size == 0:
        raise ValueError("y marks every sample as anomalous (y != 0); PatchCore fits on normal samples.")
    return _safe_indexing(samples, normal), labels[normal]


def _is_dask_collection(X) -> bool:
    return hasattr(X, "__dask_graph__")


def make_patchcore(
    backbone="wide_resnet50_2",
    layers=("layer2", "layer3"),
    weights="IMAGENET1K_V1",
    sampling_ratio: float = 0.1,
    n_neighbors: int = 1,
    random_state=None,
    device: str = "auto",
    progress: bool = False,
    working_memory: float | None = None,
    n_jobs: int | None = None,
    scheduler: str | None = None,
    **feature_params,
) -> PatchCorePipeline:
    """Build the PatchCore pipeline: features -> coreset -> detector.

    Parameters
    ----------
    backbone, layers, weights
        See :class:`PatchFeatureTransformer`.
    sampling_ratio : float, default=0.1
        Coreset fraction (:class:`CoresetSampler`).
    n_neighbors : int, default=1
        See :class:`PatchCoreDetector`.
    random_state : int, RandomState instance or None, default=None
        Seeds a randomly initialised backbone, the coreset and the detector.
        An int is given to every step, as scikit-learn's meta-estimators do
        (each step seeds a different thing with it, and results recorded
        with that int stay reproducible). A ``RandomState`` instance is not
        shared: each step gets its own int seed drawn from it when the
        pipeline is built (three draws), so the steps' random streams do not
        depend on the order in which the steps consume them. None leaves
        every step unseeded.
    device : str, default="auto"
    progress : bool, default=False
        Progress bars for feature extraction and coreset selection.
    working_memory : float or None, default=None
        Memory budget in MiB (see :class:`PatchCorePipeline`).
    n_jobs : int or None, default=None
        torch threads (see :class:`PatchCorePipeline`).
    scheduler : str or None, default=None
        Dask scheduler address for distributed fit and scoring.
    **feature_params
        Further :class:`PatchFeatureTransformer` parameters (``recipe``,
        ``resize``, ``crop_size``, ``batch_size``...). ``recipe="official"``
        is the official code's input geometry, scaling and embedding for any
        backbone; the default ``"recommended"`` keeps it for WideResNet-50
        and gives EfficientNets their checkpoint's input size without a
        centre crop.

    Returns
    -------
    pipeline : PatchCorePipeline
        Steps ``"features"``, ``"coreset"``, ``"detector"``; tune e.g.
        ``coreset__sampling_ratio`` with ``GridSearchCV``.

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> model = make_patchcore(sampling_ratio=0.01)
    >>> [name for name, _ in model.steps]
    ['features', 'coreset', 'detector']
    """
    seeds = [None] * 3 if random_state is None else int_seeds(random_state, 3)
    return PatchCorePipeline(
        [
            ("features", PatchFeatureTransformer(
                backbone=backbone, layers=layers, weights=weights, device=device, random_state=seeds[0],
                progress=progress, **feature_params,
            )),
            ("coreset", CoresetSampler(
                sampling_ratio=sampling_ratio, device=device, random_state=seeds[1], progress=progress
            )),
            ("detector", PatchCoreDetector(
                n_neighbors=n_neighbors, device=device, working_memory=working_memory, random_state=seeds[2]
            )),
        ],
        working_memory=working_memory,
        n_jobs=n_jobs,
        scheduler=scheduler,
    )


def _is_tiled(features) -> bool:
    """Whether a feature step cuts images into tiles (a ``PatchFeatureTransformer`` with ``tile_size`` set)."""
    return getattr(features, "tile_size", None) is not None
