"""Reversible stages under data parallelism: real DDP and real DeepSpeed engines (CPU, gloo,
two processes). Every parameter must receive exactly one, correctly averaged gradient, as a
single-process plain-autograd run of the same two batches says."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from re2tal.bench.model import max_relative_error
from test_rev import WIDTH, inputs, make_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORLD = 2
STEPS = 2
LR = 0.1
# (name, ZeRO stage or None for DDP, precision)
RUNS = [("ddp", None, "fp32"), ("zero0", 0, "fp32"), ("zero1", 1, "fp32"), ("zero2", 2, "fp32"),
        ("zero3", 3, "fp32"), ("zero2_bf16", 2, "bf16")]


def build_model(vanilla: bool = False) -> nn.Module:
    """A reversible stage of 5 residual functions between ordinary layers, four of them run in
    pieces (so a parameter's gradient is summed over pieces and must still reach DDP / ZeRO once)."""
    torch.manual_seed(0)
    stage = make_stage(5, pieces=True, piece_size=1)
    stage.vanilla = vanilla
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), stage, nn.LayerNorm(WIDTH)).train()


def batch(rank: int, step: int, dtype=torch.float32):
    x, dy = inputs(seed=100 * step + rank, requires_grad=False)
    return x.to(dtype), dy.to(dtype)


def forward_backward(model, backward, rank: int, step: int, dtype=torch.float32) -> None:
    x, dy = batch(rank, step, dtype)
    torch.manual_seed(1000 * step + rank)  # each rank's dropout / drop-path draws
    y = model(x)
    backward((y * dy).sum())


def reference(steps: int = STEPS) -> list[list[torch.Tensor]]:
    """Per step, the rank-averaged gradients of one process running both ranks' batches through
    the vanilla (plain autograd) model, with SGD steps in between."""
    model = build_model(vanilla=True)
    grads = []
    for step in range(steps):
        model.zero_grad()
        for rank in range(WORLD):
            forward_backward(model, lambda loss: (loss / WORLD).backward(), rank, step)
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return grads


def ds_config(zero_stage: int, precision: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 10**9}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name, zero_stage, precision in RUNS:
        grads = []
        if zero_stage is None:
            model = nn.parallel.DistributedDataParallel(build_model())
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for step in range(STEPS):
                opt.zero_grad()
                forward_backward(model, lambda loss: loss.backward(), rank, step)
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            engine, *_ = deepspeed.initialize(model=build_model(), config=ds_config(zero_stage, precision))
            for step in range(STEPS):
                forward_backward(engine, engine.backward, rank, step, dtype)
                grads.append([safe_get_full_grad(p).float().clone() for p in engine.module.parameters()])
                engine.step()
        results[name] = grads
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("rev_dist")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", [r[0] for r in RUNS if r[2] == "fp32"])
def test_each_parameter_gets_one_correctly_averaged_gradient_per_step(distributed_grads, name):
    want = reference()
    for rank_results in distributed_grads:
        got = rank_results[name]
        assert len(got) == STEPS
        for step in range(STEPS):
            assert len(got[step]) == len(want[step])
            assert max_relative_error(got[step], want[step]) <= 1e-5, f"{name} step {step}"


def test_deepspeed_bf16_engine_runs_reversible_stage_with_gradients_close_to_fp32(distributed_grads):
    want = reference()
    got = distributed_grads[0]["zero2_bf16"]
    for step in range(STEPS):
        assert all(torch.isfinite(g).all() for g in got[step])
        assert max_relative_error(got[step], want[step]) <= 0.1, f"step {step}"


def batchnorm_worker(rank: int, port: int, out_dir: str) -> None:
    """A Re²SlowFast whose BatchNorm statistics moved on this rank's own batch, then averaged."""
    import torch.distributed as dist

    from re2tal.backbones import build_backbone
    from re2tal.config import BackboneConfig
    from re2tal.training.distributed import Worker, average_batchnorm_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="slowfast_r50", reversible=True, depths=[1, 2, 1, 1])).train()
    torch.manual_seed(rank)
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 32, 32) * (rank + 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {k: v.clone() * 2 for k, v in before.items() if v.is_floating_point()}  # an EMA's copy
    average_batchnorm_statistics(model, Worker(rank, WORLD, rank, torch.device("cpu")), shadow)
    torch.save({"before": before, "after": model.state_dict(), "shadow": shadow}, os.path.join(out_dir, f"bn{rank}.pt"))
    dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_over_workers(tmp_path):
    """What the training loop does after each epoch: every worker ends with the mean of the
    workers' running statistics (in the model and the EMA), and nothing else changes."""
    mp.spawn(batchnorm_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(WORLD)]
    stats = [k for k in ranks[0]["before"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50 and not torch.equal(ranks[0]["before"][stats[0]], ranks[1]["before"][stats[0]])
    for k, v in ranks[0]["before"].items():
        mean = (ranks[0]["before"][k] + ranks[1]["before"][k]) / 2 if k in stats else v
        for r in ranks:
            assert torch.allclose(r["after"][k], mean, rtol=1e-6, atol=1e-7), k
            if k in r["shadow"]:
                assert torch.allclose(r["shadow"][k], 2 * mean if k in stats else 2 * r["before"][k], rtol=1e-6, atol=1e-7), k
