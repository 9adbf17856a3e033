"""What is wrong with a path that should be a readable file (image or model).

Opening a FIFO waits forever and a device such as ``/dev/zero`` never ends,
so the readers of images and model files ask :func:`file_problem` first and
report the answer instead of a misleading "not found" or a hang.
"""

from __future__ import annotations

import os

__all__ = ["file_problem"]


def file_problem(path: str | os.PathLike) -> str | None:
    """None if `path` is a regular file (or a link to one), else what it is instead.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    problem : str or None
        ``"not found"``, ``"a broken symbolic link (to TARGET)"``,
        ``"a folder"`` or ``"not a regular file (a FIFO, socket or device)"``;
        None for a regular file.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    if not os.path.exists(path):
        return "not found"
    if os.path.isdir(path):
        return "a folder"
    return "not a regular file (a FIFO, socket or device)"
