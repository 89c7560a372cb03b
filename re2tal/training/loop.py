"""The per-worker training loop: what every Ray Train worker runs.

Every worker builds the same model, wraps it in a DeepSpeed engine and iterates its shard of the
epoch; all workers take the same number of micro-batches (a worker with one more would wait
forever in the gradient all-reduce). Each step reads top to bottom: batch -> augment -> forward ->
loss -> backward -> step -> report. Evaluation runs on every worker's share of the validation
videos; predictions are gathered to rank 0, which computes mAP and logs to MLflow. A checkpoint
(DeepSpeed state, per-worker RNG / loss state, EMA) is reported to Ray Train at every epoch end
(and every `train.checkpoint_every_steps`); a restart resumes from the latest one with no step
repeated or lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from re2tal.config import Config
from re2tal.training import distributed as dist_utils
from re2tal.training.distributed import Worker
from re2tal.training.inference import STATE_TAG

log = logging.getLogger("re2tal.training")


@dataclasses.dataclass
class State:
    """Where training is; saved in every checkpoint (DeepSpeed client state)."""

    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches done in this epoch
    position: int = 0  # videos of this worker's shard consumed in this epoch
    step: int = 0  # optimizer steps done in total
    best: float = -1.0  # best average mAP so far
    last_eval: dict = dataclasses.field(default_factory=dict)  # metrics of the latest evaluation
    start_eval: dict = dataclasses.field(default_factory=dict)  # metrics of the evaluation before the first step, if made


def train_loop_per_worker(config: dict) -> None:
    """Localization: the Localizer, its detection losses, mAP."""
    from re2tal.detection import DetectionLoss
    from re2tal.training.model import build_model

    run_worker(config, build_model, lambda model: model.detector, lambda cfg: DetectionLoss(cfg.head), _Loop)


def run_worker(config: dict, build: Callable[[Config], torch.nn.Module], head_of: Callable[[torch.nn.Module], torch.nn.Module],
               make_criterion: Callable[[Config], torch.nn.Module], loop_type: type["_Loop"]) -> None:
    """The worker of a task: `build(cfg)` its model (with a `backbone`), `head_of(model)` the rest
    (its own learning rate), `make_criterion(cfg)` its loss (with set_epoch and a state dict, saved
    per worker), `loop_type` the loop whose hooks say what a batch's loss and an evaluation are."""
    import deepspeed
    import ray.train

    from re2tal.training.model import EMA
    from re2tal.training.optim import deepspeed_config, param_groups, scheduler_factory
    from re2tal.training.trainer import steps_per_epoch

    cfg: Config = config["cfg"]
    annotations = config["annotations"]
    local: bool = config.get("local", False)
    _quiet_libraries()
    worker = dist_utils.setup(cfg)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every worker
    model = build(cfg)
    steps = steps_per_epoch(cfg, annotations, worker.world_size)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model.backbone, head_of(model), cfg.optim),
        config=deepspeed_config(cfg),
        lr_scheduler=scheduler_factory(cfg.optim, steps, cfg.train.epochs),
    )
    criterion = make_criterion(cfg).to(worker.device)
    ema = EMA(engine.module, cfg.optim.ema_decay) if cfg.optim.ema else None
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + worker.rank)
    dist_utils.seed_everything(cfg.train.seed * 1000 + worker.rank)

    state = State()
    checkpoint = ray.train.get_checkpoint() if not local else _latest_local_checkpoint(cfg)
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = _restore(path, engine, criterion, ema, generator, worker)
        log.info("worker %d resumed at epoch %d, step %d", worker.rank, state.epoch, state.step)

    tracker = _tracker(config) if worker.is_main else None
    if tracker is not None and checkpoint is not None:
        tracker.metrics({"resumed_at_step": state.step}, step=state.step)  # restarts show in MLflow
    loop = loop_type(cfg, worker, engine, criterion, ema, generator, annotations, tracker, config.get("progress"), local,
                     cursor=config.get("cursor"))
    loop.run(state, micro_per_epoch=steps * cfg.deepspeed.gradient_accumulation_steps)


