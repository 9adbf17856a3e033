"""Chunked fit and scoring on a Dask cluster (``dask.distributed``).

:class:`~skpatchcore.PatchCorePipeline` calls these functions when its
``scheduler`` is set, and for Dask collections of image paths; they are the
same chunked fit and scoring that run in one process, with Dask doing the
distribution (scheduling, data transfer, retries of tasks lost with a
worker):

* fit: every chunk of images is a task that extracts its features and
  selects its chunk coreset on a worker; the merge runs in the calling
  process (:meth:`~skpatchcore.CoresetSampler.merge`).
* scoring: every chunk of images is a task; the fitted model is scattered
  to every worker once (``broadcast=True``), not sent with each task.
* ``dask.bag`` / ``dask.dataframe`` columns of paths are scored lazily,
  partition by partition, with the model as one shared graph input.

Tasks are deterministic (a chunk coreset depends only on the sampler's
``seed_`` and the chunk's first image), so a task rerun after a worker dies
gives the same rows. Workers need skpatchcore installed and the image paths
readable; the backbone travels inside the fitted transformer, so they need
neither the weights file nor network access.

torch threads: each task runs with ``n_jobs`` threads when the pipeline
sets it, else with its worker's share of its machine's cores (cores divided
by the Dask threads of all workers on that machine, at least 1), so that
workers x threads never exceed the cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ._malloc import unfreeze_mmap_threshold
from ._threads import effective_n_jobs, torch_threads
from .coreset import ChunkCoreset
from .tiling import number_by_image

#: How long connecting to a scheduler may take (Dask duration) before a clear
#: error; override with ``dask.config.set({"skpatchcore.connect-timeout": "30s"})``.
CONNECT_TIMEOUT = "10s"
#: Scoring chunks in flight per worker thread: enough to keep workers busy,
#: few enough that results waiting for the caller stay bounded.
CHUNKS_AHEAD_PER_THREAD = 2

_clients: dict[str, object] = {}
_clients_lock = threading.Lock()
_large_blocks_reused = False


def _require_distributed():
    try:
        import distributed
    except ImportError as error:
        raise ImportError(
            "Distributed fit and scoring need Dask: pip install 'skpatchcore[dask]'."
        ) from error
    return distributed


def connect(scheduler: str):
    """A ``distributed.Client`` for the scheduler address, reused within this process.

    Parameters
    ----------
    scheduler : str
        Address such as ``"tcp://10.0.0.5:8786"``.

    Returns
    -------
    client : distributed.Client

    Raises
    ------
    ConnectionError
        If no scheduler answers at that address in time.
    """
    distributed = _require_distributed()
    import dask

    if not isinstance(scheduler, str) or not scheduler:
        raise TypeError(f"scheduler must be an address string such as 'tcp://host:8786', got {scheduler!r}.")
    with _clients_lock:
        client = _clients.get(scheduler)
        if client is not None and client.status == "running":
            return client
        timeout = dask.config.get("skpatchcore.connect-timeout", CONNECT_TIMEOUT)
        try:
            client = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as error:
            raise ConnectionError(
                f"Cannot reach a Dask scheduler at {scheduler!r} ({type(error).__name__}: {error}). "
                "Start one with 'dask scheduler' and workers with 'dask worker ADDRESS', "
                "or pass scheduler=None to run in this process."
            ) from error
        _clients[scheduler] = client
        return client


def thread_plan(client) -> dict[str, int]:
    """torch threads for each worker: its machine's cores over the Dask threads there.

    Returns
    -------
    plan : dict of {worker address: threads}
    """
    workers = _workers(client)
    cores = client.run(os.cpu_count)
    threads_on_host: dict[str, int] = {}
    for info in workers.values():
        threads_on_host[info["host"]] = threads_on_host.get(info["host"], 0) + int(info["nthreads"])
    return {
        address: max(1, int(cores.get(address) or 1) // threads_on_host[info["host"]])
        for address, info in workers.items()
    }


def _workers(client) -> dict:
    """Every worker's scheduler info (newer Dask lists only a few unless asked for all)."""
    import inspect

    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)["workers"]
    return client.scheduler_info()["workers"]


