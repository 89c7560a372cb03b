"""`re2tal bench gpu --out DIR`: every check that needs a GPU, in one command.

Sized to finish in under 8 minutes on one H100 / H200 (sections past a time budget are recorded
as skipped, not run). `--device cpu` is a dry run of the same code at tiny sizes (`CPU_DRY_RUN`:
reduced models, a few frames of 32 px, small reversible pieces, the debug training in-process), in
seconds, so the script a GPU machine runs has already run; its memory figures there are live
tensor bytes (LiveBytes), not an allocator's.

1. `torchvision`: our Swin-T equals torchvision's swin3d_t features on CUDA (same random
   weights), fp32 and bf16: max |ours - theirs| / max |theirs|.
2. `reversible_gradients`: reversible vs plain-autograd gradients of the same rewired model on
   CUDA (bench memory's drift measure): fp32, bf16 autocast with fp32 streams and with streams
   in bf16, for swin_t and slowfast_r101 at 32 frames, 224 px.
3. `debug_training`: 20 optimizer steps of configs/debug.yaml with train.use_gpu=true, bf16, one
   worker (a synthetic set of 20 training videos in DIR), with the predicted and measured peak.
4. `memory`: peak `torch.cuda.max_memory_allocated` above the model and input, and step time
   (median of 2 after a warm-up), of one forward + backward of the backbone (batch 1, weights
   and input in bf16 as a DeepSpeed bf16 engine holds them, loss = sum of the output) for
   standard / checkpoint / reversible at 96, 192, 384 and 768 frames, 224 px, swin_t and
   slowfast_r101, each next to `re2tal plan`'s prediction of the same step; out-of-memory is
   recorded as such.

Writes DIR/gpu.json and DIR/gpu_memory.png (memory against frames, measured and predicted).
Without a CUDA device (and without --device cpu) it exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from re2tal.errors import BadInput

MODES = ("standard", "checkpoint", "reversible")


@dataclass(frozen=True)
class Sizes:
    """What a run measures: clip sizes, backbones (name -> BackboneConfig overrides) and the time
    budget after which sections and sweep runs are skipped."""

    frames: tuple[int, ...]  # memory sweep
    size: int
    parity_frames: int
    gradient_frames: int
    backbones: dict[str, dict[str, Any]]
    budget_s: float
    debug_videos: int
    debug_frames: int = 64
    train_overrides: dict[str, Any] = field(default_factory=dict)
    parity_sizes: dict[str, Any] = field(default_factory=dict)  # Swin sizes of the torchvision check (default: swin3d_t)


GPU_RUN = Sizes(frames=(96, 192, 384, 768), size=224, parity_frames=32, gradient_frames=32,
                backbones={"swin_t": {}, "slowfast_r101": {}}, budget_s=430, debug_videos=32)  # the whole under 8 min
SMALL_SWIN = {"embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": (8, 4, 4)}  # the debug config's
CPU_DRY_RUN = Sizes(frames=(8, 16), size=32, parity_frames=8, gradient_frames=8,
                    backbones={"swin_t": {**SMALL_SWIN, "piece_size": 2**10}, "slowfast_r101": {"depths": [1, 2, 2, 1]}},
                    budget_s=120, debug_videos=6, debug_frames=16,
                    train_overrides={"data.synth.duration_s": 10, "head.seq_len": 8, "head.fpn_levels": 2}, parity_sizes=SMALL_SWIN)


def main(args: argparse.Namespace) -> int:
    dry_run = getattr(args, "device", "cuda") == "cpu"
    if not dry_run and not torch.cuda.is_available():
        raise BadInput("no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where one is, or --device cpu for a dry run")
    sizes = CPU_DRY_RUN if dry_run else GPU_RUN
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.device("cpu" if dry_run else "cuda")
    report: dict[str, Any] = {"device": "cpu (dry run)" if dry_run else torch.cuda.get_device_name(device), "torch": torch.__version__}
    if not dry_run:
        report["memory_total_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("torchvision", lambda: torchvision_parity(device, sizes)),
        ("reversible_gradients", lambda: reversible_gradients(device, sizes)),
        ("debug_training", lambda: debug_training(out, use_gpu=not dry_run, sizes=sizes)),
        ("memory", lambda: memory_sweep(device, sizes, started)),
    ]
    failed = []
    for name, run in sections:
        if time.perf_counter() - started > sizes.budget_s:
            report[name] = {"skipped": "time budget spent"}
            continue
        print(f"bench gpu: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception as err:  # one failed check must not hide the others' results
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
            failed.append(name)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        _empty_cache(device)
    report["seconds"] = time.perf_counter() - started
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    if isinstance(report.get("memory"), dict) and "runs" in report["memory"]:
        plot_memory(report["memory"]["runs"], list(sizes.backbones), out / "gpu_memory.png")
    print(json.dumps(summary(report), indent=2))
    if failed:
        print(f"bench gpu: failed: {', '.join(failed)} (see {out / 'gpu.json'})")
    return 1 if failed else 0


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of the report."""
    s: dict[str, Any] = {"device": report["device"], "seconds": round(report["seconds"], 1)}
    for key in ("torchvision", "reversible_gradients", "debug_training"):
        s[key] = report.get(key)
    runs = report.get("memory", {}).get("runs", []) if isinstance(report.get("memory"), dict) else []
    s["memory_gb"] = {f"{r['backbone']} {r['mode']} {r['frames']}": (
        "oom" if r.get("oom") else round(r["peak_gb"], 2), round(r["predicted_peak_gb"], 2)) for r in runs if "predicted_peak_gb" in r}
    return s


