"""Locally aware patch features from a pretrained CNN (PatchCore, section 3.1)."""

from __future__ import annotations

import contextlib
import copy
import functools
import numbers
import os
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from ._device import resolve_device
from ._doc_link import DocLinkMixin
from ._malloc import reuse_freed_memory
from ._param_constraints import DEVICE, N_JOBS, NumberInterval, positive_int
from ._random_seeds import int_seeds
from ._threads import torch_threads
from .backbones import (
    build_backbone,
    cpu_copy,
    extract_layers,
    input_normalization,
    layer_extractor,
    native_input,
    prune_unused_modules,
)
from .io.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    as_image_list,
    image_size,
    preprocess_image_geometries,
    tile_pixels,
)
from .io.versioning import VersionedStateMixin
from .tiling import TileLayout, tile_layout

AGGREGATIONS = ("mean_pool", "concat")
RECIPES = ("recommended", "official")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
#: The official code's MVTec input geometry (``Resize(256)``, ``CenterCrop(224)``, torchvision's bilinear).
OFFICIAL_RESIZE, OFFICIAL_CROP, OFFICIAL_INTERPOLATION = 256, 224, "bilinear"


def _adaptive_pool_matrix(length: int, size: int) -> sparse.csr_matrix:
    """``F.adaptive_avg_pool1d(x, size)`` as a sparse (size x length) matrix."""
    outputs = np.arange(size)
    starts = (outputs * length) // size
    ends = -((-(outputs + 1) * length) // size)
    counts = ends - starts
    columns = np.concatenate([np.arange(start, end) for start, end in zip(starts, ends)])
    values = np.repeat(1.0 / counts, counts)
    return sparse.csr_matrix((values, (np.repeat(outputs, counts), columns)), shape=(size, length))


@functools.lru_cache(maxsize=16)
def _official_plan(channels: tuple[int, ...], patch_size: int, pretrain_embed_dim: int, target_embed_dim: int):
    """Per layer, the official pooling as a grouped convolution.

    Both poolings of the official recipe are linear in the flattened
    ``(channel, dy, dx)`` neighbourhood, so their composition is one sparse
    matrix per layer. Each output dimension reads a short run of consecutive
    entries, i.e. a few consecutive channels: output ``t`` of layer ``l`` is
    a ``patch_size x patch_size`` convolution of channels
    ``first[t] .. first[t] + span - 1`` with fixed weights.

    Returns
    -------
    list of (outputs, gather, weight) per layer
        ``outputs``: target dimensions the layer contributes to; ``gather``:
        input channels, ``span`` per output (``None`` when that is every
        channel in order); ``weight``: Tensor of shape
        ``(len(outputs), span, patch_size, patch_size)``.
    """
    area = patch_size * patch_size
    final = _adaptive_pool_matrix(len(channels) * pretrain_embed_dim, target_embed_dim)
    plan = []
    for layer, n_channels in enumerate(channels):
        block = final[:, layer * pretrain_embed_dim : (layer + 1) * pretrain_embed_dim]
        composed = (block @ _adaptive_pool_matrix(n_channels * area, pretrain_embed_dim)).tocsr()
        composed.eliminate_zeros()
        outputs = np.flatnonzero(np.diff(composed.indptr))
        entries = composed[outputs].tocoo()
        channel, offset = np.divmod(entries.col, area)
        first = np.full(len(outputs), n_channels)
        np.minimum.at(first, entries.row, channel)
        span = int((channel - first[entries.row]).max()) + 1
        weight = np.zeros((len(outputs), span, patch_size, patch_size))
        np.add.at(weight, (entries.row, channel - first[entries.row], *np.divmod(offset, patch_size)), entries.data)
        gather = np.minimum(first[:, None] + np.arange(span), n_channels - 1).ravel()
        identity = np.array_equal(gather, np.arange(n_channels))
        plan.append((torch.from_numpy(outputs), None if identity else torch.from_numpy(gather),
                     torch.from_numpy(weight).float()))
    return plan


def aggregate_official(
    layer_maps: Sequence[torch.Tensor], patch_size: int, pretrain_embed_dim: int, target_embed_dim: int
) -> torch.Tensor:
    """The official ``patchcore-inspection`` patch embedding.

    Each layer is unfolded into ``patch_size x patch_size`` neighbourhoods
    (zero padded, stride 1); every flattened ``(channels, p, p)`` neighbourhood
    is adaptively average-pooled to ``pretrain_embed_dim`` values; deeper
    layers are bilinearly upsampled to the first layer's grid; the per-layer
    vectors are concatenated and adaptively average-pooled to
    ``target_embed_dim``.

    Computed without unfolding: the two poolings compose into one sparse
    linear map per layer, which is a grouped ``patch_size x patch_size``
    convolution over a few consecutive channels per output (see
    ``_official_plan``); and since pooling acts on channels and bilinear
    upsampling on positions, deeper layers are upsampled after pooling, on
    their share of the ``target_embed_dim`` outputs. Same numbers as the
    literal steps up to float rounding (tested), several times faster
    (``docs/archive/benchmarks-notebook.md``).

    Parameters
    ----------
    layer_maps : sequence of Tensor of shape (batch, channels, h, w)
    patch_size : int
    pretrain_embed_dim : int
    target_embed_dim : int

    Returns
    -------
    features : Tensor of shape (batch, h0, w0, target_embed_dim)
    """
    batch, _, ref_h, ref_w = layer_maps[0].shape
    channels = tuple(int(layer_map.shape[1]) for layer_map in layer_maps)
    plan = _official_plan(channels, patch_size, pretrain_embed_dim, target_embed_dim)
    features = layer_maps[0].new_zeros(batch, ref_h, ref_w, target_embed_dim)
    for layer_map, (outputs, gather, weight) in zip(layer_maps, plan):
        device = layer_map.device
        if gather is not None:
            layer_map = layer_map.index_select(1, gather.to(device))
        pooled = F.conv2d(layer_map, weight.to(device, layer_map.dtype), padding=patch_size // 2, groups=len(outputs))
        if pooled.shape[-2:] != (ref_h, ref_w):
            pooled = F.interpolate(pooled, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
        features.index_add_(3, outputs.to(device), pooled.permute(0, 2, 3, 1).to(features.dtype))
    return features


def aggregate_concat(layer_maps: Sequence[torch.Tensor], patch_size: int) -> torch.Tensor:
    """anomalib-style patch embedding: local average, upsample, concatenate.

    Each layer is average-pooled over ``patch_size x patch_size``
    neighbourhoods (stride 1, zero padding counted), deeper layers are
    bilinearly upsampled to the first layer's grid and all channels are
    concatenated (1536 dimensions for WRN50 layer2 + layer3).

    Returns
    -------
    features : Tensor of shape (batch, h0, w0, sum of channels)
    """
    ref_h, ref_w = layer_maps[0].shape[-2:]
    pooled = []
    for layer_map in layer_maps:
        smoothed = F.avg_pool2d(layer_map, patch_size, stride=1, padding=(patch_size - 1) // 2)
        if smoothed.shape[-2:] != (ref_h, ref_w):
            smoothed = F.interpolate(smoothed, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
        pooled.append(smoothed)
    return torch.cat(pooled, dim=1).permute(0, 2, 3, 1)


class PatchFeatureTransformer(DocLinkMixin, VersionedStateMixin, TransformerMixin, BaseEstimator):
    """Locally aware patch features of images from a pretrained CNN.

    Images are resized (and by default centre-cropped), normalised and passed
    through the backbone up to the last requested layer. Every feature-map
    position becomes a patch vector that aggregates its 3x3 neighbourhood,
    with deeper layers upsampled to the first layer's grid (PatchCore [1]_,
    section 3.1). With torchvision backbones the default is
    the official ``patchcore-inspection`` recipe; EfficientNets get the
    recipe measured best for them (``aggregation="auto"``, ``mean="auto"``).

    Parameters
    ----------
    backbone : str or nn.Module, default="wide_resnet50_2"
        A torchvision model name, ``"timm:<name>"`` for a timm model (extra
        ``skpatchcore[timm]``), or a module.
    layers : tuple of str, default=("layer2", "layer3")
        Module names (``named_modules()``) whose outputs are used; the first
        sets the patch grid.
    weights : str, path-like or None, default="IMAGENET1K_V1"
        Pretrained weights: a torchvision weights name (``"IMAGENET1K_V1"``,
        the weights used by the paper, or ``"DEFAULT"``), ``None`` for random
        initialisation, or a path to a local state-dict file (for machines
        without network access). Named weights download on first use through
        torchvision's / timm's own cache.
    resize : int or "auto", default="auto"
        With ``crop_size`` set, the shorter image side is resized to this
        length before the centre crop. With ``crop_size=None`` images are
        resized to ``resize x resize`` without cropping (keeps defects at the
        border of non-square parts). ``"auto"`` follows ``recipe``.
    crop_size : int, None or "auto", default="auto"
        Side of the centre crop; None for no crop. ``"auto"`` follows
        ``recipe``.
    interpolation : {"auto", "bilinear", "bicubic", "nearest", "lanczos"}, default="auto"
        PIL resampling filter of the resize. ``"auto"`` follows ``recipe``.
    mean, std : tuple of 3 floats or "auto", default="auto"
        Normalisation of the RGB channels. ``"auto"`` takes what the
        backbone's pretrained weights expect: timm's ``pretrained_cfg``
        (mean = std = 0.5 for the TensorFlow-ported EfficientNet-Lite
        checkpoints), else ImageNet's statistics (torchvision's weights, and
        the official recipe with WideResNet-50). Under ``recipe="official"``
        ImageNet's statistics for every backbone.
    recipe : {"recommended", "official"}, default="recommended"
        What every ``"auto"`` parameter resolves to. Explicit values always
        win.

        - ``"official"``: the ``patchcore-inspection`` code's MVTec recipe
          for every backbone: resize 256, centre crop 224, bilinear,
          ImageNet statistics, ``aggregation="mean_pool"``.
        - ``"recommended"``: for EfficientNets the recipe measured best
          without the test split (see the benchmarks): the checkpoint's own
          input size (224 / 240 / 260 px for Lite0 / 1 / 2), square resize
          without a crop (a centre crop cuts away defects at the border of
          non-square parts), the checkpoint's filter (bicubic) and input
          scaling, ``aggregation="concat"``. For every other backbone the
          official recipe (the paper's, for WideResNet-50), except that
          ``mean="auto"`` takes a timm checkpoint's own statistics. With
          parts whose defects can touch the border, pass ``crop_size=None``
          (and e.g. ``resize=224``).
    patch_size : int, default=3
        Side of the neighbourhood aggregated into each patch feature.
    scales : tuple of float, default=(1.0,)
        Input scales whose features are concatenated per patch. Each image
        is also resized (and cropped) to ``round(scale * size)`` for every
        further scale, its patch features are resampled (bilinear,
        antialiased when shrinking) onto the grid of the first scale, which
        must be 1.0, and appended to the feature vector: ``(1.0, 0.7)``
        adds features of a coarser view of each image at about 1.5 times
        the backbone cost and twice the feature dimension. Not in the
        paper: a documented deviation (``docs/algorithm.rst``; measured in
        the benchmarks).
    pretrain_embed_dim : int, default=1024
        Per-layer dimension after pooling (``aggregation="mean_pool"``).
    target_embed_dim : int, default=1024
        Output dimension (``aggregation="mean_pool"``).
    aggregation : {"auto", "mean_pool", "concat"}, default="auto"
        ``"mean_pool"`` is the official recipe (see :func:`aggregate_official`).
        ``"auto"`` follows ``recipe``: under ``"recommended"``, ``"concat"``
        for EfficientNets (measured ahead of ``"mean_pool"`` on real and on
        synthetic defects, see the benchmarks) and ``"mean_pool"`` for every
        other backbone (the paper's, for WideResNet-50).
        ``"concat"`` is anomalib's: 3x3 average, upsample, concatenate all
        channels (embedding dimensions are ignored). A documented deviation.
    device : str, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    batch_size : int, default=8
        Images per forward pass.
    n_jobs : int or None, default=None
        torch threads of the forward passes (scikit-learn style: -1 all
        cores); None leaves torch's setting.
    progress : bool, default=False
        Show a progress bar.
    random_state : int, RandomState instance or None, default=None
        Seeds the random initialisation of a backbone built with
        ``weights=None`` (in a forked torch RNG, so the global state is left
        alone); no effect on pretrained weights. An int is the torch seed
        itself; a ``RandomState`` instance gives a seed drawn from it at each
        ``fit``.
    exif_transpose : bool, default=True
        Turn image files upright by their EXIF orientation tag (as image
        viewers show them) before resizing. Arrays are used as they are.
    tile_size : int or None, default=None
        None: every image is resized to the backbone input as a whole (the
        paper's way). An int: every image is cut into ``tile_size x
        tile_size`` pixel tiles (after ``tile_scale``), and every tile is
        one backbone input, as an untiled image of that size would be;
        ``resize`` and ``crop_size`` are not used. Each image gets its own
        grid; an image smaller than a tile along an axis is padded there by
        repeating its edge pixels (see :mod:`skpatchcore.tiling`).
        :meth:`transform` then returns one feature grid per tile, all tiles
        of the first image first; :class:`~skpatchcore.PatchCorePipeline`
        scores an image by its most anomalous patch over all its tiles and
        stitches its map at the image's own size. Not in the paper: a
        documented option (``docs/large_images.rst``).
    tile_overlap : float, default=0.0
        Fraction of a tile shared with each neighbour, in ``[0, 1)``;
        overlapping maps are blended (:func:`skpatchcore.tiling.blend_weights`).
    tile_scale : float, default=1.0
        Factor by which images are resized before they are cut into tiles
        (1.0: native resolution; 0.5: half the pixels along each side).

    Attributes
    ----------
    backbone_ : nn.Module
        Maps a batch of images to the list of layer outputs. For backbones
        that ``torch.fx`` can trace (torchvision's ResNets among them) a
        ``GraphModule`` holding only the operations those layers need, so a
        saved model loads without importing torchvision; otherwise
        :class:`~skpatchcore.backbones.HookedLayers` around the backbone, with
        modules that never run replaced by ``nn.Identity``
        (see :func:`~skpatchcore.backbones.layer_extractor`).
    feature_shape_ : tuple of int
        ``(h, w, n_dims)`` of one image's output.
    input_size_ : tuple of int
        ``(height, width)`` of the images (or tiles) the backbone sees.
    resize_ : int
    crop_size_ : int or None
    interpolation_ : str
        The input geometry used (``resize``, ``crop_size`` and
        ``interpolation`` with ``"auto"`` resolved).
    aggregation_ : str
        ``"mean_pool"`` or ``"concat"`` (``aggregation`` with ``"auto"`` resolved).
    mean_, std_ : tuple of 3 floats
        The normalisation used (``mean`` and ``std`` with ``"auto"`` resolved).

    See Also
    --------
    CoresetSampler : Chooses the memory bank among these patch features.
    make_patchcore : The pipeline of this transformer, the coreset and the
        detector.
    torchvision.models.feature_extraction.create_feature_extractor : The
        ``torch.fx`` extraction of intermediate layers that ``backbone_``
        follows.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
       https://arxiv.org/abs/2106.08265

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchFeatureTransformer
    >>> images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    >>> features = PatchFeatureTransformer(backbone="resnet18", weights=None,
    ...     resize=64, crop_size=None).fit_transform(images)
    >>> features.shape
    (2, 8, 8, 1024)
    """

    def __init__(
        self,
        backbone="wide_resnet50_2",
        layers=("layer2", "layer3"),
        weights="IMAGENET1K_V1",
        resize="auto",
        crop_size="auto",
        interpolation="auto",
        mean="auto",
        std="auto",
        recipe="recommended",
        patch_size=3,
        scales=(1.0,),
        pretrain_embed_dim=1024,
        target_embed_dim=1024,
        aggregation="auto",
        device="auto",
        batch_size=8,
        n_jobs=None,
        progress=False,
        random_state=None,
        exif_transpose=True,
        tile_size=None,
        tile_overlap=0.0,
        tile_scale=1.0,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.resize = resize
        self.crop_size = crop_size
        self.interpolation = interpolation
        self.mean = mean
        self.std = std
        self.recipe = recipe
        self.patch_size = patch_size
        self.scales = scales
        self.pretrain_embed_dim = pretrain_embed_dim
        self.target_embed_dim = target_embed_dim
        self.aggregation = aggregation
        self.device = device
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.progress = progress
        self.random_state = random_state
        self.exif_transpose = exif_transpose
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_scale = tile_scale

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "layers": [tuple, list],
        "weights": [str, os.PathLike, None],
        "resize": [StrOptions({"auto"}), positive_int()],
        "crop_size": [StrOptions({"auto"}), positive_int(), None],
        "interpolation": [StrOptions({"auto", *INTERPOLATIONS})],
        "mean": [StrOptions({"auto"}), "array-like"],
        "std": [StrOptions({"auto"}), "array-like"],
        "recipe": [StrOptions(set(RECIPES))],
        "patch_size": [positive_int()],
        "scales": [tuple, list],
        "pretrain_embed_dim": [positive_int()],
        "target_embed_dim": [positive_int()],
        "aggregation": [StrOptions({"auto", *AGGREGATIONS})],
        "device": DEVICE,
        "batch_size": [positive_int()],
        "n_jobs": N_JOBS,
        "progress": ["boolean"],
        "random_state": ["random_state"],
        "exif_transpose": ["boolean"],
        "tile_size": [positive_int(), None],
        "tile_overlap": [NumberInterval(Real, 0, 1, closed="left")],
        "tile_scale": [NumberInterval(Real, 0, None, closed="neither")],
    }

    def _check_param_values(self) -> None:
        """What the constraints cannot say: names of layers, an odd patch size, the scales."""
        if len(self.layers) == 0 or not all(isinstance(layer, str) for layer in self.layers):
            raise ValueError(f"layers must be a non-empty tuple of layer names, got {self.layers!r}.")
        if self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd, got {self.patch_size}.")
        _check_scales(self.scales)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Build the backbone and record the output shape.

        No statistics are learned from ``X``; it is accepted (and may be
        ``None``) so that the transformer fits in a ``Pipeline``.

        Returns
        -------
        self : PatchFeatureTransformer
        """
        self._check_param_values()
        model = self.backbone
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            if self.random_state is not None:
                torch.manual_seed(int_seeds(self.random_state, 1)[0])
            model = build_backbone(model, self.weights)
        self.mean_, self.std_ = self._normalization(model)
        self.aggregation_ = self._resolved_aggregation(model)
        self.resize_, self.crop_size_, self.interpolation_ = self._geometry(model)
        if self.tile_size is not None:  # every tile is seen as it is: no resize, no crop
            self.resize_, self.crop_size_ = int(self.tile_size), None
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # NHWC convolutions: faster on CPU (oneDNN) for ResNets and EfficientNets (docs/archive/benchmarks-notebook.md).
        model = model.to(memory_format=torch.channels_last)
        side = self.crop_size_ or self.resize_
        self.input_size_ = (side, side)
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, side, side, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            prune_unused_modules(model, probe, self.layers)
            probes = [probe] + [self._scale_probe(model, crop_size or resize, generator)
                                for resize, crop_size in self._geometries()[1:]]
            self.backbone_ = layer_extractor(model, self.layers, probes)
            features = self._aggregate(self.backbone_(probe))
        height, width, n_dims = (int(s) for s in features.shape[1:])
        self.feature_shape_ = (height, width, n_dims * len(self.scales))
        return self

    def _geometries(self) -> list[tuple[int, int | None]]:
        """``(resize, crop_size)`` of each scale; the first is the model's own."""
        return [(max(1, round(scale * self.resize_)),
                 None if self.crop_size_ is None else max(1, round(scale * self.crop_size_)))
                for scale in self.scales]

    def _scale_probe(self, model: nn.Module, side: int, generator: torch.Generator) -> torch.Tensor:
        """A probe image of a further scale's `side`; refuses at fit time a side the backbone cannot take."""
        probe = torch.randn(2, 3, side, side, generator=generator).contiguous(memory_format=torch.channels_last)
        try:
            self._aggregate(extract_layers(model, probe, self.layers))
        except RuntimeError as error:
            raise ValueError(f"scales={self.scales!r}: the backbone cannot take a {side} x {side} input "
                             f"({error}). Use larger scales or a larger resize.") from error
        return probe

    def _is_efficientnet(self, model: nn.Module) -> bool:
        name = self.backbone if isinstance(self.backbone, str) else type(model).__name__
        return "efficientnet" in name.lower()

    def _recommended_for_efficientnet(self, model: nn.Module) -> bool:
        return self.recipe == "recommended" and self._is_efficientnet(model)

    def _resolved_aggregation(self, model: nn.Module) -> str:
        if self.aggregation != "auto":
            return self.aggregation
        return "concat" if self._recommended_for_efficientnet(model) else "mean_pool"

    def _geometry(self, model: nn.Module) -> tuple[int, int | None, str]:
        """``resize``, ``crop_size`` and ``interpolation`` with ``"auto"`` resolved by the recipe."""
        if self._recommended_for_efficientnet(model):
            side, filter_name = native_input(model)
            recipe_resize, recipe_crop, recipe_filter = side, None, filter_name
        else:
            recipe_resize, recipe_crop, recipe_filter = OFFICIAL_RESIZE, OFFICIAL_CROP, OFFICIAL_INTERPOLATION
        resize = recipe_resize if _is_auto(self.resize) else int(self.resize)
        if _is_auto(self.crop_size):
            # The recipe's crop, unless an explicit resize leaves no room for it.
            crop_size = recipe_crop if recipe_crop is None or recipe_crop <= resize else None
        else:
            crop_size = None if self.crop_size is None else int(self.crop_size)
        if crop_size is not None and crop_size > resize:
            raise ValueError(f"crop_size must be None or in [1, resize={resize}], got {crop_size!r}.")
        interpolation = recipe_filter if _is_auto(self.interpolation) else self.interpolation
        return resize, crop_size, interpolation

    def _normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.recipe == "official":
            expected_mean, expected_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            expected_mean, expected_std = input_normalization(model)
        resolved = []
        for name, value, expected in (("mean", self.mean, expected_mean), ("std", self.std, expected_std)):
            if _is_auto(value):
                resolved.append(expected)
                continue
            values = np.asarray(value, dtype=float) if not isinstance(value, str) else np.array([])
            if values.shape != (3,) or not np.all(np.isfinite(values)) or (name == "std" and np.any(values <= 0)):
                raise ValueError(f"{name} must be 'auto' or 3 finite numbers{' > 0' if name == 'std' else ''}, "
                                 f"got {value!r}.")
            resolved.append(tuple(float(v) for v in values))
        return resolved[0], resolved[1]

    def _aggregate(self, layer_maps: list[torch.Tensor]) -> torch.Tensor:
        if self.aggregation_ == "concat":
            return aggregate_concat(layer_maps, self.patch_size)
        return aggregate_official(layer_maps, self.patch_size, self.pretrain_embed_dim, self.target_embed_dim)

    def _preprocess(self, image) -> np.ndarray:
        """The backbone input of one image (its first scale)."""
        return self._preprocess_views(image)[0]

    def preprocess(self, X) -> np.ndarray:
        """The backbone input of every image: resized, cropped and normalised.

        What :meth:`transform` feeds the network (at the first of
        ``scales``), for inspecting the model's view of an image or timing
        the backbone alone.

        Parameters
        ----------
        X : ndarray of shape (n_images, H, W, 3) or (n_images, H, W), or list
            Images as :meth:`transform` takes them.

        Returns
        -------
        inputs : ndarray of shape (n_images, 3, height, width), float32
            Channels first; ``(height, width)`` is ``input_size_``.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import PatchFeatureTransformer
        >>> transformer = PatchFeatureTransformer("resnet18", weights=None, resize=64, crop_size=None).fit()
        >>> transformer.preprocess(np.zeros((2, 100, 80, 3), dtype=np.uint8)).shape
        (2, 3, 64, 64)
        """
        check_is_fitted(self, "backbone_")
        return np.stack([self._preprocess(image) for image in as_image_list(X)])

    def _preprocess_views(self, image) -> list[np.ndarray]:
        """The backbone inputs of one image, one per scale (the file read once)."""
        return preprocess_image_geometries(
            image, self._geometries(), self.interpolation_, self.mean_, self.std_, self.exif_transpose
        )

    def _features(self, model: nn.Module, views: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Patch features of a batch seen at every scale, concatenated on the first scale's grid."""
        parts = []
        for view in views:
            tensor = torch.from_numpy(view).to(device).contiguous(memory_format=torch.channels_last)
            with reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
                features = self._aggregate(model(tensor))
            if parts and features.shape[1:3] != parts[0].shape[1:3]:
                grid = tuple(parts[0].shape[1:3])
                shrink = features.shape[1] > grid[0] or features.shape[2] > grid[1]
                features = F.interpolate(features.permute(0, 3, 1, 2), size=grid, mode="bilinear",
                                         align_corners=False, antialias=shrink).permute(0, 2, 3, 1)
            parts.append(features)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    # ---------------------------------------------------------------- tiles
    @property
    def tiled(self) -> bool:
        """Whether images are cut into tiles (``tile_size`` is set)."""
        return self.tile_size is not None

    def tile_layout(self, image) -> TileLayout:
        """The tile grid of one image (a path or an array), from its size alone.

        Parameters
        ----------
        image : str, path-like or ndarray

        Returns
        -------
        layout : TileLayout
            See :func:`skpatchcore.tiling.tile_layout`.
        """
        if self.tile_size is None:
            raise ValueError("tile_layout needs a transformer with tile_size set; this one sees whole images.")
        return tile_layout(image_size(image, self.exif_transpose), self.tile_size, self.tile_overlap,
                           self.tile_scale)

    def iter_tiles(self, X, chunk_tiles: int):
        """Patch features of every tile of every image, ``chunk_tiles`` tiles at a time.

        Each image is decoded once (see :func:`skpatchcore.io.images.tile_pixels`)
        and only its tiles' features are kept, so memory holds one image's
        pixels and one chunk of tile features however large the images are.

        Parameters
        ----------
        X : images
            As accepted by :meth:`transform`.
        chunk_tiles : int
            Tiles per yielded chunk (the last may have fewer); a chunk can
            hold tiles of several images.

        Yields
        ------
        tile_image : ndarray of shape (n_chunk,)
            Position in ``X`` of each tile's image.
        origins : ndarray of shape (n_chunk, 2)
            ``(top, left)`` of each tile in its (scaled) image.
        features : ndarray of shape (n_chunk, h, w, n_dims), float32
        """
        check_is_fitted(self, "backbone_")
        if self.tile_size is None:
            raise ValueError("iter_tiles needs a transformer with tile_size set; this one sees whole images.")
        images = as_image_list(X)
        device = resolve_device(self.device)
        model = self.backbone_.to(device)
        chunk_tiles = max(1, int(chunk_tiles))
        pending_image, pending_origin, pending_views = [], [], []
        # One chunk's features, written in place batch by batch (never held twice).
        chunk_image = np.empty(chunk_tiles, dtype=np.int64)
        chunk_origin = np.empty((chunk_tiles, 2), dtype=np.int64)
        chunk_features, filled = None, 0

        def run_batch():
            nonlocal chunk_features, filled
            views = [np.stack(view) for view in zip(*pending_views)]
            with torch.inference_mode():
                features = self._features(model, views, device).float().cpu().numpy()
            if chunk_features is None:
                chunk_features = np.empty((chunk_tiles, *features.shape[1:]), dtype=np.float32)
            stop = filled + len(features)
            chunk_features[filled:stop], chunk_image[filled:stop], chunk_origin[filled:stop] = (
                features, pending_image, pending_origin)
            filled = stop
            pending_image.clear(), pending_origin.clear(), pending_views.clear()

        def chunk():
            nonlocal chunk_features, filled
            result = chunk_image[:filled].copy(), chunk_origin[:filled].copy(), chunk_features[:filled]
            chunk_features, filled = None, 0
            return result

        with torch_threads(self.n_jobs):
            for index, image in enumerate(tqdm(images, desc="Tiles", unit="image", disable=not self.progress)):
                layout = self.tile_layout(image)
                pixels = tile_pixels(image, layout.scaled_size, self.interpolation_, self.exif_transpose)
                for origin in layout.origins:
                    pending_image.append(index)
                    pending_origin.append(origin)
                    pending_views.append(self._tile_views(pixels, origin))
                    if len(pending_views) >= min(self.batch_size, chunk_tiles - filled):
                        run_batch()
                    if filled == chunk_tiles:
                        yield chunk()
                del pixels
            if pending_views:
                run_batch()
            if filled:
                yield chunk()

    def _tile_views(self, pixels: np.ndarray, origin) -> list[np.ndarray]:
        """The backbone inputs of one tile (one per scale); edge pixels repeated past the image."""
        top, left = (int(v) for v in origin)
        side = int(self.tile_size)
        tile = pixels[top:top + side, left:left + side]
        missing = (side - tile.shape[0], side - tile.shape[1])
        if missing != (0, 0):
            tile = np.pad(tile, [(0, missing[0]), (0, missing[1])] + [(0, 0)] * (tile.ndim - 2), mode="edge")
        return preprocess_image_geometries(tile, self._geometries(), self.interpolation_, self.mean_, self.std_,
                                           exif_transpose=False)

    def transform(self, X) -> np.ndarray:
        """Compute patch features.

        Parameters
        ----------
        X : ndarray of shape (n_images, H, W, 3) or (n_images, H, W), or list
            uint8 (0-255), uint16 (0-65535) or float (0-1) images, a list of
            arrays of differing sizes, or a list of image file paths
            (8-bit, 16-bit and 32-bit; see :mod:`skpatchcore.io.images` for
            how pixel values are scaled).

        Returns
        -------
        features : ndarray of shape (n_images, h, w, n_dims), float32
            One feature vector per patch; written once into a pre-allocated
            array. With ``tile_size`` set, shape ``(n_tiles, h, w, n_dims)``:
            the tiles of every image in turn (see :meth:`tile_layout`).
        """
        check_is_fitted(self, "backbone_")
        images = as_image_list(X)
        if self.tile_size is not None:
            n_tiles = sum(self.tile_layout(image).n_tiles for image in images)
            output = np.empty((n_tiles, *self.feature_shape_), dtype=np.float32)
            start = 0
            for _, _, features in self.iter_tiles(images, max(1, self.batch_size)):
                output[start:start + len(features)] = features
                start += len(features)
            return output
        device = resolve_device(self.device)
        model = self.backbone_.to(device)
        output = np.empty((len(images), *self.feature_shape_), dtype=np.float32)
        starts = range(0, len(images), self.batch_size)
        with torch_threads(self.n_jobs):
            for start in tqdm(starts, desc="Patch features", unit="batch", disable=not self.progress):
                stop = min(start + self.batch_size, len(images))
                per_image = [self._preprocess_views(image) for image in images[start:stop]]
                views = [np.stack(view) for view in zip(*per_image)]  # one batch per scale
                with torch.inference_mode():
                    output[start:stop] = self._features(model, views, device).float().cpu().numpy()
        return output

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        if "backbone_" in state:
            # A CPU copy for the pickle: the live network stays where it is (on the GPU).
            state["backbone_"] = cpu_copy(state["backbone_"])
        return state


def _check_scales(scales) -> None:
    """``scales``: a non-empty tuple of positive finite numbers whose first is 1.0."""
    valid = (isinstance(scales, (tuple, list)) and len(scales) > 0
             and all(isinstance(s, numbers.Real) and not isinstance(s, bool) and np.isfinite(s) and s > 0
                     for s in scales))
    if not valid or float(scales[0]) != 1.0:
        raise ValueError(f"scales must be a tuple of positive numbers whose first is 1.0 (the model's own "
                         f"input size), e.g. (1.0,) or (1.0, 0.7); got {scales!r}.")


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"
