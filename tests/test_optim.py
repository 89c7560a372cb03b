"""Optimizer groups and the learning-rate schedule, against a port of OpenTAD's (github:sming256/OpenTAD
at 3dd7b03): `opentad/cores/scheduler.py` LinearWarmupCosineAnnealingLR (lines 33-126, the
chainable `get_lr` its training loop uses, stepped once per iteration) and
`opentad/cores/optimizer.py` get_backbone_optim_groups (lines 59-143: one backbone group, every
parameter decayed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from re2tal.config import OptimConfig
from re2tal.training.optim import param_groups, scheduler_factory


class PortLinearWarmupCosineAnnealingLR(torch.optim.lr_scheduler._LRScheduler):
    """OpenTAD's scheduler.py:33-126 (warmup_start_lr 0, eta_min 1e-8), the chainable form."""

    def __init__(self, optimizer, warmup_epoch, max_epoch, warmup_start_lr=0.0, eta_min=1e-8, last_epoch=-1):
        self.warmup_epoch, self.max_epoch, self.warmup_start_lr, self.eta_min = warmup_epoch, max_epoch, warmup_start_lr, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0:
            return [self.warmup_start_lr] * len(self.base_lrs)
        if self.last_epoch < self.warmup_epoch:
            return [g["lr"] + (b - self.warmup_start_lr) / (self.warmup_epoch - 1) for b, g in zip(self.base_lrs, self.optimizer.param_groups)]
        if self.last_epoch == self.warmup_epoch:
            return self.base_lrs
        if (self.last_epoch - 1 - self.max_epoch) % (2 * (self.max_epoch - self.warmup_epoch)) == 0:
            return [g["lr"] + (b - self.eta_min) * (1 - math.cos(math.pi / (self.max_epoch - self.warmup_epoch))) / 2
                    for b, g in zip(self.base_lrs, self.optimizer.param_groups)]
        return [(1 + math.cos(math.pi * (self.last_epoch - self.warmup_epoch) / (self.max_epoch - self.warmup_epoch)))
                / (1 + math.cos(math.pi * (self.last_epoch - self.warmup_epoch - 1) / (self.max_epoch - self.warmup_epoch)))
                * (g["lr"] - self.eta_min) + self.eta_min for g in self.optimizer.param_groups]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def learning_rates(scheduler, optimizer, steps: int) -> list[list[float]]:
    """The lr of each group at every optimizer step, stepping the scheduler after each."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("iters, warmup, max_epoch, end_epoch", [(3, 5, 15, 15), (2, 5, 1500, 120)],
                         ids=["activitynet", "thumos"])
def test_schedule_equals_opentads_linear_warmup_cosine(iters, warmup, max_epoch, end_epoch):
    model = Model()
    cfg = OptimConfig(backbone_lr=1e-5, head_lr=1e-4, warmup_epochs=warmup, warmup_from_zero=True,
                      cosine_epochs=max_epoch, backbone_decay_all=True)
    ours = torch.optim.AdamW(param_groups(model.backbone, model.head, cfg))
    scheduler = scheduler_factory(cfg, iters, end_epoch)(ours)
    theirs = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": 1e-5}, {"params": model.head.parameters(), "lr": 1e-4}])
    port = PortLinearWarmupCosineAnnealingLR(theirs, warmup * iters, max_epoch * iters)
    got, want = learning_rates(scheduler, ours, end_epoch * iters), learning_rates(port, theirs, end_epoch * iters)
    backbone = [g["name"].startswith("backbone") for g in ours.param_groups]
    for step, (g, w) in enumerate(zip(got, want)):
        mine = [lr for lr, b in zip(g, backbone) if b][0], [lr for lr, b in zip(g, backbone) if not b][0]
        assert mine == pytest.approx(w, rel=1e-6, abs=1.1e-8), (step, mine, w)  # eta_min 1e-8 vs our floor 0
    assert want[0] == [0.0, 0.0] and got[warmup * iters - 1] == pytest.approx([g["initial_lr"] for g in ours.param_groups], rel=1e-9)


def test_backbone_decay_all_decays_norms_and_biases_of_the_backbone_only():
    model = Model()
    default = {g["name"]: len(g["params"]) for g in param_groups(model.backbone, model.head, OptimConfig())}
    assert default == {"backbone.decay": 1, "backbone.no_decay": 3, "head.decay": 1, "head.no_decay": 1}
    groups = param_groups(model.backbone, model.head, OptimConfig(backbone_decay_all=True))
    assert {g["name"]: (len(g["params"]), g["weight_decay"]) for g in groups} == \
        {"backbone.decay": (4, 0.05), "head.decay": (1, 0.05), "head.no_decay": (1, 0.0)}
