"""PatchFeatureTransformer: aggregation math, backbone handling, inputs, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import PatchFeatureTransformer
from skpatchcore.backbones import HookedLayers, TracingFallbackWarning, build_backbone, extract_layers
from skpatchcore.features import aggregate_concat, aggregate_official

from _helpers import LITE0_WEIGHTS, small_transformer


def official_reference(layer_maps, patch_size, pre_dim, target_dim):
    """The official patchcore-inspection steps, written out literally."""
    padding = (patch_size - 1) // 2
    patches, shapes = [], []
    for x in layer_maps:
        unfolded = F.unfold(x, kernel_size=patch_size, padding=padding)  # (B, C*p*p, L)
        unfolded = unfolded.reshape(x.shape[0], x.shape[1], patch_size, patch_size, -1)
        patches.append(unfolded.permute(0, 4, 1, 2, 3))  # (B, L, C, p, p)
        shapes.append(x.shape[-2:])
    ref_h, ref_w = shapes[0]
    for i in range(1, len(patches)):
        p = patches[i]
        h, w = shapes[i]
        p = p.reshape(p.shape[0], h, w, *p.shape[2:]).permute(0, 3, 4, 5, 1, 2)
        base = p.shape
        p = p.reshape(-1, h, w)
        p = F.interpolate(p.unsqueeze(1), size=(ref_h, ref_w), mode="bilinear", align_corners=False).squeeze(1)
        p = p.reshape(*base[:-2], ref_h, ref_w).permute(0, 4, 5, 1, 2, 3)
        patches[i] = p.reshape(len(p), -1, *p.shape[-3:])
    flat = [p.reshape(-1, *p.shape[-3:]) for p in patches]
    pooled = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), pre_dim).squeeze(1) for f in flat]
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    out = F.adaptive_avg_pool1d(stacked, target_dim).reshape(len(pooled[0]), -1)
    return out.reshape(layer_maps[0].shape[0], ref_h, ref_w, target_dim)


@pytest.mark.parametrize("channels,pre,target", [((8, 16), 32, 24), ((40, 112), 1024, 1024), ((5, 7), 64, 16)])
def test_official_aggregation_matches_literal_reference(channels, pre, target):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, channels[0], 8, 6, generator=gen), torch.randn(2, channels[1], 4, 3, generator=gen)]
    expected = official_reference(maps, 3, pre, target)
    got = aggregate_official(maps, 3, pre, target)
    assert got.shape == (2, 8, 6, target)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_concat_aggregation_is_local_mean_upsampled_and_concatenated():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 3, 3, 3, generator=gen)
    got = aggregate_concat([a, b], 3)
    assert got.shape == (1, 6, 6, 7)
    # Centre position of layer a: plain mean of its 3x3 neighbourhood.
    torch.testing.assert_close(got[0, 2, 3, :4], a[0, :, 1:4, 2:5].mean(dim=(1, 2)))
    smoothed_b = F.avg_pool2d(b, 3, stride=1, padding=1)
    upsampled = F.interpolate(smoothed_b, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[0, :, :, 4:], upsampled[0].permute(1, 2, 0))


def test_wide_resnet_default_grid_and_no_later_layers():
    transformer = PatchFeatureTransformer(weights=None)
    images = np.zeros((1, 300, 260, 3), dtype=np.uint8)
    features = transformer.fit_transform(images)
    assert features.shape == (1, 28, 28, 1024)
    assert features.dtype == np.float32
    assert transformer.input_size_ == (224, 224)
    # The traced extractor holds only what layer2 and layer3 need: no layer4, no classifier.
    assert isinstance(transformer.backbone_, torch.fx.GraphModule)
    names = {name for name, _ in transformer.backbone_.named_modules()}
    assert "layer3.5.conv3" in names
    assert not any(name.startswith(("layer4", "fc", "avgpool")) for name in names)
    assert sum(p.numel() for p in transformer.backbone_.parameters()) == 24_862_528


class ShapeDependentNet(torch.nn.Module):
    """A backbone fx cannot trace: Python control flow on the input's size."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.layer1 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer3 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2:  # fx cannot turn a traced size into a bool
            x = x[..., :-1]
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


