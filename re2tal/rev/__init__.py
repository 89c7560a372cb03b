"""Rewiring residual stages into reversible ones (Re²TAL). Knows nothing of particular models.

- `RevStage(blocks, fp32_streams=True)`: a reversible stage from blocks exposing `residual_fns()`.
- `ReluIn` / `relu_in(block, branch)`: a post-activation block ReLU(x + F(x)) as x + ReLU(F(x)).
"""

from re2tal.rev.relu_in import ReluIn, relu_in
from re2tal.rev.stage import RevStage

__all__ = ["RevStage", "ReluIn", "relu_in"]
