"""Checkpoints: what a worker saves and restores, where a run's checkpoints live, which of them is
complete, and loading trained weights from one.

A checkpoint is a directory `<train.storage_path>/<train.name>/epochEEEE-stepSSSSSSSS` holding the
DeepSpeed state (`state/`), every worker's RNG / generator / loss state (`worker_rank{r}.pt`) and
the EMA weights (`ema.pt`), and what the model is: its resolved config (`config.yaml`, credentials
left out) and the label names of its classes (`labels.json`), so `re2tal predict --model <dir>`
needs nothing else. Under Ray Train every worker uploads its part and Ray registers the
checkpoint once all parts are there (`checkpoint_manager_snapshot.json`). In local mode (one
process, `--local`) the directory is written here, to any fsspec storage, with `complete.json` last:
a checkpoint is complete when Ray registered it or it has that file, and a run resumes from the
newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from re2tal.config import Config, StorageConfig
from re2tal.data.storage import filesystem, is_local
from re2tal.errors import BadInput
from re2tal.training import distributed as dist_utils
from re2tal.training.distributed import Worker

STATE_TAG = "state"  # DeepSpeed checkpoint tag inside each checkpoint directory
COMPLETE = "complete.json"  # written last by local mode
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints
CONFIG, LABELS = "config.yaml", "labels.json"  # what the model is (rank 0)


def name(epoch: int, step: int) -> str:
    """Checkpoint names sort as they were made: epoch, then optimizer step."""
    return f"epoch{epoch:04d}-step{step:08d}"


def run_url(cfg: Config) -> str:
    return f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name}"


# --------------------------------------------------------------------------------------------
# a worker's part


def save(path: str, engine, client_state: dict, generator: torch.Generator, criterion: nn.Module, ema, worker: Worker,
         extra: dict[str, Any] | None = None, cfg: Config | None = None, labels: list[str] | None = None) -> None:
    """This worker's part of a checkpoint into the local directory `path`; `extra` (rank 0):
    JSON-able records kept with it (e.g. tracking records not yet sent); `cfg`, `labels` (rank 0):
    the run's resolved config and label names (`model_info` reads them back)."""
    engine.save_checkpoint(path, tag=STATE_TAG, client_state={"re2tal": client_state})
    torch.save({"rng": dist_utils.rng_state(), "generator": generator.get_state(), "criterion": criterion.state_dict()},
               Path(path, f"worker_rank{worker.rank}.pt"))
    if worker.is_main:
        if ema is not None:
            torch.save(ema.state_dict(), Path(path, "ema.pt"))
        if extra:
            Path(path, "extra.json").write_text(json.dumps(extra))
        if cfg is not None:
            Path(path, CONFIG).write_text(config_yaml(cfg))
        if labels is not None:
            Path(path, LABELS).write_text(json.dumps(labels))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML that validates again: credentials left out (not masked), so
    whoever loads it uses their own (environment, instance profile, or --set)."""
    import yaml

    tree = cfg.model_dump(mode="json")
    tree["storage"] |= {"access_key_id": None, "secret_access_key": None}
    return yaml.safe_dump(tree, sort_keys=False)


def model_info(path: Path) -> tuple[dict | None, list[str] | None]:
    """(the config tree, the label names) a checkpoint directory holds; None for what it lacks
    (checkpoints written before re2tal kept them)."""
    import yaml

    config, labels = path / CONFIG, path / LABELS
    return (yaml.safe_load(config.read_text()) if config.exists() else None,
            json.loads(labels.read_text()) if labels.exists() else None)


def restore(path: str, engine, criterion: nn.Module, ema, generator: torch.Generator, worker: Worker) -> tuple[dict, dict]:
    """Load this worker's part; (the client state saved by `save`, the extra records or {})."""
    _, client = engine.load_checkpoint(path, tag=STATE_TAG)
    own = Path(path, f"worker_rank{worker.rank}.pt")
    if own.exists():  # absent when the worker count changed: fresh generators, same model
        saved = torch.load(own, weights_only=False)
        dist_utils.set_rng_state(saved["rng"])
        generator.set_state(saved["generator"])
        criterion.load_state_dict(saved["criterion"])
    if ema is not None and Path(path, "ema.pt").exists():
        ema.load_state_dict(torch.load(Path(path, "ema.pt"), weights_only=True))
    extra = Path(path, "extra.json")
    return client["re2tal"], json.loads(extra.read_text()) if worker.is_main and extra.exists() else {}


