"""Nearest-neighbour search over the memory bank.

Three searches, chosen by :class:`~skpatchcore.PatchCoreDetector`'s
``algorithm``:

* :func:`brute_force_kneighbors` (``"exact"``): every query-to-bank distance
  with float32 matrix products (``|q|^2 - 2 q.b + |b|^2``) in blocks of
  queries x bank rows, each reduced to a running top-k while in cache (one
  block per chunk of queries on a GPU); the chosen distances are then
  recomputed directly.
* :class:`BFloat16Shortlist` (``"bf16"``): matrix products in bfloat16
  (several times faster on CPUs with AVX512-BF16 or AMX) in a PCA subspace of the
  bank shortlist a few candidates per query, whose float32 distances are
  computed exactly.
* pynndescent (``"pynndescent"``): an approximate neighbour graph.

:class:`BankSearch` holds one bank and the structures these searches build
from it, so that one fitted detector can be searched from many threads.

Timings and recall of the three are in ``docs/results.md``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from ._threads import numba_threads

#: Held by every pynndescent index construction and query: they run numba's parallel
#: loops, whose fallback threading layer (workqueue, where neither TBB nor OpenMP is
#: found) must not be entered from two threads at once; a query also writes into
#: scratch arrays held by its index.
NUMBA_PARALLEL_LOCK = threading.Lock()

#: Largest number of distance entries (queries x bank rows) held at once.
CHUNK_ENTRIES = 1 << 24

#: On a CPU, exact search computes distances in blocks of this many queries
#: x this many bank rows (16 MB), keeping a running top-k, so that each block
#: is reduced while it is still in cache, faster than whole chunks of
#: ``CHUNK_ENTRIES`` (timings in docs/results.md, "Predict"). On a GPU,
#: chunks of ``CHUNK_ENTRIES`` run as one block each.
QUERY_BLOCK = 1024
BANK_BLOCK = 4096

#: Largest number of gathered bank entries (float32) held at once when
#: recomputing chosen distances: 2 MB, to stay in cache (the subtraction
#: runs several times slower on chunks that do not fit; docs/archive/benchmarks-notebook.md).
GATHER_ENTRIES = 1 << 19

#: The shortlist's principal axes come from at most about this many evenly
#: spaced bank rows, which builds it faster on large banks (docs/archive/benchmarks-notebook.md).
PCA_SAMPLE_ROWS = 4096


def _exact_distances(queries: torch.Tensor, bank: torch.Tensor, positions: torch.Tensor):
    """Direct distances to the chosen rows, sorted ascending (stable).

    The expanded formula loses precision for close pairs and its rounding
    depends on the batch; recomputing the chosen distances directly makes
    scores exact and independent of how queries are grouped.
    """
    distances = torch.empty(positions.shape, dtype=torch.float32, device=queries.device)
    step = max(1, GATHER_ENTRIES // (positions.shape[1] * bank.shape[1]))
    for start in range(0, len(queries), step):
        rows = slice(start, start + step)
        chosen = bank.index_select(0, positions[rows].reshape(-1)).view(*positions[rows].shape, -1)
        distances[rows] = torch.linalg.vector_norm(queries[rows, None, :] - chosen, dim=2)
    distances, order = torch.sort(distances, dim=1, stable=True)
    return distances, torch.gather(positions, 1, order)


def brute_force_kneighbors(
    queries: np.ndarray,
    bank: np.ndarray,
    n_neighbors: int,
    device: torch.device | str = "cpu",
    bank_squared: torch.Tensor | None = None,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by chunked matrix products.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_dims)
    bank : ndarray or Tensor of shape (n_bank, n_dims)
        A tensor already on ``device`` is used without a copy.
    n_neighbors : int
    device : torch device
    bank_squared : Tensor of shape (n_bank,), optional
        The bank rows' squared norms on ``device``, if already computed
        (repeated calls on one bank).
    groups : (ndarray of shape (n_queries,), ndarray of shape (n_bank,)), optional
        Group labels of the queries and of the bank rows: a query's
        neighbours are then searched among the rows of *other* groups only
        (leave-group-out). Where fewer than ``n_neighbors`` such rows exist,
        the missing neighbours have distance ``inf``.

    Returns
    -------
    distances : ndarray of shape (n_queries, n_neighbors), float32
        Euclidean distances, ascending.
    indices : ndarray of shape (n_queries, n_neighbors), int64
    """
    device = torch.device(device)
    with torch.inference_mode():
        if not isinstance(bank, torch.Tensor):
            bank = torch.from_numpy(np.asarray(bank, dtype=np.float32))
        bank_tensor = bank.to(device)
        if bank_squared is None:
            bank_squared = (bank_tensor * bank_tensor).sum(dim=1)
        if groups is not None:
            groups = (torch.as_tensor(np.asarray(groups[0]), device=device),
                      torch.as_tensor(np.asarray(groups[1]), device=device))
        n_queries, n_bank = queries.shape[0], bank_tensor.shape[0]
        distances = np.empty((n_queries, n_neighbors), dtype=np.float32)
        indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
        if device.type == "cuda":
            bank_block = max(n_bank, 1)
            step = max(1, CHUNK_ENTRIES // bank_block)
        else:
            bank_block, step = BANK_BLOCK, QUERY_BLOCK
        for start in range(0, n_queries, step):
            chunk = torch.as_tensor(np.asarray(queries[start : start + step], dtype=np.float32)).to(device)
            query_groups = None if groups is None else groups[0][start : start + step]
            positions = _nearest_positions(chunk, bank_tensor, bank_squared, n_neighbors, bank_block,
                                           query_groups, None if groups is None else groups[1])
            exact, nearest = _exact_distances(chunk, bank_tensor, positions)
            if groups is not None:  # own-group rows come back only where too few others exist
                own_pick = groups[1][nearest] == query_groups[:, None]
                exact, order = torch.sort(exact.masked_fill(own_pick, float("inf")), dim=1, stable=True)
                nearest = torch.gather(nearest, 1, order)
            distances[start : start + step] = exact.cpu().numpy()
            indices[start : start + step] = nearest.cpu().numpy()
    return distances, indices


def _nearest_positions(chunk: torch.Tensor, bank: torch.Tensor, bank_squared: torch.Tensor, n_neighbors: int,
                       bank_block: int, query_groups: torch.Tensor | None, bank_groups: torch.Tensor | None):
    """The `n_neighbors` bank rows of smallest expanded squared distance, block by block of the bank.

    Each block's ``|b|^2 - 2 q.b`` is reduced to its own top-k (a minimum
    for one neighbour) and merged into the running top-k. For one neighbour
    an earlier block wins ties, so ties go to the lowest row as in one
    ``argmin``; for several, ties are ordered as ``torch.topk`` orders them.
    """
    best_values = best_positions = None
    for first in range(0, bank.shape[0], bank_block):
        rows = slice(first, first + bank_block)
        squared = torch.addmm(bank_squared[None, rows], chunk, bank[rows].T, beta=1.0, alpha=-2.0)
        if query_groups is not None:
            squared.masked_fill_(query_groups[:, None] == bank_groups[None, rows], float("inf"))
        if n_neighbors == 1:  # a reduction, cheaper than a top-k
            values, positions = torch.min(squared, dim=1, keepdim=True)
        else:
            values, positions = torch.topk(squared, min(n_neighbors, squared.shape[1]), dim=1, largest=False,
                                           sorted=True)
        positions = positions + first
        if best_values is None:
            best_values, best_positions = values, positions
        elif n_neighbors == 1:
            better = values < best_values
            best_values = torch.where(better, values, best_values)
            best_positions = torch.where(better, positions, best_positions)
        else:
            values, positions = torch.cat([best_values, values], dim=1), torch.cat([best_positions, positions], dim=1)
            best_values, order = torch.topk(values, min(n_neighbors, values.shape[1]), dim=1, largest=False,
                                            sorted=True)
            best_positions = torch.gather(positions, 1, order)
    return best_positions


def _split_bfloat16(values: torch.Tensor) -> torch.Tensor:
    """``values`` as two bfloat16 columns whose sum keeps ~16 mantissa bits."""
    high = values.bfloat16()
    return torch.stack([high, (values - high.float()).bfloat16()], dim=1)


class BFloat16Shortlist:
    """Shortlist candidates with a bfloat16 product in a PCA subspace; exact distances among them.

    At construction the bank is centred and projected onto its leading
    principal axes (from at most ~4,096 evenly spaced rows): the fewest that
    explain ``explained_variance`` of its variance (at least 64, at most all).
    A query is projected the same way and its squared distance to every
    projected bank row is computed by one bfloat16 matrix product (float32
    accumulation) in which the squared norms ride along as extra columns,
    each split into two bfloat16 parts::

        [-2 b, |b|^2 hi, |b|^2 lo, 1, 1] . [q, 1, 1, |q|^2 hi, |q|^2 lo] = |q - b|^2

    so that the product returns the small squared distance itself, not a
    difference of large norms rounded to 8 bits. The ``n_candidates`` rows
    with the smallest values are kept and their exact float32 distances in
    the full space are computed directly.

    The selection avoids a top-k over every bank row: the bank rows are
    dealt into groups of ``GROUP_ROWS`` (row ``i`` into group
    ``i mod n_groups``), the minimum of each group is taken (a fast
    reduction), and the candidates are the smallest values within the
    ``n_candidates`` groups with the smallest minima, which always hold the
    ``n_candidates`` smallest values overall. Queries are processed in blocks
    of ``block_size``.

    The result is a true distance to some bank row, so it never
    under-estimates the nearest-neighbour distance. On real patch features
    it returns the exact nearest neighbour for almost every patch, several
    times faster than float32 brute force (recall and timings in
    ``docs/archive/benchmarks-notebook.md``).
    :meth:`exact_kneighbors` makes the answer exact for chosen queries.

    Parameters
    ----------
    bank : ndarray of shape (n_bank, n_dims), float32
    n_candidates : int, default=8
    explained_variance : float, default=0.95
    block_size : int, default=64
        Queries per matrix product.
    """

    #: Bank rows per group in the candidate selection.
    GROUP_ROWS = 16

    def __init__(self, bank: np.ndarray, n_candidates: int = 8, explained_variance: float = 0.95,
                 block_size: int = 64):
        self.bank = torch.from_numpy(np.asarray(bank, dtype=np.float32))
        self.n_candidates = n_candidates
        self.block_size = block_size
        with torch.inference_mode():
            self.mean = self.bank.mean(dim=0)
            centred = self.bank - self.mean
            sample = centred[:: max(1, len(centred) // PCA_SAMPLE_ROWS)]  # the axes only steer the shortlist
            variances, axes = torch.linalg.eigh(sample.T @ sample)
            variances, axes = variances.flip(0).clamp(min=0), axes.flip(1)
            explained = variances.cumsum(0) / variances.sum().clamp(min=1e-300)
            n_dims = self.bank.shape[1]
            target = torch.tensor([explained_variance], dtype=explained.dtype)
            n_components = int(torch.searchsorted(explained, target)) + 1
            self.n_components = min(n_dims, max(64, n_components))
            self.axes = axes[:, : self.n_components].float().contiguous()
            self._bank_projected = centred @ self.axes
            self._bank_projected_squared = (self._bank_projected**2).sum(dim=1)
            low = self._bank_projected.bfloat16()
            squared = _split_bfloat16((low.float() ** 2).sum(dim=1))
            operand = torch.cat([-2 * low, squared, torch.ones(len(low), 2, dtype=torch.bfloat16)], dim=1)
            # Pad to whole groups with rows whose product is +inf: never selected.
            self.n_groups = -(-len(low) // self.GROUP_ROWS)
            padding = torch.zeros(self.n_groups * self.GROUP_ROWS - len(low), operand.shape[1], dtype=torch.bfloat16)
            padding[:, self.n_components] = float("inf")
            self.operand = torch.cat([operand, padding]).contiguous()

    def _query_operand(self, queries: torch.Tensor) -> torch.Tensor:
        """``[q, 1, 1, |q|^2 hi, |q|^2 lo]`` in bfloat16, ``q`` the queries on the principal axes."""
        low = ((queries - self.mean) @ self.axes).bfloat16()
        squared = _split_bfloat16((low.float() ** 2).sum(dim=1))
        return torch.cat([low, torch.ones(len(low), 2, dtype=torch.bfloat16), squared], dim=1)

    def _candidates(self, queries: torch.Tensor, n_candidates: int) -> torch.Tensor:
        """Bank rows with the smallest bfloat16 squared distances, shape (n_queries, n_candidates)."""
        query_operand = self._query_operand(queries)
        group_rows = self.GROUP_ROWS if self.n_groups >= n_candidates else 1
        n_groups = len(self.operand) // group_rows
        shortlist = []
        for start in range(0, len(queries), self.block_size):
            block = query_operand[start : start + self.block_size]
            n_block = len(block)
            scores = (self.operand @ block.T).float()  # (n_bank padded, n_block)
            minima = scores.view(group_rows, n_groups, n_block).amin(dim=0).T
            groups = torch.topk(minima, n_candidates, dim=1, largest=False, sorted=False).indices
            rows = (groups[:, :, None] + n_groups * torch.arange(group_rows)).view(n_block, -1)
            values = scores.view(-1).take(rows * n_block + torch.arange(n_block)[:, None])
            best = torch.topk(values, n_candidates, dim=1, largest=False, sorted=False).indices
            shortlist.append(rows.gather(1, best))
        return torch.cat(shortlist)

    def kneighbors(self, queries: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours among the shortlist (distances ascending, float32)."""
        n_candidates = min(self.bank.shape[0], max(self.n_candidates, n_neighbors))
        with torch.inference_mode():
            queries = torch.as_tensor(np.asarray(queries, dtype=np.float32))
            distances, indices = _exact_distances(queries, self.bank, self._candidates(queries, n_candidates))
            return distances[:, :n_neighbors].numpy(), indices[:, :n_neighbors].numpy()

    def exact_kneighbors(self, queries: np.ndarray, n_neighbors: int,
                         upper: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest neighbours, pruned with the PCA lower bound (for a few queries).

        A bank row's distance in the principal subspace is a lower bound of
        its full distance. Only rows whose bound is at most ``upper`` can be
        among a query's ``n_neighbors`` nearest, and only their distances are
        computed. The bounds come from one float32 product per query
        (``|p|^2 - 2 p.b + |b|^2``), loosened by ``2**-10 (|p|^2 + |b|^2)``,
        far more than that product's rounding error. For the highest-scoring
        patch of an image only a handful of bank rows remain
        (``docs/archive/benchmarks-notebook.md``).

        Parameters
        ----------
        queries : ndarray of shape (n_queries, n_dims)
        n_neighbors : int
        upper : ndarray of shape (n_queries,), optional
            Distances that are at least each query's ``n_neighbors``-th
            nearest distance, such as the largest ones :meth:`kneighbors`
            returned; found with the shortlist if omitted.

        Returns
        -------
        The same as :func:`brute_force_kneighbors`.
        """
        if upper is None:
            upper = self.kneighbors(queries, n_neighbors)[0][:, -1]
        distances = np.empty((len(queries), n_neighbors), dtype=np.float32)
        indices = np.empty((len(queries), n_neighbors), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(queries), self.block_size):
                block = slice(start, start + self.block_size)
                distances[block], indices[block] = self._pruned_exact(
                    torch.as_tensor(np.asarray(queries[block], dtype=np.float32)),
                    torch.as_tensor(np.asarray(upper[block], dtype=np.float32)), n_neighbors)
        return distances, indices

    def _pruned_exact(self, queries: torch.Tensor, upper: torch.Tensor, n_neighbors: int):
        """:meth:`exact_kneighbors` for one block of queries, as numpy arrays."""
        projected = (queries - self.mean) @ self.axes
        projected_squared = (projected * projected).sum(dim=1)
        slack = 2.0**-10
        # |p|^2 - 2 p.b + |b|^2 - slack (|p|^2 + |b|^2) <= upper^2, rearranged:
        lower = torch.addmm(self._bank_projected_squared[None, :], projected, self._bank_projected.T,
                            beta=1 - slack, alpha=-2.0)
        limit = upper.square() - (1 - slack) * projected_squared
        query_rows, bank_rows = torch.nonzero(lower <= limit[:, None], as_tuple=True)
        distances = torch.linalg.vector_norm(queries[query_rows] - self.bank[bank_rows], dim=1)
        # One row per query, padded with +inf, then sorted as brute force does.
        counts = torch.bincount(query_rows, minlength=len(queries))
        column = torch.arange(len(query_rows)) - (torch.cumsum(counts, 0) - counts)[query_rows]
        padded = torch.full((len(queries), int(counts.max())), float("inf"))
        positions = torch.zeros(padded.shape, dtype=torch.int64)
        padded[query_rows, column] = distances
        positions[query_rows, column] = bank_rows
        padded, order = torch.sort(padded, dim=1, stable=True)
        return padded[:, :n_neighbors].numpy(), positions.gather(1, order)[:, :n_neighbors].numpy()


class BankSearch:
    """A memory bank and the search structures built from it, shared safely by threads.

    Each structure (the bank as a tensor on a device, a
    :class:`BFloat16Shortlist`, a pynndescent index, the bank rows' own
    neighbours) is built once, on first use, by the first call that needs
    it, under a lock: a call in another thread that needs the same
    structure waits for it instead of building a second one, and never sees
    a half-built one. Built structures are not changed afterwards, so
    searches with them run concurrently; the exception is pynndescent's
    query, which writes into scratch arrays held by its index and runs
    numba's parallel loops, so pynndescent's queries and index constructions
    run one at a time in a process (:data:`NUMBA_PARALLEL_LOCK`).

    A new bank gets a new ``BankSearch``: a detector that refits or grows
    its bank replaces the object, and calls that took the old one finish
    with the old bank.

    Parameters
    ----------
    bank : ndarray of shape (n_bank, n_dims), float32
        Not copied; must not be modified afterwards.
    """

    def __init__(self, bank: np.ndarray):
        self.bank = bank
        self._built: dict = {}
        self._lock = threading.RLock()  # re-entrant: a structure may be built from another one

    def structure(self, key, build: Callable[[], object]):
        """The structure stored under `key`, built with ``build()`` by the first caller."""
        try:
            return self._built[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._built:
                self._built[key] = build()
            return self._built[key]

    def exact_kneighbors(self, queries: np.ndarray, n_neighbors: int, device: torch.device,
                         groups: tuple[np.ndarray, np.ndarray] | None = None):
        """:func:`brute_force_kneighbors` against the bank held on `device` with its squared row norms."""
        def build():
            tensor = torch.from_numpy(self.bank).to(device)  # no copy on the CPU
            return tensor, (tensor * tensor).sum(dim=1)

        tensor, squared = self.structure(("exact", str(device)), build)
        return brute_force_kneighbors(queries, tensor, n_neighbors, tensor.device, bank_squared=squared,
                                      groups=groups)

    def distances_to_rows(self, queries: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query's exact distances to its own given bank rows, ascending.

        Parameters
        ----------
        queries : ndarray of shape (n_queries, n_dims)
        positions : ndarray of shape (n_queries, n_rows)
            Bank row indices, ``n_rows`` per query.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_rows), float32
        positions : ndarray of shape (n_queries, n_rows), int64
            ``positions`` reordered as ``distances``.
        """
        with torch.inference_mode():
            distances, positions = _exact_distances(torch.as_tensor(np.asarray(queries, dtype=np.float32)),
                                                    torch.from_numpy(self.bank),
                                                    torch.as_tensor(np.asarray(positions, dtype=np.int64)))
        return distances.numpy(), positions.numpy()

    def shortlist(self) -> BFloat16Shortlist:
        """The bank's :class:`BFloat16Shortlist`."""
        return self.structure("bf16", lambda: BFloat16Shortlist(self.bank))

    def nndescent_kneighbors(self, queries: np.ndarray, n_neighbors: int, random_state=None,
                             n_jobs: int | None = None, n_candidates: int | None = None):
        """:func:`nndescent_kneighbors` with the bank's index (built with `random_state`, `n_jobs` on first use)."""
        index = self.structure("pynndescent", lambda: build_nndescent(self.bank, random_state, n_jobs))
        with NUMBA_PARALLEL_LOCK, numba_threads(n_jobs):
            return nndescent_kneighbors(index, queries, n_neighbors, n_candidates=n_candidates)


_SPEEDUP_LOCK = threading.Lock()


def bfloat16_speedup() -> float:
    """How many times faster this CPU multiplies bfloat16 than float32 matrices.

    Measured once per process (the first caller measures, others wait for
    that figure) on a short 1-GFLOP product: CPUs with AVX512-BF16 or AMX
    give several times, others often less than one (``docs/archive/benchmarks-notebook.md``).
    """
    with _SPEEDUP_LOCK:
        return _measure_bfloat16_speedup()


@functools.lru_cache(maxsize=1)
def _measure_bfloat16_speedup() -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    timings = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y
            start = time.perf_counter()
            for _ in range(3):
                x @ y
            timings[dtype] = time.perf_counter() - start
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


def build_nndescent(bank: np.ndarray, random_state=None, n_jobs: int | None = None):
    """Build and prepare a pynndescent index over the bank.

    It is built on `n_jobs` of numba's threads
    (:func:`~skpatchcore._threads.numba_threads`: None follows torch's
    setting). Its batched queries run in parallel over the threads that
    :meth:`BankSearch.nndescent_kneighbors` sets, each query as a serial one
    would run it: the same neighbours and distances.
    """
    from pynndescent import NNDescent

    with NUMBA_PARALLEL_LOCK, numba_threads(n_jobs):
        index = NNDescent(
            np.asarray(bank, dtype=np.float32),
            metric="euclidean",
            n_neighbors=30,
            random_state=random_state,
            compressed=False,
            parallel_batch_queries=True,
        )
        index.prepare()
    return index


#: pynndescent is queried for at least this many neighbours: its search
#: finds the true nearest neighbour far more often when it tracks several
#: candidates (recall 0.80 -> 0.98 on a test manifold for k=1, at ~no cost).
MIN_NNDESCENT_CANDIDATES = 8


def nndescent_kneighbors(index, queries: np.ndarray, n_neighbors: int, epsilon: float = 0.1,
                         n_candidates: int | None = None):
    """Query a pynndescent index; distances are Euclidean, float32, ascending.

    The search tracks ``max(n_neighbors, n_candidates)`` candidates
    (None: :data:`MIN_NNDESCENT_CANDIDATES`); more find the true nearest
    neighbours more often, and take longer.
    """
    k = max(n_neighbors, MIN_NNDESCENT_CANDIDATES if n_candidates is None else n_candidates)
    indices, distances = index.query(np.asarray(queries, dtype=np.float32), k=k, epsilon=epsilon)
    return distances[:, :n_neighbors].astype(np.float32), indices[:, :n_neighbors].astype(np.int64)
