"""Does choosing a configuration by synthetic defects agree with choosing it by real defects?

For every configuration: its real image and pixel AUROC (fit on all training
images, scored on the labelled test set), and its synthetic-defect score
(``NormalOnlyKFold(3)`` over the training images only; each held-out fold
gets the defects of :func:`skpatchcore.synthetic.add_synthetic_defects` on
half its images, as ``synthetic_defect_scorer`` does). Prints both, and the
Spearman rank correlation between them over the configurations.

Every configuration is a :class:`~skpatchcore.PatchCorePipeline` fitted in one
greedy pass (a working memory that holds all training features) and scored
with :func:`skpatchcore.evaluation.evaluate`, on the real test set and on each
fold's synthetic defects; features are computed afresh for every
configuration and fold.

Examples::

    python benchmarks/model_selection.py --data mtd     # ../shared/data/mtd with Lite0 (4 fits per configuration)
    python benchmarks/model_selection.py --data demo    # the demo generator, random-weight ResNet-18
    python benchmarks/model_selection.py --only concat "concat, map sigma 8" --kinds intensity uneven
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _common import mtd_parser, print_header, print_row, require, write_json_lines
from scipy.stats import spearmanr

from skpatchcore import CoresetSampler, NormalOnlyKFold, PatchCoreDetector, PatchCorePipeline, PatchFeatureTransformer
from skpatchcore.evaluation import evaluate
from skpatchcore.io.images import IMAGENET_MEAN, IMAGENET_STD
from skpatchcore.synthetic import ALL_DEFECT_KINDS, DEFECT_KINDS, add_synthetic_defects

IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
#: MiB: the training features of every configuration fit in one greedy pass.
ONE_PASS = 16384


def mtd_configs(weights: str) -> list[dict]:
    """Configurations over aggregation, layers, input size and scales, normalisation, k, reweighting,
    coreset ratio and map smoothing."""
    lite0 = dict(backbone="timm:tf_efficientnet_lite0", weights=weights, layers=("blocks.2", "blocks.4"),
                 resize=224, crop_size=None, interpolation="bicubic", aggregation="concat")
    return [
        dict(name="official (mean_pool, ImageNet scaling)", features={**lite0, "aggregation": "mean_pool", **IMAGENET}),
        dict(name="mean_pool", features={**lite0, "aggregation": "mean_pool"}),
        dict(name="mean_pool, k=3", features={**lite0, "aggregation": "mean_pool"}, detector=dict(n_neighbors=3)),
        dict(name="concat, ImageNet scaling", features={**lite0, **IMAGENET}),
        dict(name="concat", features=lite0),
        dict(name="concat, k=3", features=lite0, detector=dict(n_neighbors=3)),
        dict(name="concat, reweight (eq. 7)", features=lite0, detector=dict(reweight=True)),
        dict(name="concat, 0.25% coreset", features=lite0, coreset=dict(sampling_ratio=0.0025)),
        dict(name="concat, blocks.2+4+5", features={**lite0, "layers": ("blocks.2", "blocks.4", "blocks.5")}),
        dict(name="concat, 320 px", features={**lite0, "resize": 320}),
        dict(name="concat, scales 1 + 0.7", features={**lite0, "scales": (1.0, 0.7)}),
        dict(name="concat, scales 1 + 0.7, map sigma 16", features={**lite0, "scales": (1.0, 0.7)},
             detector=dict(map_sigma=16.0)),
        dict(name="concat, scales 1 + 1.4", features={**lite0, "scales": (1.0, 1.4)}),
        dict(name="concat, scales 1 + 0.7 + 1.4", features={**lite0, "scales": (1.0, 0.7, 1.4)}),
        dict(name="concat, map sigma 2", features=lite0, detector=dict(map_sigma=2.0)),
        dict(name="concat, map sigma 8", features=lite0, detector=dict(map_sigma=8.0)),
        dict(name="concat, map sigma 12", features=lite0, detector=dict(map_sigma=12.0)),
        dict(name="concat, map sigma 16", features=lite0, detector=dict(map_sigma=16.0)),
        dict(name="concat, map sigma 24", features=lite0, detector=dict(map_sigma=24.0)),
        dict(name="concat, map sigma 32", features=lite0, detector=dict(map_sigma=32.0)),
    ]


def demo_configs() -> list[dict]:
    base = dict(backbone="resnet18", weights=None, random_state=0, resize=128, crop_size=None,
                layers=("layer2", "layer3"), aggregation="concat")
    return [
        dict(name="mean_pool", features={**base, "aggregation": "mean_pool"}),
        dict(name="mean_pool, k=3", features={**base, "aggregation": "mean_pool"}, detector=dict(n_neighbors=3)),
        dict(name="concat", features=base),
        dict(name="concat, k=3", features=base, detector=dict(n_neighbors=3)),
        dict(name="concat, reweight", features=base, detector=dict(reweight=True)),
        dict(name="concat, 1% coreset", features=base, coreset=dict(sampling_ratio=0.01)),
        dict(name="concat, layer1+2", features={**base, "layers": ("layer1", "layer2")}),
        dict(name="concat, layer3 only", features={**base, "layers": ("layer3",)}),
        dict(name="concat, 64 px", features={**base, "resize": 64}),
        dict(name="concat, 192 px", features={**base, "resize": 192}),
    ]


def load_data(args):
    if args.data == "demo":
        from skpatchcore.synthetic import make_synthetic_defects

        data = make_synthetic_defects(n_train=60, n_test_good=30, n_test_defect=60, image_size=128, random_state=0)
        return list(data.train_images), list(data.test_images), data.test_labels, list(data.test_masks)
    from skpatchcore.io.datasets import load_mvtec

    require(args.root, args.weights)
    data = load_mvtec(args.root)
    return data.train_images, data.test_images, data.test_labels, data.test_masks


def build_model(config: dict) -> PatchCorePipeline:
    """The configuration's pipeline, every step seeded with 0."""
    return PatchCorePipeline([
        ("features", PatchFeatureTransformer(**config["features"])),
        ("coreset", CoresetSampler(random_state=0, **{"sampling_ratio": 0.01, **config.get("coreset", {})})),
        ("detector", PatchCoreDetector(random_state=0, **config.get("detector", {}))),
    ], working_memory=ONE_PASS)


