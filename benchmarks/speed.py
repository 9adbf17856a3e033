"""Predict speed: nearest-neighbour search, the coreset-bank crossover, the predict breakdown.

Runs on Magnetic Tile Defects features (EfficientNet-Lite0 ``blocks.2`` +
``blocks.4``, 224 px square bicubic, ``--recipe``, default the official code's
embedding and input scaling as in the reference rows) from ``--root`` /
``--weights`` (default: ../shared), and times a randomly initialised WRN50 for
the predict breakdown::

    python benchmarks/speed.py                          # search and predict
    python benchmarks/speed.py --sections crossover     # ~6 min on 2 cores

Sections:

search     exact vs bf16 shortlist vs pynndescent vs auto, ms per image over
           bank sizes (random training patches), recall against exact search,
           and image AUROC on MTD with each search on the 1% coreset bank.
crossover  bf16 shortlist vs pynndescent on the 10% coreset bank of all
           training images, scoring all test images (search, exact image
           maxima, maps).
predict    WRN50 (random weights), bank from 10% of 200 images, 224 test
           images in batches of 8, decoded beforehand: per image, input
           preprocessing, backbone + patch aggregation, search and maps;
           the total (network input to maps) against the plain torchvision
           forward of the same preprocessed batches (NCHW, hooks), timed
           right before ours.

Model files and cold starts are timed by ``model_files.py``, fit memory by
``scaling.py`` and ``evaluate_mvtec.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import LITE0_224, mtd_parser, print_header, print_row, require, timed

from skpatchcore import CoresetSampler, PatchCoreDetector, PatchCorePipeline, PatchFeatureTransformer
from skpatchcore.backbones import extract_layers
from skpatchcore.detector import upsample_patch_scores
from skpatchcore.evaluation.metrics import image_auroc
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.io.images import read_image, rgb_uint8
from skpatchcore.search import (
    BFloat16Shortlist,
    bfloat16_speedup,
    brute_force_kneighbors,
    build_nndescent,
    nndescent_kneighbors,
)

SECTIONS = ("search", "crossover", "predict")


def search_section(train_rows: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray) -> None:
    patches = test_features.shape[1] * test_features.shape[2]
    print(f"\n## Search, ms per {patches}-patch image (bf16 product speed-up on this CPU: "
          f"{bfloat16_speedup():.1f}x)", flush=True)
    rng = np.random.default_rng(0)
    queries_32 = np.ascontiguousarray(test_features[100:132].reshape(-1, test_features.shape[-1]))
    _, cold_build = timed(build_nndescent, train_rows[:2000], 0)
    print(f"pynndescent first build in this process (numba compilation): {cold_build:.1f} s", flush=True)
    print_header("bank rows", "images per call", "exact", "bf16 shortlist", "pynndescent query",
                 "pynndescent build s", "bf16 recall", "pynndescent recall", "auto picks")
    for n_bank in (2_000, 6_000, 16_000, 60_000, 150_000, 240_000):
        bank = np.ascontiguousarray(train_rows[rng.choice(len(train_rows), n_bank, replace=False)])
        detector = PatchCoreDetector(device="cpu").fit(bank)
        index, build_s = timed(build_nndescent, bank, 0)
        shortlist = BFloat16Shortlist(bank)
        for n_images in (1, 32) if n_bank <= 60_000 else (32,):
            queries = queries_32[: n_images * patches]
            exact_rows = len(queries) if n_bank <= 60_000 else 4 * patches  # exact: 4 images on big banks
            (_, exact_i), exact_s = timed(brute_force_kneighbors, queries[:exact_rows], bank, 1)
            (_, short_i), short_s = timed(shortlist.kneighbors, queries, 1)
            nndescent_kneighbors(index, queries[:patches], 1)
            (_, nn_i), nn_s = timed(nndescent_kneighbors, index, queries, 1)
            per_image = 1000 / n_images
            print_row(n_bank, n_images, round(exact_s * 1000 * patches / exact_rows, 1),
                      round(short_s * per_image, 1), round(nn_s * per_image, 1), round(build_s, 1),
                      round(float(np.mean(short_i[:exact_rows] == exact_i)), 5),
                      round(float(np.mean(nn_i[:exact_rows] == exact_i)), 4),
                      detector.search_algorithm(len(queries)))
    print("\nImage AUROC on MTD (1% greedy coreset bank, all test images), by search:", flush=True)
    bank = CoresetSampler(0.01, random_state=0).fit_transform(train_rows)
    print_header("search", "image AUROC", "ms/image")
    for algorithm in ("exact", "bf16", "pynndescent", "auto"):
        detector = PatchCoreDetector(algorithm=algorithm, random_state=0, device="cpu").fit(bank)
        detector.score_samples(test_features[:2])
        values, seconds = timed(detector.score_samples, test_features)
        print_row(algorithm, round(image_auroc(test_labels, -values), 4),
                  round(1000 * seconds / len(test_features), 1))


def crossover_section(train_rows: np.ndarray, test_features: np.ndarray, output_size) -> None:
    print("\n## Coreset-bank crossover: bf16 shortlist vs pynndescent on the 10% coreset of all training images",
          flush=True)
    bank, seconds = timed(CoresetSampler(0.1, random_state=0).fit_transform, train_rows)
    print(f"bank {len(bank)} rows (coreset {seconds:.0f} s)", flush=True)
    print_header("search", "ms per image (search, exact image maxima, maps; batches of 32)")
    for algorithm in ("bf16", "pynndescent"):
        detector = PatchCoreDetector(algorithm=algorithm, random_state=0).fit(bank)
        detector.score_and_maps(test_features[:32], output_size)  # index build, compilation
        seconds = sum(timed(detector.score_and_maps, test_features[first:first + 32], output_size)[1]
                      for first in range(0, len(test_features), 32))
        print_row(algorithm, round(1000 * seconds / len(test_features), 1))


def predict_section(image_paths: list[str]) -> None:
    import torchvision

    print("\n## Predict breakdown: WRN50 (random weights), bank = 10% of 200 images, 224 test images", flush=True)
    transformer = PatchFeatureTransformer(weights=None, random_state=0, resize=224, crop_size=None).fit()
    bank, coreset_s = timed(CoresetSampler(0.1, random_state=0).fit_transform, transformer.transform(image_paths[:200]))
    print(f"bank {len(bank)} rows x {bank.shape[1]} (coreset {coreset_s:.1f} s)", flush=True)
    test = image_paths[200:424]
    # Decoded once: file decoding is not part of the breakdown (it is of the end-to-end figure).
    decoded = [rgb_uint8(read_image(path)) for path in test]
    batches = [decoded[start:start + 8] for start in range(0, len(decoded), 8)]
    # The reference: torchvision's network up to layer3 as plain PyTorch runs it (NCHW, hooks).
    plain = torchvision.models.wide_resnet50_2(weights=None).eval()
    print_header("search", "plain torchvision forward ms", "preprocess ms (not in total)",
                 "backbone + aggregation ms", "search ms", "maps ms", "total ms", "total / plain forward",
                 "auto chose")
    for algorithm in ("exact", "auto"):
        detector = PatchCoreDetector(algorithm=algorithm, device="cpu").fit(bank)
        detector.score_samples(transformer.transform(batches[0]))
        parts = dict(plain=0.0, preprocess=0.0, features=0.0, search=0.0, maps=0.0)
        for batch in batches:
            inputs, preprocess_s = timed(transformer.preprocess, batch)
            with torch.inference_mode():
                _, plain_s = timed(extract_layers, plain, torch.from_numpy(inputs), ("layer2", "layer3"))
            features, features_s = timed(transformer.transform, batch)  # preprocess + backbone + aggregation
            grids, search_s = timed(detector.patch_scores, features)
            _, maps_s = timed(upsample_patch_scores, grids, transformer.input_size_, detector.map_sigma)
            for key, seconds in zip(parts, (plain_s, preprocess_s, features_s - preprocess_s,
                                            search_s, maps_s)):
                parts[key] += seconds
        total = parts["features"] + parts["search"] + parts["maps"]  # as the plain forward: from network input
        per_image = {key: round(1000 * value / len(test), 1) for key, value in parts.items()}
        print_row(algorithm, per_image["plain"], per_image["preprocess"], per_image["features"],
                  per_image["search"], per_image["maps"], round(1000 * total / len(test), 1),
                  round(total / parts["plain"], 2), detector.search_algorithm(int(np.prod(features.shape[:3]))))
    pipeline = PatchCorePipeline([("features", transformer), ("detector", detector)])
    pipeline.score_and_maps(test[:8])
    _, seconds = timed(pipeline.score_and_maps, test)
    print(f"end to end, PatchCorePipeline.score_and_maps on the {len(test)} files (decoding included): "
          f"{1000 * seconds / len(test):.1f} ms per image", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--recipe", choices=["official", "recommended"], default="official",
                        help="EfficientNet-Lite0 feature recipe of the search and crossover sections")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["search", "predict"])
    args = parser.parse_args(argv)
    require(args.root, args.weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    data = load_mvtec(args.root)
    if {"search", "crossover"} & set(args.sections):
        transformer = PatchFeatureTransformer(**LITE0_224, weights=str(args.weights), recipe=args.recipe).fit()
        train, seconds = timed(transformer.transform, data.train_images)
        print(f"train features {train.shape} in {seconds:.1f} s", flush=True)
        train_rows = train.reshape(-1, train.shape[-1])
        test = transformer.transform(data.test_images)
        if "search" in args.sections:
            search_section(train_rows, test, data.test_labels)
        if "crossover" in args.sections:
            crossover_section(train_rows, test, transformer.input_size_)
        del train, train_rows, test
    if "predict" in args.sections:
        predict_section(data.train_images + data.test_images)


if __name__ == "__main__":
    main()
