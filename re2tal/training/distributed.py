"""Distributed setup in one place: rank, world size, device, threads, seeds, and the few
collectives the training loop needs (max over workers, gather to rank 0, buffer averaging)."""

from __future__ import annotations

import os
import random
import resource
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from re2tal.config import Config


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: Config) -> Worker:
    """Called first in every Ray Train worker (or in-process in local mode).

    Ray Train has already initialised the torch.distributed process group (gloo on CPU, nccl on
    GPU); in local mode there is none, so a group of one is made for DeepSpeed."""
    import deepspeed
    import ray.train

    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    if cfg.train.use_gpu:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    if not dist.is_initialized():
        # A fresh port every time: a port left in the environment by an earlier run of this
        # process (inherited by its children too) may still be bound.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        # DeepSpeed keeps a module-wide clone of the world group, made on its first engine; Ray
        # Train's local mode destroys the group after each run, so a second run in this process
        # would broadcast over a dead group. A new group gets a new clone.
        deepspeed.utils.groups._WORLD_GROUP = None
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo", verbose=False)
    return Worker(rank=rank, world_size=world, local_rank=local_rank, device=device)


def node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random generators (saved per rank in checkpoints)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def peak_memory_gb(worker: Worker) -> float:
    """CUDA: max allocated on this worker's device; CPU: peak RSS of this worker process."""
    if worker.device.type == "cuda":
        return torch.cuda.max_memory_allocated(worker.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def all_max(value: float, worker: Worker) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=worker.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_sum(value: float, worker: Worker) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=worker.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def average_batchnorm_statistics(model: nn.Module, worker: Worker, shadow: dict[str, torch.Tensor] | None = None) -> None:
    """Average the BatchNorm running statistics of `model` over workers, in place, and the
    same-named entries of `shadow` (an EMA's). Each worker's batches move its own copy and
    DeepSpeed does not synchronise buffers (DDP would broadcast rank 0's)."""
    if worker.world_size == 1:
        return
    names = [f"{prefix}.{n}" for prefix, m in model.named_modules() if isinstance(m, _BatchNorm)
             for n, b in m.named_buffers(recurse=False) if b.is_floating_point()]
    buffers = dict(model.named_buffers())
    tensors = [buffers[n] for n in names] + [shadow[n] for n in names if shadow is not None and n in shadow]
    for t in tensors:
        total = t.detach().float()
        dist.all_reduce(total)
        t.detach().copy_(total / worker.world_size)


def gather_to_main(obj: Any, worker: Worker) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list in rank order); None elsewhere."""
    out = [None] * worker.world_size if worker.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every worker."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
