"""The torch device of an estimator's ``device`` parameter."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into CUDA when available, else CPU; validate others."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available.")
    return resolved
