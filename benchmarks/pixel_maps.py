"""What moves pixel AUROC on MTD: map smoothing, upsampling, k, two input scales.

The recommended EfficientNet-Lite0 recipe (``concat``, mean = std = 0.5, square
bicubic resize, no crop), 1% coreset, seed 0, on the MTD standard protocol.
Every variant is scored on the labelled test split, so these rows measure
what each lever can give; they do not choose a setting (that is what
``model_selection.py`` does, without the test split).
Features are cached as .npy in ``--cache`` (default /tmp/skpatchcore-pixel).

``--diagnose`` prints, instead, where the default maps (k=1, bilinear,
sigma 4) lose pixel AUROC: per defect type (its images pooled with the good
ones), over the defective images only, per image, and the mean score of good
images' border against their centre; then overall and per-type pixel AUROC
for map_sigma 16, 24, 32 and 48.

``--ceiling`` splits the pooled pixel AUROC of the default maps (and of
sigma 16) into its pairs: defect pixels against the good images' pixels,
against the unmarked pixels of defective images, and within one image; and
prints the pixel AUROC those maps would reach if every comparison between
pixels of different images came out right (only within-image pairs wrong).

``--more-levers`` prints the levers tried after that diagnosis: each map minus
its own median (a per-image background), the mean patch score as the image
score, ``patch_size`` 5 and 7, a third layer (``blocks.5``), 160 px input, and
the 224 and 160 px maps summed, each divided by its own training threshold.

``--feature-levers`` prints the levers tried last: each image's patch features
minus their own mean (per-image centering), or standardised per image and
channel; a 5% coreset; k=3; and each map minus a quarter or half of its own
median. Every row gives pixel AUROC at sigma 4, 16 and 32.

Examples::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/pixel_maps.py   # ~25 min on one core
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/pixel_maps.py --diagnose
    OMP_NUM_THREADS=2 python benchmarks/pixel_maps.py --more-levers
    OMP_NUM_THREADS=2 python benchmarks/pixel_maps.py --feature-levers   # ~12 min on two cores
"""
import argparse, sys, json, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from scipy.ndimage import gaussian_filter
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import training_images
from skpatchcore import PatchFeatureTransformer, CoresetSampler, PatchCoreDetector
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.evaluation import masks_at_map_geometry
from skpatchcore.evaluation.metrics import image_auroc, pixel_auroc

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--root", type=Path, default=SHARED / "data" / "mtd")
parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"))
parser.add_argument("--cache", type=Path, default=Path("/tmp/skpatchcore-pixel"))
parser.add_argument("--diagnose", action="store_true", help="break the default maps' pixel AUROC down, then stop")
parser.add_argument("--ceiling", action="store_true", help="split pixel AUROC into within- and across-image pairs, then stop")
parser.add_argument("--more-levers", action="store_true", help="per-image background, mean image score, patch size, a third layer, 160 px; then stop")
parser.add_argument("--feature-levers", action="store_true", help="per-image centering / standardisation, 5%% coreset, k=3, part of a per-image background; then stop")
args = parser.parse_args()
mtd, W, out = args.root, args.weights, args.cache
out.mkdir(parents=True, exist_ok=True)
data = load_mvtec(mtd); labels = np.asarray(data.test_labels); results = []

def features(side, layers=("blocks.2", "blocks.4"), patch_size=3):
    f = PatchFeatureTransformer(backbone="timm:tf_efficientnet_lite0", layers=layers, weights=W,
                                resize=side, patch_size=patch_size, random_state=0).fit()
    name = f"f{side}" if (layers, patch_size) == (("blocks.2", "blocks.4"), 3) else f"f{side}_{'+'.join(layers)}_p{patch_size}"
    if not (out / f"{name}_train.npy").exists():
        np.save(out / f"{name}_train.npy", f.transform(training_images(762, mtd)))
        np.save(out / f"{name}_test.npy", f.transform(list(data.test_images)))
    return f, np.load(out / f"{name}_train.npy", mmap_mode="r"), np.load(out / f"{name}_test.npy", mmap_mode="r")

def maps_from(grids, mode="bilinear", sigma=4.0, size=224):
    t = torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(size, size), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))[:, 0].numpy()
    return np.stack([gaussian_filter(g, sigma) if sigma else g for g in up])


def patch_score_grid(train, test, ratio=0.01, k=1):
    """Patch scores of the test images against a coreset of the training patches (seed 0)."""
    bank = CoresetSampler(sampling_ratio=ratio, random_state=0).fit_transform(train)
    return PatchCoreDetector(n_neighbors=k, random_state=0).fit(bank).patch_scores(test)


f224, tr, te = features(224)
masks = masks_at_map_geometry(f224, data.test_masks, data.test_images)
def record(name, scores, maps):
    r = {"name": name, "image": round(float(image_auroc(labels, scores)), 4), "pixel": round(float(pixel_auroc(masks, maps)), 4)}
    print(json.dumps(r), flush=True); results.append(r)


