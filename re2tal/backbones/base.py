"""What build_backbone needs of a backbone model, whatever its family."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from re2tal.rev import Pieces


def mmaction_backbone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's tensors of an mmaction Recognizer checkpoint's state dict: `backbone.`
    stripped, the classifier (`cls_head.*`) and `data_preprocessor.*` dropped."""
    return {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("cls_head.", "data_preprocessor."))}


def init_linears(model: nn.Module, std: float = 0.02) -> None:
    """Every nn.Linear of `model`: truncated-normal weights (std), zero bias, as the transformers'
    reference code (Swin, PST, MViT) initialises them."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def batch_pieces(block: nn.Module) -> Pieces | None:
    """Where a conv branch with BatchNorm is local: along the batch when none of its BatchNorms
    normalises with the batch's statistics (eval mode, norm_eval, frozen stages), else nowhere.
    For branches that draw no random numbers (the ResNets' bottlenecks)."""
    if any(isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats) for m in block.modules()):
        return None
    return Pieces(0)


class Backbone(nn.Module, metaclass=ABCMeta):
    """A video backbone (B, 3, T, H, W) -> (B, out_channels, T / temporal_stride, H / spatial_stride,
    W / spatial_stride), with the hooks build_backbone uses to load weights and change how it runs.

    `eval_modules`: names of submodules kept in eval mode by `train()` (frozen stages, norm_eval),
    filled from outside by apply_frozen_stages / apply_norm_eval.
    """

    LAYOUT = ""  # the pretrained checkpoint layout, named in weight-loading errors
    CLASSIFIER_KEYS: tuple[str, ...] = ()  # the checkpoint's classifier, dropped by name
    out_channels: int
    temporal_stride: int
    spatial_stride: int

    def __init__(self) -> None:
        super().__init__()
        self.eval_modules: list[str] = []

    @abstractmethod
    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        """(parent, attribute, lead) of every stage of residual blocks: `getattr(parent, attribute)`
        is an nn.Sequential of blocks whose first `lead` change shape (stay ordinary when rewired)."""

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A published checkpoint's state dict under the model's keys, the one place a layout is
        mapped: by default the classifier keys are dropped and nothing is renamed. ValueError
        names what does not fit."""
        return {k: v for k, v in state.items() if k not in self.CLASSIFIER_KEYS}

    @classmethod
    def checkpoint_options(cls, state: dict[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments a published checkpoint fixes (read from its keys and shapes,
        e.g. SlowFast's fusion kernel and whether its fusions have a BatchNorm); build_backbone
        builds the model with them. Config values given explicitly take precedence."""
        return {}

    @classmethod
    def trained_reversible(cls, state: dict[str, Tensor]) -> bool:
        """Whether the checkpoint holds a model trained in Re² (reversible) form: its weights
        compute what they were trained for only when the model is rewired too."""
        return False

    def reversible_block(self, block: nn.Module) -> nn.Module:
        """The block in a form exposing `residual_fns()` and, where they are local, `residual_pieces()`
        (e.g. ReLU-in of a post-activation one, local along the batch: `batch_pieces`)."""
        return block

    def reversible_lead(self, block: nn.Module) -> nn.Module:
        """A stage's leading (shape-changing) block in the Re² model, run before its reversible
        part: by default unchanged."""
        return block

    def transitions(self) -> list[str]:
        """Names of the layers between residual stages that change shape (stems, patch embedding and
        merging, fusions): a Re² model runs them checkpointed, keeping only their inputs."""
        return []

    @abstractmethod
    def frozen_modules(self, stages: int) -> list[str]:
        """Names of the submodules frozen by `frozen_stages = stages` (0: the stem only)."""

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for name in self.eval_modules:
            self.get_submodule(name).eval()
        return self
