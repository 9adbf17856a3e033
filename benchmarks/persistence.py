"""Safe model format vs joblib: file size and cold-process load time.

Fits two models, saves each with ``skpatchcore.save`` and ``joblib.dump``, and
loads every file in fresh processes (alternating formats), printing the
median of ``--runs`` loads and what the load imported::

    python benchmarks/persistence.py                       # ../shared data and weights
    python benchmarks/persistence.py --n-lite0 762 --n-wrn50 50

Models:

lite0  EfficientNet-Lite0 (timm, ImageNet weights from --weights), blocks.2 +
       blocks.4, 224 px square bicubic, 1% coreset of the first --n-lite0 MTD
       training images.
wrn50  WideResNet-50 (torchvision, random weights: only size and time matter),
       layer2 + layer3, 224 px, 10% coreset of the first --n-wrn50 images.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

LOAD_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import skpatchcore, joblib
t1 = time.perf_counter()
model = skpatchcore.load(sys.argv[1]) if sys.argv[2] == "safe" else joblib.load(sys.argv[1])
t2 = time.perf_counter()
model.score_samples([sys.argv[3]])
t3 = time.perf_counter()
imported = [m for m in ("torchvision", "timm", "torch._dynamo") if m in sys.modules]
print(t1 - t0, t2 - t1, t3 - t2, ",".join(imported) or "-")
"""


def _cold_load(path: Path, kind: str, image: str) -> tuple[float, float, float, str]:
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), kind, image],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"loading {path} ({kind}) failed:\n{result.stderr}")
    out = result.stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), out[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED / "data" / "mtd")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
    parser.add_argument("--n-lite0", type=int, default=762)
    parser.add_argument("--n-wrn50", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import joblib

    import skpatchcore
    from skpatchcore import make_patchcore
    from skpatchcore.io.datasets import load_mvtec

    data = load_mvtec(args.root)
    setups = {
        f"EfficientNet-Lite0, 1% of {args.n_lite0} MTD images": (make_patchcore(
            "timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=args.weights, resize=224,
            crop_size=None, interpolation="bicubic", sampling_ratio=0.01, random_state=0,
        ), data.train_images[:args.n_lite0]),
        f"WRN50 (random weights), 10% of {args.n_wrn50} MTD images": (make_patchcore(
            weights=None, resize=224, crop_size=None, sampling_ratio=0.1, random_state=0,
        ), data.train_images[:args.n_wrn50]),
    }
    image = data.test_images[0]
    print("| model | format | file | import skpatchcore + joblib | load | score 1 image | imported by the load |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, paths) in setups.items():
        model.fit(paths)
        with tempfile.TemporaryDirectory() as folder:
            files = {"joblib": Path(folder) / "model.joblib", "safe": Path(folder) / "model.skpc"}
            joblib.dump(model, files["joblib"])
            skpatchcore.save(model, files["safe"])
            times: dict[str, list] = {"joblib": [], "safe": []}
            for _ in range(args.runs):
                for kind in ("joblib", "safe"):
                    times[kind].append(_cold_load(files[kind], kind, image))
            for kind in ("joblib", "safe"):
                runs = times[kind]
                median = [statistics.median(run[i] for run in runs) for i in range(3)]
                print(f"| {name} | {kind} | {files[kind].stat().st_size / 1e6:.1f} MB | {median[0]:.2f} s | "
                      f"**{median[1]:.2f} s** | {median[2]:.2f} s | {runs[-1][3]} |", flush=True)


if __name__ == "__main__":
    main()
