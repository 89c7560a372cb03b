"""Action-recognition fine-tuning of a backbone (`re2tal finetune`, `jobs/finetune.py`).

Re²TAL's first stage: a backbone rewired into Re² form computes another function than the one
its Kinetics weights were trained for, and the authors recover its accuracy by fine-tuning it on
Kinetics-400 (30 epochs) before localization. This is that run, on the machinery every task
shares: the same Ray Train + DeepSpeed driver and loop (checkpoints, resume, MLflow), data layer
(storage, cache, sampling, the five augmentations) and config; this task says what differs:

- model: `Classifier` = backbone -> mean over time and space -> dropout -> linear (mmaction's
  I3DHead), the classifier started from the pretrained file's when it fits;
- target of a clip: its class (one clip per row of a CSV, re2tal.data.clips); loss: cross-entropy;
- evaluation: top-1 / top-5 over the validation clips (one clip, centre crop each), also before
  the first step (what the rewired model scores before fine-tuning);
- at the end (`finish`), `export_backbone` writes the backbone in its own checkpoint layout (plus its
  classifier under the layout's classifier keys, which the loader drops), so a localization
  config's `backbone.pretrained` loads the file directly.
"""

from __future__ import annotations

import posixpath
from typing import Any

import torch
from torch import Tensor, nn

from re2tal.config import Config
from re2tal.errors import BadInput
from re2tal.training import distributed as dist_utils
from re2tal.training.loop import Loop, State
from re2tal.training.task import Task

FILE_NAME = "backbone.pth"
# classifier keys of the published layouts, tried in this order when loading one
MMACTION_CLASSIFIER = "cls_head.fc_cls"


class ClassifierHead(nn.Module):
    """features (B, C, T, H, W) -> mean over T, H, W -> dropout -> linear -> logits (B, K)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # mmaction's I3DHead init
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats_BCTHW: Tensor) -> Tensor:
        return self.fc(self.dropout(feats_BCTHW.mean(dim=(2, 3, 4))))


class Classifier(nn.Module):
    """frames (B, 3, N, H, W), normalised -> backbone -> ClassifierHead -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.out_channels, num_classes, dropout)

    def forward(self, frames_B3NHW: Tensor) -> Tensor:
        return self.head(self.backbone(frames_B3NHW))


def classifier_prefix(backbone: nn.Module) -> str:
    """Where the backbone's own checkpoint layout keeps its classifier (torchvision swin3d_t
    `head`, pytorchvideo `blocks.6.proj`, TAdaConv `head.out`), whose keys the backbone loader
    drops by name; mmaction's `cls_head.fc_cls` for a layout without one (pst_t)."""
    keys = getattr(type(backbone), "CLASSIFIER_KEYS", ())
    return keys[0].removesuffix(".weight") if keys and keys[0].endswith(".weight") else MMACTION_CLASSIFIER


def build_classifier(cfg: Config) -> Classifier:
    from re2tal.backbones import build_backbone

    model = Classifier(build_backbone(cfg.backbone, cfg.storage), cfg.head.num_classes, cfg.finetune.dropout)
    if cfg.finetune.load_classifier and cfg.backbone.pretrained is not None:
        from re2tal.backbones.build import read_checkpoint

        load_classifier(model, read_checkpoint(cfg.backbone.pretrained, cfg.storage)[0])
    return model


def load_classifier(model: Classifier, state: dict[str, Tensor]) -> str | None:
    """Copy a checkpoint's classifier into the head when one of its layouts' has the head's shape;
    the prefix it came from, or None (the head keeps its initialisation)."""
    fc = model.head.fc
    for prefix in (classifier_prefix(model.backbone), MMACTION_CLASSIFIER):
        weight, bias = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
        if weight is not None and bias is not None and weight.shape == fc.weight.shape and bias.shape == fc.bias.shape:
            with torch.no_grad():
                fc.weight.copy_(weight)
                fc.bias.copy_(bias)
            return prefix
    return None


class ClassificationLoss(nn.Module):
    """Cross-entropy of the logits against the clips' classes."""

    def forward(self, logits_BK: Tensor, target_B: Tensor) -> dict[str, Tensor]:
        return {"loss": nn.functional.cross_entropy(logits_BK.float(), target_B)}

    def set_epoch(self, epoch: int) -> None:
        """The loop's hook for epoch-dependent losses; cross-entropy has none."""


