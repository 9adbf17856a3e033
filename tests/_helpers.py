"""Helpers shared by the tests (paths of the optional ../shared data, small models)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MTD_ROOT = SHARED / "data" / "mtd"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"


def small_transformer(**params):
    """A fast random-weight ResNet-18 transformer for 64-96 px images."""
    from skpatchcore import PatchFeatureTransformer

    defaults = dict(backbone="resnet18", weights=None, resize=64, crop_size=None, layers=("layer2", "layer3"))
    defaults.update(params)
    return PatchFeatureTransformer(**defaults)


def small_model(**params):
    """A 96 px random-weight resnet18 PatchCore pipeline, 25% coreset, seeded."""
    from skpatchcore import make_patchcore

    defaults = dict(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.25, random_state=0)
    defaults.update(params)
    return make_patchcore(**defaults)
