"""Exponential moving average of a model's weights, for evaluation."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers, kept in
    fp32 beside the (possibly bf16) engine weights: ema = d * ema + (1 - d) * w after each
    optimizer step. Evaluation swaps it in (`swapped_in`)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}

    def swapped_in(self, model: nn.Module):
        """Context manager: the model holds the EMA weights inside, its own weights after."""
        return _Swap(model, self.shadow)


class _Swap:
    def __init__(self, model: nn.Module, shadow: dict[str, torch.Tensor]):
        self.model, self.shadow = model, shadow

    def __enter__(self):
        state = self.model.state_dict()
        self.saved = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        return self.model

    def __exit__(self, *exc):
        state = self.model.state_dict()
        with torch.no_grad():
            for k, v in self.saved.items():
                state[k].copy_(v)
        return False