class _Loop:
    """The epoch loop of localization. A task's loop (re2tal.training.finetune) overrides the
    hooks: `loss_keys`, `losses` (a batch's forward and losses), `evaluate`, `at_start`,
    `final_metrics`."""

    loss_keys = ("loss", "cls_loss", "reg_loss")  # what `losses` returns, logged as the mean over a report window

    def __init__(self, cfg: Config, worker: Worker, engine, criterion, ema, generator, annotations, tracker, progress, local: bool,
                 cursor=None):
        self.cfg, self.worker, self.engine, self.criterion = cfg, worker, engine, criterion
        self.cursor = cursor  # data.loader ray_data: where this worker's next pass starts (re2tal.raydata.loader)
        self.ema, self.generator, self.annotations = ema, generator, annotations
        self.tracker, self.progress, self.local = tracker, progress, local
        # The engine holds the model in the training precision (DeepSpeed bf16 / fp16 keep fp32
        # master weights in the optimizer); inputs are cast to it, no autocast.
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]
        from re2tal.data.video import VideoSource

        self.source = VideoSource(cfg.storage)
        self.class_scores = None
        if cfg.head.nms.external_scores is not None:
            from re2tal.detection import load_class_scores

            self.class_scores = load_class_scores(cfg.head.nms.external_scores, cfg.storage)

    # -- the epoch loop -------------------------------------------------------------------------

    def run(self, state: State, micro_per_epoch: int) -> None:
        cfg = self.cfg
        self.micro_per_epoch = micro_per_epoch
        if state.epoch >= cfg.train.epochs:  # a finished run launched again: report how it ended
            self.report(state, {"epoch": state.epoch, "step": state.step, **state.last_eval})
            return
        if state.epoch == 0 and state.step == 0 and state.micro == 0:
            self.at_start(state)
        while state.epoch < cfg.train.epochs:
            cache_before = self.source.cache_use()
            throughput = self.train_epoch(state)
            if throughput is None:
                return  # stopped (non-finite loss), already reported
            # every worker must evaluate, and rank 0 checkpoint, the same model
            dist_utils.average_batchnorm_statistics(self.engine.module, self.worker, self.ema.shadow if self.ema else None)
            last = state.epoch == cfg.train.epochs - 1
            metrics = throughput | {"epoch": state.epoch + 1, "step": state.step}
            if last or (state.epoch + 1) % cfg.train.eval_every_epochs == 0:
                metrics |= self.evaluate(state)
            if last:
                metrics |= self.final_metrics(state)
            metrics["storage_fetched_mb"] = self.log_cache_use(state, cache_before)
            state.epoch, state.micro, state.position = state.epoch + 1, 0, 0
            self.save(state, metrics)

    def train_epoch(self, state: State) -> dict[str, float] | None:
        """Train the rest of `state.epoch`; its throughput metrics, or None when it had to stop
        (non-finite loss)."""
        from re2tal.data.augment import augment_clips

        cfg, engine, worker = self.cfg, self.engine, self.worker
        engine.train()
        self.criterion.set_epoch(state.epoch)
        clips = waited = 0
        videos: set[str] = set()
        started = time.perf_counter()
        tick = time.perf_counter()
        window_losses = []
        for batch, position in self.batches(state.epoch, state.position, self.micro_per_epoch - state.micro):
            waited += time.perf_counter() - tick
            frames = augment_clips(batch["frames"].to(worker.device), cfg.augment, cfg.data.frame_size,
                                   cfg.backbone.pixel_mean, cfg.backbone.pixel_std, self.generator, training=True).to(self.dtype)
            losses = self.losses(frames, batch)
            if not self.all_finite(losses["loss"]):
                self.stop(state, f"non-finite loss ({losses['loss'].item()}) at epoch {state.epoch + 1}, step {state.step + 1}")
                return None
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(losses["loss"])
            engine.step()
            state.micro, state.position = state.micro + 1, position
            clips += len(batch["video_id"])
            videos.update(batch["video_id"])
            window_losses.append(torch.stack([losses[k].detach().float() for k in self.loss_keys]))
            if boundary:
                state.step += 1
                if self.ema is not None:
                    self.ema.update(engine.module)
                self.show_step(state, window_losses[-1][0].item())
                if state.step % cfg.train.report_every_steps == 0:
                    self.report(state, self.train_metrics(state, window_losses))
                    window_losses = []
                if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0 \
                        and state.micro < self.micro_per_epoch:
                    self.save(state, self.train_metrics(state, window_losses) if window_losses else {"epoch": state.epoch, "step": state.step})
                    window_losses = []
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
        from re2tal.data.dataset import VideoDataset, batches

        cfg, w = self.cfg, self.worker
        if cfg.data.loader == "ray_data":
            import ray.train

            from re2tal.raydata.loader import name, shard_batches

            yield from shard_batches(cfg, self.cursor, w.rank, epoch, start, count, ray.train.get_dataset_shard(name(w.rank)))
            return
        produced = 0
        while produced < count:
            ds = VideoDataset(cfg, cfg.data.train_subset, w.rank, w.world_size, epoch, cfg.train.seed, training=True,
                              start=start, annotations=self.annotations, source=self.source)
            index = {v.id: start + i for i, v in enumerate(ds.videos)}
            before = produced
            for batch in batches(ds, cfg.data.batch_size, drop_last=True):
                yield batch, index[batch["video_id"][-1]] + 1
                produced += 1
                if produced == count:
                    return
            if produced == before:
                from re2tal.errors import BadInput

                raise BadInput(f"data.annotations: no video of worker {w.rank}'s training shard could be read (epoch {epoch + 1})")
            start = 0

    def losses(self, frames: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Forward of one augmented micro-batch and its losses (`loss_keys`; `loss` is minimised)."""
        from re2tal.detection import targets_in_window

        cfg, device = self.cfg, self.worker.device
        valid = batch["valid"].to(device, torch.float32) / frames.shape[2]
        targets = [targets_in_window(s.numpy(), self.class_ids(l).numpy(), w, cfg.head.seq_len)
                   for s, l, w in zip(batch["segments"], batch["labels"], batch["window"])]
        out = self.engine(frames, valid)
        return self.criterion(out, [t[0].to(device) for t in targets], [t[1].to(device) for t in targets])

    def at_start(self, state: State) -> None:
        """Before the first step of a fresh run (not on resume): nothing for localization."""

    def final_metrics(self, state: State) -> dict[str, float]:
        """Added to the last epoch's metrics: the chance level to beat."""
        return {"random_average_mAP": self.random_baseline()}

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """A class-agnostic head (num_classes=1) learns every action as class 0."""
        return torch.zeros_like(labels) if self.cfg.head.num_classes == 1 else labels

    def all_finite(self, loss: torch.Tensor) -> bool:
        """The same answer on every worker, so all stop together."""
        ok = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=self.worker.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    # -- metrics, progress ------------------------------------------------------------------------

    def train_metrics(self, state: State, window_losses: list[torch.Tensor]) -> dict[str, float]:
        mean = torch.stack(window_losses).mean(0).to(self.worker.device)
        torch.distributed.all_reduce(mean)
        mean = (mean / self.worker.world_size).tolist()
        lrs = self.engine.get_lr()
        groups = self.engine.optimizer.param_groups
        head_lr = next((lr for lr, g in zip(lrs, groups) if g.get("name", "").startswith("head")), lrs[0])
        backbone_lr = next((lr for lr, g in zip(lrs, groups) if g.get("name", "").startswith("backbone")), 0.0)
        return {"epoch": state.epoch + state.micro / self.micro_per_epoch, "step": state.step,
                **dict(zip(self.loss_keys, mean)), "lr": head_lr, "lr_backbone": backbone_lr,
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

    def report(self, state: State, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Metrics (and a checkpoint) to Ray Train from every worker; MLflow from rank 0."""
        import ray.train

        if self.tracker is not None:
            self.tracker.metrics(metrics, step=state.step)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def stop(self, state: State, reason: str) -> None:
        """End the run without a checkpoint: the last good one stays the latest."""
        message = f"training stopped: {reason}; the last good checkpoint is kept"
        if self.worker.is_main and self.progress is not None:
            self.progress.put({"kind": "stopped", "text": message})
        self.report(state, {"epoch": state.epoch, "step": state.step, "stopped": message})

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, state: State) -> dict[str, float]:
        """mAP on the validation subset (EMA weights if kept). Every worker predicts its share of
        the videos; rank 0 merges and scores them. Returns the metrics on every worker."""
        from re2tal.evaluation import evaluate, parse_thresholds

        predictions = self.predict_subset(self.cfg.data.val_subset)
        gathered = dist_utils.gather_to_main(predictions["results"], self.worker)
        metrics: dict[str, float] = {}
        if self.worker.is_main:
            predictions["results"] = {k: v for part in gathered for k, v in part.items()}
            truth = self.ground_truth(self.cfg.data.val_subset)
            result = evaluate(truth, predictions, self.cfg.data.val_subset, parse_thresholds(self.cfg.train.tiou_thresholds))
            metrics = {f"mAP_{t}": v for t, v in result["mAP"].items()} | {"average_mAP": result["average_mAP"]}
            self.log_evaluation(state, result, truth, predictions)
        metrics = _broadcast(metrics, self.worker)
        state.last_eval = metrics
        return metrics

    def predict_subset(self, subset: str) -> dict[str, Any]:
        """This worker's share of the subset's videos, predicted (EMA weights if kept)."""
        from re2tal.data.dataset import VideoDataset, batches
        from re2tal.training.inference import label_names, predict

        cfg, worker = self.cfg, self.worker
        ds = VideoDataset(cfg, subset, worker.rank, worker.world_size, 0, cfg.train.seed, training=False,
                          annotations=self.annotations, source=self.source)
        weights = self.ema.swapped_in(self.engine.module) if self.ema is not None else contextlib.nullcontext()
        with weights:
            return predict(self.engine.module, self._lockstep(batches(ds, cfg.data.batch_size)), cfg, worker.device,
                           label_names(cfg, self.annotations, self.class_scores), self.class_scores)

    def _lockstep(self, items: Iterator[dict]) -> Iterator[dict | None]:
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

    def ground_truth(self, subset: str) -> dict:
        from re2tal.training.inference import ground_truth

        return ground_truth(self.cfg, self.annotations, subset, self.class_scores)

    def random_baseline(self) -> float:
        """Average mAP of random predictions (uniform segments, labels and scores; 100 per
        video) on the validation subset: the chance level the trained model must beat."""
        from re2tal.evaluation import evaluate, parse_thresholds

        if not self.worker.is_main:
            return float("nan")
        rng = np.random.default_rng(self.cfg.train.seed)
        truth = self.ground_truth(self.cfg.data.val_subset)
        names = sorted({a["label"] for v in truth["database"].values() for a in v["annotations"]}) or ["action"]
        results = {}
        for vid, v in truth["database"].items():
            a = rng.uniform(0, v["duration"], size=(100, 2))
            seg = np.sort(a, axis=1)
            results[vid] = [{"label": names[rng.integers(len(names))], "score": float(rng.uniform()), "segment": s.tolist()} for s in seg]
        result = evaluate(truth, {"results": results}, self.cfg.data.val_subset, parse_thresholds(self.cfg.train.tiou_thresholds))
        return result["average_mAP"]

    def log_evaluation(self, state: State, result: dict, truth: dict, predictions: dict) -> None:
        """Rank 0: progress line; on a new best, the predictions and plots to MLflow."""
        if self.progress is not None:
            self.progress.put({"kind": "eval", "epoch": state.epoch + 1, "average_mAP": result["average_mAP"], "mAP": result["mAP"]})
        if result["average_mAP"] <= state.best:
            return
        state.best = result["average_mAP"]
        if self.tracker is None:
            return
        from re2tal import tracking
        from re2tal.evaluation import pr_curves

        self.tracker.json(predictions, "predictions/best.json")
        self.tracker.json({"epoch": state.epoch + 1, **result}, "predictions/best_metrics.json")
        title = f"epoch {state.epoch + 1}"
        self.tracker.figure(tracking.map_figure(result, f"mAP at tIoU ({title})"), "plots/map_per_tiou.png")
        self.tracker.figure(tracking.pr_figure(pr_curves(truth, predictions, self.cfg.data.val_subset), f"precision-recall ({title})"),
                            "plots/pr_curves.png")
        shown = sorted(truth["database"])[: self.cfg.tracking.timeline_videos]
        if shown:
            self.tracker.figure(tracking.timeline_figure(truth["database"], predictions["results"], shown), "plots/timeline.png")

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, state: State, metrics: dict[str, Any]) -> None:
        """Checkpoint to a local directory and report it (Ray Train uploads every worker's files
        into the same `<storage_path>/<name>/<dir>`; the name must agree across workers)."""
        name = f"epoch{state.epoch:04d}-step{state.step:08d}"
        with tempfile.TemporaryDirectory(prefix="re2tal-ckpt-") as path:
            self.engine.save_checkpoint(path, tag=STATE_TAG, client_state={"re2tal": dataclasses.asdict(state)})
            torch.save({"rng": dist_utils.rng_state(), "generator": self.generator.get_state(),
                        "criterion": self.criterion.state_dict()}, Path(path, f"worker_rank{self.worker.rank}.pt"))
            if self.ema is not None and self.worker.is_main:
                torch.save(self.ema.state_dict(), Path(path, "ema.pt"))
            if self.local:
                path = _persist_local(self.cfg, path, name)
            self.report(state, metrics, checkpoint_dir=path, name=name)


def _restore(path: str, engine, criterion, ema, generator: torch.Generator, worker: Worker) -> State:
    _, client = engine.load_checkpoint(path, tag=STATE_TAG)
    state = State(**client["re2tal"])
    own = Path(path, f"worker_rank{worker.rank}.pt")
    if own.exists():  # absent when the worker count changed: fresh generators, same model
        saved = torch.load(own, weights_only=False)
        dist_utils.set_rng_state(saved["rng"])
        generator.set_state(saved["generator"])
        criterion.load_state_dict(saved["criterion"])
    if ema is not None and Path(path, "ema.pt").exists():
        ema.load_state_dict(torch.load(Path(path, "ema.pt"), weights_only=True))
    return state


def _broadcast(metrics: dict, worker: Worker) -> dict:
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _tracker(config: dict):
    from re2tal.tracking import Tracker

    uri, run_id = config.get("tracking") or (None, None)
    return Tracker(uri, run_id) if run_id else None


# -- local (in-process) mode: Ray Train keeps its checkpoints in memory only, so they are written
#    to the run's storage directory here and found there again on the next launch.


def _local_run_dir(cfg: Config) -> str:
    return f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name}"


def _persist_local(cfg: Config, path: str, name: str) -> str:
    from re2tal.data.storage import filesystem, is_local

    target = f"{_local_run_dir(cfg)}/{name}"
    if is_local(target):
        # Copied under a temporary name and renamed: a process killed while copying leaves no
        # directory that the next launch would take for a checkpoint.
        final = Path(target.removeprefix("file://")).resolve()
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        shutil.copytree(path, partial, dirs_exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return str(final)
    fs, remote = filesystem(target, cfg.storage)
    fs.put(path, remote, recursive=True)
    return path


def _latest_local_checkpoint(cfg: Config):
    import ray.train

    from re2tal.data.storage import is_local

    run_dir = _local_run_dir(cfg)
    if not is_local(run_dir):
        return None
    root = Path(run_dir.removeprefix("file://"))
    found = sorted(p for p in root.glob("epoch*-step*") if (p / STATE_TAG).is_dir()) if root.is_dir() else []
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def _quiet_libraries() -> None:
    """DeepSpeed and Ray Train log every step and report at INFO; keep warnings."""
    import warnings

    from ray.train.v2._internal.execution import context as ray_train_context

    # Ray Train's per-report line comes from a logger named by its file path.
    for name in ("DeepSpeed", "deepspeed", "ray.train", "ray.tune", "ray.data", ray_train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed calls a deprecated torch.distributed alias on every ZeRO step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

