"""PatchCore industrial anomaly detection as scikit-learn estimators.

The public names below are imported on first use (PEP 562), so that
``import skpatchcore.onnx_runtime`` (and ``skpatchcore score --onnx``)
runs without importing torch.
"""

import importlib

from ._moved import install as _install_moved_modules
from ._version import __version__ as __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "AnomalyMapDisplay": ".evaluation.display",
    "AnomalyRocDisplay": ".evaluation.display",
    "CoresetSampler": ".coreset",
    "CorruptModelError": ".io.versioning",
    "IncompatibleModelError": ".io.versioning",
    "NormalOnlyKFold": ".model_selection",
    "OnnxPatchCore": ".onnx_runtime",
    "PatchCoreDetector": ".detector",
    "PatchCorePipeline": ".pipeline",
    "PatchFeatureTransformer": ".features",
    "anomaly_auroc_scorer": ".model_selection",
    "export_onnx": ".onnx_export",
    "load": ".io.model_file",
    "make_patchcore": ".pipeline",
    "results_frame": ".evaluation.results",
    "save": ".io.model_file",
    "synthetic_defect_scorer": ".model_selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # a submodule, as `import skpatchcore; skpatchcore.pipeline` gave when everything was imported at once
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


_install_moved_modules()
