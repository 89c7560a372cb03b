"""From head outputs to ActivityNet predictions, as OpenTAD post-processes ActionFormer's.

    postprocess(out, cfg)               per clip: candidate segments (grid), scores, labels
    to_predictions(clips, videos, ...)  per video: one Soft-NMS over all its clips' candidates
                                        (+ boundary voting), seconds, labels named, external
                                        video-level class scores fused

Candidates (OpenTAD `SingleStageDetector.post_processing`, single_stage.py:106-134): a
class-agnostic head's every real point; a multi-class head's (point, class) pairs scoring above
pre_nms_threshold, the pre_nms_topk highest, in descending order of score.

Soft-NMS (`soft_nms`): OpenTAD's Gaussian Soft-NMS (nms_cpu.cpp `softnms_1d_cpu`, method 2):
repeatedly keep the highest-scoring segment m and decay every other one by
score_i *= exp(-tIoU(m, i)^2 / sigma), dropping those that fall below min_score; tIoU adds 1e-6 to
each length, ties go to the first in the working array, which picks and drops permute by swaps.
Per class, or over all classes with class_agnostic (`batched_nms`, nms.py:101-208); then the
max_segments highest. Boundary voting (`seg_voting`, nms.py:64-98), class-agnostic only: each kept
segment becomes the score-weighted mean of every candidate overlapping it by tIoU >= the
voting threshold; its score is kept.

Where (OpenTAD single_stage.py:136-143, test_engine.py:100-128): a video seen whole in one clip is
NMSed on its clip's grid and cut to [0, duration] afterwards; sliding windows go to seconds, are cut
to the video, and all windows' candidates of a video share one NMS. Segments empty after the cut
are dropped (they match nothing).
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

IOU_EPS = 1e-6  # added to every segment length in Soft-NMS's tIoU (OpenTAD nms_cpu.cpp:77)


@torch.no_grad()
def postprocess(out: DetectorOutput, cfg: NmsConfig) -> list[dict[str, torch.Tensor]]:
    """Per clip (on the CPU): the candidates `segments` (N, 2) float32 grid units, `scores` (N,),
    `labels` (N,) long; see the module docstring. Decoded segment of point x at stride s with
    distances (l, r): (x - l s, x + r s). Segments not longer than cfg.min_length are dropped."""
    logits, offsets, mask, points, strides = (t.detach().cpu() for t in out.flat())
    K = logits.shape[-1]
    dist = offsets.float() * strides[None, :, None]
    segments = torch.stack([points[None] - dist[..., 0], points[None] + dist[..., 1]], dim=-1)  # (B, P, 2)
    clips = []
    for seg, prob, real in zip(segments, torch.sigmoid(logits.float()), mask):
        seg, prob = seg[real], prob[real]
        if K == 1:
            scores, labels = prob[:, 0], torch.zeros(len(prob), dtype=torch.long)
        else:
            flat = prob.flatten()
            idx = torch.nonzero(flat > cfg.pre_nms_threshold, as_tuple=True)[0]
            scores, order = flat[idx].sort(descending=True)
            scores, idx = scores[: cfg.pre_nms_topk], idx[order[: cfg.pre_nms_topk]]
            seg, labels = seg[torch.div(idx, K, rounding_mode="floor")], idx % K
        keep = seg[:, 1] - seg[:, 0] > cfg.min_length
        clips.append({"segments": seg[keep].float(), "scores": scores[keep].float(), "labels": labels[keep]})
    return clips


def soft_nms(segments: np.ndarray, scores: np.ndarray, sigma: float, min_score: float, max_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenTAD's Gaussian Soft-NMS of one set of segments (N, 2), scores (N,), in float32 as its C++
    loop. Returns the kept indices and their decayed scores in order of selection (at most
    max_segments).

    Step i: m = the first maximum of the working array's positions [i, n); swap it to i; decay the
    positions after i by exp(-u^2 / sigma), u = inter / (len_m + len_j - inter), len = end - start +
    1e-6; a position whose score drops below min_score is replaced by the array's last element
    (itself then examined) and n shrinks. Vectorised per step: holes in the first k positions (k
    survivors) take the surviving elements from the back, last first."""
    x1 = np.array(segments[:, 0], dtype=np.float32)
    x2 = np.array(segments[:, 1], dtype=np.float32)
    sc = np.array(scores, dtype=np.float32)
    area = x2 - x1 + np.float32(IOU_EPS)
    ind = np.arange(len(sc))
    arrays = (x1, x2, sc, area, ind)
    sigma32, floor = np.float32(sigma), np.float32(min_score)
    n, i = len(sc), 0
    while i < n and i < max_segments:
        m = i + int(np.argmax(sc[i:n]))
        for a in arrays:
            a[i], a[m] = a[m], a[i]
        rest = slice(i + 1, n)
        inter = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ovr = inter / (area[i] + area[rest] - inter)
        sc[rest] *= np.exp(-(ovr * ovr) / sigma32)
        keep = sc[rest] >= floor
        k = int(keep.sum())
        if k < n - i - 1:
            order = np.arange(n - i - 1)
            order[np.flatnonzero(~keep[:k])] = np.flatnonzero(keep[k:])[::-1] + k
            for a in arrays:
                a[rest][:k] = a[rest][order[:k]]
            n = i + 1 + k
        i += 1
    return ind[:i].copy(), sc[:i].copy()


