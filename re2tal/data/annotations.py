"""ActivityNet-format annotations: videos, their files, segments and the label map.

    {"database": {video_id: {"subset": str, "duration": seconds, "url": str (optional),
                             "annotations": [{"segment": [start, end], "label": str}, ...]}}}

A video's file is its `url` (a relative one is taken under `data.video_root`), else (or with
`data.use_annotation_urls: false`) `<video_root>/<video_prefix><id>.<video_ext>`; `video_root` defaults to the annotation file's folder. The label
map is the sorted list of every label in the file (index = class id) but `data.ignore_labels`. Segments reaching past the
video's duration are clipped to it (ActivityNet has many that end a little after the video);
one starting at or after the end is dropped with a warning. As OpenTAD / ActionFormer's evaluation
(`remove_duplicate_annotations`), empty segments and repeats of a segment (same label, both ends
within 1e-3 s) are dropped; `data.min_segment_fraction` drops short segments of training videos
(OpenTAD's `filter_gt`), and `data.blocked_videos` whole videos. Anything else malformed is a
`BadInput` naming the file, the video and the field.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from re2tal.config import DataConfig, StorageConfig, check_url
from re2tal.data import storage as st
from re2tal.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Video:
    id: str
    url: str
    duration: float  # seconds, as annotated
    subset: str
    segments: np.ndarray  # float32 (M, 2) seconds, start < end
    labels: np.ndarray  # int64 (M,) class ids
    index: int  # position in the annotation file (stable per-video seeds)
    clip: tuple[float, float] | None = None  # a recognition clip (re2tal.data.clips): its (start, end) s in the file, end inf = the file's end


@dataclass(frozen=True, eq=False)
class Annotations:
    url: str
    videos: list[Video]
    labels: list[str]  # the label map: class id -> name

    def subset(self, name: str) -> list[Video]:
        """The videos of one subset, in file order."""
        videos = [v for v in self.videos if v.subset == name]
        if not videos:
            have = ", ".join(sorted({v.subset for v in self.videos})) or "none"
            raise BadInput(f"{self.url}: no videos in subset {name!r} (subsets in the file: {have})")
        return videos

    def video(self, video_id: str) -> Video:
        for v in self.videos:
            if v.id == video_id:
                return v
        raise KeyError(video_id)

    def check_subsets(self, data: DataConfig) -> None:
        """Both subsets a run reads (data.train_subset, data.val_subset) have videos."""
        for key in ("train_subset", "val_subset"):
            try:
                self.subset(getattr(data, key))
            except BadInput as err:
                raise BadInput(f"data.{key}: {err}") from None


def video_root(data: DataConfig) -> str:
    if data.video_root is not None:
        return data.video_root.rstrip("/")
    if st.is_local(data.annotations) and "://" not in data.annotations:
        return posixpath.dirname(data.annotations) or "."
    return data.annotations.rsplit("/", 1)[0]


def load_annotations(data: DataConfig, storage: StorageConfig) -> Annotations:
    url = data.annotations
    try:
        raw = st.read_bytes(url, storage)
    except Exception as err:
        if isinstance(err, OSError) or st.transient(err):
            raise BadInput(f"{url}: cannot read annotations ({err.__class__.__name__}: {err})") from None
        raise
    try:
        tree = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{url}: not valid JSON ({err})") from None
    database = tree.get("database") if isinstance(tree, dict) else None
    if not isinstance(database, dict):
        raise BadInput(f'{url}: expected {{"database": {{video_id: {{...}}}}}} (ActivityNet format)')
    blocked = blocked_videos(data.blocked_videos, storage) if data.blocked_videos else set()
    entries = []
    for vid, entry in database.items():
        where = f"{url}: video {vid!r}"
        if not isinstance(entry, dict):
            raise BadInput(f"{where}: expected an object with subset, duration and annotations")
        if vid not in blocked:
            entries.append((vid, entry, where))
    labels = sorted({a.get("label") for _, e, _ in entries for a in _list(e, "annotations", "")
                     if isinstance(a, dict) and isinstance(a.get("label"), str)} - set(data.ignore_labels))
    ids = {name: i for i, name in enumerate(labels)}
    root = video_root(data)
    videos = [_video(vid, entry, where, i, ids, root, data) for i, (vid, entry, where) in enumerate(entries)]
    return Annotations(url=url, videos=videos, labels=labels)


def _list(entry: dict, key: str, where: str) -> list:
    value = entry.get(key, [])
    if not isinstance(value, list):
        raise BadInput(f"{where}: {key} must be a list")
    return value


def _video(vid: str, entry: dict, where: str, index: int, ids: dict[str, int], root: str, data: DataConfig) -> Video:
    subset = entry.get("subset")
    if not isinstance(subset, str) or not subset:
        raise BadInput(f"{where}: subset is missing or not a string")
    duration = entry.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise BadInput(f"{where}: duration is missing or not a positive number (got {duration!r})")
    segments, labels = [], []
    for k, ann in enumerate(_list(entry, "annotations", where)):
        at = f"{where}: annotations[{k}]"
        if not isinstance(ann, dict):
            raise BadInput(f"{at}: expected an object with segment and label")
        seg = ann.get("segment")
        if (not isinstance(seg, (list, tuple)) or len(seg) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in seg)):
            raise BadInput(f"{at}: segment must be [start, end] in seconds (got {seg!r})")
        start, end = float(seg[0]), float(seg[1])
        if start < 0 or end < start:
            raise BadInput(f"{at}: segment [{start:g}, {end:g}] needs 0 <= start <= end")
        if not isinstance(ann.get("label"), str):
            raise BadInput(f"{at}: label is missing or not a string")
        if start >= duration:
            log.warning("%s: segment [%g, %g] starts after the video's duration %g s; dropped", at, start, end, duration)
            continue
        end = min(end, duration)
        label = ids.get(ann["label"])
        if label is None or end <= start:  # an ignored label, or empty
            continue
        if subset == data.train_subset and (end - start) <= data.min_segment_fraction * duration:
            continue
        if any(c == label and abs(a - start) <= 1e-3 and abs(b - end) <= 1e-3 for (a, b), c in zip(segments, labels)):
            continue
        segments.append((start, end))
        labels.append(label)
    return Video(id=vid, url=_resolve(entry.get("url"), vid, where, root, data), duration=float(duration), subset=subset,
                 segments=np.asarray(segments, np.float32).reshape(-1, 2), labels=np.asarray(labels, np.int64), index=index)


def blocked_videos(url: str, storage: StorageConfig) -> set[str]:
    """Video ids of a JSON list or a text file with one id a line."""
    try:
        text = st.read_bytes(url, storage).decode("utf-8")
    except Exception as err:
        if isinstance(err, (OSError, UnicodeDecodeError)) or st.transient(err):
            raise BadInput(f"{url}: cannot read data.blocked_videos ({err.__class__.__name__}: {err})") from None
        raise
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = text.split()
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadInput(f"{url}: data.blocked_videos must be a JSON list of video ids or one id a line")
    return set(ids)


def _resolve(url: object, vid: str, where: str, root: str, data: DataConfig) -> str:
    if url is None or not data.use_annotation_urls:
        return f"{root}/{data.video_prefix}{vid}.{data.video_ext}"
    if not isinstance(url, str):
        raise BadInput(f"{where}: url must be a string")
    try:
        check_url(url)
    except ValueError as err:
        raise BadInput(f"{where}: url {err}") from None
    relative = not urlsplit(url).scheme and not url.startswith("/")
    return f"{root}/{url}" if relative else url
