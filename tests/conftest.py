"""Shared fixtures: small generated images."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def synthetic():
    """A small deterministic defect dataset (uint8 RGB, 96 px)."""
    from skpatchcore.synthetic import make_synthetic_defects

    return make_synthetic_defects(n_train=16, n_test_good=8, n_test_defect=12, image_size=96, random_state=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def image(rng):
    """A 48 x 80 RGB image (plotting and display tests)."""
    return rng.integers(80, 170, size=(48, 80, 3), dtype=np.uint8)


@pytest.fixture
def hot_map():
    """A 12 x 20 map (a quarter of the image's size) with one hot square."""
    amap = np.full((12, 20), 1.0, dtype=np.float32)
    amap[3:7, 10:15] = 9.0
    return amap


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """A small MVTec-layout folder of generated 64 px parts (for the command line)."""
    from skpatchcore.io.datasets import save_mvtec_layout
    from skpatchcore.synthetic import make_synthetic_defects

    bunch = make_synthetic_defects(n_train=6, n_test_good=2, n_test_defect=3, image_size=64, random_state=0)
    return save_mvtec_layout(bunch, tmp_path_factory.mktemp("data"), category="parts")


@pytest.fixture(scope="module")
def model_path(category, tmp_path_factory):
    """A random-weight resnet18 model fitted on `category` by ``skpatchcore fit`` (safe format)."""
    from skpatchcore.cli import main

    path = tmp_path_factory.mktemp("models") / "model.skpc"
    fast = ["--backbone", "resnet18", "--weights", "none", "--resize", "64", "--no-crop",
            "--layers", "layer2", "layer3", "--quiet"]
    assert main(["fit", str(category / "train"), "-o", str(path), *fast]) == 0
    return path
