"""Fit and evaluate PatchCore on MVTec-layout folders; print accuracy and cost.

Example (the reference set-up on Magnetic Tile Defects)::

    python benchmarks/evaluate_mvtec.py ../shared/data/mtd \\
        --backbone timm:tf_efficientnet_lite0 \\
        --weights ../shared/weights/tf_efficientnet_lite0_imagenet.pth \\
        --layers blocks.2 blocks.4 --resize 224 --no-crop --interpolation bicubic \\
        --sampling-ratio 0.01 0.1 --working-memory 8192

Fit and scoring go through :class:`~skpatchcore.PatchCorePipeline` in chunks of
``--working-memory`` MiB; a budget that holds all the training features
(8192 MiB for MTD's 762 images with Lite0) fits with one greedy pass.

``ROOT`` is either one category folder (holding ``train/``, e.g.
``../shared/data/mtd`` or ``../shared/data/deeppcb``) or a folder of categories
(pick them with ``--categories``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import peak_rss_gb, print_header, print_row, require

from skpatchcore import make_patchcore
from skpatchcore.evaluation import evaluate
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.io.images import IMAGENET_MEAN, IMAGENET_STD


def subsample(items: list, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    index = np.arange(len(items))
    if limit is not None and limit < len(items):
        index = np.sort(rng.choice(index, limit, replace=False))
    return index


def run_category(path: Path, args, ratio: float) -> dict:
    data = load_mvtec(path)
    rng = np.random.default_rng(0)
    train = [data.train_images[i] for i in subsample(data.train_images, args.max_train, rng)]
    test_index = subsample(data.test_images, args.max_test, rng)
    test = [data.test_images[i] for i in test_index]
    labels = data.test_labels[test_index]
    model = make_patchcore(
        backbone=args.backbone,
        layers=tuple(args.layers),
        weights=args.weights,
        sampling_ratio=ratio,
        n_neighbors=args.n_neighbors,
        random_state=args.seed,  # also seeds random initialisation (--weights none)
        device=args.device,
        progress=args.progress,
        working_memory=args.working_memory,
        scheduler=args.scheduler,
        recipe=args.recipe,
        resize="auto" if args.resize is None else args.resize,
        crop_size=None if args.no_crop else ("auto" if args.crop_size is None else args.crop_size),
        interpolation=args.interpolation or "auto",
        mean="auto" if args.normalization == "auto" else IMAGENET_MEAN,
        std="auto" if args.normalization == "auto" else IMAGENET_STD,
        aggregation=args.aggregation,
        pretrain_embed_dim=args.embed_dim,
        target_embed_dim=args.embed_dim,
        scales=tuple(args.scales),
        batch_size=args.batch_size,
    )
    model.set_params(detector__algorithm=args.algorithm, coreset__chunk_sampling_ratio=args.chunk_sampling_ratio,
                     detector__map_sigma=args.map_sigma)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    bank = model[-1].memory_bank_
    n_rows = model[1].n_rows_seen_

    metrics, _ = evaluate(
        model, images=test, labels=labels, masks=[data.test_masks[i] for i in test_index],
        defect_types=[data.test_defect_types[i] for i in test_index], progress=args.progress,
    )
    return {
        "category": path.name,
        "ratio": ratio,
        "n_train": len(train),
        "n_test": len(test),
        "n_patches": n_rows,
        "bank": len(bank),
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": float("nan") if metrics["aupro"] is None else metrics["aupro"],
        "fit_s": fit_s,
        "predict_ms": 1000 * metrics["seconds"] / len(test),
        "peak_rss_gb": peak_rss_gb(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="weights name, path, or 'none'")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--recipe", choices=["recommended", "official"], default="recommended",
                        help="what geometry and input scaling default to (PatchFeatureTransformer's recipe)")
    parser.add_argument("--resize", type=int, default=None, help="default: the recipe's (256 for WRN50)")
    parser.add_argument("--crop-size", type=int, default=None, help="default: the recipe's (224 for WRN50)")
    parser.add_argument("--no-crop", action="store_true", help="square resize, no centre crop")
    parser.add_argument("--interpolation", default=None, help="default: the recipe's (bilinear for WRN50)")
    parser.add_argument("--normalization", choices=["auto", "imagenet"], default="auto",
                        help="input mean/std: the weights' own (auto) or ImageNet's (the official code's)")
    parser.add_argument("--aggregation", choices=["auto", "mean_pool", "concat"], default="mean_pool",
                        help="patch aggregation (default: the official code's mean_pool, as the reference rows)")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="input scales whose features are concatenated (default: 1, the paper's single scale)")
    parser.add_argument("--map-sigma", type=float, default=4.0, help="anomaly-map smoothing (default: the paper's 4)")
    parser.add_argument("--sampling-ratio", type=float, nargs="+", default=[0.1])
    parser.add_argument("--n-neighbors", type=int, default=1)
    parser.add_argument("--algorithm", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--working-memory", type=float, default=None,
                        help="MiB (default: scikit-learn's working_memory; a large value fits in one pass)")
    parser.add_argument("--chunk-sampling-ratio", type=float, default=None)
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    args = parser.parse_args(argv)
    require(args.root)
    if args.weights.lower() == "none":
        args.weights = None
    if (args.root / "train").is_dir():
        paths = [args.root]
    else:
        names = args.categories or sorted(p.name for p in args.root.iterdir() if (p / "train").is_dir())
        paths = [args.root / name for name in names]
    print_header("category", "ratio", "train", "test", "bank rows", "image AUROC", "pixel AUROC", "AUPRO",
                 "fit s", "predict ms/image", "peak RSS GB")
    for path in paths:
        for ratio in args.sampling_ratio:
            r = run_category(path, args, ratio)
            print_row(r["category"], r["ratio"], r["n_train"], r["n_test"], r["bank"], round(r["image_auroc"], 4),
                      round(r["pixel_auroc"], 4), round(r["aupro"], 3), round(r["fit_s"], 1),
                      round(r["predict_ms"], 1), round(r["peak_rss_gb"], 2))


if __name__ == "__main__":
    main()
