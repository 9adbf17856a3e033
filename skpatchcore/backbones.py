"""Backbone construction, weight loading and truncated forward passes.

A backbone is a torchvision model name, a timm model name (``"timm:<name>"``
or any name timm knows that torchvision does not), or an ``nn.Module``.
Intermediate layers are read with forward hooks; the forward pass stops as
soon as every requested layer has produced its output, so later layers are
never computed, and modules that never run are replaced by ``nn.Identity``
to keep saved models small. :func:`layer_extractor` then turns the network
into a module that returns the requested layers: a ``torch.fx`` graph of only
the operations they need where the network can be traced (no torchvision or
timm classes left, so a saved model loads without importing them), else the
network wrapped with the hooks.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .io.images import IMAGENET_MEAN, IMAGENET_STD
from .weights import PYPI_WEIGHTS

_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class _AllLayersCaptured(Exception):
    """Raised inside the forward pass once every requested layer is captured."""


def _is_weights_path(weights) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    text = str(weights)
    return os.sep in text or text.lower().endswith(_WEIGHT_FILE_SUFFIXES) or Path(text).is_file()


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models())


def _download_hint(name: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"Could not download pretrained weights for {name!r} ({type(error).__name__}: "
        f"{error}). Without network access pass a local state-dict file: "
        "weights='/path/to/weights.pth' (or --weights PATH on the command line)."
    )


def _build_timm(name: str, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"Backbone {name!r} needs timm: pip install 'skpatchcore[timm]'."
        ) from error
    if not timm.is_model(name):
        raise ValueError(f"Unknown timm backbone {name!r}.")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as error:  # network / hub failures come in many types
        if pretrained:
            raise _download_hint(name, error) from error
        raise


def _build_torchvision(name: str, weights) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:
        if weights is not None and ("urlopen" in repr(error) or isinstance(error, OSError)):
            raise _download_hint(name, error) from error
        raise
    except ValueError as error:
        raise ValueError(f"Invalid weights {weights!r} for backbone {name!r}: {error}") from error


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state-dict file into ``model`` (strict key and shape match).

    Parameters
    ----------
    model : nn.Module
        The freshly built backbone.
    path : str or path-like
        ``.pth``/``.pt`` file saved with ``torch.save(model.state_dict())`` or
        a ``.safetensors`` file. A checkpoint dict holding ``"state_dict"`` or
        ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"Weights file {path} does not match the backbone architecture: {error}"
        ) from error


def build_backbone(backbone: str | nn.Module, weights) -> nn.Module:
    """Create the backbone network in evaluation mode.

    Parameters
    ----------
    backbone : str or nn.Module
        torchvision model name (e.g. ``"wide_resnet50_2"``), ``"timm:<name>"``
        (or a bare timm name unknown to torchvision), or a module to use as-is.
    weights : str, path-like or None
        ``None``: random initialisation. A torchvision weights name such as
        ``"IMAGENET1K_V1"`` or ``"DEFAULT"`` (for timm any name means timm's
        default pretrained weights); these download through the framework's
        own cache. A path to a local state-dict file is loaded strictly.
        ``"pypi"``: the ImageNet weights of EfficientNet-Lite0/1/2 from their
        PyPI packages (:mod:`skpatchcore.weights`).

    Returns
    -------
    model : nn.Module
    """
    if weights == PYPI_WEIGHTS:
        return _build_from_weight_package(backbone)
    if isinstance(backbone, nn.Module):
        model = backbone
        if weights is not None and _is_weights_path(weights):
            load_state_dict_file(model, weights)
        return model.eval()
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a model name or an nn.Module, got {type(backbone).__name__}.")
    from_file = weights is not None and _is_weights_path(weights)
    name = backbone
    if name.startswith("timm:"):
        model = _build_timm(name[len("timm:"):], pretrained=weights is not None and not from_file)
    elif name in _torchvision_names():
        model = _build_torchvision(name, None if (weights is None or from_file) else weights)
    else:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is None or not timm.is_model(name):
            raise ValueError(
                f"Unknown backbone {name!r}: not a torchvision model"
                + (" nor a timm model." if timm else " (and timm is not installed).")
            )
        model = _build_timm(name, pretrained=weights is not None and not from_file)
    if from_file:
        load_state_dict_file(model, weights)
    return model.eval()


def _build_from_weight_package(backbone) -> nn.Module:
    from .weights import lite_package_file, load_lite_package_weights

    if not isinstance(backbone, str):
        raise ValueError(
            f"weights='pypi' needs a backbone name such as 'timm:tf_efficientnet_lite0', not a "
            f"{type(backbone).__name__} module."
        )
    path = lite_package_file(backbone)  # names the backbones it is available for
    model = _build_timm(backbone.removeprefix("timm:"), pretrained=False)
    model.load_state_dict(load_lite_package_weights(backbone, path, model), strict=True)
    return model.eval()


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std a backbone's pretrained weights expect.

    timm models carry them in ``pretrained_cfg`` (TensorFlow-ported
    checkpoints such as ``tf_efficientnet_lite0`` expect mean = std = 0.5);
    every other model gets ImageNet's statistics, which torchvision's
    weights use.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    mean, std : tuple of 3 floats
    """
    config = getattr(model, "pretrained_cfg", None) or {}
    mean, std = config.get("mean"), config.get("std")
    if mean is not None and std is not None and len(mean) == len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def native_input(model: nn.Module, default_side: int = 224, default_filter: str = "bicubic") -> tuple[int, str]:
    """The square input side and resampling filter a backbone's checkpoint was trained with.

    Read from timm's ``pretrained_cfg`` (``input_size`` and
    ``interpolation``: 224 / 240 / 260 px, bicubic, for
    ``tf_efficientnet_lite0`` / ``1`` / ``2``); models without it get the
    defaults.

    Parameters
    ----------
    model : nn.Module
    default_side : int, default=224
    default_filter : str, default="bicubic"

    Returns
    -------
    side : int
    interpolation : str
        One of ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"lanczos"``.
    """
    config = getattr(model, "pretrained_cfg", None) or {}
    size = config.get("input_size")
    side = int(size[-1]) if size is not None and len(size) == 3 and size[-1] == size[-2] else default_side
    interpolation = config.get("interpolation")
    if interpolation not in ("nearest", "bilinear", "bicubic", "lanczos"):
        interpolation = default_filter
    return side, interpolation


