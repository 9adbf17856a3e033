"""PatchCore industrial anomaly detection as scikit-learn estimators."""

from ._moved import install as _install_moved_modules
from ._version import __version__

from .io.versioning import CorruptModelError, IncompatibleModelError  # noqa: E402
from .coreset import CoresetSampler  # noqa: E402
from .detector import PatchCoreDetector  # noqa: E402
from .evaluation.display import AnomalyMapDisplay, AnomalyRocDisplay  # noqa: E402
from .features import PatchFeatureTransformer  # noqa: E402
from .model_selection import NormalOnlyKFold, anomaly_auroc_scorer, synthetic_defect_scorer  # noqa: E402
from .pipeline import PatchCorePipeline, make_patchcore  # noqa: E402
from .io.model_file import load, save  # noqa: E402
from .evaluation.results import results_frame  # noqa: E402

__all__ = [
    "AnomalyMapDisplay",
    "AnomalyRocDisplay",
    "CoresetSampler",
    "CorruptModelError",
    "IncompatibleModelError",
    "NormalOnlyKFold",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "PatchFeatureTransformer",
    "anomaly_auroc_scorer",
    "load",
    "make_patchcore",
    "results_frame",
    "save",
    "synthetic_defect_scorer",
]

_install_moved_modules()