# --------------------------------------------------------------------------------------------
# local mode: Ray Train keeps its checkpoints in memory only, so they are written to the run's
# storage here and found there again on the next launch


def persist(cfg: Config, path: str) -> str:
    """Copy the checkpoint directory `path` (named as `name` makes them) to the run's storage,
    `complete.json` last, then drop the oldest beyond `train.keep_checkpoints`; its URL."""
    target = f"{run_url(cfg)}/{posixpath.basename(path.rstrip('/'))}"
    marker = json.dumps({"name": posixpath.basename(target)})
    if is_local(target):
        # Copied under a temporary name and renamed: a process killed while copying leaves no
        # directory that the next launch would take for a checkpoint.
        final = Path(target.removeprefix("file://")).resolve()
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        shutil.copytree(path, partial, dirs_exist_ok=True)
        (partial / COMPLETE).write_text(marker)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    else:
        fs, remote = filesystem(target, cfg.storage)
        fs.put(path.rstrip("/") + "/", remote, recursive=True)
        fs.pipe_file(f"{remote}/{COMPLETE}", marker.encode())
    fs, root = filesystem(run_url(cfg), cfg.storage)
    for old in complete(cfg)[: -cfg.train.keep_checkpoints]:
        fs.rm(f"{root}/{old}", recursive=True)
    return target


def complete(cfg: Config) -> list[str]:
    """Names of the run's complete checkpoints, oldest first: registered by Ray Train, or written
    whole by local mode."""
    fs, root = filesystem(run_url(cfg), cfg.storage)
    if not fs.isdir(root):
        return []
    fs.invalidate_cache(root)
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    done = {n for n in names if n.startswith("epoch") and fs.exists(f"{root}/{n}/{COMPLETE}")}
    if RAY_SNAPSHOT in names:
        snapshot = json.loads(fs.cat_file(f"{root}/{RAY_SNAPSHOT}"))
        done |= {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])} & names
    return sorted(done)


def latest(cfg: Config) -> str | None:
    """URL of the run's newest complete checkpoint, or None."""
    names = complete(cfg)
    return f"{run_url(cfg)}/{names[-1]}" if names else None


# --------------------------------------------------------------------------------------------
# trained weights


@contextlib.contextmanager
def local_checkpoint(url: str, storage: StorageConfig, flag: str = "--checkpoint") -> Iterator[Path]:
    """A checkpoint directory (local path or object-storage URL) as a local path; `flag` names
    where the URL came from in errors."""
    if is_local(url):
        path = Path(url.removeprefix("file://"))
        if not path.is_dir():
            raise BadInput(f"{flag}: {url} is not a checkpoint directory")
        yield path
        return
    fs, remote = filesystem(url, storage)
    if not fs.isdir(remote):
        raise BadInput(f"{flag}: {url} is not a checkpoint directory")
    with tempfile.TemporaryDirectory(prefix="re2tal-ckpt-") as tmp:
        fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
        yield Path(tmp)


def load_weights(model: nn.Module, path: Path, use_ema: bool = True, flag: str = "--checkpoint") -> str:
    """Load trained weights from a checkpoint directory written by the training loop: the fp32
    weights of the DeepSpeed state (any ZeRO stage), then the EMA weights over them when kept.
    Returns which weights were loaded."""
    if not (path / STATE_TAG).is_dir():
        raise BadInput(f"{flag}: {path} has no {STATE_TAG}/ folder; not a re2tal checkpoint")
    state = _fp32_state(path, flag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise BadInput(f"{flag}: {path} does not fit this config's model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if use_ema and (path / "ema.pt").exists():
        ema = torch.load(path / "ema.pt", map_location="cpu", weights_only=True)
        own = model.state_dict()
        with torch.no_grad():
            for k, v in ema.items():
                own[k].copy_(v)
        return "ema"
    return "model"


def _fp32_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """ZeRO checkpoints hold the fp32 master weights in the optimizer partitions; without ZeRO
    partitions (stage 0 in fp32) the module state dict is complete."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any((path / STATE_TAG).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=STATE_TAG)
    files = sorted((path / STATE_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise BadInput(f"{flag}: {path}/{STATE_TAG} holds no model states")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
