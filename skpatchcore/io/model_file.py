"""A model file format that cannot run code when it is read.

:func:`save` writes a fitted skpatchcore estimator (normally a
:class:`~skpatchcore.PatchCorePipeline`) as one `safetensors
<https://github.com/huggingface/safetensors>`_ file; :func:`load` reads it
back. Unlike a pickle (``joblib.dump``), reading the file only parses JSON
and copies tensors: it never imports or calls anything named by the file.

The file holds:

- In the safetensors header's text metadata: ``"format"``
  (:data:`FILE_FORMAT`), ``"format_version"`` (:data:`FILE_FORMAT_VERSION`),
  ``"model"``, a JSON description of the estimator, and ``"sha256"``, a
  checksum of that JSON and of every tensor's name, dtype, shape and bytes.
- The JSON description: the skpatchcore version and model format, the class
  name of every estimator (only names from a fixed list of skpatchcore
  classes are accepted), its ``get_params(deep=False)`` and its fitted
  attributes (public names ending in ``_``). Numbers, strings, ``None``,
  tuples, lists and string-keyed dicts are stored as JSON (tuples tagged so
  that they come back as tuples); numpy arrays as tensors.
- The backbone of a :class:`~skpatchcore.PatchFeatureTransformer` is not
  stored as code. Its weights (the fitted, pruned network's state dict) are
  tensors. Its structure is either the traced ``torch.fx`` graph written as
  data, with module classes, functions and tensor methods from fixed
  allow-lists (``skpatchcore.io.model_graph``; kept only when the network
  rebuilt from it gives exactly the same layer outputs at save time), which
  :func:`load` rebuilds without importing torchvision or timm; or, for
  networks outside the allow-lists, nothing beyond the transformer's
  parameters: :func:`load` then rebuilds the network by name with the
  transformer's own ``fit`` and ``weights=None`` (random initialisation, no
  download). Either way the saved state dict is loaded strictly.

Attributes with a leading underscore are caches (search structures) and are
rebuilt on first use. A corrupted or truncated file raises
:class:`~skpatchcore.CorruptModelError`; a file of another format version,
or with parameters this version does not know, raises
:class:`~skpatchcore.IncompatibleModelError`. Both are ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .fitted_state import check_fitted_state
from .input_files import file_problem
from .versioning import MODEL_FORMAT_VERSION, READABLE_MODEL_FORMATS, CorruptModelError, IncompatibleModelError

__all__ = ["FILE_FORMAT", "FILE_FORMAT_VERSION", "SUFFIX", "check_model_path", "detect_format", "load", "save"]

#: The ``"format"`` entry of the safetensors metadata of a skpatchcore model.
FILE_FORMAT = "skpatchcore.safe-model"
#: Version of the file layout; a file of another version is refused.
FILE_FORMAT_VERSION = 1
#: Suggested file suffix (the format is recognised by content, not by name).
SUFFIX = ".skpc"
#: Largest safetensors header accepted when sniffing a file's format (bytes).
_MAX_HEADER = 100_000_000
#: Leading bytes of pickles and of joblib's compressed pickles.
_PICKLE_MAGIC = (b"\x80", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x04\x22\x4d\x18", b"\x28\xb5\x2f\xfd", b"ZF")


def _allowed_classes() -> dict[str, type]:
    """The only classes a file may name."""
    from ..coreset import CoresetSampler
    from ..detector import PatchCoreDetector
    from ..features import PatchFeatureTransformer
    from ..pipeline import PatchCorePipeline

    return {cls.__name__: cls for cls in (PatchCorePipeline, PatchFeatureTransformer, CoresetSampler,
                                          PatchCoreDetector)}


# ----------------------------------------------------------------- format sniffing


def detect_format(path: str | os.PathLike) -> str:
    """What kind of model file `path` is, from its first bytes (nothing is unpickled).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    kind : {"safe", "pickle", "unknown"}
        ``"safe"``: laid out as a safetensors file (written by :func:`save`,
        or another safetensors file, which :func:`load` then refuses).
        ``"pickle"``: a pickle or a compressed joblib file, which runs code
        when loaded. ``"unknown"``: anything else.
    """
    check_model_path(path)
    with open(path, "rb") as handle:
        return _kind(handle.read(16))


def check_model_path(path: str | os.PathLike) -> None:
    """Refuse a model path that is not a regular file, before anything opens it.

    Raises
    ------
    FileNotFoundError
        If nothing is there.
    CorruptModelError
        If it is a folder, a FIFO, a device or a broken link (opening a FIFO
        would wait forever, ``/dev/zero`` never ends).
    """
    problem = file_problem(path)
    if problem == "not found":
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if problem is not None:
        raise CorruptModelError(f"{str(path)!r} is not a skpatchcore model file: it is {problem}.")


def _kind(head: bytes) -> str:
    """:func:`detect_format` of a file's first 16 bytes."""
    if len(head) >= 10 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < _MAX_HEADER:
        return "safe"
    if head.startswith(_PICKLE_MAGIC) or (len(head) >= 2 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0):
        return "pickle"
    return "unknown"