def diagnose(maps):
    """Where pixel AUROC is lost: per defect type, defective images only, per image, border bias."""
    types = np.asarray(data.test_defect_types); good = types == "good"
    masks_array = np.asarray(masks)
    for kind in sorted(set(types) - {"good"}):
        keep = good | (types == kind)
        print(json.dumps({"type": kind, "images": int((types == kind).sum()),
                          "defect_pixel_fraction": round(float(masks_array[types == kind].mean()), 3),
                          "pixel_auroc_with_good": round(float(pixel_auroc(masks_array[keep], maps[keep])), 4)}))
    print(json.dumps({"pixel_auroc_defective_only": round(float(pixel_auroc(masks_array[~good], maps[~good])), 4)}))
    # Defects too small to survive the resize leave an all-normal mask: no per-image AUROC there.
    marked = [i for i in np.flatnonzero(~good) if masks_array[i].any()]
    per_image = [pixel_auroc(masks_array[i][None], maps[i][None]) for i in marked]
    print(json.dumps({"defective_images_with_marked_pixels": len(marked), "defective_images": int((~good).sum()),
                      "per_image_pixel_auroc_median": round(float(np.median(per_image)), 4),
                      "per_image_pixel_auroc_mean": round(float(np.mean(per_image)), 4)}))
    border = np.ones(maps.shape[1:], bool); border[16:-16, 16:-16] = False
    print(json.dumps({"good_maps_border_mean": round(float(maps[good][:, border].mean()), 3),
                      "good_maps_centre_mean": round(float(maps[good][:, ~border].mean()), 3)}))


def pooled_auroc(positive, negative) -> float:
    """P(positive > negative) + P(tie) / 2 over all pairs of the two score sets."""
    labels = np.r_[np.ones(len(positive), bool), np.zeros(len(negative), bool)]
    return float(pixel_auroc([labels[None]], [np.r_[positive, negative][None]]))


def ceiling(maps):
    """Pixel AUROC by kind of pair, and its value if only within-image pairs could be wrong."""
    marked = np.asarray(masks).astype(bool); good = np.asarray(data.test_defect_types) == "good"
    positive = maps[marked]
    negative_good, negative_defective = maps[good].ravel(), maps[~good][~marked[~good]]
    within_pairs = within_right = 0.0
    for i in np.flatnonzero(~good):
        n_pos, n_neg = int(marked[i].sum()), int((~marked[i]).sum())
        if n_pos and n_neg:
            pairs = n_pos * n_neg
            within_pairs += pairs; within_right += pairs * pooled_auroc(maps[i][marked[i]], maps[i][~marked[i]])
    all_pairs = len(positive) * (len(negative_good) + len(negative_defective))
    return {"pixel": round(float(pixel_auroc(masks, maps)), 4),
            "defect_vs_good_images": round(pooled_auroc(positive, negative_good), 4),
            "defect_vs_unmarked_of_defective_images": round(pooled_auroc(positive, negative_defective), 4),
            "within_image": round(within_right / within_pairs, 4),
            "share_of_pairs_within_one_image": round(within_pairs / all_pairs, 4),
            "bound_if_cross_image_pairs_all_right": round((within_right + all_pairs - within_pairs) / all_pairs, 4)}


def more_levers():
    """Levers tried after the diagnosis: per-image background, mean image score, patch size, layers, scale."""
    types = np.asarray(data.test_defect_types); masks_array = np.asarray(masks).astype(bool)
    bank = CoresetSampler(sampling_ratio=0.01, random_state=0).fit_transform(tr)
    base = PatchCoreDetector(n_neighbors=1, random_state=0).fit(bank); grid = base.patch_scores(te)
    maps = maps_from(grid)
    for kind in sorted(set(types)):  # mean map value on normal pixels, per image, by type
        normal = [m[~k].mean() for m, k in zip(maps[types == kind], masks_array[types == kind]) if (~k).any()]
        print(json.dumps({"type": kind, "normal_pixel_mean_p10_p50_p90": np.round(np.percentile(normal, [10, 50, 90]), 2).tolist()}))
    flat = grid.reshape(len(grid), -1)
    record("image score = mean patch score (maps unchanged)", flat.mean(1), maps)
    for sigma in (4, 16):
        smooth = maps_from(grid, sigma=sigma)
        record(f"sigma {sigma}, each map minus its own median", flat.max(1), smooth - np.median(smooth.reshape(len(smooth), -1), 1)[:, None, None])
    variants = {"patch_size 5": (224, ("blocks.2", "blocks.4"), 5), "patch_size 7": (224, ("blocks.2", "blocks.4"), 7),
                "blocks.2+blocks.4+blocks.5": (224, ("blocks.2", "blocks.4", "blocks.5"), 3), "160 px": (160, ("blocks.2", "blocks.4"), 3)}
    normalised = {}
    for name, (side, layers, patch_size) in variants.items():
        _, ftr, fte = features(side, layers, patch_size)
        det = PatchCoreDetector(n_neighbors=1, random_state=0).fit(CoresetSampler(sampling_ratio=0.01, random_state=0).fit_transform(ftr))
        g = det.patch_scores(fte); normalised[name] = g / -det.offset_
        for sigma in (4, 16):
            record(f"{name}, sigma {sigma}", g.reshape(len(g), -1).max(1), maps_from(g, sigma=sigma))
    pair = normalised["160 px"], grid / -base.offset_  # each scale divided by its own training threshold
    record("224 + 160 px, sigma 16", sum(g.reshape(len(g), -1).max(1) for g in pair), sum(maps_from(g, sigma=16) for g in pair))


