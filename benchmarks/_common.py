"""What the benchmark scripts share: data paths, set-ups, timing, memory and tables.

The scripts import this module as ``_common`` (Python puts a script's own
folder first on ``sys.path``), so run them as ``python benchmarks/<name>.py``
from the repository root. Data and weights come from ``../shared`` (see its
README); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MTD = SHARED / "data" / "mtd"
DEEPPCB = SHARED / "data" / "deeppcb"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"
#: Flipped and cropped variants of the MTD training images (growth beyond its 762 images).
CACHE = Path("/tmp/skpatchcore-scaling")

#: EfficientNet-Lite0 as the reference rows use it: ``blocks.2`` + ``blocks.4``,
#: 224 px square bicubic resize, no crop. Add ``recipe="official"`` for the
#: official code's embedding and input scaling (``mean_pool``, ImageNet
#: mean / std), or leave the default ``"recommended"`` recipe (``concat``,
#: mean = std = 0.5).
LITE0_224 = dict(
    backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), resize=224, crop_size=None,
    interpolation="bicubic",
)


def mtd_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--root`` (the MTD folder) and ``--weights`` (Lite0's ImageNet weights)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=MTD, help="MTD in MVTec AD layout (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=LITE0_WEIGHTS,
                        help="EfficientNet-Lite0 ImageNet state dict (default: %(default)s)")
    return parser


def require(*paths: Path) -> None:
    """Stop with a clear message if a data set or weights file is missing."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: see ../shared/README.md (or pass the path)")


def timed(function: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``function(*args, **kwargs)`` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (``VmHWM``; Linux).

    ``resource.getrusage``'s ``ru_maxrss`` survives ``exec`` on Linux and
    would report a large parent's peak in a fresh subprocess.
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1e6


def print_header(*columns: str) -> None:
    """Print the head of a Markdown table (rows follow with :func:`print_row`)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)


def print_row(*values: Any, digits: int | None = None) -> None:
    """Print one Markdown table row as it is measured; floats to `digits` decimals if given."""
    cells = (f"{value:.{digits}f}" if digits is not None and isinstance(value, float) else str(value)
             for value in values)
    print("| " + " | ".join(cells) + " |", flush=True)


def save_figure(figure, path: Path, dpi: int = 100) -> None:
    """Save a matplotlib figure to a temporary file and rename it into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=dpi)
    temporary.replace(path)


def write_json_lines(path: Path, rows: Sequence[dict]) -> None:
    """Write one JSON object per line to a temporary file and rename it into place."""
    import json

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.replace(path)

def training_images(n_images: int, mtd: Path) -> list[str]:
    """The MTD training images, then flipped / cropped variants written to CACHE."""
    from PIL import Image, ImageOps

    originals = sorted(str(p) for p in (mtd / "train" / "good").iterdir())
    paths = []
    for i in range(n_images):
        variant, source = divmod(i, len(originals))
        if variant == 0:
            paths.append(originals[source])
            continue
        target = CACHE / f"v{variant}" / Path(originals[source]).with_suffix(".png").name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(originals[source]).convert("RGB")
            if variant % 2:
                image = ImageOps.mirror(image)
            if (variant // 2) % 2:
                image = ImageOps.flip(image)
            if variant >= 4:
                width, height = image.size
                dx, dy = width * (variant - 3) // 100, height * (variant - 3) // 100
                image = image.crop((dx, dy, width - dx, height - dy))
            temporary = target.with_suffix(".tmp.png")
            image.save(temporary)
            temporary.replace(target)
        paths.append(str(target))
    return paths
