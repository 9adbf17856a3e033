"""PatchCore industrial anomaly detection as scikit-learn estimators."""

__version__ = "0.1.0"

from ._persistence import CorruptModelError, IncompatibleModelError  # noqa: E402
from .coreset import CoresetSampler  # noqa: E402
from .detector import PatchCoreDetector  # noqa: E402
from .display import AnomalyMapDisplay, AnomalyRocDisplay  # noqa: E402
from .features import PatchFeatureTransformer  # noqa: E402
from .model_selection import NormalOnlyKFold, anomaly_auroc_scorer, synthetic_defect_scorer  # noqa: E402
from .pipeline import PatchCorePipeline, make_patchcore  # noqa: E402
from .persistence import load, save  # noqa: E402
from .results import results_frame  # noqa: E402

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