def segment_voting(kept: np.ndarray, candidates: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Boundary voting (OpenTAD `seg_voting`, nms.py:64-98): kept segments (M, 2) -> the
    score-weighted mean of the candidates (N, 2) whose plain tIoU (no epsilon) with each is >=
    threshold, float32: w_mn = s_n [tIoU(m, n) >= t], seg'_m = sum_n w_mn seg_n / sum_n w_mn."""
    kept, candidates, scores = (np.asarray(a, dtype=np.float32) for a in (kept, candidates, scores))
    inter = np.clip(np.minimum(kept[:, None, 1], candidates[None, :, 1]) - np.maximum(kept[:, None, 0], candidates[None, :, 0]), 0, None)
    lengths = (kept[:, None, 1] - kept[:, None, 0]) + (candidates[None, :, 1] - candidates[None, :, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = (inter / (lengths - inter) >= np.float32(threshold)).astype(np.float32) * scores[None, :]
        weights /= weights.sum(axis=1, keepdims=True)
    return weights @ candidates


def batched_nms(segments: np.ndarray, scores: np.ndarray, labels: np.ndarray, cfg: NmsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenTAD's `batched_nms` (nms.py:101-208) with Gaussian Soft-NMS: per class (ascending label)
    unless cfg.class_agnostic, each capped at max_segments; class-agnostic results are voted on
    (cfg.voting_threshold > 0); then the max_segments highest scores. float32 segments, scores,
    int labels, sorted by descending score."""
    segments, scores = np.asarray(segments, np.float32).reshape(-1, 2), np.asarray(scores, np.float32)
    labels = np.asarray(labels, np.int64)
    groups = [np.arange(len(scores))] if cfg.class_agnostic else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picked, picked_scores = [], []
    for group in groups:
        keep, kept_scores = soft_nms(segments[group], scores[group], cfg.sigma, cfg.min_score, cfg.max_segments)
        picked.append(group[keep])
        picked_scores.append(kept_scores)
    index = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    new_scores = np.concatenate(picked_scores) if picked else np.zeros(0, np.float32)
    new_segments = segments[index]
    if cfg.class_agnostic and cfg.voting_threshold > 0 and len(index):
        new_segments = segment_voting(new_segments, segments, scores, cfg.voting_threshold)
    # the same (not necessarily stable) sort as OpenTAD's, so equal scores come out in its order
    order = torch.from_numpy(new_scores).sort(descending=True)[1].numpy()[: cfg.max_segments]
    return new_segments[order], new_scores[order], labels[index][order]


def to_predictions(clips: Sequence[Mapping[str, torch.Tensor]], videos: Sequence[str], windows: Sequence[Sequence[float]],
                   durations: Sequence[float], label_names: Sequence[str], cfg: NmsConfig, seq_len: int,
                   class_scores: Mapping[str, Mapping[str, float]] | None = None, sliding: bool | None = None) -> dict[str, Any]:
    """ActivityNet submission dict from per-clip candidates (`postprocess`).

    clips[i] belongs to video videos[i], covers windows[i] = (start_s, end_s); durations[i] is that
    video's length. `sliding`: whether clips are sliding windows (candidates to seconds and cut to
    the video, then one Soft-NMS per video) or each video's one whole-video clip (Soft-NMS on the
    clip's grid, then seconds and the cut); None: a video with several clips is sliding. With
    `class_scores` ({video: {label: score}}, class-agnostic head) each segment is repeated for the
    video's top cfg.topk_classes classes with score segment score * class score; else its label is
    label_names[label].
    """
    by_video: dict[str, list[int]] = {}
    for i, vid in enumerate(videos):
        by_video.setdefault(vid, []).append(i)
    results: dict[str, list[dict[str, Any]]] = {}
    for vid, idx in by_video.items():
        duration = float(durations[idx[0]])
        parts = [{k: clips[i][k].numpy() for k in ("segments", "scores", "labels")} for i in idx]
        if sliding or (sliding is None and len(idx) > 1):
            seg = np.concatenate([np.clip(grid_to_seconds(p["segments"].astype(np.float64).reshape(-1, 2), windows[i], seq_len), 0.0, duration)
                                  for p, i in zip(parts, idx)])
            seg, score, label = batched_nms(seg, np.concatenate([p["scores"] for p in parts]),
                                            np.concatenate([p["labels"] for p in parts]), cfg)
            seg = seg.astype(np.float64)
        else:
            if len(idx) > 1:
                raise ValueError(f"video {vid!r} has {len(idx)} clips; pass sliding=True to merge windows")
            seg, score, label = batched_nms(parts[0]["segments"], parts[0]["scores"], parts[0]["labels"], cfg)
            seg = np.clip(grid_to_seconds(seg.astype(np.float64).reshape(-1, 2), windows[idx[0]], seq_len), 0.0, duration)
        keep = seg[:, 1] > seg[:, 0]
        results[vid] = _entries(vid, seg[keep], score[keep].astype(np.float64), label[keep], label_names, cfg, class_scores)
    return {"version": "re2tal", "results": results,
            "external_data": {"used": class_scores is not None,
                              "details": "video-level class scores fused as segment score x class score" if class_scores is not None else ""}}


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
