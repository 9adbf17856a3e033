"""Export a fitted PatchCore pipeline as one ONNX graph (extra ``skpatchcore[onnx]``).

:func:`export_onnx` writes a graph from a batch of *preprocessed* images
(``float32``, ``(batch, 3, S, S)``: resized, cropped and normalised as
:class:`~skpatchcore.PatchFeatureTransformer` does) to the image anomaly
scores and the anomaly maps. Everything after decoding runs in the graph:

1. the backbone up to the last layer used;
2. the patch aggregation (``"mean_pool"`` or ``"concat"``, as fitted);
3. the nearest-neighbour search against the memory bank, in blocks of
   ``block_rows`` bank rows: per block one matrix product
   ``|q|^2 - 2 q.b + |b|^2`` and a top-k, the chosen rows' distances then
   computed directly (as the exact search of :mod:`skpatchcore.search` does)
   and merged into a running top-k. No ``cdist`` and no query x bank matrix:
   the largest temporary holds ``queries x block_rows`` distances, however
   large the bank;
4. the patch score (mean distance to the ``n_neighbors`` nearest rows), the
   image score (the largest patch score), reweighted by eq. 7 of the paper
   when the detector was fitted with ``reweight=True``;
5. the anomaly map: the bilinear upsampling and Gaussian smoothing of
   :func:`~skpatchcore.detector.upsample_patch_scores`, which are separable
   linear maps, as two matrix products with matrices computed from that
   function at export time.

Decoding and resizing stay outside the graph (they need an image library);
the model's preprocessing, threshold and calibration scores are stored in
the file's ``metadata_props`` (:data:`METADATA_KEYS`), from which
:class:`skpatchcore.onnx_runtime.OnnxPatchCore` preprocesses with Pillow and
numpy exactly as the Python model does, without torch.

The graph is traced with torch's TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``), deprecated since torch 2.9 but still shipped; the newer
``torch.export``-based exporter (which needs ``onnxscript``) has not been
tried with these models yet.

Not exported yet: models with more than one input scale (``scales``), tiled
models, and pipelines with steps other than features -> (coreset) ->
detector; :func:`export_onnx` refuses them with a message that says so.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .coreset import CoresetSampler
from .detector import PatchCoreDetector, upsample_patch_scores
from .features import PatchFeatureTransformer, aggregate_concat, aggregate_official
from .io.atomic import atomic_path
from .onnx_runtime import ONNX_FORMAT
from .pipeline import PatchCorePipeline

__all__ = ["DEFAULT_BLOCK_ROWS", "METADATA_KEYS", "ONNX_FORMAT", "PatchCoreGraph", "export_onnx"]

#: Largest bank + backbone size exported: one ONNX file holds at most 2 GiB (protobuf), with some room.
MAX_FILE_BYTES = int(1.9 * 2**30)
#: Bank rows per block of the nearest-neighbour search (one matrix product each).
DEFAULT_BLOCK_ROWS = 4096
#: The ``metadata_props`` keys written by :func:`export_onnx` (values are JSON).
METADATA_KEYS = (
    "skpatchcore.format", "skpatchcore.version", "threshold", "calibration_scores", "input_size",
    "resize", "crop_size", "interpolation", "mean", "std", "exif_transpose", "n_neighbors", "reweight",
    "reweight_neighbors", "map_sigma", "n_bank", "block_rows", "backbone", "layers",
)
#: Parameters whose every value the export handles (``scales``: checked apart), per class; any
#: other parameter (tiling, say, added later) must keep its default, else the export refuses.
_EXPORTED_PARAMS = {
    "PatchCorePipeline": {"steps", "transform_input", "memory", "verbose", "working_memory", "n_jobs", "scheduler"},
    "PatchFeatureTransformer": {
        "backbone", "layers", "weights", "resize", "crop_size", "interpolation", "mean", "std", "recipe",
        "patch_size", "pretrain_embed_dim", "target_embed_dim", "aggregation", "device", "batch_size",
        "n_jobs", "progress", "random_state", "exif_transpose", "scales",
    },
    "PatchCoreDetector": {
        "n_neighbors", "algorithm", "reweight", "reweight_neighbors", "map_sigma", "contamination", "device",
        "working_memory", "n_jobs", "random_state",
    },
}


class PatchCoreGraph(nn.Module):
    """The scoring of a fitted pipeline as one traceable module.

    ``forward(images)`` maps preprocessed images ``(batch, 3, S, S)`` to
    ``(anomaly_score (batch,) float64, anomaly_map (batch, S, S) float32)``;
    the map is the detector's map at the backbone input size. Built by
    :func:`export_onnx`, which documents the steps.

    Parameters
    ----------
    features : PatchFeatureTransformer
        Fitted, one input scale.
    detector : PatchCoreDetector
        Fitted on the features' patches (a 2-D bank).
    block_rows : int
        Bank rows per block of the search.
    """

    def __init__(self, features: PatchFeatureTransformer, detector: PatchCoreDetector, block_rows: int):
        super().__init__()
        backbone = features.backbone_
        if any(tensor.device.type != "cpu" for tensor in [*backbone.parameters(), *backbone.buffers()]):
            backbone = copy.deepcopy(backbone).to("cpu")  # the fitted model keeps its device
        self.backbone = backbone.eval()
        self.aggregation = features.aggregation_
        self.patch_size = features.patch_size
        self.pretrain_embed_dim = features.pretrain_embed_dim
        self.target_embed_dim = features.target_embed_dim
        self.n_neighbors = int(detector.n_neighbors)
        self.reweight = bool(detector.reweight)
        bank = np.ascontiguousarray(detector.memory_bank_, dtype=np.float32)
        self.n_blocks = -(-len(bank) // block_rows)
        for block in range(self.n_blocks):
            rows = torch.from_numpy(bank[block * block_rows:(block + 1) * block_rows].copy())
            # Stored transposed, (n_dims, rows): the product needs no Transpose, whose constant folding
            # would store the bank a second time.
            self.register_buffer(f"bank_t_{block}", rows.T.contiguous())
            self.register_buffer(f"bank_squared_{block}", (rows * rows).sum(dim=1)[None, :])
        self.block_rows = block_rows
        height, width, _ = features.feature_shape_
        rows_map, columns_map = _map_matrices((height, width), features.input_size_, detector.map_sigma)
        self.register_buffer("map_rows", rows_map)
        self.register_buffer("map_columns_t", columns_map.T.contiguous())
        if self.reweight:
            self.register_buffer("support", torch.from_numpy(_reweight_support(detector)))

    def _block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index` of the bank, transposed ``(n_dims, rows)``, and its rows' squared norms ``(1, rows)``."""
        return getattr(self, f"bank_t_{index}"), getattr(self, f"bank_squared_{index}")

    @staticmethod
    def _gather_rows(block_t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` (any shape) of a transposed block, shape ``(*positions.shape, n_dims)``."""
        return block_t[:, positions].movedim(0, -1)

    def _aggregate(self, layer_maps: list[torch.Tensor]) -> torch.Tensor:
        if self.aggregation == "concat":
            return aggregate_concat(layer_maps, self.patch_size)
        return aggregate_official(layer_maps, self.patch_size, self.pretrain_embed_dim, self.target_embed_dim)

    def _kneighbors(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact distances (ascending) and bank indices of each query's ``n_neighbors`` nearest rows."""
        queries_squared = (queries * queries).sum(dim=1, keepdim=True)
        best_distances = best_indices = None
        for index in range(self.n_blocks):
            block_t, rows_squared = self._block(index)
            squared = queries_squared - 2.0 * (queries @ block_t) + rows_squared
            k = min(self.n_neighbors, block_t.shape[1])
            positions = torch.topk(squared, k, dim=1, largest=False, sorted=True).indices
            # Direct distances of the chosen rows (the expanded formula loses precision for close pairs).
            distances = torch.linalg.vector_norm(queries[:, None, :] - self._gather_rows(block_t, positions), dim=2)
            positions = positions + index * self.block_rows
            if best_distances is None:
                best_distances, best_indices = distances, positions
                continue
            distances = torch.cat([best_distances, distances], dim=1)
            positions = torch.cat([best_indices, positions], dim=1)
            best_distances, order = torch.topk(distances, self.n_neighbors, dim=1, largest=False, sorted=True)
            best_indices = torch.gather(positions, 1, order)
        # A first block smaller than n_neighbors is impossible: blocks hold at least n_neighbors + 1 rows
        # except the last, and the bank has at least n_neighbors + 1 rows.
        return best_distances, best_indices

    def _bank_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Bank rows at arbitrary `indices` (any shape), gathered block by block."""
        gathered = None
        for index in range(self.n_blocks):
            block_t, _ = self._block(index)
            n_rows = block_t.shape[1]
            local = indices - index * self.block_rows
            inside = (local >= 0) & (local < n_rows)
            picked = self._gather_rows(block_t, local.clamp(0, n_rows - 1))
            picked = torch.where(inside[..., None], picked, torch.zeros_like(picked))
            gathered = picked if gathered is None else gathered + picked
        return gathered

    def _reweight_factors(self, queries: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7, as :class:`PatchCoreDetector` computes it (float64)."""
        support = self.support[nearest]  # (batch, b); the first column is `nearest` itself
        rows = self._bank_rows(support).double()
        distances = torch.linalg.vector_norm(rows - queries.double()[:, None, :], dim=2)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._aggregate(self.backbone(images))
        batch, height, width, n_dims = features.shape
        queries = features.reshape(-1, n_dims)
        distances, indices = self._kneighbors(queries)
        grids = distances.mean(dim=1).reshape(batch, height * width)
        top_scores, top = torch.max(grids, dim=1)
        scores = top_scores.double()
        if self.reweight:
            top_rows = torch.arange(batch) * (height * width) + top
            scores = scores * self._reweight_factors(queries[top_rows], indices[top_rows, 0])
        maps = self.map_rows @ grids.reshape(batch, height, width) @ self.map_columns_t
        return scores, maps


def _map_matrices(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (H, h), columns (W, w))`` with ``upsample_patch_scores(g) = rows @ g @ columns.T``.

    Bilinear upsampling and the Gaussian filter act on each axis separately,
    so a grid whose row ``i`` is 1 and every other row 0 is mapped to a map
    whose every column is the ``i``-th column of ``rows`` (and likewise for
    columns); the matrices are read off the detector's own function.
    """
    height, width = grid
    row_basis = np.zeros((height, height, width), dtype=np.float32)
    row_basis[np.arange(height), np.arange(height), :] = 1.0
    column_basis = np.zeros((width, height, width), dtype=np.float32)
    column_basis[np.arange(width), :, np.arange(width)] = 1.0
    rows = upsample_patch_scores(row_basis, size, sigma)[:, :, 0].T  # (H, h)
    columns = upsample_patch_scores(column_basis, size, sigma)[:, 0, :].T  # (W, w)
    return torch.from_numpy(np.ascontiguousarray(rows)), torch.from_numpy(np.ascontiguousarray(columns))


def _reweight_support(detector: PatchCoreDetector) -> np.ndarray:
    """Each bank row's ``reweight_neighbors`` neighbourhood, itself first (as the detector's eq. 7)."""
    bank = detector.memory_bank_
    b = min(detector.reweight_neighbors, bank.shape[0])
    _, support = detector.kneighbors(bank, b)
    support = np.array(support, dtype=np.int64)
    support[:, 0] = np.arange(bank.shape[0])
    return support


def _check_exportable(model) -> tuple[PatchFeatureTransformer, PatchCoreDetector]:
    """The fitted features and detector of `model`, or a ValueError naming what does not export."""
    if not isinstance(model, PatchCorePipeline):
        raise TypeError(f"export_onnx exports a fitted PatchCorePipeline (make_patchcore); got {type(model).__name__}.")
    steps = [step for _, step in model.steps]
    features, detector = steps[0], steps[-1]
    middle_ok = all(isinstance(step, CoresetSampler) for step in steps[1:-1])
    if not (isinstance(features, PatchFeatureTransformer) and isinstance(detector, PatchCoreDetector) and middle_ok):
        raise ValueError(
            "export_onnx exports pipelines of PatchFeatureTransformer -> (CoresetSampler) -> PatchCoreDetector "
            f"(as make_patchcore builds them); got steps {[type(step).__name__ for step in steps]}."
        )
    if not hasattr(features, "backbone_") or not hasattr(detector, "memory_bank_"):
        raise ValueError("export_onnx needs a fitted model; call fit first.")
    for estimator, kind in ((model, PatchCorePipeline), (features, PatchFeatureTransformer),
                            (detector, PatchCoreDetector)):
        _check_known_params(estimator, kind)
    if len(features.scales) != 1:
        raise ValueError(
            f"export_onnx does not export models with several input scales yet (scales={features.scales!r}); "
            "refit with scales=(1.0,) or score with the Python model."
        )
    if detector.memory_bank_.shape[1] != features.feature_shape_[2]:
        raise ValueError(f"The detector's bank has {detector.memory_bank_.shape[1]} columns; the features have "
                         f"{features.feature_shape_[2]} dimensions per patch. Refit the pipeline.")
    return features, detector


def _check_known_params(estimator, kind: type) -> None:
    """Refuse parameters the export does not know (e.g. tiling) unless they keep their defaults."""
    known = _EXPORTED_PARAMS[kind.__name__]
    signature = inspect.signature(type(estimator).__init__).parameters
    unknown = {name: value for name, value in estimator.get_params(deep=False).items()
               if name not in known and not (name in signature and value == signature[name].default)}
    if unknown:
        tiled = any("til" in name for name in unknown)
        raise ValueError(
            f"export_onnx does not export {'tiled models' if tiled else 'this model'} yet: the "
            f"{type(estimator).__name__} parameters {unknown} are not part of the exported graph. "
            "Score such models with the Python model (skpatchcore score MODEL.skpc)."
        )


def _metadata(features: PatchFeatureTransformer, detector: PatchCoreDetector, block_rows: int) -> dict[str, str]:
    backbone = features.backbone if isinstance(features.backbone, str) else type(features.backbone).__name__
    values = {
        "skpatchcore.format": ONNX_FORMAT,
        "skpatchcore.version": __version__,
        "threshold": float(-detector.offset_),
        "calibration_scores": [float(score) for score in detector.calibration_scores_],
        "input_size": list(features.input_size_),
        "resize": int(features.resize_),
        "crop_size": None if features.crop_size_ is None else int(features.crop_size_),
        "interpolation": features.interpolation_,
        "mean": [float(v) for v in features.mean_],
        "std": [float(v) for v in features.std_],
        "exif_transpose": bool(features.exif_transpose),
        "n_neighbors": int(detector.n_neighbors),
        "reweight": bool(detector.reweight),
        "reweight_neighbors": int(detector.reweight_neighbors),
        "map_sigma": float(detector.map_sigma),
        "n_bank": int(detector.memory_bank_.shape[0]),
        "block_rows": int(block_rows),
        "backbone": backbone,
        "layers": list(features.layers),
    }
    return {key: values[key] if key == "skpatchcore.format" else json.dumps(values[key]) for key in METADATA_KEYS}


def export_onnx(model, path: str | os.PathLike, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                opset_version: int = 17) -> Path:
    """Write a fitted PatchCore pipeline as an ONNX graph (preprocessed images -> scores, maps).

    The graph has one input, ``images`` (``float32``, ``(batch, 3, S, S)``,
    ``S`` the model's ``input_size_``; the batch size is free), and two
    outputs: ``anomaly_score`` (``float64``, ``(batch,)``; higher means more
    anomalous, i.e. minus ``score_samples``) and ``anomaly_map``
    (``float32``, ``(batch, S, S)``, the maps of ``score_and_maps``). The
    preprocessing, the threshold (``-offset_``) and the calibration scores
    (for p-values) are in the file's metadata (see the module docstring).
    Search in the graph is always exact; a model that searches approximately
    (``algorithm="bf16"`` or ``"pynndescent"``) gives the same image scores
    and maps that are, if anything, slightly lower where its search missed a
    neighbour. The file is written to a temporary file and renamed into place.

    Parameters
    ----------
    model : PatchCorePipeline
        Fitted; steps :class:`PatchFeatureTransformer` -> (:class:`CoresetSampler`)
        -> :class:`PatchCoreDetector`, one input scale, not tiled.
    path : str or path-like
        The ``.onnx`` file to write; its folder must exist.
    block_rows : int, default=4096
        Bank rows per block of the nearest-neighbour search: the search's
        largest temporary is ``batch x patches x block_rows`` float32 values
        (about 12.8 MB per 28 x 28-patch image at 4096), whatever the bank's size.
    opset_version : int, default=17
        ONNX opset of the graph.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    ValueError
        If the model cannot be exported (several scales, tiling, other steps, or a bank and
        backbone above :data:`MAX_FILE_BYTES`, since one ONNX file holds at most 2 GiB).
    ImportError
        If the ``onnx`` package is missing (``pip install skpatchcore[onnx]``).
    """
    try:
        import onnx
    except ImportError as error:
        raise ImportError("export_onnx needs the onnx package: pip install 'skpatchcore[onnx]'.") from error
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}.")
    features, detector = _check_exportable(model)
    block_rows = max(int(block_rows), detector.n_neighbors + 1)
    weights = features.backbone_.state_dict().values()
    stored = detector.memory_bank_.nbytes + sum(tensor.numel() * tensor.element_size() for tensor in weights)
    if stored > MAX_FILE_BYTES:
        raise ValueError(
            f"The bank and backbone take {stored / 2**30:.2f} GiB; a single ONNX file holds at most 2 GiB "
            "(protobuf's limit), and export with external data files is not supported yet. Fit with a "
            "smaller sampling_ratio, or score with the Python model."
        )
    graph = PatchCoreGraph(features, detector, block_rows).eval()
    side_h, side_w = features.input_size_
    example = torch.zeros(2, 3, side_h, side_w)
    target = Path(path)
    with atomic_path(target) as temporary:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python values it freezes (shapes, block sizes): all fixed by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # aggregate_official's index_add_ gets distinct indices in each call (its plan's outputs).
            warnings.filterwarnings("ignore", message=".*duplicated values in 'index'", category=UserWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            # Deliberately the TorchScript exporter (dynamo=False): see the module docstring.
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript",
                                    category=DeprecationWarning)
            torch.onnx.export(
                graph, (example,), str(temporary), dynamo=False, opset_version=opset_version,
                input_names=["images"], output_names=["anomaly_score", "anomaly_map"],
                dynamic_axes={"images": {0: "batch"}, "anomaly_score": {0: "batch"}, "anomaly_map": {0: "batch"}},
            )
        proto = onnx.load(str(temporary))
        for key, value in _metadata(features, detector, block_rows).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = "skpatchcore PatchCore model: preprocessed images -> anomaly_score, anomaly_map"
        onnx.save(proto, str(temporary))
    return target
