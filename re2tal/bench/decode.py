"""`re2tal bench loader --real --json OUT`: what decoding costs at real resolution, raw and
prepared (`re2tal data prepare`), and how it scales over the local cores.

Videos: 2 minutes, 30 fps h264 at 360p (640x360) and 720p (1280x720), made once with PyAV and
kept under `.cache/bench-videos/` (a panning smooth texture with moving shapes and a little
grain, so that they compress like footage rather than like a still); their prepared copies are
made there too (short side 256, 15 fps, one keyframe a second, as `re2tal data prepare` does).
The sampling is the ActivityNet configs' (uniform, 768 frames, short side 256, temporal jitter).

Per video and kind (raw / prepared):
- `decode_s`: CPU seconds to decode one video's 768 sampled frames (`VideoFile`, one decord
  thread; the median of `REPEATS`), i.e. seconds per video per core, and `frames_per_s` = 768 / decode_s;
- `threads`: videos / s of the threaded loader (`VideoDataset`) with data.loader_threads
  1..cores, each over 2 x threads copies of the video;
- `ray_data`: videos / s of the ray_data loader over a local Ray with all cores.
Per video: `prepare_s`, the CPU seconds `re2tal data prepare` takes for it (one core), and bytes.
The scaling figures are wall-clock throughput, so they depend on what else the machine runs
(`load_average_after` is recorded).

`cores_per_gpu` = decode_s / GPU_S_PER_VIDEO: the CPU cores that keep one GPU busy. No GPU step
time is measured yet (`re2tal bench gpu` has not run on the paper's configs): GPU_S_PER_VIDEO
assumes 0.1 s per video for Re²Swin-T at 768x224² on an H100 (about 8-17 TFLOPs of forward,
recomputation and backward per video at 30-40 % of its 989 TFLOP/s bf16 peak).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from re2tal.config import Config, validate

RESOLUTIONS = {"360p": (360, 640), "720p": (720, 1280)}
DURATION_S, FPS, NUM_FRAMES, SHORT_SIDE = 120, 30, 768, 256
REPEATS = 2
GPU_S_PER_VIDEO = 0.1
DETAIL_PX, GRAIN = 1.5, 10  # texture detail (px) and grain (+- grey levels): bit rates like real footage's


def source_video(folder: Path, name: str) -> Path:
    """The 2-minute 30 fps video at `name`'s resolution, made on first use."""
    path = folder / f"{name}_{DURATION_S}s_{FPS}fps.mp4"
    if not path.exists():
        part = path.with_suffix(f".part{os.getpid()}")
        write_footage(part, *RESOLUTIONS[name], DURATION_S)
        os.replace(part, path)
    return path


def write_footage(path: Path, height: int, width: int, seconds: float) -> None:
    """h264 at x264's default quality of a panning textured scene with moving shapes and grain."""
    import av

    rng = np.random.default_rng(0)
    # a textured scene twice the frame size (detail of a few pixels), panned across: camera motion
    noise = rng.standard_normal((2 * height, 2 * width, 3))
    fy = np.fft.fftfreq(2 * height)[:, None, None]
    fx = np.fft.fftfreq(2 * width)[None, :, None]
    texture = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * np.exp(-(fx**2 + fy**2) * (DETAIL_PX * 2) ** 2), axes=(0, 1)))
    texture = ((texture - texture.min()) / np.ptp(texture) * 200 + 20).astype(np.int16)
    grains = rng.integers(-GRAIN, GRAIN + 1, (17, height, width, 3), dtype=np.int16)  # cycled: drawing it is the slow part
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "23", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(int(seconds * FPS)):
            t = k / FPS
            y, x = int((height / 2) * (1 + np.sin(t / 3))), int((width / 2) * (1 + np.sin(t / 4)))
            img = texture[y: y + height, x: x + width].copy()
            for j in range(3):  # moving shapes
                cy = int(height * (0.5 + 0.4 * np.sin(t * (0.7 + j) + j)))
                cx = int(width * (0.5 + 0.4 * np.cos(t * (0.5 + j / 2) + 2 * j)))
                r = height // 8
                img[max(0, cy - r): cy + r, max(0, cx - r): cx + r] = (60 * j + 40, 255 - 70 * j, 120)
            img = np.clip(img + grains[k % len(grains)], 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))


def prepared_video(folder: Path, source: Path) -> tuple[Path, float]:
    """The prepared copy of `source` (made on first use) and the CPU seconds making it took."""
    from re2tal.data.prepare import Settings, transcode

    path = source.with_name(source.stem + f".prepared{SHORT_SIDE}_15fps.mp4")
    if path.exists():
        return path, float(json.loads(path.with_suffix(".json").read_text())["seconds"])
    part = path.with_suffix(f".part{os.getpid()}.mp4")
    started = time.process_time()  # CPU seconds: on a shared machine wall time says more about the neighbours
    transcode(str(source), str(part), Settings(short_side=SHORT_SIDE, fps=15, gop=15), threads=1)
    seconds = time.process_time() - started
    os.replace(part, path)
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def config(annotations: str, threads: int, loader: str = "threads") -> Config:
    return validate({"data": {"annotations": annotations, "sampling": "uniform", "num_frames": NUM_FRAMES, "frame_size": 224,
                              "short_side": SHORT_SIDE, "loader_threads": threads, "prefetch_videos": 1, "loader": loader},
                     "head": {"num_classes": 1}})


