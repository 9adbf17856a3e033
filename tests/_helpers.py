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


def rewrite_model_file(source, target, change=None, change_tensors=None):
    """Copy a saved .skpc model, editing it as an attacker would: the checksum is recomputed.

    `change(metadata, description)` edits the safetensors metadata and the parsed JSON
    description in place; `change_tensors(tensors)` edits the dict of tensors in place.
    """
    import json

    from safetensors.torch import load, save

    from skpatchcore.io import model_file as persistence

    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length])["__metadata__"]
    tensors = load(data)
    description = json.loads(metadata["model"])
    if change is not None:
        change(metadata, description)
    if change_tensors is not None:
        change_tensors(tensors)
    metadata["model"] = json.dumps(description)
    metadata["sha256"] = persistence._digest(metadata["model"], tensors)
    target.write_bytes(save(tensors, metadata=metadata))
    return target
