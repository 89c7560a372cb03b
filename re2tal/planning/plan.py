"""`re2tal plan`: the peak device memory of one training step per worker, predicted without a GPU.

The step is the one the training loop runs: the worker's clip in the training precision ->
backbone -> detector -> loss -> backward -> optimizer step, in a DeepSpeed engine with the
config's ZeRO stage and worker count. Two parts:

- Activations and the backward's transient peak are *measured*, not estimated: the real model
  code runs forward and backward on the meta device (shapes, no data; `re2tal.planning.memory`)
  with the clip size, batch, precision and backbone mode of the config, attention running the
  kernels of the target device (CUDA when `train.use_gpu`, else CPU). The tracker's high-water
  mark of live tensors includes what recomputation (per-block checkpointing, reversible stages)
  allocates in the backward. The detection loss is replaced by the sum of the head's outputs (its
  own tensors are (B, ~2 seq_len, classes) floats); parameter gradients are released as soon as
  they are accumulated, DeepSpeed copying them into its buffers, which are counted below.
- Parameters, gradients and optimizer states are computed the way DeepSpeed 0.19 lays them out
  (`re2tal.planning.zero_layout`): ZeRO-1/2 flat parameter groups padded to 2 x workers
  elements, this worker's partition of fp32 master weights and Adam moments; ZeRO-2's partition
  of gradients plus the reduction bucket (`reduce_bucket_size` elements); ZeRO-3's parameter partitions plus gathered
  parameters (with DeepSpeed's default `stage3_max_reuse_distance` a model under 1e9 parameters
  stays gathered through forward and backward), gradient partitions and bucket.

peak = max(input phase, forward + backward, optimizer step), with
  forward + backward = parameters + gradients + optimizer states + buffers + clip
                       + max live tensors of forward and backward (activations kept + transient)
  optimizer step     = parameters + optimizer states + gradients held for the step (fp32 partition
                       included) + the optimizer's temporaries (one fp32 partition) + clip
  input phase        = parameters + optimizer states + the uint8 batch (frames decoded at
                       short_side x short_side, a lower bound for wider videos) + its float32
                       augmented copy + the clip in the training precision.

Not seen (budget a margin): the CUDA context and NCCL buffers (typically 0.5-1.5 GB per GPU), the
caching allocator's fragmentation, cuDNN / cuBLAS workspaces, kernel choices other than attention
(cuDNN attention on Hopper is not modelled), memory a kernel allocates outside the dispatcher. GB
here is 2^30 bytes, as `peak_memory_gb` (torch.cuda.max_memory_allocated / 2^30).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from re2tal.config import Config
from re2tal.training.optim import param_groups
from re2tal.planning.zero_layout import DTYPES, zero_memory
from re2tal.rev.pieces import default_piece_size

MODES = ("standard", "checkpoint", "reversible")
GB = 2**30
MAX_FRAMES = 1 << 16  # the search for the largest num_frames stops here


# --------------------------------------------------------------------------------------------
# the step on the meta device


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one forward + backward measured on the meta device: activations kept for backward
    by the backbone and by the head, and the high-water mark of live tensors (activations,
    outputs, recomputation, gradients in flight)."""

    activations_backbone: int
    activations_head: int
    peak: int

    @property
    def transient(self) -> int:
        return max(0, self.peak - self.activations_backbone - self.activations_head)


def optimizer_groups(model: nn.Module, cfg: Config) -> tuple[list[list[int]], int, int]:
    """What `zero_memory` needs of a Localizer: the element counts of the optimizer groups'
    parameters (as the training loop hands them to DeepSpeed), the frozen parameters' elements,
    and the buffers' bytes in the training precision (DeepSpeed casts floating buffers too)."""
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model.backbone, model.detector, cfg.optim)]
    other = sum(p.numel() for p in model.parameters()) - sum(map(sum, groups))
    e = DTYPES[cfg.deepspeed.precision].itemsize
    buffer_bytes = sum(b.numel() * (e if b.is_floating_point() else b.element_size()) for b in model.buffers())
    return groups, other, buffer_bytes


def mode_of(cfg: Config) -> str:
    return "reversible" if cfg.backbone.reversible else "checkpoint" if cfg.backbone.activation_checkpointing else "standard"


