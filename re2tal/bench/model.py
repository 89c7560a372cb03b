"""`re2tal bench memory` and `re2tal bench speed`: standard vs checkpointing vs reversible.

The model is either a synthetic stage (`--stage-blocks N --width C`: N residual functions
LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> DropPath(0.1), input (1, T/2, S/4, S/4, C)
like Swin stage-1 tokens of a T x S x S clip, requiring grad as inside a network) or a backbone
(`--backbone NAME`: standard = NAME, checkpoint = NAME with per-block activation checkpointing,
reversible = its Re² version; input (1, 3, T, S, S)). Modes: standard, checkpoint, reversible, and
reversible_lowp (reversible with the streams in the compute precision instead of fp32). The
backbone's config is its default, so reversible functions run in the device's default pieces
(`backbone.piece_size`; `config.piece_size` in the JSON).

`--frames` takes a comma list (e.g. 32,64,96): every frame count is run, `by_frames` holds
`{T: {mode: result}}` and, for one T, `modes` its results; `bench memory` also draws the memory
against frames (activation bytes, peak RSS minus baseline, CUDA peak) next to the JSON (.png).

All in training mode. `bench memory` runs each mode in a fresh process (max RSS only grows) and
reports per mode:
- activation_bytes: bytes kept for backward after one forward: the union of unique storages
  packed by `torch.autograd.graph.saved_tensors_hooks` and of tensors reachable from the output's
  autograd graph outside saved tensors (custom Function ctx attributes:
  activation_bytes_outside_saved_tensors); parameters and buffers are not counted, the input is
  when a mode keeps it.
- baseline_rss_bytes (after imports, model and input) and peak_rss_bytes (max RSS of the process,
  glibc malloc unless config.malloc_env says otherwise); on CUDA also baseline/peak
  cuda_allocated_bytes (`torch.cuda.max_memory_allocated`).
- step_seconds: median of `repeats` forward+backward steps after `warmup` ones (CPU threads:
  --threads); step_seconds_all: each of them.
- backbones: predicted_activation_bytes and predicted_peak_tensor_bytes, `re2tal plan`'s
  meta-device count of the same step (live tensor bytes above the model and input; compare with
  the CUDA peak, not with RSS, which adds the allocator's retained memory).
- reversible modes: reconstruction_error, the largest max|x_rec - x| / max|x| over the inputs of
  every F_i reconstructed in backward vs those seen in forward, and grad_error, the largest
  max|g_rev - g_vanilla| / max|g_vanilla| over the input's and parameters' gradients vs the
  vanilla (plain autograd) run of the same rewired model, same seed and precision.
`bench speed` builds every mode in one fresh process and alternates their steps round-robin (so
load from other processes hits all modes alike): step_seconds (median), step_seconds_all and
step_relative_to_standard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from re2tal.errors import BadInput
from re2tal.rev import Pieces, RevStage
from re2tal.planning.memory import SavedTensors  # noqa: F401  (the counter this bench reports; tests import it here)

MODES = ("standard", "checkpoint", "reversible", "reversible_lowp")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = {"memory": (1, 3), "speed": (2, 9)}  # kind -> (warmup, repeats)
DROP_PATH = 0.1


def memory_main(args: argparse.Namespace) -> int:
    return run_bench(args, "memory")


def speed_main(args: argparse.Namespace) -> int:
    return run_bench(args, "speed")


def run_bench(args: argparse.Namespace, kind: str) -> int:
    """Validate the arguments, run the modes in fresh processes (per frame count), write the JSON
    (and, for memory, the plot)."""
    frames = parse_frames(args.frames)
    specs = [bench_spec(args, kind, t) for t in frames]
    by_frames, devices = {}, set()
    for spec in specs:
        if kind == "memory":  # one process per mode: max RSS only grows
            results = {mode: _run_child({**spec, "modes": [mode]})[mode] for mode in spec["modes"]}
        else:  # one process, modes interleaved: load changes on a shared machine hit all alike
            results = _run_child(spec)
        devices |= {r.pop("device") for r in results.values()}
        by_frames[str(spec["frames"])] = results
    config = {k: v for k, v in specs[0].items() if k not in ("modes", "frames", "input_shape")}
    config.update(frames=frames, input_shape=specs[0]["input_shape"] if len(specs) == 1 else [s["input_shape"] for s in specs])
    report = {"device": devices.pop(), "config": config, "by_frames": by_frames}
    if len(frames) == 1:
        report["modes"] = by_frames[str(frames[0])]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if kind == "memory":
        plot_memory(report, out.with_suffix(".png"))
    _print_summary(report)
    return 0


def parse_frames(text: str) -> list[int]:
    """`--frames 32` or `--frames 32,64,96` -> [32, 64, 96] (positive, distinct, in order)."""
    try:
        frames = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise BadInput(f"--frames: expected a number or a comma list of numbers, got {text!r}") from None
    if not frames or any(t < 1 for t in frames) or len(set(frames)) != len(frames):
        raise BadInput(f"--frames: expected distinct positive numbers, got {text!r}")
    return frames


def plot_memory(report: dict[str, Any], path: Path) -> None:
    """Memory against frames, one line per mode: activation bytes, peak RSS minus baseline and
    (CUDA) peak allocated minus baseline, in MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("activation_bytes", None, "activations kept"), ("peak_rss_bytes", "baseline_rss_bytes", "peak RSS - baseline"),
              ("peak_cuda_allocated_bytes", "baseline_cuda_allocated_bytes", "CUDA peak - baseline")]
    frames = sorted(int(t) for t in report["by_frames"])
    series = [s for s in series if any(s[0] in r for res in report["by_frames"].values() for r in res.values())]
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, (key, base, title) in zip(axes[0], series):
        for mode in report["by_frames"][str(frames[0])]:
            ys = [report["by_frames"][str(t)][mode] for t in frames]
            ax.plot(frames, [(r[key] - (r[base] if base else 0)) / 2**20 for r in ys], marker="o", label=mode)
        ax.set_xlabel("frames")
        ax.set_ylabel("MB")
        ax.set_title(title)
        ax.legend(fontsize="small")
    name = report["config"].get("backbone") or f"stage of {report['config'].get('stage_blocks')} functions"
    fig.suptitle(f"{name}, {report['config']['size']} px, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_spec(args: argparse.Namespace, kind: str, frames: int) -> dict[str, Any]:
    """The child processes' settings for one frame count, validated (BadInput names the
    offending flag)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise BadInput(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    if not modes:
        raise BadInput("--modes: no mode given")
    precision = getattr(args, "precision", "fp32")
    device = args.device
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device: {device!r} is neither cpu nor cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device: {device} requested but CUDA is not available")
    if precision == "fp16" and device == "cpu":
        raise BadInput("--precision: fp16 needs --device cuda; use bf16 or fp32 on CPU")
    for flag, value in (("--frames", frames), ("--size", args.size), ("--threads", args.threads)):
        if value < 1:
            raise BadInput(f"{flag}: must be positive, got {value}")
    warmup, repeats = STEPS[kind]
    spec: dict[str, Any] = {"kind": kind, "modes": modes, "backbone": args.backbone, "frames": frames,
                            "size": args.size, "device": device, "precision": precision, "threads": args.threads,
                            "warmup": warmup, "repeats": repeats, "seed": 0, "torch": torch.__version__,
                            # the allocator decides how much freed memory RSS still counts
                            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    if args.backbone is None:
        if args.stage_blocks < 1 or args.width < 1:
            raise BadInput("--stage-blocks / --width: must be positive")
        if frames % 2 or args.size % 4:
            raise BadInput(f"--frames/--size: the synthetic stage needs even frames and a size divisible by 4, got {frames}, {args.size}")
        spec.update(stage_blocks=args.stage_blocks, width=args.width, drop_path=DROP_PATH,
                    input_shape=[1, frames // 2, args.size // 4, args.size // 4, args.width])
    else:
        from re2tal.rev.pieces import default_piece_size

        cfg = _backbone_config(args.backbone, "standard")  # the backbone pads odd sizes itself
        piece_size = default_piece_size(torch.device(device).type) if cfg.piece_size is None else cfg.piece_size
        spec.update(input_shape=[1, 3, frames, args.size, args.size], drop_path=cfg.drop_path, piece_size=piece_size)
    return spec


def _backbone_config(name: str, mode: str, piece_size: int | None = None, overrides: dict[str, Any] | None = None):
    """The backbone's config in a mode (piece_size None: the config's default), with other keys
    set by `overrides` (e.g. reduced sizes)."""
    from pydantic import ValidationError

    from re2tal.config import BackboneConfig, format_error

    extra = dict(overrides or {}) | ({} if piece_size is None else {"piece_size": piece_size})
    try:
        return BackboneConfig(name=name, reversible=mode.startswith("reversible"),
                              activation_checkpointing=mode == "checkpoint",
                              fp32_streams=mode != "reversible_lowp", **extra)
    except ValidationError as err:
        raise BadInput(f"--backbone: {format_error(err)}") from None


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """{mode: result} measured by `python -m re2tal.bench.model SPEC` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "re2tal.bench.model", json.dumps(spec)],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"bench {spec['kind']} {','.join(spec['modes'])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_summary(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}")
    print(f"{'frames':>6} {'mode':<16}{'activation MB':>15}{'peak RSS MB':>13}{'- baseline':>12}{'step s':>9}{'x standard':>12}")
    for frames, modes in report["by_frames"].items():
        for mode, r in modes.items():
            act, rss, base = r.get("activation_bytes"), r.get("peak_rss_bytes"), r.get("baseline_rss_bytes")
            rel = r.get("step_relative_to_standard")
            print(f"{frames:>6} {mode:<16}{'' if act is None else f'{act / 2**20:.1f}':>15}{'' if rss is None else f'{rss / 2**20:.0f}':>13}"
                  f"{'' if rss is None else f'{(rss - base) / 2**20:.0f}':>12}{r['step_seconds']:>9.3f}{'' if rel is None else f'{rel:.2f}':>12}")


