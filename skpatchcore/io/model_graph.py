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
- node arguments are other (earlier) nodes, numbers, short one-line
  printable ASCII strings, ``None``, tuples, lists, slices and dicts whose keys are
  identifiers;
- every string that ``torch.fx`` writes into the generated ``forward`` as
  code is checked with :func:`re.fullmatch` against a strict grammar:
  module paths (:func:`is_module_path`) are dotted identifiers or numbers
  without dunders or Python keywords, keyword-argument names
  (:func:`is_keyword_name`) are identifiers that are not keywords, and the
  op kind, function, method and attribute names come from the allow-lists.

``torch.fx`` turns the rebuilt graph into the Python source of ``forward``
and compiles it. Before that happens, :func:`rebuild` generates the source
itself and audits it (:func:`audit_source`): it must parse into plain
assignments of calls of modules, allow-listed functions and tensor methods,
with no other names, no dunder attributes and no ``**`` arguments. A graph
that uses anything else is not described (:func:`describe` returns None) and
the loader falls back to rebuilding the backbone from its name.
"""

from __future__ import annotations

import ast
import builtins
import keyword
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
#: Op kinds of graph nodes.
NODE_KINDS = frozenset({"placeholder", "output", "call_module", "get_attr", "call_function", "call_method"})
#: The entries a stored node of each kind has, no more and no fewer (as :func:`describe` writes them).
_COMMON_KEYS = frozenset({"op", "args", "kwargs"})
NODE_KEYS = {
    "placeholder": _COMMON_KEYS,
    "output": _COMMON_KEYS,
    "call_module": _COMMON_KEYS | {"target"},
    "get_attr": _COMMON_KEYS | {"target", "parameter"},
    "call_function": _COMMON_KEYS | {"target"},
    "call_method": _COMMON_KEYS | {"target"},
}
_ATOM = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_PATH = re.compile(rf"{_ATOM}(?:\.{_ATOM}){{0,31}}")
#: String argument values (``"shape"``, ``torch._assert`` messages): printable ASCII without
#: backslashes, on one line. ``torch.fx`` writes them with ``repr``.
_STRING_ARGUMENT = re.compile(r"[ -\[\]-~]{0,200}")
#: Names the generated ``forward`` may read besides its own variables (see :func:`audit_source`).
_SOURCE_GLOBALS = frozenset({"torch", "getattr", "slice", "inf", "nan"})
#: Names the generated ``forward`` may call directly (everything else is a method or module call).
_SOURCE_CALLS = frozenset({"getattr", "slice"})
_SOURCE_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Assign, ast.Return, ast.Expr, ast.Name, ast.Load,
    ast.Store, ast.Attribute, ast.Call, ast.keyword, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Subscript,
    ast.Slice, ast.BinOp, ast.Add, ast.Mult, ast.Compare, ast.Eq, ast.UnaryOp, ast.USub,
)


class _NotDescribable(Exception):
    """The graph uses something outside the allow-lists."""


def _is_name(text) -> bool:
    return isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text) and not text.startswith("__")


def is_module_path(path) -> bool:
    """Whether `path` is a safe dotted module path such as ``"layer1.0.conv1"``.

    Parameters
    ----------
    path : object

    Returns
    -------
    safe : bool
        True for a string of at most 32 dot-separated atoms, each an
        identifier (not a Python keyword, not starting with ``__``) or a
        decimal number, matched in full (no trailing newline).
    """
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        return False
    return all(atom.isdigit() or _is_name(atom) for atom in path.split("."))


def is_keyword_name(name) -> bool:
    """Whether `name` may be a keyword-argument name in generated code.

    Parameters
    ----------
    name : object

    Returns
    -------
    safe : bool
        True for an identifier (``str.isidentifier``) that is not a Python
        keyword and does not start with ``__``.
    """
    return _is_name(name)


def _check_path(path) -> str:
    if not is_module_path(path):
        raise _NotDescribable(f"module path {path!r}")
    return path


def _check_string(text: str) -> str:
    if not _STRING_ARGUMENT.fullmatch(text):
        raise _NotDescribable(f"string argument {text!r}")
    return text


# ------------------------------------------------------------------ describe


def _module_spec(module: nn.Module) -> dict:
    name = type(module).__name__
    if MODULES.get(name, (None,))[0] is not type(module):
        raise _NotDescribable(f"module class {type(module).__module__}.{name}")
    if isinstance(module, nn.Sequential):
        children = [[_check_path(k), _module_spec(child)] for k, child in module.named_children()]
        return {"class": name, "children": children}
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
    if isinstance(value, str):
        return _check_string(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_argument(v, index) for v in value]}
    if isinstance(value, list):
        return [_argument(v, index) for v in value]
    if isinstance(value, slice):
        return {"slice": [_argument(v, index) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, dict) and all(is_keyword_name(k) for k in value):
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


def _build_module(spec) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise ValueError(f"module description {spec!r:.80} is not valid")
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
    if not isinstance(arguments, dict) or set(arguments) - set(allowed):
        raise ValueError(f"unexpected arguments {sorted(set(arguments) - set(allowed))} for {name}")
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
    if cls in (nn.Conv2d, nn.BatchNorm2d):
        # Weights on the meta device (no memory, no random init); the state dict replaces them.
        return cls(**arguments, device="meta")
    return cls(**arguments)


def _checked(path) -> str:
    if not is_module_path(path):
        raise ValueError(f"invalid module path {path!r}")
    return path


def _set_path(root: nn.Module, path: str, value) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for atom in parents:
        if not hasattr(owner, atom):
            owner.add_module(atom, nn.Module())
        owner = getattr(owner, atom)
        if not isinstance(owner, nn.Module):
            raise ValueError(f"module path {path!r} runs through a tensor")
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


class _Arguments:
    """Turns the JSON form of node arguments back into values, validating every string."""

    def __init__(self):
        self.created: list = []

    def __call__(self, item):
        if isinstance(item, str):
            if not _STRING_ARGUMENT.fullmatch(item):
                raise ValueError(f"string argument {item!r:.80} is not allowed")
            return item
        if item is None or isinstance(item, (bool, int, float)):
            return item
        if isinstance(item, list):
            return [self(v) for v in item]
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"argument {item!r:.80} is not valid")
        (kind, content), = item.items()
        if kind == "node":
            if type(content) is not int or not 0 <= content < len(self.created):
                raise ValueError(f"argument refers to node {content!r:.80}, not an earlier node")
            return self.created[content]
        if kind == "tuple" and isinstance(content, list):
            return tuple(self(v) for v in content)
        if kind == "slice" and isinstance(content, list) and len(content) == 3:
            return slice(*(self(v) for v in content))
        if kind == "dict" and isinstance(content, dict):
            bad = [k for k in content if not is_keyword_name(k)]
            if bad:
                raise ValueError(f"keyword name {bad[0]!r:.80} is not an identifier")
            return {k: self(v) for k, v in content.items()}
        raise ValueError(f"argument {item!r:.80} is not valid")

    def call(self, entry: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a node entry."""
        args, kwargs = self(entry["args"]), self(entry["kwargs"])
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError("node arguments must be a tuple and a dict")
        return args, kwargs


