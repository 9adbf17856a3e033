"""A fitted backbone's ``torch.fx`` graph as data, rebuilt from allow-lists only.

:func:`skpatchcore.save` stores the traced backbone of a
:class:`~skpatchcore.PatchFeatureTransformer` with this description so that
:func:`skpatchcore.load` can rebuild it without importing torchvision or timm
(whose import alone costs more than a whole joblib load). Nothing in the
description is executed or imported by name:

- modules are built from a short list of ``torch.nn`` classes
  (:data:`MODULES`), each from the constructor arguments listed there;
- functions are looked up in :data:`FUNCTIONS`, tensor methods in
  :data:`METHODS`, and ``getattr`` may only read :data:`TENSOR_ATTRIBUTES`;
- node arguments are other nodes, numbers, strings, ``None``, tuples, lists,
  slices and string-keyed dicts; module paths are dotted identifiers
  without dunders.

``torch.fx`` turns the rebuilt graph into Python code, which then calls only
those functions and modules. A graph that uses anything else is not
described (:func:`describe` returns None) and the loader falls back to
rebuilding the backbone from its name.
"""

from __future__ import annotations

import builtins
import operator
import re

import torch
import torch.nn.functional as F
from torch import nn

#: Module classes and the attributes that are their constructor arguments.
MODULES: dict[str, tuple[type, tuple[str, ...]]] = {
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                           "groups", "bias", "padding_mode")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)),
    "SiLU": (nn.SiLU, ("inplace",)),
    "Hardswish": (nn.Hardswish, ("inplace",)),
    "Hardsigmoid": (nn.Hardsigmoid, ("inplace",)),
    "Sigmoid": (nn.Sigmoid, ()),
    "GELU": (nn.GELU, ("approximate",)),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "ZeroPad2d": (nn.ZeroPad2d, ("padding",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Sequential": (nn.Sequential, ()),
}
#: Functions a graph may call, by name.
FUNCTIONS = {
    "operator.add": operator.add,
    "operator.mul": operator.mul,
    "operator.eq": operator.eq,
    "operator.getitem": operator.getitem,
    "builtins.getattr": builtins.getattr,
    "torch._assert": torch._assert,
    "torch.add": torch.add,
    "torch.mul": torch.mul,
    "torch.cat": torch.cat,
    "torch.flatten": torch.flatten,
    "torch.sigmoid": torch.sigmoid,
    "F.batch_norm": F.batch_norm,
    "F.relu": F.relu,
    "F.relu6": F.relu6,
    "F.silu": F.silu,
    "F.hardswish": F.hardswish,
    "F.hardsigmoid": F.hardsigmoid,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.pad": F.pad,
}
_FUNCTION_NAMES = {id(function): name for name, function in FUNCTIONS.items()}
#: Tensor methods a graph may call.
METHODS = frozenset({"add", "mul", "sigmoid", "mean", "flatten", "view", "reshape", "contiguous", "size"})
#: Tensor attributes ``getattr`` may read.
TENSOR_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device"})
_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class _NotDescribable(Exception):
    """The graph uses something outside the allow-lists."""


def _check_path(path) -> str:
    if not isinstance(path, str) or not _PATH.match(path) or any(a.startswith("__") for a in path.split(".")):
        raise _NotDescribable(f"module path {path!r}")
    return path


# ------------------------------------------------------------------ describe


def _module_spec(module: nn.Module) -> dict:
    name = type(module).__name__
    if MODULES.get(name, (None,))[0] is not type(module):
        raise _NotDescribable(f"module class {type(module).__module__}.{name}")
    if isinstance(module, nn.Sequential):
        return {"class": name, "children": [[_check_path(k), _module_spec(child)] for k, child in module.named_children()]}
    arguments = {}
    for attribute in MODULES[name][1]:
        value = getattr(module, attribute)
        if attribute == "bias" and not isinstance(value, bool):
            value = value is not None
        arguments[attribute] = list(value) if isinstance(value, tuple) else value
    return {"class": name, "arguments": arguments}


def _argument(value, index: dict):
    if isinstance(value, torch.fx.Node):
        return {"node": index[value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_argument(v, index) for v in value]}
    if isinstance(value, list):
        return [_argument(v, index) for v in value]
    if isinstance(value, slice):
        return {"slice": [_argument(v, index) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _argument(v, index) for k, v in value.items()}}
    raise _NotDescribable(f"argument of type {type(value).__name__}")


def describe(network: nn.Module) -> dict | None:
    """The graph and module structure of a traced backbone, or None if outside the allow-lists.

    Parameters
    ----------
    network : nn.Module
        A ``torch.fx.GraphModule`` (the fitted ``backbone_``).

    Returns
    -------
    description : dict or None
        JSON-able; the weights are not included (they are the module's
        ``state_dict``).
    """
    if not isinstance(network, torch.fx.GraphModule):
        return None
    try:
        index: dict = {}
        nodes, modules = [], {}
        parameters = {name for name, _ in network.named_parameters()}
        for position, node in enumerate(network.graph.nodes):
            index[node] = position
            entry = {"op": node.op, "args": _argument(node.args, index), "kwargs": _argument(node.kwargs, index)}
            if node.op in ("call_module", "get_attr"):
                entry["target"] = _check_path(node.target)
                if node.op == "call_module":
                    modules[node.target] = _module_spec(network.get_submodule(node.target))
                else:
                    entry["parameter"] = node.target in parameters
            elif node.op == "call_function":
                name = _FUNCTION_NAMES.get(id(node.target))
                if name is None:
                    raise _NotDescribable(f"function {node.target!r}")
                if name == "builtins.getattr" and node.args[1] not in TENSOR_ATTRIBUTES:
                    raise _NotDescribable(f"getattr of {node.args[1]!r}")
                entry["target"] = name
            elif node.op == "call_method":
                if node.target not in METHODS:
                    raise _NotDescribable(f"method {node.target!r}")
                entry["target"] = node.target
            elif node.op not in ("placeholder", "output"):
                raise _NotDescribable(f"node kind {node.op!r}")
            nodes.append(entry)
        return {"nodes": nodes, "modules": modules}
    except _NotDescribable:
        return None


# ------------------------------------------------------------------ rebuild


def _build_module(spec: dict) -> nn.Module:
    name = spec["class"]
    if name not in MODULES:
        raise ValueError(f"module class {name!r} is not allowed")
    cls, allowed = MODULES[name]
    if cls is nn.Sequential:
        module = nn.Sequential()
        for child_name, child in spec["children"]:
            module.add_module(_checked(child_name), _build_module(child))
        return module
    arguments = spec["arguments"]
    if set(arguments) - set(allowed):
        raise ValueError(f"unexpected arguments {sorted(set(arguments) - set(allowed))} for {name}")
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
    if cls in (nn.Conv2d, nn.BatchNorm2d):
        # Weights on the meta device (no memory, no random init); the state dict replaces them.
        return cls(**arguments, device="meta")
    return cls(**arguments)


def _checked(path: str) -> str:
    try:
        return _check_path(path)
    except _NotDescribable as error:
        raise ValueError(f"invalid {error}") from error


def _set_path(root: nn.Module, path: str, value) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for atom in parents:
        if not hasattr(owner, atom):
            owner.add_module(atom, nn.Module())
        owner = getattr(owner, atom)
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


def rebuild(description: dict, state: dict) -> torch.fx.GraphModule:
    """The traced backbone from :func:`describe`'s description and its state dict.

    Parameters
    ----------
    description : dict
    state : dict of str to Tensor
        Loaded strictly; the tensors become the network's parameters and
        buffers (not copied).

    Returns
    -------
    network : torch.fx.GraphModule
        In evaluation mode, parameters without gradients.

    Raises
    ------
    ValueError
        If the description names anything outside the allow-lists or does not
        match the state dict.
    """
    root = nn.Module()
    for path, spec in description["modules"].items():
        _set_path(root, _checked(path), _build_module(spec))
    graph = torch.fx.Graph()
    created: list = []

    def value(item):
        if isinstance(item, list):
            return [value(v) for v in item]
        if not isinstance(item, dict):
            return item
        if "node" in item:
            return created[item["node"]]
        if "tuple" in item:
            return tuple(value(v) for v in item["tuple"])
        if "slice" in item:
            return slice(*(value(v) for v in item["slice"]))
        if "dict" in item:
            return {k: value(v) for k, v in item["dict"].items()}
        raise ValueError(f"unknown argument {sorted(item)}")

    for entry in description["nodes"]:
        op, args, kwargs = entry["op"], value(entry["args"]), value(entry["kwargs"])
        if op == "placeholder":
            node = graph.placeholder("x")
        elif op == "output":
            node = graph.output(args[0])
        elif op == "call_module":
            node = graph.call_module(_checked(entry["target"]), args, kwargs)
        elif op == "get_attr":
            target = _checked(entry["target"])
            tensor = state[target]
            _set_path(root, target, nn.Parameter(tensor, requires_grad=False) if entry["parameter"] else tensor)
            node = graph.get_attr(target)
        elif op == "call_function":
            function = FUNCTIONS[entry["target"]]
            if function is builtins.getattr and args[1] not in TENSOR_ATTRIBUTES:
                raise ValueError(f"getattr of {args[1]!r} is not allowed")
            node = graph.call_function(function, args, kwargs)
        elif op == "call_method":
            if entry["target"] not in METHODS:
                raise ValueError(f"method {entry['target']!r} is not allowed")
            node = graph.call_method(entry["target"], args, kwargs)
        else:
            raise ValueError(f"node kind {op!r} is not allowed")
        created.append(node)
    network = torch.fx.GraphModule(root, graph, class_name="BackboneLayers")
    network.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the weights
    left = [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"no saved values for {left}")
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()
