"""Memory budgets: how many images one chunk of work may hold.

skpatchcore follows scikit-learn's ``working_memory`` convention (the
``sklearn.set_config`` / ``sklearn.config_context`` option, in MiB, that
``IsolationForest`` and ``pairwise_distances_chunked`` use): work on many
images is split into chunks whose growing arrays (patch features, patch
scores, anomaly maps) fit in the budget.
"""

from __future__ import annotations

import numbers
import shutil

import sklearn

MIB = 1 << 20


def resolve_working_memory(working_memory: float | None) -> float:
    """The budget in MiB: `working_memory`, or scikit-learn's global setting when None.

    Raises
    ------
    ValueError
        If the budget is not a positive number.
    """
    budget = sklearn.get_config()["working_memory"] if working_memory is None else working_memory
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0:
        raise ValueError(f"working_memory must be a positive number of MiB or None, got {budget!r}.")
    return float(budget)


def images_per_chunk(bytes_per_image: int, n_images: int, working_memory: float | None) -> int:
    """How many images fit in the budget at once (at most `n_images`).

    Parameters
    ----------
    bytes_per_image : int
        Memory one image's arrays take in the chunked work.
    n_images : int
        Images to process.
    working_memory : float or None
        Budget in MiB (None: ``sklearn.get_config()["working_memory"]``).

    Returns
    -------
    chunk : int
        Between 1 and `n_images`.

    Raises
    ------
    ValueError
        If the budget cannot hold even one image: the message names the
        size one image needs.
    """
    budget = resolve_working_memory(working_memory)
    fitting = int(budget * MIB // max(1, bytes_per_image))
    if fitting < 1:
        needed = bytes_per_image / MIB
        raise ValueError(
            f"working_memory={budget:g} MiB is smaller than one image's features "
            f"({needed:.1f} MiB); raise working_memory to at least {needed:.1f} MiB."
        )
    return max(1, min(fitting, n_images))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(needed: int, what: str) -> None:
    """Fail at once, naming the budget option, when `needed` bytes exceed the available memory.

    Parameters
    ----------
    needed : int
        Estimated bytes of the work about to start.
    what : str
        What needs them, for the message.

    Raises
    ------
    MemoryError
        If the machine reports less available memory than `needed`.
    """
    available = available_memory()
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} needs about {needed / 1e9:.1f} GB but {available / 1e9:.1f} GB of memory is "
            "available. Lower working_memory (MiB; --working-memory on the command line) so that "
            "the images are processed in chunks, or use a smaller sampling_ratio."
        )


def check_disk(needed: int, folder: str, what: str) -> None:
    """Fail at once when `folder` has less than `needed` bytes free, naming ``TMPDIR``.

    Parameters
    ----------
    needed : int
        Bytes the work will write there.
    folder : str
        The folder (the temporary folder of a chunked fit).
    what : str
        What needs them, for the message.

    Raises
    ------
    OSError
        If the folder's file system has less free space than `needed`.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise OSError(
            f"{what} keeps the chunk coresets' rows in the temporary folder {folder!r}: it needs about "
            f"{needed / 1e9:.1f} GB there but {free / 1e9:.1f} GB is free. Point TMPDIR to a larger disk "
            "or use a smaller sampling_ratio."
        )
