"""``skpatchcore score``: scores.csv and heatmap overlays for images, with the
scoring and heatmap helpers that ``evaluate`` uses too."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._cli_common import CommandError, check_readable, collect_images, info, load_model, progress_enabled

#: Images scored per backbone pass by ``score`` and ``evaluate``.
SCORE_CHUNK = 32
#: ``score`` CSV columns.
SCORE_COLUMNS = ("path", "anomaly_score", "decision", "prediction")


def run_score(args: argparse.Namespace) -> int:
    """Run ``skpatchcore score`` with parsed arguments; returns the exit status."""
    model = load_model(args.model, args.device)
    images = collect_images(args.inputs)
    check_readable(images)
    write_images = not args.no_images
    if write_images:
        from .plotting import _require_matplotlib

        try:
            _require_matplotlib()
        except ImportError as error:
            raise CommandError(f"{error} Or pass --no-images.") from error
    output = Path(args.output)
    heatmap_dir = output / "heatmaps"
    (heatmap_dir if write_images else output).mkdir(parents=True, exist_ok=True)
    features = model.steps[0][1]
    offset = float(model.steps[-1][1].offset_)
    vmin, vmax = colour_range(model, args.vmin, args.vmax)
    names = unique_names(images)
    n_anomalous = 0
    start_time = time.perf_counter()
    with open(output / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORE_COLUMNS)
        scored = iter_scored(
            model, images, args.batch_size, original_size=features.crop_size is None,
            progress=progress_enabled(args),
        )
        for start, batch, scores, maps in scored:
            n_anomalous += int(np.count_nonzero(scores - offset < 0))
            for i, (path, score) in enumerate(zip(batch, scores)):
                writer.writerow([path, *prediction_cells(score, offset)])
                if write_images:
                    save_heatmap(heatmap_dir / names[start + i], features, path, maps[i], vmin, vmax)
            handle.flush()
    elapsed = time.perf_counter() - start_time
    info(args, f"Scored {len(images)} images in {elapsed:.1f} s: {n_anomalous} anomalous, "
               f"{len(images) - n_anomalous} normal")
    info(args, f"Wrote {output / 'scores.csv'}"
               + (f" and {len(images)} heatmaps in {heatmap_dir}" if write_images else ""))
    return 0


def iter_scored(
    model, images: Sequence[str], chunk: int, original_size: bool, progress: bool
) -> Iterator[tuple[int, list[str], np.ndarray, list | np.ndarray]]:
    """Score images chunk by chunk: ``(start, paths, score_samples, maps)``."""
    from tqdm import tqdm

    model.steps[0][1].set_params(progress=False)
    with tqdm(total=len(images), desc="Scoring", unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(images), chunk):
            batch = list(images[start:start + chunk])
            scores, maps = model.score_and_maps(batch, original_size=original_size)
            yield start, batch, scores, maps
            bar.update(len(batch))


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
    threshold = float(-model.steps[-1][1].offset_)
    low = 0.0 if vmin is None else float(vmin)
    high = max(2.0 * threshold, low + 1e-6) if vmax is None else float(vmax)
    return low, high


def model_view(features, image) -> np.ndarray:
    """The image as the backbone sees it (resized, cropped), float RGB in [0, 1]."""
    from .images import preprocess_image

    array = preprocess_image(
        image, features.resize, features.crop_size, features.interpolation, features.mean, features.std,
        features.exif_transpose,
    )
    mean = np.asarray(features.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(features.std, dtype=np.float32)[:, None, None]
    return np.clip(np.moveaxis(array * std + mean, 0, -1), 0.0, 1.0)


def save_heatmap(target: Path, features, image_path: str, anomaly_map, vmin: float, vmax: float) -> None:
    """Overlay on the original image without a crop, else on the cropped view."""
    from .plotting import save_overlay_png

    image = image_path if features.crop_size is None else model_view(features, image_path)
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
