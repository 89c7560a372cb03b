"""The one mapping between seconds and the head's time grid.

A clip samples its window (start_s, end_s) with N frames, frame i centred at
start + (i + 0.5) * (end - start) / N. After the backbone and resampling to L positions
(linear interpolation, align_corners=False, which keeps centres aligned), position p is centred at

    t(p) = start + (p + 0.5) * (end - start) / L,

and segments on the grid are real-valued positions in the same convention: the window's edges
are at -0.5 and L - 0.5. Pyramid level l has points at p = j * 2^l (j = 0 .. L / 2^l - 1).
Target building and decoding both go through these two functions.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor, float)


def _step(window: Sequence[float], seq_len: int) -> float:
    start, end = float(window[0]), float(window[1])
    if not end > start:
        raise ValueError(f"window {list(window)} is empty: end must be greater than start")
    return (end - start) / seq_len


def seconds_to_grid(seg_s: Array, window: Sequence[float], seq_len: int) -> Array:
    """Seconds -> grid positions: g = (t - start) * L / (end - start) - 0.5 (elementwise)."""
    return (seg_s - float(window[0])) / _step(window, seq_len) - 0.5


def grid_to_seconds(seg_grid: Array, window: Sequence[float], seq_len: int) -> Array:
    """Grid positions -> seconds: t = start + (g + 0.5) * (end - start) / L (elementwise)."""
    return float(window[0]) + (seg_grid + 0.5) * _step(window, seq_len)


def targets_in_window(segments_s: np.ndarray, labels: np.ndarray, window: Sequence[float], seq_len: int,
                      min_overlap: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets of one clip: the segments (N, 2) seconds that overlap the window by at
    least `min_overlap` of their length, cut to the window and put on the grid.
    Returns (segments (M, 2) float32 grid units, labels (M,) int64)."""
    seg = np.asarray(segments_s, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    lo, hi = float(window[0]), float(window[1])
    cut = np.stack([np.clip(seg[:, 0], lo, hi), np.clip(seg[:, 1], lo, hi)], axis=1)
    length = seg[:, 1] - seg[:, 0]
    keep = (cut[:, 1] - cut[:, 0]) >= min_overlap * length
    keep &= cut[:, 1] > cut[:, 0]
    grid = seconds_to_grid(cut[keep], window, seq_len)
    return torch.as_tensor(grid, dtype=torch.float32), torch.as_tensor(lab[keep], dtype=torch.int64)