def with_mode(cfg: Config, mode: str, device_type: str) -> Config:
    """cfg with the backbone run in `mode`, without pretrained weights (the plan reads none), its
    reversible pieces the size they would have on `device_type` (the meta device has no default)."""
    piece_size = default_piece_size(device_type) if cfg.backbone.piece_size is None else cfg.backbone.piece_size
    backbone = cfg.backbone.model_copy(update={"reversible": mode == "reversible", "activation_checkpointing": mode == "checkpoint",
                                               "pretrained": None, "piece_size": piece_size})
    return cfg.model_copy(update={"backbone": backbone})


class Planner:
    """Memory of the config's training step in each backbone mode and at any num_frames, one
    meta-device model per mode, evaluations cached."""

    def __init__(self, cfg: Config, build_model: Callable[[Config], nn.Module]):
        self.cfg, self.build_model = cfg, build_model
        self.device_type = "cuda" if cfg.train.use_gpu else "cpu"
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.world = max(1, cfg.train.num_workers)
        self.models: dict[str, nn.Module] = {}
        self.steps: dict[tuple[str, int], StepMemory] = {}
        self.layouts: dict = {}  # meta-kernel output layouts, shared by all evaluations
        with torch.device("meta"):
            model = build_model(with_mode(cfg, "standard", self.device_type))
        groups, other, buffer_bytes = optimizer_groups(model, cfg)
        ds = cfg.deepspeed
        self.zero = max((zero_memory(groups, other, buffer_bytes, ds.precision, ds.zero_stage, self.world, r, ds.offload_optimizer)
                         for r in range(self.world)), key=lambda z: (z.gradients, z.parameters))
        self.parameter_count = sum(p.numel() for p in model.parameters())

    def model(self, mode: str) -> nn.Module:
        if mode not in self.models:
            with torch.device("meta"):
                model = self.build_model(with_mode(self.cfg, mode, self.device_type))
            self.models[mode] = model.to(self.dtype).train()
        return self.models[mode]

    def step(self, mode: str, num_frames: int) -> StepMemory:
        key = (mode, num_frames)
        if key not in self.steps:
            b, s = self.cfg.data.batch_size, self.cfg.data.frame_size
            self.steps[key] = measure_step(self.model(mode), (b, 3, num_frames, s, s), self.dtype, self.device_type,
                                           keep_grads=False, layouts=self.layouts)
        return self.steps[key]

    def plan(self, mode: str, num_frames: int) -> "ModePlan":
        """The per-worker breakdown and peak of the step in `mode` at `num_frames`."""
        z, step = self.zero, self.step(mode, num_frames)
        d = self.cfg.data
        clip = d.batch_size * 3 * num_frames * d.frame_size**2
        short = d.short_side or d.frame_size
        states = z.parameters + z.optimizer_states
        uint8_frames = d.batch_size * num_frames * short**2 * 3
        peaks = {
            # the uint8 batch, then its float32 augmented copy, then the cast clip
            "input": z.parameter_partition + z.optimizer_states + 4 * clip + max(uint8_frames, clip * self.dtype.itemsize),
            "forward_backward": states + z.gradients + z.buckets + clip * self.dtype.itemsize + step.peak,
            "optimizer_step": states + z.step_gradients + z.step_transient + clip * self.dtype.itemsize,
        }
        return ModePlan(mode=mode, num_frames=num_frames, parameters=z.parameters, gradients=z.gradients,
                        optimizer_states=z.optimizer_states, zero_buffers=z.buckets,
                        activations_backbone=step.activations_backbone, activations_head=step.activations_head,
                        backward_transient=step.transient, input_clip=clip * self.dtype.itemsize, phase_peaks=peaks)

    def largest_frames(self, mode: str, limit_bytes: int) -> int:
        """The largest num_frames (a multiple of the backbone's `frame_multiple`: its temporal stride,
        a ViT's chunk_frames; at most MAX_FRAMES) whose
        peak fits `limit_bytes`; 0 if not even one stride does. The peak grows with num_frames,
        about linearly: a bracketed secant search, usually 3-5 evaluations."""
        stride = self.cfg.backbone.frame_multiple
        known: dict[int, int] = {}
        lo, hi = 0, None  # lo fits (0: nothing known to fit), hi does not

        def probe(t: int) -> None:
            nonlocal lo, hi
            known[t] = self.plan(mode, t).peak
            if known[t] <= limit_bytes:
                lo = max(lo, t)
            else:
                hi = t if hi is None else min(hi, t)

        t0 = max(stride, self.cfg.data.num_frames // stride * stride)
        first = {t0, max(stride, t0 // 2 // stride * stride)}
        for t in sorted(first if len(first) == 2 else first | {2 * t0}):
            probe(t)
        span = None  # the bracket's width before the last probe
        while hi is None or hi - lo > stride:
            if hi is None and lo >= MAX_FRAMES:
                return MAX_FRAMES
            pts = sorted(known.items())
            if lo and hi is not None:
                (ta, ma), (tb, mb) = (lo, known[lo]), (hi, known[hi])
            else:
                (ta, ma), (tb, mb) = pts[-2:] if hi is None else pts[:2]
            slope = max((mb - ma) / (tb - ta), 1.0)
            guess = int(ta + (limit_bytes - ma) / slope) // stride * stride
            upper = MAX_FRAMES if hi is None else hi - stride
            if hi is not None and span is not None and hi - lo > span // 2:  # the secant crept: bisect
                guess = (lo + hi) // 2 // stride * stride
            guess = min(max(guess, lo + stride), upper)
            if guess in known:
                guess = min(max((lo + (hi if hi is not None else 2 * lo)) // 2 // stride * stride, lo + stride), upper)
            span = None if hi is None else hi - lo
            probe(guess)
        return lo


@dataclass
class ModePlan:
    """One column of the plan: bytes per worker."""

    mode: str
    num_frames: int
    parameters: int
    gradients: int
    optimizer_states: int
    zero_buffers: int
    activations_backbone: int
    activations_head: int
    backward_transient: int
    input_clip: int
    phase_peaks: dict[str, int] = field(default_factory=dict)
    largest_num_frames: int | None = None

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)


def measure_step(model: nn.Module, clip_shape: Sequence[int], dtype: torch.dtype, device_type: str, keep_grads: bool,
                 layouts: dict | None = None) -> StepMemory:
    """Forward and backward of a Localizer on the meta device (see the module docstring), or of a
    backbone alone (a model without `.detector`: the output's sum is the loss). keep_grads:
    parameter gradients stay in `.grad` as in plain autograd; else they are freed once accumulated."""
    from re2tal.planning.memory import LiveBytes, SavedTensors, TargetAttention, run_backward

    device = next(model.parameters()).device
    frames = torch.empty(tuple(clip_shape), device=device, dtype=dtype)
    valid = torch.ones(clip_shape[0], device=device)
    tensors = [*model.parameters(), *model.buffers()]
    live = LiveBytes(exclude=[*tensors, frames, valid], layouts=layouts)
    saved = SavedTensors(exclude=tensors)
    hooks = [] if keep_grads else [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", model)
    detector = getattr(model, "detector", None)
    try:
        with TargetAttention(device_type), live:
            with saved:
                feats = backbone(frames)
            saved.add_graph([feats])
            backbone_bytes = saved.total_bytes
            if detector is None:
                loss = feats.float().sum()
            else:
                with saved:
                    out = detector(feats, valid)
                outputs = [*out.cls_logits, *out.offsets] + ([out.frame_logits] if out.frame_logits is not None else [])
                loss = sum(o.float().sum() for o in outputs)
                del out, outputs
            del feats
            saved.add_graph([loss])
            head_bytes = saved.total_bytes - backbone_bytes
            run_backward([loss], [torch.ones_like(loss)])
            del loss
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return StepMemory(activations_backbone=backbone_bytes, activations_head=head_bytes, peak=live.peak)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


# --------------------------------------------------------------------------------------------
# the command


@dataclass
class Plan:
    config: dict[str, Any]
    modes: dict[str, ModePlan]
    gpu_memory_gb: float
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        limit = self.gpu_memory_gb * GB
        modes = {}
        for name, p in self.modes.items():
            d = asdict(p)
            d.update(peak_bytes=p.peak, peak_gb=p.peak / GB, peak_phase=p.peak_phase, fits=p.peak <= limit)
            modes[name] = d
        return {"config": self.config, "gpu_memory_gb": self.gpu_memory_gb, "modes": modes, "seconds": self.seconds}


def make_plan(cfg: Config, build_model: Callable[[Config], nn.Module], gpu_memory_gb: float, modes: Sequence[str] = MODES,
              search: bool = True) -> Plan:
    """The step's memory in each mode at the config's num_frames, and (search) the largest
    num_frames that fits gpu_memory_gb."""
    started = time.perf_counter()
    if cfg.backbone.freeze != "none":  # a frozen ViT is not rewired (config validation refuses it)
        modes = [m for m in modes if m != "reversible"]
    planner = Planner(cfg, build_model)
    out = {}
    for mode in modes:
        p = planner.plan(mode, cfg.data.num_frames)
        if search:
            p.largest_num_frames = planner.largest_frames(mode, int(gpu_memory_gb * GB))
        out[mode] = p
    d, ds = cfg.data, cfg.deepspeed
    config = {"backbone": cfg.backbone.name, "mode": mode_of(cfg), "device": planner.device_type, "workers": planner.world,
              "batch_size": d.batch_size, "num_frames": d.num_frames, "frame_size": d.frame_size, "precision": ds.precision,
              "zero_stage": ds.zero_stage, "parameters": planner.parameter_count, "temporal_stride": cfg.backbone.temporal_stride,
              "piece_size": with_mode(cfg, "reversible", planner.device_type).backbone.piece_size,
              "fp32_streams": cfg.backbone.fp32_streams}
    return Plan(config=config, modes=out, gpu_memory_gb=gpu_memory_gb, seconds=time.perf_counter() - started)


def predicted_peak_gb(cfg: Config, build_model: Callable[[Config], nn.Module]) -> float:
    """The predicted per-worker peak (GB) of the config as configured (no search)."""
    planner = Planner(cfg, build_model)
    return planner.plan(mode_of(cfg), cfg.data.num_frames).peak / GB


def announce_prediction(cfg: Config, build_model: Callable[[Config], nn.Module]) -> float | None:
    """Print the predicted per-worker peak (GB) before workers launch and return it; None, with a
    one-line warning, when the plan cannot be made (training goes on)."""
    try:
        gb = predicted_peak_gb(cfg, build_model)
    except Exception as err:  # a planning problem must not stop a training run; it is reported
        print(f"re2tal plan: could not predict the peak memory ({type(err).__name__}: {str(err).splitlines()[0][:200]})", file=sys.stderr)
        return None
    device = "GPU" if cfg.train.use_gpu else "CPU (tensor bytes; peak_memory_gb there is RSS)"
    print(f"predicted peak memory per worker: {gb:.2f} GB on {device} ({mode_of(cfg)} {cfg.backbone.name}; `re2tal plan` has the breakdown)",
          flush=True)
    return gb


ROWS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer_states"),
        ("ZeRO buffers", "zero_buffers"), ("activations: backbone", "activations_backbone"),
        ("activations: head", "activations_head"), ("backward transient", "backward_transient"), ("input clip", "input_clip")]


def format_plan(plan: Plan) -> str:
    c = plan.config
    modes = list(plan.modes.values())
    width = 14
    pieces = f"pieces of {c['piece_size']:,} elements" if c["piece_size"] else "no pieces"
    streams = "fp32" if c["fp32_streams"] else "compute-precision"
    lines = [f"{c['backbone']} ({c['mode']} configured), {c['workers']} worker(s) on {c['device']}, batch {c['batch_size']} x "
             f"{c['num_frames']} frames x {c['frame_size']}^2, {c['precision']}, ZeRO-{c['zero_stage']}: per worker, GB (2^30 bytes)",
             f"reversible: {streams} streams, local residual functions in {pieces} (backbone.piece_size)",
             f"{'':<24}" + "".join(f"{m.mode:>{width}}" for m in modes)]
    for label, key in ROWS:
        lines.append(f"{label:<24}" + "".join(f"{getattr(m, key) / GB:>{width}.2f}" for m in modes))
    lines.append(f"{'peak':<24}" + "".join(f"{m.peak / GB:>{width}.2f}" for m in modes))
    phases = {"input": "input", "forward_backward": "fwd + bwd", "optimizer_step": "opt. step"}
    lines.append(f"{'peak during':<24}" + "".join(f"{phases[m.peak_phase]:>{width}}" for m in modes))
    limit = plan.gpu_memory_gb * GB
    lines.append(f"{f'fits {plan.gpu_memory_gb:g} GB':<24}" + "".join(f"{'yes' if m.peak <= limit else 'NO':>{width}}" for m in modes))
    if all(m.largest_num_frames is not None for m in modes):
        lines.append(f"{'largest num_frames':<24}" + "".join(f"{m.largest_num_frames:>{width}}" for m in modes))
    lines.append(f"(predicted in {plan.seconds:.1f} s; not counted: CUDA context / NCCL, allocator fragmentation, workspaces)")
    return "\n".join(lines)
