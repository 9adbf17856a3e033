"""``skpatchcore export``: write a fitted model as an ONNX graph (:func:`skpatchcore.export_onnx`)."""

from __future__ import annotations

import argparse
import time

from ._common import info, load_model, writable_output_file


def run_export(args: argparse.Namespace) -> int:
    """Run ``skpatchcore export`` with parsed arguments; returns the exit status."""
    from ..onnx_export import export_onnx

    output = writable_output_file(args.output, "model.onnx")
    model = load_model(args.model, "cpu", args.allow_pickle)
    start = time.perf_counter()
    export_onnx(model, output, block_rows=args.block_rows)
    size = output.stat().st_size / 2**20
    detector = model.steps[-1][1]
    info(args, f"Wrote {output} ({size:.1f} MiB, {detector.memory_bank_.shape[0]} bank rows, threshold "
               f"{-detector.offset_:.6g}) in {time.perf_counter() - start:.1f} s")
    info(args, f"Score with: skpatchcore score --onnx {output} IMAGES -o OUT (needs onnxruntime, numpy, Pillow)")
    return 0