# ------------------------------------------------------------------------------------------
# the child process: one mode


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, Tensor]:
    """The model of a mode and its input (seeded)."""
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    if spec["backbone"] is None:
        from re2tal.bench.synthetic import build_synthetic_stage

        model = build_synthetic_stage(spec["mode"], spec["stage_blocks"], spec["width"], spec["drop_path"])
        x = torch.randn(spec["input_shape"], device=device, requires_grad=True)
    else:
        from re2tal.backbones import build_backbone

        model = build_backbone(_backbone_config(spec["backbone"], spec["mode"], spec.get("piece_size"), spec.get("overrides")))
        x = torch.randn(spec["input_shape"], device=device)
    return model.to(device).train(), x


def _outputs(y: Any) -> list[Tensor]:
    """Differentiable tensors of a model output (tensor, sequence or mapping)."""
    if isinstance(y, Tensor):
        return [y] if y.requires_grad else []
    items = y.values() if isinstance(y, dict) else y if isinstance(y, (list, tuple)) else []
    return [t for item in items for t in _outputs(item)]


class Runner:
    """Forward (under autocast when asked) + backward with fixed random output gradients."""

    def __init__(self, model: nn.Module, x: Tensor, precision: str):
        self.model, self.x = model, x
        self.dtype = PRECISIONS[precision]
        self.out_grads: list[Tensor] | None = None

    def forward(self) -> list[Tensor]:
        with torch.autocast(self.x.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            outs = _outputs(self.model(self.x))
        if self.out_grads is None:
            gen = torch.Generator(self.x.device).manual_seed(1)
            self.out_grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
        return outs

    def backward(self, outs: list[Tensor]) -> None:
        torch.autograd.backward(outs, self.out_grads)

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None
        _sync(self.x.device)
        start = time.perf_counter()
        self.backward(self.forward())
        _sync(self.x.device)
        return time.perf_counter() - start

    def grads(self) -> list[Tensor]:
        tensors = ([self.x] if self.x.requires_grad else []) + list(self.model.parameters())
        return [t.grad.detach().clone() for t in tensors if t.grad is not None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{mode: result} for the spec's modes, in this process (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "memory":
        (mode,) = spec["modes"]
        return {mode: measure_memory({**spec, "mode": mode})}
    return measure_speed(spec)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Activation bytes, baseline and peak memory, a few step times and (reversible) drift of
    one mode; run in a fresh process."""
    model, x = build_model(spec)
    device = x.device
    runner = Runner(model, x, spec["precision"])
    result: dict[str, Any] = {"device": _device_name(device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    result["baseline_rss_bytes"] = _max_rss_bytes()

    counter = SavedTensors(exclude=[*model.parameters(), *model.buffers()])
    model.zero_grad(set_to_none=True)
    with counter:
        outs = runner.forward()
    counter.add_graph(outs)
    runner.backward(outs)
    del outs
    result["activation_bytes"] = counter.total_bytes
    result["activation_bytes_outside_saved_tensors"] = counter.graph_only_bytes
    if spec["backbone"] is not None and spec["precision"] == "fp32":  # the plan does not emulate autocast
        result.update(predict_memory(spec))

    for _ in range(spec["warmup"]):
        runner.step()
    times = [runner.step() for _ in range(spec["repeats"])]
    result["step_seconds"] = statistics.median(times)
    result["step_seconds_all"] = times
    result["peak_rss_bytes"] = _max_rss_bytes()
    if device.type == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if spec["mode"].startswith("reversible"):
        result.update(measure_drift(runner, spec["seed"]))
    return result


def predict_memory(spec: dict[str, Any]) -> dict[str, int]:
    """`re2tal plan`'s count of this mode's step: the same backbone on the meta device, with the
    pieces the real device would use."""
    from re2tal.backbones import build_backbone
    from re2tal.planning.plan import measure_step
    from re2tal.rev.pieces import default_piece_size

    device_type = "cuda" if spec["device"].startswith("cuda") else "cpu"
    piece_size = spec.get("piece_size", (spec.get("overrides") or {}).get("piece_size"))
    piece_size = default_piece_size(device_type) if piece_size is None else piece_size
    with torch.device("meta"):
        model = build_backbone(_backbone_config(spec["backbone"], spec["mode"], piece_size, spec.get("overrides"))).train()
    step = measure_step(model, spec["input_shape"], torch.float32, device_type, keep_grads=True)
    return {"predicted_activation_bytes": step.activations_backbone, "predicted_peak_tensor_bytes": step.peak}


def measure_speed(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median forward+backward seconds of each mode; the modes' steps alternate round-robin."""
    runners = {}
    for mode in spec["modes"]:
        model, x = build_model({**spec, "mode": mode})
        runners[mode] = Runner(model, x, spec["precision"])
    for _ in range(spec["warmup"]):
        for runner in runners.values():
            runner.step()
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    for _ in range(spec["repeats"]):
        for mode, runner in runners.items():
            times[mode].append(runner.step())
    results = {mode: {"device": _device_name(runner.x.device), "step_seconds": statistics.median(times[mode]),
                      "step_seconds_all": times[mode]} for mode, runner in runners.items()}
    if "standard" in results:
        base = results["standard"]["step_seconds"]
        for r in results.values():
            r["step_relative_to_standard"] = r["step_seconds"] / base
    return results


def measure_drift(runner: Runner, seed: int) -> dict[str, float]:
    """reconstruction_error and grad_error of the reversible stages in runner.model."""
    with recording_inputs(runner.model) as log:
        torch.manual_seed(seed)
        runner.step()
    rev = runner.grads()
    stages = [m for m in runner.model.modules() if isinstance(m, RevStage)]
    for stage in stages:
        stage.vanilla = True
    torch.manual_seed(seed)
    runner.step()
    vanilla = runner.grads()
    for stage in stages:
        stage.vanilla = False
    return {"reconstruction_error": log.max_relative_error(), "grad_error": max_relative_error(rev, vanilla)}


@contextmanager
def recording_inputs(model: nn.Module) -> Iterator["InputLog"]:
    """Log the inputs of every residual function of the RevStages in model, in the forward and
    in the backward's reconstruction, while inside the block."""
    log = InputLog()
    stages = [m for m in model.modules() if isinstance(m, RevStage)]
    originals = [dict(stage._modules) for stage in stages]
    for s, (stage, blocks) in enumerate(zip(stages, originals)):
        for name, block in list(blocks.items())[stage.lead:]:  # leading blocks run as they are
            stage._modules[name] = _Recorded(block, log, (s, name))
    try:
        yield log
    finally:
        for stage, blocks in zip(stages, originals):
            stage._modules.update(blocks)


def max_relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    """max over pairs of max|got - want| / max|want| (pairs with want == 0 compare absolutely)."""
    err = 0.0
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().item() or 1.0
        err = max(err, (g.float() - w.float()).abs().max().item() / scale)
    return err


class InputLog:
    """Inputs of each residual function (piece) as seen in the forward (its first call) and in the
    backward's recomputation (the next)."""

    def __init__(self):
        self.forward: dict[Any, Tensor] = {}
        self.recomputed: dict[Any, Tensor] = {}

    def record(self, key: Any, x: Tensor) -> None:
        (self.recomputed if key in self.forward else self.forward)[key] = x.detach().float().clone()

    def max_relative_error(self) -> float:
        """max over residual functions of max|recomputed - forward| / max|forward|."""
        keys = sorted(self.forward, key=str)
        return max_relative_error([self.recomputed[k] for k in keys], [self.forward[k] for k in keys])


class _Recorded(nn.Module):
    """A block whose residual functions log their inputs (per piece: keyed by its start)."""

    def __init__(self, block: nn.Module, log: InputLog, key: Any):
        super().__init__()
        self.block, self.log, self.key = block, log, key

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self._logged(fn, (*self.key, k)) for k, fn in enumerate(self.block.residual_fns())]

    def residual_pieces(self) -> list[Pieces | None]:
        fns = self.block.residual_fns()
        declared = getattr(self.block, "residual_pieces", None)
        pieces = list(declared()) if callable(declared) else [None] * len(fns)
        return [None if p is None else dataclasses.replace(p, at=self._logged_piece(p, fn, (*self.key, k)))
                for k, (p, fn) in enumerate(zip(pieces, fns))]

    def _logged(self, fn: Callable[[Tensor], Tensor], key: Any) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            self.log.record((*key, 0), x)
            return fn(x)
        return run

    def _logged_piece(self, pieces: Pieces, fn: Callable[[Tensor], Tensor], key: Any) -> Callable[[Tensor, int, int], Tensor]:
        def run(x: Tensor, start: int, size: int) -> Tensor:
            self.log.record((*key, start), x)
            return pieces.call(fn, x, start, size)
        return run


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
