"""The trainer driver: what `re2tal train` and `jobs/train.py` run on the Ray driver.

It checks inputs before any worker starts, opens the MLflow run, launches the Ray Train
`TorchTrainer` whose workers run `re2tal.training.loop.train_loop_per_worker`, shows progress and
prints the final table. Re-running with the same `train.name` and `train.storage_path` resumes
from the last checkpoint (Ray Train finds it under `<storage_path>/<name>`).
"""

from __future__ import annotations

import os
import queue
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable

from re2tal.config import Config, StorageConfig
from re2tal.data.storage import filesystem, protocol
from re2tal.errors import BadInput

STOP = "__stop__"
WAIT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class TrainingStopped(Exception):
    """The run ended without finishing (non-finite loss, workers failed past max_failures)."""


def storage_for_ray(storage_path: str, storage: StorageConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; object stores
    through the same fsspec filesystem (endpoint, credentials) the data uses, wrapped for pyarrow."""
    if protocol(storage_path) == "file":
        path = storage_path.removeprefix("file://")
        return str(Path(path).expanduser().resolve()), None
    import pyarrow.fs

    fs, path = filesystem(storage_path, storage)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def init_ray(verbose: bool = False) -> None:
    """Connect to the cluster this job runs on (RAY_ADDRESS, set by `ray job submit`), else start
    a local Ray for the debug mode. Unless `verbose`, Ray's notes about itself stay off the
    terminal (re2tal.console)."""
    import logging

    import ray

    from re2tal import console

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 logging_level=logging.INFO if verbose else logging.WARNING)
        if not verbose:
            console.filter_worker_output()


def worker_env(cfg: Config) -> dict:
    """Environment of the training workers (merged into the job's runtime environment)."""
    return {"env_vars": {
        # DeepSpeed JIT-builds ops once per cache directory: share the launcher's.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve())),
        "DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu",
    }}


class Progress:
    """Consumes the records rank 0 puts on a queue: draws a tqdm bar (epoch, step, loss, lr, ETA)
    and one line per evaluation when `draw`, and keeps the reason if the run was stopped (Ray
    Train's result only carries metrics reported with a checkpoint)."""

    def __init__(self, q, total_steps: int, draw: bool = True):
        from tqdm import tqdm

        self.q = q
        self.stopped: str | None = None
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, desc="train", disable=not draw)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty as RayQueueEmpty

        while True:
            try:
                rec = self.q.get(timeout=0.5)
            except (queue.Empty, RayQueueEmpty):
                continue
            if rec == STOP:
                return
            kind = rec.pop("kind")
            if kind == "step":
                self.bar.n = rec["step"]
                self.bar.set_postfix(epoch=rec["epoch"], loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                self.bar.refresh()
            elif kind == "eval" and not self.bar.disable and "text" in rec:
                self.bar.write(rec["text"])
            elif kind == "eval" and not self.bar.disable:
                self.bar.write(f"epoch {rec['epoch']}: average mAP {rec['average_mAP']:.4f}  " +
                               "  ".join(f"mAP@{t} {v:.3f}" for t, v in rec["mAP"].items()))
            elif kind == "stopped":
                self.stopped = rec["text"]
                self.bar.write(rec["text"])

    def close(self) -> None:
        """Waits until every record put before is consumed (once; later calls do nothing more)."""
        if self.thread.is_alive():
            self.q.put(STOP)
            self.thread.join(timeout=60)
        self.bar.close()


PATH_KEYS = ("data.annotations", "data.video_root", "backbone.pretrained", "head.nms.external_scores", "train.storage_path",
             "finetune.output")


def absolute_paths(cfg: Config) -> Config:
    """The config with relative local paths (and a relative sqlite tracking URI) made absolute
    against this (the driver's) working directory: Ray Train workers and Tune trials run in
    directories of their own."""
    from re2tal.tracking import resolve_uri

    changes, flat = {}, cfg.flat()
    if resolve_uri(cfg.tracking.tracking_uri) != cfg.tracking.tracking_uri:
        changes["tracking.tracking_uri"] = resolve_uri(cfg.tracking.tracking_uri)
    for key in PATH_KEYS:
        value = flat[key]
        if isinstance(value, str) and protocol(value) == "file" and "://" not in value and not os.path.isabs(value):
            changes[key] = str(Path(value).expanduser().resolve())
    return cfg.with_overrides(changes) if changes else cfg


def prepare(cfg: Config, clips: bool = False):
    """Checks that need the data, made before any worker starts: generates the synthetic set if
    configured and absent, reads the annotations (ActivityNet JSON; `clips`: a CSV of recognition
    clips, re2tal.data.clips), checks subsets and the class count."""
    from re2tal.config import clip_annotations
    from re2tal.data.annotations import load_annotations
    from re2tal.data.clips import load_clips
    from re2tal.data.synth import ensure_synthetic

    if clip_annotations(cfg.data.annotations) != clips:
        raise BadInput(f"data.annotations: {cfg.data.annotations}: re2tal finetune reads a CSV of clips (Kinetics' label,youtube_id,"
                       "time_start,time_end,split or id/url,label,start,end,subset), re2tal train ActivityNet-format JSON")
    if cfg.data.synth is not None:
        ensure_synthetic(cfg.data, cfg.storage)
    annotations = (load_clips if clips else load_annotations)(cfg.data, cfg.storage)
    for key in ("train_subset", "val_subset"):
        try:
            annotations.subset(getattr(cfg.data, key))
        except BadInput as err:
            raise BadInput(f"data.{key}: {err}") from None
    if cfg.head.num_classes not in ((len(annotations.labels),) if clips else (1, len(annotations.labels))):
        raise BadInput(f"head.num_classes: {cfg.head.num_classes}, but {cfg.data.annotations} has {len(annotations.labels)} "
                       + ("labels" if clips else "action labels (use their number, or 1 for a class-agnostic head)"))
    return annotations


def task_parts(task: str) -> tuple[Callable[[Config], Any], Callable[[dict], None], Callable[[Config], float | None]]:
    """What differs between the tasks a run trains, in one place: (checks and annotations before
    any worker starts, the per-worker loop, the peak-memory prediction announced)."""
    match task:
        case "localization":
            from re2tal.training.loop import train_loop_per_worker
            from re2tal.planning.plan import announce_prediction

            from re2tal.training.model import build_model

            return prepare, train_loop_per_worker, partial(announce_prediction, build_model=build_model)
        case "finetune":
            from re2tal.training.finetune import finetune_loop_per_worker

            return partial(prepare, clips=True), finetune_loop_per_worker, lambda cfg: None
    raise ValueError(f"unknown task {task!r}")


def fit(cfg: Config, *, local: bool = False, callbacks: list | None = None, extra_tags: dict | None = None,
        show_progress: bool = True, verbose: bool = False, task: str = "localization") -> dict:
    """Train; returns the final metrics of rank 0 (plus `checkpoint`, `mlflow_run_id`). Raises
    BadInput for bad inputs (before any worker starts) and TrainingStopped when the run cannot
    finish. `show_progress`: draw the progress bar and evaluation lines; `verbose`: let Ray's own
    log lines through. `task`: localization (`re2tal train`) or finetune (action recognition,
    `re2tal finetune`)."""
    import ray.train
    import ray.util.queue
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from re2tal import tracking

    cfg = absolute_paths(cfg)
    check_data, train_loop_per_worker, predict_memory = task_parts(task)
    annotations = check_data(cfg)
    predicted_gb = predict_memory(cfg)
    storage_path, storage_fs = storage_for_ray(cfg.train.storage_path, cfg.storage)
    num_workers = 0 if local else cfg.train.num_workers
    if not local:
        init_ray(verbose)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri, run_id, _ = tracking.open_run(cfg, extra_tags)
        if predicted_gb is not None:  # next to the workers' measured peak_memory_gb
            tracking.Tracker(uri, run_id).metrics({"predicted_peak_memory_gb": predicted_gb}, step=0)
    steps_total = cfg.train.epochs * steps_per_epoch(cfg, annotations, max(1, num_workers))
    progress = Progress(queue.Queue() if local else driver_queue(), steps_total, draw=show_progress)
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    loop_config = {"cfg": cfg, "annotations": annotations, "tracking": (uri, run_id), "progress": progress.q, "local": local}
    datasets = dataset_config = None
    if cfg.data.loader == "ray_data":  # decoding on any node's CPUs (re2tal.raydata.loader)
        if local:
            raise BadInput("data.loader: ray_data decodes in Ray tasks for Ray Train workers; the in-process local mode uses threads")
        from re2tal.raydata.loader import make_cursor, training_datasets

        loop_config["cursor"] = make_cursor()
        datasets, dataset_config = training_datasets(cfg, annotations, max(1, num_workers), loop_config["cursor"])
    # Ray Train reads how long a worker group may wait for its placement from the driver's
    # environment (and passes it on to its controller); a group it cannot place in that time is a
    # controller failure, which must end the run instead of waiting again forever.
    os.environ[WAIT_ENV] = f"{cfg.train.node_wait_s:g}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=dataset_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per report
            worker_runtime_env=worker_env(cfg),
        ),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        metrics["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
        metrics["mlflow_run_id"] = run_id
        metrics["predicted_peak_memory_gb"] = predicted_gb
        progress.close()
        if progress.stopped:
            raise TrainingStopped(progress.stopped)
        status = "FINISHED"
        return metrics
    except ray.train.ControllerError as err:
        if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise TrainingStopped(f"training failed: {_first_line(err)}") from err
        want = ", ".join(f"{k}: {v:g}" for k, v in resources.items())
        have = ", ".join(f"{k}: {ray.available_resources().get(k, 0):g}" for k in resources)
        raise TrainingStopped(f"training stopped: waited train.node_wait_s={cfg.train.node_wait_s:g} s for {num_workers} workers "
                              f"x {{{want}}} (free in the cluster now: {{{have}}}); the last checkpoint under "
                              f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name} is kept") from err
    except ray.train.TrainingFailedError as err:
        raise TrainingStopped(f"training failed after {cfg.train.max_failures} restart(s): {_first_line(err)}") from err
    finally:
        progress.close()
        if run_id is not None:
            tracking.close_run(uri, run_id, status)


def driver_queue():
    """A Ray queue whose actor lives on this (the driver's) node: a zero-CPU actor may otherwise
    be placed on any node, and dies with it, taking the restarted workers down with it."""
    import ray
    import ray.util.queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.util.queue.Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def steps_per_epoch(cfg: Config, annotations, world_size: int) -> int:
    """Optimizer steps per epoch: every worker takes the same number of micro-batches (a rank that
    ran one more would wait forever in the gradient all-reduce), so the remainder is dropped."""
    n = len(annotations.subset(cfg.data.train_subset))
    micro = n // (world_size * cfg.data.batch_size)
    if micro == 0:
        raise BadInput(f"data.train_subset: {n} training videos are fewer than workers x batch size = {world_size * cfg.data.batch_size}")
    return max(1, micro // cfg.deepspeed.gradient_accumulation_steps)
