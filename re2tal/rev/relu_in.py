"""ReLU-in: make a post-activation residual block usable in a reversible stage.

A post-activation block computes y = ReLU(x + F(x)), which is not of the residual form
x + G(x) and cannot be inverted step by step. Moving the ReLU into the branch gives

    y = x + ReLU(F(x)),

a residual function G = ReLU o F with the block's own parameters (Re²TAL, "ReLU-in").
A block with a projecting shortcut P, ReLU(P(x) + F(x)), becomes P(x) + ReLU(F(x)) (`shortcut`):
not invertible, it runs before a reversible stage, as the authors' Re²SlowFast does with each
stage's first block (OpenTAD re2tal_slowfast.py, Bottleneck3d_inv with a downsample).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from re2tal.rev.pieces import Pieces

Branch = Callable[[nn.Module, Tensor], Tensor]


class ReluIn(nn.Module):
    """x -> x + ReLU(F(x)) for a post-activation block ReLU(x + F(x)) with an identity shortcut.

    block: the original block; its children are adopted under their own names, so the state-dict
      keys (and the parameter objects) are exactly the block's.
    branch: F, either the name of the child that computes it (pytorchvideo's ResBlock: "branch2")
      or a function `branch(module, x)` of a module holding those children, e.g. for torchvision's
      Bottleneck `lambda m, x: m.bn3(m.conv3(m.relu(m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x))))))))`.
      A function must reach the block's submodules only through `module` (not a closure over the
      old block), so copies of the ReluIn module stay self-contained.
    shortcut: None for the identity; else P as a function `shortcut(module, x)` (same rules as a
      branch function), e.g. `lambda m, x: m.branch1_norm(m.branch1_conv(x))`; then the module
      has no `residual_fns()` use (it is not of the form x + G(x)) and runs as a leading block.
    pieces: where G is local, `pieces(module) -> Pieces | None`, asked at every forward (e.g. the
      batch when no BatchNorm of the branch is in training mode); None: nowhere.
    """

    def __init__(self, block: nn.Module, branch: str | Branch, shortcut: Branch | None = None,
                 pieces: Callable[[nn.Module], Pieces | None] | None = None):
        super().__init__()
        own = [n for n, _ in block.named_parameters(recurse=False)] + [n for n, _ in block.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"ReluIn: {type(block).__name__} holds tensors outside its children ({', '.join(own)}); only children are adopted")
        for name, child in block.named_children():
            self.add_module(name, child)
        if isinstance(branch, str) and not isinstance(getattr(self, branch, None), nn.Module):
            raise ValueError(f"ReluIn: {type(block).__name__} has no child {branch!r}")
        self._branch = branch  # underscore: must not clash with an adopted child
        self._shortcut = shortcut
        self._pieces = pieces

    def residual_fn(self, x: Tensor) -> Tensor:
        """ReLU(F(x)), same shape as x."""
        f = getattr(self, self._branch)(x) if isinstance(self._branch, str) else self._branch(self, x)
        return F.relu(f)

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.residual_fn]

    def residual_pieces(self) -> list[Pieces | None]:
        return [None if self._pieces is None else self._pieces(self)]

    def forward(self, x: Tensor) -> Tensor:
        return (x if self._shortcut is None else self._shortcut(self, x)) + self.residual_fn(x)


def relu_in(block: nn.Module, branch: str | Branch, shortcut: Branch | None = None,
            pieces: Callable[[nn.Module], Pieces | None] | None = None) -> ReluIn:
    """`ReluIn(block, branch, shortcut, pieces)`: the ReLU-in form of a post-activation residual block."""
    return ReluIn(block, branch, shortcut, pieces)
