"""What the ``skpatchcore`` commands share: one-line errors, messages, input
images, model files and the backbone options (weights, layers)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..io.images import IMAGE_EXTENSIONS, list_images

PROG = "skpatchcore"
#: Exit status of ``score`` and ``evaluate`` when some images could not be read.
EXIT_PARTIAL = 3
#: Default feature layers of torchvision ResNets (and other backbones).
RESNET_LAYERS = ("layer2", "layer3")
#: Default feature layers of timm EfficientNets.
EFFICIENTNET_LAYERS = ("blocks.2", "blocks.4")


class CommandError(Exception):
    """An error reported to the user as one line, without a traceback."""


# --------------------------------------------------------------------------
# messages


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, and not with ``--quiet``."""
    return not args.quiet and sys.stderr.isatty()


def info(args: argparse.Namespace, message: str) -> None:
    """Print an informational message on stdout unless ``--quiet``."""
    if not args.quiet:
        print(message, flush=True)


def warn(message: str) -> None:
    """Print ``skpatchcore: warning: message`` on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def importable(module: str) -> bool:
    """Whether an optional dependency (``"timm"``, ``"matplotlib"``) is installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------
# inputs


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named directly or found (recursively) in folders.

    Parameters
    ----------
    inputs : sequence of str or path-like
        Image files (taken as they are) and folders, searched recursively for
        files with a suffix in :data:`IMAGE_EXTENSIONS` (case-insensitive),
        skipping hidden files and folders and following links to folders
        (:func:`~skpatchcore.io.images.list_images`).

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
            files = list_images(path, recursive=True)
            if not files:
                raise CommandError(
                    f"no images found in {str(item)!r} (searched recursively for "
                    f"{', '.join(IMAGE_EXTENSIONS)})"
                )
            found.extend(str(p) for p in files)
        elif os.path.lexists(path):  # a file; a FIFO or broken link is reported when it is read
            found.append(str(path))
        else:
            raise CommandError(f"no such file or folder: {str(item)!r}")
    return list(dict.fromkeys(found))


def apply_pixel_limit(args: argparse.Namespace) -> None:
    """``--max-image-pixels``: PIL's decoding limit for this process (0: no limit)."""
    limit = getattr(args, "max_image_pixels", None)
    if limit is not None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = limit or None


def load_model(path: str | os.PathLike, device: str | None = None, allow_pickle: bool = False):
    """Load a PatchCore pipeline saved by ``skpatchcore fit``.

    The file's kind is read from its first bytes before anything else: the
    safe format (:func:`skpatchcore.load`) is always read; a pickle or
    joblib file only with ``allow_pickle=True``, since unpickling runs any
    code the file contains.

    Parameters
    ----------
    path : str or path-like
        A safe-format model file, or (with `allow_pickle`) a
        :func:`joblib.dump` file.
    device : str, default=None
        Device that replaces the one stored in the model (``"cpu"``,
        ``"cuda"``...); the stored one is kept when None or empty.
    allow_pickle : bool, default=False
        Read pickle / joblib files (only for files you trust).

    Returns
    -------
    model : PatchCorePipeline

    Raises
    ------
    CommandError
        If the file is missing, is a pickle and `allow_pickle` is False, is
        damaged, holds something other than a PatchCore pipeline, or was
        saved by an incompatible version.
    """
    from ..io.model_file import detect_format, load
    from ..io.versioning import CorruptModelError, IncompatibleModelError
    from ..pipeline import PatchCorePipeline

    path = Path(path)
    try:
        kind = detect_format(path)
        if kind == "safe":
            model = load(path)
        elif not allow_pickle:
            if kind == "pickle":
                raise CommandError(
                    f"{str(path)!r} is a pickle (joblib) file, and loading a pickle runs any code it "
                    "contains; refusing to open it. Pass --allow-pickle only if you trust the file, or "
                    "refit with 'skpatchcore fit -o model.skpc' (the safe format)"
                )
            raise CommandError(
                f"{str(path)!r} is not a skpatchcore model file (neither the safe format nor, with "
                "--allow-pickle, a joblib file); write one with 'skpatchcore fit'"
            )
        else:
            import joblib

            model = joblib.load(path)
    except CommandError:
        raise
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    except IncompatibleModelError as error:
        raise CommandError(f"incompatible model file {str(path)!r}: {error}") from error
    except CorruptModelError as error:
        raise CommandError(str(error)) from error
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
    if device:
        for _, step in model.steps:
            if "device" in step.get_params(deep=False):
                step.set_params(device=device)
    return model


def apply_run_options(model, args: argparse.Namespace) -> None:
    """Set ``--working-memory``, ``--n-jobs``, ``--scheduler`` and ``--batch-size`` on a loaded model."""
    if getattr(args, "batch_size", None) is not None:
        model.steps[0][1].set_params(batch_size=args.batch_size)
    model.set_params(working_memory=args.working_memory, n_jobs=args.n_jobs, scheduler=args.scheduler)
    check_scheduler(args.scheduler)


def check_scheduler(address: str | None) -> None:
    """Connect to ``--scheduler`` now, so that a wrong address fails before any work.

    Raises
    ------
    CommandError
        If Dask is missing or no scheduler answers at `address`.
    """
    if address is None:
        return
    from ..distributed import connect

    try:
        connect(address)
    except (ImportError, ConnectionError, TypeError) as error:
        raise CommandError(str(error)) from error


# --------------------------------------------------------------------------
# backbone options


def parse_weights(text: str | None) -> str | None:
    """``--weights``: None for random weights, an existing file's path, or a weights name."""
    if text is None or text.strip().lower() in ("none", "random"):
        return None
    expanded = os.path.expanduser(text)
    return expanded if os.path.exists(expanded) else text


def describe_weights(weights: str | None) -> str:
    """A few words on a :func:`parse_weights` result, for messages."""
    if weights is None:
        return "none (random initialisation)"
    if os.path.exists(str(weights)):
        return f"file {weights}"
    return f"{weights} (pretrained)"


def choose_layers(layers: Sequence[str] | None, backbone: str) -> tuple[str, ...]:
    """``--layers`` when given, else the default layers of `backbone`."""
    if layers:
        return tuple(layers)
    if backbone.startswith("timm:") and "efficientnet" in backbone:
        return EFFICIENTNET_LAYERS
    return RESNET_LAYERS


def writable_output_file(text: str, example: str) -> Path:
    """The ``-o`` file of a command, refused with a one-line error if it is a folder or cannot be written."""
    from ..io.atomic import check_writable_file

    output = Path(text)
    if output.is_dir():
        raise CommandError(f"-o {str(output)!r} is a folder; give a file name such as {example}")
    try:
        check_writable_file(output)
    except OSError as error:
        raise CommandError(f"-o: {error}") from error
    return output
