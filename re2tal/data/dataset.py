"""Clips of one worker's share of an epoch, fetched and decoded ahead in background threads.

    ann, source = load_annotations(cfg.data, cfg.storage), VideoSource(cfg.storage)  # once per worker
    ds = VideoDataset(cfg, cfg.data.train_subset, rank, world_size, epoch, seed, training=True, start=k,
                      annotations=ann, source=source)
    for batch in batches(ds, cfg.data.batch_size): ...

Sharding: the subset's videos (annotation order) are permuted by a generator seeded with
(seed, epoch) when training, kept in order for evaluation, and dealt round-robin to the workers:
rank r gets positions r, r + world_size, ... — disjoint shards that together cover every video
exactly once per epoch (sizes differ by at most one; the training loop must stop all workers
together). `start` skips the first `start` videos of this worker's shard (resume mid-epoch).

Per video: training yields one clip (uniform: the whole video; sliding: a random window with
`data.random_truncate`, by OpenTAD's rule with `data.truncate_threshold`, else the first);
evaluation yields every window (sliding) or one clip (uniform). Randomness (temporal jitter, truncation) comes from a generator seeded with
(seed, epoch, the video's position in the annotation file), so it does not depend on thread timing
or on where a resumed epoch starts. Clips come out in shard order, the windows of one video
consecutively and in time order (an evaluation loop knows a video is complete when the id changes).

A clip (`Clip`, a dict):
    video_id  str
    frames    uint8 tensor (N, H, W, 3), short side = data.short_side, aspect ratio kept
    window    (start_s, end_s): sample i shows the frame on screen at start + (i + 0.5) * (end - start) / N
              (with temporal jitter, a random time within that i-th N-th of the window); uniform:
              (0, duration); sliding: N * frame_interval / fps long, placed so samples fall on frame
              centres (the first window starts (frame_interval - 1) / 2 frames before 0)
    valid     int: frames [0, valid) are real, the rest repeat frame valid - 1 (sliding: past the end, or
              a video cropped shorter by data.truncate_crop_ratio)
    duration  float: the video's duration in seconds (as decoded)
    fps       float: the video's average frame rate
    segments  float32 (M, 2): annotated segments (s) overlapping the window's real part, clipped to it
              (with data.truncate_threshold in training: those with that fraction inside)
    labels    int64 (M,): their class ids (index into `Annotations.labels`)

`collate(clips)` stacks a batch: `frames` uint8 (B, N, H, W, 3) (padded with zeros at the bottom /
right to the largest H, W), `valid` int64 (B,), `mask` bool (B, N) (True for real frames),
`size` list of each clip's (H, W) before padding, and lists `video_id`, `window`, `duration`,
`fps`, `segments`, `labels`.

Pipeline per iteration: max(1, `prefetch_videos`) threads fetch videos (into the node-local cache
when remote) up to `loader_threads + prefetch_videos` videos ahead; `loader_threads` threads
decode (decord releases the GIL), each one video at a time, handing clips over through small
queues, so at most about 3 x `loader_threads` decoded clips are in memory.
A video that cannot be fetched or decoded (missing, corrupt, truncated, storage gave up, decoding
hung past data.decode_timeout_s) is logged with its id and URL and skipped; more than
`data.max_bad_videos` of them in one worker's epoch is a BadInput naming the last one. The
threads are daemons: a decoder stuck inside a damaged file cannot keep the process alive.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypedDict

import numpy as np
import torch

from re2tal.config import Config, DataConfig
from re2tal.data import sampling
from re2tal.data.annotations import Annotations, Video, load_annotations
from re2tal.data.cache import Lease
from re2tal.data.video import VideoError, VideoFile, VideoInfo, VideoSource
from re2tal.errors import BadInput

log = logging.getLogger(__name__)


class Clip(TypedDict):
    video_id: str
    frames: torch.Tensor
    window: tuple[float, float]
    valid: int
    duration: float
    fps: float
    segments: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class BadVideo:
    video_id: str
    url: str
    reason: str


def shard(count: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Positions (into the subset's video list) that worker `rank` handles this epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(count) if shuffle else np.arange(count)
    return order[rank::world_size]


def plan_windows(info: VideoInfo, video: Video, cfg: Config, training: bool, rng: np.random.Generator) -> list[sampling.Window]:
    """The windows of one video that this pass turns into clips."""
    d = cfg.data
    if video.clip is not None:  # a recognition clip: one window inside it
        return [sampling.clip_window(*video.clip, info.duration, d.frame_interval / info.fps if d.sampling == "sliding" else None,
                                     d.num_frames, rng if training else None)]
    if d.sampling == "uniform":
        return [sampling.uniform_window(info.duration, d.num_frames)]
    return sliding_plan(d, info.duration, d.frame_interval / info.fps, 0.5 / info.fps, d.num_frames, d.window_stride, training,
                        rng, video.segments)


def sliding_plan(d: DataConfig, duration: float, step: float, first_centre: float, samples: int, stride: int, training: bool,
                 rng: np.random.Generator, segments: np.ndarray) -> list[sampling.Window]:
    """data.sampling sliding on a grid of `step` s whose first sample is at `first_centre`: windows
    of `samples` samples, evaluation ones `stride` apart; training one truncated window (OpenTAD's
    rule with data.truncate_threshold, else random), or the first. Frames and extracted features
    (re2tal.data.features) both window by it."""
    if training and d.random_truncate and d.truncate_threshold is not None:
        return [sampling.truncated_window(duration, step, samples, rng, segments, d.truncate_threshold, d.truncate_crop_ratio,
                                          first_centre)]
    if training and d.random_truncate:
        return [sampling.random_window(duration, step, samples, rng, segments)]
    windows = sampling.sliding_windows(duration, step, samples, stride, first_centre, end_aligned=d.last_window == "end_aligned")
    return windows[:1] if training else windows


def make_clip(video: Video, file: VideoFile, w: sampling.Window, num_frames: int, rng: np.random.Generator | None) -> Clip:
    """Decode the frames of one window (`rng`: temporal jitter)."""
    times = sampling.sample_times(w, num_frames, rng)
    frames = file.read(file.indices(times))
    segments, labels = sampling.segments_in(w, file.info.duration, video.segments, video.labels, num_frames)
    return Clip(video_id=video.id, frames=torch.from_numpy(frames), window=(w.start, w.end), valid=w.valid,
                duration=file.info.duration, fps=file.info.fps, segments=segments, labels=labels)


def evaluation_clips(cfg: Config, url: str, clip: tuple[float, float] | None = None) -> tuple[Video, list[Clip]]:
    """One video outside any annotation file (any fsspec URL, its id the file name without the
    extension) and its clips through the evaluation's windows; `clip`: a recognition clip in it
    (Video.clip). BadInput if it cannot be read."""
    name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        with VideoSource(cfg.storage).acquire(url) as lease:
            file = VideoFile(lease.path, short_side=cfg.data.short_side, threads=cfg.data.loader_threads)
            video = Video(id=name, url=url, duration=file.info.duration, subset="", index=0, segments=np.zeros((0, 2), np.float32),
                          labels=np.zeros(0, np.int64), clip=clip)
            windows = plan_windows(file.info, video, cfg, training=False, rng=np.random.default_rng(0))
            return video, [make_clip(video, file, w, cfg.data.num_frames, None) for w in windows]
    except VideoError as err:
        raise BadInput(f"{url}: cannot read video ({err})") from None


class VideoDataset:
    """One worker's clips of one epoch; see the module docstring. Iterable (again and again)."""

    def __init__(self, cfg: Config, subset: str, rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
                 training: bool = True, start: int = 0, *, annotations: Annotations | None = None,
                 source: VideoSource | None = None):
        self.cfg, self.training, self.epoch, self.seed = cfg, training, epoch, seed
        self.annotations = annotations if annotations is not None else load_annotations(cfg.data, cfg.storage)
        subset_videos = self.annotations.subset(subset)
        positions = shard(len(subset_videos), rank, world_size, epoch, seed, shuffle=training)
        self.videos: list[Video] = [subset_videos[i] for i in positions[start:]]
        self.source = source if source is not None else VideoSource(cfg.storage)
        self.bad: list[BadVideo] = []

    def __len__(self) -> int:
        """Videos (not clips) this worker handles."""
        return len(self.videos)

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict]:
        """This worker's clips as collated batches (`batches`)."""
        return batches(self, batch_size, drop_last)

    def _rng(self, video: Video) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, video.index])

    def __iter__(self) -> Iterator[Clip]:
        d, s = self.cfg.data, self.cfg.storage
        slots = [_Slot(v) for v in self.videos]
        pipe = _Pipeline(self, fetchers=max(1, d.prefetch_videos), decoders=d.loader_threads)
        ahead = d.loader_threads + d.prefetch_videos
        # Backstops against a hang: the first clip of a video may wait for its fetch (itself bounded
        # by storage.timeout_s, twice over when another process holds the download) and decoding.
        first_wait = 4 * s.timeout_s + 10 + d.decode_timeout_s
        submitted = 0
        try:
            for i, slot in enumerate(slots):
                while submitted < min(len(slots), i + 1 + ahead):
                    pipe.submit(slots[submitted])
                    submitted += 1
                wait = first_wait
                while True:
                    try:
                        item = slot.out.get(timeout=wait)
                    except queue.Empty:
                        slot.abandoned.set()
                        self._skip(slot.video, f"no frames within {wait:g} s (decoding hung?)")
                        break
                    if item is _END:
                        break
                    if isinstance(item, VideoError):
                        slot.abandoned.set()
                        self._skip(slot.video, str(item))
                        break
                    if isinstance(item, BaseException):
                        raise item
                    wait = d.decode_timeout_s
                    yield item
        finally:
            pipe.close()

    def _skip(self, video: Video, reason: str) -> None:
        self.bad.append(BadVideo(video.id, video.url, reason))
        log.error("skipping video %s (%s): %s", video.id, video.url, reason)
        limit = self.cfg.data.max_bad_videos
        if len(self.bad) > limit:
            raise BadInput(f"{len(self.bad)} bad videos, more than data.max_bad_videos={limit}; last: "
                           f"{video.id} ({video.url}): {reason}")

    def _decode(self, slot: "_Slot", stop: threading.Event) -> None:
        """Decode one video's clips into its slot (runs in a decoder thread)."""
        d = self.cfg.data
        rng = self._rng(slot.video)
        jitter = rng if self.training and self.cfg.augment.temporal_jitter else None
        try:
            while not slot.fetched.wait(0.1):
                if stop.is_set() or slot.abandoned.is_set():
                    return
            if slot.error is not None:
                raise slot.error
            file = VideoFile(slot.lease.path, d.short_side, threads=1)
            for w in plan_windows(file.info, slot.video, self.cfg, self.training, rng):
                if not slot.put(make_clip(slot.video, file, w, d.num_frames, jitter), stop):
                    return
        except BaseException as err:  # handed to the consumer: VideoError skips, others raise there
            slot.put(err, stop)
        finally:
            if slot.lease is not None:
                slot.lease.release()
            slot.put(_END, stop)


