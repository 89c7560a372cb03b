"""build_backbone(cfg): the one place that turns a BackboneConfig into a module.

Model files build plain modules; everything about *how* they run is applied here by small
functions: pretrained weights, reversible rewiring, activation checkpointing, frozen stages,
norm_eval.
"""

from __future__ import annotations

import contextlib
import pickle

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from re2tal.backbones.patch_shift import TemporalPatchShift
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.backbones.swin import SwinTransformer3d
from re2tal.config import BackboneConfig, PatchShiftConfig, StorageConfig
from re2tal.data.storage import filesystem
from re2tal.errors import BadInput
from re2tal.rev import RevStage

# torchvision swin3d_t's classifier: dropped by name, every other key must match.
CLASSIFIER_KEYS = ("head.weight", "head.bias")


def build_backbone(cfg: BackboneConfig, storage: StorageConfig | None = None) -> nn.Module:
    """A backbone mapping (B, 3, T, H, W) normalised clips to (B, C, T', H', W') features, with
    attributes out_channels, temporal_stride, spatial_stride. `storage` configures fsspec for
    an object-storage `cfg.pretrained` URL."""
    # With weights to load, build on the meta device: random init of ~28M parameters costs
    # seconds and every tensor is replaced by the file's anyway.
    with torch.device("meta") if cfg.pretrained is not None else contextlib.nullcontext():
        match cfg.name:
            case "swin_t":
                model = swin(cfg, patch_shift=None)
            case "pst_t":
                model = swin(cfg, patch_shift=cfg.patch_shift or PatchShiftConfig())
            case _:
                raise BadInput(f"backbone.name: unknown backbone {cfg.name!r}")
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained, storage)
    if cfg.reversible:
        apply_reversible(model, cfg.fp32_streams)
    elif cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_frozen_stages(model, cfg.frozen_stages)
    if cfg.norm_eval:
        apply_norm_eval(model)
    return model


def swin(cfg: BackboneConfig, patch_shift: PatchShiftConfig | None) -> SwinTransformer3d:
    """Video Swin with the config's sizes; with patch_shift, PST (TPS in the chosen blocks)."""

    def tps(stage: int, block: int, cache: ShapeCache) -> TemporalPatchShift | None:
        if patch_shift is None or (patch_shift.blocks == "alternate" and block % 2 == 0):
            return None
        return TemporalPatchShift(patch_shift.pattern, patch_shift.boundary, cache)

    return SwinTransformer3d(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
                             num_heads=cfg.num_heads, window_size=cfg.window_size, drop_path=cfg.drop_path,
                             patch_shift=tps)


# --------------------------------------------------------------------------------------------
# weights


def load_pretrained(model: nn.Module, url: str, storage: StorageConfig | None = None) -> None:
    """Load a torchvision swin3d_t-layout state dict from a path or fsspec URL into `model` (on
    CPU or the meta device; tensors are replaced by the file's, in the model's dtypes).

    The classifier keys are dropped by name; any other missing or unexpected key or shape
    mismatch is BadInput naming the key and the file."""
    fs, path = filesystem(url, storage or StorageConfig())
    try:
        with fs.open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"backbone.pretrained: {url} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise BadInput(f"backbone.pretrained: {url} is not a torch state dict ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    except OSError as err:
        raise BadInput(f"backbone.pretrained: cannot read {url} ({err.strerror or err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BadInput(f"backbone.pretrained: {url} is not a flat state dict of tensors (expected torchvision swin3d_t layout)")
    state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
    expected = model.state_dict()
    problems = [f"missing key {k}" for k in expected if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {list(v.shape)}, the model needs {list(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BadInput(f"backbone.pretrained: {url}: {'; '.join(problems[:3])}{more}; expected torchvision swin3d_t layout with this config's sizes")
    # assign: the model may live on the meta device (see build_backbone); keep its dtypes.
    state = {k: v.to(dtype=expected[k].dtype, device="cpu" if expected[k].is_meta else expected[k].device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


# --------------------------------------------------------------------------------------------
# how the model runs


def apply_reversible(model: SwinTransformer3d, fp32_streams: bool = True) -> None:
    """Rewire every block stage into a reversible RevStage (Re²); patch embedding and patch
    merging stay ordinary. Parameters and state-dict keys are unchanged."""
    for i in model.stage_blocks():
        stage = model.features[i]
        if not isinstance(stage, nn.Sequential):
            raise ValueError(f"apply_reversible: features.{i} is already a {type(stage).__name__}")
        model.features[i] = RevStage(list(stage), fp32_streams=fp32_streams)


class CheckpointedSequential(nn.Sequential):
    """nn.Sequential whose blocks run under non-reentrant activation checkpointing when grads
    are needed: only each block's input is kept, the rest is recomputed in backward (RNG state
    replayed, so drop path matches). Same state-dict keys as nn.Sequential."""

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


def apply_activation_checkpointing(model: SwinTransformer3d) -> None:
    """Per-block activation checkpointing (torch.utils.checkpoint) in every block stage."""
    for i in model.stage_blocks():
        stage = model.features[i]
        if type(stage) is not nn.Sequential:
            raise ValueError(f"apply_activation_checkpointing: features.{i} is already a {type(stage).__name__}")
        model.features[i] = CheckpointedSequential(*stage)


def apply_frozen_stages(model: SwinTransformer3d, frozen_stages: int) -> None:
    """As mmaction / OpenTAD: 0 freezes the patch embedding, k >= 1 also the first k stages (their
    blocks and the patch merging after them). Frozen parts get no gradients and stay in eval mode
    (no drop path there) through `model.train()`. -1: nothing."""
    if frozen_stages < 0:
        return
    # stage s = features[2 s] (blocks) + features[2 s + 1] (the merge after it, if any)
    names = ["patch_embed"] + [f"features.{i}" for i in range(min(2 * frozen_stages, len(model.features)))]
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    model.eval_modules += names
    model.train(model.training)


def apply_norm_eval(model: SwinTransformer3d) -> None:
    """Keep BatchNorm layers in eval mode (running statistics frozen) during training.

    Only BatchNorm behaves differently in train and eval; LayerNorm (all of Swin / PST) does not,
    so for these backbones this changes nothing. It is accepted rather than rejected so that one
    config key means the same across backbone families."""
    model.eval_modules += [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    model.train(model.training)
