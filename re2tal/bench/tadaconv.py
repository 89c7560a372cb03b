"""`re2tal bench tadaconv --json OUT`: one TAdaConv2d layer (3x3, cal_dim cin) against the plain
conv it calibrates and against the official grouped-conv formulation, at the shapes of TAda2D's
res2 and res5 bottleneck `b` convs (224 x 224 input, B = 8 clips x T = 8 frames, B T = 64):

- plain:    conv (1, 3, 3) of x with W_b (what R2D / SlowFast's conv_b computes);
- tadaconv: re2tal's TAdaConv2d(x, alpha): alpha . x, then the same conv;
- official: the official code's formulation: the B T kernels alpha_t * W_b are formed and one conv
  grouped over the B T frames runs (tadaconv/models/module_zoo/ops/tadaconv.py).

Per shape and implementation: step_seconds (median forward + backward over `repeats` after
`warmup`, the three interleaved round-robin in one process so load changes hit all alike),
activation_bytes (tensors kept for backward, counted by saved-tensor hooks; inputs and weight not
counted) and peak_bytes (memory a step takes beyond its inputs: CUDA max allocated, or on CPU the
growth of max RSS of a fresh process running one step). self_check: the largest relative error
max|a - b| / max|b| of tadaconv vs official in the output and in the gradients w.r.t. x, alpha and
W_b. Target: tadaconv <= 1.15 x plain's time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from re2tal.errors import BadInput

# name -> (channels, height = width) of the bottleneck's b conv; stride 1 (blocks after the first)
SHAPES = {"stage2": (64, 56), "stage5": (512, 7)}
BATCH, FRAMES = 8, 8
IMPLS = ("plain", "tadaconv", "official")
WARMUP, REPEATS = 1, 5
TARGET = 1.15


def main(args: argparse.Namespace) -> int:
    device = args.device
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device: {device!r} is neither cpu nor cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device: {device} requested but CUDA is not available")
    if args.threads < 1:
        raise BadInput(f"--threads: must be positive, got {args.threads}")
    config = {"batch": BATCH, "frames": FRAMES, "kernel": 3, "cal_dim": "cin", "dtype": "float32", "device": device,
              "threads": args.threads, "warmup": WARMUP, "repeats": REPEATS, "seed": 0, "torch": torch.__version__}
    shapes = {}
    for name, (channels, size) in SHAPES.items():
        spec = {**config, "channels": channels, "size": size}
        result = _run_child({**spec, "kind": "speed"})
        for impl in IMPLS:
            result["impls"][impl]["peak_bytes"] = _run_child({**spec, "kind": "memory", "impl": impl})["peak_bytes"]
        plain = result["impls"]["plain"]["step_seconds"]
        for r in result["impls"].values():
            r["step_relative_to_plain"] = r["step_seconds"] / plain
        shapes[name] = result
    device_name = {s.pop("device") for s in shapes.values()}.pop()
    worst = max(s["impls"]["tadaconv"]["step_relative_to_plain"] for s in shapes.values())
    report = {"device": device_name, "config": config, "shapes": shapes,
              "target": {"tadaconv_over_plain_max": TARGET, "worst": worst, "met": worst <= TARGET}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(report)
    return 0


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "re2tal.bench.tadaconv", json.dumps(spec)],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"bench tadaconv {spec['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_summary(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}")
    print(f"{'shape':<8}{'impl':<10}{'step s':>9}{'x plain':>9}{'kept MB':>10}{'peak MB':>10}")
    for name, s in report["shapes"].items():
        for impl, r in s["impls"].items():
            print(f"{name:<8}{impl:<10}{r['step_seconds']:>9.4f}{r['step_relative_to_plain']:>9.2f}"
                  f"{r['activation_bytes'] / 2**20:>10.1f}{r['peak_bytes'] / 2**20:>10.1f}")
        print(f"{name:<8}self-check: output error {s['self_check']['output_error']:.1e}, grad error {s['self_check']['grad_error']:.1e}")


# ------------------------------------------------------------------------------------------
# the three implementations: (x, alpha, W_b (1, 1, C, C, 3, 3)) -> y


def plain(x: Tensor, alpha: Tensor, weight: Tensor) -> Tensor:
    _, _, c_out, c_in, kh, kw = weight.shape
    return F.conv3d(x, weight.view(c_out, c_in, 1, kh, kw), padding=(0, kh // 2, kw // 2))


def tadaconv(x: Tensor, alpha: Tensor, weight: Tensor) -> Tensor:
    from re2tal.backbones.tada import tada_conv

    _, _, c_out, c_in, kh, kw = weight.shape
    return tada_conv(x, alpha, weight.view(c_out, c_in, 1, kh, kw), None, (1, 1), (kh // 2, kw // 2), 1, "cin")


def official(x: Tensor, alpha: Tensor, weight: Tensor) -> Tensor:
    """The official TAdaConv2d.forward (cal_dim cin, groups 1): B T kernels, one grouped conv."""
    _, _, c_out, c_in, kh, kw = weight.shape
    b, _, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(1, -1, h, w)
    kernels = (alpha.permute(0, 2, 1, 3, 4).unsqueeze(2) * weight).reshape(-1, c_in, kh, kw)
    y = F.conv2d(frames, kernels, None, 1, (kh // 2, kw // 2), groups=b * t)
    return y.view(b, t, c_out, y.shape[-2], y.shape[-1]).permute(0, 2, 1, 3, 4)


FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"plain": plain, "tadaconv": tadaconv, "official": official}


# ------------------------------------------------------------------------------------------
# the child process


def inputs(spec: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, C, T, S, S), alpha (B, C, T, 1, 1) around 1, W_b (1, 1, C, C, 3, 3), dy: seeded, on the device."""
    gen = torch.Generator().manual_seed(spec["seed"])
    b, t, c, s = spec["batch"], spec["frames"], spec["channels"], spec["size"]
    x = torch.randn(b, c, t, s, s, generator=gen)
    alpha = 1 + 0.1 * torch.randn(b, c, t, 1, 1, generator=gen)
    weight = torch.randn(1, 1, c, c, 3, 3, generator=gen) * (2 / (9 * c)) ** 0.5
    dy = torch.randn(b, c, t, s, s, generator=gen)
    device = torch.device(spec["device"])
    return tuple(v.to(device).requires_grad_(i < 3) for i, v in enumerate((x, alpha, weight, dy)))  # type: ignore[return-value]


