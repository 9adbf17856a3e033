"""Choosing a configuration with ``GridSearchCV``: splits of normal images and anomaly scorers.

Two situations:

* **Labelled defects exist** (``y`` = 1 for defective samples):
  :class:`NormalOnlyKFold` trains on normal folds only and tests on the
  held-out normals plus every defective sample; :func:`anomaly_auroc_scorer`
  scores a split by image AUROC.
* **Only normal images** (a new line): :class:`NormalOnlyKFold` splits them
  into folds, and :func:`synthetic_defect_scorer` paints synthetic defects
  (:mod:`skpatchcore.synthetic`) onto part of each held-out fold and scores
  image or pixel AUROC on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import BaseCrossValidator, KFold
from sklearn.utils._param_validation import StrOptions, validate_parameter_constraints, validate_params

from ._param_constraints import NumberInterval
from .synthetic import DEFECT_KINDS, check_defect_options, check_defect_size

SYNTHETIC_METRICS = ("image_auroc", "pixel_auroc", "mean_auroc")


class NormalOnlyKFold(BaseCrossValidator):
    """K-fold splits whose training folds hold normal samples only.

    The normal samples (``y == 0``, or every sample when ``y`` is None) are
    split into ``n_splits`` folds; each split trains on the other folds'
    normals and tests on the held-out normals plus every anomalous sample
    (``y != 0``). Use it with :func:`anomaly_auroc_scorer` when there are
    labelled defects, or with :func:`synthetic_defect_scorer` when every
    sample is normal.

    Parameters
    ----------
    n_splits : int, default=3
    shuffle : bool, default=False
    random_state : int or None, default=None

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import NormalOnlyKFold
    >>> [test.tolist() for _, test in NormalOnlyKFold(2).split(np.zeros(5), [0, 0, 1, 0, 0])]
    [[0, 1, 2], [2, 3, 4]]
    """

    _parameter_constraints: dict = {
        "n_splits": [NumberInterval(Integral, 2, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(self, n_splits: int = 3, shuffle: bool = False, random_state=None):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def _validate_params(self) -> None:
        """Raise ``InvalidParameterError`` for a parameter outside ``_parameter_constraints``."""
        params = {name: getattr(self, name) for name in self._parameter_constraints}
        validate_parameter_constraints(self._parameter_constraints, params, caller_name=type(self).__name__)

    def split(self, X, y=None, groups=None):
        """Yield ``(train, test)`` index arrays.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...) or list of images
            Only its length is used.
        y : array-like of shape (n_samples,), default=None
            0 for normal samples, anything else for anomalous ones; None
            means every sample is normal.
        groups : ignored

        Yields
        ------
        train : ndarray
            Indices of normal samples of the other folds.
        test : ndarray
            Indices of the held-out normal samples and of every anomalous
            sample, sorted.
        """
        self._validate_params()
        y = np.zeros(len(X), dtype=int) if y is None else np.asarray(y)
        normal = np.flatnonzero(y == 0)
        anomalous = np.flatnonzero(y != 0)
        if normal.size < self.n_splits:
            raise ValueError(f"Need at least n_splits={self.n_splits} normal samples, got {normal.size}.")
        folds = KFold(self.n_splits, shuffle=self.shuffle, random_state=self.random_state)
        for train, test in folds.split(normal):
            yield normal[train], np.sort(np.concatenate([normal[test], anomalous]))

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """Number of splits (``n_splits``); the arguments are ignored."""
        self._validate_params()
        return self.n_splits


def anomaly_auroc_scorer(estimator, X, y) -> float:
    """AUROC of anomaly detection: ``y`` 1 = anomalous, 0 = normal.

    A scorer for ``GridSearchCV(scoring=anomaly_auroc_scorer)``; it ranks
    samples by ``-estimator.score_samples(X)``. (sklearn's ``"roc_auc"``
    would rank by ``decision_function``, where higher means *normal*.)

    Raises
    ------
    ValueError
        If the test samples are all of one class (use
        :func:`synthetic_defect_scorer` when there are no labelled defects).
    """
    labels = np.asarray(y) != 0
    if labels.all() or not labels.any():
        raise ValueError(
            "anomaly_auroc_scorer needs normal (y == 0) and anomalous (y != 0) test samples; with normal "
            "images only, use synthetic_defect_scorer()."
        )
    return float(roc_auc_score(labels, -estimator.score_samples(X)))


class SyntheticDefectScorer:
    """Scorer of a fitted pipeline on held-out normal images with synthetic defects.

    Made by :func:`synthetic_defect_scorer`; see there.
    """

    def __init__(self, metric: str, kinds: Sequence[str], defect_fraction: float, random_state: int,
                 defect_size=None):
        self.metric = metric
        self.kinds = tuple(kinds)
        self.defect_fraction = defect_fraction
        self.random_state = random_state
        self.defect_size = defect_size

    def __call__(self, estimator, X, y=None) -> float:
        from .evaluation.metrics import image_auroc, pixel_auroc
        from .evaluation.protocol import masks_at_map_geometry
        from .io.images import as_image_list
        from .synthetic import add_synthetic_defects

        images = as_image_list(X)
        if y is not None:
            images = [image for image, label in zip(images, np.asarray(y)) if label == 0]
        data = add_synthetic_defects(images, self.kinds, self.defect_fraction, self.random_state, self.defect_size)
        if self.metric == "image_auroc":
            return image_auroc(data.labels, -estimator.score_samples(data.images))
        if getattr(estimator[0], "tile_size", None) is not None:  # maps at the images' own sizes
            scores, maps = estimator.score_and_maps(data.images, original_size=True)
        else:
            scores, maps = estimator.score_and_maps(data.images)
        pixel = pixel_auroc(masks_at_map_geometry(estimator[0], data.masks, data.images), maps)
        if self.metric == "pixel_auroc":
            return pixel
        return (image_auroc(data.labels, -scores) + pixel) / 2

    def __repr__(self) -> str:
        size = "" if self.defect_size is None else f", defect_size={self.defect_size!r}"
        return (f"synthetic_defect_scorer(metric={self.metric!r}, kinds={self.kinds!r}, "
                f"defect_fraction={self.defect_fraction!r}, random_state={self.random_state!r}{size})")


@validate_params(
    {
        "metric": [StrOptions(set(SYNTHETIC_METRICS))],
        "kinds": [list, tuple],
        "defect_fraction": [NumberInterval(Real, 0, 1, closed="neither")],
        # A fixed int: every configuration must see the same defects on a fold.
        "random_state": [NumberInterval(Integral, 0, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def synthetic_defect_scorer(
    metric: str = "mean_auroc",
    kinds: Sequence[str] = DEFECT_KINDS,
    defect_fraction: float = 0.5,
    random_state: int = 0,
    defect_size: float | tuple[float, float] | None = None,
) -> SyntheticDefectScorer:
    """A ``GridSearchCV`` scorer that needs no labelled defects.

    On each test fold it paints synthetic defects
    (:func:`~skpatchcore.synthetic.add_synthetic_defects`) onto
    ``defect_fraction`` of the held-out normal images and scores the fitted
    pipeline on the fold. Every configuration sees the same defects on the
    same fold (the seed is fixed), so their scores compare. Samples with
    ``y != 0`` are left out.

    Parameters
    ----------
    metric : {"mean_auroc", "image_auroc", "pixel_auroc"}, default="mean_auroc"
        Image AUROC of ``-score_samples``, pixel AUROC of the anomaly maps
        against the painted masks (at the model's input geometry), or
        their mean.
    kinds : sequence of str, default=skpatchcore.synthetic.DEFECT_KINDS
        Defect kinds to cycle through.
    defect_fraction : float in (0, 1), default=0.5
    random_state : int, default=0
    defect_size : float, (float, float) or None, default=None
        Defects of a physical size: side (a crack's length) in pixels of
        the images as given (see
        :func:`~skpatchcore.synthetic.add_synthetic_defects`); None sizes
        them relative to each image. Give the size of the defect itself
        (the pixels that differ from a good part), not of a box drawn
        around it: annotation boxes are often several times larger. With
        the size of the defects that matter, a search over
        ``features__tile_size`` (None among the values) and
        ``features__layers`` tells without labels whether cutting large
        images into tiles helps, at what size, and which layers see such
        defects (``docs/large_images.rst``).

    Returns
    -------
    scorer : callable ``scorer(estimator, X, y=None) -> float``
        Higher is better. ``estimator`` must be a fitted
        :class:`~skpatchcore.PatchCorePipeline` whose first step is the
        :class:`~skpatchcore.PatchFeatureTransformer`.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skpatchcore import NormalOnlyKFold, make_patchcore, synthetic_defect_scorer
    >>> search = GridSearchCV(
    ...     make_patchcore(sampling_ratio=0.01),
    ...     {"features__aggregation": ["mean_pool", "concat"]},
    ...     cv=NormalOnlyKFold(3, shuffle=True, random_state=0),
    ...     scoring=synthetic_defect_scorer(),
    ... )  # search.fit(paths_of_good_images)
    """
    check_defect_options(kinds, defect_fraction)
    check_defect_size(defect_size)
    return SyntheticDefectScorer(metric, kinds, defect_fraction, random_state, defect_size)
