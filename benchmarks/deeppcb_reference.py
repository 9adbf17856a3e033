"""How high can pixel AUROC go on DeepPCB's box masks? The difference from the board's own template.

DeepPCB pairs every defective test image with the defect-free template of
the same board region (``test/good`` holds them under the same file names).
The absolute difference between the two is the reference a template-matching
inspection would use, and it knows more than PatchCore can: the very board,
pixel for pixel. This script scores that difference as an anomaly map, with
the smoothings that PatchCore's maps get, and prints the pixel AUROC that
``skpatchcore evaluate`` would compute with those maps:

- over the 500 defective images only (box pixels against the other pixels
  of the same images: how well the map separates a defect from the rest of
  its own board);
- over all 1,000 test images, the 500 templates scoring 0 everywhere. A
  perfect score on the good images flatters the reference: no second capture
  of a good board exists to difference.

The masks are the union of the annotated boxes, larger than the defects they
hold; the tested images are separate captures, so the trace edges differ
from the template by a pixel here and there over the whole board. The
variants show which of the two limits the reference.

It also prints how large the defects are: the quartiles of the sides of the
annotated boxes, and of the extent of the defect itself (the pixels inside
each box that differ from the template, after a 3 x 3 opening removes the
one-pixel edge differences). The second is the size to give
``synthetic_defect_scorer(defect_size=...)``: a synthetic defect paints the
defect, not its box.

Public API (:func:`skpatchcore.evaluation.metrics.pixel_auroc`). No model,
no timings. About 10 GB of memory at the peak (the pixel metric sorts the
410 million pixels of the 1,000 maps).

Example::

    python benchmarks/deeppcb_reference.py
    python benchmarks/deeppcb_reference.py --variants "patches 8, sigma 4" "opening, sigma 8"
    python benchmarks/deeppcb_reference.py --variants          # the defect sizes only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import DEEPPCB, require
from PIL import Image
from scipy import ndimage

from skpatchcore.evaluation.metrics import pixel_auroc
from skpatchcore.io.datasets import load_mvtec

#: PatchCore's patch grid on DeepPCB's 320 px tiles (Lite0 ``blocks.2``): one score per 8 x 8 pixels.
PATCH = 8


def _patch_mean(difference: np.ndarray) -> np.ndarray:
    """The mean over each 8 x 8 patch, spread back over its pixels (a map at PatchCore's resolution)."""
    height, width = difference.shape
    blocks = difference.reshape(height // PATCH, PATCH, width // PATCH, PATCH).mean(axis=(1, 3))
    return np.repeat(np.repeat(blocks, PATCH, axis=0), PATCH, axis=1)


#: The maps compared: name -> difference image to anomaly map.
VARIANTS = {
    "raw difference": lambda d: d,
    "sigma 4": lambda d: ndimage.gaussian_filter(d, 4),
    "patches 8, sigma 4": lambda d: ndimage.gaussian_filter(_patch_mean(d), 4),
    "sigma 8": lambda d: ndimage.gaussian_filter(d, 8),
    "sigma 12": lambda d: ndimage.gaussian_filter(d, 12),
    "box 31": lambda d: ndimage.uniform_filter(d, 31),
    "opening, sigma 8": lambda d: ndimage.gaussian_filter(ndimage.grey_opening(d, size=(3, 3)), 8),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEEPPCB, help="DeepPCB in MVTec AD layout (default: %(default)s)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        metavar="NAME", help=f"maps to score (default: all of {list(VARIANTS)})")
    args = parser.parse_args(argv)
    require(args.root)
    data = load_mvtec(args.root)
    defective = [(Path(path), mask) for path, mask in zip(data.test_images, data.test_masks) if mask is not None]
    n_good = len(data.test_images) - len(defective)
    masks = [np.asarray(Image.open(mask).convert("L")) > 127 for _, mask in defective]
    differences = [np.abs(_gray(path) - _gray(path.parents[1] / "good" / path.name)) for path, _ in defective]
    inside = np.concatenate([d[m] for d, m in zip(differences, masks)]) > 0.5
    outside = np.concatenate([d[~m] for d, m in zip(differences, masks)]) > 0.5
    print(f"{len(defective)} defective images, {n_good} good; box pixels {np.mean(np.concatenate(masks).ravel()):.2%}"
          f"; pixels that differ from the template: {inside.mean():.1%} in the boxes, {outside.mean():.2%} outside")
    _print_defect_sizes(differences, masks)
    if not args.variants:
        return
    print(f"{'map':22s} {'defective images':>17s} {'all test images':>16s}")
    for name in args.variants:
        maps = [VARIANTS[name](d).astype(np.float32) for d in differences]
        own = pixel_auroc(masks, maps)
        zeros = [np.zeros_like(maps[0])] * n_good
        overall = pixel_auroc(masks + [np.zeros_like(masks[0])] * n_good, maps + zeros)
        print(f"{name:22s} {own:17.4f} {overall:16.4f}", flush=True)


def _print_defect_sizes(differences: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """Quartiles of the sides of the boxes, and of the extent of what differs from the template in each box."""
    box_sides, defect_sides = [], []
    for difference, mask in zip(differences, masks):
        differs = ndimage.binary_opening(difference > 0.5, np.ones((3, 3), dtype=bool))
        boxes, _ = ndimage.label(mask)
        for box in ndimage.find_objects(boxes):
            box_sides += [box[0].stop - box[0].start, box[1].stop - box[1].start]
            rows, columns = np.nonzero(differs[box])
            if len(rows):
                defect_sides += [np.ptp(rows) + 1, np.ptp(columns) + 1]
    for name, sides in (("box sides", box_sides), ("defect extents in the boxes", defect_sides)):
        low, median, high = np.percentile(sides, [25, 50, 75])
        print(f"{name}: quartiles {low:.0f} / {median:.0f} / {high:.0f} px ({len(sides) // 2} boxes)")


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255


if __name__ == "__main__":
    main()
