"""Judging a fitted model: metrics, a labelled test set's results, tables and figures.

- :mod:`skpatchcore.evaluation.metrics` -- image AUROC, pixel AUROC, AUPRO;
- :mod:`skpatchcore.evaluation.protocol` -- a model on a labelled test set
  (:func:`evaluate`, :func:`evaluate_model`);
- :mod:`skpatchcore.evaluation.results` -- everything a model says about samples as a DataFrame;
- :mod:`skpatchcore.evaluation.report` -- the result files of ``score`` and ``evaluate``;
- :mod:`skpatchcore.evaluation.figures` -- heatmap overlays, triptychs and ROC figures;
- :mod:`skpatchcore.evaluation.display` -- scikit-learn style display objects.
"""

from .protocol import evaluate, evaluate_model, format_metrics, masks_at_map_geometry

__all__ = ["evaluate", "evaluate_model", "format_metrics", "masks_at_map_geometry"]