_END = object()


class _Slot:
    """One video's way through the pipeline: fetched lease, then clips in a small queue."""

    def __init__(self, video: Video):
        self.video = video
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.fetched = threading.Event()
        self.abandoned = threading.Event()
        self.out: queue.Queue = queue.Queue(maxsize=2)

    def put(self, item: object, stop: threading.Event) -> bool:
        """Hand an item to the consumer; False if it has gone (stopped or skipped this video)."""
        while not (stop.is_set() or self.abandoned.is_set()):
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _Pipeline:
    """Fetcher and decoder daemon threads working through submitted slots in order."""

    def __init__(self, ds: VideoDataset, fetchers: int, decoders: int):
        self.ds = ds
        self.stop = threading.Event()
        self.fetch_q: queue.Queue = queue.Queue()
        self.decode_q: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._fetch_loop, daemon=True, name=f"re2tal-fetch-{i}") for i in range(fetchers)]
        self.threads += [threading.Thread(target=self._decode_loop, daemon=True, name=f"re2tal-decode-{i}") for i in range(decoders)]
        for t in self.threads:
            t.start()

    def submit(self, slot: _Slot) -> None:
        self.fetch_q.put(slot)
        self.decode_q.put(slot)

    def close(self) -> None:
        self.stop.set()
        for q in (self.fetch_q, self.decode_q):
            for _ in self.threads:
                q.put(None)

    def _fetch_loop(self) -> None:
        while (slot := self.fetch_q.get()) is not None:
            try:
                if not (self.stop.is_set() or slot.abandoned.is_set()):
                    slot.lease = self.ds.source.acquire(slot.video.url)
                    if self.stop.is_set():  # nobody will decode it
                        slot.lease.release()
            except BaseException as err:
                slot.error = err
            finally:
                slot.fetched.set()

    def _decode_loop(self) -> None:
        while (slot := self.decode_q.get()) is not None:
            if self.stop.is_set():
                continue
            self.ds._decode(slot, self.stop)