def feature_levers():
    """Levers on the features and the bank; each row at sigma 4, 16 and 32."""
    def row(name, grid, image_scores=None):
        scores = grid.reshape(len(grid), -1).max(1) if image_scores is None else image_scores
        r = {"name": name, "image": round(float(image_auroc(labels, scores)), 4)}
        for sigma in (4, 16, 32):
            r[f"pixel_sigma{sigma}"] = round(float(pixel_auroc(masks, maps_from(grid, sigma=sigma))), 4)
        print(json.dumps(r), flush=True)

    base = patch_score_grid(tr, te); row("default (1%, k=1)", base)
    centre = lambda a: a - a.mean((1, 2), keepdims=True)
    row("per-image centering of the features", patch_score_grid(centre(np.asarray(tr)), centre(np.asarray(te))))
    standardise = lambda a: centre(a) / (a.std((1, 2), keepdims=True) + 1e-3)
    row("per-image standardisation of the features", patch_score_grid(standardise(np.asarray(tr)), standardise(np.asarray(te))))
    row("5% coreset", patch_score_grid(tr, te, ratio=0.05))
    row("k=3", patch_score_grid(tr, te, k=3))
    smooth = maps_from(base, sigma=16); median = np.median(smooth.reshape(len(smooth), -1), 1)[:, None, None]
    for part in (0.25, 0.5):
        print(json.dumps({"name": f"sigma 16, each map minus {part} x its own median",
                          "pixel_sigma16": round(float(pixel_auroc(masks, smooth - part * median)), 4)}), flush=True)


if args.feature_levers:
    feature_levers()
    sys.exit()

if args.ceiling:
    grid = patch_score_grid(tr, te)
    for sigma in (4, 16):
        print(json.dumps({"sigma": sigma, **ceiling(maps_from(grid, sigma=sigma))}), flush=True)
    sys.exit()

if args.more_levers:
    more_levers()
    sys.exit()

if args.diagnose:
    grid = patch_score_grid(tr, te)
    default_maps = maps_from(grid)
    record("224 k=1 bilinear sigma=4", grid.reshape(len(grid), -1).max(1), default_maps)
    diagnose(default_maps)
    types = np.asarray(data.test_defect_types); masks_array = np.asarray(masks)
    for sigma in (16, 24, 32, 48):  # beyond the main table's range: per type, with the good images
        smooth = maps_from(grid, sigma=sigma); row = {"sigma": sigma, "pixel": round(float(pixel_auroc(masks, smooth)), 4)}
        for kind in sorted(set(types) - {"good"}):
            keep = (types == "good") | (types == kind)
            row[kind] = round(float(pixel_auroc(masks_array[keep], smooth[keep])), 4)
        print(json.dumps(row), flush=True)
    sys.exit()

grids = {}
for side, (ftr, fte) in {224: (tr, te)}.items():
    t = time.perf_counter()
    bank = CoresetSampler(sampling_ratio=0.01, random_state=0).fit_transform(ftr)
    for k in (1, 3):
        det = PatchCoreDetector(n_neighbors=k, random_state=0).fit(bank)
        g = det.patch_scores(fte); grids[(side, k)] = (g, det)
    print("fit", side, time.perf_counter() - t, flush=True)
for k in (1, 3):
    g, det = grids[(224, k)]
    s = g.reshape(len(g), -1).max(1)
    for mode in ("bilinear", "nearest"):
        for sigma in (0, 2, 4, 6, 8):
            if mode == "nearest" and sigma not in (4,):
                continue
            record(f"224 k={k} {mode} sigma={sigma}", s, maps_from(g, mode, sigma))
# Two scales: 320 px features too; each scale's maps divided by its own training threshold (-offset_).
f320, tr3, te3 = features(320)
bank3 = CoresetSampler(sampling_ratio=0.01, random_state=0).fit_transform(tr3)
det3 = PatchCoreDetector(n_neighbors=1, random_state=0).fit(bank3)
g3 = det3.patch_scores(te3)
g1, det1 = grids[(224, 1)]
record("320 k=1 bilinear sigma=4", g3.reshape(len(g3), -1).max(1), maps_from(g3))
n1, n3 = -det1.offset_, -det3.offset_
print("thresholds", n1, n3)
m = maps_from(g1) / n1 + maps_from(g3) / n3
s = g1.reshape(len(g1), -1).max(1) / n1 + g3.reshape(len(g3), -1).max(1) / n3
record("224+320 k=1 normalised by threshold", s, m)