def _find_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"Layer {layer!r} not found in the backbone; top-level modules are {top}. "
            "Nested layers use dots, e.g. 'blocks.2'."
        )
    return modules[layer]


def extract_layers(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """Run ``model`` on ``images`` until all ``layers`` have produced outputs.

    Parameters
    ----------
    model : nn.Module
    images : Tensor of shape (batch, 3, height, width)
    layers : sequence of str
        Module names as in ``model.named_modules()``.

    Returns
    -------
    outputs : list of Tensor
        One ``(batch, channels, h, w)`` tensor per layer, in ``layers`` order.

    Notes
    -----
    Safe to call from several threads on one model: the hooks this call
    registers ignore forward passes run by other threads.
    """
    outputs: dict[str, torch.Tensor] = {}
    wanted = set(layers)
    caller = threading.get_ident()

    def make_hook(name):
        def hook(module, inputs, output):
            # Hooks sit on the shared network: another thread's forward pass fires them too.
            if threading.get_ident() != caller:
                return
            outputs[name] = output
            if wanted.issubset(outputs):
                raise _AllLayersCaptured

        return hook

    handles = [_find_module(model, name).register_forward_hook(make_hook(name)) for name in layers]
    try:
        model(images)
    except _AllLayersCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = wanted.difference(outputs)
    if missing:
        raise ValueError(f"Layers {sorted(missing)} produced no output in the forward pass.")
    for name in layers:
        if not isinstance(outputs[name], torch.Tensor) or outputs[name].ndim != 4:
            raise ValueError(f"Layer {name!r} must output a (batch, channels, h, w) tensor.")
    return [outputs[name] for name in layers]


def prune_unused_modules(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> int:
    """Replace every module that never runs before the last layer by ``nn.Identity``.

    Returns
    -------
    n_pruned : int
        How many modules were replaced.
    """
    started: set[int] = set()
    handles = [
        module.register_forward_pre_hook(lambda m, _inputs: started.add(id(m)))
        for module in model.modules()
    ]
    try:
        extract_layers(model, images, layers)
    finally:
        for handle in handles:
            handle.remove()
    n_pruned = 0
    for parent in list(model.modules()):
        if id(parent) not in started:
            continue
        for child_name, child in list(parent.named_children()):
            has_parameters = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if id(child) not in started and has_parameters:
                setattr(parent, child_name, nn.Identity())
                n_pruned += 1
    return n_pruned


class TracingFallbackWarning(UserWarning):
    """``torch.fx`` could not trace a backbone: its layers are captured by forward hooks instead."""


class HookedLayers(nn.Module):
    """A network wrapped to return the outputs of ``layers`` (read by hooks).

    Parameters
    ----------
    network : nn.Module
    layers : sequence of str
    """

    def __init__(self, network: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.network = network
        self.layers = tuple(layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return extract_layers(self.network, images, self.layers)


class _LayerOutputTracer(torch.fx.Tracer):
    """Symbolic tracer that remembers the first output of each named module."""

    def __init__(self, layers: Sequence[str]):
        super().__init__()
        self.layers = set(layers)
        self.outputs: dict[str, torch.fx.Proxy] = {}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        # Convolutions that pad from the input size (timm's TF "same") stay
        # whole here and are specialised afterwards (_fix_input_size_padding).
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        result = super().call_module(module, forward, args, kwargs)
        name = self.path_of_module(module)
        if name in self.layers and name not in self.outputs:
            self.outputs[name] = result
        return result


def _trace_layers(network: nn.Module, layers: Sequence[str]) -> torch.fx.GraphModule:
    tracer = _LayerOutputTracer(layers)
    graph = tracer.trace(network)
    if set(tracer.outputs) != set(layers) or not all(isinstance(tracer.outputs[n], torch.fx.Proxy) for n in layers):
        raise ValueError("layers not traced")
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = ([tracer.outputs[name].node for name in layers],)
    graph._tracer_cls = None  # unpickling re-traces the code with fx's plain Tracer
    traced = torch.fx.GraphModule(tracer.root, graph, class_name="BackboneLayers")
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _fix_input_size_padding(traced: torch.fx.GraphModule, images: torch.Tensor) -> None:
    """Replace ``Conv2d`` subclasses by zero padding + ``nn.Conv2d`` for this input size.

    TensorFlow-style "same" convolutions (timm's ``Conv2dSame``) compute their
    padding from the input size in Python. The transformer always feeds the
    same size, so each becomes a fixed ``nn.ZeroPad2d`` + ``nn.Conv2d``,
    kept only where it gives exactly the same output on the probe.
    """
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0]))
        for name, module in traced.named_modules()
        if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d
    ]
    try:
        with torch.inference_mode():
            traced(images)
    finally:
        for handle in handles:
            handle.remove()
    for name, x in inputs.items():
        module = traced.get_submodule(name)
        (top, bottom), (left, right) = (
            _same_padding(x.shape[axis], module.kernel_size[i], module.stride[i], module.dilation[i])
            for i, axis in enumerate((2, 3))
        )
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                         module.dilation, module.groups, module.bias is not None)
        conv.load_state_dict(module.state_dict())
        replacement = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv).eval()
        replacement = replacement.to(module.weight.device, memory_format=torch.channels_last)
        with torch.inference_mode():
            if torch.equal(replacement(x), module(x)):
                traced.set_submodule(name, replacement)


