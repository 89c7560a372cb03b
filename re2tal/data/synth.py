"""A synthetic temporal action localization dataset: real h264 mp4 files + ActivityNet annotations.

The embedded default dataset of the debug mode, so a model must be able to learn it from ~64
frames sampled uniformly over a video at 64x64. What a video shows:

- background: a smooth random texture (low-saturation, mid-dark) that pans slowly while its
  tint and brightness drift, plus two small bright dots that wander for the whole video — the
  frame always changes, so "something changed" alone does not mark an action;
- actions: 1-4 non-overlapping segments, each 1/15-1/3 of the video (4-20 s of 60 s) with gaps of
  at least 1/30 of it. During a segment one large, saturated shape (diameter ~35% of the frame)
  is drawn; it appears on the segment's first frame and is gone from its last frame + 1. The
  class is both the shape (disk, square, triangle, cross, ...) and its motion (sway, bob, orbit,
  ...); the colour is random per instance, so colour alone does not tell the class. At one
  sampled frame per second the shape is what identifies the class; the motion is what a model
  with dense sampling can also use.

Frame i is shown at time i / fps; a segment drawn on frames [f0, f1) is annotated [f0/fps, f1/fps].
Everything is drawn from numpy generators seeded by (seed, video index), so the dataset depends
only on the config, not on the number of processes writing it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import posixpath
import re
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from itertools import product
from multiprocessing import get_context

import av
import numpy as np
from pydantic import ValidationError

from re2tal.config import DataConfig, StorageConfig, SynthConfig, clip_annotations, format_error
from re2tal.data.storage import filesystem, protocol
from re2tal.errors import BadInput

SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond", "bar", "x")
MOTIONS = ("sway", "bob", "orbit", "pulse", "diagonal", "eight")
# The first classes differ in both shape and motion; later ones reuse shapes with other motions.
CLASSES = sorted(product(range(len(SHAPES)), range(len(MOTIONS))), key=lambda sm: ((sm[1] - sm[0]) % len(MOTIONS), sm[0]))
MAX_CLASSES = len(CLASSES)

SHAPE_RADIUS = 0.18  # of the frame size
GOP_SECONDS = 1.0  # keyframe interval


def class_names(num_classes: int) -> list[str]:
    return [f"{SHAPES[s]}_{MOTIONS[m]}" for s, m in CLASSES[:num_classes]]


@dataclass(frozen=True)
class Segment:
    start_frame: int
    end_frame: int  # exclusive
    label: int


# --------------------------------------------------------------------------------------------
# drawing


def _segments(rng: np.random.Generator, frames: int, classes: int) -> list[Segment]:
    """1-4 segments of frames/15 .. frames/3 frames, separated from each other and from the
    video's ends by at least frames/30 frames."""
    lo, hi, gap = max(1, round(frames / 15)), max(1, round(frames / 3)), max(1, round(frames / 30))
    count = int(rng.integers(1, 5))
    for _ in range(100):
        lengths = rng.integers(lo, hi + 1, size=count)
        free = frames - int(lengths.sum()) - (count + 1) * gap
        if free >= 0:
            break
        count = max(1, count - 1)
    else:
        raise BadInput(f"data.synth: {frames} frames per video are too few to hold an action segment")
    # spread the free frames over the count + 1 gaps
    cuts = np.sort(rng.integers(0, free + 1, size=count))
    extra = np.diff(np.concatenate([[0], cuts, [free]]))
    segments, t = [], 0
    for length, pad in zip(lengths, extra[:-1]):
        t += gap + int(pad)
        segments.append(Segment(t, t + int(length), int(rng.integers(classes))))
        t += int(length)
    return segments


