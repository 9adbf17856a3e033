"""Display objects in the style of scikit-learn's ``RocCurveDisplay`` (needs matplotlib).

Each display stores its data in ``__init__``, draws with ``plot(ax=None,
...)`` (setting ``ax_`` or ``axes_``, ``figure_`` and the drawn artists as
attributes), and is built from a fitted model with ``from_estimator`` or
from computed values with ``from_predictions``:

- :class:`AnomalyMapDisplay` -- an image with its anomaly map overlaid and
  the ground-truth outline.
- :class:`AnomalyRocDisplay` -- image-level and pixel-level ROC curves
  (each drawn by ``sklearn.metrics.RocCurveDisplay``).

matplotlib is imported only when drawing. New figures are made without
``pyplot``, as in :mod:`skpatchcore.evaluation.figures`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.metrics import RocCurveDisplay, auc, roc_curve
from sklearn.utils.validation import check_is_fitted

from .._maps import resize_map
from ..io.images import ImageLike, preprocess_image, preprocess_mask, read_mask, rgb_uint8
from .figures import DEFAULT_CMAP, new_figure, value_range
from .metrics import pixel_scores_and_labels

__all__ = ["AnomalyMapDisplay", "AnomalyRocDisplay"]


def _image_pipeline(estimator):
    """The feature step of a fitted image pipeline (``make_patchcore``), or a clear error."""
    from ..pipeline import PatchCorePipeline, image_features_step

    if not isinstance(estimator, PatchCorePipeline):
        raise TypeError(
            f"from_estimator needs a fitted PatchCorePipeline (make_patchcore); got {type(estimator).__name__}. "
            "With maps computed already, use from_predictions."
        )
    check_is_fitted(estimator)
    first = image_features_step(estimator)
    if first is None:
        raise TypeError(
            "from_estimator needs a PatchCorePipeline of images (PatchFeatureTransformer first, PatchCoreDetector "
            "last). With maps computed already, use from_predictions."
        )
    return first


def _mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask (array or file) as bool ``(H, W)`` of `size` (nearest-neighbour resize if it differs)."""
    array = read_mask(mask) if isinstance(mask, (str, os.PathLike)) else np.asarray(mask)
    if array.ndim == 3:
        array = array.any(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W) or (H, W, channels), got shape {np.shape(mask)}.")
    array = array != 0
    if array.shape != tuple(size):
        picture = Image.fromarray(array.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)
        array = np.asarray(picture) > 0
    return array


