"""The Ray Train driver every task shares: `fit(cfg, task)`.

It checks inputs before any worker starts (the task's data check and memory prediction), opens
the MLflow run, launches the Ray Train `TorchTrainer` whose workers run
`re2tal.training.loop.train_loop_per_worker` with the task, shows progress, and lets the task
write what it writes at the end. Re-running with the same `train.name` and `train.storage_path`
resumes from the last complete checkpoint (Ray Train finds it under `<storage_path>/<name>`; local
mode by re2tal.training.checkpoints' rule).
"""

from __future__ import annotations

import os
import posixpath
import queue
import threading
from pathlib import Path
from typing import Any

from re2tal.config import Config, StorageConfig
from re2tal.data.storage import filesystem, protocol
from re2tal.errors import BadInput
from re2tal.training.paths import absolute_paths
from re2tal.training.task import Task

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


def worker_env(cfg: Config) -> dict:
    """Environment of the training workers (merged into the job's runtime environment)."""
    return {"env_vars": {
        # DeepSpeed JIT-builds ops once per cache directory: share the launcher's.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve())),
        "DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu",
        # rank 0's tracker retries a failed send itself, every few seconds, in the background
        # (MLflow's own retries back off for minutes): the run's records catch up soon after a
        # tracking server comes back
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }}


class Progress:
    """Consumes the records rank 0 puts on a queue: draws a tqdm bar (epoch, step, loss, lr, ETA)
    and the lines the task writes (evaluations) when `draw`, and keeps the reason if the run was
    stopped (Ray Train's result only carries metrics reported with a checkpoint)."""

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
            elif kind == "line" and not self.bar.disable:
                self.bar.write(rec["text"])
            elif kind == "stopped":
                self.stopped = rec["text"]
                self.bar.write(rec["text"])

    def close(self) -> None:
        """Waits until every record put before is consumed (once; later calls do nothing more)."""
        if self.thread.is_alive():
            self.q.put(STOP)
            self.thread.join(timeout=60)
        self.bar.close()


def fit(cfg: Config, task: Task, *, local: bool = False, callbacks: list | None = None, extra_tags: dict | None = None,
        show_progress: bool = True, verbose: bool = False) -> dict:
    """Train `task`; returns the final metrics of rank 0 plus `checkpoint` (the URL of the last
    one), `mlflow_run_id`, `predicted_peak_memory_gb` and what the task's `finish` adds. Raises
    BadInput for bad inputs (before any worker starts) and TrainingStopped when the run cannot
    finish. `local`: one in-process worker (Ray Train's local mode) for a debugger;
    `show_progress`: draw the progress bar and evaluation lines; `verbose`: let Ray's own log
    lines through."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from re2tal import tracking
    from re2tal.raycluster import driver_queue, init_ray
    from re2tal.training.loop import steps_per_epoch, train_loop_per_worker

    cfg = absolute_paths(cfg)
    annotations = task.check_data(cfg)
    predicted_gb = task.predict_memory(cfg)
    storage_path, storage_fs = storage_for_ray(cfg.train.storage_path, cfg.storage)
    num_workers = 0 if local else cfg.train.num_workers
    if cfg.data.loader == "ray_data" and local:
        raise BadInput("data.loader: ray_data decodes in Ray tasks for Ray Train workers; the in-process local mode uses threads")
    if not local:
        init_ray(verbose)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri, run_id, _ = tracking.open_run(cfg, {"re2tal.task": task.name, **(extra_tags or {})})
        tracking.log_datasets(tracking._client(uri), run_id, cfg, annotations)
        if predicted_gb is not None:  # next to the workers' measured peak_memory_gb
            with_tracker(uri, run_id, cfg, lambda t: t.metrics({"predicted_peak_memory_gb": predicted_gb}, step=0))
    steps_total = cfg.train.epochs * steps_per_epoch(cfg, annotations, max(1, num_workers))
    progress = Progress(queue.Queue() if local else driver_queue(), steps_total, draw=show_progress)
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    loop_config = {"cfg": cfg, "task": task, "annotations": annotations, "tracking": (uri, run_id), "progress": progress.q,
                   "local": local}
    datasets = dataset_config = None
    if cfg.data.loader == "ray_data":  # decoding on any node's CPUs (re2tal.raydata.loader)
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
        progress.close()
        if progress.stopped:
            raise TrainingStopped(progress.stopped)
        metrics = dict(result.metrics or {})
        metrics["checkpoint"] = (f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name}/"
                                 f"{posixpath.basename(result.checkpoint.path.rstrip('/'))}" if result.checkpoint is not None else None)
        metrics["mlflow_run_id"] = run_id
        metrics["predicted_peak_memory_gb"] = predicted_gb
        metrics = with_tracker(uri, run_id, cfg, lambda t: task.finish(cfg, metrics, t))
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
            tracking.close_run(uri, run_id, status, retry_s=cfg.tracking.retry_s)


def with_tracker(uri: str | None, run_id: str | None, cfg: Config, use):
    """`use(tracker)` with a tracker of the run (None without one), everything it logged sent
    (retried up to `tracking.retry_s`) before returning `use`'s result."""
    if run_id is None:
        return use(None)
    from re2tal.tracking import Tracker

    tracker = Tracker(uri, run_id)
    try:
        return use(tracker)
    finally:
        if not tracker.close(cfg.tracking.retry_s):
            print(f"re2tal: MLflow at {uri} did not take every record in tracking.retry_s={cfg.tracking.retry_s:g} s "
                  f"({tracker.last_error})", flush=True)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
