"""`re2tal plan` (re2tal.planning.plan, re2tal.planning.memory): its meta-device counts against
real CPU runs of the same step, its ZeRO layout against real 2-worker DeepSpeed engines, the
command on a paper config, and `re2tal bench gpu` without a GPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from re2tal.bench.model import Runner, SavedTensors, build_model
from re2tal.config import load_config
from re2tal.planning.plan import Planner, measure_step, optimizer_groups
from re2tal.planning.zero_layout import zero_memory
from re2tal.tasks.localization import build_model as build_localizer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"


def profiled_peak(step) -> int:
    """Peak of live tensor bytes allocated while `step()` runs, from torch.profiler's memory
    records (allocations and frees in time order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


# A reduced ViT-S with AdaTAD adapters after its last 4 blocks, its patch embedding frozen (as
# AdaTAD's): the CPU's backward of a (2, 16, 16) conv's weight allocates a workspace of ~4x the
# weight outside the dispatcher, which the plan does not see (on a GPU: cuDNN's workspace).
VIT_SMALL = {"embed_dim": 96, "num_heads": [4], "depths": [6], "adapter": {"blocks": [2, 3, 4, 5]}, "frozen_stages": 0}


@pytest.mark.parametrize("backbone,mode,piece_size", [("swin_t", "standard", None), ("swin_t", "reversible", 0),
                                                      ("swin_t", "reversible", 2**14), ("slowfast_r50", "standard", None),
                                                      ("slowfast_r50", "reversible", None), ("vit_s", "checkpoint", None),
                                                      ("vit_s", "reversible", 2**14)])
def test_plan_counts_what_a_real_cpu_step_keeps_and_peaks_at(backbone, mode, piece_size):
    """Activations: bench memory's saved-tensor count of a real step, within 2%; peak: the
    profiler's high-water mark of live tensors of a real step, within 10%; for Re²Swin with whole
    functions and in pieces (2^14 elements: a frame of the MLP branches, a window group of 8
    frames of attention, 16 frames cut at 8, shifted at 4 and 12), whose peak is far lower; for a
    reduced ViT with adapters, checkpointed and Re² (pieces: one 16-frame chunk of attention and
    MLP, one row of tokens of the adapters)."""
    shape = (1, 3, 32 if piece_size else 16, 64, 64)
    spec = {"seed": 0, "device": "cpu", "backbone": backbone, "mode": mode, "input_shape": list(shape), "piece_size": piece_size,
            "overrides": VIT_SMALL if backbone == "vit_s" else None}
    model, x = build_model(spec)
    runner = Runner(model, x, "fp32")
    runner.step()  # shape caches, lazy initialisation
    model.zero_grad(set_to_none=True)
    counter = SavedTensors(exclude=[*model.parameters(), *model.buffers()])
    with counter:
        outs = runner.forward()
    counter.add_graph(outs)
    runner.backward(outs)
    del outs
    model.zero_grad(set_to_none=True)
    measured_peak = profiled_peak(runner.step)

    with torch.device("meta"):
        meta_model, _ = build_model({**spec, "device": "meta"})
    predicted = measure_step(meta_model, shape, torch.float32, "cpu", keep_grads=True)
    assert abs(predicted.activations_backbone - counter.total_bytes) <= 0.02 * counter.total_bytes
    assert abs(predicted.peak - measured_peak) <= 0.10 * measured_peak, (predicted.peak, measured_peak)
    if piece_size:  # the transient in pieces, without the parameters' gradients (DeepSpeed takes them)
        with torch.device("meta"):
            whole, _ = build_model({**spec, "device": "meta", "piece_size": 0})
        chunked = measure_step(meta_model, shape, torch.float32, "cpu", keep_grads=False).transient
        assert chunked < 0.8 * measure_step(whole, shape, torch.float32, "cpu", keep_grads=False).transient


def test_plan_runs_three_reversible_pieces_of_a_function_and_counts_what_all_would(monkeypatch):
    """On the meta device a function in pieces runs its first two and its last: the same bytes as
    running them all (48 frames: stage 1's MLP in 24 pieces, its shifted windows cut 4 times)."""
    from re2tal.rev import stage

    shape = (1, 3, 48, 64, 64)
    with torch.device("meta"):
        model, _ = build_model({"seed": 0, "device": "meta", "backbone": "swin_t", "mode": "reversible", "input_shape": list(shape),
                                "piece_size": 2**14})
    measure_step(model, shape, torch.float32, "cpu", keep_grads=False)  # masks and indices cached
    grouped = measure_step(model, shape, torch.float32, "cpu", keep_grads=False)
    monkeypatch.setattr(stage, "planned_spans", lambda spans: spans)
    assert measure_step(model, shape, torch.float32, "cpu", keep_grads=False) == grouped


def test_plan_runs_one_mvit_attention_call_of_each_shape_and_counts_what_all_would():
    """On the meta device QueryChunks runs three query chunks (the plan of MViT at 768 frames has
    thousands of identical ones): the same bytes as running them all."""
    from re2tal.backbones import mvit
    from re2tal.backbones.build import build_backbone
    from re2tal.config import BackboneConfig

    shape = (1, 3, 32, 32, 32)
    with torch.device("meta"):
        model = build_backbone(BackboneConfig(name="mvit_v2_s", reversible=True, depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 2, 4, 8]))
    model.train()
    all_chunks = mvit.query_chunks
    try:
        mvit.ATTN_CALL_ELEMENTS, saved = 1000, mvit.ATTN_CALL_ELEMENTS  # stage 1: 18 chunks of 58 queries, one of 38
        assert len(mvit.query_chunks(1024, 58, torch.device("meta"))) == 3
        grouped = measure_step(model, shape, torch.float32, "cpu", keep_grads=True)
        mvit.query_chunks = lambda n, per_call, device: all_chunks(n, per_call, torch.device("cpu"))
        every = measure_step(model, shape, torch.float32, "cpu", keep_grads=True)
    finally:
        mvit.query_chunks, mvit.ATTN_CALL_ELEMENTS = all_chunks, saved
    assert grouped == every