def image_and_pixel_auroc(model, train, test, labels, masks) -> tuple[float, float]:
    """Fit on `train`, then image and pixel AUROC on the labelled `test` images."""
    metrics, _ = evaluate(model.fit(train), images=test, labels=labels, masks=masks)
    return metrics["image_auroc"], metrics["pixel_auroc"]


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--data", choices=["mtd", "demo"], default="mtd")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON lines here")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only the configurations with these exact names")
    parser.add_argument("--kinds", nargs="+", default=list(DEFECT_KINDS), choices=ALL_DEFECT_KINDS,
                        help="synthetic defect kinds to paint (default: the scorer's default mix)")
    args = parser.parse_args(argv)
    configs = mtd_configs(str(args.weights)) if args.data == "mtd" else demo_configs()
    if args.only:
        unknown = set(args.only) - {config["name"] for config in configs}
        if unknown:
            raise SystemExit(f"--only: no configuration named {sorted(unknown)}")
        configs = [config for config in configs if config["name"] in args.only]
    train, test, labels, masks = load_data(args)
    folds = list(NormalOnlyKFold(args.folds, shuffle=True, random_state=0).split(train))
    # The same synthetic defects for every configuration: fold i's held-out images, painted with seed i.
    synthetic = [add_synthetic_defects([train[i] for i in test_index], kinds=args.kinds, random_state=fold)
                 for fold, (_, test_index) in enumerate(folds)]
    rows = []
    print_header("configuration", "real image", "real pixel", "synthetic image", "synthetic pixel",
                 "synthetic mean", "s")
    for config in configs:
        start = time.perf_counter()
        real_image, real_pixel = image_and_pixel_auroc(build_model(config), train, test, labels, masks)
        per_fold = [image_and_pixel_auroc(build_model(config), [train[i] for i in train_index], list(data.images),
                                          data.labels, list(data.masks))
                    for (train_index, _), data in zip(folds, synthetic)]
        synthetic_image, synthetic_pixel = (float(value) for value in np.mean(per_fold, axis=0))
        row = dict(name=config["name"], real_image=real_image, real_pixel=real_pixel,
                   synthetic_image=synthetic_image, synthetic_pixel=synthetic_pixel,
                   synthetic_mean=(synthetic_image + synthetic_pixel) / 2, real_mean=(real_image + real_pixel) / 2)
        rows.append(row)
        print_row(row["name"], real_image, real_pixel, synthetic_image, synthetic_pixel, row["synthetic_mean"],
                  round(time.perf_counter() - start), digits=3)
    if args.output:
        write_json_lines(args.output, rows)
    print("\nSpearman rank correlation over", len(rows), "configurations (synthetic vs real):")
    print_header("synthetic \\ real", "image", "pixel", "mean")
    for synthetic_key in ("synthetic_image", "synthetic_pixel", "synthetic_mean"):
        rhos = [spearmanr([r[synthetic_key] for r in rows], [r[real_key] for r in rows]).statistic
                for real_key in ("real_image", "real_pixel", "real_mean")]
        print_row(synthetic_key.removeprefix("synthetic_"), *(f"{rho:+.2f}" for rho in rhos))
    best_real = max(rows, key=lambda r: r["real_mean"])["name"]
    best_synthetic = max(rows, key=lambda r: r["synthetic_mean"])["name"]
    print(f"best by real defects: {best_real}; best by synthetic defects: {best_synthetic}")


if __name__ == "__main__":
    main()
