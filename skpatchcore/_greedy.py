"""Kernels of the approximate greedy k-center coreset.

Every kernel runs the same algorithm as the official PatchCore code
(``ApproximateGreedyCoresetSampler``): each point's distance to the coreset
starts as its mean distance to a few random starting points; then, ``n_picks``
times, the point farthest from the coreset is picked and every distance is
lowered to the distance to that pick. Ties go to the lowest index
(``argmax``).

``greedy_numba`` gives the same picks as the naive loop but skips work with
the triangle inequality: a point already assigned to coreset member ``c``
lies within ``r_c`` (the largest distance in ``c``'s cluster) of ``c``; when
``d(c, pick) >= 2 r_c`` no point of that cluster can get closer to the new
pick than it already is to ``c``, so the cluster is not visited at all. Only
the clusters near the new pick and the points not yet assigned to any pick
are read, which is far less memory traffic than a full pass over N x 128
floats per pick.
"""

from __future__ import annotations

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract", "nsz"}
#: Relative safety margin of the triangle-inequality test against rounding.
_PRUNE_MARGIN = 1.0 + 1e-7


@numba.njit(cache=True, fastmath=_FASTMATH)
def _distance(points, i, j):
    total = 0.0
    for k in range(points.shape[1]):
        diff = np.float64(points[i, k]) - np.float64(points[j, k])
        total += diff * diff
    return np.sqrt(total)


@numba.njit(cache=True, fastmath=_FASTMATH)
def _mean_distance_to_starts(points, starts):
    n_points = points.shape[0]
    out = np.empty(n_points, dtype=np.float64)
    for i in range(n_points):
        total = 0.0
        for s in starts:
            total += _distance(points, i, s)
        out[i] = total / starts.shape[0]
    return out


@numba.njit(cache=True, fastmath=_FASTMATH)
def greedy_numba(points, starts, n_picks):  # pragma: no cover - compiled
    """Pruned greedy picks; same picks as :func:`greedy_reference`.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_dims), float32
    starts : ndarray of int64
        Starting points that initialise the distances (mean distance).
    n_picks : int

    Returns
    -------
    picks : ndarray of shape (n_picks,), int64
    min_distance : ndarray of shape (n_points,), float64
        Final distance of every point to the coreset.
    n_visited : int
        Number of point-to-pick distances computed (for benchmarks).
    """
    n_points = points.shape[0]
    min_distance = _mean_distance_to_starts(points, starts)
    assigned = np.full(n_points, -1, dtype=np.int64)
    picks = np.empty(n_picks, dtype=np.int64)
    radius = np.zeros(n_picks, dtype=np.float64)
    farthest = np.zeros(n_picks, dtype=np.int64)
    candidate = np.zeros(n_picks, dtype=np.bool_)
    # Farthest point among those not assigned to any pick yet.
    free_radius = -1.0
    free_farthest = 0
    for i in range(n_points):
        if min_distance[i] > free_radius:
            free_radius = min_distance[i]
            free_farthest = i
    n_visited = 0
    for t in range(n_picks):
        best_radius = free_radius
        best = free_farthest
        for c in range(t):
            if radius[c] > best_radius or (radius[c] == best_radius and farthest[c] < best):
                best_radius = radius[c]
                best = farthest[c]
        picks[t] = best
        for c in range(t):
            candidate[c] = _distance(points, best, picks[c]) < 2.0 * radius[c] * _PRUNE_MARGIN
            if candidate[c]:
                radius[c] = -1.0
        radius[t] = -1.0
        free_radius = -1.0
        for i in range(n_points):
            owner = assigned[i]
            if owner >= 0 and not candidate[owner]:
                continue
            n_visited += 1
            d = _distance(points, i, best)
            if d < min_distance[i]:
                min_distance[i] = d
                owner = t
                assigned[i] = t
            if owner < 0:
                if min_distance[i] > free_radius:
                    free_radius = min_distance[i]
                    free_farthest = i
            elif min_distance[i] > radius[owner]:
                radius[owner] = min_distance[i]
                farthest[owner] = i
        if free_radius < 0.0:
            free_farthest = n_points
    return picks, min_distance, n_visited


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


def greedy_torch(points, starts, n_picks: int, device) -> tuple[np.ndarray, float]:
    """Greedy picks with torch (the CUDA path): one fused pass per pick.

    Distances use ``|x|^2 - 2 x.p + |p|^2`` in float32 on the device, so picks
    can differ from the CPU kernel where two distances tie within rounding.

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
        for t in range(n_picks):
            best = torch.argmax(min_distance)
            picks[t] = best
            torch.minimum(min_distance, distances_to(best)[:, 0], out=min_distance)
        return picks.cpu().numpy(), float(min_distance.max().item())
