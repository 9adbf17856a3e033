"""Model files: the safe format against joblib, file size and a cold process's start.

Fits two models, saves each with ``skpatchcore.save`` and ``joblib.dump``, and
loads every file in fresh processes (alternating formats), printing the
median of ``--runs`` cold starts: ``import torch``, ``import skpatchcore,
joblib``, the load, scoring one image, and what the load imported::

    python benchmarks/model_files.py                       # ../shared data and weights
    python benchmarks/model_files.py --n-lite0 762 --n-wrn50 50 --runs 5

Models:

lite0  EfficientNet-Lite0 (timm, ImageNet weights from --weights), blocks.2 +
       blocks.4, 224 px square bicubic, the official code's embedding and
       input scaling, 1% coreset of the first --n-lite0 MTD training images.
wrn50  WideResNet-50 (torchvision, random weights: only size and time matter),
       layer2 + layer3, 224 px, 10% coreset of the first --n-wrn50 images.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import LITE0_224, mtd_parser, print_header, print_row, require

LOAD_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import skpatchcore, joblib
t2 = time.perf_counter()
model = skpatchcore.load(sys.argv[1]) if sys.argv[2] == "safe" else joblib.load(sys.argv[1])
t3 = time.perf_counter()
model.score_samples([sys.argv[3]])
t4 = time.perf_counter()
imported = [m for m in ("torchvision", "timm", "torch._dynamo", "pynndescent", "numba") if m in sys.modules]
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, ",".join(imported) or "-")
"""
STEPS = ("import torch s", "import skpatchcore + joblib s", "load s", "score 1 image s")


def cold_start(path: Path, kind: str, image: str) -> tuple[list[float], str]:
    """Seconds of each step in a fresh process, and the modules its load imported."""
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), kind, image],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"loading {path} ({kind}) failed:\n{result.stderr}")
    *seconds, imported = result.stdout.split()
    return [float(value) for value in seconds], imported


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--n-lite0", type=int, default=762)
    parser.add_argument("--n-wrn50", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    require(args.root, args.weights)

    import joblib

    import skpatchcore
    from skpatchcore import make_patchcore
    from skpatchcore.io.datasets import load_mvtec

    data = load_mvtec(args.root)
    setups = {
        f"EfficientNet-Lite0, 1% of {args.n_lite0} MTD images": (make_patchcore(
            **LITE0_224, weights=str(args.weights), recipe="official", sampling_ratio=0.01, random_state=0,
        ), data.train_images[:args.n_lite0]),
        f"WRN50 (random weights), 10% of {args.n_wrn50} MTD images": (make_patchcore(
            weights=None, resize=224, crop_size=None, sampling_ratio=0.1, random_state=0,
        ), data.train_images[:args.n_wrn50]),
    }
    image = data.test_images[0]
    print(f"median of {args.runs} fresh processes per row")
    print_header("model", "format", "file MB", *STEPS, "imported by the load")
    for name, (model, paths) in setups.items():
        model.fit(paths)
        with tempfile.TemporaryDirectory() as folder:
            files = {"joblib": Path(folder) / "model.joblib", "safe": Path(folder) / "model.skpc"}
            joblib.dump(model, files["joblib"])
            skpatchcore.save(model, files["safe"])
            runs: dict[str, list] = {"joblib": [], "safe": []}
            for _ in range(args.runs):
                for kind in runs:
                    runs[kind].append(cold_start(files[kind], kind, image))
            for kind, results in runs.items():
                medians = [round(statistics.median(seconds[i] for seconds, _ in results), 2) for i in range(4)]
                print_row(name, kind, round(files[kind].stat().st_size / 1e6, 1), *medians, results[-1][1])


if __name__ == "__main__":
    main()
