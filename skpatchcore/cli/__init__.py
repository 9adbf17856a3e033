"""The ``skpatchcore`` command line: fit, score, evaluate and a self-contained demo.

::

    skpatchcore fit TRAIN_DIR -o model.skpc [--backbone ... --weights ...]
    skpatchcore score model.skpc IMAGES_OR_DIRS... -o OUT/ [--no-images] [--fail-fast]
    skpatchcore score --onnx model.onnx IMAGES_OR_DIRS... -o OUT/   (no torch: onnxruntime)
    skpatchcore export model.skpc -o model.onnx
    skpatchcore evaluate model.skpc CATEGORY_DIR [-o OUT/] [--plots] [--heatmaps] [--fail-fast]
    skpatchcore demo [-o OUT/] [--quick]
    skpatchcore serve model.skpc [--host 127.0.0.1 --port 8000 --workers N --threads N]

Errors are reported as one line on stderr (``skpatchcore: error: ...``) with
exit status 1; ``--verbose`` adds the traceback. Usage errors exit with 2.
``score`` and ``evaluate`` exit with 3 when some images could not be read
(the others are scored and the failures listed).

Model files are written in the safe format of :mod:`skpatchcore.io.model_file`
(no code runs when one is read), or with :func:`joblib.dump` when the name
ends in ``.joblib``, ``.pkl`` or ``.pickle``. ``score`` and ``evaluate``
read a pickle only with ``--allow-pickle``: unpickling runs any code the
file contains.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from ._common import PROG, CommandError
from ._parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skpatchcore`` command line.

    Parameters
    ----------
    argv : sequence of str, default=None
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    status : int
        0 on success, 1 on an error, 2 on a usage error, 3 when ``score``
        or ``evaluate`` could not read some images (the rest are scored),
        130 when interrupted.
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
