"""Temporal patch shift (TPS, Xiang et al., ECCV 2022): the parameter-free part of PST.

Before window attention, each token of frame t is replaced by the token at the same spatial
position of frame t - o(h, w), where the offsets o form a small tile repeated over the spatial
grid; after attention the output is shifted back, so every token's result returns to its own
frame. Attention inside a window then mixes patches of up to |tile| neighbouring frames at no
extra parameters or FLOPs.

Offset convention: o is the `shifts` argument of `torch.roll` along time in the TPS reference
code, i.e. y[t] = x[t - o]. The tiles are those of the paper's supplement (Fig. 1); the
authors' source has only C (in the same positions as here), and B's tile appears in one of their
compiled older files (__pycache__/swin_transformer2d_btsm2, mixed there with 3x3 tiles per head).

Two users of these functions:
  - `re2tal.backbones.pst`, PST-T as its authors built it: 2-D windows per frame, the tile
    restarting at every window origin (`window=` below), and their bias and channel shift;
  - `TemporalPatchShift` here, TPS plugged into Video Swin-T's 3-D windows (`backbone.name:
    swin_t` with `backbone.patch_shift`; ours, not the authors' network, so swin3d_t weights
    load unchanged). There the tile is anchored once at the feature map's origin, the relative
    position bias indexes where a patch sits after the shift, and blocks that do not shift do
    plain attention. No published weights were trained this way.
Boundary default is cyclic, as the reference; `zero` is offered for long untrimmed clips,
where the first and last frames are unrelated.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from re2tal.backbones.shape_cache import ShapeCache

# Tiles of frame offsets o[h % rows][w % cols]; immutable.
PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((0, 1), (-1, 0)),
    "B": ((0, 1), (-1, 2)),
    "C": ((-4, 1, 2), (-1, 0, 3), (-2, -3, 4)),  # 9 consecutive frames
    "D": ((0, 1, 2, 3), (-1, -7, 4, 5), (-2, -4, 7, 6), (-3, -5, -6, 8)),  # 16 consecutive frames
}

Boundary = Literal["cyclic", "zero"]


def offset_map(pattern: str, height: int, width: int, window: tuple[int, int] | None = None) -> Tensor:
    """o (height, width) int64: the pattern's tile repeated over the grid from its origin, or,
    with `window` (wh, ww), from the origin of every window: o[h, w] = tile[(h % wh) % rows][(w % ww) % cols]."""
    tile = torch.tensor(PATTERNS[pattern], dtype=torch.long)
    rows, cols = tile.shape
    wh, ww = window or (height, width)
    return tile[(torch.arange(height) % wh % rows)[:, None], (torch.arange(width) % ww % cols)[None, :]]


def shift_index(pattern: str, t: int, h: int, w: int, boundary: Boundary, inverse: bool,
                window: tuple[int, int] | None = None) -> Tensor:
    """Source frame of every output token, (t, h, w) int64.

    Forward: src[t, h, w] = t - o[h, w]; inverse: t + o[h, w]; o = offset_map(pattern, h, w, window).
    cyclic: taken modulo t (torch.roll, as the paper).
    zero:   indices into the clip padded with max|o| zero frames on each side, so tokens whose
            source lies outside the clip read zeros.
    """
    sign = 1 if inverse else -1
    o = offset_map(pattern, h, w, window)
    src = torch.arange(t).view(t, 1, 1) + sign * o
    if boundary == "cyclic":
        return src % t
    return src + max_offset(pattern)


def max_offset(pattern: str) -> int:
    return max(abs(v) for row in PATTERNS[pattern] for v in row)


def patch_shift(x_BTHWC: Tensor, index_THW: Tensor, pad: int) -> Tensor:
    """y[b, t, h, w, :] = x'[b, index[t, h, w], h, w, :], x' = x with `pad` zero frames on both
    ends of time. (B, T, H, W, C) -> (B, T, H, W, C)."""
    if pad:
        x_BTHWC = torch.nn.functional.pad(x_BTHWC, (0, 0, 0, 0, 0, 0, pad, pad))
    b, _, h, w, c = x_BTHWC.shape
    index = index_THW.view(1, -1, h, w, 1).expand(b, -1, h, w, c)
    return torch.gather(x_BTHWC, 1, index)


class TemporalPatchShift(nn.Module):
    """TPS as a module without parameters or buffers (so pretrained state dicts are unchanged).

    `forward(x)` shifts, `forward(x, inverse=True)` shifts back; x is (B, T, H, W, C).
    With cyclic boundaries shift-back undoes the shift exactly; with zero boundaries tokens whose
    source frame lies outside the clip become zero (and stay zero after shifting back).
    """

    def __init__(self, pattern: str, boundary: Boundary, cache: ShapeCache) -> None:
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"unknown TPS pattern {pattern!r}; one of {sorted(PATTERNS)}")
        self.pattern = pattern
        self.boundary = boundary
        self.cache = cache

    def forward(self, x: Tensor, inverse: bool = False) -> Tensor:
        _, t, h, w, _ = x.shape
        key = ("tps", self.pattern, self.boundary, inverse, t, h, w, x.device)
        index = self.cache.get(key, lambda: shift_index(self.pattern, t, h, w, self.boundary, inverse).to(x.device))
        return patch_shift(x, index, max_offset(self.pattern) if self.boundary == "zero" else 0)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, boundary={self.boundary}"