class Finetune(Task):
    name = "finetune"
    loss_keys = ("loss",)

    def check_data(self, cfg: Config):
        """Reads the CSV of clips (generating the synthetic set first if configured and absent),
        checks the subsets and that there is one head output per label."""
        from re2tal.config import clip_annotations
        from re2tal.data.clips import load_clips
        from re2tal.data.synth import ensure_synthetic

        if not clip_annotations(cfg.data.annotations):
            raise BadInput(f"data.annotations: {cfg.data.annotations}: re2tal finetune reads a CSV of clips (Kinetics' label,"
                           "youtube_id,time_start,time_end,split or id/url,label,start,end,subset); ActivityNet-format JSON is for "
                           "re2tal train")
        if cfg.data.synth is not None:
            ensure_synthetic(cfg.data, cfg.storage)
        annotations = load_clips(cfg.data, cfg.storage)
        annotations.check_subsets(cfg.data)
        self.label_map = annotations.labels  # for the model logged at the end (`finish`)
        if cfg.head.num_classes != len(annotations.labels):
            raise BadInput(f"head.num_classes: {cfg.head.num_classes}, but {cfg.data.annotations} has {len(annotations.labels)} labels")
        return annotations

    def build_model(self, cfg: Config) -> Classifier:
        return build_classifier(cfg)

    def head(self, model: Classifier) -> nn.Module:
        return model.head

    def criterion(self, cfg: Config) -> nn.Module:
        return ClassificationLoss()

    def targets(self, annotations) -> dict[str, int]:
        """Clip id -> class, once per process."""
        if getattr(self, "_targets", None) is None:
            self._targets = {v.id: int(v.labels[0]) for v in annotations.videos}
        return self._targets

    def losses(self, loop: Loop, batch: dict) -> dict[str, Tensor]:
        targets = self.targets(loop.annotations)
        target = torch.tensor([targets[v] for v in batch["video_id"]], device=loop.worker.device)
        return loop.criterion(loop.engine(loop.frames(batch, training=True)), target)

    def at_start(self, loop: Loop, state: State) -> None:
        """What the (rewired) pretrained model scores before fine-tuning."""
        if loop.cfg.finetune.eval_at_start:
            state.start_eval = loop.evaluate(state)
            loop.report(state, {"epoch": 0, "step": 0, **state.start_eval})

    def final_metrics(self, loop: Loop, state: State) -> dict[str, float]:
        """The chance level (top-1 of always answering the most frequent training class) and the
        evaluation before the first step (`top1_before`, `top5_before`)."""
        targets, data = self.targets(loop.annotations), loop.cfg.data
        train = [targets[v.id] for v in loop.annotations.subset(data.train_subset)]
        val = [targets[v.id] for v in loop.annotations.subset(data.val_subset)]
        majority = max(set(train), key=train.count)
        return {"chance_top1": sum(t == majority for t in val) / len(val), **{f"{k}_before": v for k, v in state.start_eval.items()}}

    def evaluate(self, loop: Loop, state: State) -> dict[str, float]:
        """top-1 / top-5 (top-K of K < 5 classes) over the validation clips (EMA weights if
        kept): every worker predicts its share, rank 0 counts. The metrics on every worker."""
        from re2tal.data.dataset import batches

        cfg, worker, module = loop.cfg, loop.worker, loop.engine.module
        targets = self.targets(loop.annotations)
        k = min(5, cfg.head.num_classes)
        rows: list[tuple[int, list[int]]] = []
        with loop.eval_weights(), torch.no_grad():
            for batch in loop.lockstep(batches(loop.shard(cfg.data.val_subset), cfg.data.batch_size)):
                if batch is None:  # ZeRO-3 padding step
                    module(torch.zeros(1, 3, cfg.data.num_frames, cfg.data.frame_size, cfg.data.frame_size,
                                       device=worker.device, dtype=loop.dtype))
                    continue
                top = module(loop.frames(batch, training=False)).float().topk(k, dim=1).indices.tolist()
                rows += [(targets[v], t) for v, t in zip(batch["video_id"], top)]
        gathered = dist_utils.gather_to_main(rows, worker)
        metrics: dict[str, float] = {}
        if worker.is_main:
            clips = [r for part in gathered for r in part]
            metrics = {"top1": sum(t == top[0] for t, top in clips) / max(1, len(clips)),
                       "top5": sum(t in top for t, top in clips) / max(1, len(clips))}
            loop.line(f"{'before training' if state.step == 0 else f'epoch {state.epoch + 1}'}: top-1 {metrics['top1']:.4f}  "
                      f"top-{k} {metrics['top5']:.4f} ({len(clips)} validation clips)")
            state.best = max(state.best, metrics["top1"])
        return dist_utils.broadcast(metrics)

    def finish(self, cfg: Config, metrics: dict[str, Any], tracker) -> dict[str, Any]:
        """Write the backbone file (`backbone_file` in the metrics) and note it in the run; the
        classifier as the run's MLflow model (`predict([video URLs])`: each video's top classes)."""
        from re2tal.tasks.mlmodel import VideoClassifier, log_trained_model

        metrics["backbone_file"] = export_backbone(cfg, metrics["checkpoint"], metrics)
        if tracker is not None:
            tracker.json({"backbone_file": metrics["backbone_file"], "checkpoint": metrics["checkpoint"],
                          **{k: v for k, v in metrics.items() if k.startswith(("top", "chance"))}}, "finetune/backbone.json")
        return log_trained_model(cfg, metrics, tracker, VideoClassifier(), build_classifier, self.label_map)

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [("top-1 before fine-tuning", "top1_before"), ("top-1", "top1"), ("top-5 before fine-tuning", "top5_before"),
                ("top-5", "top5"), ("top-1 of the majority class (chance)", "chance_top1"), ("peak memory per worker (GB)", "peak_memory_gb"),
                ("clips / s", "clips_per_s"), ("optimizer steps", "step"), ("epochs", "epoch")]
        return [(label, f"{metrics[key]:.4f}" if isinstance(metrics[key], float) else str(metrics[key]))
                for label, key in rows if metrics.get(key) is not None]