def decode_seconds(path: Path) -> float:
    """CPU seconds to decode one video's sampled frames with one decoding thread (median of REPEATS)."""
    from re2tal.data import sampling
    from re2tal.data.video import VideoFile

    runs = []
    for r in range(REPEATS):
        started = time.process_time()  # CPU seconds of this process (decord's threads included)
        video = VideoFile(str(path), SHORT_SIDE, threads=1)
        times = sampling.sample_times(sampling.uniform_window(video.info.duration, NUM_FRAMES), NUM_FRAMES, np.random.default_rng(r))
        frames = video.read(video.indices(times))
        runs.append(time.process_time() - started)
        assert frames.shape[0] == NUM_FRAMES and min(frames.shape[1:3]) == SHORT_SIDE
    return statistics.median(runs)


def annotations_of(folder: Path, path: Path, copies: int) -> str:
    """An annotation file of `copies` training videos, all the file at `path`."""
    ann = folder / f"{path.stem}.x{copies}.json"
    ann.write_text(json.dumps({"database": {f"v{i}": {"subset": "training", "duration": float(DURATION_S), "url": str(path.resolve()),
                                                      "annotations": [{"segment": [10.0, 20.0], "label": "a"}]}
                                            for i in range(copies)}}))
    return str(ann)


def threaded_videos_per_s(folder: Path, path: Path, threads: int) -> float:
    from re2tal.data.dataset import VideoDataset

    cfg = config(annotations_of(folder, path, 2 * threads), threads)
    started = time.perf_counter()
    count = sum(1 for _ in VideoDataset(cfg, "training", training=True, seed=0))
    assert count == 2 * threads, f"{path}: decoded {count} of {2 * threads} videos"
    return count / (time.perf_counter() - started)


def ray_data_videos_per_s(folder: Path, path: Path, cores: int) -> float:
    from re2tal.data.annotations import load_annotations
    from re2tal.raydata.loader import make_cursor, name, shard_batches, training_datasets

    cfg = config(annotations_of(folder, path, 2 * cores), 1, loader="ray_data")
    ann = load_annotations(cfg.data, cfg.storage)
    cursor = make_cursor()
    datasets, _ = training_datasets(cfg, ann, 1, cursor)
    started = time.perf_counter()
    count = sum(1 for _ in shard_batches(cfg, cursor, 0, 0, 0, 2 * cores, datasets[name(0)].iterator()))
    return count / (time.perf_counter() - started)


def run(folder: Path, cores: int) -> dict[str, Any]:
    import ray

    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for res in RESOLUTIONS:
        source = source_video(folder, res)
        prepared, prepare_s = prepared_video(folder, source)
        entry: dict[str, Any] = {"prepare_s": prepare_s, "source_bytes": source.stat().st_size, "prepared_bytes": prepared.stat().st_size}
        for kind, path in (("raw", source), ("prepared", prepared)):
            seconds = decode_seconds(path)
            entry[kind] = {"decode_s": seconds, "frames_per_s": NUM_FRAMES / seconds, "cores_per_gpu": seconds / GPU_S_PER_VIDEO,
                           "threads": {t: threaded_videos_per_s(folder, path, t) for t in range(1, cores + 1)}}
        results[res] = entry
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for res, entry in results.items():
            for kind in ("raw", "prepared"):
                path = source_video(folder, res) if kind == "raw" else prepared_video(folder, source_video(folder, res))[0]
                entry[kind]["ray_data"] = ray_data_videos_per_s(folder, path, cores)
    finally:
        ray.shutdown()
    return {"config": {"duration_s": DURATION_S, "fps": FPS, "num_frames": NUM_FRAMES, "short_side": SHORT_SIDE,
                       "prepared": {"short_side": SHORT_SIDE, "fps": 15, "gop": 15}, "gpu_s_per_video_assumed": GPU_S_PER_VIDEO,
                       "cores": cores, "cpus": os.cpu_count(), "load_average_after": os.getloadavg()},
            "results": results}


def table(result: dict[str, Any]) -> str:
    """The README's markdown table."""
    cores = result["config"]["cores"]
    lines = ["| video | kind | MB | decode s / video / core | frames / s / core | videos / s: threads " +
             " / ".join(str(t) for t in range(1, cores + 1)) + f" | videos / s: Ray Data ({cores} cores) | cores per GPU at "
             f"{result['config']['gpu_s_per_video_assumed']:g} s / video |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res, e in result["results"].items():
        for kind in ("raw", "prepared"):
            k = e[kind]
            mb = (e["source_bytes"] if kind == "raw" else e["prepared_bytes"]) / 1e6
            name = f"{res} 30 fps" if kind == "raw" else f"{res} -> 256 px 15 fps ({e['prepare_s']:.0f} s to prepare)"
            lines.append(f"| {name} | {kind} | {mb:.0f} | {k['decode_s']:.2f} | {k['frames_per_s']:.0f} | "
                         + " / ".join(f"{v:.2f}" for v in k["threads"].values()) + f" | {k['ray_data']:.2f} | {k['cores_per_gpu']:.0f} |")
    return "\n".join(lines)


def main(args) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    result = run(Path(".cache/bench-videos").resolve(), cores)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"-> {out}")
    return 0