def step(impl: str, x: Tensor, alpha: Tensor, weight: Tensor, dy: Tensor) -> float:
    for v in (x, alpha, weight):
        v.grad = None
    _sync(x.device)
    start = time.perf_counter()
    FUNCTIONS[impl](x, alpha, weight).backward(dy)
    _sync(x.device)
    return time.perf_counter() - start


def activation_bytes(impl: str, x: Tensor, alpha: Tensor, weight: Tensor) -> int:
    from re2tal.bench.model import SavedTensors

    counter = SavedTensors(exclude=[x, alpha, weight])
    with counter:
        y = FUNCTIONS[impl](x, alpha, weight)
    counter.add_graph([y])
    return counter.total_bytes


def self_check(x: Tensor, alpha: Tensor, weight: Tensor, dy: Tensor) -> dict[str, float]:
    from re2tal.bench.model import max_relative_error

    results = {}
    for impl in ("tadaconv", "official"):
        for v in (x, alpha, weight):
            v.grad = None
        y = FUNCTIONS[impl](x, alpha, weight)
        y.backward(dy)
        results[impl] = (y.detach(), [v.grad.clone() for v in (x, alpha, weight)])
    (y_ours, g_ours), (y_off, g_off) = results["tadaconv"], results["official"]
    return {"output_error": max_relative_error([y_ours], [y_off]), "grad_error": max_relative_error(g_ours, g_off)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    x, alpha, weight, dy = inputs(spec)
    device = x.device
    if spec["kind"] == "memory":  # one step of one implementation, in a fresh process
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(spec["impl"], x, alpha, weight, dy)
            return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base}
        base = _max_rss_bytes()
        step(spec["impl"], x, alpha, weight, dy)
        return {"peak_bytes": _max_rss_bytes() - base}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "input_shape": list(x.shape), "self_check": self_check(x, alpha, weight, dy)}
    impls = {impl: {"activation_bytes": activation_bytes(impl, x, alpha, weight)} for impl in IMPLS}
    for _ in range(spec["warmup"]):
        for impl in IMPLS:
            step(impl, x, alpha, weight, dy)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(spec["repeats"]):
        for impl in IMPLS:
            times[impl].append(step(impl, x, alpha, weight, dy))
    for impl in IMPLS:
        impls[impl].update(step_seconds=statistics.median(times[impl]), step_seconds_all=times[impl])
    result["impls"] = impls
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
