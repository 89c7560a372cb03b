"""Temporal action localization (`re2tal train`): the Localizer (backbone -> ActionFormer-style
detector), its detection losses, prediction and mAP on the validation subset.

Also what `re2tal eval`, `predict` and `extract` use (re2tal.tasks.predict / extract):
`build_model`, `model_input` (clips -> the model's evaluation input), `predict` (batches of clips,
or of features for a head on features -> an ActivityNet submission), `predict_video` (one URL in
one process), `ground_truth`, `label_names`. At the end of a run the trained network is logged as
the run's MLflow model (re2tal.tasks.mlmodel).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from re2tal.config import Config
from re2tal.detection import DetectorOutput, build_detector
from re2tal.errors import BadInput
from re2tal.training import distributed as dist_utils
from re2tal.training.loop import Loop, State
from re2tal.training.task import Task


class Localizer(nn.Module):
    """frames (B, 3, N, H, W), normalised -> backbone features (B, C, N', H', W') -> detector."""

    def __init__(self, backbone: nn.Module, detector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.detector = detector

    def forward(self, frames_B3NHW: Tensor, valid_B: Tensor) -> DetectorOutput:
        """valid_B: fraction of each clip's frames that are real (the rest is end padding)."""
        return self.detector(self.backbone(frames_B3NHW), valid_B)


class FeatureInput(nn.Module):
    """Pre-extracted features in the backbone's place (re2tal.tasks.features): (B, C, L) ->
    (B, C, L, 1, 1), what the detector takes from a backbone."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels

    def forward(self, feats_BCL: Tensor) -> Tensor:
        return feats_BCL[..., None, None]


def build_model(cfg: Config) -> Localizer:
    from re2tal.backbones import build_backbone

    backbone = build_backbone(cfg.backbone, cfg.storage)
    return Localizer(backbone, build_detector(cfg.head, backbone.out_channels))


class Localization(Task):
    name = "localization"
    loss_keys = ("loss", "cls_loss", "reg_loss")

    def check_data(self, cfg: Config):
        """Generates the synthetic set if configured and absent, reads the ActivityNet-format
        annotations, checks the subsets and the class count."""
        from re2tal.config import clip_annotations
        from re2tal.data.annotations import load_annotations
        from re2tal.data.synth import ensure_synthetic

        if clip_annotations(cfg.data.annotations):
            raise BadInput(f"data.annotations: {cfg.data.annotations}: re2tal train reads ActivityNet-format JSON; "
                           "a CSV of clips is for re2tal finetune")
        if cfg.data.synth is not None:
            ensure_synthetic(cfg.data, cfg.storage)
        annotations = load_annotations(cfg.data, cfg.storage)
        annotations.check_subsets(cfg.data)
        self.label_map = annotations.labels  # for the model logged at the end (`finish`)
        if cfg.head.num_classes not in (1, len(annotations.labels)):
            raise BadInput(f"head.num_classes: {cfg.head.num_classes}, but {cfg.data.annotations} has {len(annotations.labels)} "
                           "action labels (use their number, or 1 for a class-agnostic head)")
        return annotations

    def predict_memory(self, cfg: Config) -> float | None:
        from re2tal.planning.plan import announce_prediction

        return announce_prediction(cfg, build_model)

    def build_model(self, cfg: Config) -> Localizer:
        return build_model(cfg)

    def head(self, model: Localizer) -> nn.Module:
        return model.detector

    def criterion(self, cfg: Config) -> nn.Module:
        from re2tal.detection import DetectionLoss

        return DetectionLoss(cfg.head)

    def inputs(self, loop: Loop, batch: dict) -> tuple[Tensor, Tensor]:
        """A training batch as the model's input (the clips, augmented) and the fraction of each
        clip that is real."""
        frames = loop.frames(batch, training=True)
        return frames, batch["valid"].to(loop.worker.device, torch.float32) / frames.shape[2]

    def losses(self, loop: Loop, batch: dict) -> dict[str, Tensor]:
        from re2tal.detection import targets_in_window

        cfg, device = loop.cfg, loop.worker.device
        x, valid = self.inputs(loop, batch)
        # a class-agnostic head (num_classes=1) learns every action as class 0
        targets = [targets_in_window(s.numpy(), (l if cfg.head.num_classes > 1 else torch.zeros_like(l)).numpy(), w, cfg.head.seq_len)
                   for s, l, w in zip(batch["segments"], batch["labels"], batch["window"])]
        out = loop.engine(x, valid)
        return loop.criterion(out, [t[0].to(device) for t in targets], [t[1].to(device) for t in targets])

    def evaluate(self, loop: Loop, state: State) -> dict[str, float]:
        """mAP on the validation subset (EMA weights if kept). Every worker predicts its share of
        the videos; rank 0 merges and scores them, logs the predictions and plots of a new best."""
        from re2tal.evaluation import evaluate, parse_thresholds

        cfg, worker = loop.cfg, loop.worker
        scores = self.class_scores(cfg)
        with loop.eval_weights():
            shard = self.dataset(loop, cfg.data.val_subset, training=False)
            predictions = predict(loop.engine.module, loop.lockstep(shard.batches(cfg.data.batch_size)),
                                  cfg, worker.device, label_names(cfg, loop.annotations, scores), scores)
        gathered = dist_utils.gather_to_main(predictions["results"], worker)
        metrics: dict[str, float] = {}
        if worker.is_main:
            predictions["results"] = {k: v for part in gathered for k, v in part.items()}
            truth = ground_truth(cfg, loop.annotations, cfg.data.val_subset, scores)
            result = evaluate(truth, predictions, cfg.data.val_subset, parse_thresholds(cfg.train.tiou_thresholds))
            metrics = {f"mAP_{t}": v for t, v in result["mAP"].items()} | {"average_mAP": result["average_mAP"]}
            loop.line(f"epoch {state.epoch + 1}: average mAP {result['average_mAP']:.4f}  " +
                      "  ".join(f"mAP@{t} {v:.3f}" for t, v in result["mAP"].items()))
            if result["average_mAP"] > state.best:
                state.best = result["average_mAP"]
                if loop.tracker is not None:
                    log_best(loop.tracker, cfg, state, result, truth, predictions)
        return dist_utils.broadcast(metrics)

    def final_metrics(self, loop: Loop, state: State) -> dict[str, float]:
        """The chance level to beat: average mAP of random predictions (rank 0)."""
        if not loop.worker.is_main:
            return {}
        truth = ground_truth(loop.cfg, loop.annotations, loop.cfg.data.val_subset, self.class_scores(loop.cfg))
        return {"random_average_mAP": random_baseline(truth, loop.cfg)}

    def finish(self, cfg: Config, metrics: dict[str, Any], tracker) -> dict[str, Any]:
        """The trained network as the run's MLflow model (and a registered version with
        tracking.register_model): `mlflow.pyfunc.load_model(uri).predict([video URLs])`."""
        from re2tal.tasks.mlmodel import VideoLocalizer, log_trained_model

        return log_trained_model(cfg, metrics, tracker, VideoLocalizer(), build_model, self.label_map)

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [(f"mAP@{k.removeprefix('mAP_')}", f"{metrics[k]:.4f}") for k in sorted(k for k in metrics if k.startswith("mAP_"))]
        for label, key, fmt in [("average mAP", "average_mAP", "{:.4f}"),
                                ("average mAP of random predictions", "random_average_mAP", "{:.4f}"),
                                ("peak memory per worker (GB)", "peak_memory_gb", "{:.2f}"),
                                ("predicted peak memory per worker (GB)", "predicted_peak_memory_gb", "{:.2f}"),
                                ("clips / s", "clips_per_s", "{:.2f}"), ("videos / s", "videos_per_s", "{:.2f}"),
                                ("data-wait fraction", "data_wait_fraction", "{:.3f}"), ("optimizer steps", "step", "{}"),
                                ("epochs", "epoch", "{}")]:
            if metrics.get(key) is not None:
                rows.append((label, fmt.format(metrics[key])))
        return rows

    def class_scores(self, cfg: Config) -> dict | None:
        """External video-level class scores (head.nms.external_scores), read once per process."""
        if cfg.head.nms.external_scores is None:
            return None
        if getattr(self, "_scores", None) is None:
            from re2tal.detection import load_class_scores

            self._scores = load_class_scores(cfg.head.nms.external_scores, cfg.storage)
        return self._scores


# --------------------------------------------------------------------------------------------
# prediction and ground truth


def predict(module: nn.Module, batches: Iterable[dict | None], cfg: Config, device: torch.device,
            label_names: list[str], class_scores: dict | None = None) -> dict[str, Any]:
    """Run the model over collated batches (of clips, or of features for a model on features)
    and return the submission dict (seconds, per video, windows of a video merged). A None batch
    runs a forward on zeros whose output is dropped (ZeRO-3 keeps workers in lockstep that way)."""
    from re2tal.detection import postprocess, to_predictions

    clips, videos, windows, durations = [], [], [], []
    training = module.training
    module.eval()
    dtype = next(module.parameters()).dtype  # the engine's training precision, or fp32
    with torch.no_grad():
        for batch in batches:
            if batch is None:
                if isinstance(module.backbone, FeatureInput):
                    zeros = torch.zeros(1, module.backbone.out_channels, cfg.head.seq_len, device=device, dtype=dtype)
                else:
                    zeros = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.frame_size, cfg.data.frame_size, device=device, dtype=dtype)
                module(zeros, torch.ones(1, device=device))
                continue
            if "features" in batch:
                out = module(batch["features"].to(device, dtype), batch["valid"].to(device, torch.float32))
            else:
                frames = model_input(batch["frames"], cfg, device, dtype)
                out = module(frames, batch["valid"].to(device, torch.float32) / frames.shape[2])
            clips += postprocess(out, cfg.head.nms)
            videos += batch["video_id"]
            windows += batch["window"]
            durations += batch["duration"]
    module.train(training)
    return to_predictions(clips, videos, windows, durations, label_names, cfg.head.nms, cfg.head.seq_len, class_scores,
                          sliding=cfg.data.sampling == "sliding")


def model_input(frames_BNHW3: Tensor, cfg: Config, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """uint8 clips (B, N, H, W, 3) -> the model's evaluation input (B, 3, N, S, S): centre crop of
    data.frame_size, normalised, on `device` in `dtype`."""
    from re2tal.data.augment import augment_clips

    return augment_clips(frames_BNHW3.to(device), cfg.augment, cfg.data.frame_size, cfg.backbone.pixel_mean, cfg.backbone.pixel_std,
                         torch.Generator(), training=False).to(dtype)


def predict_video(model: nn.Module, cfg: Config, url: str, annotations, class_scores: dict | None = None, *,
                  labels: list[str] | None = None) -> dict[str, Any]:
    """One video (any fsspec URL) through the evaluation's windows: {"video", "duration",
    "segments": its ActivityNet-format segments}. The head's class names are `labels`, else
    `label_names` of the annotations. BadInput if it cannot be read."""
    from re2tal.data.dataset import batches, evaluation_clips

    video, clips = evaluation_clips(cfg, url)
    device = next(model.parameters()).device
    names = labels if labels is not None else label_names(cfg, annotations, class_scores)
    submission = predict(model, batches(clips, cfg.data.batch_size), cfg, device, names, class_scores)
    return {"video": url, "duration": video.duration, "segments": submission["results"].get(video.id, [])}


def label_names(cfg: Config, annotations, class_scores: dict | None) -> list[str]:
    """Names of the head's classes: the annotation label map, or one "action" class for a
    class-agnostic head without external class scores."""
    return annotations.labels if cfg.head.num_classes > 1 or class_scores else ["action"]


def ground_truth(cfg: Config, annotations, subset: str, class_scores: dict | None) -> dict:
    """A subset as an ActivityNet ground-truth tree. A class-agnostic head without external class
    scores is scored against one class "action" (mAP then measures localisation alone)."""
    agnostic = cfg.head.num_classes == 1 and class_scores is None
    names = annotations.labels
    return {"database": {
        v.id: {"subset": v.subset, "duration": v.duration,
               "annotations": [{"segment": [float(s), float(e)], "label": "action" if agnostic else names[int(c)]}
                               for (s, e), c in zip(v.segments.tolist(), v.labels.tolist())]}
        for v in annotations.subset(subset)}}


def random_baseline(truth: dict, cfg: Config) -> float:
    """Average mAP of random predictions (uniform segments, labels and scores; 100 per video) on
    the ground truth: the chance level a trained model must beat."""
    from re2tal.evaluation import evaluate, parse_thresholds

    rng = np.random.default_rng(cfg.train.seed)
    names = sorted({a["label"] for v in truth["database"].values() for a in v["annotations"]}) or ["action"]
    results = {}
    for vid, v in truth["database"].items():
        seg = np.sort(rng.uniform(0, v["duration"], size=(100, 2)), axis=1)
        results[vid] = [{"label": names[rng.integers(len(names))], "score": float(rng.uniform()), "segment": s.tolist()} for s in seg]
    return evaluate(truth, {"results": results}, cfg.data.val_subset, parse_thresholds(cfg.train.tiou_thresholds))["average_mAP"]


def log_best(tracker, cfg: Config, state: State, result: dict, truth: dict, predictions: dict) -> None:
    """A new best evaluation's predictions and plots to MLflow."""
    from re2tal import tracking
    from re2tal.evaluation import pr_curves

    tracker.json(predictions, "predictions/best.json")
    tracker.json({"epoch": state.epoch + 1, **result}, "predictions/best_metrics.json")
    title = f"epoch {state.epoch + 1}"
    tracker.figure(tracking.map_figure(result, f"mAP at tIoU ({title})"), "plots/map_per_tiou.png")
    tracker.figure(tracking.pr_figure(pr_curves(truth, predictions, cfg.data.val_subset), f"precision-recall ({title})"),
                   "plots/pr_curves.png")
    shown = sorted(truth["database"])[: cfg.tracking.timeline_videos]
    if shown:
        tracker.figure(tracking.timeline_figure(truth["database"], predictions["results"], shown), "plots/timeline.png")
