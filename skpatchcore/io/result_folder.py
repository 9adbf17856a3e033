"""Publish a command's output folder as one unit.

``skpatchcore score -o OUT`` and ``evaluate -o OUT`` (and
:func:`skpatchcore.evaluation.evaluate_model` with ``output=``) write all
their results (``scores.csv``, ``metrics.json``, ``heatmaps/``, plots) into a
hidden staging folder *beside* ``OUT`` and then put it in place of ``OUT``
in one step:

- on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically:
  a reader, or a run killed at any moment, sees either the complete old
  results or the complete new ones, never a mix;
- elsewhere, ``OUT`` is renamed aside and the staging folder renamed to
  ``OUT``: between the two renames ``OUT`` is briefly missing (never mixed);
  a run killed right there leaves the old results aside, and the next run
  puts them back before it starts.

Two runs into the same ``OUT`` each publish a complete set; the last one to
finish wins. Staging folders of runs that were killed (their process no
longer exists) are removed by the next run into the same ``OUT``.

Since the whole folder is replaced, ``OUT`` may only hold what these
commands write: a folder with other files is refused before any work, with
an error that names them.

An ``OUT`` that cannot be replaced (a mount point, such as a container
volume, or a folder whose parent is not writable) is updated entry by entry
instead, from a staging folder inside it: earlier results are still replaced
only by a complete new set, but a run killed between those renames can leave
a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .atomic import fsync_directory

__all__ = ["RESULT_NAMES", "staged_result_folder"]

#: Everything ``score`` and ``evaluate`` write: an output folder holding only these may be replaced.
RESULT_NAMES = frozenset({"scores.csv", "metrics.json", "heatmaps", "roc.png", "worst_examples.png"})
_STAGING = "skpatchcore-staging"
_ASIDE = "skpatchcore-previous"
_RENAME_EXCHANGE = 2


def _sibling_pattern(target: Path, kind: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.{kind}-(\d+)-[^/]*")


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its folder alone
    return True


def _stale(target: Path, kind: str) -> list[Path]:
    """Siblings of `target` left by killed runs (their process is gone)."""
    pattern = _sibling_pattern(target, kind)
    found = []
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_exists(int(match.group(1))):
            found.append(entry)
    return sorted(found)


def clean_stale(target: Path) -> None:
    """Remove staging folders of killed runs into `target`; put back results a killed run left aside."""
    aside = _stale(target, _ASIDE)
    if aside and not os.path.lexists(target):
        os.rename(aside.pop(), target)  # killed between the two renames of the fallback
    for folder in _stale(target, _STAGING) + aside:
        shutil.rmtree(folder, ignore_errors=True)


def _leftover(name: str) -> bool:
    """Hidden files that earlier versions left inside the output folder (temporary files, staging)."""
    return name.startswith(".skpatchcore-staging-") or (name.startswith(".") and ".tmp" in name)


def _check_replaceable(target: Path, owned: Sequence[str]) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise NotADirectoryError(f"output folder {str(target)!r} is a file; give a folder")
    allowed = RESULT_NAMES | set(owned)
    foreign = sorted(
        entry.name for entry in target.iterdir() if entry.name not in allowed and not _leftover(entry.name)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output folder {str(target)!r} holds files that skpatchcore did not write ({shown}); the whole "
            "folder is replaced by the new results, so give a new or empty folder, or one written by "
            "'skpatchcore score' or 'evaluate'"
        )


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without exchange
        return False
    raise OSError(code, f"cannot replace {str(second)!r}: {os.strerror(code)}")


def _publish(staging: Path, target: Path) -> Path | None:
    """Put `staging` in place of `target`; returns the folder holding the old results (to remove)."""
    try:
        os.rename(staging, target)  # no results yet (or an empty folder): one rename
        return None
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
    if _exchange(staging, target):
        return staging  # now holds the previous results
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_ASIDE}-{os.getpid()}-", dir=target.parent))
    os.rmdir(aside)
    os.rename(target, aside)
    os.rename(staging, target)
    return aside


@contextlib.contextmanager
def staged_result_folder(folder: str | os.PathLike, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging folder; when the block succeeds, it replaces `folder` as a whole.

    Parameters
    ----------
    folder : str or path-like
        The output folder. It may be missing, empty, or hold results of
        ``score`` / ``evaluate`` (:data:`RESULT_NAMES` and `owned`); anything
        else in it is refused. A symbolic link is followed: the folder it
        points to is replaced.
    owned : sequence of str, default=()
        Further names the caller writes.

    Yields
    ------
    staging : pathlib.Path
        A hidden folder beside `folder`; write every result there. If the
        block raises, it is removed and `folder` is left as it was.

    Raises
    ------
    FileExistsError
        If `folder` holds files that are not results of these commands.
    NotADirectoryError
        If `folder` is a file.
    """
    target = Path(os.path.realpath(os.fspath(folder)))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _swappable(target):
        with _staged_entries(target, owned) as staging:
            yield staging
        return
    clean_stale(target)
    _check_replaceable(target, owned)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}-{os.getpid()}-", dir=target.parent))
    old = None
    try:
        yield staging
        _check_replaceable(target, owned)  # again: files may have been added during the run
        os.chmod(staging, target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~_umask())
        old = _publish(staging, target)
        fsync_directory(target.parent)
    finally:
        for leftover in (staging, old):
            if leftover is not None and os.path.lexists(leftover) and leftover != target:
                shutil.rmtree(leftover, ignore_errors=True)


def _swappable(target: Path) -> bool:
    """Whether `target` can be replaced as a whole: not a mount point, in a writable parent folder."""
    return not os.path.ismount(target) and os.access(target.parent, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _staged_entries(target: Path, owned: Sequence[str]) -> Iterator[Path]:
    """Fallback for an output folder that cannot be swapped (a mount point, a read-only parent).

    The results are staged in a hidden folder inside `target` and moved into
    place one entry at a time (one rename per file, two per folder); results
    of an earlier run that this run does not produce are removed. A run
    killed between those renames can leave a mix, which the swap avoids.
    """
    target.mkdir(exist_ok=True)
    for leftover in target.glob(f".{_STAGING}-*"):
        match = re.fullmatch(rf"\.{_STAGING}-(\d+)-.*", leftover.name)
        if match and not _process_exists(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_STAGING}-{os.getpid()}-", dir=target))
    try:
        yield staging
        replaced = staging / ".replaced"
        replaced.mkdir()
        for name in sorted(RESULT_NAMES | set(owned)):
            new, old = staging / name, target / name
            if old.is_dir() and not old.is_symlink():
                os.replace(old, replaced / name)  # a folder cannot be renamed over another
            elif not new.exists() and (old.exists() or old.is_symlink()):
                old.unlink()
            if new.exists():
                os.replace(new, old)
        fsync_directory(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
