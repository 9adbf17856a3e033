"""Reading images and turning them into normalised backbone input.

The transformer accepts several image containers; this module validates them
and converts one image at a time, so that a folder of files is never loaded
into memory all at once.

Pixel values are brought to [0, 1] by the range of their type, never by the
image's own minimum and maximum (which would make a uniformly darker or
brighter part look normal):

- 8-bit images (files in any 8-bit PIL mode, ``uint8`` arrays): divided by
  255. Colour files are decoded by PIL to 8 bits per channel.
- 16-bit greyscale files (PIL modes ``I;16``, ``I;16L``, ``I;16B``,
  ``I;16N``) and ``uint16`` arrays: divided by 65535.
- 32-bit integer files (PIL mode ``I``, e.g. 32-bit TIFF) and other integer
  arrays (``int16``, ``int32``, ``uint32``, ``int64``...): divided by 65535
  when every value fits in 16 bits (PIL also returns some 16-bit files as
  mode ``I``), else by 2**32 - 1; negative values are refused.
- Float files (PIL mode ``F``) and float arrays: used as they are, and they
  must lie in [0, 1]; a float has no range of its own, so other values are
  refused with a message instead of being guessed (divide by your sensor's
  full-scale value first).

Files are turned upright by their EXIF orientation tag unless
``exif_transpose=False``. Files with more pixels than
``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit, about 89
million pixels by default) are refused before they are decoded; raise the
limit with ``PIL.Image.MAX_IMAGE_PIXELS = n`` (``None`` removes it) or the
command line's ``--max-image-pixels``. Every file that cannot be read raises
:class:`UnreadableImageError` (a ``ValueError``) naming the file; a missing
file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .input_files import file_problem

ImageLike = str | os.PathLike | np.ndarray

#: File suffixes treated as images when folders are searched (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: PIL modes of single-channel images with more than 8 bits per pixel.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_UINT16_MAX = 65535.0
_UINT32_MAX = 4294967295.0


class UnreadableImageError(ValueError):
    """An image file cannot be decoded (damaged, truncated, not an image, too large...)."""


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
    X : ndarray of shape (n_images, height, width[, channels]), list or DataFrame
        A 4-D (colour) or 3-D (grayscale) array, a list whose items are
        image file paths or 2-D / 3-D arrays of possibly differing sizes, or
        a pandas DataFrame whose ``path`` column (or only column) holds
        image file paths.

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
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # a DataFrame: iterating it gives column names
        columns = list(X.columns)
        if len(columns) != 1 and "path" not in columns:
            raise TypeError(
                f"X is a DataFrame with columns {columns[:5]}; pass a DataFrame with a 'path' column (or "
                "a single column) of image file paths, or a list of paths or arrays."
            )
        X = list(X["path" if "path" in columns else columns[0]])
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
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < 0:
            raise ValueError(f"Image {index} (dtype {image.dtype}) has negative values; integer images must be >= 0.")
        if image.max() > _UINT32_MAX:
            raise ValueError(f"Image {index} (dtype {image.dtype}) has values above 2**32 - 1.")
        return
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"Image {index} has dtype {image.dtype}; expected uint8 (0-255), another "
            "unsigned integer type (uint16: 0-65535) or float (0-1)."
        )
    if not np.isfinite(image).all():
        raise ValueError(f"Image {index} contains NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Float image {index} has values in [{low:g}, {high:g}]; float images "
            "must be scaled to [0, 1] (or pass uint8 0-255 or uint16 0-65535)."
        )


def scale_to_unit(array: np.ndarray) -> np.ndarray:
    """Pixel values of a non-8-bit image as float32 in [0, 1], by the range of their type.

    ``uint16`` and integer images whose values fit in 16 bits are divided by
    65535, other integer images by 2**32 - 1; float images are returned as
    float32 unchanged (they must already lie in [0, 1]).

    Parameters
    ----------
    array : ndarray
        Integer (values >= 0) or float pixel values.

    Returns
    -------
    scaled : ndarray of float32, same shape
    """
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    if array.dtype == np.uint16 or array.size == 0 or array.max() <= _UINT16_MAX:
        return (array.astype(np.float32) / np.float32(_UINT16_MAX)).astype(np.float32)
    return (array.astype(np.float64) / _UINT32_MAX).astype(np.float32)


def _check_image_file(path: str) -> None:
    """FileNotFoundError if nothing (or a broken link) is there; UnreadableImageError if not a regular file."""
    problem = file_problem(path)
    if problem == "not found":
        raise FileNotFoundError(f"Image file not found: {path}")
    if problem is not None and problem.startswith("a broken"):
        raise FileNotFoundError(f"Image file {path} is {problem}")
    if problem is not None:
        raise UnreadableImageError(f"Cannot read image {path}: it is {problem}")


def _open_checked(path: str) -> Image.Image:
    """``Image.open`` with the decoding limit and errors that name the file."""
    _check_image_file(path)
    return _open_limited(path, path)


def _open_limited(source, name: str) -> Image.Image:
    """``Image.open`` of a path or binary file object, refusing images above the decoding limit."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(_too_large(name, error)) from error
    except UnidentifiedImageError as error:
        in_memory = not isinstance(source, (str, os.PathLike))  # PIL's message would name a BytesIO
        detail = "not an image in a format PIL can decode (or truncated)" if in_memory else error
        raise UnreadableImageError(f"Cannot read image {name}: {detail}") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImageError(f"Cannot read image {name}: {error}") from error
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        image.close()
        raise UnreadableImageError(_too_large(name, f"{width} x {height} = {width * height} pixels"))
    return image


