"""Rewiring residual stages into reversible ones (Re²TAL). Knows nothing of particular models.

- `RevStage(blocks, lead=0, fp32_streams=True)`: a reversible stage from blocks exposing
  `residual_fns()`, after `lead` ordinary blocks (e.g. a ResNet stage's strided first block).
- `ReluIn` / `relu_in(block, branch)`: a post-activation block ReLU(x + F(x)) as x + ReLU(F(x)).
- `checkpointed(module, x)`: activation checkpointing that updates BatchNorm statistics once.
"""

from re2tal.rev.relu_in import ReluIn, relu_in
from re2tal.rev.stage import RevStage, checkpointed

__all__ = ["RevStage", "ReluIn", "checkpointed", "relu_in"]
