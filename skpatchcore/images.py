"""Reading images and turning them into normalised backbone input.

The transformer accepts several image containers; this module validates them
and converts one image at a time, so that a folder of files is never loaded
into memory all at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, np.ndarray]

#: File suffixes treated as images when folders are searched (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def as_image_list(X) -> list:
    """Validate an image collection and return it as a list of images.

    Parameters
    ----------
    X : ndarray of shape (n_images, height, width[, channels]), or list
        A 4-D (colour) or 3-D (grayscale) array, or a list whose items are
        image file paths or 2-D / 3-D arrays of possibly differing sizes.

    Returns
    -------
    images : list
        One entry per image: a path (``str``) or an ``ndarray``.
    """
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(
            "X must be a collection of images, got a single path "
            f"{os.fspath(X)!r}; wrap it in a list: [path]."
        )
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            raise ValueError(
                "An image array must have shape (n_images, height, width) or "
                f"(n_images, height, width, channels); got shape {X.shape}."
            )
        images = list(X)
    elif isinstance(X, Sequence) or hasattr(X, "__iter__"):
        images = list(X)
    else:
        raise TypeError(
            "X must be an array of images or a list of image paths / arrays; "
            f"got {type(X).__name__}."
        )
    if len(images) == 0:
        raise ValueError("X contains no images (got an empty collection).")
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            continue
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"Image {index} is a {type(image).__name__}; expected a file path "
                "or a numpy array."
            )
        _check_array_image(image, index)
    return [os.fspath(i) if isinstance(i, os.PathLike) else i for i in images]


def _check_array_image(image: np.ndarray, index: int) -> None:
    if image.ndim == 3 and image.shape[-1] not in (1, 3):
        raise ValueError(
            f"Image {index} has {image.shape[-1]} channels (shape {image.shape}); "
            "expected 3 (RGB) or 1 (grayscale), channels last."
        )
    if image.ndim not in (2, 3):
        raise ValueError(
            f"Image {index} has shape {image.shape}; expected (height, width) or "
            "(height, width, channels)."
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"Image {index} is empty (shape {image.shape}).")
    if image.dtype == np.uint8:
        return
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"Image {index} has dtype {image.dtype}; expected uint8 (0-255) or "
            "float (0-1)."
        )
    if not np.isfinite(image).all():
        raise ValueError(f"Image {index} contains NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Float image {index} has values in [{low:g}, {high:g}]; float images "
            "must be scaled to [0, 1] (or pass uint8 0-255)."
        )


def read_image(path: str) -> Image.Image:
    """Open an image file as RGB, with an error that names the file.

    Parameters
    ----------
    path : str
        Image file path.

    Returns
    -------
    image : PIL.Image.Image
        The image converted to RGB.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"Cannot read image {path}: {error}") from error


def image_size(image: ImageLike) -> tuple[int, int]:
    """Return ``(height, width)`` of a path or array image."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if not Path(image).is_file():
        raise FileNotFoundError(f"Image file not found: {image}")
    try:
        with Image.open(image) as opened:
            width, height = opened.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read image {image}: {error}") from error
    return height, width


def _to_pil_channels(image: ImageLike) -> list[Image.Image]:
    """Return the image as a list of PIL images: one RGB or three float planes."""
    if not isinstance(image, np.ndarray):
        return [read_image(image)]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype == np.uint8:
        return [Image.fromarray(np.ascontiguousarray(image), mode="RGB")]
    planes = np.ascontiguousarray(np.moveaxis(image.astype(np.float32), -1, 0))
    return [Image.fromarray(plane, mode="F") for plane in planes]


def _resize_and_crop(
    picture: Image.Image, resize: int, crop_size: int | None, resample
) -> Image.Image:
    width, height = picture.size
    if crop_size is None:
        return picture.resize((resize, resize), resample)
    # torchvision ``Resize(int)``: the shorter side becomes ``resize``.
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    picture = picture.resize((new_width, new_height), resample)
    top = int(round((new_height - crop_size) / 2.0))
    left = int(round((new_width - crop_size) / 2.0))
    return picture.crop((left, top, left + crop_size, top + crop_size))


def preprocess_image(
    image: ImageLike,
    resize: int,
    crop_size: int | None,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Resize, optionally centre-crop and normalise one image.

    Parameters
    ----------
    image : str or ndarray
        Image file path, or an array (uint8 0-255 or float 0-1).
    resize : int
        With ``crop_size`` set, the shorter side is resized to ``resize``
        (aspect ratio kept) before the centre crop, as torchvision's
        ``Resize(resize)`` + ``CenterCrop(crop_size)``. With ``crop_size=None``
        the image is resized to ``resize x resize`` (no crop).
    crop_size : int or None
        Side of the centre crop.
    interpolation : {"nearest", "bilinear", "bicubic", "lanczos"}
        PIL resampling filter.
    mean, std : sequence of 3 floats
        Per-channel normalisation.

    Returns
    -------
    tensor : ndarray of shape (3, side, side), float32
        Normalised channels-first image.
    """
    resample = _RESAMPLING[interpolation]
    planes = [_resize_and_crop(p, resize, crop_size, resample) for p in _to_pil_channels(image)]
    if len(planes) == 1:
        array = np.asarray(planes[0], dtype=np.float32) / 255.0
        array = np.moveaxis(array, -1, 0)
    else:
        array = np.stack([np.asarray(p, dtype=np.float32) for p in planes])
    mean_array = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_array = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((array - mean_array) / std_array)


def preprocess_mask(mask, resize: int, crop_size: int | None) -> np.ndarray:
    """Bring a ground-truth mask to the geometry of :func:`preprocess_image`.

    Parameters
    ----------
    mask : str, ndarray or None
        Mask file path or 2-D array (any nonzero value is a defect). ``None``
        gives an all-``False`` mask.
    resize, crop_size : int, int or None
        As for :func:`preprocess_image`; nearest-neighbour resampling.

    Returns
    -------
    mask : ndarray of shape (side, side), bool
    """
    side = crop_size or resize
    if mask is None:
        return np.zeros((side, side), dtype=bool)
    array = mask_to_bool(np.asarray(mask)) if isinstance(mask, np.ndarray) else read_mask(mask)
    picture = Image.fromarray(array.astype(np.uint8) * 255)
    picture = _resize_and_crop(picture, resize, crop_size, Image.Resampling.NEAREST)
    return np.asarray(picture) > 0


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool: nonzero in any colour channel is a defect.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    mask : ndarray of shape (height, width), bool
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask file {str(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            array = np.asarray(image)
            mode = image.mode
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read mask {path}: {error}") from error
    if mode in ("RGBA", "LA", "PA"):
        array = array[..., :-1]
    return mask_to_bool(array)


def mask_to_bool(array: np.ndarray) -> np.ndarray:
    """A 2-D mask, or a channels-last colour mask, as bool: nonzero anywhere is a defect."""
    if array.ndim == 3:
        return np.any(array != 0, axis=-1)
    if array.ndim != 2:
        raise ValueError(f"A mask must be 2-D (height, width) or (height, width, channels); got shape {array.shape}.")
    return array != 0
