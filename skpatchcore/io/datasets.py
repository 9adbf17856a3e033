"""Datasets on disk: reading the MVTec AD layout and writing it.

- :func:`load_mvtec` -- list the images of a dataset in MVTec AD layout.
- :func:`load_masks` -- read ground-truth masks as boolean arrays.
- :func:`save_mvtec_layout` -- write a dataset (such as
  :func:`skpatchcore.synthetic.make_synthetic_defects` makes) to disk in MVTec layout.

The MVTec AD layout of one category is::

    <category>/
        train/good/*.png
        test/good/*.png
        test/<defect type>/*.png
        ground_truth/<defect type>/<image stem>_mask.png
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch

from .images import IMAGE_EXTENSIONS, list_images, read_mask

__all__ = [
    "load_mvtec",
    "load_masks",
    "save_mvtec_layout",
]

def load_mvtec(root: str | os.PathLike, category: str | None = None) -> Bunch:
    """List the images, labels and mask files of an MVTec AD style dataset.

    Parameters
    ----------
    root : str or path-like
        Dataset root holding one folder per category, or, when `category` is
        None, the category folder itself (the one holding ``train/``,
        ``test/`` and ``ground_truth/``).
    category : str, default=None
        Name of the category folder under `root`.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes:

        train_images : list of str
            Paths of the normal training images (``train/good``), sorted.
        test_images : list of str
            Paths of the test images, sorted by defect type, then file name.
        test_labels : ndarray of shape (n_test,), dtype int
            1 for defective and 0 for good test images.
        test_defect_types : list of str
            Defect type (name of the ``test/`` subfolder) of each test image,
            ``"good"`` for normal ones.
        test_masks : list of (str or None)
            Path of the ground-truth mask of each test image, None for good
            images.
        category : str
            Name of the category folder.

    Raises
    ------
    FileNotFoundError
        If the category folder, ``train/good`` or ``test`` is missing, or a
        defective test image has no mask file.
    ValueError
        If ``train/good`` or ``test`` contains no image.

    Notes
    -----
    Images are files ending in one of ``.png``, ``.jpg``, ``.jpeg``,
    ``.bmp``, ``.tif`` or ``.tiff`` (case-insensitive). The mask of
    ``test/<type>/<stem>.<ext>`` is ``ground_truth/<type>/<stem>_mask.png``
    (other image extensions are accepted too).

    Examples
    --------
    >>> from skpatchcore.io.datasets import load_mvtec  # doctest: +SKIP
    >>> data = load_mvtec("mvtec_ad", category="bottle")  # doctest: +SKIP
    >>> len(data.train_images), data.test_labels.mean()  # doctest: +SKIP
    (209, 0.756...)
    """
    base = Path(root)
    if category is not None:
        if not base.is_dir():
            raise FileNotFoundError(f"Dataset root {str(base)!r} does not exist.")
        base = base / category
    if not base.is_dir():
        what = "Category folder" if category is not None else "Dataset root"
        raise FileNotFoundError(f"{what} {str(base)!r} does not exist.")

    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"No train/good folder in {str(base)!r}; expected MVTec AD layout "
            "<category>/{train/good, test/<type>, ground_truth/<type>}."
        )
    train_images = [str(p) for p in list_images(train_dir)]
    if not train_images:
        raise ValueError(f"No images found in {str(train_dir)!r}.")

    test_dir = base / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"No test folder in {str(base)!r}.")
    test_images: list[str] = []
    defect_types: list[str] = []
    masks: list[str | None] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = type_dir.name
        for image in list_images(type_dir):
            test_images.append(str(image))
            defect_types.append(defect)
            if defect == "good":
                masks.append(None)
            else:
                masks.append(str(_find_mask(base / "ground_truth" / defect, image)))
    if not test_images:
        raise ValueError(f"No images found in the subfolders of {str(test_dir)!r}.")

    labels = np.array([d != "good" for d in defect_types], dtype=int)
    return Bunch(
        train_images=train_images,
        test_images=test_images,
        test_labels=labels,
        test_defect_types=defect_types,
        test_masks=masks,
        category=base.resolve().name,
    )


def load_masks(
    mask_paths: Sequence[str | os.PathLike | None],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    size: int | tuple[int, int] | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Read binary ground-truth masks as boolean arrays.

    Parameters
    ----------
    mask_paths : sequence of (str, path-like or None)
        Mask image files; any nonzero pixel marks a defect. A None entry
        (a good image without mask) becomes an all-False mask.
    image_sizes : sequence of (int, int), default=None
        ``(H, W)`` of the image belonging to each mask. Required for None
        entries when `size` is not given; when given, every read mask must
        have this shape.
    size : int or (int, int), default=None
        If given, every mask is resized to ``(size, size)`` or ``(H, W)``
        with nearest-neighbour interpolation and one stacked array is
        returned.

    Returns
    -------
    masks : ndarray of shape (n_masks, H, W) or list of ndarray
        Boolean masks: a stacked array when `size` is given, else a list of
        2-D arrays of each mask's own size.

    Raises
    ------
    ValueError
        If `image_sizes` and `mask_paths` have different lengths, a None
        entry has no size to take, a mask's shape differs from its
        ``image_sizes`` entry, or `size` is not positive.
    FileNotFoundError
        If a mask file does not exist.
    """
    paths = list(mask_paths)
    target = _size_tuple(size) if size is not None else None
    if image_sizes is not None:
        image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        if len(image_sizes) != len(paths):
            raise ValueError(
                "mask_paths and image_sizes have mismatched lengths: "
                f"{len(paths)} != {len(image_sizes)}."
            )
        for i, s in enumerate(image_sizes):
            if len(s) != 2:
                raise ValueError(f"image_sizes[{i}] must be (H, W), got {s}.")

    masks = []
    for i, path in enumerate(paths):
        if path is None:
            if target is not None:
                shape = target
            elif image_sizes is not None:
                shape = image_sizes[i]
            else:
                raise ValueError(
                    f"mask_paths[{i}] is None and neither image_sizes nor size "
                    "is given, so the size of its empty mask is unknown."
                )
            masks.append(np.zeros(shape, dtype=bool))
            continue
        mask = read_mask(path)
        if image_sizes is not None and mask.shape != image_sizes[i]:
            raise ValueError(
                f"Mask {str(path)!r} has shape {mask.shape} but image_sizes[{i}] "
                f"is {image_sizes[i]} (expected (H, W))."
            )
        if target is not None and mask.shape != target:
            resized = Image.fromarray(mask).resize(
                (target[1], target[0]), resample=Image.Resampling.NEAREST
            )
            mask = np.asarray(resized, dtype=bool)
        masks.append(mask)

    if target is not None:
        if not masks:
            return np.zeros((0, *target), dtype=bool)
        return np.stack(masks)
    return masks