def layer_extractor(
    network: nn.Module, layers: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]
) -> nn.Module:
    """A module mapping images to the list of ``layers`` outputs.

    Tries a ``torch.fx`` symbolic trace that keeps only the operations the
    layers depend on; convolutions that pad from the input size are fixed
    for the size of the first probe (the transformer's input size). The
    trace is used only if it returns exactly (``torch.equal``) what the
    hooked network returns for every probe, so a network fed inputs of
    several sizes (``PatchFeatureTransformer(scales=...)``) whose padding
    depends on the size keeps the hooks. Networks that cannot be traced
    (Python control flow on tensor values or sizes) are wrapped in
    :class:`HookedLayers` instead, with a :class:`TracingFallbackWarning`
    that gives the tracing error.

    Parameters
    ----------
    network : nn.Module
        In evaluation mode.
    layers : sequence of str
    images : Tensor of shape (batch, 3, height, width), or a sequence of them
        Probe inputs for the equality check, one per input size the
        extractor will be fed; the first fixes the padding.

    Returns
    -------
    extractor : nn.Module
    """
    probes = [images] if isinstance(images, torch.Tensor) else list(images)
    hooked = HookedLayers(network, layers)
    try:
        traced = _trace_layers(network, layers)
        _fix_input_size_padding(traced, probes[0])
        with torch.inference_mode():
            for probe in probes:
                expected, got = hooked(probe), traced(probe)
                if len(got) != len(expected) or not all(torch.equal(a, b) for a, b in zip(expected, got)):
                    return hooked
        return traced
    except Exception as error:  # any tracing failure falls back to the hooks, and says why
        warnings.warn(
            f"torch.fx cannot trace {type(network).__name__} for the layers {list(layers)} "
            f"({type(error).__name__}: {error}); forward hooks capture them instead "
            "(the same features; a saved model then rebuilds the backbone from its name).",
            TracingFallbackWarning,
            stacklevel=2,
        )
    return hooked


def cpu_copy(module: nn.Module) -> nn.Module:
    """`module` with every tensor on the CPU, without moving `module` itself.

    A module already on the CPU is returned as it is (pickling does not
    change it). Otherwise the module is deep-copied with each parameter and
    buffer replaced by a CPU copy of it, so that the copy never needs a
    second copy of the weights on the GPU.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return module
    memo = {}
    for tensor in tensors:
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = nn.Parameter(cpu, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else cpu
    copied = copy.deepcopy(module, memo)
    return copied.to("cpu")  # any other tensor attribute (a traced graph's constants)