def _prepare_process() -> None:
    """Once per process, before a task's first forward pass."""
    global _large_blocks_reused
    if not _large_blocks_reused:
        _large_blocks_reused = True
        unfreeze_mmap_threshold()


def _task_context(plan: dict[str, int], n_jobs: int | None):
    """What every task runs inside: the process prepared, torch on its threads."""
    _prepare_process()
    return torch_threads(_task_threads(plan, n_jobs))


def _task_threads(plan: dict[str, int], n_jobs: int | None) -> int:
    if n_jobs is not None:
        return effective_n_jobs(n_jobs)
    from distributed import get_worker

    return plan.get(get_worker().address, 1)


def _chunk_coreset_task(features, sampler, images: list, first_image: int, plan, n_jobs,
                        first_tile: int | None = None) -> list[ChunkCoreset]:
    with _task_context(plan, n_jobs):
        if first_tile is None:
            return sampler.chunk_coresets(features.transform(images), first_image)
        counts = [features.tile_layout(image).n_tiles for image in images]
        tile_image = np.repeat(np.arange(len(images)), counts)
        parts = sampler.chunk_coresets(features.transform(images), first_tile)
        return [number_by_image(part, tile_image, first_tile, first_image) for part in parts]


def chunk_coresets(
    scheduler: str, features, sampler, images: Sequence, chunk: int, first_image: int, n_jobs: int | None,
    union, first_tile: int | None = None,
) -> None:
    """Features and chunk coresets of consecutive image chunks, one Dask task per chunk.

    A task's chunk is split further as in a fit in one process
    (:meth:`~skpatchcore.CoresetSampler.chunk_coresets`), so the bank is the
    same as there.

    Results are added to `union` (allocated, their rows spilled to disk) as
    they arrive, so the caller holds about the union's share of rows, never
    every chunk's picks at once.

    Parameters
    ----------
    scheduler : str
        Scheduler address.
    features : PatchFeatureTransformer
        Fitted; sent to every worker once.
    sampler : CoresetSampler
        With ``seed_`` drawn (:meth:`~skpatchcore.CoresetSampler.begin_chunks`).
    images : sequence of paths or arrays
    chunk : int
        Images per task.
    first_image : int
        Global index of ``images[0]``.
    n_jobs : int or None
        torch threads per task; None for the worker's share of its cores.
    union : SpilledUnion
        Collects the chunk coresets (:class:`skpatchcore._union.SpilledUnion`).
    first_tile : int or None, default=None
        For a tiled transformer: global number of the first image's first
        tile (the coreset numbers tiles; the parts come back numbered by
        image, see :func:`skpatchcore.pipeline.number_by_image`).
    """
    distributed = _require_distributed()
    client = connect(scheduler)
    plan = thread_plan(client)
    features_ref, sampler_ref = client.scatter([features, sampler], broadcast=True, hash=False)
    starts = range(0, len(images), chunk)
    if first_tile is None:
        first_tiles = [None] * len(starts)
    else:
        counts = np.array([features.tile_layout(image).n_tiles for image in images], dtype=np.int64)
        first_tiles = [first_tile + int(counts[:start].sum()) for start in starts]
    futures = [
        client.submit(
            _chunk_coreset_task, features_ref, sampler_ref, list(images[start:start + chunk]),
            first_image + start, plan, n_jobs, tile, pure=False,
        )
        for start, tile in zip(starts, first_tiles)
    ]
    try:
        for future, parts in distributed.as_completed(futures, loop=client.loop, with_results=True):
            for part in parts:
                union.add(part)
            future.release()
    finally:
        _stop(client, [*futures, features_ref, sampler_ref])


def _score_task(model, images: list, with_maps: bool, original_size: bool, plan, n_jobs):
    # The worker's copy runs locally and has the caller's working_memory, so the chunk is one part.
    with _task_context(plan, n_jobs):
        (_, scores, maps), = model.iter_score_and_maps(images, original_size=original_size, maps=with_maps)
    return scores, maps


