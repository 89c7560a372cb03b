"""Residual functions evaluated piece by piece: what a block declares, and how a stage cuts.

A residual function F is *local* along dimension d of its input x when the output on a piece
(a run of indices along d) depends only on the input on that piece:

    F(x)[..., p0:p1, ...] = F_p(x[..., p0:p1, ...])

for pieces whose borders p0, p1 lie on the function's allowed cut points, where F_p is F itself
(an MLP branch along tokens; a conv branch with frozen BatchNorm along the batch) or, when the
result depends on where the piece lies (shifted windows, whose grouping and masks follow the
global position), `at(x_piece, p0, size)` with size the length of d. A reversible stage then
recomputes and back-propagates F one piece at a time, so the transient of its backward is one
piece's, not the stage's. Blocks declare this next to `residual_fns()`:

    def residual_pieces(self) -> list[Pieces | None]:   # one entry per residual function

None: F is not local along any dimension (it runs whole). The declaration is asked for at every
forward, so it may depend on the mode (BatchNorm is local along the batch only in eval mode).

Randomness: every piece runs on the generator state the whole function would (the stage re-seeds
before each piece), so a function drawing one mask per sample (drop path) draws the same masks
for pieces along any dimension but the batch; declare the batch only for functions that draw
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

PieceFn = Callable[[Tensor, int, int], Tensor]

# Elements of the stage tensor per piece when a stage is not told (piece_size None), by device:
# on a GPU, pieces much smaller than this leave its kernels launch-bound (an MLP branch piece is
# a few GEMMs of piece / C tokens); a CPU computes them at full speed, so its pieces are smaller
# (and so its transient).
PIECE_SIZE = {"cuda": 2**24}
PIECE_SIZE_OTHER = 2**20


def default_piece_size(device_type: str) -> int:
    """Elements per piece on a device of this type when a stage is not told."""
    return PIECE_SIZE.get(device_type, PIECE_SIZE_OTHER)


@dataclass(frozen=True)
class Pieces:
    """F is local along `dim` of its input (see the module docstring).

    borders: the allowed cut points for a dimension of a given length: an int k (every multiple
      of k) or a function size -> cut points (0 and size are always allowed).
    at: F on a piece that does not cover the whole dimension, `at(x_piece, start, size)`; None: F
      itself.
    """

    dim: int
    borders: int | Callable[[int], Sequence[int]] = 1
    at: PieceFn | None = None

    def cuts(self, size: int) -> list[int]:
        """The sorted cut points in [0, size], 0 and size included."""
        inner = range(self.borders, size, self.borders) if isinstance(self.borders, int) else self.borders(size)
        return sorted({0, size, *(c for c in inner if 0 < c < size)})

    def spans(self, shape: Sequence[int], max_elements: int) -> list[tuple[int, int]]:
        """Consecutive pieces [p0, p1) covering the dimension, each of at most `max_elements`
        elements of a tensor of `shape` where the cut points allow it (at least one group between
        adjacent cut points); one piece when max_elements is 0."""
        size = shape[self.dim]
        if max_elements <= 0 or size == 0:
            return [(0, size)]
        per_index = max(1, _numel(shape) // size)
        longest = max(1, max_elements // per_index)
        cuts = self.cuts(size)
        spans, start, j = [], 0, 0
        while start < size:
            j += 1  # the next cut is always taken, then as many more as fit
            while j + 1 < len(cuts) and cuts[j + 1] - start <= longest:
                j += 1
            spans.append((start, cuts[j]))
            start = cuts[j]
        return spans

    def call(self, fn: Callable[[Tensor], Tensor], x: Tensor, start: int, size: int) -> Tensor:
        """F on the piece x = input[start : start + len] along dim."""
        if self.at is None or (start == 0 and x.shape[self.dim] == size):
            return fn(x)
        return self.at(x, start, size)


def window_cuts(size: int, window: int, shift: int) -> list[int]:
    """Cut points of windowed attention along an axis of length `size`: the window borders
    shift + k * window (with a shift, the group [0, shift) is the head of the window that wraps
    around the end)."""
    return list(range(shift or window, size, window))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
