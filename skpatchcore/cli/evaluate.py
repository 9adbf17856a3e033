"""``skpatchcore evaluate``: benchmark metrics of a model on an MVTec-layout
test set, with its scores.csv, heatmaps and plots.

The work is :func:`skpatchcore.evaluation.evaluate_model`. Unreadable test
images are left out of the metrics, listed in ``metrics.json`` and
``scores.csv`` and make the exit status
:data:`~skpatchcore.cli._common.EXIT_PARTIAL`; the results replace earlier
ones only when complete (see :mod:`skpatchcore.io.result_folder`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.protocol import evaluate_model, format_metrics
from ..io.datasets import load_mvtec
from ._common import apply_pixel_limit, apply_run_options, info, load_model, progress_enabled
from .score import report_failures


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``skpatchcore evaluate`` with parsed arguments; returns the exit status."""
    apply_pixel_limit(args)
    model = load_model(args.model, args.device, args.allow_pickle)
    apply_run_options(model, args)
    data = load_mvtec(args.category_dir)
    info(args, f"Evaluating {args.model} on {len(data.test_images)} test images of {data.category!r}")
    metrics = evaluate_model(
        model, data, output=args.output, plots=args.plots, heatmaps=args.heatmaps,
        fpr_limit=args.fpr_limit, progress=progress_enabled(args),
        vmin=args.vmin, vmax=args.vmax, extra={"model": str(args.model)}, fail_fast=args.fail_fast,
    )
    print(format_metrics(metrics), flush=True)
    if args.output is not None:
        written = ["metrics.json", "scores.csv"]
        written += ["roc.png", "worst_examples.png"] if args.plots else []
        written += ["heatmaps/"] if args.heatmaps else []
        info(args, f"Wrote {', '.join(written)} in {args.output}")
    failures = [(item["path"], item["error"]) for item in metrics["unreadable"]]
    listing = None if args.output is None else Path(args.output) / "scores.csv"
    return report_failures(failures, metrics["n_test_images"], listing)