class AnomalyMapDisplay:
    """An image with its anomaly map overlaid, and the defect's outline.

    Build it with :meth:`from_estimator` (a fitted pipeline and an image)
    or :meth:`from_predictions` (an image and its map); the constructor
    only stores the data. Higher map values mean more anomalous.

    Parameters
    ----------
    image : str, path-like or ndarray
        Image file, or array of shape (H, W[, 3]) (uint8, uint16 or float in
        [0, 1]).
    anomaly_map : ndarray of shape (h, w)
        Resized (bilinear) to the image size when drawn if it differs.
    mask : ndarray of shape (H', W'), default=None
        Ground truth (nonzero = defect), outlined when drawn.
    anomaly_score : float, default=None
        The image's anomaly score (``-score_samples``), shown in the title.
    name : str, default=None
        Title (e.g. the file name).

    Attributes
    ----------
    image_ : matplotlib.image.AxesImage
        The image.
    overlay_ : matplotlib.image.AxesImage
        The anomaly map over it.
    contour_ : matplotlib.contour.QuadContourSet or None
        The mask's outline (None without a mask).
    colorbar_ : matplotlib.colorbar.Colorbar or None
    ax_ : matplotlib.axes.Axes
    figure_ : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import AnomalyMapDisplay
    >>> image = np.zeros((32, 32, 3), dtype=np.uint8)
    >>> anomaly_map = np.zeros((8, 8)); anomaly_map[2:4, 2:4] = 1.0
    >>> display = AnomalyMapDisplay.from_predictions(image, anomaly_map)
    >>> display.overlay_.get_array().shape
    (32, 32)
    """

    def __init__(self, image: ImageLike, anomaly_map, *, mask=None, anomaly_score: float | None = None,
                 name: str | None = None):
        self.image = image
        self.anomaly_map = anomaly_map
        self.mask = mask
        self.anomaly_score = anomaly_score
        self.name = name

    def plot(self, ax=None, *, alpha: float = 0.5, cmap: str = DEFAULT_CMAP, vmin: float | None = None,
             vmax: float | None = None, colorbar: bool = True, mask_color: str = "white") -> AnomalyMapDisplay:
        """Draw the image, the map over it and the mask's outline.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        alpha : float, default=0.5
            Opacity of the map.
        cmap : str, default="jet"
        vmin, vmax : float, default=None
            Colour scale limits; the map's own range when None. Pass fixed
            values to compare images.
        colorbar : bool, default=True
        mask_color : str, default="white"
            Colour of the mask's outline.

        Returns
        -------
        display : AnomalyMapDisplay
            Itself, with the attributes set.
        """
        if ax is None:
            ax = new_figure(4.4, 4.0).add_subplot()
        rgb = rgb_uint8(self.image)
        amap = resize_map(self.anomaly_map, rgb.shape[:2], antialias=True)
        low, high = value_range(amap, vmin, vmax)
        self.image_ = ax.imshow(rgb)
        self.overlay_ = ax.imshow(amap, cmap=cmap, alpha=alpha, vmin=low, vmax=high)
        self.contour_ = None
        if self.mask is not None:
            mask = _mask_array(self.mask, rgb.shape[:2])
            if mask.any():
                self.contour_ = ax.contour(mask.astype(np.float32), levels=[0.5], colors=[mask_color], linewidths=1.5)
        self.colorbar_ = ax.figure.colorbar(self.overlay_, ax=ax, shrink=0.8) if colorbar else None
        title = self.name or ""
        if self.anomaly_score is not None:
            title = f"{title}\nanomaly score {self.anomaly_score:.4g}".strip()
        if title:
            ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(cls, estimator, image: ImageLike, *, mask=None, name: str | None = None, ax=None,
                       **kwargs) -> AnomalyMapDisplay:
        """Score one image with a fitted pipeline and draw its anomaly map.

        Without a centre crop (``crop_size=None``) the map is resized to the
        image's own size and drawn over the original image; with a crop it
        is drawn over the image as the backbone sees it (resized and
        cropped), and so is the mask.

        Parameters
        ----------
        estimator : PatchCorePipeline
            Fitted, e.g. by :func:`~skpatchcore.make_patchcore`.
        image : str, path-like or ndarray
        mask : ndarray or str, default=None
            Ground truth at the image's size (nonzero = defect).
        name : str, default=None
            Title; the file name for a path.
        ax : matplotlib Axes, default=None
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyMapDisplay
        """
        first = _image_pipeline(estimator)
        if name is None and isinstance(image, (str, os.PathLike)):
            name = os.path.basename(os.fspath(image))
        if first.crop_size_ is None:
            scores, maps = estimator.score_and_maps([image], original_size=True)
            shown = image
        else:
            scores, maps = estimator.score_and_maps([image])
            channels = preprocess_image(image, first.resize_, first.crop_size_, first.interpolation_,
                                        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), first.exif_transpose)
            shown = np.clip(np.moveaxis(channels, 0, -1), 0.0, 1.0)
            if mask is not None:
                mask = preprocess_mask(mask, first.resize_, first.crop_size_)
        display = cls(shown, maps[0], mask=mask, anomaly_score=float(-scores[0]), name=name)
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_predictions(cls, image: ImageLike, anomaly_map, *, mask=None, anomaly_score: float | None = None,
                         name: str | None = None, ax=None, **kwargs) -> AnomalyMapDisplay:
        """Draw an anomaly map computed already over its image.

        Parameters
        ----------
        image : str, path-like or ndarray
        anomaly_map : ndarray of shape (h, w)
            Higher means more anomalous (``anomaly_maps`` or the second
            output of ``score_and_maps``).
        mask : ndarray, default=None
        anomaly_score : float, default=None
            ``-score_samples`` of the image, shown in the title.
        name : str, default=None
        ax : matplotlib Axes, default=None
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyMapDisplay
        """
        display = cls(image, anomaly_map, mask=mask, anomaly_score=anomaly_score, name=name)
        return display.plot(ax=ax, **kwargs)