def test_untraceable_backbone_uses_hooks_and_stops_after_the_last_layer():
    with pytest.warns(TracingFallbackWarning, match=r"cannot trace ShapeDependentNet .*TraceError"):
        transformer = PatchFeatureTransformer(ShapeDependentNet(), layers=("layer1", "layer2"), weights=None,
                                              resize=64, crop_size=None).fit()
    assert isinstance(transformer.backbone_, HookedLayers)
    assert isinstance(transformer.backbone_.network.layer3, torch.nn.Identity)  # never runs: pruned
    calls = []
    transformer.backbone_.network.layer2.register_forward_hook(lambda *args: calls.append(1))
    features = transformer.transform(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert calls == [1] and features.shape == (2, 8, 8, 1024)


class SamePaddingConv(torch.nn.Conv2d):
    """TensorFlow-style "same" padding computed from the input size (like timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class ScaledConv(torch.nn.Conv2d):
    """A Conv2d subclass that is not a padded convolution."""

    def forward(self, x):
        return 2 * super().forward(x)


class PaddedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = SamePaddingConv(3, 8, 3, stride=2, padding=0)
        self.layer2 = ScaledConv(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.layer2(self.layer1(x))


def test_input_size_dependent_padding_is_fixed_for_the_transformer_size(rng):
    network = PaddedNet().eval()
    transformer = PatchFeatureTransformer(network, layers=("layer1", "layer2"), weights=None,
                                          resize=64, crop_size=None).fit()  # asymmetric padding: (0, 1)
    extractor = transformer.backbone_
    assert isinstance(extractor, torch.fx.GraphModule)
    assert isinstance(extractor.layer1, torch.nn.Sequential)  # ZeroPad2d + Conv2d
    assert isinstance(extractor.layer1[0], torch.nn.ZeroPad2d)
    assert isinstance(extractor.layer2, ScaledConv)  # not a padding variant: kept as it is
    images = torch.from_numpy(rng.normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.inference_mode():
        expected = extract_layers(network, images, ("layer1", "layer2"))
        got = extractor(images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_traced_extractor_matches_the_hooked_network(rng):
    transformer = small_transformer().fit()
    assert isinstance(transformer.backbone_, torch.fx.GraphModule)
    network = build_backbone("resnet18", None)
    missing, _ = network.load_state_dict(transformer.backbone_.state_dict(), strict=False)
    assert all(key.startswith(("layer4", "fc")) for key in missing)  # same names, layers 1-3 kept
    images = torch.from_numpy(rng.normal(size=(3, 3, 64, 64)).astype(np.float32))
    with torch.inference_mode():
        expected = extract_layers(network.eval(), images, ("layer2", "layer3"))
        got = transformer.backbone_(images)
    assert len(got) == 2
    for a, b in zip(got, expected):  # NHWC vs NCHW convolutions: float rounding only
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_preprocess_is_what_the_backbone_sees(rng):
    images = rng.integers(0, 256, (2, 80, 100, 3), dtype=np.uint8)
    transformer = small_transformer(aggregation="concat", resize=72, crop_size=64).fit()
    inputs = transformer.preprocess(images)
    assert inputs.shape == (2, 3, *transformer.input_size_) == (2, 3, 64, 64)
    assert inputs.dtype == np.float32
    with torch.inference_mode():
        layer_maps = transformer.backbone_(torch.from_numpy(inputs).contiguous(memory_format=torch.channels_last))
        expected = aggregate_concat(layer_maps, transformer.patch_size).numpy()
    np.testing.assert_allclose(transformer.transform(images), expected, rtol=1e-5, atol=1e-5)
    white = np.full((1, 30, 30, 3), 255, dtype=np.uint8)
    grey = small_transformer(mean=(0.5,) * 3, std=(0.5,) * 3).fit()
    np.testing.assert_allclose(grey.preprocess(white), 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    with pytest.raises(NotFittedError):
        small_transformer().preprocess(white)


def test_input_forms_give_the_same_features(tmp_path, rng):
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    transformer = small_transformer().fit()
    from_array = transformer.transform(image[None])
    from_path = transformer.transform([str(path)])
    from_list = transformer.transform([image])
    from_float = transformer.transform(image[None].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(from_array, from_path)
    np.testing.assert_array_equal(from_array, from_list)
    np.testing.assert_allclose(from_array, from_float, atol=1e-4)


def test_grayscale_and_differing_sizes(rng):
    grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    transformer = small_transformer().fit()
    np.testing.assert_array_equal(
        transformer.transform(grey[None]), transformer.transform(np.repeat(grey[None, ..., None], 3, axis=-1))
    )
    mixed = [rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 40), dtype=np.uint8)]
    assert transformer.transform(mixed).shape == (2, 8, 8, 1024)


def test_resize_and_crop_geometry():
    cropped = small_transformer(resize=80, crop_size=64).fit()
    assert cropped.input_size_ == (64, 64)
    assert cropped.transform(np.zeros((1, 100, 200, 3), dtype=np.uint8)).shape == (1, 8, 8, 1024)
    square = small_transformer(resize=96, crop_size=None).fit()
    assert square.input_size_ == (96, 96)


def test_concat_option_dimension():
    transformer = small_transformer(aggregation="concat").fit()
    assert transformer.feature_shape_ == (8, 8, 128 + 256)


def test_local_weights_file_round_trip(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    transformer = small_transformer(weights=str(path)).fit()
    torch.testing.assert_close(transformer.backbone_.conv1.weight, reference.conv1.weight)
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not match the backbone"):
        small_transformer(weights=str(wrong)).fit()
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        small_transformer(weights=str(tmp_path / "missing.pth")).fit()


def test_named_weights_offline_error_suggests_a_local_file(monkeypatch):
    from urllib.error import URLError

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="weights='/path/to/weights.pth'"):
        small_transformer(weights="IMAGENET1K_V1").fit()


def test_custom_module_backbone():
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    )
    transformer = PatchFeatureTransformer(backbone=module, layers=("0", "1"), weights=None, resize=32, crop_size=None)
    features = transformer.fit_transform(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    assert features.shape == (1, 16, 16, 1024)
    assert transformer.backbone_ is not module  # the user's module is not modified


@pytest.mark.skipif(not LITE0_WEIGHTS.is_file(), reason="../shared/weights (EfficientNet-Lite0) not present")
def test_timm_efficientnet_lite0_with_local_weights():
    pytest.importorskip("timm")
    transformer = PatchFeatureTransformer(
        backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=str(LITE0_WEIGHTS),
        resize=224, crop_size=None,
    )
    features = transformer.fit_transform(np.full((1, 224, 224, 3), 128, dtype=np.uint8))
    # aggregation="auto": concat for EfficientNets, 40 + 112 channels of blocks.2 and blocks.4
    assert transformer.aggregation_ == "concat" and features.shape == (1, 28, 28, 152)
    official = transformer.set_params(aggregation="mean_pool").fit()
    assert official.aggregation_ == "mean_pool" and official.feature_shape_ == (28, 28, 1024)
    # TF "same" padding is computed from the input size: for the transformer's
    # fixed size it becomes ZeroPad2d + Conv2d, and no timm class is left.
    assert isinstance(transformer.backbone_, torch.fx.GraphModule)
    classes = {type(module) for module in transformer.backbone_.modules()}
    assert torch.nn.ZeroPad2d in classes
    assert all(cls.__module__.startswith("torch.") for cls in classes)


def test_auto_aggregation_is_the_papers_except_for_efficientnets():
    assert small_transformer().fit().aggregation_ == "mean_pool"
    assert small_transformer(aggregation="concat").fit().aggregation_ == "concat"

    class EfficientNet(torch.nn.Sequential):
        """A module named like timm's EfficientNet class."""

    module = EfficientNet(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1))
    transformer = PatchFeatureTransformer(backbone=module, layers=("0",), weights=None, resize=16, crop_size=None)
    assert transformer.fit().aggregation_ == "concat" and transformer.feature_shape_ == (8, 8, 8)


