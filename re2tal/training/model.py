"""The localizer: backbone (reversible or not) feeding the detection head, and its EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from re2tal.config import Config
from re2tal.detection import DetectorOutput, build_detector


class Localizer(nn.Module):
    """frames (B, 3, N, H, W), normalised -> backbone features (B, C, N', H', W') -> detector."""

    def __init__(self, backbone: nn.Module, detector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.detector = detector

    def forward(self, frames_B3NHW: torch.Tensor, valid_B: torch.Tensor) -> DetectorOutput:
        """valid_B: fraction of each clip's frames that are real (the rest is end padding)."""
        return self.detector(self.backbone(frames_B3NHW), valid_B)


def build_model(cfg: Config) -> Localizer:
    from re2tal.backbones import build_backbone

    backbone = build_backbone(cfg.backbone, cfg.storage)
    return Localizer(backbone, build_detector(cfg.head, backbone.out_channels))


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


def detach_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()
