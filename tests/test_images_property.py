"""Property-based: whatever bytes an image file holds, the reader gives backbone input or the named error."""

import io

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from skpatchcore.io.images import UnreadableImageError, preprocess_image  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on damaged TIFF tags
SIDE = 16
#: (file format, PIL mode) pairs that PIL writes.
FORMATS_AND_MODES = [
    ("PNG", mode) for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
] + [
    ("TIFF", mode) for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F")
] + [("JPEG", mode) for mode in ("L", "RGB", "CMYK")] + [("BMP", mode) for mode in ("1", "L", "P", "RGB")] + [
    ("WEBP", "RGB"), ("GIF", "P"),
]
SETTINGS = settings(max_examples=int(__import__("os").environ.get("SKPC_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encoded(format_name: str, mode: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "F":
        picture = Image.fromarray(rng.random((height, width), dtype=np.float32), mode="F")
    elif mode in ("I", "I;16"):
        picture = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16)).convert(mode)
    else:
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=format_name)
    return buffer.getvalue()


def _check(path) -> None:
    """Either a finite (3, SIDE, SIDE) float32 array, or UnreadableImageError naming the file."""
    try:
        array = preprocess_image(str(path), SIDE, None, "bilinear", (0.5,) * 3, (0.25,) * 3)
    except UnreadableImageError as error:
        assert str(path) in str(error)
        return
    assert array.shape == (3, SIDE, SIDE) and array.dtype == np.float32
    assert np.isfinite(array).all()
    # Pixel values scaled into [0, 1] before normalising: (x - 0.5) / 0.25 lies in [-2, 2].
    assert array.min() >= -2.0 - 1e-5 and array.max() <= 2.0 + 1e-5


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "random.png"
    path.write_bytes(data)
    _check(path)


@SETTINGS
@given(
    kind=st.sampled_from(FORMATS_AND_MODES),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    keep=st.floats(0.0, 1.0),
    flip=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_odd_modes_truncations_and_flipped_bytes(tmp_path, kind, width, height, seed, keep, flip):
    format_name, mode = kind
    data = bytearray(_encoded(format_name, mode, width, height, seed))
    if flip is not None:
        data[flip % len(data)] ^= 0xFF
    data = data[: max(1, round(len(data) * keep))] if keep < 1.0 else data
    path = tmp_path / f"picture.{format_name.lower()}"
    path.write_bytes(bytes(data))
    _check(path)


@SETTINGS
@given(kind=st.sampled_from(FORMATS_AND_MODES), seed=st.integers(0, 2**16))
def test_every_mode_reads_when_intact(tmp_path, kind, seed):
    format_name, mode = kind
    path = tmp_path / f"picture.{format_name.lower()}"
    path.write_bytes(_encoded(format_name, mode, 12, 9, seed))
    array = preprocess_image(str(path), SIDE, None, "bilinear", (0.0,) * 3, (1.0,) * 3)
    assert array.shape == (3, SIDE, SIDE) and 0.0 <= array.min() and array.max() <= 1.0
