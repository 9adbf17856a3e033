"""Peak memory of ``skpatchcore score`` on one very large image, with and without heat maps.

Writes a 9000 x 9000 px PNG (81 M pixels, under PIL's decoding limit of
about 89 M), fits a random-weight resnet18 PatchCore model (``--no-crop``,
so that the heat map is drawn over the original image), and runs
``python -m skpatchcore score MODEL IMAGE -o OUT`` in a fresh child process,
once with heat maps and once with ``--no-images``. Prints one JSON line:
the child's peak resident memory (MiB) in each case, the heat map's size
and the wall time of each run.

Run from the project root::

    OMP_NUM_THREADS=1 python benchmarks/score_memory.py [--side 9000]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

#: Reports the child's peak RSS after running the command line.
CHILD = """
import sys
from skpatchcore.cli import main
status = main(sys.argv[1:])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_MIB", peak // 1024, "STATUS", status)
"""


def _peak(args: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    words = result.stdout.split()
    if words[words.index("STATUS") + 1] != "0":
        raise RuntimeError(result.stdout + result.stderr)
    return int(words[words.index("PEAK_MIB") + 1]), round(seconds, 1)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from skpatchcore import make_patchcore, save

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=9000, help="side of the square PNG in pixels (default: 9000)")
    side = parser.parse_args(argv).side

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rng = np.random.default_rng(0)
        train = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
        model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0,
                               sampling_ratio=0.5).fit(train)
        save(model, folder / "model.skpc")
        image = folder / "large.png"
        Image.new("RGB", (side, side), (90, 120, 150)).save(image, compress_level=1)
        with_images, seconds_images = _peak(["score", str(folder / "model.skpc"), str(image), "-o",
                                             str(folder / "out"), "-q"])
        with Image.open(folder / "out" / "heatmaps" / "large.png") as heatmap:
            heatmap_size = list(heatmap.size)
        without_images, seconds_plain = _peak(["score", str(folder / "model.skpc"), str(image), "-o",
                                               str(folder / "plain"), "--no-images", "-q"])
    figures = {
        "image_px": [side, side], "peak_mib_with_heatmaps": with_images, "peak_mib_no_images": without_images,
        "heatmap_px": heatmap_size, "seconds_with_heatmaps": seconds_images, "seconds_no_images": seconds_plain,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
