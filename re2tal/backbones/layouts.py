"""Published checkpoint layouts mapped onto a backbone's own state-dict keys: the one place where
keys are renamed or tensors reshaped on loading (`load_pretrained` calls `to_model_layout`).

- TAda2D, official TAdaConv checkpoint: `{"model_state": {"backbone.<key>": ..., "head.out.*"}}`;
  the backbone keys are the model's own behind the `backbone.` prefix (dropped here; the
  classifier is dropped by the loader).
- TAda2D from a torchvision `resnet50` state dict (ImageNet, the paper's initialisation), mapped
  as the official `convert_resnet_weights` (tadaconv/utils/checkpoint.py) does; the route
  functions `b_rf` and the aggregation BN `b_avgpool_bn` are not in the file and keep their
  (zero) initialisation.
- SlowFast with TAdaConv from a pytorchvideo file: keys unchanged; the route functions
  `conv_b_rf` keep their initialisation.
- VideoMAE / VideoMAEv2 ViTs (vit.py maps their names): AdaTAD's adapters are not in the file and
  keep their initialisation.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from re2tal.backbones.base import Backbone
from re2tal.backbones.slowfast import SlowFast
from re2tal.backbones.tada import RouteFunc, TAda2D, ZeroInitBatchNorm3d
from re2tal.backbones.vit import Adapter, VisionTransformer

State = dict[str, Tensor]
OFFICIAL_PREFIX = "backbone."
STEM = re.compile(r"(?P<module>conv1|bn1)\.(?P<tensor>\w+)")
BLOCK = re.compile(r"layer(?P<layer>\d+)\.(?P<block>\d+)\.(?:downsample\.(?P<shortcut>[01])|(?P<module>conv|bn)(?P<index>[123]))\.(?P<tensor>\w+)")


def to_model_layout(model: Backbone, state: State) -> tuple[State, list[str]]:
    """(state with the model's keys, names of the model's submodules the file's layout does not
    have: they keep their initialisation if the file has none of their keys)."""
    match model:
        case TAda2D():
            if state and all(k.startswith(OFFICIAL_PREFIX) for k in state):
                return {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items()}, []
            if "layer1.0.conv1.weight" in state:
                return resnet_to_tada2d(state), _names(model, (RouteFunc, ZeroInitBatchNorm3d))
        case SlowFast():
            return state, _names(model, (RouteFunc,))
        case VisionTransformer():  # a VideoMAE file has no adapters
            return state, _names(model, (Adapter,))
    return state, []


def _names(model: Backbone, types: tuple[type, ...]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, types)]


def resnet_to_tada2d(state: State) -> State:
    """torchvision ResNet (Bottleneck) keys -> TAda2D keys; 2-D kernels get a temporal axis of 1,
    the 3x3 ones (`b`, the TAdaConv2d) the official (1, 1, C_out, C_in, 3, 3) shape:

        conv1.weight                    -> conv1.a.weight               (64, 3, 1, 7, 7)
        bn1.*                           -> conv1.a_bn.*
        layer{L}.{i}.conv{1,2,3}.weight -> conv{L+1}.res_{i+1}.conv_branch.{a,b,c}.weight
        layer{L}.{i}.bn{1,2,3}.*        -> conv{L+1}.res_{i+1}.conv_branch.{a,b,c}_bn.*
        layer{L}.{i}.downsample.0.weight -> conv{L+1}.res_{i+1}.short_cut.weight
        layer{L}.{i}.downsample.1.*     -> conv{L+1}.res_{i+1}.short_cut_bn.*

    Files saved before torch 0.4.1 (resnet50-19c8e357.pth, the official code's download) have
    no BatchNorm `num_batches_tracked`: it is set to 0. Other keys pass unchanged (so the loader
    reports them as unexpected)."""
    out: State = {}
    for key, value in state.items():
        if m := STEM.fullmatch(key):
            conv = m["module"] == "conv1"
            key, value = f"conv1.{'a' if conv else 'a_bn'}.{m['tensor']}", value.unsqueeze(2) if conv else value
        elif m := BLOCK.fullmatch(key):
            block = f"conv{int(m['layer']) + 1}.res_{int(m['block']) + 1}"
            if m["shortcut"] is not None:
                conv = m["shortcut"] == "0"
                key, value = f"{block}.short_cut{'' if conv else '_bn'}.{m['tensor']}", value.unsqueeze(2) if conv else value
            else:
                letter = "abc"[int(m["index"]) - 1]
                if m["module"] == "conv":
                    key, value = f"{block}.conv_branch.{letter}.{m['tensor']}", value[None, None] if letter == "b" else value.unsqueeze(2)
                else:
                    key = f"{block}.conv_branch.{letter}_bn.{m['tensor']}"
        out[key] = value
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return out
