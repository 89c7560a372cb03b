"""How DeepSpeed 0.19 lays out parameters, gradients and optimizer states on one worker, per
ZeRO stage: the arithmetic `re2tal plan` adds to the measured activations (checked against real
engines in tests/test_plan.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSpeed 0.19's zero_optimization defaults that the layout depends on (re2tal sets only the
# stage and offload; tests/test_plan.py checks these against deepspeed's DeepSpeedZeroConfig).
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "contiguous_gradients": True, "overlap_comm_stage3": True,
                 "param_persistence_threshold": 100_000, "max_reuse_distance": 1_000_000_000,
                 "prefetch_bucket_size": 50_000_000, "round_robin_gradients": False, "parameter_alignment": False}


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes on one worker. parameters: as held during forward / backward (ZeRO-3: partition +
    gathered); parameter_partition: what stays between steps (ZeRO-1/2: the padded flat groups,
    ZeRO-3: DeepSpeed's lp buffer + persistent parameters); master_weights: fp32 copy of this
    worker's partition; moments: Adam's exp_avg + exp_avg_sq; gradient_partition: the gradient
    buffer DeepSpeed reduces into (ZeRO-0/1: the full .grad); gradients: during the backward
    (partition + one parameter's gradient before its copy); buckets: gradient reduction buffers;
    step_gradients: gradients held during the optimizer step; step_transient: the optimizer's
    temporaries."""

    parameters: int
    parameter_partition: int
    master_weights: int
    moments: int
    gradient_partition: int
    gradients: int
    buckets: int
    step_gradients: int
    step_transient: int

    @property
    def optimizer_states(self) -> int:
        return self.master_weights + self.moments


def zero_memory(groups: Sequence[Sequence[int]], other_numel: int, buffer_bytes: int, precision: str, stage: int,
                world: int, rank: int, offload_optimizer: bool = False, zero: dict | None = None) -> ZeroMemory:
    """Per-worker bytes of the DeepSpeed state of a model whose optimizer groups have parameters
    of `groups[g][i]` elements (in order), plus `other_numel` elements of frozen parameters and
    `buffer_bytes` of buffers; on worker `rank` of `world`.

    ZeRO-1/2 (DeepSpeedZeroOptimizer): group g is flattened into n_g' = ceil(n_g / 2W) * 2W
    elements of the model dtype (e bytes); worker r owns [r p_g, (r+1) p_g), p_g = n_g' / W, and
    keeps fp32 master weights (4 p_g) and Adam moments (8 p_g) of it. ZeRO-2 reduces gradients
    into the partition buffer of the parameters overlapping its range (whole parameters), through a
    bucket of reduce_bucket_size elements; ZeRO-1 keeps full gradients until the step. The step
    adds the fp32 gradient partition (4 p_g).
    ZeRO-3: each parameter is split into ceil(n / W) elements per worker (lp buffer), gradient
    partitions likewise, fp32 master (unless the model is fp32: shared) and moments of the
    partition; parameters of at most param_persistence_threshold elements stay whole.
    ZeRO-0: everything whole; bf16 / fp16 add DeepSpeed's fp32 master copy and fp32 step
    gradients."""
    z = {**ZERO_DEFAULTS, **(zero or {})}
    e = torch.empty(0, dtype=DTYPES[precision]).element_size()
    numels = [n for g in groups for n in g]
    total, largest = sum(numels), max(numels, default=0)
    if stage == 0:
        lowp = e != 4
        return ZeroMemory(parameters=(total + other_numel) * e + buffer_bytes, parameter_partition=(total + other_numel) * e + buffer_bytes,
                          master_weights=4 * total if lowp else 0, moments=8 * total, gradient_partition=total * e,
                          gradients=total * e, buckets=0,
                          step_gradients=total * e + (4 * total if lowp else 0), step_transient=4 * largest)
    state_scale = 0 if offload_optimizer else 1
    if stage in (1, 2):
        aligned = [math.ceil(sum(g) / (2 * world)) * 2 * world for g in groups]
        parts = [a // world for a in aligned]
        flat = sum(aligned) * e + other_numel * e + buffer_bytes
        buckets = z["reduce_bucket_size"] * e if z["contiguous_gradients"] else 0
        grad_partition = total * e if stage == 1 else _numel_in_partition(groups, parts, rank) * e
        return ZeroMemory(parameters=flat, parameter_partition=flat, master_weights=4 * sum(parts) * state_scale,
                          moments=8 * sum(parts) * state_scale, gradient_partition=grad_partition,
                          gradients=grad_partition + (largest * e if stage == 2 else 0), buckets=buckets,
                          step_gradients=grad_partition + 4 * sum(parts),
                          step_transient=4 * max(parts, default=0) * state_scale)
    part = [math.ceil(n / world) for n in numels]
    persistent = sum(n for n in numels if n <= z["param_persistence_threshold"])
    other_part = math.ceil(other_numel / world)
    partition = (sum(part) + other_part + persistent) * e + buffer_bytes
    gathered = (total + other_numel - persistent) * e if z["max_reuse_distance"] >= total + other_numel \
        else min(z["prefetch_bucket_size"], total + other_numel) * e + largest * e
    group_parts = [sum(math.ceil(n / world) for n in g) for g in groups]
    return ZeroMemory(parameters=partition + gathered, parameter_partition=partition,
                      master_weights=(0 if e == 4 else 4 * sum(part)) * state_scale, moments=8 * sum(part) * state_scale,
                      gradient_partition=sum(part) * e, gradients=sum(part) * e + largest * e, buckets=z["reduce_bucket_size"] * e if z["contiguous_gradients"] else 0,
                      step_gradients=sum(part) * e + 4 * max(group_parts, default=0),
                      step_transient=4 * max(group_parts, default=0) * state_scale)


def _numel_in_partition(groups: Sequence[Sequence[int]], parts: Sequence[int], rank: int) -> int:
    """Elements of the whole parameters that overlap worker `rank`'s range of each flat group."""
    total = 0
    for numels, p in zip(groups, parts):
        lo, hi, offset = rank * p, (rank + 1) * p, 0
        for n in numels:
            if offset < hi and offset + n > lo:
                total += n
            offset += n
    return total
