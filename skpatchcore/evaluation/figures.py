"""Figures and heatmap overlays of anomaly maps (needs ``skpatchcore[plot]``).

matplotlib is imported only inside the functions, so the rest of the
package works without it. Figures are built with
:class:`matplotlib.figure.Figure` directly, without ``pyplot``: nothing is
shown, no global backend is switched, and figures are saved with
``fig.savefig(path)`` (or displayed inline by Jupyter).

- :func:`overlay_heatmap` -- draw an anomaly map over its image on axes.
- :func:`plot_triptych` -- image, anomaly map and ground truth side by side.
- :func:`plot_examples` -- several triptychs, one per row.
- :func:`plot_roc_curves` -- image-level and pixel-level ROC curves.
- :func:`save_overlay_png` -- write an overlay PNG at the image's own size
  (downsampled to :data:`MAX_OVERLAY_SIDE` pixels at most).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .._maps import resize_map
from ..io.atomic import atomic_path
from ..io.images import ImageLike, rgb_uint8

__all__ = [
    "blend_overlay",
    "overlay_heatmap",
    "overlay_size",
    "plot_examples",
    "plot_roc_curves",
    "plot_triptych",
    "save_overlay_png",
]

#: Colour map of anomaly maps: blue (normal) to red (anomalous).
DEFAULT_CMAP = "jet"
#: Most points drawn per ROC curve (pixel curves have millions of thresholds).
MAX_ROC_POINTS = 2000
#: Longest side of a heatmap overlay PNG: larger images are shown downsampled, which keeps
#: the memory of drawing an overlay bounded whatever the image's size.
MAX_OVERLAY_SIDE = 2048


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib, which is not installed: "
            "pip install 'skpatchcore[plot]' (or pip install matplotlib)."
        ) from error
    return matplotlib


def new_figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def value_range(anomaly_map: np.ndarray, vmin, vmax) -> tuple[float, float]:
    low = float(np.min(anomaly_map)) if vmin is None else float(vmin)
    high = float(np.max(anomaly_map)) if vmax is None else float(vmax)
    if not high > low:
        high = low + 1e-12
    return low, high


def overlay_heatmap(
    image: ImageLike,
    anomaly_map,
    ax=None,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = DEFAULT_CMAP,
):
    """Draw an anomaly map as a semi-transparent heatmap over its image.

    Parameters
    ----------
    image : str, path-like or ndarray
        Image file, or array of shape (H, W[, 3]) (uint8 or float in [0, 1]).
    anomaly_map : array-like of shape (h, w)
        Higher means more anomalous; resized (bilinear) to the image size if
        it differs.
    ax : matplotlib Axes, default=None
        Axes to draw on; a new figure with one axes is made when None.
    alpha : float, default=0.5
        Opacity of the heatmap.
    vmin, vmax : float, default=None
        Colour scale limits; the map's own minimum and maximum when None.
        Pass fixed values to compare several images.
    cmap : str, default="jet"
        matplotlib colour map.

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on (``ax.figure`` is its figure).
    """
    if ax is None:
        ax = new_figure(4.0, 4.0).add_subplot()
    rgb = rgb_uint8(image)
    amap = resize_map(anomaly_map, rgb.shape[:2], antialias=True)
    low, high = value_range(amap, vmin, vmax)
    ax.imshow(rgb)
    ax.imshow(amap, cmap=cmap, alpha=alpha, vmin=low, vmax=high)
    ax.set_axis_off()
    return ax


def _draw_triptych(axes, image, anomaly_map, mask, score, title, vmin, vmax, cmap) -> None:
    """Fill three axes with image / anomaly map / ground truth (or overlay)."""
    rgb = rgb_uint8(image)
    amap = resize_map(anomaly_map, rgb.shape[:2], antialias=True)
    low, high = value_range(amap, vmin, vmax)
    axes[0].imshow(rgb)
    heading = title or "image"
    if score is not None:
        heading = f"{heading}\nscore {score:.4g}"
    axes[0].set_title(heading, fontsize=9)
    shown = axes[1].imshow(amap, cmap=cmap, vmin=low, vmax=high)
    axes[1].set_title("anomaly map", fontsize=9)
    axes[1].figure.colorbar(shown, ax=axes[1], shrink=0.8)
    if mask is not None:
        mask_array = np.asarray(mask)
        if mask_array.ndim == 3:
            mask_array = mask_array.any(axis=-1)
        axes[2].imshow(mask_array != 0, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("ground truth", fontsize=9)
    else:
        axes[2].imshow(rgb)
        axes[2].imshow(amap, cmap=cmap, alpha=0.5, vmin=low, vmax=high)
        axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_axis_off()


def plot_triptych(
    image: ImageLike,
    anomaly_map,
    mask=None,
    score: float | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = DEFAULT_CMAP,
):
    """Image, anomaly map and ground-truth mask side by side.

    Parameters
    ----------
    image : str, path-like or ndarray
        The image (path, uint8 or float 0-1 array).
    anomaly_map : array-like of shape (h, w)
        Resized to the image size if it differs.
    mask : array-like of shape (H, W), default=None
        Ground truth (nonzero = defect). Without a mask the third panel shows
        the map overlaid on the image.
    score : float, default=None
        Image anomaly score, shown under the title.
    title : str, default=None
        Title of the first panel.
    vmin, vmax : float, default=None
        Colour scale limits of the map (its own range when None).
    cmap : str, default="jet"

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    figure = new_figure(10.0, 3.4)
    axes = figure.subplots(1, 3)
    _draw_triptych(axes, image, anomaly_map, mask, score, title, vmin, vmax, cmap)
    return figure


