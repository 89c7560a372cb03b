"""The synthetic stage of `re2tal bench memory|speed`: residual functions shaped like the MLP
branch of a Swin block, run in the three benchmarked modes. Builds modules only."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from re2tal.rev import RevStage


class MlpBranchBlock(nn.Module):
    """x + DropPath(Linear(4C, C)(GELU(Linear(C, 4C)(LayerNorm(x))))), x: (..., C)."""

    def __init__(self, width: int, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.drop_path = StochasticDepth(drop_path, "row")

    def branch(self, x: Tensor) -> Tensor:
        return self.drop_path(self.fc2(F.gelu(self.fc1(self.norm(x)))))

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.branch]

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward (torch activation checkpointing)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def build_synthetic_stage(mode: str, blocks: int, width: int, drop_path: float = 0.1) -> nn.Module:
    """A stage of `blocks` residual functions, each an `MlpBranchBlock`.

    mode: "standard" (nn.Sequential, plain autograd), "checkpoint" (each block checkpointed),
    "reversible" (RevStage, fp32 streams) or "reversible_lowp" (RevStage, streams in the compute
    precision)."""
    layers = [MlpBranchBlock(width, drop_path) for _ in range(blocks)]
    match mode:
        case "standard":
            return nn.Sequential(*layers)
        case "checkpoint":
            return nn.Sequential(*(Checkpointed(b) for b in layers))
        case "reversible" | "reversible_lowp":
            return RevStage(layers, fp32_streams=mode == "reversible")
    raise ValueError(f"unknown mode {mode!r}")
