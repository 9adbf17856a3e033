"""anomalib's PatchCore on MTD, the peer row of the results page (docs/results.md).

Runs anomalib's own ``PatchcoreModel`` (its torch model, as its Lightning
module drives it: training batches fill the embedding store, one call of
``subsample_embedding`` picks the coreset, evaluation batches give the image
scores and anomaly maps) on the standard MTD protocol with the set-up of the
issue table: EfficientNet-Lite0 ``blocks.2`` + ``blocks.4`` (the ImageNet
weights of ``../shared/weights``), images ``PIL.Image.open(p).convert("RGB")
.resize((224, 224))`` (bicubic, no crop), ImageNet mean/std, 1% coreset and
anomalib's defaults otherwise (``num_neighbors=9`` for its score
re-weighting). Masks are brought to 224 x 224 as skpatchcore's evaluation does
(nearest neighbour), and the metrics are skpatchcore's, so the numbers compare
with ``benchmarks/evaluate_mvtec.py`` and ``benchmarks/model_selection.py``.
The input pipeline below (``load_batch``) is the reference's own, not
skpatchcore's.

anomalib is not a dependency of skpatchcore: run this with an interpreter that
has it (``pip install anomalib==2.7.0`` in a virtual environment created with
``--system-site-packages`` so that it sees skpatchcore), e.g.::

    OMP_NUM_THREADS=1 taskset -c 1 /tmp/anomalib-venv/bin/python benchmarks/anomalib_mtd.py

Prints one JSON line: image and pixel AUROC (overall and per defect type),
coreset time and time per pick, fit time, predict time per image, peak RSS.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from _common import mtd_parser, peak_rss_gb, require, write_json_lines
from PIL import Image

from skpatchcore.evaluation.metrics import image_auroc, pixel_auroc
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.io.images import IMAGENET_MEAN, IMAGENET_STD, preprocess_mask

SIDE = 224


def load_batch(paths: list[str]) -> torch.Tensor:
    """Images as the issue's reference reads them, normalised with ImageNet statistics."""
    arrays = [
        np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE)), dtype=np.float32) / 255.0
        for p in paths
    ]
    batch = (np.stack(arrays) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32))


def build_model(weights: Path, sampling_neighbors: int):
    """anomalib's PatchcoreModel with the local Lite0 ImageNet weights loaded into its backbone."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(
        layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
        pre_trained=False, num_neighbors=sampling_neighbors,
    )
    backbone = model.feature_extractor.feature_extractor
    result = backbone.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"backbone weights missing from {weights}: {result.missing_keys[:5]}")
    unused = [k for k in result.unexpected_keys if not k.startswith(("conv_head", "bn2", "classifier"))]
    if unused:
        raise RuntimeError(f"weights of {weights} not used by the backbone: {unused[:5]}")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--sampling-ratio", type=float, default=0.01)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    require(args.root, args.weights)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    data = load_mvtec(args.root)
    model = build_model(args.weights, args.num_neighbors)

    start = time.perf_counter()
    model.train()
    for i in range(0, len(data.train_images), args.batch_size):
        model(load_batch(data.train_images[i:i + args.batch_size]))
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    coreset_start = time.perf_counter()
    model.subsample_embedding(args.sampling_ratio)
    coreset_s = time.perf_counter() - coreset_start
    fit_s = time.perf_counter() - start
    n_picks = model.memory_bank.shape[0]

    model.eval()
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data.test_images), args.batch_size):
            out = model(load_batch(data.test_images[i:i + args.batch_size]))
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map.reshape(-1, SIDE, SIDE).numpy())
    predict_s = time.perf_counter() - start
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    masks = np.stack([preprocess_mask(m, SIDE, None) for m in data.test_masks])

    labels = np.asarray(data.test_labels)
    types = np.asarray(data.test_defect_types)
    per_type = {}
    for kind in sorted(set(types) - {"good"}):
        keep = (types == kind) | (types == "good")
        per_type[kind] = round(image_auroc(labels[keep], scores[keep]), 3)
    row = dict(
        system=f"anomalib {__import__('anomalib').__version__} PatchcoreModel",
        image_auroc=round(image_auroc(labels, scores), 4),
        pixel_auroc=round(pixel_auroc(masks, maps), 4),
        image_auroc_per_type=per_type,
        n_patches=int(n_patches), coreset_size=int(n_picks),
        coreset_s=round(coreset_s, 1), ms_per_pick=round(1000 * coreset_s / n_picks, 1),
        fit_s=round(fit_s, 1), predict_ms_per_image=round(1000 * predict_s / len(scores), 1),
        peak_rss_gb=round(peak_rss_gb(), 2),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(row))
    if args.output:
        write_json_lines(args.output, [row])


if __name__ == "__main__":
    main()
