"""Tests for skpatchcore.evaluation.figures (figures rendered to PNG files, never shown)."""

import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from skpatchcore.evaluation import figures as plotting  # noqa: E402
from skpatchcore.evaluation.figures import (  # noqa: E402
    overlay_heatmap,
    plot_examples,
    plot_roc_curves,
    plot_triptych,
    save_overlay_png,
)


def _png_size(path):
    with Image.open(path) as opened:
        return opened.size


def test_overlay_heatmap_new_figure_and_saved_png(tmp_path, image, hot_map):
    ax = overlay_heatmap(image, hot_map, alpha=0.4, vmin=0.0, vmax=10.0)
    assert len(ax.images) == 2
    # the map is resized to the image before drawing
    assert ax.images[1].get_array().shape == image.shape[:2]
    assert ax.images[1].get_clim() == (0.0, 10.0)
    path = tmp_path / "overlay.png"
    ax.figure.savefig(path)
    assert path.is_file() and path.stat().st_size > 1000


def test_overlay_heatmap_on_given_axes_from_path(tmp_path, image, hot_map):
    image_path = tmp_path / "part.png"
    Image.fromarray(image).save(image_path)
    figure = plot_triptych(image, hot_map)  # any figure with axes
    ax = figure.axes[0]
    n_before = len(ax.images)
    assert overlay_heatmap(str(image_path), hot_map, ax=ax) is ax
    assert len(ax.images) == n_before + 2


@pytest.mark.parametrize("with_mask", [True, False])
def test_plot_triptych(tmp_path, image, hot_map, with_mask):
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[12:28, 40:60] = True
    figure = plot_triptych(
        image / 255.0, hot_map, mask=mask if with_mask else None, score=3.25, title="part 7"
    )
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3
    assert "part 7" in image_axes[0].get_title() and "3.25" in image_axes[0].get_title()
    assert image_axes[2].get_title() == ("ground truth" if with_mask else "overlay")
    path = tmp_path / "triptych.png"
    figure.savefig(path, dpi=50)
    width, height = _png_size(path)
    assert width > height > 0


def test_plot_examples_grid(tmp_path, image, hot_map):
    figure = plot_examples(
        [image, image[..., 0]], [hot_map, hot_map], masks=[None, hot_map > 5], scores=[1.0, 2.0],
        titles=["a", "b"], vmin=0, vmax=10,
    )
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 6
    path = tmp_path / "grid.png"
    figure.savefig(path, dpi=40)
    assert path.is_file()
    with pytest.raises(ValueError, match="anomaly maps"):
        plot_examples([image], [hot_map, hot_map])


def test_plot_roc_curves_image_and_pixel(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.6, 0.4, 0.8, 0.9])
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:8, 4:8] = True
    maps = rng.random((6, 16, 16)) + 2.0 * masks
    figure = plot_roc_curves(labels, scores, masks=masks, maps=maps)
    assert len(figure.axes) == 2
    legends = [ax.get_legend().get_texts()[0].get_text() for ax in figure.axes]
    assert legends[0] == "image AUROC = 0.889"
    assert legends[1].startswith("pixel AUROC = ")
    path = tmp_path / "roc.png"
    figure.savefig(path, dpi=50)
    assert path.is_file() and path.stat().st_size > 1000


def test_plot_roc_curves_image_only():
    figure = plot_roc_curves([0, 1, 0, 1], [0.2, 0.9, 0.1, 0.5])
    assert len(figure.axes) == 1
    assert "1.000" in figure.axes[0].get_legend().get_texts()[0].get_text()