def plot_examples(
    images: Sequence[ImageLike],
    anomaly_maps: Sequence,
    masks: Sequence | None = None,
    scores: Sequence[float] | None = None,
    titles: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = DEFAULT_CMAP,
):
    """Several triptychs (image / map / ground truth), one image per row.

    Parameters
    ----------
    images : sequence of images
    anomaly_maps : sequence of 2-D arrays
    masks : sequence of (2-D array or None), default=None
        None entries (or no masks at all) show an overlay instead.
    scores : sequence of float, default=None
    titles : sequence of str, default=None
    vmin, vmax : float, default=None
        One colour scale for all rows; each map's own range when None.
    cmap : str, default="jet"

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    n = len(images)
    if n == 0:
        raise ValueError("plot_examples needs at least one image.")
    if len(anomaly_maps) != n:
        raise ValueError(f"Got {n} images but {len(anomaly_maps)} anomaly maps.")
    for name, values in (("masks", masks), ("scores", scores), ("titles", titles)):
        if values is not None and len(values) != n:
            raise ValueError(f"Got {n} images but {len(values)} {name}.")
    figure = new_figure(10.0, 3.2 * n)
    axes = np.atleast_2d(figure.subplots(n, 3))
    for i in range(n):
        _draw_triptych(
            axes[i],
            images[i],
            anomaly_maps[i],
            None if masks is None else masks[i],
            None if scores is None else scores[i],
            None if titles is None else titles[i],
            vmin,
            vmax,
            cmap,
        )
    return figure


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score, thinned for drawing."""
    from sklearn.metrics import roc_curve  # here: heatmaps (save_overlay_png) need no scikit-learn

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    if fpr.size > MAX_ROC_POINTS:
        keep = np.unique(np.linspace(0, fpr.size - 1, MAX_ROC_POINTS).astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def plot_roc_curves(labels, scores, masks=None, maps=None):
    """Image-level ROC curve and, with masks and maps, the pixel-level one.

    Parameters
    ----------
    labels : array-like of shape (n_images,)
        1 for anomalous, 0 for normal images.
    scores : array-like of shape (n_images,)
        Image anomaly scores, higher means more anomalous.
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays, default=None
        Ground-truth masks (nonzero = defect).
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays, default=None
        Anomaly maps of the same shapes as the masks.

    Returns
    -------
    figure : matplotlib.figure.Figure
        One panel per level, AUROC in the legends.
    """
    from .metrics import image_auroc, pixel_auroc, pixel_scores_and_labels

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    auroc = image_auroc(labels, scores)
    with_pixels = masks is not None and maps is not None
    figure = new_figure(9.0 if with_pixels else 4.8, 4.4)
    axes = np.atleast_1d(figure.subplots(1, 2 if with_pixels else 1))
    fpr, tpr = _roc_points(labels != 0, scores)
    axes[0].plot(fpr, tpr, color="tab:blue", label=f"image AUROC = {auroc:.3f}")
    axes[0].set_title("Image-level ROC")
    if with_pixels:
        pixel_value = pixel_auroc(list(masks), list(maps))
        pixel_scores, pixel_labels = pixel_scores_and_labels(list(masks), list(maps))
        fpr, tpr = _roc_points(pixel_labels, pixel_scores)
        axes[1].plot(fpr, tpr, color="tab:red", label=f"pixel AUROC = {pixel_value:.3f}")
        axes[1].set_title("Pixel-level ROC")
    for ax in axes:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(loc="lower right")
    return figure


def overlay_size(height: int, width: int, max_side: int | None = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    """``(height, width)`` of an overlay of an image: its own size, shrunk to `max_side` at most.

    Parameters
    ----------
    height, width : int
        The image's size.
    max_side : int or None, default=MAX_OVERLAY_SIDE
        Longest side of the overlay; None keeps the image's size.

    Returns
    -------
    size : tuple of int
        The aspect ratio is kept (each side rounded, at least 1).
    """
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return int(height), int(width)
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _rgb_at(image, size: tuple[int, int]) -> np.ndarray:
    """Image (PIL image or array) as uint8 RGB of ``size = (height, width)``, resized by PIL."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(rgb_uint8(image))
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def blend_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, alpha: float,
                  cmap: str = DEFAULT_CMAP, rows_per_block: int = 256) -> np.ndarray:
    """Colour an anomaly map and blend it into a uint8 RGB image, a block of rows at a time.

    Parameters
    ----------
    rgb : ndarray of shape (H, W, 3), uint8
    anomaly_map : ndarray of shape (H, W)
    low, high : float
        Values mapped to the ends of the colour map.
    alpha : float
        Weight of the colour.
    cmap : str, default="jet"
    rows_per_block : int, default=256
        Rows coloured at once; the float work is bounded by this many rows
        (matplotlib would colour the whole map as float64 RGBA at once).

    Returns
    -------
    overlay : ndarray of shape (H, W, 3), uint8
        The same colours as matplotlib's colour map applied to the map
        normalised to [0, 1] (its lookup table, indexed the same way).
    """
    colour_map = require_matplotlib().colormaps[cmap]
    table = colour_map(np.arange(colour_map.N))[:, :3]
    overlay = np.empty_like(rgb)
    for start in range(0, rgb.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        normalised = np.clip((anomaly_map[rows] - low) / (high - low), 0.0, 1.0)
        index = np.minimum(np.nan_to_num(normalised * colour_map.N).astype(np.intp), colour_map.N - 1)
        blended = (1.0 - alpha) * (rgb[rows] / 255.0) + alpha * table[index]
        overlay[rows] = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    return overlay


def save_overlay_png(
    path: str | os.PathLike,
    image: ImageLike,
    anomaly_map,
    vmin: float | None,
    vmax: float | None,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    max_side: int | None = MAX_OVERLAY_SIDE,
) -> Path:
    """Write the anomaly map blended over the image as a PNG of the image's size (up to `max_side`).

    The map is coloured with a matplotlib colour map and alpha-blended into
    the image pixel by pixel (no axes, no margins), so the PNG has exactly
    the image's height and width, unless its longer side exceeds
    `max_side`: then image and map are drawn downsampled to that size
    (:func:`overlay_size`). The colouring works in uint8 a block of rows at
    a time (:func:`blend_overlay`), so memory stays bounded for any image.

    Parameters
    ----------
    path : str or path-like
        Output file; parent folders are created. Written atomically (a
        temporary file renamed into place).
    image : str, path-like, PIL.Image.Image or ndarray
        Image file, PIL image, or array (H, W[, 3]), uint8 or float in [0, 1].
    anomaly_map : array-like of shape (h, w)
        Resized (bilinear) to the overlay size if it differs.
    vmin, vmax : float or None
        Values mapped to the ends of the colour map (the map's own range
        when None); use the same values for every image of a set.
    alpha : float, default=0.5
        Weight of the heatmap colour.
    cmap : str, default="jet"
    max_side : int or None, default=MAX_OVERLAY_SIDE
        Longest side of the PNG; None draws at the image's size whatever it
        is.

    Returns
    -------
    path : pathlib.Path
    """
    require_matplotlib()
    if isinstance(image, (str, os.PathLike)):
        from ..io.images import read_image

        image = read_image(os.fspath(image))
    width, height = image.size if isinstance(image, Image.Image) else np.shape(image)[1::-1]
    size = overlay_size(height, width, max_side)
    rgb = _rgb_at(image, size)
    amap = resize_map(anomaly_map, size, antialias=True)
    low, high = value_range(amap, vmin, vmax)
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as temporary:
        Image.fromarray(blend_overlay(rgb, amap, low, high, alpha, cmap)).save(temporary, format="PNG")
    return output
