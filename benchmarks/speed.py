"""Side-by-side speed benchmark: coreset, search, predict breakdown, cold start, memory.

Runs on Magnetic Tile Defects features (EfficientNet-Lite0 blocks.2+blocks.4,
224 px square bicubic) from ``--root`` / ``--weights`` (default: ../shared),
and times a randomly initialised WRN50 for the predict breakdown::

    python benchmarks/speed.py                      # everything (~20 min on 2 cores)
    python benchmarks/speed.py --sections coreset search

Sections:

coreset   our lazy greedy kernel against a per-pick torch loop of the official
          algorithm (written here from the paper's description: one pass over
          all projected rows per pick), same projection / starts / seed; picks
          checked against an exact float64 loop.
search    exact vs bf16 shortlist vs pynndescent vs auto, ms per image over
          bank sizes, recall, and image AUROC on MTD with each search.
predict   WRN50 (random weights), bank from 10% of 200 images, 224 images:
          share of backbone / aggregation / search / maps.
cold      a fresh process loads a saved model and scores one image.
memory    peak RSS of fitting on the whole MTD training set (fresh process).
crossover (not in the default run, ~6 min) bf16 shortlist vs pynndescent on the
          10% coreset bank of all 762 images, scoring all test images.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skpatchcore import CoresetSampler, PatchCoreDetector, PatchFeatureTransformer
from skpatchcore._greedy import greedy_numba, mean_distance_to_starts
from skpatchcore.backbones import extract_layers
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.detector import upsample_patch_scores
from skpatchcore.evaluation.metrics import image_auroc
from skpatchcore.pipeline import PatchCorePipeline
from skpatchcore.search import (
    BFloat16Shortlist,
    bfloat16_speedup,
    brute_force_kneighbors,
    build_nndescent,
    nndescent_kneighbors,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def lite0_transformer(weights: str) -> PatchFeatureTransformer:
    return PatchFeatureTransformer(
        "timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=weights,
        resize=224, crop_size=None, interpolation="bicubic",
    ).fit()


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------- coreset
def official_style_picks(projected: np.ndarray, starts: np.ndarray, n_picks: int) -> np.ndarray:
    """Per-pick torch loop as the paper/official code describe it (float32).

    Distances via |a|^2 - 2ab + |b|^2; the coverage distance of every row is
    concatenated with its distance to the new pick and reduced with min.
    """
    features = torch.from_numpy(projected)
    squared = (features * features).sum(dim=1, keepdim=True)

    def distances(index):
        anchors = features[index].reshape(-1, features.shape[1])
        return (squared - 2 * features @ anchors.T + (anchors * anchors).sum(dim=1)).clamp(0).sqrt()

    coverage = distances(torch.as_tensor(starts)).mean(dim=1, keepdim=True)
    picks = []
    with torch.inference_mode():
        for _ in range(n_picks):
            pick = int(torch.argmax(coverage))
            picks.append(pick)
            coverage = torch.min(torch.cat([coverage, distances(torch.tensor([pick]))], dim=1), dim=1).values[:, None]
    return np.array(picks)


def exact_reference_picks(projected: np.ndarray, starts: np.ndarray, n_picks: int) -> np.ndarray:
    """The same algorithm with direct float64 distances (what our kernel must equal)."""
    coverage = mean_distance_to_starts(projected, starts)
    data = projected.astype(np.float64)
    picks = []
    for _ in range(n_picks):
        pick = int(np.argmax(coverage))
        picks.append(pick)
        np.minimum(coverage, np.sqrt(((data - data[pick]) ** 2).sum(axis=1)), out=coverage)
    return np.array(picks)


def coreset_section(train_rows: np.ndarray, args) -> None:
    print("\n## Coreset: lazy greedy kernel vs per-pick torch loop (official algorithm)", flush=True)
    print(f"{'N':>8} {'ratio':>6} {'picks':>7} {'ours s':>8} {'ours ms/pick':>13} {'ref ms/pick':>12} "
          f"{'speedup':>8} {'identical':>10} {'f32 loop agrees':>16}", flush=True)
    for n_rows, ratio in ((150_528, 0.1), (len(train_rows), 0.01)):
        rows = train_rows[:n_rows]
        rng = np.random.RandomState(0)
        starts = rng.choice(len(rows), 10, replace=False).astype(np.int64)
        matrix = rng.uniform(-1 / 32, 1 / 32, size=(rows.shape[1], 128)).astype(np.float32)
        projected = (torch.from_numpy(np.ascontiguousarray(rows)) @ torch.from_numpy(matrix)).numpy()
        n_picks = int(len(rows) * ratio)
        greedy_numba(projected[:1000], starts % 1000, 2)  # compile outside the timing
        (picks, _, n_computed), ours_s = timed(greedy_numba, projected, starts, n_picks)
        reference, reference_s = timed(official_style_picks, projected, starts, args.reference_picks)
        exact = exact_reference_picks(projected, starts, args.reference_picks)
        identical = np.array_equal(picks[: args.reference_picks], exact)
        agree = np.mean(picks[: args.reference_picks] == reference)
        ours_ms, ref_ms = 1000 * ours_s / n_picks, 1000 * reference_s / args.reference_picks
        print(f"{len(rows):>8} {ratio:>6g} {n_picks:>7} {ours_s:>8.1f} {ours_ms:>13.2f} {ref_ms:>12.2f} "
              f"{ref_ms / ours_ms:>7.1f}x {str(identical):>10} {agree:>16.3f}", flush=True)
        print(f"         distance evaluations: {n_computed / (len(rows) * n_picks):.3f} of the per-pick loop's; "
              f"reference timed on its first {args.reference_picks} picks", flush=True)


# ---------------------------------------------------------------------- search
def search_section(train_rows: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray, args) -> None:
    print(f"\n## Search (ms per 784-patch image; bf16 product speed-up on this CPU: {bfloat16_speedup():.1f}x)", flush=True)
    rng = np.random.default_rng(0)
    queries_32 = np.ascontiguousarray(test_features[100:132].reshape(-1, test_features.shape[-1]))
    (_, cold_build) = timed(build_nndescent, train_rows[:2000], 0)
    print(f"pynndescent first build in this process (numba compilation): {cold_build:.1f} s", flush=True)
    print(f"{'bank':>7} {'images':>6} {'exact':>8} {'bf16':>8} {'pynnd':>8} {'pynnd build s':>14} "
          f"{'bf16 recall':>11} {'pynnd recall':>12} {'auto picks':>11}", flush=True)
    for n_bank in (2_000, 6_000, 16_000, 60_000, 150_000, 240_000):
        bank = np.ascontiguousarray(train_rows[rng.choice(len(train_rows), n_bank, replace=False)])
        detector = PatchCoreDetector(device="cpu").fit(bank)
        index, build_s = timed(build_nndescent, bank, 0)
        shortlist = BFloat16Shortlist(bank)
        for n_images in (1, 32) if n_bank <= 60_000 else (32,):
            queries = queries_32[: n_images * 784]
            exact_rows = len(queries) if n_bank <= 60_000 else 4 * 784  # exact: 4 images on big banks
            (_, exact_i), exact_s = timed(brute_force_kneighbors, queries[:exact_rows], bank, 1)
            (_, short_i), short_s = timed(shortlist.kneighbors, queries, 1)
            nndescent_kneighbors(index, queries[:784], 1)
            (_, nn_i), nn_s = timed(nndescent_kneighbors, index, queries, 1)
            per = 1000 / n_images
            print(f"{n_bank:>7} {n_images:>6} {exact_s * 784000 / exact_rows:>8.1f} {short_s * per:>8.1f} "
                  f"{nn_s * per:>8.1f} {build_s:>14.1f} {np.mean(short_i[:exact_rows] == exact_i):>11.5f} "
                  f"{np.mean(nn_i[:exact_rows] == exact_i):>12.4f} {detector._choose_algorithm(len(queries)):>11}",
                  flush=True)
    print("\nImage AUROC on MTD (1% greedy coreset bank, all 582 test images), by search:", flush=True)
    bank = CoresetSampler(0.01, random_state=0).fit_transform(train_rows)
    scores = {}
    for algorithm in ("exact", "bf16", "pynndescent", "auto"):
        detector = PatchCoreDetector(algorithm=algorithm, random_state=0, device="cpu").fit(bank)
        detector.score_samples(test_features[:2])
        values, seconds = timed(detector.score_samples, test_features)
        scores[algorithm] = -values
        print(f"  {algorithm:<12} image AUROC {image_auroc(test_labels, -values):.4f}  "
              f"({1000 * seconds / len(test_features):.1f} ms/image)", flush=True)
    for algorithm in ("bf16", "pynndescent", "auto"):
        diff = abs(image_auroc(test_labels, scores[algorithm]) - image_auroc(test_labels, scores["exact"]))
        print(f"  |AUROC({algorithm}) - AUROC(exact)| = {diff:.4f}", flush=True)


# ------------------------------------------------------------------- crossover
def crossover_section(train_rows: np.ndarray, test_features: np.ndarray, args) -> None:
    print("\n## Coreset-bank crossover: bf16 shortlist vs pynndescent on the 10% coreset of all MTD images",
          flush=True)
    bank, seconds = timed(CoresetSampler(0.1, random_state=0).fit_transform, train_rows)
    print(f"bank {len(bank)} rows (coreset {seconds:.0f} s)", flush=True)
    for algorithm in ("bf16", "pynndescent"):
        detector = PatchCoreDetector(algorithm=algorithm, random_state=0).fit(bank)
        detector.score_and_maps(test_features[:32], (224, 224))  # index build, compilation
        start = time.perf_counter()
        for first in range(0, len(test_features), 32):
            detector.score_and_maps(test_features[first : first + 32], (224, 224))
        per_image = 1000 * (time.perf_counter() - start) / len(test_features)
        print(f"  {algorithm:<12} {per_image:.1f} ms per image (search, exact image maxima, maps; batches of 32)",
              flush=True)


# --------------------------------------------------------------------- predict
def predict_section(image_paths: list[str], args) -> None:
    import torchvision

    print("\n## Predict breakdown: WRN50 (random weights), bank = 10% of 200 images, 224 test images", flush=True)
    transformer = PatchFeatureTransformer(weights=None, random_state=0, resize=224, crop_size=None).fit()
    train = transformer.transform(image_paths[:200])
    bank, coreset_s = timed(CoresetSampler(0.1, random_state=0).fit_transform, train)
    print(f"bank {len(bank)} rows x {bank.shape[1]} (coreset {coreset_s:.1f} s)", flush=True)
    test = image_paths[200:424]
    batches = [torch.from_numpy(np.stack([transformer._preprocess(p) for p in test[start : start + 8]]))
               for start in range(0, len(test), 8)]
    # The reference: torchvision's network up to layer3 as plain PyTorch runs it (NCHW, hooks),
    # timed on every batch right before ours so that both see the same machine state.
    plain = torchvision.models.wide_resnet50_2(weights=None).eval()
    for algorithm in ("exact", "auto"):
        detector = PatchCoreDetector(algorithm=algorithm, device="cpu").fit(bank)
        detector.score_samples(transformer.transform(test[:8]))
        parts = dict(plain=0.0, backbone=0.0, aggregation=0.0, search=0.0, maps=0.0)
        for batch in batches:
            t0 = time.perf_counter()
            with torch.inference_mode():
                extract_layers(plain, batch, ("layer2", "layer3"))
                t1 = time.perf_counter()
                layer_maps = transformer.backbone_(batch.contiguous(memory_format=torch.channels_last))
                t2 = time.perf_counter()
                features = transformer._aggregate(layer_maps).numpy()
            t3 = time.perf_counter()
            _, grids = detector._score(features)
            t4 = time.perf_counter()
            upsample_patch_scores(grids, transformer.input_size_)
            t5 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[key] += seconds
        total = sum(parts.values()) - parts["plain"]
        shares = ", ".join(f"{k} {1000 * v / len(test):.1f} ms ({100 * v / total:.0f}%)"
                           for k, v in parts.items() if k != "plain")
        print(f"  {algorithm:<6} per image: {shares}; total {1000 * total / len(test):.1f} ms = "
              f"{total / parts['backbone']:.2f} x our backbone, {total / parts['plain']:.2f} x the plain "
              f"torchvision forward ({1000 * parts['plain'] / len(test):.1f} ms; auto chose "
              f"{detector._choose_algorithm(8 * 784)})", flush=True)
    pipeline = PatchCorePipeline([("features", transformer), ("detector", detector)])
    pipeline.score_and_maps(test[:8])
    _, seconds = timed(pipeline.score_and_maps, test)
    print(f"  end to end, PatchCorePipeline.score_and_maps on the 224 files (decoding included): "
          f"{1000 * seconds / len(test):.1f} ms per image", flush=True)


# ------------------------------------------------------------------------ cold
COLD_SCRIPT = """
import time, sys
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import joblib, skpatchcore; t2 = time.perf_counter()
model = joblib.load(sys.argv[1]); t3 = time.perf_counter()
features = model[0].transform([sys.argv[2]]); t4 = time.perf_counter()
scores, maps = model[-1].score_and_maps(features, model[0].input_size_); t5 = time.perf_counter()
imported = [name for name in ("torchvision", "timm", "torch._dynamo", "pynndescent", "numba") if name in sys.modules]
print(f"import torch {t1-t0:.2f} s | import skpatchcore+joblib {t2-t1:.2f} s | load model {t3-t2:.2f} s | "
      f"features (backbone) {t4-t3:.2f} s | search+maps {t5-t4:.2f} s | beyond torch+backbone "
      f"{(t2-t1)+(t3-t2)+(t5-t4):.2f} s | imported: {', '.join(imported) or 'none of torchvision/timm/dynamo/numba'}")
