"""Scaling out: bounded-memory fit and scoring, partial_fit, Dask workers.

Every measurement runs in a fresh subprocess so that its peak resident memory
(VmHWM) is its own. Needs the MTD data set and the EfficientNet-Lite0 weights
(``../shared`` by default) and the ``dask`` extra.

Sections (``--sections``):

* ``rss``: peak RSS and time of fit against the number of training images
  (762, 3,000, 10,000) at one budget, with the in-memory fit (a budget that
  holds everything) beside it where it fits in memory. Beyond 762, the MTD
  training images are repeated as variants written once to a cache folder:
  variant v of image i is flipped horizontally (v odd), vertically
  (v // 2 odd), and for v >= 4 cropped by (v - 3)% of each side.
* ``fit10``: fit at a 10% coreset on the 762 MTD training images, one greedy
  pass in this process vs chunk coresets on a 2-worker ``LocalCluster``;
  image and pixel AUROC on the 582 test images.
* ``partial``: 4 ``partial_fit`` calls of 190 images vs one fit on 762.
* ``score``: images per second scoring the MTD test set in this process,
  on 1 worker x 2 threads and on 2 workers x 1 thread; peak RSS of
  ``score_samples`` on 200 and on 2,000 images at ``--score-budget``.

Example::

    python benchmarks/scaling.py --sections rss fit10 partial score --plot docs/scaling.png
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _common import CACHE, LITE0_224, mtd_parser, peak_rss_gb, require, save_figure, training_images

#: The reference rows' set-up: the official code's embedding and input scaling.
LITE0 = dict(LITE0_224, recipe="official", random_state=0)



def timed_steps(result: dict):
    """Record the seconds spent in the merge and in the detector's fit into `result`."""
    from skpatchcore import CoresetSampler, PatchCoreDetector

    def wrap(cls, name, key):
        original = getattr(cls, name)

        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                result[key] = result.get(key, 0.0) + time.perf_counter() - start

        setattr(cls, name, timed)

    wrap(CoresetSampler, "merge", "merge_s")
    wrap(PatchCoreDetector, "fit", "detector_s")


def lite0_model(args, sampling_ratio: float, **params):
    from skpatchcore import make_patchcore

    return make_patchcore(weights=str(args.weights), sampling_ratio=sampling_ratio, **LITE0, **params)


def test_set_metrics(model, mtd: Path) -> dict:
    """Image and pixel AUROC and scoring time on the MTD test set."""
    from skpatchcore.evaluation import evaluate
    from skpatchcore.io.datasets import load_mvtec

    metrics, _ = evaluate(model, load_mvtec(mtd))
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
            "predict_s": metrics["seconds"]}


# ------------------------------------------------------------ subprocess jobs
def job_fit(args) -> dict:
    """Fit on n images with a budget (None: everything in memory), report time and peak RSS."""
    images = training_images(args.n_images, args.root)
    model = lite0_model(args, args.ratio, working_memory=args.budget, n_jobs=args.n_jobs)
    start = time.perf_counter()
    model.fit(images)
    result = {"n_images": len(images), "budget": args.budget, "fit_s": time.perf_counter() - start,
              "bank": int(model[-1].memory_bank_.shape[0]), "peak_rss_gb": peak_rss_gb()}
    if args.evaluate:
        result.update(test_set_metrics(model, args.root))
    return result


def job_fit_dask(args) -> dict:
    """Fit on a LocalCluster of n_workers x 1 thread; evaluate in this process."""
    from distributed import LocalCluster

    images = training_images(args.n_images, args.root)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster:
        model = lite0_model(args, args.ratio, working_memory=args.budget, scheduler=cluster.scheduler_address)
        model.set_params(coreset__chunk_sampling_ratio=args.chunk_ratio)
        # Warm the workers (torch import, numba compilation) outside the timed fit.
        lite0_model(args, args.ratio, working_memory=args.budget, scheduler=cluster.scheduler_address).fit(
            images[:4])
        steps = {}
        timed_steps(steps)
        start = time.perf_counter()
        model.fit(images)
        fit_s = time.perf_counter() - start
    model.set_params(scheduler=None)
    result = {"n_images": len(images), "workers": args.workers, "budget": args.budget,
              "chunk_ratio": model[1].chunk_ratio(), "fit_s": fit_s, "bank": int(model[-1].memory_bank_.shape[0]),
              **steps}
    result.update(test_set_metrics(model, args.root))
    return result