def _too_large(path: str, detail) -> str:
    return (
        f"Cannot read image {path}: it has more pixels than the decoding limit "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} ({detail}). If the file is trusted, raise "
        "the limit: --max-image-pixels N on the command line, or PIL.Image.MAX_IMAGE_PIXELS = N in Python."
    )


def _upright(image: Image.Image, exif_transpose: bool) -> Image.Image:
    """Apply the EXIF orientation tag (when present and not 1)."""
    if exif_transpose and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        transposed = ImageOps.exif_transpose(image)
        return image if transposed is None else transposed
    return image


def read_pixels(path: str, exif_transpose: bool = True) -> Image.Image | np.ndarray:
    """Decode an image file: 8-bit RGB, or a high-bit-depth greyscale in [0, 1].

    Parameters
    ----------
    path : str
        Image file path.
    exif_transpose : bool, default=True
        Turn the image upright by its EXIF orientation tag.

    Returns
    -------
    image : PIL.Image.Image or ndarray
        An RGB ``PIL`` image for 8-bit files (every mode PIL can convert to
        RGB), or for 16-bit and 32-bit greyscale files (modes
        :data:`HIGH_DEPTH_MODES`) a float32 ``(height, width)`` array scaled
        as described in the module docstring.

    Raises
    ------
    UnreadableImageError
        If the file cannot be decoded or exceeds the decoding limit.
    FileNotFoundError
        If `path` does not exist.
    """
    return _decode(_open_checked(path), path, exif_transpose)


