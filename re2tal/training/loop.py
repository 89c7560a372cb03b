"""The per-worker training loop every task shares: what every Ray Train worker runs.

Every worker builds the same model (`task.build_model`), wraps it in a DeepSpeed engine and
iterates its shard of the epoch; all workers take the same number of micro-batches (a worker with
one more would wait forever in the gradient all-reduce). Each step reads top to bottom: batch ->
the task's losses (input, forward, losses) -> backward -> step -> log. Per-step metrics go to
MLflow from rank 0 through a background tracker (never waiting on the tracking server or on Ray
Train); `ray.train.report` is called only at a launch's first step, evaluations and checkpoints. A
checkpoint (DeepSpeed state, per-worker RNG / loss state, EMA, tracking records not sent yet) is
saved at every epoch end (and every `train.checkpoint_every_steps`); a restart resumes from the
latest complete one with no step repeated or lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import torch

from re2tal.config import Config
from re2tal.data.storage import is_local
from re2tal.training import checkpoints
from re2tal.training import distributed as dist_utils
from re2tal.training.distributed import Worker
from re2tal.training.task import Task

log = logging.getLogger("re2tal.training")


@dataclasses.dataclass
class State:
    """Where training is; saved in every checkpoint (DeepSpeed client state)."""

    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches done in this epoch
    position: int = 0  # videos of this worker's shard consumed in this epoch
    step: int = 0  # optimizer steps done in total
    best: float = -1.0  # best value of the task's main metric so far
    last_eval: dict = dataclasses.field(default_factory=dict)  # metrics of the latest evaluation
    start_eval: dict = dataclasses.field(default_factory=dict)  # metrics of the evaluation before the first step, if made


def steps_per_epoch(cfg: Config, annotations, world_size: int) -> int:
    """Optimizer steps per epoch: every worker takes the same number of micro-batches (a rank that
    ran one more would wait forever in the gradient all-reduce), so the remainder is dropped."""
    from re2tal.errors import BadInput

    n = len(annotations.subset(cfg.data.train_subset))
    micro = n // (world_size * cfg.data.batch_size)
    if micro == 0:
        raise BadInput(f"data.train_subset: {n} training videos are fewer than workers x batch size = {world_size * cfg.data.batch_size}")
    return max(1, micro // cfg.deepspeed.gradient_accumulation_steps)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function: `config` holds the resolved config, the task, the checked
    annotations, the MLflow run, the progress queue and whether this is local mode."""
    import deepspeed

    from re2tal.training.ema import EMA
    from re2tal.training.optim import deepspeed_config, param_groups, scheduler_factory

    cfg: Config = config["cfg"]
    task: Task = config["task"]
    annotations = config["annotations"]
    _quiet_libraries()
    worker = dist_utils.setup(cfg)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every worker
    model = task.build_model(cfg)
    steps = steps_per_epoch(cfg, annotations, worker.world_size)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model.backbone, task.head(model), cfg.optim),
        config=deepspeed_config(cfg),
        lr_scheduler=scheduler_factory(cfg.optim, steps, cfg.train.epochs),
    )
    criterion = task.criterion(cfg).to(worker.device)
    ema = EMA(engine.module, cfg.optim.ema_decay) if cfg.optim.ema else None
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + worker.rank)
    dist_utils.seed_everything(cfg.train.seed * 1000 + worker.rank)

    uri, run_id = config.get("tracking") or (None, None)
    tracker = None
    if worker.is_main and run_id:
        from re2tal.tracking import Tracker

        tracker = Tracker(uri, run_id)
    system = system_metrics(cfg, worker, tracker, uri, run_id)
    loop = Loop(cfg, task, worker, engine, criterion, ema, generator, annotations, tracker, config.get("progress"),
                config.get("local", False), cursor=config.get("cursor"))
    try:
        loop.run(loop.resume(), micro_per_epoch=steps * cfg.deepspeed.gradient_accumulation_steps)
    except BaseException:
        # what the last checkpoint does not keep is trained again after a restart: a short flush
        if system is not None:
            system.close(min(cfg.tracking.retry_s, 30.0))
        if tracker is not None:
            tracker.close(min(cfg.tracking.retry_s, 30.0))
        raise
    if system is not None:
        system.close(cfg.tracking.retry_s)
    if tracker is not None and not tracker.close(cfg.tracking.retry_s):
        log.warning("MLflow did not take %d metric records in tracking.retry_s=%g s (%s); the last checkpoint keeps them "
                    "and a resumed run sends them", len(tracker.unsent()), cfg.tracking.retry_s, tracker.last_error)


