"""Tests for skpatchcore.io.datasets."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from skpatchcore.io.datasets import load_masks, load_mvtec, save_mvtec_layout
from skpatchcore.synthetic import make_synthetic_defects

MTD_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mtd"


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_defects(
        n_train=5, n_test_good=3, n_test_defect=6, image_size=64, random_state=0
    )


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------
# make_synthetic_defects


def test_synthetic_shapes_and_types(synthetic):
    d = synthetic
    assert d.train_images.shape == (5, 64, 64, 3)
    assert d.test_images.shape == (9, 64, 64, 3)
    assert d.train_images.dtype == d.test_images.dtype == np.uint8
    assert d.test_masks.shape == (9, 64, 64) and d.test_masks.dtype == bool
    assert d.test_labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert d.test_defect_types == ["good"] * 3 + ["scratch", "spot", "crack"] * 2


def test_synthetic_deterministic():
    kwargs = dict(n_train=3, n_test_good=2, n_test_defect=3, image_size=48)
    a = make_synthetic_defects(random_state=1, **kwargs)
    b = make_synthetic_defects(random_state=1, **kwargs)
    c = make_synthetic_defects(random_state=2, **kwargs)
    for key in ("train_images", "test_images", "test_masks", "test_labels"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a.train_images, c.train_images)
    assert not np.array_equal(a.test_masks, c.test_masks)
    # images of one dataset differ from each other (random phase / offset)
    assert not np.array_equal(a.train_images[0], a.train_images[1])


def test_synthetic_masks_and_contrast(synthetic):
    d = synthetic
    coverage = d.test_masks.reshape(len(d.test_masks), -1).mean(axis=1)
    assert np.all(coverage[d.test_labels == 0] == 0)
    defect_coverage = coverage[d.test_labels == 1]
    assert np.all((defect_coverage >= 0.005) & (defect_coverage <= 0.05))
    grey = d.test_images.astype(float).mean(axis=-1)
    for image, mask in zip(grey[d.test_labels == 1], d.test_masks[d.test_labels == 1]):
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        assert abs(image[mask].mean() - image[ring].mean()) >= 60


def test_synthetic_normal_images_share_statistics(synthetic):
    grey = synthetic.train_images.astype(float).mean(axis=-1)
    means = grey.mean(axis=(1, 2))
    stds = grey.std(axis=(1, 2))
    assert np.ptp(means) < 15 and np.ptp(stds) < 5
    assert np.all(stds > 5)  # textured, not flat


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": -1}, "n_train"),
        ({"n_test_defect": 1.5}, "n_test_defect"),
        ({"image_size": 16}, "image_size"),
    ],
)
def test_synthetic_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_defects(**kwargs)


# --------------------------------------------------------------------------
# save_mvtec_layout / load_mvtec / load_masks


def test_round_trip(synthetic, tmp_path):
    d = synthetic
    path = save_mvtec_layout(d, tmp_path, category="part")
    assert path == tmp_path / "part"
    for data in (load_mvtec(path), load_mvtec(tmp_path, category="part")):
        assert data.category == "part"
        assert len(data.train_images) == 5
        assert len(data.test_images) == 9
        assert data.test_labels.dtype.kind == "i"
        assert data.test_labels.sum() == 6
        # sorted by defect type, then file name
        assert data.test_defect_types == sorted(data.test_defect_types)
        assert [m is None for m in data.test_masks] == (data.test_labels == 0).tolist()

    index = [int(Path(p).stem) for p in data.test_images]
    assert sorted(index) == list(range(9))
    assert data.test_defect_types == [d.test_defect_types[i] for i in index]
    np.testing.assert_array_equal(data.test_labels, d.test_labels[index])
    for p, i in zip(data.test_images, index):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), d.test_images[i])
    train_image = np.asarray(Image.open(data.train_images[2]))
    np.testing.assert_array_equal(train_image, d.train_images[2])

    masks = load_masks(data.test_masks, size=64)
    assert masks.shape == (9, 64, 64) and masks.dtype == bool
    np.testing.assert_array_equal(masks, d.test_masks[index])
    as_list = load_masks(data.test_masks, image_sizes=[(64, 64)] * 9)
    assert isinstance(as_list, list)
    np.testing.assert_array_equal(np.stack(as_list), d.test_masks[index])


def test_save_refuses_non_empty_folder(synthetic, tmp_path):
    save_mvtec_layout(synthetic, tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        save_mvtec_layout(synthetic, tmp_path)


def test_load_mvtec_extensions_and_sorting(tmp_path):
    img = np.zeros((6, 8), np.uint8)
    _write(tmp_path / "train" / "good" / "b.JPG", img)
    _write(tmp_path / "train" / "good" / "a.png", img)
    (tmp_path / "train" / "good" / "notes.txt").write_text("not an image")
    _write(tmp_path / "test" / "good" / "z.bmp", img)
    _write(tmp_path / "test" / "dent" / "y.tif", img)
    _write(tmp_path / "test" / "dent" / "x.jpeg", img)
    _write(tmp_path / "ground_truth" / "dent" / "x_mask.png", img)
    _write(tmp_path / "ground_truth" / "dent" / "y_mask.png", img)
    data = load_mvtec(tmp_path)
    assert [Path(p).name for p in data.train_images] == ["a.png", "b.JPG"]
    assert [Path(p).name for p in data.test_images] == ["x.jpeg", "y.tif", "z.bmp"]
    assert data.test_defect_types == ["dent", "dent", "good"]
    assert data.test_labels.tolist() == [1, 1, 0]
    assert Path(data.test_masks[0]).name == "x_mask.png"
    assert data.test_masks[2] is None
    assert all(isinstance(p, str) for p in data.train_images + data.test_images)


def test_load_mvtec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec(tmp_path, category="missing")
    with pytest.raises(FileNotFoundError, match="train/good"):
        load_mvtec(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images found"):
        load_mvtec(tmp_path)
    _write(tmp_path / "train" / "good" / "0.png", np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match="test folder"):
        load_mvtec(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images found"):
        load_mvtec(tmp_path)
    image = tmp_path / "test" / "hole" / "007.png"
    _write(image, np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match="007.png") as info:
        load_mvtec(tmp_path)
    assert str(image) in str(info.value)


def test_load_masks_values_resize_and_none(tmp_path):
    mask = np.zeros((6, 10), np.uint8)
    mask[1:3, 2:5] = 1  # 0/1 masks count as defect too
    _write(tmp_path / "a.png", mask)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0, 2] = 255
    _write(tmp_path / "b.png", rgb)
    paths = [tmp_path / "a.png", None, str(tmp_path / "b.png")]

    masks = load_masks(paths, image_sizes=[(6, 10), (3, 5), (4, 4)])
    assert [m.shape for m in masks] == [(6, 10), (3, 5), (4, 4)]
    assert all(m.dtype == bool for m in masks)
    np.testing.assert_array_equal(masks[0], mask != 0)
    assert not masks[1].any()
    assert masks[2].sum() == 1 and masks[2][0, 0]

    resized = load_masks(paths, size=(12, 20))
    assert resized.shape == (3, 12, 20) and resized.dtype == bool
    np.testing.assert_array_equal(resized[0], np.kron(mask, np.ones((2, 2))) != 0)
    assert load_masks(paths[:1], size=3).shape == (1, 3, 3)
    assert load_masks([], size=5).shape == (0, 5, 5)


def test_load_masks_errors(tmp_path):
    _write(tmp_path / "a.png", np.zeros((6, 10)))
    with pytest.raises(ValueError, match="mask_paths\\[1\\] is None"):
        load_masks([tmp_path / "a.png", None])
    with pytest.raises(ValueError, match="mismatched lengths"):
        load_masks([tmp_path / "a.png"], image_sizes=[(6, 10), (6, 10)])
    with pytest.raises(ValueError, match="has shape \\(6, 10\\)"):
        load_masks([tmp_path / "a.png"], image_sizes=[(10, 6)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_masks([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="size"):
        load_masks([tmp_path / "a.png"], size=0)


# --------------------------------------------------------------------------
# real data


@pytest.mark.skipif(not MTD_ROOT.is_dir(), reason=f"MTD data not found at {MTD_ROOT}")
def test_load_mvtec_mtd():
    data = load_mvtec(MTD_ROOT)
    assert len(data.train_images) == 762
    assert len(data.test_images) == 582
    assert int(data.test_labels.sum()) == 392
    assert data.test_defect_types.count("good") == 190
    assert all(Path(m).is_file() for m in data.test_masks if m is not None)
    first = next(i for i, m in enumerate(data.test_masks) if m is not None)
    with Image.open(data.test_images[first]) as image:
        width, height = image.size
    (mask,) = load_masks([data.test_masks[first]], image_sizes=[(height, width)])
    assert mask.any()
