"""How fit and predict time grow with the training set and the coreset ratio.

On Magnetic Tile Defects (EfficientNet-Lite0 blocks.2+blocks.4, 224 px square
bicubic, ``--recipe``, default the official code's embedding and input scaling
as in the reference rows): features of all training images are computed once (their time is
linear in the number of images and is charged per image), then for each
setting the coreset and the detector are fitted and 50 test images scored::

    python benchmarks/growth.py --plot docs/growth.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import LITE0_224, mtd_parser, print_header, print_row, require, save_figure, timed

from skpatchcore import CoresetSampler, PatchCoreDetector, PatchFeatureTransformer
from skpatchcore.io.datasets import load_mvtec


def run(train, test, seconds_per_image: float, n_images: int, ratio: float) -> dict:
    bank, coreset_s = timed(CoresetSampler(ratio, random_state=0).fit_transform, train[:n_images])
    detector, detector_s = timed(PatchCoreDetector(random_state=0).fit, bank)
    detector.score_and_maps(test[:2], 224)
    _, predict_s = timed(detector.score_and_maps, test, 224)
    features_s = seconds_per_image * n_images
    return dict(
        n_images=n_images, ratio=ratio, bank=len(bank), features_s=features_s, coreset_s=coreset_s,
        detector_s=detector_s, fit_s=features_s + coreset_s + detector_s,
        predict_ms=1000 * (predict_s / len(test) + seconds_per_image),
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    for ratio in sorted({r["ratio"] for r in rows}):
        series = [r for r in rows if r["ratio"] == ratio and r["sweep"] == "images"]
        if series:
            images = [r["n_images"] for r in series]
            left.plot(images, [r["fit_s"] for r in series], "o-", label=f"fit, ratio {ratio:g}")
            left.plot(images, [r["coreset_s"] for r in series], "x--", label=f"coreset part, ratio {ratio:g}")
            middle.plot(images, [r["predict_ms"] for r in series], "o-", label=f"ratio {ratio:g}")
    left.set(xlabel="training images", ylabel="seconds", title="Fit time")
    middle.set(xlabel="training images", ylabel="ms per image", title="Predict time (features + search + map)")
    sweep = [r for r in rows if r["sweep"] == "ratio"]
    right.plot([r["ratio"] for r in sweep], [r["fit_s"] for r in sweep], "o-", label="fit s")
    right.plot([r["ratio"] for r in sweep], [r["predict_ms"] for r in sweep], "s-", label="predict ms/image")
    right.set(xscale="log", xlabel="sampling ratio", title=f"{sweep[0]['n_images']} training images" if sweep else "")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--recipe", choices=["official", "recommended"], default="official")
    parser.add_argument("--images", type=int, nargs="+", default=[50, 100, 200, 400, 762])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--ratio-sweep", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    parser.add_argument("--ratio-sweep-images", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    require(args.root, args.weights)
    data = load_mvtec(args.root)
    transformer = PatchFeatureTransformer(**LITE0_224, weights=str(args.weights), recipe=args.recipe).fit()
    train, seconds = timed(transformer.transform, data.train_images)
    seconds_per_image = seconds / len(data.train_images)
    rng = np.random.default_rng(0)
    test = transformer.transform([data.test_images[i] for i in rng.choice(len(data.test_images), 50, replace=False)])
    print(f"features: {1000 * seconds_per_image:.1f} ms per image", flush=True)
    print_header("sweep", "training images", "ratio", "bank rows", "features s", "coreset s", "detector s",
                 "fit s", "predict ms/image")
    rows = []
    settings = [("images", n, r) for r in args.ratios for n in args.images]
    settings += [("ratio", args.ratio_sweep_images, r) for r in args.ratio_sweep]
    for sweep, n_images, ratio in settings:
        row = dict(run(train, test, seconds_per_image, min(n_images, len(train)), ratio), sweep=sweep)
        rows.append(row)
        print_row(sweep, row["n_images"], ratio, row["bank"], *(round(row[key], 1) for key in (
            "features_s", "coreset_s", "detector_s", "fit_s", "predict_ms")))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