"""


def cold_section(train_paths: list[str], test_paths: list[str], args) -> None:
    print("\n## Cold start: a fresh process loads a saved model and scores one image", flush=True)
    import joblib

    from skpatchcore import make_patchcore

    setups = {
        "EfficientNet-Lite0 (timm), 1% of 762 images": (make_patchcore(
            "timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=args.weights,
            resize=224, crop_size=None, interpolation="bicubic", sampling_ratio=0.01, random_state=0,
        ), train_paths),
        "WRN50 (torchvision, random weights), 10% of 200 images": (make_patchcore(
            weights=None, resize=224, crop_size=None, sampling_ratio=0.1, random_state=0,
        ), train_paths[:200]),
    }
    for name, (model, paths) in setups.items():
        model.fit(paths)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.joblib"
            joblib.dump(model, path)
            print(f"{name}: model file {path.stat().st_size / 1e6:.1f} MB, backbone_ is "
                  f"{type(model[0].backbone_).__name__}", flush=True)
            for attempt in (1, 2):
                out = subprocess.run([sys.executable, "-c", COLD_SCRIPT, str(path), test_paths[0]],
                                     capture_output=True, text=True, check=True).stdout.strip()
                print(f"  run {attempt}: {out}", flush=True)


# ---------------------------------------------------------------------- memory
# Peak RSS is read from /proc/self/status (VmHWM): getrusage's ru_maxrss
# survives exec on Linux and would report this (large) parent process.
MEMORY_SCRIPT = """
import sys, time
from skpatchcore import make_patchcore
from skpatchcore.io.datasets import load_mvtec
data = load_mvtec(sys.argv[1])
model = make_patchcore("timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=sys.argv[2],
    resize=224, crop_size=None, interpolation="bicubic", sampling_ratio=0.01, random_state=0)
