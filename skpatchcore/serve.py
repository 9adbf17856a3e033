"""An HTTP scoring service for a fitted PatchCore model (FastAPI; extra ``skpatchcore[serve]``).

:func:`create_app` returns a FastAPI application; ``skpatchcore serve MODEL``
runs it with uvicorn. Its endpoints, whose names are a contract:

- ``POST /score``: one or more images as a multipart upload (field
  ``files``, repeated). Answers ``{"results": [...]}`` in upload order, one
  object per image with ``filename``, ``anomaly_score`` (higher is more
  anomalous), ``anomalous`` (the calibrated threshold's decision),
  ``p_value`` (conformal, see :meth:`~skpatchcore.PatchCoreDetector.pvalues`)
  and ``decision`` (negative for anomalies); with ``?maps=true`` also
  ``anomaly_map_png``, the anomaly map as a base64 8-bit greyscale PNG of
  the backbone's input size, 0 to 255 spanning anomaly values 0 to twice the
  threshold (the colour range of ``skpatchcore score``'s heatmaps).
- ``GET /health``: 200 once the model is loaded.
- ``GET /model``: backbone, recipe, input size, threshold, format versions
  and the service's limits.
- ``GET /docs``: the OpenAPI page.

Bad requests get a JSON error ``{"detail": ...}`` that names the problem:
413 for a request body over ``max_request_bytes`` or more than
``max_images`` images, 422 for an upload that is not a readable image
(another format, truncated, empty, or more pixels than
``PIL.Image.MAX_IMAGE_PIXELS``) and for a request without ``files``.

Uploads are decoded in memory with the package's own image reading
(:func:`skpatchcore.io.images.decode_pixels`) and scored by one shared model
in a bounded pool of ``workers`` threads, each running torch with
``threads`` threads; requests beyond the pool wait for a free worker.
Sizing, thread safety and the security model are in ``docs/serving.rst``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run time.
import asyncio
import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import numpy as np

from . import __version__
from ._threads import torch_threads
from .detector import PatchCoreDetector
from .evaluation.report import colour_range
from .io.images import UnreadableImageError, decode_pixels
from .io.model_file import FILE_FORMAT_VERSION, detect_format, load
from .io.versioning import MODEL_FORMAT_VERSION
from .pipeline import PatchCorePipeline

__all__ = ["DEFAULT_MAX_IMAGES", "DEFAULT_MAX_REQUEST_BYTES", "ScoringService", "create_app", "default_workers",
           "load_safe_model"]

#: Images accepted in one ``POST /score`` request.
DEFAULT_MAX_IMAGES = 32
#: Largest request body accepted, in bytes (64 MiB).
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
#: Scoring threads never exceed this many by default (more rarely pays on a CPU).
MAX_DEFAULT_WORKERS = 4


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> tuple[int, int]:
    """``(workers, threads)``: scoring threads, and torch threads for each, that fill the cores.

    As many workers as cores, at most :data:`MAX_DEFAULT_WORKERS`, and the
    cores shared out among them: 2 cores give 2 workers of 1 thread, 16
    cores 4 workers of 4 threads.

    Parameters
    ----------
    cores : int or None, default=None
        None: the cores this process may use.

    Returns
    -------
    workers, threads : int
    """
    cores = max(1, available_cores() if cores is None else int(cores))
    workers = min(cores, MAX_DEFAULT_WORKERS)
    return workers, max(1, cores // workers)


def load_safe_model(path: str | os.PathLike, device: str | None = None) -> PatchCorePipeline:
    """A model file in the safe format, for serving: never a pickle.

    Parameters
    ----------
    path : str or path-like
        A file written by ``skpatchcore fit`` or :func:`skpatchcore.save`.
    device : str or None, default=None
        Replaces the device stored in the model (``"cpu"``, ``"cuda"``).

    Returns
    -------
    model : PatchCorePipeline
        With ``n_jobs``, ``scheduler`` and progress bars off: the service
        sizes threads itself and scores in this process.

    Raises
    ------
    FileNotFoundError
        If `path` is not a file.
    ValueError
        If the file is a pickle, is not a model file, is damaged or holds
        something other than a fitted PatchCore pipeline.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    kind = detect_format(path)
    if kind != "safe":
        what = ("a pickle (joblib) file, and loading a pickle runs any code it contains: the service "
                "never loads one" if kind == "pickle" else "not a skpatchcore model file")
        raise ValueError(f"{str(path)!r} is {what}. Serve a model in the safe format, written by "
                         "'skpatchcore fit -o model.skpc' or skpatchcore.save(model, 'model.skpc').")
    model = load(path)
    _check_model(model, repr(str(path)))
    if device:
        for _, step in model.steps:
            if "device" in step.get_params(deep=False):
                step.set_params(device=device)
    model.set_params(n_jobs=None, scheduler=None)
    model.steps[0][1].set_params(n_jobs=None, progress=False)
    return model


