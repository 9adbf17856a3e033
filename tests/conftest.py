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
