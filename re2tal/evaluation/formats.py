"""ActivityNet-format ground truth and predictions, parsed and checked into flat numpy arrays.

Ground truth: `{"database": {vid: {"subset", "duration"?, "url"?, "annotations": [{"segment":
[s, e], "label": str}]}}, "taxonomy"?, "version"?}`.
Predictions: `{"version"?, "results": {vid: [{"label": str, "score": float, "segment": [s, e]}]},
"external_data"?}`.

Bad input raises `BadInput` naming the source, the video, the entry and the field. Predictions
take a fast path (list comprehensions, then vectorised checks); only when that fails is the
offending entry searched for one by one, to name it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from re2tal.errors import BadInput


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth segments of one subset.

    `video[i]` indexes `videos`, `label[i]` indexes `labels` (the classes with at least one
    segment in the subset, sorted by name); `segment` is (N, 2) seconds."""

    videos: list[str]
    labels: list[str]
    video: np.ndarray
    label: np.ndarray
    segment: np.ndarray


@dataclass(frozen=True)
class Predictions:
    """Predicted segments; `video[i]` indexes `videos`, `label[i]` indexes `labels` (both in the
    order first seen in the file); `segment` is (M, 2) seconds, `score` (M,)."""

    videos: list[str]
    labels: list[str]
    video: np.ndarray
    label: np.ndarray
    segment: np.ndarray
    score: np.ndarray


def parse_ground_truth(tree: Any, subset: str | None = "validation", source: str = "ground truth") -> GroundTruth:
    """Segments of the videos whose `subset` equals `subset` (all videos when None)."""
    database = _key(tree, "database", source, dict)
    videos: list[str] = []
    rows: list[tuple[int, str, float, float]] = []
    subsets: set[str] = set()
    for vid, entry in database.items():
        where = f"{source}: video {vid!r}"
        if not isinstance(entry, dict):
            raise BadInput(f"{where}: expected an object, got {type(entry).__name__}")
        if subset is not None:
            if "subset" not in entry:
                raise BadInput(f"{where}: missing key 'subset'")
            subsets.add(str(entry["subset"]))
            if entry["subset"] != subset:
                continue
        annotations = _key(entry, "annotations", where, list)
        code = len(videos)
        videos.append(vid)
        for j, ann in enumerate(annotations):
            at = f"{where} annotations[{j}]"
            if not isinstance(ann, dict):
                raise BadInput(f"{at}: expected an object, got {type(ann).__name__}")
            start, end = _segment(_key(ann, "segment", at), at)
            label = _key(ann, "label", at)
            if not isinstance(label, str):
                raise BadInput(f"{at}: label must be a string, got {label!r}")
            rows.append((code, label, start, end))
    if not videos:
        present = ", ".join(sorted(subsets)) or "none"
        raise BadInput(f"{source}: no videos in subset {subset!r} (subsets present: {present})")
    if not rows:
        raise BadInput(f"{source}: the {len(videos)} videos of subset {subset!r} have no annotated segments")
    labels = sorted({r[1] for r in rows})
    index = {name: i for i, name in enumerate(labels)}
    return GroundTruth(
        videos=videos,
        labels=labels,
        video=np.array([r[0] for r in rows], dtype=np.int64),
        label=np.array([index[r[1]] for r in rows], dtype=np.int64),
        segment=np.array([(r[2], r[3]) for r in rows], dtype=np.float64).reshape(-1, 2),
    )


def parse_predictions(tree: Any, source: str = "predictions") -> Predictions:
    """All predictions of a submission file, checked: every entry has a string label, a finite
    score and a segment [start, end] of finite numbers with end >= start."""
    results = _key(tree, "results", source, dict)
    videos = list(results)
    counts = np.zeros(len(videos), dtype=np.int64)
    segments: list[Any] = []
    scores: list[Any] = []
    labels: list[Any] = []
    for i, vid in enumerate(videos):
        items = results[vid]
        if not isinstance(items, list):
            raise BadInput(f"{source}: video {vid!r}: expected a list of predictions, got {type(items).__name__}")
        counts[i] = len(items)
        try:
            segments += [p["segment"] for p in items]
            scores += [p["score"] for p in items]
            labels += [p["label"] for p in items]
        except (KeyError, TypeError):
            _check_slowly(results, source)
            raise
    try:
        segment = np.asarray(segments) if segments else np.zeros((0, 2))
        score = np.asarray(scores) if scores else np.zeros(0)
    except ValueError:  # ragged lists
        _check_slowly(results, source)
        raise
    # strings, None or nested lists do not give a (M, 2) / (M,) array of numbers
    if not (segment.dtype.kind in "fi" and segment.shape == (len(scores), 2) and score.dtype.kind in "fi" and score.ndim == 1):
        _check_slowly(results, source)
    segment, score = segment.astype(np.float64), score.astype(np.float64)

    first = np.cumsum(counts) - counts
    bad = ~np.isfinite(score)
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{_entry(source, videos, first, i)}: score must be a finite number, got {float(score[i])}")
    bad = ~np.isfinite(segment).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{_entry(source, videos, first, i)}: segment must be finite numbers, got {segment[i].tolist()}")
    bad = segment[:, 1] < segment[:, 0]
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{_entry(source, videos, first, i)}: segment end {float(segment[i, 1])} < start {float(segment[i, 0])}")

    try:
        names = list(dict.fromkeys(labels))  # in order of first appearance
    except TypeError:  # an unhashable label
        _check_slowly(results, source)
        raise
    if any(type(name) is not str for name in names):
        _check_slowly(results, source)
    index = {name: i for i, name in enumerate(names)}
    label = np.fromiter(map(index.__getitem__, labels), dtype=np.int64, count=len(labels))
    return Predictions(videos=videos, labels=names, video=np.repeat(np.arange(len(videos), dtype=np.int64), counts),
                       label=label, segment=segment, score=score)


def _entry(source: str, videos: list[str], first: np.ndarray, i: int) -> str:
    # the last video starting at or before i (videos without predictions share `first`)
    v = int(np.searchsorted(first, i, side="right") - 1)
    return f"{source}: video {videos[v]!r} result {i - int(first[v])}"


def _check_slowly(results: dict, source: str) -> None:
    """Find the first bad prediction entry and raise naming it."""
    for vid, items in results.items():
        for j, p in enumerate(items):
            at = f"{source}: video {vid!r} result {j}"
            if not isinstance(p, dict):
                raise BadInput(f"{at}: expected an object, got {type(p).__name__}")
            label = _key(p, "label", at)
            if not isinstance(label, str):
                raise BadInput(f"{at}: label must be a string, got {label!r}")
            score = _key(p, "score", at)
            if not _is_number(score) or not math.isfinite(score):
                raise BadInput(f"{at}: score must be a finite number, got {score!r}")
            _segment(_key(p, "segment", at), at)


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _segment(value: Any, at: str) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(x) for x in value)):
        raise BadInput(f"{at}: segment must be [start, end] numbers, got {value!r}")
    start, end = float(value[0]), float(value[1])
    if not (math.isfinite(start) and math.isfinite(end)):
        raise BadInput(f"{at}: segment must be finite numbers, got {value!r}")
    if end < start:
        raise BadInput(f"{at}: segment end {end!r} < start {start!r}")
    return start, end


def _key(obj: Any, key: str, where: str, kind: type | None = None) -> Any:
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: expected an object with key {key!r}, got {type(obj).__name__}")
    if key not in obj:
        raise BadInput(f"{where}: missing key {key!r}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise BadInput(f"{where}: {key!r} must be {'an object' if kind is dict else 'a list'}, got {type(value).__name__}")
    return value
