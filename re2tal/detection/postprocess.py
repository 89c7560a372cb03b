"""From head outputs to ActivityNet predictions: decoding, Soft-NMS, seconds, windows, class scores.

    postprocess(outputs, cfg)            per clip: segments (grid), scores, labels after Soft-NMS
    to_predictions(clips, videos, ...)   per video, in seconds, windows merged, labels named,
                                         external video-level class scores fused

Gaussian Soft-NMS (Bodla et al. 2017): repeatedly keep the highest-scoring segment m and decay
every other segment i of the same class (any class when class-agnostic) by
score_i *= exp(-tIoU(m, i)^2 / sigma); segments that fall below min_score are dropped; stop
after max_segments. All clips of a batch, and all classes of a clip, run in one loop: segments of
other classes are simply not decayed, and because kept scores never increase, the first
max_segments kept are the top max_segments of the per-class results.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from re2tal.config import NmsConfig, StorageConfig
from re2tal.data.storage import filesystem
from re2tal.detection.grid import grid_to_seconds
from re2tal.detection.model import DetectorOutput
from re2tal.errors import BadInput


@torch.no_grad()
def decode(out: DetectorOutput, cfg: NmsConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate segments of each clip before NMS: the pre_nms_topk (point, class) pairs of
    highest sigmoid score over all levels. Returns segments (B, N, 2) grid units, scores (B, N),
    labels (B, N) and alive (B, N): above pre_nms_threshold and longer than min_length."""
    logits, offsets, mask, points, strides = out.flat()
    B, P, K = logits.shape
    prob = torch.sigmoid(logits.float()) * mask[..., None]
    scores, idx = prob.reshape(B, P * K).topk(min(cfg.pre_nms_topk, P * K), dim=1)
    point, labels = idx // K, idx % K
    dist = offsets.float().gather(1, point[..., None].expand(-1, -1, 2)) * strides[point][..., None]
    x = points[point]
    segments = torch.stack([x - dist[..., 0], x + dist[..., 1]], dim=-1)
    alive = (scores > cfg.pre_nms_threshold) & (segments[..., 1] - segments[..., 0] > cfg.min_length)
    return segments, scores, labels, alive


def segment_iou(one: torch.Tensor, many: torch.Tensor) -> torch.Tensor:
    """tIoU of one segment (..., 1, 2) against many (..., N, 2) -> (..., N); 0 for empty unions."""
    inter = (torch.minimum(one[..., 1], many[..., 1]) - torch.maximum(one[..., 0], many[..., 0])).clamp(min=0)
    union = (one[..., 1] - one[..., 0]) + (many[..., 1] - many[..., 0]) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


