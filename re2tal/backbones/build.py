"""build_backbone(cfg): the one place that turns a BackboneConfig into a module.

Model files build plain modules; everything about *how* they run is applied here by small
functions: pretrained weights, reversible rewiring, activation checkpointing, frozen stages,
norm_eval.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections import OrderedDict
from types import MethodType

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from re2tal.backbones.base import Backbone
from re2tal.backbones.layouts import to_model_layout
from re2tal.backbones.mvit import MViT
from re2tal.backbones.patch_shift import TemporalPatchShift
from re2tal.backbones.pst import PatchShiftTransformer
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.backbones.slowfast import SlowFast
from re2tal.backbones.swin import SwinTransformer3d
from re2tal.backbones.tada import TAda2D
from re2tal.backbones.video_resnet import VideoResNet
from re2tal.backbones.vit import VisionTransformer
from re2tal.config import BackboneConfig, PatchShiftConfig, StorageConfig
from re2tal.data.storage import filesystem
from re2tal.errors import BadInput
from re2tal.rev import RevStage, checkpointed

# keys under which checkpoint files hold the model's state dict
WRAPPER_KEYS = ("model_state", "state_dict", "model", "module")
log = logging.getLogger(__name__)


def build_backbone(cfg: BackboneConfig, storage: StorageConfig | None = None) -> Backbone:
    """A backbone mapping (B, 3, T, H, W) normalised clips to (B, C, T', H', W') features, with
    attributes out_channels, temporal_stride, spatial_stride. `storage` configures fsspec for
    an object-storage `cfg.pretrained` URL."""
    # The file is read first: some layouts fix how the model is built (SlowFast.checkpoint_options).
    state, meta = read_checkpoint(cfg.pretrained, storage) if cfg.pretrained is not None else (None, {})
    # With weights to load, build on the meta device: random init of ~28M parameters costs
    # seconds and every tensor is replaced by the file's anyway.
    with torch.device("meta") if state is not None else contextlib.nullcontext():
        match cfg.name:
            case "swin_t" | "swin_s" | "swin_b":
                model = swin(cfg, patch_shift=cfg.patch_shift)
            case "pst_t":
                ps = cfg.patch_shift or PatchShiftConfig()
                model = PatchShiftTransformer(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
                                              num_heads=cfg.num_heads, window=cfg.window_size[1:], drop_path=cfg.drop_path,
                                              pattern=ps.pattern, boundary=ps.boundary)
            case "slowfast_r50" | "slowfast_r101":
                opts = {"fusion_kernel": cfg.resolved_fusion_kernel}
                if state is not None:
                    opts |= SlowFast.checkpoint_options(state)
                if cfg.fusion_kernel is not None:  # explicit: a different file is a shape error naming the key
                    opts["fusion_kernel"] = cfg.fusion_kernel
                model = SlowFast(depths=cfg.depths, alpha=cfg.alpha, tadaconv=cfg.tadaconv, **opts)
            case "tada2d_r50":
                model = TAda2D(depths=cfg.depths)
            case "r2plus1d_18" | "r3d_18" | "mc3_18":
                model = VideoResNet(cfg.name, depths=cfg.depths)
            case "mvit_v2_s":
                model = MViT(embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads, drop_path=cfg.drop_path)
            case "vit_s" | "vit_b" | "vit_l" | "vit_h" | "vit_g":
                opts = VisionTransformer.checkpoint_options(state) if state is not None else {}
                adapter = cfg.adapter
                blocks = None if adapter is None else adapter.blocks if adapter.blocks is not None else range(cfg.depths[0])
                model = VisionTransformer(embed_dim=cfg.embed_dim, depth=cfg.depths[0], num_heads=cfg.num_heads[0],
                                          patch_size=cfg.patch_size[1], tubelet=cfg.patch_size[0], mlp_ratio=cfg.mlp_ratio,
                                          drop_path=cfg.drop_path, chunk_frames=cfg.chunk_frames, adapter_blocks=blocks,
                                          adapter_ratio=adapter.ratio if adapter is not None else 0.25, **opts)
            case _:
                raise BadInput(f"backbone.name: unknown backbone {cfg.name!r}")
    if state is not None:
        load_state(model, state, cfg.pretrained)
        if (type(model).trained_reversible(state) or written_reversible(meta)) and not cfg.reversible:
            raise BadInput(f"backbone.pretrained: {cfg.pretrained} holds a Re² (reversible) model, which computes what it was "
                           f"trained for only rewired: set backbone.reversible: true")
    if cfg.reversible:
        apply_reversible(model, cfg.fp32_streams, cfg.piece_size)
    elif cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_frozen_stages(model, cfg.frozen_stages)
    if cfg.freeze == "all_but_adapters":
        apply_freeze_all_but_adapters(model)
    if cfg.norm_eval:
        apply_norm_eval(model)
    return model


def swin(cfg: BackboneConfig, patch_shift: PatchShiftConfig | None) -> SwinTransformer3d:
    """Video Swin with the config's sizes; with patch_shift, TPS in the chosen blocks of its 3-D
    windows (ours, not the authors' PST: that is pst_t)."""

    def tps(stage: int, block: int, cache: ShapeCache) -> TemporalPatchShift | None:
        if patch_shift is None or (patch_shift.blocks == "alternate" and block % 2 == 0):
            return None
        return TemporalPatchShift(patch_shift.pattern, patch_shift.boundary, cache)

    return SwinTransformer3d(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
                             num_heads=cfg.num_heads, window_size=cfg.window_size, drop_path=cfg.drop_path,
                             patch_shift=tps)


# --------------------------------------------------------------------------------------------
# weights


def load_pretrained(model: Backbone, url: str, storage: StorageConfig | None = None) -> list[str]:
    """Load a state dict in the model's checkpoint layout (`model.LAYOUT`) from a path or fsspec
    URL into `model` (on CPU or the meta device; tensors are replaced by the file's, in the
    model's dtypes): `read_checkpoint` then `load_state`; the names of the modules that keep their
    initialisation."""
    return load_state(model, read_checkpoint(url, storage)[0], url)


def written_reversible(meta: dict) -> bool:
    """Whether a file written by `re2tal finetune` holds a backbone fine-tuned in Re² form."""
    return bool(meta.get("re2tal", {}).get("backbone", {}).get("reversible"))


def read_checkpoint(url: str, storage: StorageConfig | None = None) -> tuple[dict[str, Tensor], dict]:
    """The flat state dict of a weight file (path or fsspec URL) and its `meta` dict ({} if
    none). A file holding {"model_state" | "state_dict" | "model": state dict, "meta": ...} is
    unwrapped (pytorchvideo's .pyth: model_state; mmaction's and re2tal finetune's: state_dict;
    the VideoMAE(v2) releases': model / module).
    BadInput names what is wrong."""
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
    meta = {}
    if isinstance(state, dict):
        meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
        state = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BadInput(f"backbone.pretrained: {url} is not a flat state dict of tensors")
    return state, meta


def load_state(model: Backbone, state: dict[str, Tensor], url: str) -> list[str]:
    """Load a file's state dict into `model`. `model.checkpoint_state` maps the model's own
    published layouts (drops the classifier keys by name), `layouts.to_model_layout` the other
    layouts a family loads; any missing or unexpected key after them, or shape mismatch, is
    BadInput naming the key and the file (`url`), except for the modules the file's layout does
    not have (e.g. TAdaConv's route functions in a pytorchvideo SlowFast file): they keep their
    initialisation (`reset_parameters()`) and their names are returned (and logged)."""
    try:
        state = model.checkpoint_state(state)
    except ValueError as err:
        raise BadInput(f"backbone.pretrained: {url}: {err}") from None
    state, absent = to_model_layout(model, state)
    expected = model.state_dict()
    kept = [name for name in absent if not any(k.startswith(name + ".") for k in state)]  # wholly absent only
    from_init = {k for k in expected if any(k.startswith(name + ".") for name in kept)}
    problems = [f"missing key {k}" for k in expected if k not in state and k not in from_init]
    problems += [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {list(v.shape)}, the model needs {list(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BadInput(f"backbone.pretrained: {url}: {'; '.join(problems[:3])}{more}; expected {model.LAYOUT} layout with this config's sizes")
    # assign: the model may live on the meta device (see build_backbone); keep its dtypes.
    state = {k: v.to(dtype=expected[k].dtype, device="cpu" if expected[k].is_meta else expected[k].device) for k, v in state.items()}
    model.load_state_dict(state, strict=not kept, assign=True)
    for name in kept:
        module = model.get_submodule(name)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module.to_empty(device="cpu")
        module.reset_parameters()
    if kept:
        log.info("backbone.pretrained: %s has no %d modules of this model (%s, ...); they keep their initialisation", url, len(kept), kept[0])
    return kept


# --------------------------------------------------------------------------------------------
# how the model runs


def apply_reversible(model: Backbone, fp32_streams: bool = True, piece_size: int | None = 0) -> None:
    """Rewire every residual stage into a reversible RevStage (Re²): a stage's leading blocks
    that change shape run ordinarily (checkpointed; `model.reversible_lead` may change their form,
    e.g. SlowFast's as the authors' Re²SlowFast), post-activation blocks go through ReLU-in; the
    layers between stages (`model.transitions()`: stems, patch embedding / merging, fusions) run
    checkpointed too, so what the model keeps is the streams and the inputs of what is not
    reversible. Parameters and state-dict keys are unchanged. piece_size: see RevStage
    (functions local along a dimension run in pieces)."""
    for parent, name, lead in model.residual_stages():
        stage = getattr(parent, name)
        if type(stage) is not nn.Sequential:
            raise ValueError(f"apply_reversible: {name} is already a {type(stage).__name__}")
        if len(stage) > lead:  # a stage of only shape-changing blocks has nothing to rewire
            blocks = {n: model.reversible_lead(b) if i < lead else model.reversible_block(b)
                      for i, (n, b) in enumerate(stage.named_children())}
            setattr(parent, name, RevStage(blocks, lead=lead, fp32_streams=fp32_streams, piece_size=piece_size))  # keeps the blocks' names
    for name in model.transitions():
        checkpoint_forward(model.get_submodule(name))


def checkpoint_forward(module: nn.Module) -> None:
    """Make `module` run its forward under `checkpointed` (only its inputs kept, BatchNorm
    statistics updated once), in place: the forward is replaced on the instance, so the module,
    its keys and its class stay as they are."""
    module.forward = CheckpointedForward(module)


def builds_graph(module: nn.Module, inputs: tuple) -> bool:
    """Whether module(*inputs) would build an autograd graph (grads on, and an input or a
    parameter that needs grad); without one, a checkpoint would only keep the inputs."""
    return torch.is_grad_enabled() and (any(not isinstance(t, Tensor) or t.requires_grad for t in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


class CheckpointedForward:
    """A module's own forward run under `checkpointed` when grads are on (set as the instance's
    `forward`; a plain class, so the module still deep-copies and pickles)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        forward = MethodType(type(self.module).forward, self.module)
        if not builds_graph(self.module, inputs):  # e.g. a frozen patch embedding on the clip
            return forward(*inputs)
        return checkpointed(forward, *inputs, modules=[self.module])


class CheckpointedSequential(nn.Sequential):
    """nn.Sequential whose blocks run under non-reentrant activation checkpointing when grads
    are needed: only each block's input is kept, the rest is recomputed in backward (RNG state
    replayed, so drop path matches; BatchNorm statistics updated once). A block that needs no
    graph (its input and parameters need no grad: the frozen blocks before AdaTAD's first adapter)
    runs plainly, keeping nothing, as OpenTAD's `with_cp and x.requires_grad`; checkpointed it
    would keep its input. Same state-dict keys as nn.Sequential."""

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = checkpointed(block, x) if builds_graph(block, (x,)) else block(x)
        return x


def apply_activation_checkpointing(model: Backbone) -> None:
    """Per-block activation checkpointing (torch.utils.checkpoint) in every residual stage."""
    for parent, name, _ in model.residual_stages():
        stage = getattr(parent, name)
        if type(stage) is not nn.Sequential:
            raise ValueError(f"apply_activation_checkpointing: {name} is already a {type(stage).__name__}")
        setattr(parent, name, CheckpointedSequential(OrderedDict(stage.named_children())))


def apply_frozen_stages(model: Backbone, frozen_stages: int) -> None:
    """As mmaction / OpenTAD: 0 freezes the stem (patch embedding), k >= 1 also the first k
    stages (with the patch merging / fusion after them). Frozen parts get no gradients and stay
    in eval mode (no drop path, BatchNorm statistics fixed) through `model.train()`. -1: nothing."""
    if frozen_stages < 0:
        return
    names = model.frozen_modules(frozen_stages)
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    model.eval_modules += names
    model.train(model.training)


def apply_freeze_all_but_adapters(model: VisionTransformer) -> None:
    """AdaTAD's `_freeze_layers`: every parameter but the adapters' stops training. The frozen
    blocks stay in training mode, as AdaTAD's drop path does (the ViT has no BatchNorm and no
    dropout, so nothing else differs)."""
    adapters = tuple(name + "." for name in model.adapter_names())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(adapters))


def apply_norm_eval(model: Backbone) -> None:
    """Keep BatchNorm layers in eval mode (running statistics frozen) during training, as
    OpenTAD does when fine-tuning SlowFast on batches of 1-2 long videos.

    Only BatchNorm behaves differently in train and eval; LayerNorm (all of Swin / PST) does not,
    so for those backbones this changes nothing. It is accepted rather than rejected so that one
    config key means the same across backbone families."""
    model.eval_modules += [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    model.train(model.training)