def score_chunks(
    scheduler: str, model, images: Sequence, chunk: int, with_maps: bool, original_size: bool,
    n_jobs: int | None,
) -> Iterator[tuple[np.ndarray, object]]:
    """Score consecutive image chunks on the cluster; yield ``(score_samples, maps)`` in order.

    The model is scattered to every worker once. At most
    ``CHUNKS_AHEAD_PER_THREAD`` chunks per worker thread are in flight, so
    results waiting for the caller stay bounded however many images there are.
    """
    client = connect(scheduler)
    plan = thread_plan(client)
    model_ref = client.scatter(_without_scheduler(model), broadcast=True, hash=False)
    starts = list(range(0, len(images), chunk))
    window = max(1, CHUNKS_AHEAD_PER_THREAD * sum(int(info["nthreads"]) for info in _workers(client).values()))
    pending = []
    try:
        for position in range(len(starts) + window):
            if position < len(starts):
                start = starts[position]
                pending.append(client.submit(
                    _score_task, model_ref, list(images[start:start + chunk]), with_maps, original_size,
                    plan, n_jobs, pure=False,
                ))
            if position >= window - 1 and pending:
                future = pending.pop(0)
                yield future.result()
                future.release()
    finally:
        _stop(client, [*pending, model_ref])


def _stop(client, futures) -> None:
    """Cancel the futures still running, then release all of them.

    Finished futures are only released: a cancel request makes the scheduler
    broadcast ``cancelled-keys`` to every client, and a client that is just
    connecting then fails its handshake (``assert len(msg) == 1`` in
    ``Client._ensure_connected``).
    """
    running = [future for future in futures if not future.done()]
    if running:
        client.cancel(running)
    for future in futures:
        future.release()


def _without_scheduler(model):
    """A shallow copy of the pipeline that runs locally (what a worker must do)."""
    import copy

    local = copy.copy(model)
    local.scheduler = None
    return local


def _score_partition(paths, model, method: str) -> list:
    _prepare_process()
    values = list(paths)
    if not values:
        return []
    return getattr(model, method)(values).tolist()


def _score_series_partition(paths, model, method: str):
    import pandas as pd

    _prepare_process()
    if len(paths) == 0:
        return pd.Series([], index=paths.index, dtype="float64", name=paths.name)
    return pd.Series(getattr(model, method)(list(paths)), index=paths.index, name=paths.name)


def _shared_model(model):
    """The model as a graph input: a broadcast future on a cluster, else one delayed value."""
    import dask

    local = _without_scheduler(model)
    client = connect(model.scheduler) if model.scheduler is not None else _current_client()
    if client is None:
        return dask.delayed(local, pure=True, traverse=False)
    return client.scatter(local, broadcast=True, hash=False)


def _current_client():
    """The active ``distributed`` client, unless Dask is configured for another scheduler."""
    import dask

    configured = dask.config.get("scheduler", None)
    if isinstance(configured, str) and configured not in ("dask.distributed", "distributed"):
        return None  # e.g. dask.config.set(scheduler="synchronous")
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:  # no client in this process
        return None


def score_collection(model, collection, method: str):
    """Lazily score a ``dask.bag`` or a ``dask.dataframe`` Series of image paths.

    Parameters
    ----------
    model : PatchCorePipeline
        Fitted.
    collection : dask.bag.Bag or dask.dataframe.Series
        Image paths (or arrays), one per element or row.
    method : {"score_samples", "decision_function", "predict"}

    Returns
    -------
    result : dask.bag.Bag or dask.dataframe.Series
        Lazy, partition for partition like the input; ``.compute()`` runs it
        on the current Dask scheduler. The model is one shared input of the
        graph: each worker receives it once (scattered to every worker when
        a ``distributed`` client is active or ``model.scheduler`` is set).
    """
    import dask.bag as db

    model_ref = _shared_model(model)
    if isinstance(collection, db.Bag):
        return collection.map_partitions(_score_partition, model_ref, method)
    try:
        import dask.dataframe as dd
    except ImportError:  # pragma: no cover - dataframe extra missing
        dd = None
    if dd is not None and isinstance(collection, dd.Series):
        dtype = "int64" if method == "predict" else "float64"
        return collection.map_partitions(
            _score_series_partition, model_ref, method, meta=(collection.name, dtype)
        )
    raise TypeError(
        f"Cannot score a {type(collection).__name__}: pass a dask.bag of image paths, a dask.dataframe "
        "column (Series) of paths, or a list of paths."
    )
