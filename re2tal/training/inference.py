"""Prediction: from batches of clips to an ActivityNet submission, and loading trained weights
from a checkpoint. Shared by the training loop's evaluation, `re2tal eval` and `re2tal predict`."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from re2tal.config import Config
from re2tal.errors import BadInput

STATE_TAG = "state"  # DeepSpeed checkpoint tag inside each checkpoint directory


def predict(module: nn.Module, batches: Iterable[dict | None], cfg: Config, device: torch.device,
            label_names: list[str], class_scores: dict | None = None) -> dict[str, Any]:
    """Run the model over collated batches and return the submission dict (seconds, per video,
    windows of a video merged). A None batch runs a forward on zeros whose output is dropped
    (ZeRO-3 keeps workers in lockstep that way)."""
    from re2tal.data.augment import augment_clips
    from re2tal.detection import postprocess, to_predictions

    clips, videos, windows, durations = [], [], [], []
    training = module.training
    module.eval()
    dtype = next(module.parameters()).dtype  # the engine's training precision, or fp32
    with torch.no_grad():
        for batch in batches:
            if batch is None:
                zeros = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.frame_size, cfg.data.frame_size, device=device, dtype=dtype)
                module(zeros, torch.ones(1, device=device))
                continue
            frames = augment_clips(batch["frames"].to(device), cfg.augment, cfg.data.frame_size, cfg.backbone.pixel_mean,
                                   cfg.backbone.pixel_std, torch.Generator(), training=False).to(dtype)
            out = module(frames, batch["valid"].to(device, torch.float32) / frames.shape[2])
            clips += postprocess(out, cfg.head.nms)
            videos += batch["video_id"]
            windows += batch["window"]
            durations += batch["duration"]
    module.train(training)
    return to_predictions(clips, videos, windows, durations, label_names, cfg.head.nms, cfg.head.seq_len, class_scores)


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


@contextlib.contextmanager
def local_checkpoint(url: str, cfg: Config) -> Iterator[Path]:
    """A checkpoint directory (local path or object-storage URL) as a local path."""
    from re2tal.data.storage import filesystem, is_local

    if is_local(url):
        path = Path(url.removeprefix("file://"))
        if not path.is_dir():
            raise BadInput(f"--checkpoint: {url} is not a checkpoint directory")
        yield path
        return
    fs, remote = filesystem(url, cfg.storage)
    if not fs.isdir(remote):
        raise BadInput(f"--checkpoint: {url} is not a checkpoint directory")
    with tempfile.TemporaryDirectory(prefix="re2tal-ckpt-") as tmp:
        fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
        yield Path(tmp)


def load_weights(model: nn.Module, path: Path, use_ema: bool = True) -> str:
    """Load trained weights from a checkpoint directory written by the training loop: the fp32
    weights of the DeepSpeed state (any ZeRO stage), then the EMA weights over them when kept.
    Returns which weights were loaded."""
    if not (path / STATE_TAG).is_dir():
        raise BadInput(f"--checkpoint: {path} has no {STATE_TAG}/ folder; not a re2tal checkpoint")
    state = _fp32_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise BadInput(f"--checkpoint: {path} does not fit this config's model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if use_ema and (path / "ema.pt").exists():
        ema = torch.load(path / "ema.pt", map_location="cpu", weights_only=True)
        own = model.state_dict()
        with torch.no_grad():
            for k, v in ema.items():
                own[k].copy_(v)
        return "ema"
    return "model"


def _fp32_state(path: Path) -> dict[str, torch.Tensor]:
    """ZeRO checkpoints hold the fp32 master weights in the optimizer partitions; without ZeRO
    partitions (stage 0 in fp32) the module state dict is complete."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any((path / STATE_TAG).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=STATE_TAG)
    files = sorted((path / STATE_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise BadInput(f"--checkpoint: {path}/{STATE_TAG} holds no model states")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
