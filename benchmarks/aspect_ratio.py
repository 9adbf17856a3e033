"""What keeping the aspect ratio of MTD's non-square tiles gives, measured by hand.

PatchFeatureTransformer squashes every image to one square size, so all
images share one patch grid. This script measures the alternative without
changing the estimators: each image is resized with its aspect ratio kept,
its patch features are computed on its own grid (the Lite0 network itself,
whose "same" padding follows each size, and the transformer's aggregation;
one image per forward pass), the 1% coreset is taken over
all training patches, and each test image's patch scores (exact nearest
neighbour) are upsampled to the 224 x 224 evaluation geometry and smoothed
(sigma 4 and 16). Modes:

* ``square``: the recommended Lite0 recipe's 224 x 224 squash (the reference);
* ``area``: aspect ratio kept, as many pixels as 224 x 224;
* ``height``: aspect ratio kept, height 224;
* ``scale``: every tile at 0.7 times its original size (one pixel size for all).

``--standardise`` adds, per mode, the same with every feature dimension
scaled to zero mean and unit variance over the training patches.

Example::

    OMP_NUM_THREADS=2 python benchmarks/aspect_ratio.py --modes square area height scale --standardise square area
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import training_images
from skpatchcore import CoresetSampler, PatchFeatureTransformer
from skpatchcore.backbones import build_backbone, extract_layers
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.evaluation import masks_at_map_geometry
from skpatchcore.evaluation.metrics import image_auroc, pixel_auroc
from skpatchcore.search import brute_force_kneighbors

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--root", type=Path, default=SHARED / "data" / "mtd")
parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
parser.add_argument("--modes", nargs="+", default=["square", "area", "height", "scale"],
                    choices=["square", "area", "height", "scale"])
parser.add_argument("--standardise", nargs="*", default=[], choices=["square", "area", "height", "scale"],
                    help="modes also measured with standardised feature dimensions")
args = parser.parse_args()
data = load_mvtec(args.root)
labels, types = np.asarray(data.test_labels), np.asarray(data.test_defect_types)
transformer = PatchFeatureTransformer(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                                      weights=args.weights, random_state=0).fit()
masks = np.asarray(masks_at_map_geometry(transformer, data.test_masks, data.test_images))
mean, std = np.asarray(transformer.mean_, np.float32), np.asarray(transformer.std_, np.float32)
network = build_backbone("timm:tf_efficientnet_lite0", args.weights).to(memory_format=torch.channels_last)


def size_for(width: int, height: int, mode: str) -> tuple[int, int]:
    factor = {"square": None, "area": 224 / np.sqrt(width * height), "height": 224 / height, "scale": 0.7}[mode]
    return (224, 224) if factor is None else (max(32, round(width * factor)), max(32, round(height * factor)))


def grids(paths, mode: str) -> list[np.ndarray]:
    """Each image's (h, w, d) patch features on its own grid.

    The network itself runs (not the transformer's trace, whose "same"
    padding is fixed for 224 x 224), so the padding follows each size.
    """
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        image = image.resize(size_for(*image.size, mode), Image.Resampling.BICUBIC)
        array = (np.asarray(image, np.float32) / 255 - mean) / std
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out.append(transformer._aggregate(extract_layers(network, tensor, transformer.layers))[0].numpy())
    return out


def evaluate(mode: str, train: list, test: list, standardise: bool) -> dict:
    start = time.perf_counter()
    rows = np.concatenate([g.reshape(-1, g.shape[-1]) for g in train])
    shift, scale = (rows.mean(0), rows.std(0) + 1e-6) if standardise else (0.0, 1.0)
    bank = CoresetSampler(sampling_ratio=0.01, random_state=0).fit_transform((rows - shift) / scale)
    bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    scores, maps = [], {4: [], 16: []}
    for grid in test:
        queries = (grid.reshape(-1, grid.shape[-1]) - shift) / scale
        distances = brute_force_kneighbors(queries.astype(np.float32), bank, 1)[0][:, 0].reshape(grid.shape[:2])
        scores.append(distances.max())
        up = F.interpolate(torch.from_numpy(distances)[None, None], size=(224, 224), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        for sigma in maps:
            maps[sigma].append(gaussian_filter(up, sigma))
    scores = np.asarray(scores)
    row = {"mode": mode, "standardised": standardise, "image": round(float(image_auroc(labels, scores)), 4)}
    for sigma, sigma_maps in maps.items():
        row[f"pixel_sigma{sigma}"] = round(float(pixel_auroc(masks, np.stack(sigma_maps))), 4)
    for kind in sorted(set(types) - {"good"}):
        keep = (types == "good") | (types == kind)
        row[f"image_{kind}"] = round(float(image_auroc(labels[keep], scores[keep])), 3)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


for mode in args.modes:
    train, test = grids(training_images(762, args.root), mode), grids(list(data.test_images), mode)
    for standardise in (False, True) if mode in args.standardise else (False,):
        print(json.dumps(evaluate(mode, train, test, standardise)), flush=True)
