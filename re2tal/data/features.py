"""Pre-extracted features (`re2tal extract`'s layout) as the localization head's input, in windows
whose seconds follow the same rules as clips of frames.

    <DIR>/<video_id>.npy    float16 (clips, channels): clip j's pooled backbone features
    <DIR>/features.json     {"clip_frames", "clip_stride", "frame_interval" (default 1), "fps", "frame_size",
                             "backbone", "weights", ...; "videos": {id: {"fps", ...}} when fps is null}

Clip j covers the frames j * clip_stride + k * frame_interval (k < clip_frames) of the frame grid
(at fps), span = (clip_frames - 1) * frame_interval + 1 frames on screen from j * clip_stride / fps
to (j * clip_stride + span) / fps; its feature stands for the clip's centre
c_j = (j * clip_stride + span / 2) / fps. The features are thus a grid of step
s = clip_stride / fps whose cell j is [c_j - s/2, c_j + s/2), as a clip's samples are
(re2tal.data.sampling): W cells from cell j0 are the `Window` (c_j0 - s/2, c_j0 - s/2 + W s). Their
W features are resampled to head.seq_len positions as a backbone's are (linear,
align_corners=False, which keeps the centres aligned), so targets and decoded segments go through
that window in seconds exactly as end to end (re2tal.detection.grid).

Windows follow the frame sampler's rules (re2tal.data.dataset.sliding_plan), counted in feature
cells: `uniform` takes the whole sequence as one window; `sliding` takes windows of
data.num_frames * data.frame_interval / clip_stride cells (the seconds a window of frames spans,
at the features' fps), evaluation windows data.window_stride * data.frame_interval / clip_stride
cells apart (the
last padded or end-aligned, data.last_window), training one window (OpenTAD's truncation with
data.truncate_threshold, else a random one overlapping an action, or the first), each start moved
to the nearest cell. Cells past the end repeat the last feature and are padding (`valid`).

A batch: `features` float32 (B, C, head.seq_len), `valid` float32 (B,) the fraction of each item's
positions that is real, and the lists `video_id`, `window`, `duration`, `segments`, `labels` of a
batch of clips (re2tal.data.dataset).
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from re2tal.config import Config, StorageConfig
from re2tal.data import sampling
from re2tal.data.annotations import Annotations, Video
from re2tal.data import dataset
from re2tal.data.storage import filesystem, read_bytes
from re2tal.errors import BadInput

META_FILE = "features.json"


@dataclass(frozen=True)
class FeatureMeta:
    """What `features.json` says (re2tal.tasks.extract writes it), and the arrays' channels."""

    url: str  # the folder
    clip_frames: int
    clip_stride: int  # grid frames between the starts of consecutive clips
    fps: float | None  # of the frame grid; None: each video's own (`rates`)
    channels: int
    frame_interval: int = 1  # grid frames between consecutive frames of a clip
    rates: dict[str, float] = field(default_factory=dict)  # video id -> fps, when `fps` is None
    extra: dict = field(default_factory=dict)  # the rest (frame_size, backbone, weights, ...)

    def of(self, video_id: str) -> "FeatureMeta":
        """This video's geometry (its own frame rate when the videos' differ)."""
        if self.fps is not None:
            return self
        if video_id not in self.rates:
            raise BadInput(f"data.features: {self.url}/{META_FILE} gives no fps, nor one for video {video_id!r}")
        return replace(self, fps=self.rates[video_id], rates={})

    @property
    def step(self) -> float:
        """Seconds between consecutive features."""
        return self.clip_stride / self.fps

    @property
    def span(self) -> int:
        """Grid frames from a clip's first to its last, both included."""
        return (self.clip_frames - 1) * self.frame_interval + 1

    def window(self, j0: int, cells: int) -> sampling.Window:
        """The seconds of `cells` feature cells from cell j0 (cell j is centred on clip j)."""
        start = (j0 * self.clip_stride + self.span / 2) / self.fps - self.step / 2
        return sampling.Window(start, start + cells * self.step, cells)

    def duration(self, clips: int) -> float:
        """Seconds the clips of a sequence cover (a video's length, as near as the features tell)."""
        return ((clips - 1) * self.clip_stride + self.span) / self.fps

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "url": self.url, "clip_frames": self.clip_frames, "clip_stride": self.clip_stride, "fps": self.fps,
                "channels": self.channels, "frame_interval": self.frame_interval, "rates": self.rates}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "FeatureMeta":
        own = {k: raw[k] for k in ("url", "clip_frames", "clip_stride", "fps", "channels", "frame_interval", "rates") if k in raw}
        return cls(**own, extra={k: v for k, v in raw.items() if k not in own})


def file_url(folder: str, video_id: str) -> str:
    return f"{folder.rstrip('/')}/{video_id}.npy"


def load_array(url: str, storage: StorageConfig) -> np.ndarray:
    """One video's features (clips, channels); BadInput naming the file if it is not such an array."""
    try:
        array = np.load(io.BytesIO(read_bytes(url, storage)), allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"data.features: {url} does not exist") from None
    except ValueError as err:
        raise BadInput(f"data.features: {url} is not a .npy array ({err})") from None
    if array.ndim != 2 or len(array) == 0:
        raise BadInput(f"data.features: {url} has shape {list(array.shape)}; features are (clips, channels)")
    return array


