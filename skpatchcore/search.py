"""Nearest-neighbour search over the memory bank: exact or pynndescent.

Exact search computes Euclidean distances with chunked matrix products
(``|q|^2 - 2 q.b + |b|^2``), so no (queries x bank) matrix larger than one
chunk is ever held. Approximate search uses a pynndescent index, built lazily
on the first query that needs it.
"""

from __future__ import annotations

import numpy as np
import torch

#: Largest number of distance entries (queries x bank rows) held at once.
CHUNK_ENTRIES = 1 << 24


def exact_kneighbors(
    queries: np.ndarray,
    bank: np.ndarray,
    n_neighbors: int,
    device: torch.device | str = "cpu",
    bank_squared: torch.Tensor | None = None,
    bank_tensor: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by chunked matrix products.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_dims)
    bank : ndarray of shape (n_bank, n_dims)
    n_neighbors : int
    device : torch device
    bank_squared, bank_tensor : Tensor, optional
        Cached squared norms / device copy of the bank.

    Returns
    -------
    distances : ndarray of shape (n_queries, n_neighbors), float32
        Euclidean distances, ascending.
    indices : ndarray of shape (n_queries, n_neighbors), int64
    """
    device = torch.device(device)
    with torch.inference_mode():
        if bank_tensor is None:
            bank_tensor = torch.as_tensor(np.asarray(bank, dtype=np.float32)).to(device)
        if bank_squared is None:
            bank_squared = (bank_tensor * bank_tensor).sum(dim=1)
        n_queries, n_bank = queries.shape[0], bank_tensor.shape[0]
        distances = np.empty((n_queries, n_neighbors), dtype=np.float32)
        indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
        step = max(1, CHUNK_ENTRIES // max(n_bank, 1))
        for start in range(0, n_queries, step):
            chunk = torch.as_tensor(np.asarray(queries[start : start + step], dtype=np.float32)).to(device)
            squared = torch.addmm(bank_squared[None, :], chunk, bank_tensor.T, beta=1.0, alpha=-2.0)
            squared += (chunk * chunk).sum(dim=1, keepdim=True)
            positions = torch.topk(squared, n_neighbors, dim=1, largest=False, sorted=True).indices
            # Recompute the chosen distances directly: the expanded formula
            # loses precision for close pairs and its rounding depends on the
            # batch, so scores would change with how queries are grouped.
            exact = torch.linalg.vector_norm(chunk[:, None, :] - bank_tensor[positions], dim=2)
            exact, order = torch.sort(exact, dim=1, stable=True)
            distances[start : start + step] = exact.cpu().numpy()
            indices[start : start + step] = torch.gather(positions, 1, order).cpu().numpy()
    return distances, indices


def build_nndescent(bank: np.ndarray, random_state=None, n_jobs: int | None = None):
    """Build and prepare a pynndescent index over the bank."""
    from pynndescent import NNDescent

    index = NNDescent(
        np.asarray(bank, dtype=np.float32),
        metric="euclidean",
        n_neighbors=30,
        random_state=random_state,
        n_jobs=n_jobs,
        compressed=False,
    )
    index.prepare()
    return index


#: pynndescent is queried for at least this many neighbours: its search
#: finds the true nearest neighbour far more often when it tracks several
#: candidates (recall 0.80 -> 0.98 on a test manifold for k=1, at ~no cost).
MIN_NNDESCENT_CANDIDATES = 8


def nndescent_kneighbors(index, queries: np.ndarray, n_neighbors: int, epsilon: float = 0.1):
    """Query a pynndescent index; distances are Euclidean, float32, ascending."""
    k = max(n_neighbors, MIN_NNDESCENT_CANDIDATES)
    indices, distances = index.query(np.asarray(queries, dtype=np.float32), k=k, epsilon=epsilon)
    return distances[:, :n_neighbors].astype(np.float32), indices[:, :n_neighbors].astype(np.int64)