def _resolved(transformer):
    fitted = transformer.fit()
    return fitted.resize_, fitted.crop_size_, fitted.interpolation_, fitted.aggregation_, fitted.mean_


@pytest.mark.parametrize("variant, side", [("0", 224), ("1", 240), ("2", 260)])
def test_recommended_recipe_for_efficientnets_is_the_checkpoints_input_without_crop(variant, side):
    """A user who sets only backbone, layers and weights gets the native size, no crop, bicubic, concat."""
    pytest.importorskip("timm")
    transformer = PatchFeatureTransformer(
        backbone=f"timm:tf_efficientnet_lite{variant}", layers=("blocks.2", "blocks.4"), weights=None
    )
    assert _resolved(transformer) == (side, None, "bicubic", "concat", (0.5,) * 3)
    assert transformer.input_size_ == (side, side)
    # The geometry is applied: a 2:1 image is squashed to side x side, not cropped.
    wide = np.zeros((side, 2 * side, 3), dtype=np.uint8)
    wide[:, -side // 4:] = 255  # a bright band at the right border
    view = transformer._preprocess(wide)
    assert view.shape == (3, side, side)
    assert view[:, :, -1].mean() > 0.9  # (1 - 0.5) / 0.5 = 1: the border band is still there


def test_official_recipe_for_every_backbone():
    from skpatchcore.io.images import IMAGENET_MEAN

    pytest.importorskip("timm")
    lite = PatchFeatureTransformer(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                                   weights=None, recipe="official")
    assert _resolved(lite) == (256, 224, "bilinear", "mean_pool", IMAGENET_MEAN)
    assert lite.feature_shape_ == (28, 28, 1024)
    # Torchvision backbones get the official recipe under both names.
    for recipe in ("recommended", "official"):
        resnet = PatchFeatureTransformer(backbone="resnet18", weights=None, recipe=recipe)
        assert _resolved(resnet) == (256, 224, "bilinear", "mean_pool", IMAGENET_MEAN)
    # The reference set-up of the benchmarks: the official recipe with the MTD geometry.
    reference = lite.set_params(resize=224, crop_size=None, interpolation="bicubic")
    assert _resolved(reference) == (224, None, "bicubic", "mean_pool", IMAGENET_MEAN)


def test_explicit_geometry_wins_over_the_recipe():
    pytest.importorskip("timm")
    lite = PatchFeatureTransformer(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                                   weights=None, resize=256, crop_size=224, interpolation="bilinear")
    assert _resolved(lite)[:3] == (256, 224, "bilinear") and lite.input_size_ == (224, 224)
    # An explicit resize below the recipe's crop drops the crop rather than failing.
    assert _resolved(small_transformer(resize=200, crop_size="auto"))[:2] == (200, None)
    assert _resolved(small_transformer(resize=200, crop_size=96))[:2] == (200, 96)
    with pytest.raises(ValueError, match=r"crop_size must be None or in \[1, resize=200\], got 224"):
        small_transformer(resize=200, crop_size=224).fit()
    with pytest.raises(ValueError, match=r"crop_size must be None or in \[1, resize=256\], got 300"):
        small_transformer(resize="auto", crop_size=300).fit()
    for name, bad in [("recipe", "paper"), ("resize", "big"), ("crop_size", 0), ("interpolation", "cubic")]:
        with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of PatchFeatureTransformer must be"):
            small_transformer(**{name: bad}).fit()


def test_auto_normalisation_follows_the_weights():
    """torchvision weights expect ImageNet statistics; timm's TF ports say so in pretrained_cfg."""
    from skpatchcore.io.images import IMAGENET_MEAN, IMAGENET_STD

    torchvision_model = small_transformer().fit()
    assert (torchvision_model.mean_, torchvision_model.std_) == (IMAGENET_MEAN, IMAGENET_STD)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1))
    module.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    transformer = PatchFeatureTransformer(backbone=module, layers=("0",), weights=None, resize=16, crop_size=None)
    white = np.full((1, 16, 16, 3), 255, dtype=np.uint8)
    transformer.fit(white)
    assert (transformer.mean_, transformer.std_) == ((0.5,) * 3, (0.5,) * 3)
    np.testing.assert_allclose(transformer._preprocess(white[0]), 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    explicit = transformer.set_params(mean=(0.0, 0.0, 0.0), std=[1, 1, 1]).fit(white)
    assert explicit.std_ == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(explicit._preprocess(white[0]), 1.0, atol=1e-6)
    for bad in ((0.5, 0.5), (0.5, float("nan"), 0.5)):
        with pytest.raises(ValueError, match="mean must be 'auto' or 3 finite numbers"):
            transformer.set_params(mean=bad, std="auto").fit(white)
    with pytest.raises(InvalidParameterError, match="'mean' parameter of PatchFeatureTransformer must be"):
        transformer.set_params(mean="imagenet", std="auto").fit(white)
    with pytest.raises(ValueError, match="std must be 'auto' or 3 finite numbers > 0"):
        transformer.set_params(mean="auto", std=(0.5, 0.0, 0.5)).fit(white)


@pytest.mark.skipif(not LITE0_WEIGHTS.is_file(), reason="../shared/weights (EfficientNet-Lite0) not present")
def test_lite0_is_normalised_as_its_tensorflow_training():
    pytest.importorskip("timm")
    transformer = PatchFeatureTransformer(
        backbone="timm:tf_efficientnet_lite0", layers=("blocks.2",), weights=str(LITE0_WEIGHTS), resize=32,
        crop_size=None,
    ).fit()
    assert (transformer.mean_, transformer.std_) == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(
    "X, error, match",
    [
        (np.zeros((2, 32, 32, 4), dtype=np.uint8), ValueError, "4 channels"),
        (np.zeros((2, 32), dtype=np.uint8), ValueError, "shape"),
        (np.full((1, 32, 32, 3), np.nan, dtype=np.float32), ValueError, "NaN"),
        (np.full((1, 32, 32, 3), 255.0, dtype=np.float32), ValueError, r"scaled to \[0, 1\]"),
        (np.full((1, 32, 32, 3), -1, dtype=np.int64), ValueError, "negative values"),
        (np.zeros((1, 32, 32, 3), dtype=np.complex64), ValueError, "dtype complex64"),
        ([], ValueError, "no images"),
        ("part.png", TypeError, "single path"),
        (["/nonexistent/part.png"], FileNotFoundError, "/nonexistent/part.png"),
    ],
)
def test_bad_images_raise_clear_errors(X, error, match):
    transformer = small_transformer().fit()
    with pytest.raises(error, match=match):
        transformer.transform(X)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        small_transformer().fit().transform([str(bad)])


def test_unfitted_and_bad_parameters():
    with pytest.raises(NotFittedError):
        small_transformer().transform(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="Layer 'layer9' not found"):
        small_transformer(layers=("layer2", "layer9")).fit()
    with pytest.raises(ValueError, match="Unknown backbone"):
        small_transformer(backbone="no_such_net").fit()
    with pytest.raises(ValueError, match="aggregation"):
        small_transformer(aggregation="max").fit()
    with pytest.raises(ValueError, match="patch_size must be odd"):
        small_transformer(patch_size=2).fit()


def test_masks_follow_the_image_geometry():
    from skpatchcore.io.images import preprocess_mask

    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 90:110] = True  # centred square
    cropped = preprocess_mask(mask, 80, 64)
    assert cropped.shape == (64, 64) and cropped[28:36, 28:36].all() and not cropped[:10].any()
    square = preprocess_mask(mask, 50, None)
    assert square.shape == (50, 50) and square[20:29, 23:27].all()
    assert not preprocess_mask(None, 50, None).any()


