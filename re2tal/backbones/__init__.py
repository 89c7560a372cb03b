"""Video backbones: Video Swin-T / S / B (optionally with TPS in their 3-D windows, ours), PST-T
as its authors built it, SlowFast-R50 / R101 (with or without TAdaConv), TAda2D-R50, torchvision's
video ResNet-18s (R(2+1)D, R3D, MC3), MViTv2-S and the VideoMAE(v2) ViTs with AdaTAD's temporal
adapters, standard or Re² reversible.
`build_backbone(cfg.backbone)` is the entry point."""

from re2tal.backbones.build import (
    apply_activation_checkpointing,
    apply_frozen_stages,
    apply_norm_eval,
    apply_reversible,
    build_backbone,
    load_pretrained,
)
from re2tal.backbones.base import Backbone
from re2tal.backbones.mvit import MViT
from re2tal.backbones.patch_shift import PATTERNS, TemporalPatchShift
from re2tal.backbones.pst import PatchShiftTransformer, PSTBlock
from re2tal.backbones.slowfast import SlowFast
from re2tal.backbones.swin import SwinBlock, SwinTransformer3d
from re2tal.backbones.tada import RouteFunc, TAda2D, TAdaConv2d
from re2tal.backbones.video_resnet import VideoResNet
from re2tal.backbones.vit import VisionTransformer

__all__ = [
    "PATTERNS",
    "RouteFunc",
    "Backbone",
    "MViT",
    "PSTBlock",
    "PatchShiftTransformer",
    "SlowFast",
    "SwinBlock",
    "SwinTransformer3d",
    "TAda2D",
    "TAdaConv2d",
    "TemporalPatchShift",
    "VideoResNet",
    "VisionTransformer",
    "apply_activation_checkpointing",
    "apply_frozen_stages",
    "apply_norm_eval",
    "apply_reversible",
    "build_backbone",
    "load_pretrained",
]