def collate(clips: list[Clip]) -> dict:
    """Stack clips into a batch (see the module docstring)."""
    if not clips:
        raise ValueError("collate needs at least one clip")
    n = clips[0]["frames"].shape[0]
    height = max(c["frames"].shape[1] for c in clips)
    width = max(c["frames"].shape[2] for c in clips)
    frames = torch.zeros((len(clips), n, height, width, 3), dtype=torch.uint8)
    for b, c in enumerate(clips):
        f = c["frames"]
        if f.shape[0] != n:
            raise ValueError(f"clip {c['video_id']} has {f.shape[0]} frames, the batch {n}")
        frames[b, :, : f.shape[1], : f.shape[2]] = f
    valid = torch.tensor([c["valid"] for c in clips], dtype=torch.int64)
    return {
        "video_id": [c["video_id"] for c in clips],
        "frames": frames,
        "valid": valid,
        "mask": torch.arange(n)[None, :] < valid[:, None],
        "size": [tuple(c["frames"].shape[1:3]) for c in clips],
        "window": [c["window"] for c in clips],
        "duration": [c["duration"] for c in clips],
        "fps": [c["fps"] for c in clips],
        "segments": [torch.from_numpy(c["segments"]) for c in clips],
        "labels": [torch.from_numpy(c["labels"]) for c in clips],
    }


def batches(clips: Iterable[Clip], batch_size: int, drop_last: bool = False, collate: Callable[[list], dict] = collate) -> Iterator[dict]:
    """Collated batches of `batch_size` consecutive clips (the last one may be smaller); `collate`
    stacks other items (re2tal.data.features)."""
    group: list = []
    for clip in clips:
        group.append(clip)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group and not drop_last:
        yield collate(group)
