"""Judging a fitted model: metrics, a labelled test set's results, tables and figures.

- :mod:`skpatchcore.evaluation.metrics` -- image AUROC, pixel AUROC, AUPRO;
- :mod:`skpatchcore.evaluation.protocol` -- a model on a labelled test set
  (:func:`evaluate`, :func:`evaluate_model`);
- :mod:`skpatchcore.evaluation.results` -- everything a model says about samples as a DataFrame;
- :mod:`skpatchcore.evaluation.report` -- the result files of ``score`` and ``evaluate``;
- :mod:`skpatchcore.evaluation.figures` -- heatmap overlays, triptychs and ROC figures;
- :mod:`skpatchcore.evaluation.display` -- scikit-learn style display objects.

The functions of :mod:`~skpatchcore.evaluation.protocol` are importable from
here too; they are loaded on first use, so that the result files of
``score --onnx`` (:mod:`~skpatchcore.evaluation.report`) need no scikit-learn.
"""

import importlib

__all__ = ["evaluate", "evaluate_model", "format_metrics", "masks_at_map_geometry"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".protocol", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
