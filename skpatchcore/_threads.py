"""torch's intra-op threads and numba's, set in the scikit-learn ``n_jobs`` style.

On a machine whose cores are shared (several Dask workers, another busy
process), torch's OpenMP threads wait for each other at every layer; the
sum of all processes' threads must not exceed the cores.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator


def effective_n_jobs(n_jobs: int | None) -> int | None:
    """Threads for `n_jobs`: None leaves torch's setting, -1 all cores, -2 all but one...

    Raises
    ------
    ValueError
        If `n_jobs` is 0 or not an integer.
    """
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(f"n_jobs must be None or a non-zero integer, got {n_jobs!r}.")
    cores = os.cpu_count() or 1
    return int(n_jobs) if n_jobs > 0 else max(1, cores + 1 + int(n_jobs))


@contextlib.contextmanager
def torch_threads(n_jobs: int | None) -> Iterator[None]:
    """Run the block with torch using `n_jobs` threads (see :func:`effective_n_jobs`), then restore."""
    threads = effective_n_jobs(n_jobs)
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def numba_threads(n_jobs: int | None) -> Iterator[None]:
    """Run the block with numba's parallel loops on `n_jobs` threads, then restore.

    None follows torch's current setting (``torch.get_num_threads``: the
    ``n_jobs`` of an enclosing :func:`torch_threads`), so that the search of a
    pipeline uses the threads its features do. At most numba's own limit
    (``NUMBA_NUM_THREADS``, the cores by default).
    """
    import numba

    threads = effective_n_jobs(n_jobs)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