def job_partial(args) -> dict:
    """Four partial_fit calls of 190 images (the 762 in order), then evaluate."""
    images = training_images(762, args.root)
    model = lite0_model(args, args.ratio)
    start = time.perf_counter()
    for first in range(0, 760, 190):
        model.partial_fit(images[first:first + 190 if first < 570 else 762])
    result = {"calls": 4, "fit_s": time.perf_counter() - start, "bank": int(model[-1].memory_bank_.shape[0])}
    result.update(test_set_metrics(model, args.root))
    return result


def job_score(args) -> dict:
    """Score the MTD test set locally or on a LocalCluster; or score_samples RSS on n images."""
    import joblib

    model = joblib.load(args.model)
    if args.n_images:
        images = (sorted(str(p) for p in (args.root / "test").rglob("*.jpg")) * 10)[:args.n_images]
        model.set_params(working_memory=args.budget)
        rss_before = peak_rss_gb()
        start = time.perf_counter()
        model.score_samples(images)
        return {"n_images": len(images), "seconds": time.perf_counter() - start,
                "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss_before}
    images = sorted(str(p) for p in (args.root / "test").rglob("*.jpg"))
    if args.workers == 0:
        model.set_params(n_jobs=args.n_jobs)
        model.score_samples(images[:8])
        start = time.perf_counter()
        model.score_samples(images)
        return {"where": f"in process, {args.n_jobs} threads", "images_per_s": len(images) /
                (time.perf_counter() - start)}
    from distributed import LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster:
        model.set_params(scheduler=cluster.scheduler_address, n_jobs=args.n_jobs, working_memory=64)
        # Warm every worker: numba compiles pynndescent's search and each worker builds its index.
        start = time.perf_counter()
        model.score_samples(images[-96:])
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        model.score_samples(images)
        seconds = time.perf_counter() - start
    threads = args.n_jobs or "share of"
    return {"where": f"{args.workers} worker(s) x {threads} torch thread(s)", "images_per_s": len(images) / seconds,
            "warm_s": warm_s}


JOBS = {"fit": job_fit, "fit-dask": job_fit_dask, "partial": job_partial, "score": job_score}


def run_job(args, job: str, **options) -> dict:
    command = [sys.executable, __file__, "--job", job, "--root", str(args.root), "--weights", str(args.weights)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        command += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"job {job} {options} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ sections
def section_rss(args) -> list[dict]:
    print("\nPeak RSS of fit (Lite0, 1% coreset), budget "
          f"{args.budget} MiB vs in memory; one process per row", flush=True)
    print(f"{'images':>7}{'mode':>12}{'fit s':>8}{'bank':>8}{'peak RSS GB':>13}", flush=True)
    rows = []
    for n_images in args.sizes:
        training_images(n_images, args.root)  # write the variants before timing
        for mode, budget in (("budget", args.budget), ("in memory", 1e6)):
            if mode == "in memory" and n_images * 3.3e-3 > args.in_memory_limit_gb:
                note = f"(features {round(n_images * 3.2e-3)} GB)"
                print(f"{n_images:>7}{mode:>12}{'':>8}{'':>8}{note:>13}")
                continue
            result = run_job(args, "fit", n_images=n_images, budget=budget, ratio=0.01)
            result["mode"] = mode
            rows.append(result)
            print(f"{n_images:>7}{mode:>12}{result['fit_s']:>8.1f}{result['bank']:>8}"
                  f"{result['peak_rss_gb']:>13.2f}", flush=True)
    return rows


def section_fit10(args) -> None:
    print("\nFit at 10% on the 762 MTD training images, evaluated on the 582 test images", flush=True)
    print(f"{'how':<48}{'fit s':>8}{'bank':>8}{'image':>7}{'pixel':>7}", flush=True)
    runs = [("one greedy pass, this process", "fit", dict(budget=1e6, evaluate=True))]
    for budget in args.dask_budgets:
        for chunk_ratio in args.chunk_ratios:
            label = f"2 workers, {budget:g} MiB chunks, chunk ratio {chunk_ratio or 'default'}"
            runs.append((label, "fit-dask", dict(workers=2, budget=budget, chunk_ratio=chunk_ratio)))
    if args.skip_single:
        runs = runs[1:]
    for label, job, options in runs:
        result = run_job(args, job, n_images=762, ratio=0.1, **options)
        print(f"{label:<48}{result['fit_s']:>8.1f}{result['bank']:>8}{result['image_auroc']:>7.3f}"
              f"{result['pixel_auroc']:>7.3f}", flush=True)
        if "merge_s" in result:
            print(f"{'':<4}of which merge {result['merge_s']:.1f} s, detector fit (calibration) "
                  f"{result['detector_s']:.1f} s", flush=True)


def section_partial(args) -> None:
    print("\npartial_fit: 4 calls of 190 images vs one fit of 762 (1% coreset)", flush=True)
    one = run_job(args, "fit", n_images=762, budget=1e6, ratio=0.01, evaluate=True)
    four = run_job(args, "partial", ratio=0.01)
    for label, result in (("one fit", one), ("4 x partial_fit", four)):
        print(f"{label:<18}fit {result['fit_s']:6.1f} s  bank {result['bank']:6}  image AUROC "
              f"{result['image_auroc']:.4f}  pixel AUROC {result['pixel_auroc']:.4f}", flush=True)


def section_score(args) -> None:
    import joblib

    model_file = CACHE / "lite0-1pct.joblib"
    if not model_file.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        model = lite0_model(args, 0.01).fit(training_images(762, args.root))
        joblib.dump(model, model_file)
    print("\nScoring the 582 MTD test images (Lite0, 1% bank)", flush=True)
    for workers, threads in ((0, 2), (0, 1), (1, 2), (2, 1)):
        result = run_job(args, "score", model=model_file, workers=workers, n_jobs=threads)
        print(f"  {result['where']:<40}{result['images_per_s']:>7.1f} images/s", flush=True)
    print(f"Peak RSS of score_samples (Python API, working_memory={args.score_budget:g} MiB)", flush=True)
    for n_images in (200, 2000):
        result = run_job(args, "score", model=model_file, n_images=n_images, budget=args.score_budget)
        print(f"  {n_images:>5} images: {result['peak_rss_gb']:.2f} GB peak ({result['seconds']:.0f} s)",
              flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode, marker in (("budget", "o-"), ("in memory", "s--")):
        points = sorted((r["n_images"], r["peak_rss_gb"]) for r in rows if r["mode"] == mode)
        if points:
            axis.plot(*zip(*points), marker, label=mode)
    axis.set_xlabel("training images")
    axis.set_ylabel("peak RSS of fit (GB)")
    axis.set_ylim(bottom=0)
    axis.set_title("skpatchcore fit memory (EfficientNet-Lite0, 1% coreset)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = mtd_parser(__doc__)
    parser.add_argument("--sections", nargs="+", default=["rss", "fit10", "partial", "score"])
    parser.add_argument("--budget", type=float, default=1024, help="MiB, the rss section's budget")
    parser.add_argument("--score-budget", type=float, default=256,
                        help="MiB, the score section's budget (200 images then span several chunks)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[762, 3000, 10000])
    parser.add_argument("--in-memory-limit-gb", type=float, default=14)
    parser.add_argument("--dask-budgets", type=float, nargs="+", default=[256])
    parser.add_argument("--chunk-ratios", type=float, nargs="+", default=[None],
                        help="chunk_sampling_ratio values of the fit10 section (default: the sampler's own)")
    parser.add_argument("--skip-single", action="store_true", help="fit10 without the single pass (271 s)")
    parser.add_argument("--plot", type=Path, default=None)
    # subprocess jobs
    parser.add_argument("--job", choices=sorted(JOBS), default=None)
    parser.add_argument("--n-images", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--chunk-ratio", type=float, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--evaluate", action="store_true")
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(JOBS[args.job](args)))
        return
    require(args.root, args.weights)
    rows = section_rss(args) if "rss" in args.sections else []
    if "fit10" in args.sections:
        section_fit10(args)
    if "partial" in args.sections:
        section_partial(args)
    if "score" in args.sections:
        section_score(args)
    if args.plot is not None and rows:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
