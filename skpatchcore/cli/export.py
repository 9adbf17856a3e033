"""``skpatchcore export``: write a fitted model as an ONNX graph (:func:`skpatchcore.export_onnx`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..io.atomic import check_writable_file
from ._common import CommandError, info, load_model


def run_export(args: argparse.Namespace) -> int:
    """Run ``skpatchcore export`` with parsed arguments; returns the exit status."""
    from ..onnx_export import export_onnx

    output = Path(args.output)
    if output.is_dir():
        raise CommandError(f"-o {str(output)!r} is a folder; give a file name such as model.onnx")
    try:
        check_writable_file(output)
    except OSError as error:
        raise CommandError(f"-o: {error}") from error
    model = load_model(args.model, "cpu", args.allow_pickle)
    start = time.perf_counter()
    export_onnx(model, output, block_rows=args.block_rows)
    size = output.stat().st_size / 2**20
    detector = model.steps[-1][1]
    info(args, f"Wrote {output} ({size:.1f} MiB, {detector.memory_bank_.shape[0]} bank rows, threshold "
               f"{-detector.offset_:.6g}) in {time.perf_counter() - start:.1f} s")
    info(args, f"Score with: skpatchcore score --onnx {output} IMAGES -o OUT (needs onnxruntime, numpy, Pillow)")
    return 0
