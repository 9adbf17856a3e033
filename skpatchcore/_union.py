"""The union of chunk coresets: held on disk while chunks arrive, reduced by effective radius.

A chunked fit (:meth:`skpatchcore.PatchCorePipeline.fit` beyond its
``working_memory``, ``partial_fit``, Dask) collects the greedy coresets of
many chunks before the merge chooses the memory bank among them. Their full
feature rows grow with the number of images, so :class:`SpilledUnion` keeps
them in memory-mapped files of a temporary folder; the merge only reads the
rows' low-dimensional projections, and gathers the full rows it keeps.

:func:`largest_effective_radii` is the merge of ``merge="radius"``: a row's
effective radius is the smaller of its radius in its chunk's greedy order and
its distance to the nearest union row of larger radius (from any chunk). One
greedy pass over all rows would have picked that nearer row first, so a row
repeated by several chunks keeps only its first copy's radius.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

#: Rows per block of the effective-radius pass: queries x earlier rows at a time, a
#: 2 MiB block of distances that stays in cache (docs/archive/benchmarks-notebook.md).
QUERY_BLOCK = 1024
EARLIER_BLOCK = 512
#: Largest union (rows) whose effective radii are computed against one another:
#: a larger union is split into consecutive groups of parts of at most about this
#: many rows, so that the merge's cost grows linearly with the union
#: (:func:`largest_effective_radii_by_group`).
MERGE_GROUP_ROWS = 1 << 17


class SpilledUnion:
    """Chunk coresets allocated as they arrive, their full rows in temporary files.

    Parameters
    ----------
    sampler : CoresetSampler
        Allocates the union's share (:meth:`CoresetSampler.allocate`).
    n_rows_total : int
        Rows of every chunk of the fit, including those still to come.
    held : iterable of ChunkCoreset, default=()
        Parts already there (the current bank in ``partial_fit``).
    folder : str or None, default=None
        Parent of the temporary folder (None: :func:`tempfile.gettempdir`,
        i.e. ``TMPDIR``).

    Notes
    -----
    Use it as a context manager: the folder is removed on exit, whether the
    fit finished or failed. Rows are read back through ``numpy.memmap``, so
    only the pages of the rows the merge keeps are ever loaded.
    """

    def __init__(self, sampler, n_rows_total: int, held: Iterable = (), folder: str | None = None):
        self.sampler = sampler
        self.n_rows_total = int(n_rows_total)
        self._folder = tempfile.TemporaryDirectory(prefix="skpatchcore-union-", dir=folder,
                                                   ignore_cleanup_errors=True)
        self._n_files = 0
        self.parts = [self._spill(part) for part in held]

    def add(self, part) -> None:
        """Spill `part`'s rows to disk and cut the union back to its share."""
        self.parts = self.sampler.allocate([*self.parts, self._spill(part)], self.n_rows_total)

    def _spill(self, part):
        if isinstance(part.rows, np.memmap):
            return part
        if part.projected is None and self.sampler.method == "greedy":  # an existing bank: project it once now
            part = part._replace(projected=self.sampler._projected(part))
        path = Path(self._folder.name) / f"part{self._n_files:06d}.npy"
        self._n_files += 1
        np.save(path, np.ascontiguousarray(part.rows, dtype=np.float32))
        return part._replace(rows=np.load(path, mmap_mode="r"))

    def close(self) -> None:
        """Drop the parts and remove the temporary folder."""
        self.parts = []
        self._folder.cleanup()

    def __enter__(self) -> SpilledUnion:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def gather_rows(parts, picks: np.ndarray) -> np.ndarray:
    """Rows ``picks`` of the concatenated `parts` (in that order), reading each part once.

    Parameters
    ----------
    parts : sequence of ChunkCoreset
        Rows in memory or memory-mapped.
    picks : ndarray of int
        Indices into the concatenation of the parts' rows.

    Returns
    -------
    rows : ndarray of shape (len(picks), n_features), float32
        An in-memory array.
    """
    sizes = np.array([len(part.rows) for part in parts])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n_features = parts[0].rows.shape[1]
    result = np.empty((len(picks), n_features), dtype=np.float32)
    owner = np.searchsorted(starts, picks, side="right") - 1
    for index in np.unique(owner):
        where = np.flatnonzero(owner == index)
        local = picks[where] - starts[index]
        order = np.argsort(local, kind="stable")  # ascending reads through the memory map
        rows = parts[index].rows
        result[where[order]] = rows[local[order]]
        _release_pages(rows)
    return result