def audit_source(source: str) -> None:
    """Check the ``forward`` source that ``torch.fx`` generates for a rebuilt graph.

    Defence in depth behind the validation of each string: the source must
    parse as one ``forward(self, x)`` made of assignments and a return,
    whose expressions only call modules (``self.<path>``), the allow-listed
    ``torch`` functions (by their full dotted name), allow-listed tensor
    methods and attributes, ``getattr`` and ``slice``, read only their own
    variables and a few constants, use no attribute or name starting with
    ``__`` and pass no ``*``/``**`` arguments.

    Parameters
    ----------
    source : str
        ``graph.python_code("self").src``.

    Raises
    ------
    ValueError
        Naming the first construct outside these rules.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(f"the generated forward does not parse ({error.msg})") from error
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) or tree.body[0].name != "forward":
        raise ValueError("the generated code is not a single forward function")
    function = tree.body[0]
    if function.decorator_list or function.returns or [a.arg for a in function.args.args] != ["self", "x"]:
        raise ValueError("the generated forward has an unexpected signature")
    known = {"self", "x"} | _SOURCE_GLOBALS
    for statement in function.body:
        if not isinstance(statement, (ast.Assign, ast.Return, ast.Expr)):
            raise ValueError(f"statement {type(statement).__name__} in the generated forward")
        for node in ast.walk(statement):
            if not isinstance(node, _SOURCE_NODES):
                raise ValueError(f"{type(node).__name__} in the generated forward")
            if isinstance(node, ast.Name) and (node.id.startswith("__") or (
                    isinstance(node.ctx, ast.Load) and node.id not in known)):
                raise ValueError(f"name {node.id!r} in the generated forward")
            if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
                raise ValueError(f"attribute {node.attr!r} in the generated forward")
            if isinstance(node, ast.keyword) and node.arg is None:
                raise ValueError("a ** argument in the generated forward")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in _SOURCE_CALLS:
                raise ValueError(f"call of {node.func.id!r} in the generated forward")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("__"):
                raise ValueError(f"string {node.value!r:.80} in the generated forward")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                _check_attribute(node.value.id, node.attr, node)
        if isinstance(statement, ast.Assign):
            known.update(target.id for target in statement.targets if isinstance(target, ast.Name))
    _check_torch_chains(tree)


def _torch_names() -> frozenset:
    """Dotted names under which ``torch.fx`` writes the allow-listed torch functions."""
    from torch.fx.node import _get_qualified_name

    return frozenset(_get_qualified_name(f) for f in FUNCTIONS.values() if f.__module__.startswith("torch"))


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id if isinstance(node, ast.Name) else "?", *reversed(parts)])


def _check_attribute(root: str, attribute: str, node: ast.Attribute) -> None:
    """Attributes read from a name: module paths of ``self``, tensor methods and attributes, torch functions."""
    if root == "self":
        return  # module paths, validated against the rebuilt modules
    if root == "torch":
        # The outermost attribute of the chain is checked as a whole (torch.nn.functional.relu).
        return
    if attribute not in METHODS and attribute not in TENSOR_ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} of {root!r} in the generated forward")


def _check_torch_chains(tree: ast.AST) -> None:
    allowed = _torch_names()
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            name = _dotted(node)
            if name.startswith("torch.") and name not in allowed:
                raise ValueError(f"{name!r} in the generated forward")


def rebuild(description: dict, state: dict) -> torch.fx.GraphModule:
    """The traced backbone from :func:`describe`'s description and its state dict.

    Every string of `description` is validated (module paths with
    :func:`is_module_path`, keyword names with :func:`is_keyword_name`, op
    kinds, functions, methods and attributes against the allow-lists), and
    the ``forward`` source generated from the graph is checked with
    :func:`audit_source` before ``torch.fx`` compiles it.

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
        If the description names anything outside the allow-lists, is not
        laid out as :func:`describe` writes it, or does not match the state
        dict.
    """
    try:
        return _rebuild(description, state)
    except ValueError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, RecursionError) as error:
        raise ValueError(f"the graph description is not valid ({type(error).__name__}: {error})") from error


def _rebuild(description: dict, state: dict) -> torch.fx.GraphModule:
    if not isinstance(description, dict) or not isinstance(description.get("modules"), dict) or not isinstance(
            description.get("nodes"), list):
        raise ValueError("the graph description must hold 'modules' (a dict) and 'nodes' (a list)")
    root = nn.Module()
    for path, spec in description["modules"].items():
        _set_path(root, _checked(path), _build_module(spec))
    graph = torch.fx.Graph()
    arguments = _Arguments()
    n_placeholders = n_outputs = 0
    for entry in description["nodes"]:
        if not isinstance(entry, dict) or entry.get("op") not in NODE_KINDS:
            raise ValueError(f"node kind {entry.get('op') if isinstance(entry, dict) else entry!r:.80} is not allowed")
        op = entry["op"]
        expected = NODE_KEYS[op]
        if set(entry) != expected:
            raise ValueError(f"a {op} node has the entries {sorted(entry)!r:.120}; expected {sorted(expected)}")
        args, kwargs = arguments.call(entry)
        if op == "placeholder":
            n_placeholders += 1
            if n_placeholders > 1 or args or kwargs:
                raise ValueError("the graph must have one input without arguments")
            node = graph.placeholder("x")
        elif op == "output":
            n_outputs += 1
            if n_outputs > 1 or len(args) != 1 or kwargs:
                raise ValueError("the graph must have one output")
            node = graph.output(args[0])
        elif op == "call_module":
            target = _checked(entry.get("target"))
            if not isinstance(root.get_submodule(target), nn.Module) or kwargs:
                raise ValueError(f"call of module {target!r} with keyword arguments, or of something else")
            node = graph.call_module(target, args, kwargs)
        elif op == "get_attr":
            target = _checked(entry.get("target"))
            tensor = state[target]
            _set_path(root, target, nn.Parameter(tensor, requires_grad=False) if entry.get("parameter") else tensor)
            node = graph.get_attr(target)
        elif op == "call_function":
            target = entry.get("target")
            if not isinstance(target, str) or target not in FUNCTIONS:
                raise ValueError(f"function {target!r:.80} is not allowed")
            function = FUNCTIONS[target]
            if function is builtins.getattr and (len(args) != 2 or kwargs or args[1] not in TENSOR_ATTRIBUTES):
                raise ValueError(f"getattr of {args[1:]!r:.80} is not allowed")
            node = graph.call_function(function, args, kwargs)
        else:  # call_method
            target = entry.get("target")
            if not isinstance(target, str) or target not in METHODS:
                raise ValueError(f"method {target!r:.80} is not allowed")
            if not args or not isinstance(args[0], torch.fx.Node):
                raise ValueError(f"method {target!r} is not called on a node")
            node = graph.call_method(target, args, kwargs)
        arguments.created.append(node)
    if n_placeholders != 1 or n_outputs != 1:
        raise ValueError("the graph must have one input and one output")
    audit_source(graph.python_code(root_module="self").src)  # before torch.fx compiles it
    network = torch.fx.GraphModule(root, graph, class_name="BackboneLayers")
    network.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the weights
    left = [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"no saved values for {left}")
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()