def save_mvtec_layout(
    bunch: Bunch, root: str | os.PathLike, category: str = "synthetic"
) -> Path:
    """Write a dataset from :func:`make_synthetic_defects` in MVTec AD layout.

    Images are written as PNG files named by their index in `bunch`:
    ``train/good/000.png``, ``test/<type>/<index>.png`` and, for defective
    images, ``ground_truth/<type>/<index>_mask.png`` with values 0 and 255.
    ``load_mvtec(path)`` reads the result back.

    Parameters
    ----------
    bunch : :class:`~sklearn.utils.Bunch`
        Output of :func:`make_synthetic_defects` (uint8 images of shape
        (n, H, W, 3) or (n, H, W), boolean masks).
    root : str or path-like
        Folder under which the category folder is created.
    category : str, default="synthetic"
        Name of the category folder.

    Returns
    -------
    path : pathlib.Path
        The category folder ``root / category``.

    Raises
    ------
    ValueError
        If `bunch` lacks a key or its arrays have inconsistent lengths.
    FileExistsError
        If ``root / category`` already exists and is not empty.
    """
    required = ("train_images", "test_images", "test_masks", "test_defect_types")
    missing = [k for k in required if k not in bunch]
    if missing:
        raise ValueError(f"bunch is missing the key(s) {missing}.")
    train = np.asarray(bunch["train_images"])
    test = np.asarray(bunch["test_images"])
    masks = np.asarray(bunch["test_masks"])
    types = list(bunch["test_defect_types"])
    if not (len(test) == len(masks) == len(types)):
        raise ValueError(
            "test_images, test_masks and test_defect_types have mismatched "
            f"lengths: {len(test)}, {len(masks)}, {len(types)}."
        )
    if len(train) == 0:
        raise ValueError("bunch has no train_images.")
    for name, arr in (("train_images", train), ("test_images", test)):
        if arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8, got dtype {arr.dtype}.")

    path = Path(root) / category
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"{str(path)!r} already exists and is not empty; choose another "
            "root or category."
        )
    width = max(3, len(str(max(len(train), len(test)) - 1)))
    train_dir = path / "train" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(train):
        Image.fromarray(image).save(train_dir / f"{i:0{width}d}.png")
    for i, (image, mask, defect) in enumerate(zip(test, masks, types)):
        stem = f"{i:0{width}d}"
        image_dir = path / "test" / defect
        image_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_dir / f"{stem}.png")
        if defect != "good":
            mask_dir = path / "ground_truth" / defect
            mask_dir.mkdir(parents=True, exist_ok=True)
            mask_image = Image.fromarray(np.where(mask != 0, 255, 0).astype(np.uint8))
            mask_image.save(mask_dir / f"{stem}_mask.png")
    return path


# ---------------------------------------------------------------------------
# helpers


def _find_mask(mask_dir: Path, image: Path) -> Path:
    """Ground-truth mask file of a defective test image."""
    candidates = [mask_dir / f"{image.stem}_mask.png"]
    if mask_dir.is_dir():
        candidates += sorted(
            p
            for p in mask_dir.glob(f"{image.stem}_mask.*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
        )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"No ground-truth mask for defective test image {str(image)!r}; "
        f"expected {str(candidates[0])!r}."
    )


def _size_tuple(size) -> tuple[int, int]:
    """Normalise an int or (H, W) size to a tuple of positive ints."""
    if np.ndim(size) == 0:
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size}.")
    return size
