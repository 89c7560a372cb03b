"""Video backbones: Video Swin-T and PST (Swin-T + temporal patch shift), standard or Re²
reversible. `build_backbone(cfg.backbone)` is the entry point."""

from re2tal.backbones.build import (
    apply_activation_checkpointing,
    apply_frozen_stages,
    apply_norm_eval,
    apply_reversible,
    build_backbone,
    load_pretrained,
)
from re2tal.backbones.patch_shift import PATTERNS, TemporalPatchShift
from re2tal.backbones.swin import SwinBlock, SwinTransformer3d

__all__ = [
    "PATTERNS",
    "SwinBlock",
    "SwinTransformer3d",
    "TemporalPatchShift",
    "apply_activation_checkpointing",
    "apply_frozen_stages",
    "apply_norm_eval",
    "apply_reversible",
    "build_backbone",
    "load_pretrained",
]