def decode_pixels(data: bytes, name: str, exif_transpose: bool = True) -> Image.Image | np.ndarray:
    """:func:`read_pixels` for the bytes of an image file held in memory (an upload).

    The same decoding, limits and errors as for a file on disk.

    Parameters
    ----------
    data : bytes
        The content of an image file (PNG, JPEG, TIFF...).
    name : str
        How error messages name the image (e.g. the uploaded file name).
    exif_transpose : bool, default=True
        Turn the image upright by its EXIF orientation tag.

    Returns
    -------
    image : PIL.Image.Image or ndarray
        As :func:`read_pixels`.

    Raises
    ------
    UnreadableImageError
        If the bytes are not a decodable image (truncated, another format,
        empty) or exceed the decoding limit ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    return _decode(_open_limited(io.BytesIO(data), name), name, exif_transpose)


def _decode(image: Image.Image, name: str, exif_transpose: bool) -> Image.Image | np.ndarray:
    """The pixels of an opened image (see :func:`read_pixels`), closing it."""
    try:
        with image:
            image = _upright(image, exif_transpose)
            if image.mode in HIGH_DEPTH_MODES:
                return _high_depth_array(image, name)
            return image.convert("RGB")
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(_too_large(name, error)) from error
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise UnreadableImageError(f"Cannot read image {name}: {error}") from error


def _high_depth_array(image: Image.Image, path: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise UnreadableImageError(f"Cannot read image {path}: it contains NaN or infinite values.")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise UnreadableImageError(
                f"Cannot read image {path}: a float image (PIL mode F) must hold values in [0, 1], "
                f"got [{low:g}, {high:g}]; divide it by the sensor's full-scale value first."
            )
    elif array.size and array.min() < 0:
        raise UnreadableImageError(f"Cannot read image {path}: a 32-bit integer image with negative values.")
    return scale_to_unit(array)


def read_image(path: str, exif_transpose: bool = True) -> Image.Image:
    """Open an image file as 8-bit RGB (for display), with an error that names the file.

    High-bit-depth greyscale files are scaled as for the backbone (see the
    module docstring) and rounded to 8 bits.

    Parameters
    ----------
    path : str
        Image file path.
    exif_transpose : bool, default=True
        Turn the image upright by its EXIF orientation tag.

    Returns
    -------
    image : PIL.Image.Image
        The image converted to RGB.
    """
    pixels = read_pixels(path, exif_transpose)
    if isinstance(pixels, Image.Image):
        return pixels
    grey = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def rgb_uint8(image: ImageLike) -> np.ndarray:
    """Return an image (path, uint8, uint16 or float 0-1 array) as uint8 RGB (H, W, 3).

    Files are read upright (EXIF orientation applied); integer arrays other
    than uint8 are scaled by their type's range (:func:`scale_to_unit`).
    """
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(read_image(os.fspath(image)), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}."
        )
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        array = scale_to_unit(np.clip(array, 0, None))
    return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def image_size(image: ImageLike, exif_transpose: bool = True) -> tuple[int, int]:
    """Return ``(height, width)`` of a path or array image (upright, for files)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    with _open_checked(image) as opened:
        width, height = opened.size
        try:
            orientation = opened.getexif().get(_EXIF_ORIENTATION, 1) if exif_transpose else 1
        except Exception:  # a damaged EXIF block: decoding will report it
            orientation = 1
    # Orientations 5-8 rotate by 90 degrees (ImageOps.exif_transpose).
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _to_pil_channels(image: ImageLike, exif_transpose: bool = True) -> list[Image.Image]:
    """Return the image as a list of PIL images: one RGB or three float planes."""
    if not isinstance(image, np.ndarray):
        image = read_pixels(image, exif_transpose)
        if isinstance(image, Image.Image):
            return [image]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype == np.uint8:
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        return [Image.fromarray(np.ascontiguousarray(image), mode="RGB")]
    image = scale_to_unit(image)
    if image.ndim == 2:
        return [Image.fromarray(np.ascontiguousarray(image), mode="F")] * 3
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0))
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
    exif_transpose: bool = True,
) -> np.ndarray:
    """Resize, optionally centre-crop and normalise one image.

    Parameters
    ----------
    image : str or ndarray
        Image file path, or an array (uint8 0-255, uint16 0-65535, other
        integer types or float 0-1; see the module docstring for the
        scaling).
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
    exif_transpose : bool, default=True
        Turn files upright by their EXIF orientation tag.

    Returns
    -------
    tensor : ndarray of shape (3, side, side), float32
        Normalised channels-first image.
    """
    return preprocess_image_geometries(image, [(resize, crop_size)], interpolation, mean, std, exif_transpose)[0]


def preprocess_image_geometries(
    image: ImageLike,
    geometries: Sequence[tuple[int, int | None]],
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
    exif_transpose: bool = True,
) -> list[np.ndarray]:
    """One image read once and brought to several ``(resize, crop_size)`` geometries.

    Each geometry is applied to the decoded image as in
    :func:`preprocess_image` (used for inputs at several scales).

    Returns
    -------
    tensors : list of ndarray of shape (3, side, side), float32
        One normalised channels-first image per geometry, in order.
    """
    resample = _RESAMPLING[interpolation]
    channels = _to_pil_channels(image, exif_transpose)
    mean_array = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_array = np.asarray(std, dtype=np.float32)[:, None, None]
    tensors = []
    for resize, crop_size in geometries:
        resized: dict[int, Image.Image] = {}
        planes = []
        for channel in channels:
            if id(channel) not in resized:  # a greyscale plane repeated three times is resized once
                resized[id(channel)] = _resize_and_crop(channel, resize, crop_size, resample)
            planes.append(resized[id(channel)])
        if len(planes) == 1:
            array = np.asarray(planes[0], dtype=np.float32) / 255.0
            array = np.moveaxis(array, -1, 0)
        else:
            array = np.stack([np.asarray(p, dtype=np.float32) for p in planes])
        tensors.append(np.ascontiguousarray((array - mean_array) / std_array))
    return tensors


