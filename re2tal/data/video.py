"""Videos at any fsspec URL, decoded with decord.

`VideoSource.acquire(url)` gives a local path: local files as they are, remote objects through the
node-local `VideoCache`. `VideoFile(path, short_side)` opens it with decord (resizing while
decoding so the short side is `short_side`), knows every frame's presentation time, and decodes
only the frame indices asked for. Anything wrong with a video (missing, unreadable, corrupt,
truncated, storage giving up) is a `VideoError` naming the URL and the reason.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from dataclasses import dataclass

import av
import decord
import numpy as np

from re2tal.config import StorageConfig
from re2tal.data import storage as st
from re2tal.data.cache import Lease, VideoCache
from re2tal.errors import BadInput

# decord's recovery from undecodable frames returns copies of neighbours; with any threshold
# above zero a damaged video would silently give wrong frames, so the first recovered frame fails.
_FAULT_TOL = 1e-9


class VideoError(Exception):
    """A video that cannot be fetched or decoded: skipped (and logged) up to data.max_bad_videos."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    duration: float
    height: int
    width: int

    def to_dict(self) -> dict[str, float | int]:
        return {"frames": self.frames, "fps": self.fps, "duration": self.duration, "height": self.height, "width": self.width}


class VideoSource:
    """Local paths for video URLs; remote objects go through the node-local cache."""

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self._cache: VideoCache | None = None
        self._lock = threading.Lock()

    @property
    def cache(self) -> VideoCache:
        with self._lock:  # fetcher threads ask at once
            if self._cache is None:  # made on first remote video: local datasets touch no cache dir
                self._cache = VideoCache(self.storage)
            return self._cache

    def cache_use(self) -> dict[str, int | str]:
        """This process's use of the node's cache so far: hits, misses (= downloads), bytes
        fetched, and the cache directory as resolved on this node ("" before any remote video)."""
        with self._lock:
            if self._cache is None:
                return {"hits": 0, "misses": 0, "bytes_fetched": 0, "cache_dir": ""}
            return self._cache.stats.snapshot() | {"cache_dir": str(self._cache.root)}

    def acquire(self, url: str) -> Lease:
        """A lease on a local copy of `url`; release it when done with the file."""
        try:
            if st.is_local(url):
                _, path = st.filesystem(url, self.storage)
                with open(path, "rb"):  # fail here, with the OS's reason, not inside decord
                    pass
                return Lease(path)
            return self.cache.acquire(url)
        except Exception as err:
            if isinstance(err, OSError) or st.transient(err):
                raise VideoError(f"cannot fetch: {_reason(err)}") from err
            raise


def output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) with the short side scaled to `short_side`, aspect ratio kept."""
    if short_side is None or min(height, width) == short_side:
        return height, width
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(1, round(width * scale))
    return max(1, round(height * scale)), short_side


class VideoFile:
    """An open video: frame timestamps and decoding of chosen frames (one thread at a time).

    `starts[k]` is the presentation time (s) at which frame k appears, the first frame at 0;
    frame k is shown during [starts[k], starts[k+1]) and the last until `info.duration`.
    """

    def __init__(self, path: str, short_side: int | None = None, threads: int = 1):
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoError("no video stream")
                codec = container.streams.video[0].codec_context
                height, width = codec.height, codec.width
            if height <= 0 or width <= 0:
                raise VideoError(f"bad frame size {width}x{height}")
            self.height, self.width = output_size(height, width, short_side)
            resize = (self.height, self.width) != (height, width)
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), width=self.width if resize else -1,
                                              height=self.height if resize else -1, num_threads=threads, fault_tol=_FAULT_TOL)
            n = len(self._reader)
            # decord keeps float32 seconds; rounding to microseconds restores 1001/30000-style steps
            stamps = np.round(self._reader.get_frame_timestamp(np.arange(n)).astype(np.float64), 6)
            fps = float(self._reader.get_avg_fps())
        except VideoError:
            raise
        except (av.FFmpegError, decord.DECORDError, RuntimeError, AssertionError, IndexError, ValueError) as err:
            raise VideoError(f"cannot open: {_reason(err)}") from err
        starts = stamps[:, 0] - stamps[0, 0]
        end = stamps[-1, 1] - stamps[0, 0]
        if not end > starts[-1]:  # no duration on the last packet: it lasts one average frame
            end = starts[-1] + (1.0 / fps if fps > 0 else 0.0)
        if not np.all(np.diff(starts) >= 0) or not end > 0:
            raise VideoError("frame timestamps are not increasing")
        self.starts = starts
        self.info = VideoInfo(frames=n, fps=fps if fps > 0 else n / end, duration=float(end), height=self.height, width=self.width)

    def indices(self, times: np.ndarray) -> np.ndarray:
        """Index of the frame on screen at each time (seconds from the first frame)."""
        idx = np.searchsorted(self.starts, np.asarray(times, dtype=np.float64), side="right") - 1
        return np.clip(idx, 0, self.info.frames - 1)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (len(indices), H, W, 3) frames; each distinct frame is decoded once, in order."""
        wanted, where = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        try:
            frames = self._reader.get_batch(wanted).asnumpy()
        except (decord.DECORDError, RuntimeError, IndexError) as err:
            raise VideoError(f"cannot decode: {_reason(err)}") from err
        if frames.shape != (len(wanted), self.height, self.width, 3):
            raise VideoError(f"decoder returned frames of shape {frames.shape}, expected {(len(wanted), self.height, self.width, 3)}")
        return frames[where]


def _reason(err: BaseException) -> str:
    """One line: the error class and its message without decord's source locations."""
    lines = str(err).strip().splitlines()
    text = _DECORD_LOCATION.sub("", lines[0] if lines else "").strip()
    return f"{err.__class__.__name__}: {text[:300]}" if text else err.__class__.__name__


_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def inspect(url: str, storage: StorageConfig) -> VideoInfo:
    """frames, fps, duration, height, width of the video at `url`."""
    with VideoSource(storage).acquire(url) as lease:
        return VideoFile(lease.path).info


def inspect_command(args: argparse.Namespace) -> int:
    """`re2tal data inspect URL [--json]` (storage from the standard AWS / GCP environment)."""
    try:
        info = inspect(args.url, StorageConfig())
    except VideoError as err:
        raise BadInput(f"{args.url}: {err}") from None
    if args.json:
        print(json.dumps(info.to_dict()))
    else:
        print(f"{args.url}: {info.frames} frames, {info.fps:g} fps, {info.duration:.3f} s, {info.width}x{info.height}")
    return 0