def _release_pages(rows: np.ndarray) -> None:
    """Drop a memory map's pages from this process (they stay in the page cache, out of its RSS)."""
    import mmap

    mapping = getattr(rows, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def largest_effective_radii(projected: Sequence[np.ndarray], radii: np.ndarray,
                            n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n_keep` union rows of largest effective radius, and those radii.

    Rows are visited by decreasing radius; a row's effective radius is the
    smaller of its own radius and its distance to the nearest row visited
    before it. Rows with an infinite radius (an existing bank without radii)
    are always kept. Once the rows left have radii below the `n_keep`-th
    largest effective radius found, none of them can be kept, and the pass
    stops: its cost is about (rows visited)^2 / 2 distances.

    Parameters
    ----------
    projected : sequence of ndarray of shape (n_part_rows, n_dims)
        The union's rows, part by part (their concatenation is the union),
        in the space the greedy orders were made in. They are copied once,
        in visiting order.
    radii : ndarray of shape (n_rows,)
        Every row's radius in its chunk's greedy order (``inf``: keep).
    n_keep : int
        Rows to keep (at most ``n_rows``).

    Returns
    -------
    picks : ndarray of shape (n_keep,), int64
        Indices into the union, by decreasing effective radius (ties: lower
        radius rank first).
    effective : ndarray of shape (n_keep,), float64
        Their effective radii (non-increasing).
    """
    import torch

    radii = np.asarray(radii, dtype=np.float64)
    n_rows = radii.shape[0]
    n_keep = min(int(n_keep), n_rows)
    order = np.argsort(-radii, kind="stable")
    sorted_radii = radii[order]
    effective = np.full(n_rows, -np.inf)
    n_fixed = int(np.count_nonzero(np.isinf(sorted_radii) & (sorted_radii > 0)))
    effective[:n_fixed] = np.inf
    with torch.inference_mode():
        points = torch.from_numpy(_in_order(projected, order))
        squared = (points * points).sum(dim=1)
        for start in range(n_fixed, n_rows, QUERY_BLOCK):
            if start >= n_keep:
                threshold = np.partition(effective[:start], start - n_keep)[start - n_keep]
                if sorted_radii[start] < threshold:
                    break
            stop = min(n_rows, start + QUERY_BLOCK)
            nearest = _nearest_earlier(points, squared, start, stop)
            effective[start:stop] = np.minimum(sorted_radii[start:stop], nearest)
    ranked = np.argsort(-effective, kind="stable")[:n_keep]
    return order[ranked], effective[ranked]


def largest_effective_radii_by_group(projected: Sequence[np.ndarray], radii: np.ndarray, n_keep: int,
                                     group_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`largest_effective_radii` with rows compared within groups of consecutive parts.

    A union of at most `group_rows` rows is one group: exactly
    :func:`largest_effective_radii`. A larger one is cut into consecutive
    groups of whole parts of at most about `group_rows` rows; a row's
    effective radius discounts the rows of larger radius of its own group
    only (an upper bound of its effective radius over the whole union),
    and the `n_keep` rows of largest effective radius over all groups are
    kept (one threshold for all groups). The cost is about
    ``union x group_rows / 2`` distances instead of ``union^2 / 2``, so it
    grows linearly with the union; patterns repeated by chunks of different
    groups are kept once per group.

    Parameters
    ----------
    projected : sequence of ndarray of shape (n_part_rows, n_dims)
    radii : ndarray of shape (n_rows,)
    n_keep : int
    group_rows : int or None, default=None
        None: :data:`MERGE_GROUP_ROWS`.

    Returns
    -------
    picks, effective
        As :func:`largest_effective_radii`.
    """
    group_rows = MERGE_GROUP_ROWS if group_rows is None else int(group_rows)
    sizes = [len(block) for block in projected]
    groups, current = [], []
    for index, size in enumerate(sizes):
        if current and sum(sizes[i] for i in current) + size > group_rows:
            groups.append(current)
            current = []
        current.append(index)
    groups.append(current)
    if len(groups) == 1:
        return largest_effective_radii(projected, radii, n_keep)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    radii = np.asarray(radii, dtype=np.float64)
    picks, effective = [], []
    for group in groups:
        first, last = starts[group[0]], starts[group[-1] + 1]
        # Every row of the group kept over all groups is among the group's own n_keep largest.
        group_picks, group_effective = largest_effective_radii(
            [projected[i] for i in group], radii[first:last], min(n_keep, last - first))
        picks.append(group_picks + first)
        effective.append(group_effective)
    picks, effective = np.concatenate(picks), np.concatenate(effective)
    ranked = np.argsort(-effective, kind="stable")[:min(int(n_keep), len(radii))]
    return picks[ranked], effective[ranked]


def _in_order(blocks: Sequence[np.ndarray], order: np.ndarray) -> np.ndarray:
    """``np.concatenate(blocks)[order]`` in float32, without the concatenated copy."""
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    result = np.empty((len(order), blocks[0].shape[1]), dtype=np.float32)
    start = 0
    for block in blocks:
        result[rank[start:start + len(block)]] = block
        start += len(block)
    return result


def _nearest_earlier(points, squared, start: int, stop: int) -> np.ndarray:
    """Distance of each row in ``[start, stop)`` to the nearest row before it."""
    import torch

    queries = points[start:stop]
    best = torch.full((stop - start,), float("inf"))
    row = torch.arange(start, stop)[:, None]
    for first in range(0, stop, EARLIER_BLOCK):
        last = min(stop, first + EARLIER_BLOCK)
        # |p|^2 - 2 q.p per pair; |q|^2 is added after the minimum (it does not change the argmin).
        partial = torch.addmm(squared[first:last][None, :], queries, points[first:last].T, alpha=-2.0)
        if last > start:  # the block's own rows: only those before each row count
            partial.masked_fill_(torch.arange(first, last)[None, :] >= row, float("inf"))
        torch.minimum(best, partial.amin(dim=1), out=best)
    return (best + squared[start:stop]).clamp_min_(0).sqrt_().double().numpy()