def _smooth_texture(rng: np.random.Generator, period: int) -> np.ndarray:
    """A periodic (period x period) texture in [0, 1] with blobs of ~period/8 pixels: white noise
    low-pass filtered in the Fourier domain."""
    noise = rng.standard_normal((period, period))
    f = np.fft.fftfreq(period)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    spectrum = np.fft.fft2(noise) * np.exp(-((fx**2 + fy**2) * (period / 8.0) ** 2))
    tex = np.real(np.fft.ifft2(spectrum))
    tex -= tex.min()
    return tex / max(tex.max(), 1e-8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns (..., 3)."""
    k = (np.stack([np.full_like(h, 5.0), np.full_like(h, 3.0), np.full_like(h, 1.0)], -1) + h[..., None] * 6) % 6
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _background(rng: np.random.Generator, frames: int, size: int, fps: float) -> np.ndarray:
    """(frames, size, size, 3) float32: a panning texture under a slowly drifting tint."""
    period = 2 * size
    tex = _smooth_texture(rng, period).astype(np.float32)
    t = np.arange(frames) / fps
    speed = rng.uniform(0.02, 0.05) * size  # pixels per second
    heading = rng.uniform(0, 2 * math.pi)
    oy = np.round(t * speed * math.sin(heading)).astype(np.int64)
    ox = np.round(t * speed * math.cos(heading)).astype(np.int64)
    yy = (np.arange(size)[None, :, None] + oy[:, None, None]) % period
    xx = (np.arange(size)[None, None, :] + ox[:, None, None]) % period
    lum = tex[yy, xx]  # (T, H, W)
    hue = (rng.uniform() + t * rng.uniform(-0.02, 0.02)) % 1.0
    sat = np.full_like(t, rng.uniform(0.15, 0.35))
    val = 0.4 + 0.1 * np.sin(2 * math.pi * t / rng.uniform(20, 40) + rng.uniform(0, 2 * math.pi))
    tint = _hsv_to_rgb(hue, sat, val).astype(np.float32)  # (T, 3)
    return tint[:, None, None, :] * (0.4 + 1.2 * lum[..., None])


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside a shape of radius 1 centred at (u, v) = (0, 0)."""
    au, av_ = np.abs(u), np.abs(v)
    match shape:
        case "disk":
            return u**2 + v**2 <= 1.0
        case "square":
            return np.maximum(au, av_) <= 0.85
        case "triangle":  # apex up
            return (v <= 0.75) & (au <= (v + 1.0) / 1.6)
        case "cross":
            return ((au <= 0.33) & (av_ <= 1.0)) | ((av_ <= 0.33) & (au <= 1.0))
        case "ring":
            r2 = u**2 + v**2
            return (r2 <= 1.0) & (r2 >= 0.5**2)
        case "diamond":
            return au + av_ <= 1.15
        case "bar":
            return (au <= 1.1) & (av_ <= 0.42)
        case "x":
            a, b = np.abs(u + v) / math.sqrt(2), np.abs(u - v) / math.sqrt(2)
            return ((a <= 0.3) & (b <= 1.05)) | ((b <= 0.3) & (a <= 1.05))
    raise ValueError(shape)


def _trajectory(motion: str, rng: np.random.Generator, t: np.ndarray, size: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (x, y) and radius over the segment's time t (seconds from its start)."""
    c = (size - 1) / 2
    reach = size / 2 - 1.1 * radius - 1  # how far the centre may move from the middle
    period = rng.uniform(2.5, 5.0)
    w = 2 * math.pi * t / period + rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.4, 0.4, size=2) * reach
    r = np.full_like(t, radius)
    match motion:
        case "sway":
            x, y = c + reach * np.sin(w), c + offset[1] + 0 * t
        case "bob":
            x, y = c + offset[0] + 0 * t, c + reach * np.sin(w)
        case "orbit":
            x, y = c + 0.8 * reach * np.cos(w), c + 0.8 * reach * np.sin(w)
        case "pulse":
            r = radius * (0.95 + 0.2 * np.sin(w))
            x, y = c + offset[0] * 0.5 + 0 * t, c + offset[1] * 0.5 + 0 * t
        case "diagonal":
            s = (2 / math.pi) * np.arcsin(np.sin(w))  # triangle wave in [-1, 1]
            x, y = c + 0.7 * reach * s, c + 0.7 * reach * s
        case "eight":
            x, y = c + reach * np.sin(w), c + 0.8 * reach * np.sin(2 * w)
        case _:
            raise ValueError(motion)
    return x, y, r


def _draw(rng: np.random.Generator, canvas: np.ndarray, label: int, fps: float) -> None:
    """Draw one action instance into canvas (T, H, W, 3) in place."""
    frames, size = canvas.shape[:2]
    shape, motion = SHAPES[CLASSES[label][0]], MOTIONS[CLASSES[label][1]]
    radius = SHAPE_RADIUS * size
    x, y, r = _trajectory(motion, rng, np.arange(frames) / fps, size, radius)
    grid = np.arange(size, dtype=np.float32)
    u = (grid[None, None, :] - x[:, None, None]) / r[:, None, None]
    v = (grid[None, :, None] - y[:, None, None]) / r[:, None, None]
    mask = _shape_mask(shape, u, v)
    colour = _hsv_to_rgb(np.array(rng.uniform()), np.array(rng.uniform(0.8, 1.0)), np.array(rng.uniform(0.85, 1.0)))
    canvas[mask] = colour.astype(np.float32)


def _distractors(rng: np.random.Generator, canvas: np.ndarray, fps: float, count: int = 2) -> None:
    """Small bright dots wandering over the whole video (not actions)."""
    frames, size = canvas.shape[:2]
    t = np.arange(frames) / fps
    grid = np.arange(size, dtype=np.float32)
    for _ in range(count):
        cx = (size - 1) / 2 + 0.4 * size * np.sin(2 * math.pi * t / rng.uniform(7, 15) + rng.uniform(0, 2 * math.pi))
        cy = (size - 1) / 2 + 0.4 * size * np.sin(2 * math.pi * t / rng.uniform(7, 15) + rng.uniform(0, 2 * math.pi))
        r = max(1.0, 0.04 * size)
        mask = (grid[None, None, :] - cx[:, None, None]) ** 2 + (grid[None, :, None] - cy[:, None, None]) ** 2 <= r**2
        canvas[mask] = _hsv_to_rgb(np.array(rng.uniform()), np.array(0.9), np.array(1.0)).astype(np.float32)


def render_video(cfg: SynthConfig, index: int) -> tuple[np.ndarray, list[Segment]]:
    """Video `index` of the dataset: uint8 frames (T, size, size, 3) and its action segments."""
    rng = np.random.default_rng([cfg.seed, index])
    frames = num_frames(cfg)
    segments = _segments(rng, frames, cfg.classes)
    canvas = _background(rng, frames, cfg.size, cfg.fps)
    _distractors(rng, canvas, cfg.fps)
    for seg in segments:  # the action is drawn over the distractors
        _draw(rng, canvas[seg.start_frame:seg.end_frame], seg.label, cfg.fps)
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), segments


