"""Shared fixtures: small generated images."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def synthetic():
    """A small deterministic defect dataset (uint8 RGB, 96 px)."""
    from skpatchcore.datasets import make_synthetic_defects

    return make_synthetic_defects(n_train=16, n_test_good=8, n_test_defect=12, image_size=96, random_state=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """A small MVTec-layout folder of generated 64 px parts (for the command line)."""
    from skpatchcore.datasets import make_synthetic_defects, save_mvtec_layout

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
