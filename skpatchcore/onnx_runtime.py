"""Score images with an exported ONNX model: onnxruntime, numpy and Pillow, no torch.

:class:`OnnxPatchCore` opens a file written by
:func:`skpatchcore.onnx_export.export_onnx` (or ``skpatchcore export``),
reads the preprocessing, threshold and calibration scores from its metadata,
preprocesses images with the same function as
:class:`~skpatchcore.PatchFeatureTransformer`
(:func:`skpatchcore.io.images.preprocess_image`: Pillow and numpy) and runs the
graph with onnxruntime. Its outputs follow the conventions of
:class:`~skpatchcore.PatchCorePipeline` (``score_samples``: higher means
more normal; maps: higher means more anomalous).

Neither this module nor what it imports imports torch or torchvision: the
runtime needs ``onnxruntime``, ``numpy`` and ``Pillow`` only (the ``score``
command's heatmaps also need matplotlib). The ONNX file is a graph of
standard operators and tensors; onnxruntime runs no Python code from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .conformal import conformal_pvalues
from .io.images import as_image_list, image_size, preprocess_image

__all__ = ["ONNX_FORMAT", "OnnxPatchCore"]

#: ``metadata_props["skpatchcore.format"]`` of an exported graph, the only format this runtime reads.
ONNX_FORMAT = "skpatchcore.onnx/1"


class OnnxPatchCore:
    """A PatchCore model exported to ONNX, scored without torch.

    Parameters
    ----------
    path : str or path-like
        An ``.onnx`` file written by :func:`~skpatchcore.onnx_export.export_onnx`.
    n_threads : int or None, default=None
        onnxruntime's intra-op threads; None lets onnxruntime choose (all
        physical cores).
    batch_size : int, default=8
        Images per graph run.
    providers : list of str or None, default=None
        onnxruntime execution providers; None uses ``["CPUExecutionProvider"]``.

    Attributes
    ----------
    threshold : float
        The calibrated anomaly-score threshold (``-offset_`` of the Python
        model): images scoring above it are anomalous.
    offset_ : float
        ``-threshold``, so that ``decision_function = score_samples - offset_``.
    calibration_scores_ : ndarray
        Anomaly scores of the calibration images (reference of :meth:`pvalues`).
    metadata : dict
        Every metadata entry of the file, JSON-decoded.
    input_size_ : tuple of int
    resize_, crop_size_, interpolation_, mean_, std_, exif_transpose
        The preprocessing, under the names of the fitted
        :class:`~skpatchcore.PatchFeatureTransformer`'s attributes (so that
        display helpers such as :func:`skpatchcore.io.images.model_view` accept
        this object).
    """

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, batch_size: int = 8,
                 providers: list[str] | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError("OnnxPatchCore needs onnxruntime: pip install 'skpatchcore[onnx]' "
                              "(or just onnxruntime, numpy and Pillow).") from error
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer))
                                      or n_threads < 1):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}.")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {str(self.path)!r}")
        self.batch_size = int(batch_size)
        options = onnxruntime.SessionOptions()
        if n_threads is not None:
            options.intra_op_num_threads = int(n_threads)
            options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                str(self.path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{str(self.path)!r} is not a readable ONNX model ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]})") from error
        self.metadata = _read_metadata(self._session.get_modelmeta().custom_metadata_map, self.path)
        meta = self.metadata
        self.threshold = float(meta["threshold"])
        self.offset_ = -self.threshold
        self.calibration_scores_ = np.asarray(meta["calibration_scores"], dtype=np.float64)
        self.input_size_ = tuple(int(v) for v in meta["input_size"])
        self.resize_ = int(meta["resize"])
        self.crop_size_ = None if meta["crop_size"] is None else int(meta["crop_size"])
        self.interpolation_ = str(meta["interpolation"])
        self.mean_ = tuple(float(v) for v in meta["mean"])
        self.std_ = tuple(float(v) for v in meta["std"])
        self.exif_transpose = bool(meta["exif_transpose"])

    def __repr__(self) -> str:
        return f"OnnxPatchCore({str(self.path)!r}, backbone={self.metadata.get('backbone')!r})"

    def preprocess(self, image) -> np.ndarray:
        """The graph input of one image: ``(3, S, S)`` float32, as the Python model preprocesses it.

        Parameters
        ----------
        image : str, path-like or ndarray
            An image file or array, as accepted by
            :class:`~skpatchcore.PatchFeatureTransformer`.
        """
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        return preprocess_image(image, self.resize_, self.crop_size_, self.interpolation_, self.mean_, self.std_,
                                self.exif_transpose)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on preprocessed images.

        Parameters
        ----------
        batch : ndarray of shape (n_images, 3, S, S), float32

        Returns
        -------
        anomaly_scores : ndarray of shape (n_images,), float64
            Higher means more anomalous.
        maps : ndarray of shape (n_images, S, S), float32
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = (3, *self.input_size_)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"The graph takes preprocessed images of shape (n, {', '.join(map(str, expected))}); "
                             f"got {batch.shape}.")
        scores, maps = self._session.run(["anomaly_score", "anomaly_map"], {"images": batch})
        return np.asarray(scores, dtype=np.float64), maps

    def iter_score_and_maps(self, X, original_size: bool = False) -> Iterator[tuple[range, np.ndarray, list]]:
        """Score images ``batch_size`` at a time: yield ``(indices, score_samples, maps)``.

        As :meth:`skpatchcore.PatchCorePipeline.iter_score_and_maps`.

        Parameters
        ----------
        X : images
            Image paths or arrays.
        original_size : bool, default=False
            Resize each map (bilinear, Pillow) to its image's size; only
            without a centre crop.
        """
        if original_size and self.crop_size_ is not None:
            raise ValueError("original_size=True needs a model without a centre crop (crop_size=None).")
        images = as_image_list(X)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            scores, maps = self.run(np.stack([self.preprocess(image) for image in chunk]))
            if original_size:
                maps = [resize_map(m, image_size(image, self.exif_transpose)) for m, image in zip(maps, chunk)]
            yield range(start, start + len(chunk)), -scores, maps

    def score_and_maps(self, X, original_size: bool = False) -> tuple[np.ndarray, np.ndarray | list]:
        """``score_samples`` (higher means more normal) and anomaly maps (higher means more anomalous)."""
        scores, maps = [], []
        for _, chunk_scores, chunk_maps in self.iter_score_and_maps(X, original_size):
            scores.append(chunk_scores)
            maps.extend(chunk_maps)
        return np.concatenate(scores), (maps if original_size else np.stack(maps))

    def score_samples(self, X) -> np.ndarray:
        """Minus the anomaly score of each image (higher means more normal)."""
        return self.score_and_maps(X)[0]

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for predicted anomalies."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for normal images, -1 for anomalies."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def pvalues(self, X) -> np.ndarray:
        """Conformal p-values (see :meth:`skpatchcore.PatchCoreDetector.pvalues`)."""
        return self.pvalues_from_scores(self.score_samples(X))

    def pvalues_from_scores(self, scores) -> np.ndarray:
        """Conformal p-values of known ``score_samples``."""
        return conformal_pvalues(-np.asarray(scores, dtype=np.float64), self.calibration_scores_)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to ``size = (height, width)`` with Pillow (float32).

    Enlarging gives the same values as :func:`skpatchcore._maps.resize_map`
    (half-pixel centres) up to float rounding; when shrinking, Pillow's
    filter also smooths (as ``antialias=True``).
    """
    picture = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR), dtype=np.float32)


def _read_metadata(props: dict[str, str], path: Path) -> dict:
    """The JSON-decoded metadata of an exported model, or a ValueError naming what is wrong."""
    found = props.get("skpatchcore.format")
    if found != ONNX_FORMAT:
        what = "has no skpatchcore metadata" if found is None else f"has format {found!r}"
        raise ValueError(f"{str(path)!r} {what}; this runtime reads {ONNX_FORMAT!r} files written by "
                         "'skpatchcore export' (skpatchcore.export_onnx).")
    metadata = {}
    for key, value in props.items():
        try:
            metadata[key] = value if key == "skpatchcore.format" else json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    missing = [key for key in ("threshold", "calibration_scores", "input_size", "resize", "crop_size",
                               "interpolation", "mean", "std", "exif_transpose") if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the metadata {missing}; export the model again.")
    return metadata