class AnomalyRocDisplay:
    """Image-level ROC curve and, with ground-truth masks, the pixel-level one.

    Each level is drawn by ``sklearn.metrics.RocCurveDisplay`` on its own
    axes. Curves are ``sklearn.metrics.roc_curve`` of anomaly scores
    (higher means more anomalous) against labels (1 = anomalous); the
    pixel level pools every pixel of every map and mask.

    Parameters
    ----------
    image_fpr, image_tpr : ndarray
        Image-level ROC curve.
    image_auroc : float, default=None
    pixel_fpr, pixel_tpr : ndarray, default=None
        Pixel-level ROC curve (None: image level only).
    pixel_auroc : float, default=None
    name : str, default=None
        Model name for the legends.

    Attributes
    ----------
    roc_displays_ : list of sklearn.metrics.RocCurveDisplay
        One per level drawn (image, then pixel).
    axes_ : ndarray of matplotlib Axes
    lines_ : ndarray of matplotlib Line2D
        The ROC curves, one per level.
    figure_ : matplotlib.figure.Figure

    Examples
    --------
    >>> from skpatchcore import AnomalyRocDisplay
    >>> display = AnomalyRocDisplay.from_predictions([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> float(display.roc_displays_[0].roc_auc)
    0.75
    """

    def __init__(self, *, image_fpr, image_tpr, image_auroc: float | None = None, pixel_fpr=None, pixel_tpr=None,
                 pixel_auroc: float | None = None, name: str | None = None):
        self.image_fpr = image_fpr
        self.image_tpr = image_tpr
        self.image_auroc = image_auroc
        self.pixel_fpr = pixel_fpr
        self.pixel_tpr = pixel_tpr
        self.pixel_auroc = pixel_auroc
        self.name = name

    def plot(self, ax=None, *, name: str | None = None, plot_chance_level: bool = True) -> AnomalyRocDisplay:
        """Draw the curves, one level per axes.

        Parameters
        ----------
        ax : matplotlib Axes or sequence of Axes, default=None
            One axes per level (image, then pixel); a new figure when None.
        name : str, default=None
            Overrides ``name`` in the legends.
        plot_chance_level : bool, default=True
            Draw the diagonal of a random ranking.

        Returns
        -------
        display : AnomalyRocDisplay
            Itself, with the attributes set.
        """
        levels = [("image", self.image_fpr, self.image_tpr, self.image_auroc)]
        if self.pixel_fpr is not None:
            levels.append(("pixel", self.pixel_fpr, self.pixel_tpr, self.pixel_auroc))
        if ax is None:
            figure = new_figure(4.6 * len(levels), 4.4)
            axes = np.atleast_1d(figure.subplots(1, len(levels)))
        else:
            axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
            if axes.size != len(levels):
                raise ValueError(f"ax must hold {len(levels)} axes (one per level: image, pixel), got {axes.size}.")
        name = self.name if name is None else name
        self.roc_displays_ = []
        for axis, (level, fpr, tpr, auroc) in zip(axes, levels):
            display = RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=auroc, name=f"{name} ({level})" if name else level)
            display.plot(ax=axis, plot_chance_level=plot_chance_level)
            axis.set_title(f"{level.capitalize()}-level ROC")
            self.roc_displays_.append(display)
        self.axes_ = axes
        self.lines_ = np.array([display.line_ for display in self.roc_displays_], dtype=object)
        self.figure_ = axes[0].figure
        return self

    @classmethod
    def from_estimator(cls, estimator, X, y, *, masks=None, name: str | None = None, ax=None,
                       **kwargs) -> AnomalyRocDisplay:
        """Score images with a fitted pipeline and draw the ROC curves.

        Parameters
        ----------
        estimator : PatchCorePipeline
            Fitted, e.g. by :func:`~skpatchcore.make_patchcore`.
        X : images
        y : array-like of shape (n_images,)
            1 (or any nonzero value) for anomalous, 0 for normal images.
        masks : sequence of 2-D arrays, default=None
            Ground truth at each image's size; brought to the maps' size as
            the images are (``preprocess_mask``). None: image level only.
        name : str, default=None
        ax : Axes or sequence of Axes, default=None
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyRocDisplay
        """
        first = _image_pipeline(estimator)
        if masks is None:
            scores, maps = estimator.score_samples(X), None
        else:
            tiled = getattr(first, "tile_size", None) is not None  # maps and masks at the images' own sizes
            scores, maps = estimator.score_and_maps(X, original_size=tiled)
            if not tiled:
                masks = [preprocess_mask(mask, first.resize_, first.crop_size_) for mask in masks]
        return cls.from_predictions(y, -np.asarray(scores), masks=masks, maps=maps, name=name, ax=ax, **kwargs)

    @classmethod
    def from_predictions(cls, y_true, y_score, *, masks=None, maps=None, name: str | None = None, ax=None,
                         **kwargs) -> AnomalyRocDisplay:
        """Draw the ROC curves of anomaly scores computed already.

        Parameters
        ----------
        y_true : array-like of shape (n_images,)
            1 (or any nonzero value) for anomalous, 0 for normal images.
        y_score : array-like of shape (n_images,)
            Anomaly scores, **higher means more anomalous**
            (``-score_samples``).
        masks, maps : sequences of 2-D arrays of matching shapes, default=None
            Ground truth (nonzero = defect) and anomaly maps, for the
            pixel level.
        name : str, default=None
        ax : Axes or sequence of Axes, default=None
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyRocDisplay
        """
        labels = np.asarray(y_true) != 0
        image_fpr, image_tpr, _ = roc_curve(labels, np.asarray(y_score, dtype=np.float64))
        pixel = {}
        if (masks is None) != (maps is None):
            raise ValueError("The pixel level needs both masks and maps (or neither).")
        if masks is not None:
            masks, maps = list(masks), list(maps)
            shapes = [(np.shape(mask), np.shape(amap)) for mask, amap in zip(masks, maps)]
            if len(masks) != len(maps) or any(a != b for a, b in shapes):
                raise ValueError(
                    f"masks and maps must pair up with equal shapes; got {len(masks)} masks and {len(maps)} maps, "
                    f"shapes {shapes[:3]}{'...' if len(shapes) > 3 else ''}."
                )
            pixel_scores, pixel_labels = pixel_scores_and_labels(list(masks), list(maps))
            if pixel_labels.all() or not pixel_labels.any():
                raise ValueError("The pixel level needs masks with both defect and normal pixels.")
            fpr, tpr, _ = roc_curve(pixel_labels, pixel_scores)
            pixel = dict(pixel_fpr=fpr, pixel_tpr=tpr, pixel_auroc=float(auc(fpr, tpr)))
        display = cls(image_fpr=image_fpr, image_tpr=image_tpr, image_auroc=float(auc(image_fpr, image_tpr)),
                      name=name, **pixel)
        return display.plot(ax=ax, **kwargs)