# --------------------------------------------------------------------------------------------
# 1. Swin-T against torchvision


def torchvision_parity(device: torch.device, sizes: Sizes) -> dict[str, float]:
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    from re2tal.backbones import build_backbone
    from re2tal.config import BackboneConfig

    torch.manual_seed(0)
    ours = build_backbone(BackboneConfig(name="swin_t", reversible=False, drop_path=0.0, **sizes.parity_sizes)).eval()
    c = BackboneConfig(name="swin_t", **sizes.parity_sizes)  # torchvision's swin3d_t at the default sizes
    ref = SwinTransformer3d(patch_size=list(c.patch_size), embed_dim=c.embed_dim, depths=c.depths, num_heads=c.num_heads,
                            window_size=list(c.window_size), stochastic_depth_prob=0.1).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(2, 3, sizes.parity_frames, sizes.size, sizes.size)
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref_d, ours_d = ref.to(device, dtype), ours.to(device, dtype)
        with torch.no_grad():
            xd = x.to(device, dtype)
            a = ours_d(xd).float()
            b = ref_d.norm(ref_d.features(ref_d.patch_embed(xd))).permute(0, 4, 1, 2, 3).float()
        out[f"{precision}_max_relative_error"] = ((a - b).abs().max() / b.abs().max()).item()
    return out


# --------------------------------------------------------------------------------------------
# 2. reversible against plain autograd


def reversible_gradients(device: torch.device, sizes: Sizes) -> dict[str, dict[str, float]]:
    from re2tal.bench.model import Runner, build_model, measure_drift

    out = {}
    for backbone, overrides in sizes.backbones.items():
        for label, mode, precision in (("fp32", "reversible", "fp32"), ("bf16_fp32_streams", "reversible", "bf16"),
                                       ("bf16_bf16_streams", "reversible_lowp", "bf16")):
            spec = {"seed": 0, "device": str(device), "backbone": backbone, "mode": mode, "overrides": overrides,
                    "input_shape": [1, 3, sizes.gradient_frames, sizes.size, sizes.size]}
            model, x = build_model(spec)
            out[f"{backbone}_{label}"] = measure_drift(Runner(model, x, precision), seed=0)
            del model, x
            _empty_cache(device)
    return out


# --------------------------------------------------------------------------------------------
# 3. memory and time against frames, next to the plan


def memory_sweep(device: torch.device, sizes: Sizes, started: float) -> dict[str, Any]:
    runs = []
    for backbone, overrides in sizes.backbones.items():
        for mode in MODES:
            for frames in sizes.frames:
                run = {"backbone": backbone, "mode": mode, "frames": frames}
                if time.perf_counter() - started > sizes.budget_s:
                    run["skipped"] = "time budget spent"
                else:
                    run.update(measure_step(backbone, overrides, mode, frames, sizes.size, device))
                    run.update(predict_step(backbone, overrides, mode, frames, sizes.size, device.type))
                    if "peak_gb" in run:
                        run["predicted_over_measured"] = run["predicted_peak_gb"] / run["peak_gb"]
                runs.append(run)
                print(f"  {backbone} {mode} {frames}: {run}", flush=True)
    return {"size": sizes.size, "batch_size": 1, "dtype": "bfloat16", "runs": runs}


