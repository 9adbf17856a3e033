"""Atomic file writes: a temporary file beside the target, renamed into place.

A reader of the target path sees either the complete previous file or the
complete new one, never a partial write: the data goes to a hidden
temporary file in the target's own folder (so that the final
:func:`os.replace` is a rename within one file system), is flushed and
``fsync``-ed, and only then replaces the target. A write that fails or is
killed leaves the previous file untouched (and at worst a hidden
``.<name>.*.tmp<suffix>`` file, which the next successful write does not
need).

:mod:`skpatchcore.io.result_folder` extends this to a command's whole output
folder (``scores.csv``, ``metrics.json``, ``heatmaps/``...), published as one
unit.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _default_file_mode() -> int:
    """Permission bits of a file created by ``open()``: 0o666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened).

    Parameters
    ----------
    folder : pathlib.Path
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows, or a folder without read permission
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    For writers that take a file name (``joblib.dump``, ``PIL.Image.save``,
    ``Figure.savefig``). The temporary name keeps the suffix of `path`, so
    writers that choose the format from the suffix still do.

    Parameters
    ----------
    path : str or path-like
        The file to write; its folder must exist.

    Yields
    ------
    temporary : pathlib.Path
        Write the complete file here. It is fsync-ed and renamed onto `path`
        when the ``with`` block ends without an exception, and removed
        otherwise.
    """
    target = Path(path)
    descriptor, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; rename it onto `path` on success.

    Parameters
    ----------
    path : str or path-like
        The file to write; its folder must exist.
    mode : {"wb", "w"}, default="wb"
        Binary or text mode.
    **open_kwargs
        Passed to :func:`open` (``encoding``, ``newline``...).

    Yields
    ------
    handle : file object
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}.")
    with atomic_path(path) as temporary:
        with open(temporary, mode, **open_kwargs) as handle:
            yield handle


def check_writable_file(path: str | os.PathLike) -> None:
    """Fail now, with a clear message, if `path` could not be written later.

    Creates the parent folders if needed and creates and removes a temporary
    file in the target folder, which is what :func:`atomic_path` will do.

    Parameters
    ----------
    path : str or path-like

    Raises
    ------
    OSError
        With a message naming `path` when the folder cannot be created or
        written, or `path` is a folder.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{str(target)!r} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".check", dir=target.parent)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PermissionError(
            f"cannot write {str(target)!r}: folder {str(target.parent)!r} is not writable ({reason})"
        ) from error
    os.close(descriptor)
    os.unlink(name)