def read_meta(url: str, storage: StorageConfig, probe: str) -> FeatureMeta:
    """`<url>/features.json`, and the channels of `<url>/<probe>.npy`."""
    where = f"{url.rstrip('/')}/{META_FILE}"
    try:
        raw = json.loads(read_bytes(where, storage))
    except FileNotFoundError:
        raise BadInput(f"data.features: {where} does not exist (not a `re2tal extract` output)") from None
    except ValueError as err:
        raise BadInput(f"data.features: {where} is not JSON ({err})") from None

    def positive(key: str) -> bool:
        return isinstance(raw.get(key), (int, float)) and raw[key] > 0

    rates = {} if positive("fps") else {v: r.get("fps") for v, r in (raw.get("videos") or {}).items()}
    missing = [k for k in ("clip_frames", "clip_stride") if not positive(k)]
    if not (positive("fps") or (rates and all(isinstance(r, (int, float)) and r > 0 for r in rates.values()))):
        missing.append("fps")
    if missing:
        raise BadInput(f"data.features: {where}: {', '.join(missing)} missing or not a positive number")
    channels = load_array(file_url(url, probe), storage).shape[1]
    known = ("clip_frames", "clip_stride", "fps", "frame_interval", "channels", "videos")
    return FeatureMeta(url, int(raw["clip_frames"]), int(raw["clip_stride"]), float(raw["fps"]) if positive("fps") else None,
                       channels, int(raw.get("frame_interval") or 1), {v: float(r) for v, r in rates.items()},
                       {k: v for k, v in raw.items() if k not in known})


def check_files(url: str, storage: StorageConfig, annotations: Annotations, subsets: list[str]) -> None:
    """Every video of the subsets has its features file (one listing of the folder)."""
    fs, path = filesystem(url, storage)
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        raise BadInput(f"data.features: {url} does not exist") from None
    for subset in subsets:
        missing = [v.id for v in annotations.subset(subset) if f"{v.id}.npy" not in names]
        if missing:
            raise BadInput(f"data.features: {url} has no features of {len(missing)} video(s) of subset {subset!r} "
                           f"(e.g. {missing[0]}.npy)")


def plan_cells(clips: int, video: Video, cfg: Config, meta: FeatureMeta, training: bool,
               rng: np.random.Generator) -> list[tuple[int, sampling.Window]]:
    """The windows of one video's features: (first cell, the window in seconds, whose `valid`
    counts its real cells). The frame sampler's rules (re2tal.data.dataset.sliding_plan) over
    the video's duration on the features' grid, each window's start moved to the nearest cell;
    see the module docstring."""
    d = cfg.data
    if d.sampling == "uniform":
        return [(0, meta.window(0, clips))]
    cells = max(1, round(d.num_frames * d.frame_interval / meta.clip_stride))
    stride = max(1, round(d.window_stride * d.frame_interval / meta.clip_stride))
    origin = meta.window(0, 1).start
    planned = []
    for w in dataset.sliding_plan(d, video.duration, meta.step, origin + meta.step / 2, cells, stride, training, rng,
                                  video.segments):
        j0 = min(clips - 1, max(0, round((w.start - origin) / meta.step)))
        on_grid = meta.window(j0, cells)
        planned.append((j0, sampling.Window(on_grid.start, on_grid.end, min(w.valid, clips - j0), w.min_inside)))
    return list({j0: (j0, w) for j0, w in planned}.values())  # a duration past the features' end: no window twice


def make_item(array: np.ndarray, video: Video, j0: int, w: sampling.Window, meta: FeatureMeta, seq_len: int) -> dict[str, Any]:
    """One window of a video's features from cell j0, resampled to `seq_len` positions, with its
    targets (segments in seconds, as a clip's)."""
    cells = round((w.end - w.start) / meta.step)
    part = array[j0: j0 + w.valid]
    if len(part) < cells:  # past the end or cropped: repeat the last feature (padding, masked by `valid`)
        part = np.concatenate([part, np.repeat(part[-1:], cells - len(part), axis=0)])
    x = torch.from_numpy(part.astype(np.float32)).T[None]  # (1, C, cells)
    if cells != seq_len:
        x = F.interpolate(x, size=seq_len, mode="linear", align_corners=False)
    segments, labels = sampling.segments_in(w, video.duration, video.segments, video.labels, cells)
    return {"video_id": video.id, "features": x[0], "valid": w.valid / cells, "window": (w.start, w.end),
            "duration": float(video.duration), "segments": segments, "labels": labels}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"video_id": [i["video_id"] for i in items], "features": torch.stack([i["features"] for i in items]),
            "valid": torch.tensor([i["valid"] for i in items], dtype=torch.float32),
            "window": [i["window"] for i in items], "duration": [i["duration"] for i in items],
            "segments": [torch.from_numpy(i["segments"]) for i in items], "labels": [torch.from_numpy(i["labels"]) for i in items]}


def batches(items, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    return dataset.batches(items, batch_size, drop_last, collate=collate)


class FeatureDataset:
    """One worker's windows of one epoch, sharded as `re2tal.data.dataset.VideoDataset` shards
    videos (the same videos per worker and epoch for a seed); each video's array is read when its
    turn comes."""

    def __init__(self, cfg: Config, subset: str, meta: FeatureMeta, annotations: Annotations, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, seed: int = 0, training: bool = True, start: int = 0):
        self.cfg, self.meta, self.training, self.epoch, self.seed = cfg, meta, training, epoch, seed
        videos = annotations.subset(subset)
        self.videos: list[Video] = [videos[i] for i in dataset.shard(len(videos), rank, world_size, epoch, seed, shuffle=training)[start:]]

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        for video in self.videos:
            array, meta = load_array(file_url(self.meta.url, video.id), cfg.storage), self.meta.of(video.id)
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, video.index])
            for j0, w in plan_cells(len(array), video, cfg, meta, self.training, rng):
                yield make_item(array, video, j0, w, meta, cfg.head.seq_len)

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Any]]:
        return batches(self, batch_size, drop_last)