def _backbone(backbone: str, overrides: dict[str, Any], mode: str, device_type: str):
    """The backbone in a mode, its reversible pieces those of `device_type` (built on the meta
    device, there is no other way to tell)."""
    from re2tal.backbones import build_backbone
    from re2tal.config import BackboneConfig
    from re2tal.rev.pieces import default_piece_size

    cfg = BackboneConfig(name=backbone, reversible=mode == "reversible", activation_checkpointing=mode == "checkpoint", **overrides)
    if cfg.piece_size is None:
        cfg = cfg.model_copy(update={"piece_size": default_piece_size(device_type)})
    return build_backbone(cfg)


def measure_step(backbone: str, overrides: dict[str, Any], mode: str, frames: int, size: int, device: torch.device) -> dict[str, Any]:
    """Peak memory above the model and input, and median step time, of forward + backward of the
    backbone (batch 1, bf16 weights and input, loss = sum of the output). Memory: CUDA's
    max_memory_allocated, on the CPU the live tensor bytes."""
    from re2tal.planning.memory import LiveBytes

    torch.manual_seed(0)
    with device:  # initialised on the GPU: seconds less than on the CPU for SlowFast-R101
        model = _backbone(backbone, overrides, mode, device.type)
    model = model.to(torch.bfloat16).train()
    x = torch.randn(1, 3, frames, size, size, device=device, dtype=torch.bfloat16)
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def step() -> float:
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        model(x).float().sum().backward()
        _sync(device)
        return time.perf_counter() - t0

    try:
        step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            times = [step() for _ in range(2)]
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with LiveBytes(exclude=[*model.parameters(), *model.buffers(), x]) as live:
                times = [step() for _ in range(2)]
            peak = live.peak
        return {"peak_gb": peak / 2**30, "step_seconds": statistics.median(times)}
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        del model, x
        _empty_cache(device)


def predict_step(backbone: str, overrides: dict[str, Any], mode: str, frames: int, size: int, device_type: str) -> dict[str, float]:
    from re2tal.planning.plan import measure_step as plan_step

    with torch.device("meta"):
        model = _backbone(backbone, overrides, mode, device_type)
    model = model.to(torch.bfloat16).train()
    step = plan_step(model, (1, 3, frames, size, size), torch.bfloat16, device_type, keep_grads=True)
    return {"predicted_peak_gb": step.peak / 2**30, "predicted_activation_gb": step.activations_backbone / 2**30}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plot_memory(runs: list[dict[str, Any]], backbones: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        for i, mode in enumerate(MODES):
            rs = [r for r in runs if r["backbone"] == backbone and r["mode"] == mode and "predicted_peak_gb" in r]
            colour = f"C{i}"
            measured = [r for r in rs if "peak_gb" in r]
            ax.plot([r["frames"] for r in measured], [r["peak_gb"] for r in measured], marker="o", color=colour, label=f"{mode} measured")
            ax.plot([r["frames"] for r in rs], [r["predicted_peak_gb"] for r in rs], linestyle="--", marker="x", color=colour,
                    label=f"{mode} re2tal plan")
        ax.set_xlabel("frames (batch 1, bf16)")
        ax.set_ylabel("peak CUDA memory above the model, GB")
        ax.set_title(backbone)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 4. the debug config on the GPU


def debug_training(out: Path, use_gpu: bool = True, sizes: Sizes = GPU_RUN) -> dict[str, Any]:
    from re2tal.config import load_config
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    root = Path(__file__).resolve().parents[2]
    overrides = {
        "data.annotations": str(out / "synth" / "annotations.json"), "data.synth.videos": sizes.debug_videos,
        "data.synth.val_videos": max(1, sizes.debug_videos * 3 // 8), "data.num_frames": sizes.debug_frames,
        "train.use_gpu": use_gpu, "train.num_workers": 1, "train.epochs": 1, "train.name": "bench-gpu-debug",
        "train.storage_path": str(out / "runs"), "deepspeed.precision": "bf16" if use_gpu else "fp32",
        "tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "head.frame_loss_epochs": 1, **sizes.train_overrides,
    }
    shutil.rmtree(out / "runs" / "bench-gpu-debug", ignore_errors=True)  # a finished run would only be reported again
    cfg = load_config(root / "configs" / "debug.yaml", [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()])
    started = time.perf_counter()
    metrics = fit(cfg, Localization(), local=not use_gpu, show_progress=False)  # the dry run in-process: no Ray cluster to start
    keep = ("step", "average_mAP", "peak_memory_gb", "predicted_peak_memory_gb", "clips_per_s")
    return {**{k: metrics.get(k) for k in keep}, "seconds": time.perf_counter() - started}
