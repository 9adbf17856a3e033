"""Bilinear resizing of anomaly maps (to an image's size, for scores and overlays)."""

from __future__ import annotations

import numpy as np


def resize_map(anomaly_map, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Bilinear resize of one 2-D anomaly map to ``size = (height, width)``.

    Half-pixel centres (``align_corners=False``), computed by torch in
    float32.

    Parameters
    ----------
    anomaly_map : array-like of shape (h, w)
    size : tuple of int
        ``(height, width)`` of the result.
    antialias : bool, default=False
        Low-pass filter the map when shrinking it, as PIL's bilinear filter
        does (for drawing); enlarging is the same either way.

    Returns
    -------
    resized : ndarray of shape size, float32
        A new array; equal to `anomaly_map` when it already has that size.

    Raises
    ------
    ValueError
        If `anomaly_map` is not 2-D.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {amap.shape}.")
    size = (int(size[0]), int(size[1]))
    if amap.shape == size:  # without importing torch (the ONNX runtime's heatmaps)
        return amap.copy()
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
        resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        return resized[0, 0].numpy()