def tile_pixels(
    image: ImageLike, size: tuple[int, int], interpolation: str, exif_transpose: bool = True
) -> np.ndarray:
    """An image's pixels at ``size = (height, width)``, to cut tiles from.

    The image is decoded once (upright, for files) and resized with
    `interpolation` only when its size differs from `size`; its pixel values
    are not normalised yet (each tile is, by :func:`preprocess_image_geometries`),
    so an 8-bit image stays 1 byte per value however large it is.

    Returns
    -------
    pixels : ndarray of shape (height, width, 3) or (height, width)
        uint8 for 8-bit images, else float32 in [0, 1] (see :func:`scale_to_unit`).
    """
    size = (int(size[0]), int(size[1]))
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        array = array[..., :3] if array.ndim == 3 else array
        if array.shape[:2] == size:
            return array if array.dtype == np.uint8 else scale_to_unit(array)
        channels = _to_pil_channels(array, exif_transpose=False)
    else:
        pixels = read_pixels(os.fspath(image), exif_transpose)
        if isinstance(pixels, np.ndarray):
            if pixels.shape[:2] == size:
                return pixels
            channels = [Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")]
        else:
            channels = [pixels]
    resample = _RESAMPLING[interpolation]
    done: dict[int, Image.Image] = {}  # a greyscale plane repeated three times is resized once
    resized = [done.setdefault(id(channel), channel.resize((size[1], size[0]), resample)) if id(channel) not in done
               else done[id(channel)] for channel in channels]
    if len(resized) == 1:
        return np.asarray(resized[0])
    return np.stack([np.asarray(plane, dtype=np.float32) for plane in resized], axis=-1)


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


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted, by their suffix.

    Parameters
    ----------
    folder : str or path-like
    recursive : bool, default=False
        Also search the subfolders.

    Returns
    -------
    paths : list of Path
        Entries whose suffix (case-insensitive) is in :data:`IMAGE_EXTENSIONS`
        and that are not folders, sorted; hidden files, and with `recursive`
        files in hidden folders, are skipped. Symbolic links to folders are
        followed (each folder once). Broken links, FIFOs and devices with an
        image suffix are listed, so that reading them reports them instead
        of skipping them silently.
    """
    folder = Path(folder)
    found = []
    visited = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree, or two links to one folder
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith(".")) if recursive else []
        found.extend(
            Path(root) / name for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def model_view(features, image: ImageLike) -> np.ndarray:
    """An image as the backbone of a fitted transformer sees it, for display.

    Parameters
    ----------
    features : PatchFeatureTransformer
        Fitted; its ``resize_``, ``crop_size_``, ``interpolation_``, ``mean_``,
        ``std_`` and ``exif_transpose`` are applied.
    image : str, path-like or ndarray

    Returns
    -------
    view : ndarray of shape (H, W, 3), float32
        Resized (and cropped) RGB with the normalisation undone, in [0, 1].
        A tiled transformer (``tile_size`` set) sees the whole image at its
        own size: the image itself.
    """
    if getattr(features, "tile_size", None) is not None:
        return rgb_uint8(image).astype(np.float32) / 255.0
    array = preprocess_image(
        image, features.resize_, features.crop_size_, features.interpolation_, features.mean_, features.std_,
        features.exif_transpose,
    )
    mean = np.asarray(features.mean_, dtype=np.float32)[:, None, None]
    std = np.asarray(features.std_, dtype=np.float32)[:, None, None]
    return np.clip(np.moveaxis(array * std + mean, 0, -1), 0.0, 1.0)
