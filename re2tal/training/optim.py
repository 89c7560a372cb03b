"""Optimizer parameter groups, the learning-rate schedule and the DeepSpeed engine config."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from re2tal.config import Config, OptimConfig


# position-bias tables (Swin / PST's; MViTv2's decomposed relative ones, without weight decay in its
# reference code as in torchvision's recipe)
POSITION_TABLES = ("relative_position_bias_table", ".rel_pos_h", ".rel_pos_w", ".rel_pos_t")


def param_groups(backbone: nn.Module, head: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Optimizer groups: backbone and head at their own learning rates, and within each, no weight
    decay for biases, norms and other 1-D parameters or position-bias tables (in the backbone too
    unless `backbone_decay_all`). Frozen parameters (requires_grad=False) are left out."""
    groups = []
    for part, module, lr in (("backbone", backbone, cfg.backbone_lr), ("head", head, cfg.head_lr)):
        decay_all = part == "backbone" and cfg.backbone_decay_all
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if not decay_all and (p.ndim <= 1 or name.endswith(POSITION_TABLES)) else decay).append(p)
        for params, wd, kind in ((decay, cfg.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{part}.{kind}"})
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float, from_zero: bool = False) -> Callable[[int], float]:
    """lr multiplier at optimizer step s (the first is 0): linear warmup over W = `warmup_steps`,
    m(s) = (s + 1) / W, or with `from_zero` m(s) = s / (W - 1) (OpenTAD's, first step at 0, the peak
    at W - 1); then cosine decay to r = `min_ratio` at `total_steps`:
    m(s) = r + (1 - r) * (1 + cos(pi * p)) / 2,  p = (s - W) / (total - W)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / (warmup_steps - 1) if from_zero and warmup_steps > 1 else (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def scheduler_factory(cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """DeepSpeed calls this with its wrapped optimizer; it steps the scheduler once per optimizer
    step and saves it in checkpoints. The schedule spans `cfg.cosine_epochs` (default: `epochs`)."""
    total = round(steps_per_epoch * (cfg.cosine_epochs or epochs))
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    schedule = warmup_cosine(total, warmup, cfg.min_lr_ratio, cfg.warmup_from_zero)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The engine config of one worker, from the deepspeed / optim / data sections."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "optimizer": optimizer_config(cfg.optim),
        # ZeRO partitions any elementwise optimizer; DeepSpeed lists only its Adam family as tested
        "zero_allow_untested_optimizer": cfg.optim.optimizer == "sgd",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def optimizer_config(cfg: OptimConfig) -> dict[str, Any]:
    """DeepSpeed's `optimizer` entry: torch's AdamW, or torch's SGD (a type DeepSpeed does not
    know is taken from torch.optim)."""
    if cfg.optimizer == "sgd":
        return {"type": "SGD", "params": {"lr": cfg.head_lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}}
    return {
        "type": "AdamW",
        "params": {
            "lr": cfg.head_lr,
            "betas": list(cfg.betas),
            "weight_decay": cfg.weight_decay,
            # torch's AdamW: DeepSpeed's fused Adam would JIT-compile an op on every new
            # node (and needs nvcc in the GPU image).
            "torch_adam": True,
        },
    }