def system_metrics(cfg: Config, worker: Worker, tracker, uri: str | None, run_id: str | None):
    """MLflow's system metrics of this node (`re2tal.tracking.SystemMetrics`), sampled by its
    first worker: a process on the node whose CPUs and GPUs train (the driver may run on a head
    node without GPUs). Rank 0's node logs through rank 0's tracker, other nodes through their own
    (which `close` flushes), as `system/node<k>/...` when the run spans several nodes."""
    if not (run_id and cfg.tracking.system_metrics and worker.local_rank == 0):
        return None
    import ray.train

    from re2tal.tracking import SystemMetrics, Tracker

    ctx = ray.train.get_context()
    node = f"node{ctx.get_node_rank()}" if ctx.get_local_world_size() < ctx.get_world_size() else None
    return SystemMetrics(tracker or Tracker(uri, run_id), cfg.tracking.system_metrics_interval_s, node, own_tracker=tracker is None)


class Loop:
    """The epoch loop. What a batch's loss and an evaluation are comes from `task`; the loop
    offers it the engine, the worker's data shards, evaluation weights, lockstep iteration and
    logging."""

    def __init__(self, cfg: Config, task: Task, worker: Worker, engine, criterion, ema, generator, annotations, tracker,
                 progress, local: bool, cursor=None):
        from re2tal.data.video import VideoSource

        self.cfg, self.task, self.worker, self.engine, self.criterion = cfg, task, worker, engine, criterion
        self.cursor = cursor  # data.loader ray_data: where this worker's next pass starts (re2tal.raydata.loader)
        self.ema, self.generator, self.annotations = ema, generator, annotations
        self.tracker, self.progress, self.local = tracker, progress, local
        # The engine holds the model in the training precision (DeepSpeed bf16 / fp16 keep fp32
        # master weights in the optimizer); inputs are cast to it, no autocast.
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]
        self.source = VideoSource(cfg.storage)
        self.reported = False  # whether this launch has reported to Ray Train yet

    # -- the epoch loop -------------------------------------------------------------------------

    def resume(self) -> State:
        """The state of the latest complete checkpoint (restored into the engine, loss, EMA and
        generators), or a fresh one. Ray Train hands it to a restarted worker group; local mode
        finds it in the run's storage."""
        import ray.train

        if self.local:
            url = checkpoints.latest(self.cfg)
            found = checkpoints.local_checkpoint(url, self.cfg.storage) if url is not None else None
        else:
            checkpoint = ray.train.get_checkpoint()
            found = checkpoint.as_directory() if checkpoint is not None else None
        if found is None:
            return State()
        with found as path:
            client, extra = checkpoints.restore(str(path), self.engine, self.criterion, self.ema, self.generator, self.worker)
        state = State(**client)
        log.info("worker %d resumed at epoch %d, step %d", self.worker.rank, state.epoch, state.step)
        if self.tracker is not None:
            self.tracker.resend(extra.get("unsent_metrics", []))  # what the server did not take before that checkpoint
            self.tracker.metrics({"resumed_at_step": state.step}, step=state.step)  # restarts show in MLflow
        return state

    def run(self, state: State, micro_per_epoch: int) -> None:
        cfg = self.cfg
        self.micro_per_epoch = micro_per_epoch
        if state.epoch >= cfg.train.epochs:  # a finished run launched again: report how it ended
            self.report(state, {"epoch": state.epoch, "step": state.step, **state.last_eval})
            return
        if state.epoch == 0 and state.step == 0 and state.micro == 0:
            self.task.at_start(self, state)
        while state.epoch < cfg.train.epochs:
            cache_before = self.source.cache_use()
            throughput = self.train_epoch(state)
            if throughput is None:
                return  # stopped (non-finite loss), already reported
            # every worker must evaluate, and rank 0 checkpoint, the same model
            dist_utils.average_batchnorm_statistics(self.engine.module, self.worker, self.ema.shadow if self.ema else None)
            last = state.epoch == cfg.train.epochs - 1
            metrics = throughput | {"epoch": state.epoch + 1, "step": state.step}
            if cfg.train.evaluates(state.epoch):
                metrics |= self.evaluate(state)
            if last:
                metrics |= self.task.final_metrics(self, state)
            metrics["storage_fetched_mb"] = self.log_cache_use(state, cache_before)
            state.epoch, state.micro, state.position = state.epoch + 1, 0, 0
            self.save(state, metrics)

    def train_epoch(self, state: State) -> dict[str, float] | None:
        """Train the rest of `state.epoch`; its throughput metrics, or None when it had to stop
        (non-finite loss)."""
        cfg, engine, worker = self.cfg, self.engine, self.worker
        engine.train()
        self.criterion.set_epoch(state.epoch)
        clips = waited = 0
        videos: set[str] = set()
        started = tick = window_start = time.perf_counter()
        window_losses, window_clips = [], 0
        for batch, position in self.batches(state.epoch, state.position, self.micro_per_epoch - state.micro):
            waited += time.perf_counter() - tick
            losses = self.task.losses(self, batch)
            if not self.all_finite(losses["loss"]):
                self.stop(state, f"non-finite loss ({losses['loss'].item()}) at epoch {state.epoch + 1}, step {state.step + 1}")
                return None
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(losses["loss"])
            engine.step()
            state.micro, state.position = state.micro + 1, position
            clips += len(batch["video_id"])
            window_clips += len(batch["video_id"])
            videos.update(batch["video_id"])
            window_losses.append(torch.stack([losses[k].detach().float() for k in self.task.loss_keys]))
            if boundary:
                state.step += 1
                if self.ema is not None:
                    self.ema.update(engine.module)
                self.show_step(state, window_losses[-1][0].item())
                if not self.reported or state.step % cfg.train.report_every_steps == 0:
                    now = time.perf_counter()
                    metrics = self.train_metrics(state, window_losses, window_clips / max(now - window_start, 1e-9))
                    # This launch's first step also goes to Ray Train: a first report does not wait
                    # for the controller, and Tune's memory budget sees the peak this early.
                    (self.log if self.reported else self.report)(state, metrics)
                    window_losses, window_clips, window_start = [], 0, now
                if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0 \
                        and state.micro < self.micro_per_epoch:
                    self.save(state, {"epoch": state.epoch + state.micro / self.micro_per_epoch, "step": state.step})
            tick = time.perf_counter()
        elapsed = time.perf_counter() - started
        return {
            "clips_per_s": dist_utils.all_sum(clips, worker) / max(elapsed, 1e-9),
            "videos_per_s": dist_utils.all_sum(len(videos), worker) / max(elapsed, 1e-9),
            "data_wait_fraction": dist_utils.all_sum(waited, worker) / max(dist_utils.all_sum(elapsed, worker), 1e-9),
            "peak_memory_gb": dist_utils.all_max(dist_utils.peak_memory_gb(worker), worker),
        }

    def batches(self, epoch: int, start: int, count: int) -> Iterator[tuple[dict, int]]:
        """`count` micro-batches of this worker's training shard from video `start` on, with the
        shard position after each. If skipped (unreadable) videos leave the shard short, it starts
        over, so every worker still yields exactly `count`."""
        cfg, w = self.cfg, self.worker
        if cfg.data.loader == "ray_data":
            import ray.train

            from re2tal.raydata.loader import name, shard_batches

            yield from shard_batches(cfg, self.cursor, w.rank, epoch, start, count, ray.train.get_dataset_shard(name(w.rank)))
            return
        produced = 0
        while produced < count:
            ds = self.task.dataset(self, cfg.data.train_subset, training=True, epoch=epoch, start=start)
            index = {v.id: start + i for i, v in enumerate(ds.videos)}
            before = produced
            for batch in ds.batches(cfg.data.batch_size, drop_last=True):
                yield batch, index[batch["video_id"][-1]] + 1
                produced += 1
                if produced == count:
                    return
            if produced == before:
                from re2tal.errors import BadInput

                raise BadInput(f"data.annotations: no video of worker {w.rank}'s training shard could be read (epoch {epoch + 1})")
            start = 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        """The same answer on every worker, so all stop together."""
        ok = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=self.worker.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def evaluate(self, state: State) -> dict[str, float]:
        """The task's evaluation, remembered as the latest."""
        state.last_eval = self.task.evaluate(self, state)
        return state.last_eval

    # -- what the task's hooks use --------------------------------------------------------------

    def frames(self, batch: dict, training: bool) -> torch.Tensor:
        """A batch's uint8 clips as the model's input: on the device, augmented (training: the
        config's random draws from this worker's generator; else the centre crop), normalised,
        in the training precision."""
        from re2tal.data.augment import augment_clips

        cfg = self.cfg
        generator = self.generator if training else torch.Generator()
        return augment_clips(batch["frames"].to(self.worker.device), cfg.augment, cfg.data.frame_size, cfg.backbone.pixel_mean,
                             cfg.backbone.pixel_std, generator, training=training).to(self.dtype)

    def shard(self, subset: str, training: bool = False, epoch: int = 0, start: int = 0):
        """This worker's share of a subset's videos as a dataset of clips."""
        from re2tal.data.dataset import VideoDataset

        cfg, w = self.cfg, self.worker
        return VideoDataset(cfg, subset, w.rank, w.world_size, epoch, cfg.train.seed, training=training, start=start,
                            annotations=self.annotations, source=self.source)

    def eval_weights(self):
        """Context manager: the model in eval mode, with the EMA weights if kept."""
        module = self.engine.module
        stack = contextlib.ExitStack()
        training = module.training
        module.eval()
        stack.callback(module.train, training)
        if self.ema is not None:
            stack.enter_context(self.ema.swapped_in(module))
        return stack

    def lockstep(self, items: Iterator[dict]) -> Iterator[dict | None]:
        """Under ZeRO-3 every forward gathers parameters collectively, so workers must run the
        same number of them: the ones with fewer batches run padding steps (None)."""
        if self.cfg.deepspeed.zero_stage < 3:
            yield from items
            return
        batches_ = list(items)
        most = int(dist_utils.all_max(len(batches_), self.worker))
        yield from batches_
        for _ in range(most - len(batches_)):
            yield None

    def line(self, text: str) -> None:
        """A line for the progress display (rank 0)."""
        if self.progress is not None and self.worker.is_main:
            self.progress.put({"kind": "line", "text": text})

    # -- metrics, progress ----------------------------------------------------------------------

    def train_metrics(self, state: State, window_losses: list[torch.Tensor], clips_per_s: float) -> dict[str, float]:
        """The report window's mean losses over all workers, learning rates, throughput and peak
        memory (a few small collectives: every worker calls it)."""
        mean = torch.stack(window_losses).mean(0).to(self.worker.device)
        torch.distributed.all_reduce(mean)
        mean = (mean / self.worker.world_size).tolist()
        lrs = self.engine.get_lr()
        groups = self.engine.optimizer.param_groups
        head_lr = next((lr for lr, g in zip(lrs, groups) if g.get("name", "").startswith("head")), lrs[0])
        backbone_lr = next((lr for lr, g in zip(lrs, groups) if g.get("name", "").startswith("backbone")), 0.0)
        return {"epoch": state.epoch + state.micro / self.micro_per_epoch, "step": state.step,
                **dict(zip(self.task.loss_keys, mean)), "lr": head_lr, "lr_backbone": backbone_lr,
                "clips_per_s": dist_utils.all_sum(clips_per_s, self.worker),
                "peak_memory_gb": dist_utils.all_max(dist_utils.peak_memory_gb(self.worker), self.worker)}

    def log_cache_use(self, state: State, before: dict) -> float:
        """MB fetched from storage this epoch (training and evaluation) by all workers; rank 0
        logs the per-node breakdown (videos fetched = cache misses, hits, bytes, cache directory)
        as `cache/epoch<N>.json`."""
        now = self.source.cache_use()
        mine = {k: now[k] - before[k] for k in ("hits", "misses", "bytes_fetched")}
        rows = dist_utils.gather_to_main(mine | {"node": dist_utils.node_id(), "cache_dir": now["cache_dir"]}, self.worker)
        if self.tracker is not None:
            nodes: dict[str, dict] = {}
            for row in rows:
                node = nodes.setdefault(row["node"], {"workers": 0, "hits": 0, "misses": 0, "bytes_fetched": 0, "cache_dirs": []})
                node["workers"] += 1
                for k in mine:
                    node[k] += row[k]
                if row["cache_dir"] and row["cache_dir"] not in node["cache_dirs"]:
                    node["cache_dirs"].append(row["cache_dir"])
            self.tracker.json({"epoch": state.epoch + 1, "nodes": nodes}, f"cache/epoch{state.epoch + 1:04d}.json")
        return dist_utils.all_sum(mine["bytes_fetched"], self.worker) / 1e6

    def show_step(self, state: State, loss: float) -> None:
        if self.progress is not None and self.worker.is_main:
            self.progress.put({"kind": "step", "step": state.step, "epoch": state.epoch + 1, "loss": loss,
                               "lr": self.engine.get_lr()[0]})

    def log(self, state: State, metrics: dict[str, Any]) -> None:
        """Metrics to MLflow (rank 0, in the background): never waits."""
        if self.tracker is not None:
            self.tracker.metrics(metrics, step=state.step)

    def report(self, state: State, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Metrics to MLflow, and with a checkpoint to Ray Train from every worker: only at a
        launch's first step, evaluations, checkpoints and stops (each report after the first waits
        for Ray Train's controller to poll, about 2 s)."""
        import ray.train

        self.reported = True
        self.log(state, metrics)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = os.path.basename(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def stop(self, state: State, reason: str) -> None:
        """End the run without a checkpoint: the last good one stays the latest."""
        message = f"training stopped: {reason}; the last good checkpoint is kept"
        if self.worker.is_main and self.progress is not None:
            self.progress.put({"kind": "stopped", "text": message})
        self.report(state, {"epoch": state.epoch, "step": state.step, "stopped": message})

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, state: State, metrics: dict[str, Any]) -> None:
        """Checkpoint to a local directory and report it (Ray Train uploads every worker's files
        into the same `<storage_path>/<name>/<dir>`; the name must agree across workers). Local
        mode writes it to the run's storage itself (re2tal.training.checkpoints.persist)."""
        with tempfile.TemporaryDirectory(prefix="re2tal-ckpt-") as tmp:
            path = os.path.join(tmp, checkpoints.name(state.epoch, state.step))
            os.makedirs(path)
            extra = {"unsent_metrics": self.tracker.unsent()} if self.tracker is not None else None
            checkpoints.save(path, self.engine, dataclasses.asdict(state), self.generator, self.criterion, self.ema, self.worker,
                             extra, cfg=self.cfg, labels=self.annotations.labels)
            if self.local:
                url = checkpoints.persist(self.cfg, path)
                if is_local(url):
                    path = url.removeprefix("file://")  # the copy, which outlives this directory
            self.report(state, metrics, checkpoint_dir=path)


def _quiet_libraries() -> None:
    """DeepSpeed and Ray Train log every step and report at INFO; keep warnings."""
    import warnings

    from ray.train.v2._internal.execution import context as ray_train_context

    # Ray Train's per-report line comes from a logger named by its file path.
    for name in ("DeepSpeed", "deepspeed", "ray.train", "ray.tune", "ray.data", ray_train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed calls a deprecated torch.distributed alias on every ZeRO step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