# --------------------------------------------------------------------------------------------
# the backbone file


def output_url(cfg: Config) -> str:
    return cfg.finetune.output or f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name}/{FILE_NAME}"


def export_backbone(cfg: Config, checkpoint: str, metrics: dict | None = None) -> str:
    """Write the fine-tuned backbone of a checkpoint (EMA weights if kept) to `finetune.output`:
    {"state_dict": the backbone's state dict in its own layout + the classifier under
    `classifier_prefix`, "meta": {"re2tal": what it is}}; returns the URL."""
    from re2tal.data.storage import filesystem, protocol
    from re2tal.training.checkpoints import load_weights, local_checkpoint

    model = build_classifier(cfg.with_overrides({"backbone.pretrained": None}))
    with local_checkpoint(checkpoint, cfg.storage) as path:
        weights = load_weights(model, path)
    state = backbone_file_state(model)
    meta = {"backbone": cfg.backbone.model_dump(mode="json"), "classes": cfg.head.num_classes, "weights": weights,
            "checkpoint": checkpoint, "top1": (metrics or {}).get("top1"), "top1_before": (metrics or {}).get("top1_before")}
    url = output_url(cfg)
    fs, path = filesystem(url, cfg.storage)
    if protocol(url) == "file":
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        torch.save({"state_dict": state, "meta": {"re2tal": meta}}, f)
    return url


def backbone_file_state(model: Classifier) -> dict[str, Tensor]:
    """The backbone's state dict (its own layout; rewiring keeps the keys) with the classifier
    under the layout's classifier keys (`classifier_prefix`)."""
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    prefix = classifier_prefix(model.backbone)
    return state | {f"{prefix}.weight": model.head.fc.weight.detach().clone(), f"{prefix}.bias": model.head.fc.bias.detach().clone()}


# --------------------------------------------------------------------------------------------
# prediction


def classify_video(model: nn.Module, cfg: Config, url: str, labels: list[str], k: int = 5) -> dict[str, Any]:
    """One video (any fsspec URL) as one recognition clip over the whole file, sampled as the
    evaluation samples a clip: {"video", "classes": the top-k [{"label", "score" (softmax)}]}.
    BadInput if it cannot be read."""
    import math

    from re2tal.data.augment import augment_clips
    from re2tal.data.dataset import collate, evaluation_clips

    _, clips = evaluation_clips(cfg, url, clip=(0.0, math.inf))
    device = next(model.parameters()).device
    frames = augment_clips(collate(clips)["frames"].to(device), cfg.augment, cfg.data.frame_size, cfg.backbone.pixel_mean,
                           cfg.backbone.pixel_std, torch.Generator(), training=False)
    with torch.no_grad():
        probs = model(frames).float().softmax(dim=1)[0]
    top = probs.topk(min(k, len(labels)))
    return {"video": url, "classes": [{"label": labels[i], "score": float(p)} for p, i in zip(top.values.tolist(), top.indices.tolist())]}
