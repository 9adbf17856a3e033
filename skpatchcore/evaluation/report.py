"""Result files of the ``score`` and ``evaluate`` commands: CSV cells, heatmap PNGs, plots.

Shared by :func:`skpatchcore.evaluation.evaluate_model` (its ``output``
folder) and the ``score`` command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_path
from ..io.images import model_view

#: ``evaluate`` CSV columns (``error`` is empty for scored images, ``heatmap`` without a heat map).
EVALUATE_COLUMNS = ("path", "defect_type", "label", "anomaly_score", "decision", "prediction", "error", "heatmap")
#: What ``evaluate`` writes into its output folder (replaced together at the end).
EVALUATE_OUTPUTS = ("metrics.json", "scores.csv", "heatmaps", "roc.png", "worst_examples.png")
#: Examples of each kind shown in ``evaluate --plots``'s worst_examples.png.
N_WORST = 3


#: Leading characters that make spreadsheet programs read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def text_cell(text: str) -> str:
    """A text CSV cell (a path, an error message) that spreadsheets show as text.

    A cell starting with one of :data:`FORMULA_PREFIXES` (a file named
    ``=HYPERLINK(...).png``) gets a leading apostrophe, as spreadsheet
    exporters do, so that opening ``scores.csv`` never evaluates it.

    Parameters
    ----------
    text : str

    Returns
    -------
    cell : str
    """
    text = str(text)
    return f"'{text}" if text.startswith(FORMULA_PREFIXES) else text


def prediction_cells(score_sample: float, offset: float) -> list[str]:
    """The ``anomaly_score``, ``decision`` and ``prediction`` CSV cells of one image.

    ``decision = score_sample - offset``; below 0 is anomalous.
    """
    decision = float(score_sample) - offset
    return [repr(-float(score_sample)), repr(decision), "anomalous" if decision < 0 else "normal"]


def colour_range(model, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Heatmap colour limits shared by all images: 0 to twice the threshold.

    The threshold (minus ``offset_``) is the highest anomaly score of the
    calibration images, so normal regions stay in the blue half of the
    colour map and only patches above the threshold turn yellow to red.
    """
    detector = model.steps[-1][1] if hasattr(model, "steps") else model  # a pipeline, or an OnnxPatchCore
    threshold = float(-detector.offset_)
    low = 0.0 if vmin is None else float(vmin)
    high = max(2.0 * threshold, low + 1e-6) if vmax is None else float(vmax)
    return low, high


def save_heatmap(target: Path, features, image_path: str, anomaly_map, vmin: float, vmax: float) -> None:
    """Overlay on the original image without a crop, else on the cropped view."""
    from .figures import save_overlay_png

    if features.crop_size_ is not None:
        image = model_view(features, image_path)
    else:  # the original image, turned upright only if the model turned it (downsampled by PIL if large)
        from ..io.images import read_image

        image = read_image(image_path, getattr(features, "exif_transpose", True))
    save_overlay_png(target, image, anomaly_map, vmin, vmax)


def unique_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per path; colliding stems get ``_2``, ``_3``... suffixes."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, k = stem, 1
        while name.lower() in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name.lower())
        names.append(f"{name}.png")
    return names


def write_plots(output: Path, features, images, labels, anomaly, masks, maps, vmin, vmax) -> None:
    """``roc.png`` (when both classes are present) and ``worst_examples.png`` in `output`."""
    from .figures import plot_examples, plot_roc_curves

    if 0 < labels.sum() < labels.size:
        with_pixels = any(mask.any() for mask in masks) and not all(mask.all() for mask in masks)
        figure = plot_roc_curves(
            labels, anomaly, masks if with_pixels else None, maps if with_pixels else None
        )
        with atomic_path(output / "roc.png") as temporary:
            figure.savefig(temporary, dpi=100, format="png")
    normal = np.flatnonzero(labels == 0)
    defective = np.flatnonzero(labels == 1)
    worst = [(i, "highest-scored good") for i in normal[np.argsort(-anomaly[normal])][:N_WORST]]
    worst += [(i, "lowest-scored defective") for i in defective[np.argsort(anomaly[defective])][:N_WORST]]
    figure = plot_examples(
        [model_view(features, images[i]) for i, _ in worst],
        [maps[i] for i, _ in worst],
        masks=[masks[i] if labels[i] else None for i, _ in worst],
        scores=[anomaly[i] for i, _ in worst],
        titles=[f"{kind}: {Path(images[i]).name}" for i, kind in worst],
        vmin=vmin,
        vmax=vmax,
    )
    with atomic_path(output / "worst_examples.png") as temporary:
        figure.savefig(temporary, dpi=80, format="png")