# ----------------------------------------------------------------- encoding


class _Encoder:
    """Turns estimators into JSON-able descriptions, collecting tensors."""

    def __init__(self):
        self.tensors: dict = {}

    def estimator(self, estimator, key: str) -> dict:
        from ..pipeline import PatchCorePipeline

        name = type(estimator).__name__
        if _allowed_classes().get(name) is not type(estimator):
            raise TypeError(
                f"The safe model format stores skpatchcore estimators only "
                f"({', '.join(sorted(_allowed_classes()))}); got {type(estimator).__module__}.{name} at "
                f"{key!r}. Save it with joblib.dump instead (and load that file only if you trust it)."
            )
        params = estimator.get_params(deep=False)
        description = {"class": name}
        if isinstance(estimator, PatchCorePipeline):
            steps = params.pop("steps")
            description["steps"] = [
                [step_name, step if step in (None, "passthrough") else self.estimator(step, f"{key}.{step_name}")]
                for step_name, step in steps
            ]
        backbone = params.get("backbone")
        if backbone is not None and not isinstance(backbone, str):
            raise TypeError(
                f"{key}: the backbone is a {type(backbone).__name__} module; the safe model format rebuilds "
                "backbones from a name only. Pass a torchvision model name or 'timm:<name>' as backbone "
                "(with weights=PATH for your own weights), or save with joblib.dump and load that file "
                "only if you trust it."
            )
        description["params"] = {p: self.value(v, f"{key}.{p}") for p, v in params.items()}
        fitted = {}
        for attribute, value in vars(estimator).items():
            if attribute.startswith("_") or not attribute.endswith("_"):
                continue
            if attribute == "backbone_" and name == "PatchFeatureTransformer":
                fitted[attribute] = self.backbone(estimator, value, f"{key}.{attribute}")
            else:
                fitted[attribute] = self.value(value, f"{key}.{attribute}")
        description["fitted"] = fitted
        return description

    def backbone(self, transformer, network, key: str) -> dict:
        """The fitted network: its state dict as tensors, and its graph when the allow-lists cover it."""
        import torch

        from ..backbones import cpu_copy
        from .model_graph import describe, rebuild

        seen: set[int] = set()
        state, channels_last = {}, []
        for name, tensor in network.state_dict().items():
            tensor = tensor.detach().to("cpu")
            channels_last_order = not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
            if tensor.ndim == 4 and channels_last_order:
                # Stored in its memory order (N, H, W, C), so that loading needs no copy.
                channels_last.append(name)
                stored = tensor.permute(0, 2, 3, 1)
            else:
                stored = tensor.contiguous()
            if stored.data_ptr() in seen:  # safetensors refuses tensors that share memory
                stored = stored.clone()
            if stored.numel():
                seen.add(stored.data_ptr())
            self.tensors[f"{key}/{name}"] = stored
            state[name] = tensor
        graph = describe(network)
        if graph is not None:
            # Kept only if the network rebuilt from it gives exactly the same layer outputs.
            probe = torch.randn(2, 3, *transformer.input_size_, generator=torch.Generator().manual_seed(0))
            probe = probe.contiguous(memory_format=torch.channels_last)
            try:
                rebuilt = rebuild(graph, {name: tensor.clone() for name, tensor in state.items()})
                with torch.inference_mode():
                    # On a CPU copy: saving leaves the live network where it is (on the GPU).
                    expected, got = cpu_copy(network)(probe), rebuilt(probe)
                same = len(expected) == len(got) and all(torch.equal(a, b) for a, b in zip(expected, got))
            except Exception:  # any failure: rebuild from the backbone's name instead
                same = False
            graph = graph if same else None
        return {"__state_dict__": key, "names": list(state), "channels_last": channels_last, "graph": graph}

    def value(self, value, key: str):
        import torch

        if value is None or isinstance(value, (bool, str)):
            return value
        if type(value) in (int, float):
            return value
        if isinstance(value, tuple):
            return {"__tuple__": [self.value(v, f"{key}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.value(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"__dict__": {k: self.value(v, f"{key}[{k!r}]") for k, v in value.items()}}
        if isinstance(value, os.PathLike):
            return {"__path__": os.fspath(value)}
        if isinstance(value, np.generic) and value.dtype.kind in "biuf":
            return {"__scalar__": value.dtype.str, "value": value.item()}
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                array = np.ascontiguousarray(value)
                if not array.dtype.isnative:
                    array = array.astype(array.dtype.newbyteorder("="))
                self.tensors[key] = torch.from_numpy(array)
                return {"__ndarray__": key}
            if value.dtype.kind in "OU" and all(isinstance(v, str) for v in value.ravel()):
                return {"__strings__": value.tolist(), "dtype": value.dtype.str}
        raise TypeError(
            f"{key} is a {type(value).__name__}, which the safe model format cannot store (it stores "
            "numbers, strings, None, tuples, lists, dicts and numeric arrays). Save the model with "
            "joblib.dump instead, and load that file only if you trust it."
        )


def _digest(model_text: str, tensors: dict) -> str:
    """SHA-256 of the JSON description and of every tensor's name, dtype, shape and bytes."""
    import torch

    hasher = hashlib.sha256(model_text.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        hasher.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def save(model, path: str | os.PathLike) -> Path:
    """Save a fitted skpatchcore estimator in the safe model format.

    The file is written atomically (a temporary file in the same folder,
    renamed into place): an interrupted save leaves an existing file intact.

    Parameters
    ----------
    model : PatchCorePipeline, PatchFeatureTransformer, CoresetSampler or PatchCoreDetector
        A fitted estimator whose backbone (if any) is given by name.
    path : str or path-like
        Output file; ``.skpc`` is the suggested suffix. Parent folders are
        created.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    TypeError
        If the model holds something the format cannot rebuild without
        code: a backbone given as an ``nn.Module``, an estimator class from
        outside skpatchcore, or an attribute of an unsupported type.

    Examples
    --------
    >>> import skpatchcore
    >>> skpatchcore.save(model, "model.skpc")  # doctest: +SKIP
    >>> model = skpatchcore.load("model.skpc")  # doctest: +SKIP
    """
    from safetensors.torch import save as save_tensors

    from .._version import __version__

    encoder = _Encoder()
    description = {
        "skpatchcore_version": __version__,
        "model_format": MODEL_FORMAT_VERSION,
        "estimator": encoder.estimator(model, "model"),
    }
    model_text = json.dumps(description, allow_nan=True)
    metadata = {
        "format": FILE_FORMAT,
        "format_version": str(FILE_FORMAT_VERSION),
        "model": model_text,
        "sha256": _digest(model_text, encoder.tensors),
    }
    payload = save_tensors(encoder.tensors, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(payload)
    return path


# ----------------------------------------------------------------- decoding


def _read_metadata(data: bytes, path: Path) -> dict:
    """The safetensors header's metadata, parsed without trusting any of it."""
    kind = _kind(data[:16])
    if kind == "pickle":
        raise CorruptModelError(
            f"{str(path)!r} is not a skpatchcore model file but a pickle (joblib) file, which is not "
            "opened here because unpickling runs any code it contains. If you trust it, read it with "
            "joblib.load."
        )
    if kind != "safe":
        raise CorruptModelError(
            f"{str(path)!r} is not a skpatchcore model file, or it is truncated or damaged ({len(data)} bytes)."
        )
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise CorruptModelError(f"{str(path)!r} is truncated or damaged: its header runs past the end of the file.")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        raise CorruptModelError(f"{str(path)!r} is damaged: its header is not valid ({error}).") from error
    except RecursionError as error:  # brackets nested deeper than Python's recursion limit
        raise CorruptModelError(f"{str(path)!r} is damaged: its header is nested too deeply.") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FILE_FORMAT:
        raise CorruptModelError(
            f"{str(path)!r} is not a skpatchcore model file (written by skpatchcore.save or "
            "'skpatchcore fit'), or it is damaged."
        )
    return metadata


def load(path: str | os.PathLike):
    """Load an estimator saved by :func:`save`, without running code from the file.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    model : PatchCorePipeline or another skpatchcore estimator
        Scores exactly (bit for bit) as the saved model did.

    Raises
    ------
    CorruptModelError
        If the file is truncated, damaged (the checksum does not match) or
        not a skpatchcore model file.
    IncompatibleModelError
        If it was written under another file or model format, or names
        parameters this version of skpatchcore does not have.
    FileNotFoundError
        If `path` does not exist.

    Notes
    -----
    Everything read from the file is validated before use (see
    ``docs/security.rst``): the header's nesting, the checksum, class names,
    every string of the backbone graph and the dtype, shape and values of
    the fitted arrays. A folder, FIFO or device raises
    :class:`~skpatchcore.CorruptModelError` without being opened.
    """
    from safetensors.torch import load_file

    path = Path(path)
    check_model_path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
        length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        rest = max(0, min(length, _MAX_HEADER) + 8 - len(head))
        data = head + handle.read(rest) if _kind(head) == "safe" else head  # the header only
    metadata = _read_metadata(data, path)
    version = metadata.get("format_version")
    if version != str(FILE_FORMAT_VERSION):
        raise IncompatibleModelError(
            f"{str(path)!r} uses model file format {version}; this skpatchcore reads format "
            f"{FILE_FORMAT_VERSION}. Load it with the skpatchcore version that wrote it, or refit."
        )
    try:
        tensors = load_file(path)  # memory-mapped: one copy of the tensor data
    except Exception as error:  # safetensors reports damage with its own error types
        raise CorruptModelError(f"{str(path)!r} is damaged: {error}") from error
    model_text = metadata.get("model", "")
    if _digest(model_text, tensors) != metadata.get("sha256"):
        raise CorruptModelError(
            f"{str(path)!r} is damaged: its checksum does not match its contents (the file was "
            "changed or truncated after it was written). Restore it from a copy, or refit."
        )
    try:
        description = json.loads(model_text)
        model_format = description["model_format"]
        written_by = description["skpatchcore_version"]
        estimator_description = description["estimator"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise CorruptModelError(f"{str(path)!r} holds an invalid model description ({error!r:.200}).") from error
    if type(model_format) is not int:
        raise CorruptModelError(
            f"{str(path)!r} holds an invalid model description: its model format is {model_format!r:.40} "
            f"(a {type(model_format).__name__}), not an integer."
        )
    if model_format not in READABLE_MODEL_FORMATS:
        raise IncompatibleModelError(
            f"{str(path)!r} was saved by skpatchcore {written_by} (model format {model_format}); this "
            f"version reads model format {MODEL_FORMAT_VERSION}. Refit the model, or load it with "
            f"skpatchcore {written_by}."
        )
    try:
        model = _Decoder(tensors, path).estimator(estimator_description, "model")
    except (CorruptModelError, IncompatibleModelError):
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, RuntimeError,
            OverflowError) as error:
        raise CorruptModelError(f"{str(path)!r} holds an invalid model description ({error!r:.200}).") from error
    try:
        check_fitted_state(model)
    except ValueError as error:
        raise CorruptModelError(f"{str(path)!r} holds an invalid fitted model: {error}.") from error
    return model


class _Decoder:
    """Rebuilds estimators from :class:`_Encoder` descriptions."""

    def __init__(self, tensors: dict, path: Path):
        self.tensors = tensors
        self.path = path

    def estimator(self, description: dict, key: str):
        from .._version import __version__
        from ..pipeline import PatchCorePipeline

        name = description["class"]
        cls = _allowed_classes().get(name)
        if cls is None:
            raise IncompatibleModelError(f"{str(self.path)!r} names an unknown estimator class {name!r} at {key!r}.")
        params = {p: self.value(v) for p, v in description["params"].items()}
        known = set(cls._get_param_names())
        if cls is PatchCorePipeline:
            # Pipeline-level parameters only steer execution (memory, verbose, ...):
            # those this version lacks are left out; the steps are required.
            params = {p: v for p, v in params.items() if p in known}
            steps = [(step_name, step if not isinstance(step, dict) else self.estimator(step, f"{key}.{step_name}"))
                     for step_name, step in description["steps"]]
            estimator = cls(steps, **params)
        else:
            unknown = sorted(set(params) - known)
            if unknown:
                raise IncompatibleModelError(
                    f"{str(self.path)!r}: {name} at {key!r} has parameters {unknown} that this skpatchcore "
                    f"version ({__version__}) does not know; load it with a newer skpatchcore."
                )
            estimator = cls.__new__(cls)
            # __setstate__ as for a pickle: the version stamp, then cache resets (if any).
            estimator.__setstate__({
                **params,
                "_skpatchcore_format": MODEL_FORMAT_VERSION,
                "_skpatchcore_version": __version__,
            })
        backbone = None
        for attribute, value in description["fitted"].items():
            if isinstance(value, dict) and "__state_dict__" in value:
                backbone = value
                continue
            setattr(estimator, attribute, self.value(value))
        if backbone is not None:
            estimator.backbone_ = self.backbone(estimator, backbone, key)
        return estimator

    def backbone(self, transformer, description: dict, key: str):
        """Rebuild the fitted network from its graph, or else by name, and load the saved state dict."""
        prefix = description["__state_dict__"]
        state = {name: self.tensors[f"{prefix}/{name}"] for name in description["names"]}
        for name in description.get("channels_last", []):  # stored as (N, H, W, C): a view, no copy
            state[name] = state[name].permute(0, 3, 1, 2)
        if description.get("graph") is not None:
            from .model_graph import rebuild

            try:
                network = rebuild(description["graph"], state)
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                raise IncompatibleModelError(
                    f"{str(self.path)!r}: the backbone graph at {key!r} cannot be rebuilt: {error}"
                ) from error
            return network
        return self.backbone_by_name(transformer, state, key)

    def backbone_by_name(self, transformer, state: dict, key: str):
        """Rebuild the fitted network with ``weights=None`` and load the saved state dict."""
        from sklearn.base import clone

        builder = clone(transformer).set_params(weights=None, progress=False)
        builder.fit()
        network = builder.backbone_
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise IncompatibleModelError(
                f"{str(self.path)!r}: the backbone {transformer.backbone!r} rebuilt by this installation "
                f"does not match the saved weights at {key!r} (another torchvision/timm version?): {error}"
            ) from error
        for attribute in ("input_size_", "feature_shape_"):
            if getattr(builder, attribute) != getattr(transformer, attribute, None):
                raise IncompatibleModelError(
                    f"{str(self.path)!r}: the rebuilt backbone gives {attribute}={getattr(builder, attribute)}, "
                    f"the saved model {getattr(transformer, attribute, None)}."
                )
        return network

    def value(self, value):
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tuple__" in value:
            return tuple(self.value(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: self.value(v) for k, v in value["__dict__"].items()}
        if "__path__" in value:
            return Path(value["__path__"])
        if "__scalar__" in value:
            return np.dtype(value["__scalar__"]).type(value["value"])
        if "__ndarray__" in value:
            return self.tensors[value["__ndarray__"]].numpy()
        if "__strings__" in value:
            return np.array(value["__strings__"], dtype=np.dtype(value["dtype"]))
        raise TypeError(f"unknown tagged value {sorted(value)}")
