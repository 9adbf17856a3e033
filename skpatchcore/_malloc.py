"""Keep the backbone's freed activations in the process, for the next batch (glibc only).

A forward pass on the CPU allocates and frees the same large activations on
every batch. glibc's ``malloc`` gives each allocation above its mmap threshold
a mapping of its own and unmaps it on ``free``, and trims the heap's free top
above its trim threshold, so the next batch touches fresh pages and the kernel
faults and zeroes every one of them again (measured in ``docs/large_images.rst``,
"What the backbone costs on a CPU").

:func:`reuse_freed_memory` wraps each forward pass. The first time, it fixes
glibc's two thresholds (mmap threshold at its 32 MiB ceiling, which glibc's
own dynamic rule reaches after the first large ``free``; trim threshold at
``TRIM_THRESHOLD_BYTES``); during each forward pass it also serves
allocations above the mmap threshold from the heap. The process then keeps up
to ``TRIM_THRESHOLD_BYTES`` of freed memory at the heap's top for reuse, as
jemalloc and tcmalloc do by design (PyTorch's CPU tuning guide suggests
preloading them for this reason).

It does nothing off glibc, when ``SKPATCHCORE_REUSE_FREED_MEMORY=0`` is set,
or when the process already chose its allocator's settings: ``LD_PRELOAD``
naming an allocator, ``MALLOC_*`` variables or ``glibc.malloc`` tunables.
Dask workers are such processes (Dask sets ``MALLOC_TRIM_THRESHOLD_``);
:func:`unfreeze_mmap_threshold` gives them back glibc's mmap ceiling.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
#: glibc's ceiling for the mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Freed memory the heap keeps at its top before returning it to the system.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
#: glibc's default limit on the number of mappings malloc makes (DEFAULT_MMAP_MAX).
DEFAULT_MMAP_MAX = 65536
ENVIRONMENT_SWITCH = "SKPATCHCORE_REUSE_FREED_MEMORY"
_USER_ALLOCATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                             "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "MALLOC_CONF")

_lock = threading.Lock()
_active = 0


def _user_chose_allocator(environ) -> bool:
    """Whether the process's environment already sets or replaces glibc's malloc."""
    if environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return True
    if any(name in environ for name in _USER_ALLOCATOR_VARIABLES):
        return True
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in environ.get("LD_PRELOAD", "")


def _load_mallopt(load_libc=lambda: ctypes.CDLL(None)):
    """The C library's ``mallopt(parameter, value)``, or None where it has none (not glibc)."""
    try:
        return load_libc().mallopt
    except (OSError, AttributeError):
        return None


@functools.cache
def _mallopt():
    """glibc's ``mallopt`` with the thresholds fixed, or None where this module leaves malloc alone."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _user_chose_allocator(os.environ):
        return None
    mallopt = _load_mallopt()
    if mallopt is None or not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                               and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return None
    return mallopt


def unfreeze_mmap_threshold(environ=os.environ, load_libc=lambda: ctypes.CDLL(None)) -> bool:
    """Let glibc keep large freed blocks on a Dask worker; return whether it was changed.

    Dask starts worker processes with ``MALLOC_TRIM_THRESHOLD_`` set, so that
    they give freed memory back to the system. Setting that option also
    freezes glibc's mmap threshold at 128 KiB: every activation buffer of a
    forward pass is then a fresh ``mmap`` whose pages fault in one by one,
    and CPU inference runs much slower (docs/archive/benchmarks-notebook.md). Raising
    the mmap threshold back to where glibc would move it by itself restores
    the speed and keeps Dask's trimming. Nothing changes where the variable
    is not set, where ``MALLOC_MMAP_THRESHOLD_`` is set, or without glibc.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in environ or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    mallopt = _load_mallopt(load_libc)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Run the block with large allocations served from (and freed back to) the heap.

    Nested and concurrent blocks are counted: the mappings come back when the
    last block ends.
    """
    global _active
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    with _lock:
        if _active == 0:
            mallopt(M_MMAP_MAX, 0)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