def test_random_weights_are_seeded_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = small_transformer(random_state=0).fit()
    after = torch.rand(1)
    b = small_transformer(random_state=0).fit()
    c = small_transformer(random_state=1).fit()
    assert torch.equal(before, after)  # the global RNG stream is unchanged
    torch.testing.assert_close(a.backbone_.conv1.weight, b.backbone_.conv1.weight)
    assert not torch.equal(a.backbone_.conv1.weight, c.backbone_.conv1.weight)


def test_colour_array_masks_match_grey_ones():
    from skpatchcore.io.images import preprocess_mask

    grey = np.zeros((40, 40), dtype=np.uint8)
    grey[10:20, 5:15] = 255
    colour = np.zeros((40, 40, 3), dtype=np.uint8)
    colour[10:20, 5:15, 0] = 255  # defect drawn in the red channel only
    np.testing.assert_array_equal(preprocess_mask(colour, 32, None), preprocess_mask(grey, 32, None))
    assert preprocess_mask(colour, 32, None).shape == (32, 32)
    with pytest.raises(ValueError, match="must be 2-D"):
        preprocess_mask(np.zeros((2, 40, 40, 3)), 32, None)


def _on_grid(features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, h, w, d) features resampled bilinearly onto `grid`, antialiased when shrinking."""
    tensor = torch.from_numpy(features).permute(0, 3, 1, 2)
    shrink = tensor.shape[2] > grid[0]
    return F.interpolate(tensor, size=grid, mode="bilinear", align_corners=False,
                         antialias=shrink).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("geometry", [dict(resize=64, crop_size=None), dict(resize=80, crop_size=64)])
def test_scales_append_each_scales_features_on_the_first_grid(rng, geometry):
    images = rng.integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    multi = small_transformer(aggregation="concat", scales=(1.0, 0.5, 2.0), random_state=0, **geometry).fit()
    got = multi.transform(images)
    single = small_transformer(aggregation="concat", random_state=0, **geometry).fit()
    assert multi.input_size_ == single.input_size_ == (64, 64)
    assert multi.feature_shape_ == got.shape[1:] == (8, 8, 3 * 384)
    np.testing.assert_array_equal(got[..., :384], single.transform(images))
    for block, scale in ((1, 0.5), (2, 2.0)):
        crop = None if geometry["crop_size"] is None else int(scale * geometry["crop_size"])
        view = small_transformer(aggregation="concat", random_state=0, resize=int(scale * geometry["resize"]),
                                 crop_size=crop).fit()
        assert view.transform(images).shape[1] == 8 * scale
        np.testing.assert_allclose(got[..., block * 384:(block + 1) * 384],
                                   _on_grid(view.transform(images), (8, 8)), rtol=1e-5, atol=1e-5)


def test_scales_read_each_file_once(tmp_path, rng, monkeypatch):
    import skpatchcore.io.images as images_module

    path = tmp_path / "part.png"
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    reads = []
    original = images_module.read_pixels
    monkeypatch.setattr(images_module, "read_pixels", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    transformer = small_transformer(scales=(1.0, 0.5)).fit()
    from_file = transformer.transform([str(path)])
    assert reads == [str(path)]
    np.testing.assert_array_equal(from_file, transformer.transform(np.asarray(Image.open(path))[None]))


@pytest.mark.parametrize("scales", [(), (0.5, 1.0), (1.0, -0.5), (1.0, 0.0), (1.0, float("nan")),
                                    (1.0, True), (1.0, "0.5")])
def test_bad_scales_raise_a_clear_error(scales):
    with pytest.raises(ValueError, match=r"scales must be a tuple of positive numbers whose first is 1\.0"):
        small_transformer(scales=scales).fit()


@pytest.mark.parametrize("scales", ["1.0", 1.0])
def test_scales_that_are_not_a_sequence_are_an_invalid_parameter(scales):
    with pytest.raises(InvalidParameterError, match="'scales' parameter of PatchFeatureTransformer must be"):
        small_transformer(scales=scales).fit()


def test_a_scale_the_backbone_cannot_take_is_refused_at_fit():
    class NeedsAtLeast16(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 16)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"scales=\(1\.0, 0\.2\): the backbone cannot take a 13 x 13 input"):
        PatchFeatureTransformer(backbone=NeedsAtLeast16(), layers=("conv",), weights=None, resize=64,
                                crop_size=None, scales=(1.0, 0.2)).fit()


def test_scales_of_a_network_padding_by_input_size_match_the_network_at_each_size(rng):
    # timm's tf_ EfficientNets pad by the input size ("same" padding): a trace with the padding fixed for the
    # first scale's size would compute other numbers at the other scales' sizes, so the hooks run there.
    pytest.importorskip("timm")
    params = dict(backbone="timm:tf_efficientnet_lite0", weights=None, layers=("blocks.2", "blocks.4"),
                  random_state=0, resize=64, crop_size=None)
    images = rng.integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    multi = PatchFeatureTransformer(scales=(1.0, 0.78), **params).fit()
    assert isinstance(multi.backbone_, HookedLayers)
    got = multi.transform(images)
    single = PatchFeatureTransformer(**params).fit()
    assert not isinstance(single.backbone_, HookedLayers)  # one size: the trace with fixed padding
    np.testing.assert_allclose(got[..., :152], single.transform(images), rtol=1e-5, atol=1e-5)
    view = PatchFeatureTransformer(**{**params, "resize": 50}).fit()  # round(0.78 * 64) = 50
    np.testing.assert_allclose(got[..., 152:], _on_grid(view.transform(images), (8, 8)), rtol=1e-5, atol=1e-5)