def num_frames(cfg: SynthConfig) -> int:
    return max(1, round(cfg.duration_s * cfg.fps))


# --------------------------------------------------------------------------------------------
# encoding and writing


def encode_mp4(frames_THW3: np.ndarray, fps: float) -> bytes:
    """h264 (yuv420p) mp4 bytes of uint8 RGB frames with even height and width.

    A keyframe every GOP_SECONDS (scene-cut keyframes off, no B-frames): sparse sampling then
    decodes at most fps * GOP_SECONDS frames per sampled frame after a seek, at the price of
    slightly larger files than x264's default 250-frame GOP (negligible at this resolution)."""
    rate = Fraction(fps).limit_denominator(1001)
    gop = max(1, round(fps * GOP_SECONDS))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={
            "crf": "18", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"})
        stream.codec_context.width = frames_THW3.shape[2]
        stream.codec_context.height = frames_THW3.shape[1]
        stream.codec_context.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic bytes; videos are encoded in parallel instead
        for i, rgb in enumerate(frames_THW3):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _make_video(cfg: SynthConfig, index: int) -> tuple[bytes, list[Segment]]:
    frames, segments = render_video(cfg, index)
    return encode_mp4(frames, cfg.fps), segments


def video_id(cfg: SynthConfig, index: int) -> str:
    return f"v_{index:0{max(4, len(str(cfg.videos - 1)))}d}"


def annotations(cfg: SynthConfig, segments: list[list[Segment]]) -> dict:
    """The ActivityNet-format annotation tree of the dataset (the last val_videos are validation)."""
    names = class_names(cfg.classes)
    frames = num_frames(cfg)
    database = {}
    for i, segs in enumerate(segments):
        database[video_id(cfg, i)] = {
            "subset": "validation" if i >= cfg.videos - cfg.val_videos else "training",
            "duration": frames / cfg.fps,
            "fps": cfg.fps,
            "resolution": f"{cfg.size}x{cfg.size}",
            "annotations": [{"segment": [s.start_frame / cfg.fps, s.end_frame / cfg.fps], "label": names[s.label]} for s in segs],
        }
    return {
        "version": "re2tal-synth-1",
        "taxonomy": [{"nodeId": k, "nodeName": name, "parentId": None, "parentName": None} for k, name in enumerate(names)],
        "database": database,
        "synth": cfg.model_dump(),
    }


def _put(fs, path: str, data: bytes) -> None:
    """Write to a temporary name next to `path`, then move into place, so a reader never sees a
    partial file under the final name."""
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def write_synthetic(url: str, cfg: SynthConfig, storage: StorageConfig, *, annotations_name: str = "annotations.json",
                    videos_url: str | None = None, processes: int | None = None) -> None:
    """Write the dataset: `<videos_url or url>/<vid>.mp4` for every video, then
    `<url>/<annotations_name>` last, so an interrupted run never leaves a dataset that looks
    complete. Refuses to overwrite an existing annotation file. `processes`: rendering + encoding
    processes (default: one per 8 videos, at most one per available CPU and 8)."""
    fs, root = filesystem(url, storage)
    vfs, vroot = filesystem(videos_url or url, storage)
    ann_path = posixpath.join(root, annotations_name)
    try:
        if fs.exists(ann_path):
            raise BadInput(f"{url.rstrip('/')}/{annotations_name}: already exists; choose another destination or delete it")
        for f, path, u in ((fs, root, url), (vfs, vroot, videos_url or url)):
            if protocol(u) == "file":  # object stores have no folders to make
                f.makedirs(path, exist_ok=True)
        if processes is None:  # starting a process costs ~1.5 s, a video ~0.3 s of CPU (debug defaults)
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            processes = min(8, cpus, max(1, cfg.videos // 8))
        segments = []
        for index, (data, segs) in enumerate(_videos(cfg, processes)):
            _put(vfs, posixpath.join(vroot, f"{video_id(cfg, index)}.mp4"), data)
            segments.append(segs)
        _put(fs, ann_path, json.dumps(annotations(cfg, segments), indent=1).encode())
    except OSError as err:
        raise BadInput(f"{url}: cannot write the synthetic dataset ({type(err).__name__}: {err})") from None


def _videos(cfg: SynthConfig, processes: int):
    """(mp4 bytes, segments) of each video in index order, made by `processes` processes."""
    if processes <= 1 or cfg.videos <= 1:
        yield from (_make_video(cfg, i) for i in range(cfg.videos))
        return
    # spawn, not fork: the caller may be a multithreaded training driver
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_make_video, [cfg] * cfg.videos, range(cfg.videos), chunksize=max(1, cfg.videos // (4 * processes)))


def ensure_synthetic(data: DataConfig, storage: StorageConfig) -> bool:
    """If `data.synth` is set and `data.annotations` does not exist, write the synthetic dataset
    there (videos into `data.video_root` if set, else next to the annotations). Returns whether
    it wrote; a second call is a no-op. A synthetic set made with other settings (an older demo
    config) is BadInput, not silently reused nor overwritten."""
    if data.synth is None:
        return False
    fs, path = filesystem(data.annotations, storage)
    if fs.exists(path):
        try:
            made = json.loads(fs.cat_file(path)).get("synth")
        except (OSError, ValueError, AttributeError):
            return False  # not ours to judge: loading the annotations reports what is wrong
        wanted = data.synth.model_dump(mode="json")
        if made is not None and made != wanted:
            diff = ", ".join(f"{k} {made.get(k)} (config: {v})" for k, v in wanted.items() if made.get(k) != v)
            raise BadInput(f"data.annotations: {data.annotations} is a synthetic set made with other settings ({diff}); "
                           "delete it (and its videos) to have it rewritten, or point data.annotations elsewhere")
        return False
    if data.video_ext != "mp4":
        raise BadInput(f"data.video_ext: the synthetic dataset writes mp4 files, got {data.video_ext!r}")
    folder, _, name = data.annotations.rstrip("/").rpartition("/")
    if clip_annotations(name):  # a recognition set: the TAL set's annotations.json next to it, then the clips
        tal = DataConfig(annotations=f"{folder or '.'}/{SYNTH_TAL_NAME}", video_root=data.video_root, synth=data.synth)
        ensure_synthetic(tal, storage)
        write_clips(folder or ".", storage, clips_name=name)
        return True
    write_synthetic(folder or ".", data.synth, storage, annotations_name=name, videos_url=data.video_root)
    return True


SYNTH_TAL_NAME = "annotations.json"
SYNTH_CLIPS_NAME = "clips.csv"


def write_clips(url: str, storage: StorageConfig, clips_name: str = SYNTH_CLIPS_NAME, tal_name: str = SYNTH_TAL_NAME) -> int:
    """`<url>/<clips_name>`: the recognition clips cut from the TAL set `<url>/<tal_name>` (each
    action a clip of its class, each gap of at least a second a `background` clip; see
    re2tal.data.clips), which refer to the TAL set's videos by id. Returns the number of clips."""
    from re2tal.data.clips import clips_csv, clips_from_detection

    fs, root = filesystem(url, storage)
    try:
        rows = clips_from_detection(json.loads(fs.cat_file(posixpath.join(root, tal_name))))
        _put(fs, posixpath.join(root, clips_name), clips_csv(rows))
    except OSError as err:
        raise BadInput(f"{url}: cannot write the synthetic clips ({type(err).__name__}: {err})") from None
    return len(rows)


# --------------------------------------------------------------------------------------------
# CLI


def main(args: argparse.Namespace) -> int:
    """`re2tal data synth`: storage credentials and endpoint come from the standard AWS
    environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_S3, ...)."""
    try:
        cfg = SynthConfig(videos=args.videos, val_videos=args.val_videos, classes=args.classes,
                          duration_s=args.duration, fps=args.fps, size=args.size, seed=args.seed)
    except ValidationError as err:  # name the flag, not the config key
        flags = {"duration_s": "--duration", "val_videos": "--val-videos"}
        raise BadInput(re.sub(r"\b(\w+): ", lambda m: f"{flags.get(m[1], '--' + m[1])}: " if m[1] in SynthConfig.model_fields else m[0],
                              format_error(err))) from None
    start = time.perf_counter()
    write_synthetic(args.out, cfg, StorageConfig())
    train = cfg.videos - cfg.val_videos
    print(f"wrote {cfg.videos} videos ({train} training, {cfg.val_videos} validation, {cfg.classes} classes, "
          f"{num_frames(cfg)} frames of {cfg.size}x{cfg.size} at {cfg.fps:g} fps) and annotations.json to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    if args.clips:
        clips = write_clips(args.out, StorageConfig())
        print(f"wrote {clips} recognition clips ({cfg.classes} classes + background) cut from them to "
              f"{args.out.rstrip('/')}/{SYNTH_CLIPS_NAME}")
    return 0