def _check_model(model, what: str) -> None:
    """Refuse anything but a fitted image pipeline that scores in this process."""
    pipeline = isinstance(model, PatchCorePipeline) and isinstance(model.steps[-1][1], PatchCoreDetector)
    if not (pipeline and hasattr(model.steps[0][1], "input_size_") and hasattr(model.steps[-1][1], "offset_")):
        raise ValueError(f"{what} is a {type(model).__name__}, not a fitted PatchCore image pipeline "
                         "(make_patchcore(...).fit(images)).")
    if model.scheduler is not None:
        raise ValueError(f"{what} scores on the Dask scheduler {model.scheduler!r}; the service scores in its "
                         "own process: set_params(scheduler=None) first.")


class ScoringService:
    """One shared model, its limits and its scoring, independent of the web framework.

    Parameters
    ----------
    model : PatchCorePipeline
        Fitted; not modified.
    workers : int
        Requests scored at the same time (the other requests wait).
    threads : int
        torch threads of each scoring call. The model's own ``n_jobs``,
        when set, takes precedence inside its calls.
    max_images : int
        Images accepted per request.
    """

    def __init__(self, model: PatchCorePipeline, workers: int, threads: int, max_images: int):
        self.model = model
        self.features, self.detector = model.steps[0][1], model.steps[-1][1]
        self.workers, self.threads, self.max_images = workers, threads, max_images
        self.map_range = colour_range(model, None, None)

    def info(self) -> dict:
        """What ``GET /model`` returns."""
        features, detector = self.features, self.detector
        backbone = features.backbone if isinstance(features.backbone, str) else type(features.backbone).__name__
        return {
            "backbone": backbone,
            "layers": list(features.layers),
            "recipe": features.recipe,
            "aggregation": features.aggregation_,
            "input_size": list(features.input_size_),
            "n_neighbors": int(detector.n_neighbors),
            "reweight": bool(detector.reweight),
            "memory_bank_rows": int(detector.memory_bank_.shape[0]),
            "threshold": float(-detector.offset_),
            "n_calibration_scores": len(detector.calibration_scores_),
            "model_format_version": MODEL_FORMAT_VERSION,
            "file_format_version": FILE_FORMAT_VERSION,
            "skpatchcore_version": __version__,
            "anomaly_map_range": list(self.map_range),
            "max_images": self.max_images,
            "workers": self.workers,
            "threads": self.threads,
        }

    def decode(self, uploads: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """The uploads' pixels, as the model reads files.

        Raises
        ------
        UnreadableImageError
            Naming every upload that is not a readable image.
        """
        upright = getattr(self.features, "exif_transpose", True)
        images, errors = [], []
        for name, data in uploads:
            try:
                images.append(np.asarray(decode_pixels(data, name, upright)))
            except UnreadableImageError as error:
                errors.append(" ".join(str(error).split()))
        if errors:
            raise UnreadableImageError("; ".join(errors))
        return images

    def score(self, uploads: list[tuple[str, bytes]], with_maps: bool = False) -> list[dict]:
        """The ``results`` of ``POST /score`` for ``(filename, bytes)`` uploads, in their order."""
        images = self.decode(uploads)
        with torch_threads(self.threads):
            if with_maps:
                scores, maps = self.model.score_and_maps(images)
            else:
                scores, maps = self.model.score_samples(images), None
        offset = float(self.detector.offset_)
        pvalues = self.detector.pvalues_from_scores(scores)
        results = []
        for i, (name, _) in enumerate(uploads):
            decision = float(scores[i]) - offset
            result = {"filename": name, "anomaly_score": -float(scores[i]), "anomalous": decision < 0,
                      "p_value": float(pvalues[i]), "decision": decision}
            if maps is not None:
                result["anomaly_map_png"] = self.map_png(maps[i])
            results.append(result)
        return results

    def map_png(self, anomaly_map: np.ndarray) -> str:
        """An anomaly map as a base64 8-bit greyscale PNG, 0-255 over ``anomaly_map_range``."""
        from PIL import Image

        low, high = self.map_range
        grey = np.rint(np.clip((anomaly_map - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


class RequestTooLarge(Exception):
    """The request body passed the service's limit while it was read."""


class RequestSizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with a 413 JSON error.

    A declared ``Content-Length`` over the limit is refused before the body
    is read; a body sent without one (chunked) is counted as it arrives and
    refused at the first byte over the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self, size: str) -> str:
        return (f"Request body too large: {size}, over the service's limit of {self.max_bytes} bytes "
                "(max_request_bytes, --max-request-mb). Send fewer or smaller images per request.")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self.message(f"{int(declared)} bytes declared"))
        received, exceeded, started = 0, False, False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise RequestTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # the application's answer to the cut body: replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except RequestTooLarge:
            pass
        if exceeded and not started:
            await _send_json(send, 413, self.message(f"more than {self.max_bytes} bytes sent"))


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(
    model,
    *,
    workers: int | None = None,
    threads: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    device: str | None = None,
):
    """The scoring service as a FastAPI application.

    Parameters
    ----------
    model : str, path-like or PatchCorePipeline
        A model file in the safe format (a pickle is refused; see
        :func:`load_safe_model`), or a fitted pipeline, used as it is and
        shared by all requests (its ``n_jobs``, when set, decides the torch
        threads of its calls).
    workers : int or None, default=None
        Requests scored at the same time; None: see :func:`default_workers`.
    threads : int or None, default=None
        torch threads of each scoring call; None: the cores divided among
        the workers.
    max_images : int, default=32
        Images accepted per request.
    max_request_bytes : int, default=64 MiB
        Largest request body accepted.
    device : str or None, default=None
        Replaces the device stored in a model file (``"cpu"``, ``"cuda"``).

    Returns
    -------
    app : fastapi.FastAPI
        Serve it with any ASGI server, e.g. ``uvicorn.run(app)``.

    Raises
    ------
    ImportError
        If FastAPI is not installed (extra ``skpatchcore[serve]``).
    ValueError
        If the model file is a pickle or not a fitted PatchCore pipeline,
        or a limit is not a positive integer.
    """
    try:
        from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    except ImportError as error:
        raise ImportError("The scoring service needs FastAPI: pip install 'skpatchcore[serve]'.") from error
    for name, value in (("workers", workers), ("threads", threads), ("max_images", max_images),
                        ("max_request_bytes", max_request_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(model, (str, os.PathLike)):
        model = load_safe_model(model, device)
    else:
        _check_model(model, "The model")
    if workers is None:
        workers = default_workers()[0]
    if threads is None:
        threads = max(1, available_cores() // workers)
    service = ScoringService(model, workers, threads, max_images)
    # The bounded pool: `workers` threads score, requests beyond them queue (any event loop may submit).
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skpatchcore-score")

    app = FastAPI(
        title="skpatchcore scoring service",
        version=__version__,
        description="PatchCore anomaly scores, decisions, p-values and anomaly maps of uploaded images, "
        "from one fitted model (docs/serving.rst).",
    )
    app.state.service = service

    @app.get("/health", summary="200 once the model is loaded")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model", summary="The model being served and the service's limits")
    def model_info() -> dict:
        return service.info()

    @app.post(
        "/score",
        summary="Score uploaded images",
        responses={413: {"description": "Request body or image count over the limits"},
                   422: {"description": "An upload is not a readable image, or no files were sent"}},
    )
    async def score(
        files: Annotated[list[UploadFile], File(description="Images (PNG, JPEG, TIFF...), field repeated per image")],
        maps: Annotated[bool, Query(description="Add each image's anomaly map as a base64 PNG")] = False,
    ) -> dict:
        if len(files) > max_images:
            raise HTTPException(413, f"Too many images: {len(files)} uploaded, at most {max_images} per request "
                                     "(max_images, --max-images).")
        uploads = [(upload.filename or f"upload {i}", await upload.read()) for i, upload in enumerate(files)]
        try:
            results = await asyncio.get_running_loop().run_in_executor(pool, service.score, uploads, maps)
        except UnreadableImageError as error:
            raise HTTPException(422, str(error)) from None
        return {"results": results}

    app.add_middleware(RequestSizeLimit, max_bytes=max_request_bytes)
    return app