def test_save_overlay_png_size_and_hot_region(tmp_path, image, hot_map):
    path = save_overlay_png(tmp_path / "sub" / "overlay.png", image, hot_map, vmin=0.0, vmax=10.0)
    assert path.is_file()
    with Image.open(path) as opened:
        assert opened.size == (image.shape[1], image.shape[0])  # (W, H): the image's own size
        assert opened.mode == "RGB"
        overlay = np.asarray(opened).astype(float)
    inside = np.zeros(image.shape[:2], dtype=bool)
    inside[14:26, 42:58] = True  # well inside the hot square (rows 12-28, cols 40-60 after resize)
    outside = np.ones_like(inside)
    outside[8:32, 32:68] = False  # away from the square's blurred border
    red, blue = overlay[..., 0], overlay[..., 2]
    assert red[inside].mean() > red[outside].mean() + 40
    assert blue[outside].mean() > blue[inside].mean() + 40


def test_save_overlay_png_from_path_and_grayscale(tmp_path, hot_map):
    grey = np.linspace(0, 255, 30 * 50).reshape(30, 50).astype(np.uint8)
    source = tmp_path / "grey.png"
    Image.fromarray(grey).save(source)
    out = save_overlay_png(tmp_path / "a.png", source, hot_map, vmin=None, vmax=None)
    assert _png_size(out) == (50, 30)
    out = save_overlay_png(tmp_path / "b.png", grey / 255.0, np.zeros((30, 50)), vmin=None, vmax=None)
    assert _png_size(out) == (50, 30)


def test_missing_matplotlib_gives_install_hint(monkeypatch, image, hot_map, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"skpatchcore\[plot\]"):
        plotting.save_overlay_png(tmp_path / "x.png", image, hot_map, 0, 1)
    with pytest.raises(ImportError, match=r"skpatchcore\[plot\]"):
        plotting.plot_triptych(image, hot_map)


def test_blocked_uint8_blend_matches_matplotlib_colouring(image, hot_map):
    import matplotlib

    from skpatchcore._maps import resize_map

    amap = resize_map(hot_map, image.shape[:2], antialias=True)
    colours = matplotlib.colormaps["jet"](np.clip((amap - 0.0) / 10.0, 0.0, 1.0))[..., :3]
    expected = np.clip(np.rint((0.6 * (image / 255.0) + 0.4 * colours) * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(plotting.blend_overlay(image, amap, 0.0, 10.0, 0.4, rows_per_block=7), expected)


def test_large_overlays_are_downsampled(tmp_path, hot_map):
    assert plotting.overlay_size(9000, 6000) == (2048, 1365) and plotting.overlay_size(30, 50) == (30, 50)
    assert plotting.overlay_size(9000, 6000, max_side=None) == (9000, 6000)
    big = np.full((300, 500, 3), 120, dtype=np.uint8)
    out = save_overlay_png(tmp_path / "big.png", big, hot_map, 0.0, 10.0, max_side=100)
    assert _png_size(out) == (100, 60)


_PEAK_SCRIPT = """
import sys
import numpy as np
import matplotlib, torch  # imported before the baseline
from PIL import Image
from skpatchcore.evaluation.figures import save_overlay_png
def peak_kib():  # VmHWM: getrusage's ru_maxrss survives exec and would report pytest's own peak
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
amap = np.random.default_rng(0).random((112, 112)).astype(np.float32)
before = peak_kib()
save_overlay_png(sys.argv[2], sys.argv[1], amap, 0.0, 1.0)
after = peak_kib()
with Image.open(sys.argv[2]) as out:
    print(out.size, (after - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_overlay_of_a_9000_px_image_stays_within_memory(tmp_path):
    import subprocess

    source = tmp_path / "huge.png"
    Image.new("RGB", (9000, 9000), (90, 120, 150)).save(source, compress_level=1)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(source), str(tmp_path / "o.png")],
                            capture_output=True, text=True, check=True, timeout=600)
    size, grown_mib = result.stdout.split(")")
    assert size == "(2048, 2048"
    # Reading the file as RGB takes about 2 x 232 MiB (decoded, then converted); drawing the overlay at
    # full size as float64 RGBA took about 8.9 GiB more in all.
    assert int(grown_mib) < 1024, result.stdout
