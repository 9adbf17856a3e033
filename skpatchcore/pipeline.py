"""The PatchCore pipeline, a normal-only CV splitter and an AUROC scorer."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import BaseCrossValidator, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from .coreset import CoresetSampler
from .detector import PatchCoreDetector
from .features import PatchFeatureTransformer
from .images import as_image_list, image_size


class PatchCorePipeline(Pipeline):
    """A scikit-learn ``Pipeline`` with PatchCore's pixel-level outputs.

    Everything a ``Pipeline`` does works unchanged (``score_samples``,
    ``decision_function``, ``predict``, ``GridSearchCV``, ``joblib``). Two
    methods are added, both of which run the backbone once:
    :meth:`anomaly_maps` and :meth:`score_and_maps`. The first step must
    produce patch features, the last must be a :class:`PatchCoreDetector`.

    ``fit(X, y)`` learns from normal samples only: when labels are given,
    samples with ``y != 0`` are left out. This keeps the memory bank clean
    when ``GridSearchCV`` refits the best model on a labelled set.
    """

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
            Passed to ``Pipeline.fit``.

        Returns
        -------
        self : PatchCorePipeline
        """
        if y is not None:
            labels = np.asarray(y)
            images = as_image_list(X)
            if labels.shape != (len(images),):
                raise ValueError(f"y has shape {labels.shape}; expected ({len(images)},), one label per image.")
            normal = np.flatnonzero(labels == 0)
            if normal.size == 0:
                raise ValueError("y marks every sample as anomalous (y != 0); PatchCore fits on normal samples.")
            X = [images[i] for i in normal] if not isinstance(X, np.ndarray) else X[normal]
            y = labels[normal]
        return super().fit(X, y, **params)

    def _features_and_detector(self, X):
        check_is_fitted(self)
        detector = self.steps[-1][1]
        if not isinstance(detector, PatchCoreDetector):
            raise TypeError("The last pipeline step must be a PatchCoreDetector.")
        features = X
        for _, _, transformer in self._iter(with_final=False):
            features = transformer.transform(features)
        return features, detector

    def _map_size(self):
        first = self.steps[0][1]
        if not hasattr(first, "input_size_"):
            raise TypeError("The first pipeline step must be a fitted PatchFeatureTransformer.")
        return first.input_size_

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
            without a centre crop (``crop_size=None``).

        Returns
        -------
        score_samples : ndarray of shape (n_images,)
            Higher means more normal (minus the anomaly score).
        maps : ndarray of shape (n_images, H, W) or list of ndarray
            Anomaly maps (higher means more anomalous); a list when
            ``original_size=True``.
        """
        images = as_image_list(X)
        features, detector = self._features_and_detector(images)
        scores, maps = detector.score_and_maps(features, self._map_size())
        if not original_size:
            return scores, maps
        if getattr(self.steps[0][1], "crop_size", None) is not None:
            raise ValueError(
                "original_size=True needs crop_size=None: a centre-cropped map does not "
                "cover the whole original image."
            )
        return scores, [_resize_map(m, image_size(image)) for m, image in zip(maps, images)]

    def anomaly_maps(self, X, original_size: bool = False):
        """Pixel anomaly maps (higher means more anomalous); see :meth:`score_and_maps`."""
        return self.score_and_maps(X, original_size=original_size)[1]


def _resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map))[None, None]
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def make_patchcore(
    backbone="wide_resnet50_2",
    layers=("layer2", "layer3"),
    weights="IMAGENET1K_V1",
    sampling_ratio: float = 0.1,
    n_neighbors: int = 1,
    random_state=None,
    device: str = "auto",
    progress: bool = False,
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
    random_state : int or None
        Seeds a randomly initialised backbone, the coreset and the detector.
    device : str, default="auto"
    progress : bool, default=False
        Progress bars for feature extraction and coreset selection.
    **feature_params
        Further :class:`PatchFeatureTransformer` parameters (``resize``,
        ``crop_size``, ``batch_size``...).

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
    return PatchCorePipeline(
        [
            ("features", PatchFeatureTransformer(
                backbone=backbone, layers=layers, weights=weights, device=device, random_state=random_state,
                progress=progress, **feature_params,
            )),
            ("coreset", CoresetSampler(
                sampling_ratio=sampling_ratio, device=device, random_state=random_state, progress=progress
            )),
            ("detector", PatchCoreDetector(n_neighbors=n_neighbors, device=device, random_state=random_state)),
        ]
    )


class NormalOnlyKFold(BaseCrossValidator):
    """K-fold splits whose training folds hold normal samples only.

    The normal samples (``y == 0``) are split into ``n_splits`` folds; each
    split trains on the other folds' normals and tests on the held-out
    normals plus every anomalous sample (``y != 0``). Use it with
    :func:`anomaly_auroc_scorer` in ``GridSearchCV``.

    Parameters
    ----------
    n_splits : int, default=3
    shuffle : bool, default=False
    random_state : int or None, default=None
    """

    def __init__(self, n_splits: int = 3, shuffle: bool = False, random_state=None):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def split(self, X, y=None, groups=None):
        """Yield ``(train, test)`` index arrays."""
        if y is None:
            raise ValueError("NormalOnlyKFold needs labels y (0 = normal, 1 = anomalous).")
        y = np.asarray(y)
        normal = np.flatnonzero(y == 0)
        anomalous = np.flatnonzero(y != 0)
        if normal.size < self.n_splits:
            raise ValueError(f"Need at least n_splits={self.n_splits} normal samples, got {normal.size}.")
        if anomalous.size == 0:
            raise ValueError("NormalOnlyKFold needs at least one anomalous sample (y != 0) to test on.")
        folds = KFold(self.n_splits, shuffle=self.shuffle, random_state=self.random_state)
        for train, test in folds.split(normal):
            yield normal[train], np.sort(np.concatenate([normal[test], anomalous]))

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """Number of splits."""
        return self.n_splits


def anomaly_auroc_scorer(estimator, X, y) -> float:
    """AUROC of anomaly detection: ``y`` 1 = anomalous, 0 = normal.

    A scorer for ``GridSearchCV(scoring=anomaly_auroc_scorer)``; it ranks
    samples by ``-estimator.score_samples(X)``. (sklearn's ``"roc_auc"``
    would rank by ``decision_function``, where higher means *normal*.)
    """
    return float(roc_auc_score(np.asarray(y) != 0, -estimator.score_samples(X)))
