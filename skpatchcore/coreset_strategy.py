"""How a coreset is selected on one machine: one greedy pass, or chunk coresets in threads.

One greedy pass over ``n_rows`` rows with ``n_picks`` picks costs about
``n_rows * n_picks`` distances (the lazy kernel of :mod:`skpatchcore._greedy`
computes about half of them on patch features), so at a fixed
``sampling_ratio`` it grows with the *square* of the training set: 95% of a
10% fit of the 762 MTD images went to it (docs/scaling.rst). Chunk coresets
of about :data:`CHUNK_ROWS` rows each cost ``n_rows * chunk_picks``
instead, which grows linearly with the rows, and the chunks run in parallel
threads (the compiled kernel releases the GIL); the radius merge then keeps
the bank among their union (:meth:`CoresetSampler.merge`).

The rule of ``strategy="auto"`` (:func:`resolve_strategy`) depends on the
work only, never on the cores: the same ``random_state`` gives the same bank
on every machine, and the cores only change how fast it comes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

#: ``strategy="auto"`` runs one greedy pass while rows x picks stays at or
#: below this (the 1% coreset of the 762 MTD images is 3.6e9); larger
#: selections use chunk coresets. At 1% chunk coresets lost accuracy on MTD
#: and at 10% they did not, so the exact pass is kept while it is cheap
#: (figures in docs/scaling.rst and docs/results.md, "Fit time").
SINGLE_PASS_WORK = 4e9
#: Rows of one chunk coreset (whole images; the images are spread evenly over
#: the chunks). A chunk's greedy order costs its rows times its picks, so
#: smaller chunks are cheaper in total; docs/scaling.rst has the accuracy
#: measured against the size.
CHUNK_ROWS = 16_384
#: A chunk coreset of :data:`CHUNK_ROWS` rows keeps at most this fraction of
#: its rows in its greedy order (a 10% coreset's: 1.5 x 15%). Chunks that keep
#: more (higher ratios) get proportionally fewer rows (:func:`chunk_rows`), so
#: that a chunk's greedy order costs no more than at 10%.
CHUNK_PICK_FRACTION = 0.225
STRATEGIES = ("auto", "single_pass", "chunks")


def resolve_strategy(strategy: str, n_rows: int, n_picks: int) -> str:
    """``"single_pass"`` or ``"chunks"`` for a greedy selection of `n_picks` of `n_rows` rows.

    Parameters
    ----------
    strategy : {"auto", "single_pass", "chunks"}
        ``"auto"``: one pass while ``n_rows * n_picks <= SINGLE_PASS_WORK``
        or the rows make at most one chunk, chunk coresets beyond.
    n_rows, n_picks : int

    Returns
    -------
    strategy : {"single_pass", "chunks"}
    """
    if strategy != "auto":
        return strategy
    if n_rows * n_picks <= SINGLE_PASS_WORK or n_rows <= CHUNK_ROWS:
        return "single_pass"
    return "chunks"


def chunk_rows(pick_fraction: float) -> int:
    """Rows of one chunk coreset whose greedy order keeps `pick_fraction` of its rows.

    :data:`CHUNK_ROWS`, or fewer where `pick_fraction` exceeds
    :data:`CHUNK_PICK_FRACTION`: about ``CHUNK_ROWS * CHUNK_PICK_FRACTION``
    picks per chunk at any ratio. A greedy order costs its rows times its
    picks, so at a 25% ratio chunks of 6,553 rows cost less than a third of
    chunks of 16,384 rows, and the merge still compares them all.

    Parameters
    ----------
    pick_fraction : float in (0, 1]

    Returns
    -------
    rows : int
    """
    if pick_fraction <= CHUNK_PICK_FRACTION * (1 + 1e-9):  # 1.5 * 0.15 rounds above 0.225
        return CHUNK_ROWS
    return max(1, int(CHUNK_ROWS * CHUNK_PICK_FRACTION / pick_fraction))


def chunk_bounds(n_images: int, rows_per_image: int, chunk_rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` image ranges of about `chunk_rows` rows each.

    As few chunks as hold at most `chunk_rows` rows (at least one image
    each), the images spread evenly over them (sizes differ by at most one).

    Parameters
    ----------
    n_images : int
        Images (or rows, with ``rows_per_image=1``) to split.
    rows_per_image : int
    chunk_rows : int or None, default=None
        None: :data:`CHUNK_ROWS`.

    Returns
    -------
    bounds : list of (int, int)
    """
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    per_chunk = max(1, chunk_rows // max(1, rows_per_image))
    n_chunks = max(1, -(-n_images // per_chunk))
    edges = [n_images * i // n_chunks for i in range(n_chunks + 1)]
    return [(start, stop) for start, stop in zip(edges[:-1], edges[1:]) if stop > start]


def n_threads(n_jobs: int | None) -> int:
    """Threads for chunk coresets: `n_jobs` (scikit-learn style), or torch's thread count when None.

    None follows the pipeline's ``n_jobs`` (it sets torch's threads during
    fit) and otherwise torch's default, the cores available to the process.
    """
    from ._threads import effective_n_jobs

    threads = effective_n_jobs(n_jobs)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return max(1, min(int(threads), os.cpu_count() or 1))


def map_in_threads(function: Callable, items: Iterable, threads: int) -> Iterator:
    """``map(function, items)`` on `threads` threads, results in order.

    Items are produced (e.g. projected) in the calling thread while earlier
    ones are being worked on; with one thread nothing is started.
    """
    if threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skpatchcore-coreset") as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


class SharedProgress:
    """A progress bar that several threads advance (``update`` under a lock)."""

    def __init__(self, bar):
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)
