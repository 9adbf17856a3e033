"""Kernels of the approximate greedy k-center coreset.

Every kernel runs the same algorithm as the official PatchCore code
(``ApproximateGreedyCoresetSampler``): each point's distance to the coreset
starts as its mean distance to a few random starting points; then, ``n_picks``
times, the point farthest from the coreset is picked and every distance is
lowered to the distance to that pick. Ties go to the lowest index
(``argmax``).

``greedy_numba`` gives exactly the picks of that loop with lazy evaluation.
A point's distance to the coreset only ever shrinks, so a stored value is an
upper bound of the current one. Points sit in a max-heap keyed by their
stored value; to find the farthest point, the top point is brought up to
date (its distance to the picks made since its last update) and sifted
down; when it stays on top, its exact value beats every other point's upper
bound, so it is the argmax. Most points are never touched again after the
start, so a pick costs a few hundred distance computations instead of a
pass over all N x 128 values.
"""

from __future__ import annotations

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _distance_to_vector(points, i, vector):
    total = 0.0
    for k in range(points.shape[1]):
        diff = np.float64(points[i, k]) - np.float64(vector[k])
        total += diff * diff
    return np.sqrt(total)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _mean_distance_to_starts(points, starts):
    out = np.empty(points.shape[0], dtype=np.float64)
    for i in range(points.shape[0]):
        total = 0.0
        for j in range(starts.shape[0]):
            total += _distance_to_vector(points, i, points[starts[j]])
        out[i] = total / starts.shape[0]
    return out


@numba.njit(cache=True, nogil=True)
def _above(value, a, b):
    """Heap order: larger value first, then lower index (``argmax`` ties)."""
    return value[a] > value[b] or (value[a] == value[b] and a < b)


@numba.njit(cache=True, nogil=True)
def _sift_down(heap, value, position):
    size = heap.shape[0]
    item = heap[position]
    while True:
        child = 2 * position + 1
        if child >= size:
            break
        if child + 1 < size and _above(value, heap[child + 1], heap[child]):
            child += 1
        if not _above(value, heap[child], item):
            break
        heap[position] = heap[child]
        position = child
    heap[position] = item


@numba.njit(cache=True, nogil=True)
def _start_heap(points, starts):  # pragma: no cover - compiled
    value = _mean_distance_to_starts(points, starts)
    up_to_date = np.zeros(points.shape[0], dtype=np.int64)  # picks already applied
    heap = np.arange(points.shape[0])
    for position in range(points.shape[0] // 2 - 1, -1, -1):
        _sift_down(heap, value, position)
    return value, up_to_date, heap


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _farthest(points, value, up_to_date, heap, pick_vectors, t):  # pragma: no cover - compiled
    """Update the top point until it stays on top; return it and the distances computed."""
    n_computed = 0
    while True:
        top = heap[0]
        current = value[top]
        for p in range(up_to_date[top], t):
            d = _distance_to_vector(points, top, pick_vectors[p])
            if d < current:
                current = d
        n_computed += t - up_to_date[top]
        value[top] = current
        up_to_date[top] = t
        _sift_down(heap, value, 0)
        if heap[0] == top:
            return top, n_computed


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pick(points, value, up_to_date, heap, picks, pick_vectors, radii, start, stop):  # pragma: no cover
    """Make picks ``start`` to ``stop - 1``; return the distances computed."""
    n_computed = 0
    for t in range(start, stop):
        top, n = _farthest(points, value, up_to_date, heap, pick_vectors, t)
        n_computed += n
        picks[t] = top
        radii[t] = value[top]
        pick_vectors[t] = points[top]
        value[top] = 0.0
        up_to_date[top] = t + 1
        _sift_down(heap, value, 0)
    return n_computed


def greedy_numba(points: np.ndarray, starts: np.ndarray, n_picks: int, progress=None, radii=None):
    """Lazy greedy picks; exactly the picks of :func:`greedy_reference`.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_dims), float32
    starts : ndarray of int64
        Starting points that initialise the distances (mean distance).
    n_picks : int
    progress : tqdm progress bar, optional
        Advanced as picks are made (in about 100 steps).
    radii : ndarray of shape (n_picks,), float64, optional
        Filled with each pick's distance to the coreset when it was picked
        (non-increasing).

    Returns
    -------
    picks : ndarray of shape (n_picks,), int64
    radius : float
        Largest distance of any point to the coreset after the last pick.
    n_computed : int
        Point-to-pick distances computed (the naive loop computes
        ``n_points * n_picks``).
    """
    value, up_to_date, heap = _start_heap(points, np.asarray(starts, dtype=np.int64))
    picks = np.empty(n_picks, dtype=np.int64)
    pick_vectors = np.empty((n_picks, points.shape[1]), dtype=points.dtype)
    if radii is None:
        radii = np.empty(n_picks, dtype=np.float64)
    n_computed = 0
    step = max(1, n_picks // 100)
    for start in range(0, n_picks, step):
        stop = min(start + step, n_picks)
        n_computed += _pick(points, value, up_to_date, heap, picks, pick_vectors, radii, start, stop)
        if progress is not None:
            progress.update(stop - start)
    top, n = _farthest(points, value, up_to_date, heap, pick_vectors, n_picks)
    return picks, float(value[top]), n_computed + n


def mean_distance_to_starts(points: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Initial distances: mean Euclidean distance to the starting points."""
    return _mean_distance_to_starts(points, np.asarray(starts, dtype=np.int64))


def greedy_reference(points: np.ndarray, starts: np.ndarray, n_picks: int) -> np.ndarray:
    """Naive O(N k) greedy picks in float64 numpy, for tests and benchmarks."""
    points64 = points.astype(np.float64)
    min_distance = np.mean(
        np.linalg.norm(points64[:, None, :] - points64[None, starts, :], axis=-1), axis=1
    )
    picks = np.empty(n_picks, dtype=np.int64)
    for t in range(n_picks):
        picks[t] = int(np.argmax(min_distance))
        distance = np.linalg.norm(points64 - points64[picks[t]], axis=1)
        np.minimum(min_distance, distance, out=min_distance)
    return picks


def greedy_torch(points, starts, n_picks: int, device, radii=None) -> tuple[np.ndarray, float]:
    """Greedy picks with torch (the CUDA path): one fused pass per pick.

    Distances use ``|x|^2 - 2 x.p + |p|^2`` in float32 on the device, so picks
    can differ from the CPU kernel where two distances tie within rounding.

    ``radii``, when given, is filled as by :func:`greedy_numba`.

    Returns
    -------
    picks : ndarray of int64
    radius : float
        Largest remaining distance to the coreset.
    """
    import torch

    with torch.inference_mode():
        data = torch.as_tensor(points, device=device)
        squared = (data * data).sum(dim=1)
        start_index = torch.as_tensor(np.asarray(starts), device=device)

        def distances_to(index):
            anchors = data[index].reshape(-1, data.shape[1])
            inner = data @ anchors.T
            return (squared[:, None] - 2.0 * inner + squared[index].reshape(1, -1)).clamp_min_(0).sqrt_()

        min_distance = distances_to(start_index).mean(dim=1)
        picks = torch.empty(n_picks, dtype=torch.long, device=device)
        pick_radii = torch.empty(n_picks, dtype=min_distance.dtype, device=device)
        for t in range(n_picks):
            best = torch.argmax(min_distance)
            picks[t] = best
            pick_radii[t] = min_distance[best]
            torch.minimum(min_distance, distances_to(best)[:, 0], out=min_distance)
        if radii is not None:
            radii[:] = pick_radii.cpu().numpy()
        return picks.cpu().numpy(), float(min_distance.max().item())