# --------------------------------------------------------------------------------------------
# ZeRO layout against DeepSpeed

WORLD = 2
BUCKET = 1_000_000  # reduce_bucket_size of the test engines (DeepSpeed's 5e8 would be 1 GB each)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_worker(rank: int, port: int, out_dir: str) -> None:
    """DeepSpeed's own tensors of the debug Localizer on this rank, ZeRO-1/2/3, bf16."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed

    from re2tal.training.optim import deepspeed_config, param_groups

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    found = {}
    for stage in (1, 2, 3):
        cfg = load_config(DEBUG, [f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"])
        torch.manual_seed(0)
        model = build_localizer(cfg)
        ds = deepspeed_config(cfg)
        ds["zero_optimization"]["reduce_bucket_size"] = BUCKET
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model.backbone, model.detector, cfg.optim), config=ds)
        opt = engine.optimizer
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        params = [p for p in engine.module.parameters() if p.requires_grad]
        r = {}

        def during_backward(grad):  # the patch embedding's gradient is among the last: buffers are full
            r["buckets"] = nbytes(t for b in opt.ipg_buckets.values() for t in b.buffer)
            # ZeRO-1 keeps every gradient whole in .grad (the patch embedding's own are still to come)
            whole = lambda: nbytes(p.grad for p in params) + nbytes(p for p in params if p.grad is None)  # noqa: E731
            r["gradient_partition"] = {1: whole, 2: lambda: nbytes([opt.grads_in_partition]),
                                       3: lambda: nbytes([opt.grad_partitions_flat_buffer])}[stage]()
            return grad

        hook = params[0].register_hook(during_backward)
        out = engine(torch.randn(1, 3, 16, 64, 64, dtype=torch.bfloat16), torch.ones(1))
        engine.backward(sum(o.float().sum() for o in [*out.cls_logits, *out.offsets, out.frame_logits]))
        hook.remove()
        engine.step()
        r["moments"] = nbytes(v for st in opt.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
        if stage < 3:
            r["parameter_partition"] = nbytes(opt.bit16_groups_flat)
            r["master_weights"] = nbytes(opt.single_partition_of_fp32_groups)
        else:
            persistent = [p for p in engine.module.parameters() if p.requires_grad and getattr(p, "ds_persist", False)]
            r["parameter_partition"] = nbytes([opt.lp_param_buffer]) + sum(p.ds_numel * 2 for p in persistent)
            r["master_weights"] = nbytes(opt.fp32_partitioned_groups_flat)
        found[stage] = r
        del engine, opt, model
    torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero_layout_equals_deepspeed_partitioning_on_two_workers(tmp_path):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    mp.spawn(zero_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    cfg = load_config(DEBUG)
    with torch.device("meta"):
        groups, other, _ = optimizer_groups(build_localizer(cfg), cfg)
    assert len(groups) == 4 and other == 0  # backbone / head x decay / no decay, nothing frozen
    wrong = []
    for rank in range(WORLD):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        for stage, measured in found.items():
            z = zero_memory(groups, 0, 0, "bf16", stage, WORLD, rank, zero={"reduce_bucket_size": BUCKET})
            wrong += [f"rank {rank}, ZeRO-{stage}, {key}: plan {getattr(z, key)}, DeepSpeed {value}"
                      for key, value in measured.items() if getattr(z, key) != value]
    assert not wrong, "; ".join(wrong)


def test_zero_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from re2tal.planning.zero_layout import ZERO_DEFAULTS

    ds = DeepSpeedZeroConfig()
    assert {k: getattr(ds, k) for k in ZERO_DEFAULTS if k != "overlap_comm_stage3"} == \
           {k: v for k, v in ZERO_DEFAULTS.items() if k != "overlap_comm_stage3"}
    assert DeepSpeedZeroConfig(stage=3).overlap_comm is ZERO_DEFAULTS["overlap_comm_stage3"]


# --------------------------------------------------------------------------------------------
# the command


def test_largest_num_frames_fits_and_one_stride_more_does_not():
    cfg = load_config(DEBUG)
    planner = Planner(cfg, build_localizer)
    limit = int(planner.plan("reversible", 64).peak * 1.5)
    best = planner.largest_frames("reversible", limit)
    stride = cfg.backbone.temporal_stride
    assert best > 64 and best % stride == 0
    assert planner.plan("reversible", best).peak <= limit < planner.plan("reversible", best + stride).peak


def test_plan_command_on_a_paper_config_reports_reversible_below_standard(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "re2tal.cli", "plan", "--config", str(ROOT / "configs" / "anet_re2swin_t.yaml"),
                           "--set", "data.batch_size=2", "--gpu-memory-gb", "40", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    c, modes = plan["config"], plan["modes"]
    assert (c["num_frames"], c["frame_size"], c["batch_size"], c["device"], c["precision"], c["zero_stage"]) == (768, 224, 2, "cuda", "bf16", 2)
    assert modes["reversible"]["peak_bytes"] < modes["standard"]["peak_bytes"]
    assert modes["reversible"]["activations_backbone"] < modes["standard"]["activations_backbone"] / 5
    assert not modes["standard"]["fits"] and modes["reversible"]["fits"]
    assert modes["reversible"]["largest_num_frames"] > 768 > modes["standard"]["largest_num_frames"] > 0
    assert all(m["largest_num_frames"] % 2 == 0 for m in modes.values())
    assert "reversible" in proc.stdout and "largest num_frames" in proc.stdout


def test_train_announces_the_prediction_before_launch(capsys):
    from re2tal.planning.plan import announce_prediction

    gb = announce_prediction(load_config(DEBUG), build_localizer)
    out = capsys.readouterr().out
    assert 0 < gb < 2 and f"predicted peak memory per worker: {gb:.2f} GB" in out


def test_bench_gpu_dry_run_on_the_cpu_runs_every_section(tmp_path):
    """`bench gpu --device cpu`: the GPU script end to end at tiny sizes, every section without an
    error, the memory sweep measured and predicted for every backbone, mode and frame count."""
    proc = subprocess.run([sys.executable, "-m", "re2tal.cli", "bench", "gpu", "--device", "cpu", "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert report["device"] == "cpu (dry run)"
    assert all("error" not in report[k] and "skipped" not in report[k] for k in ("torchvision", "reversible_gradients", "debug_training", "memory"))
    assert report["torchvision"]["fp32_max_relative_error"] < 1e-4
    assert all(r["grad_error"] < 1e-4 for k, r in report["reversible_gradients"].items() if k.endswith("_fp32"))
    assert report["debug_training"]["step"] > 0
    runs = report["memory"]["runs"]
    assert len(runs) == 2 * 3 * 2 and all(r["peak_gb"] > 0 and r["predicted_peak_gb"] > 0 for r in runs)
    assert (tmp_path / "gpu" / "gpu_memory.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_gpu_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "re2tal.cli", "bench", "gpu", "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "gpu").exists()


def test_plan_of_an_adatad_vit_has_no_re2_column_and_counts_only_adapter_blocks():
    """A ViT frozen but for its adapters is not rewired (the config refuses Re² with freeze), so
    the plan leaves that column out; checkpointed, it keeps the inputs of the blocks from the first
    adapter on (the frozen blocks before it need no graph)."""
    from re2tal.planning.plan import make_plan

    vit = {"backbone.name": "vit_s", "backbone.embed_dim": 32, "backbone.num_heads": [2], "backbone.depths": [4], "backbone.patch_size": [2, 16, 16],
           "backbone.reversible": False, "backbone.activation_checkpointing": True, "backbone.freeze": "all_but_adapters",
           "backbone.pretrained": None, "data.num_frames": 32}
    kept = {}
    for first in (1, 3):
        cfg = load_config(DEBUG).with_overrides({**vit, "backbone.adapter": {"blocks": list(range(first, 4))}})
        plan = make_plan(cfg, build_localizer, 80, search=False)
        assert list(plan.modes) == ["standard", "checkpoint"]
        kept[first] = plan.modes["checkpoint"].activations_backbone
    block_input = 32 * 2 * 8 * 4 * 4 * 4  # channels x 2 chunks x 8 x 4 x 4 tokens (64 px, patch 16), fp32
    assert kept[1] - kept[3] == 2 * block_input
