"""`re2tal extract`: clip features of every video of a collection by a backbone (any
`backbone.name`, any `backbone.pretrained`, e.g. a file `re2tal finetune` wrote), for the
feature-based heads (ActionFormer, BMN, OpenTAD's feature configs; `data.features`), as one Ray
Data job (re2tal.raydata.inference).

The clips are those of `extract` (see ExtractConfig): clip k holds the frames
k * clip_stride + j * frame_interval (j < clip_frames) of the video's frame grid, which is its own
frames, or with `extract.fps` the frame on screen at (m + 0.5) / fps for grid frame m. A clip's
feature is the backbone's output averaged over time and space (the pooled features the detection
head reads). Output under DIR, the layout feature-based configs read:

    <video_id>.npy     float16 (clips, channels), time first
    parts/<id>.json    written after the array: {"video", "url", "record": {"clips", "channels",
                       "fps" (of the grid), "frames" (of the grid), "duration" (s)}}; a video is
                       done when it exists, so a rerun does only the rest
    features.json      written at the end: clip_frames, clip_stride, frame_interval (in grid
                       frames), fps (extract.fps, or the videos' rate when they all share one, else
                       null: see each video's), frame_size, short_side, channels, dtype, backbone
                       (its config), weights (backbone.pretrained), and "videos": {id: record}
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Iterator

import numpy as np
import torch

from re2tal.config import Config, ExtractConfig
from re2tal.data.annotations import Video
from re2tal.errors import BadInput
from re2tal.raydata import inference
from re2tal.raydata.inference import Inference, Result, Unit

FEATURES = "features.json"
DEFAULT_BATCH = 32  # clips per model call (inference.batch_size)


def clip_grid(frames: int, e: ExtractConfig) -> np.ndarray:
    """(clips, clip_frames) grid-frame indices of every whole clip of a grid of `frames` frames
    (one clip, its last frame repeated, if the grid is shorter than a clip)."""
    span = (e.clip_frames - 1) * e.frame_interval
    count = (frames - 1 - span) // e.clip_stride + 1 if frames - 1 >= span else 1
    idx = np.arange(count)[:, None] * e.clip_stride + np.arange(e.clip_frames)[None, :] * e.frame_interval
    return np.minimum(idx, frames - 1)


class Extract(Inference):
    """Units are clips; an output is a clip's pooled feature vector (float16)."""

    name = "extract"

    def __init__(self, cfg: Config, backbone_ref, out: str, chunk: int):
        self.cfg, self.backbone_ref, self.out, self.chunk = cfg, backbone_ref, out.rstrip("/"), chunk

    def units(self, video: Video) -> Iterator[list[Unit]]:
        from re2tal.data.video import VideoFile, VideoSource

        e = self.cfg.extract
        with VideoSource(self.cfg.storage).acquire(video.url) as lease:
            file = VideoFile(lease.path, self.cfg.data.short_side, threads=1)
            info = file.info
            if e.fps is None:
                frames, fps, source = info.frames, info.fps, np.arange(info.frames)
            else:
                frames, fps = max(1, round(info.duration * e.fps)), e.fps
                source = file.indices((np.arange(frames) + 0.5) / e.fps)
            clips = source[clip_grid(frames, e)]
            meta = {"fps": fps, "frames": frames, "duration": info.duration}
            for start in range(0, len(clips), self.chunk):
                chunk = clips[start: start + self.chunk]
                flat = file.read(chunk.reshape(-1))  # (clips x clip_frames, H, W, 3)
                decoded = flat.reshape(*chunk.shape, *flat.shape[1:])
                yield [Unit(start + k, len(clips), decoded[k], meta) for k in range(len(chunk))]

    def model(self, device: str) -> Callable[[list[Unit]], list[np.ndarray]]:
        import ray

        from re2tal.tasks.localization import model_input

        cfg, backbone = self.cfg, ray.get(self.backbone_ref).to(device).eval()
        dtype = next(backbone.parameters()).dtype

        def apply(units: list[Unit]) -> list[np.ndarray]:
            frames = torch.cat([model_input(torch.from_numpy(u.frames)[None], cfg, device, dtype) for u in units])
            with torch.no_grad():
                feats_BC = backbone(frames).float().mean(dim=(2, 3, 4))
            return list(feats_BC.to(torch.float16).cpu().numpy())

        return apply

    def part(self, video: Video, metas: list[dict], outputs: list[Any]) -> tuple[dict, list]:
        array = np.stack(outputs)
        buf = io.BytesIO()
        np.save(buf, array)
        return {"clips": len(array), "channels": array.shape[1], **metas[0]}, [(array_url(self.out, video.id), buf.getvalue())]


def array_url(out: str, video_id: str) -> str:
    return f"{out.rstrip('/')}/{video_id}.npy"


def extract(cfg: Config, videos: list[Video], out: str, progress: bool = True) -> tuple[dict[str, Any], Result]:
    """Features of every video of the collection that has none under `out` yet, then
    `<out>/features.json` for all of them; (what features.json holds, the job's result)."""
    import ray

    from re2tal.backbones import build_backbone
    from re2tal.raycluster import init_ray

    e, d = cfg.extract, cfg.data
    stride = cfg.backbone.frame_multiple
    if e.clip_frames % stride:
        raise BadInput(f"extract.clip_frames: {e.clip_frames} is not divisible by {stride}, {cfg.backbone.name}'s "
                       f"{'chunk_frames' if stride != cfg.backbone.temporal_stride else 'temporal stride'}")
    backbone = build_backbone(cfg.backbone, cfg.storage).eval()  # here: a bad backbone.pretrained stops the job before it starts
    init_ray()
    job = Extract(cfg, ray.put(backbone), out, cfg.inference.batch_size or DEFAULT_BATCH)
    result = inference.run(job, videos, f"{out.rstrip('/')}/parts", cfg.storage, cfg.inference, batch_size=job.chunk,
                           unit_bytes=e.clip_frames * d.short_side * d.short_side * 16 // 9 * 3, progress=progress)
    records = {v.id: result.records[v.id] for v in videos if v.id in result.records}
    rates = {r["fps"] for r in records.values()}
    features = {"clip_frames": e.clip_frames, "clip_stride": e.clip_stride, "frame_interval": e.frame_interval,
                "fps": e.fps if e.fps is not None else rates.pop() if len(rates) == 1 else None,
                "frame_size": d.frame_size, "short_side": d.short_side, "channels": backbone.out_channels, "dtype": "float16",
                "layout": "(clips, channels)", "backbone": cfg.backbone.model_dump(mode="json"), "weights": cfg.backbone.pretrained,
                "videos": records}
    inference.write(f"{out.rstrip('/')}/{FEATURES}", json.dumps(features, indent=1).encode(), cfg.storage)
    return features, result
