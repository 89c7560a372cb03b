"""Rewiring residual stages into reversible ones (Re²TAL). Knows nothing of particular models.

- `RevStage(blocks, lead=0, fp32_streams=True, piece_size=0)`: a reversible stage from blocks
  exposing `residual_fns()` (and, optionally, `residual_pieces()`), after `lead` ordinary blocks
  (e.g. a ResNet stage's strided first block).
- `Pieces(dim, borders, at)`: a residual function declared local along a dimension, run piece by
  piece in the reversible forward and backward (`re2tal.rev.pieces`).
- `ReluIn` / `relu_in(block, branch)`: a post-activation block ReLU(x + F(x)) as x + ReLU(F(x)).
- `checkpointed(fn, *inputs)`: activation checkpointing that updates BatchNorm statistics once.
"""

from re2tal.rev.pieces import Pieces
from re2tal.rev.relu_in import ReluIn, relu_in
from re2tal.rev.stage import RevStage, checkpointed

__all__ = ["Pieces", "RevStage", "ReluIn", "checkpointed", "relu_in"]