start = time.perf_counter(); model.fit(data.train_images); seconds = time.perf_counter() - start
h, w, d = model[0].feature_shape_
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(len(data.train_images) * h * w * d * 4 / 1e9, peak / 1e6, seconds)
"""

BASELINE_SCRIPT = """
import sys
from skpatchcore import PatchFeatureTransformer
t = PatchFeatureTransformer("timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=sys.argv[1],
    resize=224, crop_size=None).fit()
t.transform([sys.argv[2]])
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1e6)
"""


def memory_section(train_paths: list[str], args) -> None:
    print("\n## Fit memory: whole MTD training set, fresh process", flush=True)
    baseline = float(subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, args.weights, train_paths[0]],
                                    capture_output=True, text=True, check=True).stdout)
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(args.root), args.weights],
                         capture_output=True, text=True, check=True).stdout.split()
    buffer_gb, peak_gb, seconds = map(float, out)
    print(f"  feature buffer {buffer_gb:.2f} GB; process with backbone loaded and one image scored: "
          f"{baseline:.2f} GB; peak RSS of fit {peak_gb:.2f} GB = {peak_gb / (buffer_gb + baseline):.2f} x "
          f"(buffer + backbone process); fit {seconds:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED / "data" / "mtd")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
    parser.add_argument("--sections", nargs="+", default=["coreset", "search", "predict", "cold", "memory"])
    parser.add_argument("--reference-picks", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    data = load_mvtec(args.root)
    needs_features = {"coreset", "search", "crossover"} & set(args.sections)
    if needs_features:
        transformer = lite0_transformer(args.weights)
        train, seconds = timed(transformer.transform, data.train_images)
        print(f"MTD train features {train.shape} in {seconds:.1f} s", flush=True)
        train_rows = train.reshape(-1, train.shape[-1])
    if "coreset" in args.sections:
        coreset_section(train_rows, args)
    if {"search", "crossover"} & set(args.sections):
        test = transformer.transform(data.test_images)
        if "search" in args.sections:
            search_section(train_rows, test, data.test_labels, args)
        if "crossover" in args.sections:
            crossover_section(train_rows, test, args)
        del test
    if needs_features:
        del train, train_rows
    if "predict" in args.sections:
        predict_section(data.train_images + data.test_images, args)
    if "cold" in args.sections:
        cold_section(data.train_images, data.test_images, args)
    if "memory" in args.sections:
        memory_section(data.train_images, args)
    print(f"\npeak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    main()