@torch.no_grad()
def soft_nms(segments: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, alive: torch.Tensor, sigma: float,
             min_score: float, max_segments: int, class_agnostic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Gaussian Soft-NMS. segments (B, N, 2), scores / labels / alive (B, N).
    Returns kept indices (B, M), their decayed scores (B, M) and valid (B, M): row b keeps
    indices[b, valid[b]], in order of selection (descending score)."""
    B, N = scores.shape
    s = torch.where(alive, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    kept, kept_scores, kept_valid = [], [], []
    for _ in range(min(max_segments, N)):
        best, i = s.max(dim=1)
        ok = best >= min_score
        if not ok.any():
            break
        kept.append(i)
        kept_scores.append(best)
        kept_valid.append(ok)
        m = segments.gather(1, i[:, None, None].expand(B, 1, 2))
        decay = torch.exp(-segment_iou(m, segments).float().square() / sigma)
        if not class_agnostic:
            decay = torch.where(labels == labels.gather(1, i[:, None]), decay, torch.ones_like(decay))
        s = torch.where(s > -math.inf, s * decay, s)  # -inf * 0 would be NaN for tiny sigma
        s.scatter_(1, i[:, None], -math.inf)
        s = s.masked_fill(s < min_score, -math.inf)
    if not kept:
        empty = torch.zeros(B, 0, dtype=torch.long, device=scores.device)
        return empty, empty.float(), empty.bool()
    return torch.stack(kept, 1), torch.stack(kept_scores, 1), torch.stack(kept_valid, 1)


@torch.no_grad()
def postprocess(out: DetectorOutput, cfg: NmsConfig) -> list[dict[str, torch.Tensor]]:
    """Per clip (on the CPU): `segments` (M, 2) grid units, `scores` (M,), `labels` (M,) long,
    sorted by score, after decoding and Soft-NMS (per class unless cfg.class_agnostic)."""
    segments, scores, labels, alive = decode(out, cfg)
    keep, kept_scores, valid = soft_nms(segments, scores, labels, alive, cfg.sigma, cfg.min_score, cfg.max_segments,
                                        cfg.class_agnostic)
    clips = []
    for b in range(segments.shape[0]):
        i = keep[b, valid[b]]
        clips.append({"segments": segments[b, i].float().cpu(), "scores": kept_scores[b, valid[b]].cpu(),
                      "labels": labels[b, i].cpu()})
    return clips


def to_predictions(clips: Sequence[Mapping[str, torch.Tensor]], videos: Sequence[str], windows: Sequence[Sequence[float]],
                   durations: Sequence[float], label_names: Sequence[str], cfg: NmsConfig, seq_len: int,
                   class_scores: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """ActivityNet submission dict from per-clip results (`postprocess`).

    clips[i] belongs to video videos[i] (several clips of one video: sliding windows), covers
    windows[i] = (start_s, end_s); durations[i] is that video's length. Segments go to seconds
    (`grid_to_seconds`), are cut to [0, duration] (empty ones dropped); a video's windows are
    merged by another Soft-NMS. With `class_scores` ({video: {label: score}}, class-agnostic
    head) each segment is repeated for the video's top cfg.topk_classes classes with score
    segment score * class score; else its label is label_names[label].
    """
    by_video: dict[str, list[int]] = {}
    for i, vid in enumerate(videos):
        by_video.setdefault(vid, []).append(i)
    results: dict[str, list[dict[str, Any]]] = {}
    for vid, idx in by_video.items():
        duration = float(durations[idx[0]])
        seg = np.concatenate([grid_to_seconds(clips[i]["segments"].double().numpy().reshape(-1, 2), windows[i], seq_len) for i in idx])
        score = np.concatenate([clips[i]["scores"].double().numpy() for i in idx])
        label = np.concatenate([clips[i]["labels"].numpy() for i in idx])
        seg = np.clip(seg, 0.0, duration)
        keep = seg[:, 1] > seg[:, 0]
        seg, score, label = seg[keep], score[keep], label[keep]
        if len(idx) > 1 and len(score):
            seg, score, label = _merge_windows(seg, score, label, cfg)
        results[vid] = _entries(vid, seg, score, label, label_names, cfg, class_scores)
    return {"version": "re2tal", "results": results,
            "external_data": {"used": class_scores is not None,
                              "details": "video-level class scores fused as segment score x class score" if class_scores is not None else ""}}


def _merge_windows(seg: np.ndarray, score: np.ndarray, label: np.ndarray, cfg: NmsConfig):
    """Soft-NMS over the segments of all windows of one video (seconds; tIoU does not care)."""
    batch = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (seg, score, label)]
    keep, kept_scores, valid = soft_nms(*batch, torch.ones(1, len(score), dtype=torch.bool),
                                        cfg.sigma, cfg.min_score, cfg.max_segments, cfg.class_agnostic)
    i = keep[0, valid[0]].numpy()
    return seg[i], kept_scores[0, valid[0]].double().numpy(), label[i]


def _entries(vid: str, seg: np.ndarray, score: np.ndarray, label: np.ndarray, label_names: Sequence[str], cfg: NmsConfig,
             class_scores: Mapping[str, Mapping[str, float]] | None) -> list[dict[str, Any]]:
    if class_scores is None:
        names = [label_names[int(c)] for c in label]
    else:
        if vid not in class_scores:
            raise BadInput(f"external class scores: no entry for video {vid!r}")
        top = sorted(class_scores[vid].items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.topk_classes]
        names = [name for name, _ in top for _ in range(len(score))]
        score = np.concatenate([score * s for _, s in top]) if top else score[:0]
        seg = np.tile(seg, (len(top), 1))
    order = np.argsort(-score, kind="stable")
    return [{"label": names[i], "score": float(score[i]), "segment": [float(seg[i, 0]), float(seg[i, 1])]} for i in order]


def parse_class_scores(tree: Any, source: str = "class scores") -> dict[str, dict[str, float]]:
    """Video-level class scores `{video: {label: score}}` (optionally under "results"), checked.
    Also the CUHK ActivityNet classifier layout `{"results": {video: [score, ...]}, "class": [label, ...]}`.
    ActivityNet's video ids are also found under their file names `v_<id>`."""
    if isinstance(tree, dict) and isinstance(tree.get("class"), list) and isinstance(tree.get("results"), dict):
        names, results = tree["class"], tree["results"]
        for vid, scores in results.items():
            if not isinstance(scores, list) or len(scores) != len(names):
                raise BadInput(f"{source}: video {vid!r}: expected {len(names)} scores (one per entry of \"class\")")
        tree = {vid: dict(zip(names, scores)) for vid, scores in results.items()}
    if isinstance(tree, dict) and isinstance(tree.get("results"), dict):
        tree = tree["results"]
    if not isinstance(tree, dict):
        raise BadInput(f"{source}: expected an object {{video: {{label: score}}}}, got {type(tree).__name__}")
    out: dict[str, dict[str, float]] = {}
    for vid, scores in tree.items():
        if not isinstance(scores, dict):
            raise BadInput(f"{source}: video {vid!r}: expected an object {{label: score}}, got {type(scores).__name__}")
        for name, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BadInput(f"{source}: video {vid!r} label {name!r}: score must be a finite number, got {value!r}")
        out[vid] = {name: float(value) for name, value in scores.items()}
        if vid.startswith("v_"):
            out.setdefault(vid[2:], out[vid])
    return out


def load_class_scores(url: str, storage: StorageConfig | None = None) -> dict[str, dict[str, float]]:
    """Read and check a class-score JSON file (`head.nms.external_scores`) from any fsspec URL."""
    fs, path = filesystem(url, storage or StorageConfig())
    try:
        with fs.open(path, "rt", encoding="utf-8") as f:
            tree = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{url}: no such file (head.nms.external_scores)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{url}: not valid JSON ({err})") from None
    return parse_class_scores(tree, url)
