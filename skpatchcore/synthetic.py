"""Synthetic defects painted onto normal images, with their pixel masks.

- :func:`add_synthetic_defects` -- damage held-out normal images (model selection
  without labelled defects, below);
- :func:`make_synthetic_defects` -- a small deterministic dataset of textured
  "parts" with scratches, spots and cracks and their masks (the demo, tests).

A new production line has good parts and no labelled defects. To compare
configurations anyway, :func:`add_synthetic_defects` damages some held-out
normal images in ways that resemble real surface defects, and
:func:`~skpatchcore.model_selection.synthetic_defect_scorer` scores a fitted
model on them. Four kinds, each sized relative to the image (0.3% to 4% of
its area) and blended into it so that no hard edge gives it away:

* ``"cutpaste"``: a patch cut from another normal image (another place on
  it, turned by 90, 180 or 270 degrees, brightness and contrast jittered), pasted with a feathered edge
  (CutPaste, Li et al. 2021);
* ``"intensity"``: an irregular blob made brighter or darker by 15-40%;
* ``"texture"``: an irregular blob whose fine texture is smoothed away or
  replaced by noise of the image's own contrast;
* ``"crack"``: a thin, jagged, dark polyline.

With ``defect_size`` the defects have a physical size instead: a side (or,
for cracks, a length) of ``defect_size`` pixels of the image as given,
whatever its size. That is how a user who knows that defects are, say, 0.5
mm on a 60 um/pixel camera (about 8 pixels) asks whether a model sees them,
and how :func:`~skpatchcore.model_selection.synthetic_defect_scorer` chooses
whether to cut large images into tiles, and how large (``docs/large_images.rst``).

A fifth kind is offered but not in the default mix (:data:`ALL_DEFECT_KINDS`):

* ``"uneven"``: a large (10% to 30% of the area), diffuse region made
  brighter or darker by 10-25% with a wide soft edge, like the uneven
  surfaces of Magnetic Tile Defects, whose defects are larger and blurrier
  than the four kinds above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.utils import Bunch

#: The defects of :func:`make_synthetic_defects`' test images, in turn.
DEFECT_TYPES = ("scratch", "spot", "crack")

DEFECT_KINDS = ("cutpaste", "intensity", "texture", "crack")
#: Every kind :func:`add_synthetic_defects` paints; ``"uneven"`` only when asked for.
ALL_DEFECT_KINDS = (*DEFECT_KINDS, "uneven")

#: Defect area as a fraction of the image area.
MIN_AREA, MAX_AREA = 0.003, 0.04
#: Area of the large, diffuse ``"uneven"`` kind.
UNEVEN_MIN_AREA, UNEVEN_MAX_AREA = 0.10, 0.30


def add_synthetic_defects(
    images: Sequence,
    kinds: Sequence[str] = DEFECT_KINDS,
    defect_fraction: float = 0.5,
    random_state: int | np.random.Generator | None = 0,
    defect_size: float | tuple[float, float] | None = None,
) -> Bunch:
    """Paint one synthetic defect onto a fraction of normal images.

    Parameters
    ----------
    images : sequence of str, path-like or ndarray
        Normal images (files, or ``(H, W)`` / ``(H, W, 3)`` arrays), at
        least two: ``"cutpaste"`` takes its patch from another image.
    kinds : sequence of str, default=DEFECT_KINDS
        Defect kinds to cycle through, among ``"cutpaste"``,
        ``"intensity"``, ``"texture"``, ``"crack"`` and ``"uneven"`` (see
        the module docstring).
    defect_fraction : float in (0, 1), default=0.5
        Fraction of the images that get a defect (at least one, and at
        least one image stays normal).
    random_state : int, numpy Generator or None, default=0
        The same seed and images give the same defects.
    defect_size : float, (float, float) or None, default=None
        None: every defect covers 0.3% to 4% of its image (10% to 30% for
        ``"uneven"``). A number or a ``(low, high)`` range: the defect's side
        (a crack's length) in pixels of the image as given, drawn uniformly
        in the range, whatever the image's size (see the module docstring).

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        images : list of ndarray of shape (H, W, 3), uint8
            Every image, upright, in the input order; defective ones changed.
        labels : ndarray of shape (n_images,), int
            1 where a defect was painted.
        masks : list of ndarray of shape (H, W), bool
            The defect's pixels (all False for normal images).
        kinds : list of str
            ``"good"`` or the defect kind of each image.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.synthetic import add_synthetic_defects
    >>> images = np.random.default_rng(0).integers(90, 160, (4, 64, 64, 3), dtype=np.uint8)
    >>> data = add_synthetic_defects(images, random_state=0)
    >>> data.labels.tolist(), data.kinds
    ([0, 0, 1, 1], ['good', 'good', 'cutpaste', 'intensity'])
    """
    from .io.images import as_image_list, rgb_uint8

    check_defect_options(kinds, defect_fraction)
    size = check_defect_size(defect_size)
    arrays = [rgb_uint8(image) for image in as_image_list(images)]
    n_images = len(arrays)
    if n_images < 2:
        raise ValueError(f"Synthetic defects need at least 2 images (one stays normal), got {n_images}.")
    rng = np.random.default_rng(random_state)
    n_defective = int(np.clip(round(defect_fraction * n_images), 1, n_images - 1))
    defective = np.sort(rng.choice(n_images, n_defective, replace=False))
    labels = np.zeros(n_images, dtype=int)
    labels[defective] = 1
    masks = [np.zeros(array.shape[:2], dtype=bool) for array in arrays]
    names = ["good"] * n_images
    result = list(arrays)
    for position, index in enumerate(defective):
        kind = kinds[position % len(kinds)]
        donor = arrays[(index + 1 + rng.integers(n_images - 1)) % n_images]
        result[index], masks[index] = _paint(arrays[index], kind, rng, donor, size)
        names[index] = kind
    return Bunch(images=result, labels=labels, masks=masks, kinds=names)


def check_defect_options(kinds: Sequence[str], defect_fraction: float) -> None:
    """Raise ValueError unless `kinds` are known defect kinds and `defect_fraction` is in (0, 1)."""
    if isinstance(kinds, str) or not kinds or any(kind not in ALL_DEFECT_KINDS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of {ALL_DEFECT_KINDS}, got {kinds!r}.")
    if not 0 < defect_fraction < 1:
        raise ValueError(f"defect_fraction must be in (0, 1), got {defect_fraction!r}.")


def check_defect_size(defect_size) -> tuple[float, float] | None:
    """``defect_size`` as a ``(low, high)`` range of pixels, or None; refuses anything else by name."""
    if defect_size is None:
        return None
    values = np.atleast_1d(np.asarray(defect_size, dtype=float)) if not isinstance(defect_size, str) else None
    if values is None or values.shape not in ((1,), (2,)) or not np.all(np.isfinite(values)) \
            or values.min() < 1 or values[0] > values[-1]:
        raise ValueError(f"defect_size must be None, a number of pixels >= 1 or a (low, high) range of them, "
                         f"got {defect_size!r}.")
    return float(values[0]), float(values[-1])


def _paint(image: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray,
           size: tuple[float, float] | None = None):
    """One defect of `kind` on `image`: the new uint8 image and its mask.

    `size`: the defect's side (a crack's length) in pixels, as a range; None
    for the default sizes relative to the image.
    """
    height, width = image.shape[:2]
    values = image.astype(np.float64)
    if size is None:
        low, high = (UNEVEN_MIN_AREA, UNEVEN_MAX_AREA) if kind == "uneven" else (MIN_AREA, MAX_AREA)
        side = None
    else:
        side = float(rng.uniform(*size))
        low = high = min(0.25, side * side / (height * width))  # at most a quarter of the image
    feather = _feather(height, width, kind) if side is None else max(0.5, side / (4 if kind == "uneven" else 15))
    if kind == "cutpaste":
        alpha, changed = _cutpaste(values, rng, donor, low, high, feather)
    else:
        if kind == "crack":
            region = _crack(rng, height, width, side)
        else:
            region = _blob(rng, height, width, low, high)
        alpha = ndimage.gaussian_filter(region.astype(np.float64), 0.3 if kind == "crack" else feather)
        changed = _changed_pixels(values, kind, rng, region)
    blended = values * (1 - alpha[..., None]) + changed * alpha[..., None]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8), alpha >= 0.5


def _feather(height: int, width: int, kind: str) -> float:
    if kind == "crack":
        return 0.3
    return max(0.5, min(height, width) / (20 if kind == "uneven" else 150))


def _area_side(rng: np.random.Generator, height: int, width: int, low: float = MIN_AREA,
               high: float = MAX_AREA) -> float:
    """Side of a square with a random defect area (`low` to `high` of the image)."""
    return float(np.sqrt(rng.uniform(low, high) * height * width))


def _blob(rng: np.random.Generator, height: int, width: int, low: float = MIN_AREA,
          high: float = MAX_AREA) -> np.ndarray:
    """An irregular filled blob at a random place, of `low` to `high` of the image area."""
    radius = _area_side(rng, height, width, low, high) / np.sqrt(np.pi)
    aspect = rng.uniform(0.6, 1.6)
    radii = np.array([radius * np.sqrt(aspect), radius / np.sqrt(aspect)])
    radii = np.minimum(radii, [height / 2 - 1, width / 2 - 1])
    center = rng.uniform(radii, [height - radii[0], width - radii[1]])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = (yy - center[0]) / radii[0], (xx - center[1]) / radii[1]
    theta = np.arctan2(dy, dx)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.03, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= wobble


def _crack(rng: np.random.Generator, height: int, width: int, length: float | None = None) -> np.ndarray:
    """A jagged polyline about 1% of the shorter side wide (at least 1 pixel).

    With `length` (pixels): segments of about a fifth of it, as wide as a
    thirtieth of it (at least 1 pixel), so that the crack scales with it.
    """
    side = min(height, width)
    half_width = max(0.5, side / 200 if length is None else length / 60)
    step = side * rng.uniform(0.04, 0.08) if length is None else length * rng.uniform(0.12, 0.25)
    point = rng.uniform([0.2 * height, 0.2 * width], [0.8 * height, 0.8 * width])
    heading = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    distance = np.full((height, width), np.inf)
    for _ in range(int(rng.integers(4, 10))):
        heading += rng.uniform(-0.6, 0.6)
        following = point + step * np.array([np.sin(heading), np.cos(heading)])
        if not (0 <= following[0] < height and 0 <= following[1] < width):
            break
        distance = np.minimum(distance, _segment_distance(yy, xx, point, following))
        point = following
    if not np.isfinite(distance).any():  # the first step left the image: a short stub inwards
        following = point + step * np.sign([height / 2 - point[0], width / 2 - point[1]])
        distance = _segment_distance(yy, xx, point, following)
    return distance <= half_width


def _changed_pixels(values: np.ndarray, kind: str, rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """The image as it looks where the defect is fully present."""
    if kind == "intensity":
        gain = rng.uniform(0.15, 0.4) * rng.choice([-1, 1])
        return values * (1 + gain)
    if kind == "uneven":
        gain = rng.uniform(0.10, 0.25) * rng.choice([-1, 1])
        return values * (1 + gain)
    if kind == "texture":
        if rng.random() < 0.5:  # smoothed away
            return ndimage.gaussian_filter(values, (3, 3, 0))
        local_mean = values[region].mean(axis=0) if region.any() else values.mean(axis=(0, 1))
        contrast = values.std(axis=(0, 1)).mean() or 10.0
        noise = ndimage.gaussian_filter(rng.standard_normal(values.shape[:2]), 1.0)
        return local_mean + 1.5 * contrast * noise[..., None] / (noise.std() + 1e-12)
    return values * rng.uniform(0.3, 0.6)  # crack: dark


def _cutpaste(values: np.ndarray, rng: np.random.Generator, donor: np.ndarray, low: float = MIN_AREA,
              high: float = MAX_AREA, feather: float | None = None):
    """Alpha of a feathered rectangle and the donor's patch placed under it."""
    from PIL import Image

    height, width = values.shape[:2]
    donor = np.asarray(Image.fromarray(donor).resize((width, height), Image.BILINEAR), dtype=np.float64)
    side = _area_side(rng, height, width, low, high)
    aspect = rng.uniform(0.5, 2.0)
    limit = min(height, width) // 2
    patch_h = int(np.clip(round(side * np.sqrt(aspect)), 2, limit))
    patch_w = int(np.clip(round(side / np.sqrt(aspect)), 2, limit))
    source_y, source_x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
    patch = np.rot90(donor[source_y:source_y + patch_h, source_x:source_x + patch_w], k=rng.integers(1, 4))
    patch = patch * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1) * patch.mean()  # CutPaste's colour jitter
    patch_h, patch_w = patch.shape[:2]
    target_y, target_x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
    region = np.zeros((height, width), dtype=bool)
    region[target_y:target_y + patch_h, target_x:target_x + patch_w] = True
    changed = values.copy()
    changed[region] = patch.reshape(-1, 3)
    alpha = ndimage.gaussian_filter(region.astype(np.float64),
                                    _feather(height, width, "cutpaste") if feather is None else feather)
    return alpha, changed


# ---------------------------------------------------------------------------
# a complete synthetic dataset: textured parts with scratches, spots and cracks


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
    >>> from skpatchcore.synthetic import make_synthetic_defects
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
