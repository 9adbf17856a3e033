"""Does choosing a configuration by synthetic defects agree with choosing it by real defects?

For every configuration: its real image and pixel AUROC (fit on all training
images, scored on the labelled test set), and its synthetic-defect score
(``NormalOnlyKFold(3)`` over the training images only; each held-out fold
gets the defects of :func:`skpatchcore.synthetic.add_synthetic_defects` on
half its images, as ``synthetic_defect_scorer`` does). Prints both, and the
Spearman rank correlation between them over the configurations.

Features are extracted once per feature configuration and shared by the
configurations that differ only in the coreset or the detector; the scores
are those the pipeline would give (same transformer, sampler and detector).

Examples::

    python benchmarks/model_selection.py --data mtd     # ../shared/data/mtd with Lite0, ~70 min on 1 core
    python benchmarks/model_selection.py --data demo    # the demo generator, random-weight ResNet-18
    python benchmarks/model_selection.py --only concat "concat, map sigma 8" --kinds intensity uneven
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from skpatchcore import CoresetSampler, NormalOnlyKFold, PatchCoreDetector, PatchFeatureTransformer
from skpatchcore.evaluation import masks_at_map_geometry
from skpatchcore.io.images import IMAGENET_MEAN, IMAGENET_STD
from skpatchcore.evaluation.metrics import image_auroc, pixel_auroc
from skpatchcore.synthetic import ALL_DEFECT_KINDS, DEFECT_KINDS, add_synthetic_defects

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def mtd_configs(weights: str) -> list[dict]:
    """Configurations over aggregation, layers, input size and scales, normalisation, k, reweighting, coreset ratio, map smoothing."""
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

    data = load_mvtec(args.root)
    return data.train_images, data.test_images, data.test_labels, data.test_masks


def extract(transformer, images, batch: int = 32) -> np.ndarray:
    return np.concatenate([transformer.transform(images[s:s + batch]) for s in range(0, len(images), batch)])


def fit_and_score(config, train_features, test_features, transformer, masks, labels, seed) -> tuple[float, float]:
    sampler = CoresetSampler(random_state=seed, **{"sampling_ratio": 0.01, **config.get("coreset", {})})
    detector = PatchCoreDetector(random_state=seed, **config.get("detector", {}))
    detector.fit(sampler.fit_transform(train_features))
    scores, maps = [], []
    for start in range(0, len(test_features), 64):
        chunk_scores, chunk_maps = detector.score_and_maps(test_features[start:start + 64], transformer.input_size_)
        scores.append(chunk_scores)
        maps.append(chunk_maps)
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    return image_auroc(labels, -scores), pixel_auroc(masks_at_map_geometry(transformer, masks), maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["mtd", "demo"], default="mtd")
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "mtd")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON lines here")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only the configurations with these exact names")
    parser.add_argument("--kinds", nargs="+", default=list(DEFECT_KINDS), choices=ALL_DEFECT_KINDS,
                        help="synthetic defect kinds to paint (default: the scorer's default mix)")
    args = parser.parse_args()
    train, test, labels, masks = load_data(args)
    configs = mtd_configs(args.weights) if args.data == "mtd" else demo_configs()
    if args.only:
        unknown = set(args.only) - {config["name"] for config in configs}
        if unknown:
            raise SystemExit(f"--only: no configuration named {sorted(unknown)}")
        configs = [config for config in configs if config["name"] in args.only]
    folds = list(NormalOnlyKFold(args.folds, shuffle=True, random_state=0).split(train))
    rows, cache = [], {}
    print(f"{'configuration':<42}{'real image':>11}{'real pixel':>11}{'syn image':>10}{'syn pixel':>10}"
          f"{'syn mean':>9}{'s':>6}", flush=True)
    for config in configs:
        start = time.perf_counter()
        key = json.dumps(config["features"], sort_keys=True, default=str)
        if key not in cache:
            cache.clear()  # one feature configuration in memory at a time (configs are grouped)
            transformer = PatchFeatureTransformer(**config["features"]).fit()
            synthetic = [add_synthetic_defects([train[i] for i in test_index], kinds=args.kinds,
                                                random_state=fold)
                         for fold, (_, test_index) in enumerate(folds)]
            cache[key] = dict(
                transformer=transformer, train=extract(transformer, train), test=extract(transformer, test),
                synthetic=[(extract(transformer, data.images), data) for data in synthetic],
            )
        cached = cache[key]
        transformer = cached["transformer"]
        real_image, real_pixel = fit_and_score(config, cached["train"], cached["test"], transformer, masks, labels, 0)
        synthetic_image, synthetic_pixel = [], []
        for fold, (train_index, _) in enumerate(folds):
            features, data = cached["synthetic"][fold]
            image, pixel = fit_and_score(config, cached["train"][train_index], features, transformer, data.masks,
                                         data.labels, 0)
            synthetic_image.append(image)
            synthetic_pixel.append(pixel)
        row = dict(name=config["name"], real_image=real_image, real_pixel=real_pixel,
                   synthetic_image=float(np.mean(synthetic_image)), synthetic_pixel=float(np.mean(synthetic_pixel)))
        row["synthetic_mean"] = (row["synthetic_image"] + row["synthetic_pixel"]) / 2
        row["real_mean"] = (real_image + real_pixel) / 2
        rows.append(row)
        print(f"{row['name']:<42}{real_image:>11.3f}{real_pixel:>11.3f}{row['synthetic_image']:>10.3f}"
              f"{row['synthetic_pixel']:>10.3f}{row['synthetic_mean']:>9.3f}{time.perf_counter() - start:>6.0f}",
              flush=True)
        if args.output:
            with open(args.output, "a") as out:
                out.write(json.dumps(row) + "\n")
    print("\nSpearman rank correlation over", len(rows), "configurations (synthetic vs real):")
    for synthetic_key in ("synthetic_image", "synthetic_pixel", "synthetic_mean"):
        cells = []
        for real_key in ("real_image", "real_pixel", "real_mean"):
            rho = spearmanr([r[synthetic_key] for r in rows], [r[real_key] for r in rows]).statistic
            cells.append(f"{real_key} {rho:+.2f}")
        print(f"  {synthetic_key:<16}" + "   ".join(cells))
    best_real = max(rows, key=lambda r: r["real_mean"])["name"]
    best_synthetic = max(rows, key=lambda r: r["synthetic_mean"])["name"]
    print(f"best by real defects: {best_real}; best by synthetic defects: {best_synthetic}")


if __name__ == "__main__":
    main()
