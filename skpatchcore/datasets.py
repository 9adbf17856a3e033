"""Dataset loaders and a synthetic defect generator.

- :func:`load_mvtec` -- list the images of a dataset in MVTec AD layout.
- :func:`load_masks` -- read ground-truth masks as boolean arrays.
- :func:`make_synthetic_defects` -- generate a small deterministic textured
  "part" dataset with scratches, spots and cracks and their pixel masks.
- :func:`save_mvtec_layout` -- write such a dataset to disk in MVTec layout.

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
from scipy import ndimage
from sklearn.utils import Bunch

from .images import IMAGE_EXTENSIONS, list_images, read_mask

__all__ = [
    "load_mvtec",
    "load_masks",
    "make_synthetic_defects",
    "save_mvtec_layout",
]

DEFECT_TYPES = ("scratch", "spot", "crack")


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
    >>> from skpatchcore.datasets import load_mvtec  # doctest: +SKIP
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


def make_synthetic_defects(
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_defect: int = 12,
    image_size: int = 128,
    random_state: int | np.random.Generator | None = 0,
) -> Bunch:
    """Generate textured part images with synthetic surface defects.

    Every image shows the same kind of surface: a smooth low-frequency
    shading, a fine periodic (brushed / woven) pattern and a little sensor
    noise, tinted slightly blue-grey. All images share these statistics but
    have a random phase and offset. Each defective test image gets exactly
    one defect, cycling through ``"scratch"`` (thin bright or dark straight
    line), ``"spot"`` (filled irregular blob of different intensity) and
    ``"crack"`` (jagged dark polyline). Defects differ from the surface by at
    least about 60 grey levels and cover 0.5 % to 5 % of the image.

    Parameters
    ----------
    n_train : int, default=20
        Number of normal training images.
    n_test_good : int, default=6
        Number of normal test images.
    n_test_defect : int, default=12
        Number of defective test images.
    image_size : int, default=128
        Height and width of the images, at least 32.
    random_state : int, numpy Generator or None, default=0
        Seed or generator; the output is deterministic for a given seed.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes:

        train_images : ndarray of shape (n_train, H, W, 3), dtype uint8
            Normal RGB training images.
        test_images : ndarray of shape (n_test, H, W, 3), dtype uint8
            Test images, the ``n_test_good`` good ones first.
        test_labels : ndarray of shape (n_test,), dtype int
            1 for defective and 0 for good test images.
        test_masks : ndarray of shape (n_test, H, W), dtype bool
            Pixel masks of the defects (all False for good images).
        test_defect_types : list of str
            ``"good"``, ``"scratch"``, ``"spot"`` or ``"crack"``.

    Examples
    --------
    >>> from skpatchcore.datasets import make_synthetic_defects
    >>> data = make_synthetic_defects(n_train=4, n_test_good=2,
    ...                               n_test_defect=3, image_size=64)
    >>> data.train_images.shape, data.test_masks.shape
    ((4, 64, 64, 3), (5, 64, 64))
    >>> data.test_defect_types
    ['good', 'good', 'scratch', 'spot', 'crack']
    """
    for name, value in (
        ("n_train", n_train),
        ("n_test_good", n_test_good),
        ("n_test_defect", n_test_defect),
    ):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}.")
    n_train, n_test_good = int(n_train), int(n_test_good)
    n_test_defect = int(n_test_defect)
    size = int(image_size)
    rng = np.random.default_rng(random_state)

    train = np.empty((n_train, size, size), dtype=np.float64)
    for i in range(n_train):
        train[i] = _texture(rng, size)
    n_test = n_test_good + n_test_defect
    test = np.empty((n_test, size, size), dtype=np.float64)
    masks = np.zeros((n_test, size, size), dtype=bool)
    types = ["good"] * n_test_good
    for i in range(n_test_good):
        test[i] = _texture(rng, size)
    for j in range(n_test_defect):
        i = n_test_good + j
        kind = DEFECT_TYPES[j % len(DEFECT_TYPES)]
        test[i], masks[i] = _add_defect(rng, _texture(rng, size), kind)
        types.append(kind)
    labels = np.array([t != "good" for t in types], dtype=int)
    return Bunch(
        train_images=_to_rgb(train),
        test_images=_to_rgb(test),
        test_labels=labels,
        test_masks=masks,
        test_defect_types=types,
    )


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


def _to_rgb(grey: np.ndarray) -> np.ndarray:
    """Tint grey float images blue-grey and convert them to uint8 RGB."""
    tint = np.array([0.93, 0.97, 1.0])
    return np.clip(np.rint(grey[..., None] * tint), 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One grey surface image (float, mean ~130) with a random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # smooth shading: low-pass filtered white noise, unit variance
    shading = ndimage.gaussian_filter(
        rng.standard_normal((size, size)), sigma=size / 12, mode="wrap"
    )
    shading /= shading.std() + 1e-12
    # fine periodic pattern (period 6 px along a 30 degree direction and
    # 9 px across it), random phase per image
    angle = np.deg2rad(30.0)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    phase_u, phase_v = rng.uniform(0, 2 * np.pi, size=2)
    pattern = 0.6 * np.sin(2 * np.pi * u / 6 + phase_u) + 0.4 * np.sin(
        2 * np.pi * v / 9 + phase_v
    )
    noise = rng.standard_normal((size, size))
    offset = rng.uniform(-4, 4)
    return 130.0 + offset + 10.0 * shading + 10.0 * pattern + 3.0 * noise


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    """Distance of every grid point to the segment p0-p1 (points as (y, x))."""
    d = np.subtract(p1, p0, dtype=np.float64)
    length2 = float(d @ d)
    if length2 == 0.0:
        return np.hypot(yy - p0[0], xx - p0[1])
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Random boolean mask of one defect of the given kind."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    margin = 0.15 * size
    if kind == "scratch":
        width = max(2.0, round(size / 48))
        length = rng.uniform(0.35, 0.6) * size
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        center = rng.uniform(margin + length / 2 * np.abs(direction),
                             size - margin - length / 2 * np.abs(direction))
        p0, p1 = center - direction * length / 2, center + direction * length / 2
        return _segment_distance(yy, xx, p0, p1) <= width / 2
    if kind == "spot":
        radius = size * rng.uniform(0.07, 0.1)
        center = rng.uniform(margin + radius, size - margin - radius, size=2)
        theta = np.arctan2(yy - center[0], xx - center[1])
        wobble = np.ones_like(theta)
        for k in (2, 3, 5):
            amplitude, phase = rng.uniform(0.03, 0.12), rng.uniform(0, 2 * np.pi)
            wobble += amplitude * np.sin(k * theta + phase)
        return np.hypot(yy - center[0], xx - center[1]) <= radius * wobble
    if kind == "crack":
        width = max(2.0, round(size / 42))
        n_steps = int(rng.integers(7, 11))
        step = 0.06 * size
        heading = rng.uniform(0, 2 * np.pi)
        point = rng.uniform(0.35 * size, 0.65 * size, size=2)
        distance = np.full((size, size), np.inf)
        for _ in range(n_steps):
            heading += rng.uniform(-0.7, 0.7)
            nxt = point + step * np.array([np.sin(heading), np.cos(heading)])
            # turn back towards the centre instead of leaving the image
            if np.any(nxt < margin) or np.any(nxt > size - margin):
                heading += np.pi
                nxt = point + step * np.array([np.sin(heading), np.cos(heading)])
            distance = np.minimum(distance, _segment_distance(yy, xx, point, nxt))
            point = nxt
        return distance <= width / 2
    raise ValueError(f"Unknown defect type {kind!r}; expected one of {DEFECT_TYPES}.")


def _add_defect(
    rng: np.random.Generator, image: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` onto a grey image; return image and mask."""
    size = image.shape[0]
    for _ in range(100):
        mask = _defect_mask(rng, size, kind)
        if 0.005 <= mask.mean() <= 0.05:
            break
    else:  # pragma: no cover - the shapes above always fit within a few draws
        raise RuntimeError(f"Could not draw a {kind} covering 0.5-5% of the image.")
    image = image.copy()
    texture = image[mask] - image[mask].mean()
    if kind == "scratch":
        level = 225.0 if rng.random() < 0.5 else 35.0
        image[mask] = level + 0.2 * texture
    elif kind == "spot":
        level = 215.0 if rng.random() < 0.5 else 45.0
        image[mask] = level + 0.4 * texture
    else:  # crack
        image[mask] = 30.0 + 0.2 * texture
    return image, mask
