"""`re2tal bench loader --json OUT`: frames/s the data loader delivers, from local files and from
an S3 endpoint (a moto server on loopback, reached through s3fs), with a cold and a warm cache,
and the bytes fetched from storage per epoch.

The sampling config is the debug run's (uniform, 64 frames of 64x64 per 60 s video at 10 fps, one
decoding thread, two videos prefetched, temporal jitter on). The videos are written here with
PyAV: a textured background with a moving square, so they compress like real footage rather
than like a still. Local and warm-cache epochs alternate so that drift in machine load hits both
alike; each figure is the median over its epochs.

Targets: warm-cache S3 throughput >= 0.9x local; bytes fetched per epoch <= 1.05x the dataset's
size (a cold epoch fetches each video once; a warm one fetches nothing).
"""

from __future__ import annotations

import argparse
import fractions
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from re2tal.config import Config, validate
from re2tal.data.annotations import load_annotations
from re2tal.data.dataset import VideoDataset
from re2tal.data.video import VideoSource
from re2tal.errors import BadInput

VIDEOS, DURATION_S, FPS, SIZE = 16, 60.0, 10, 64
DATA = {"sampling": "uniform", "num_frames": 64, "frame_size": 64, "loader_threads": 1, "prefetch_videos": 2}
REPEATS = 8
COLD_REPEATS = 3


def write_video(path: Path, seed: int) -> None:
    """A 60 s, 10 fps, 64x64 h264 video: noisy texture, a square moving across it."""
    import av

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    frames = int(DURATION_S * FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fractions.Fraction(FPS))
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            img = np.roll(background, k // 4, axis=1)
            y, x = (k * 3) % (SIZE - 16), (k * 5) % (SIZE - 16)
            img[y: y + 16, x: x + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def epoch(cfg: Config, source: VideoSource, ann, index: int) -> tuple[float, int]:
    """(frames per second delivered, bytes fetched from storage) for one epoch on one worker."""
    before = source.cache.stats.snapshot()["bytes_fetched"] if not _local(cfg) else 0
    started = time.perf_counter()
    frames = sum(clip["frames"].shape[0] for clip in VideoDataset(cfg, "training", 0, 1, index, seed=0, training=True,
                                                                   annotations=ann, source=source))
    seconds = time.perf_counter() - started
    fetched = source.cache.stats.snapshot()["bytes_fetched"] - before if not _local(cfg) else 0
    return frames / seconds, fetched


def _local(cfg: Config) -> bool:
    return not cfg.data.annotations.startswith("s3://")


def run(workdir: Path) -> dict[str, Any]:
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        raise BadInput(f"bench loader needs the test extras (moto[server]): pip install -e '.[test]' ({err})") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request otherwise

    videos = workdir / "videos"
    videos.mkdir()
    database = {}
    for i in range(VIDEOS):
        write_video(videos / f"v{i:02d}.mp4", seed=i)
        database[f"v{i:02d}"] = {"subset": "training", "duration": DURATION_S, "annotations": [{"segment": [10.0, 20.0], "label": "move"}]}
    (videos / "annotations.json").write_text(json.dumps({"database": database}))
    dataset_bytes = sum(p.stat().st_size for p in videos.glob("*.mp4"))

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        keys = {"access_key_id": "bench", "secret_access_key": "bench"}
        fs = s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(videos) + "/", "bench/videos/", recursive=True)

        def config(annotations: str, cache: str, cache_gb: float = 20.0) -> Config:
            return validate({"data": {"annotations": annotations, **DATA}, "head": {"num_classes": 1},
                             "backbone": {"depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "embed_dim": 24},
                             "storage": {"endpoint_url": endpoint, "region": "us-east-1", **keys, "cache_dir": cache, "cache_max_gb": cache_gb}})

        local_cfg = config(str(videos / "annotations.json"), str(workdir / "unused"))
        local = VideoSource(local_cfg.storage)
        local_ann = load_annotations(local_cfg.data, local_cfg.storage)
        epoch(local_cfg, local, local_ann, 0)  # page cache and imports warm, as for every S3 epoch below

        cold_runs, cold_bytes = [], []
        for r in range(COLD_REPEATS):
            cfg = config("s3://bench/videos/annotations.json", str(workdir / f"cold{r}"))
            ann = load_annotations(cfg.data, cfg.storage)
            fps, fetched = epoch(cfg, VideoSource(cfg.storage), ann, 0)
            cold_runs.append(fps)
            cold_bytes.append(fetched)

        warm_cfg = config("s3://bench/videos/annotations.json", str(workdir / "warm"))
        warm = VideoSource(warm_cfg.storage)
        warm_ann = load_annotations(warm_cfg.data, warm_cfg.storage)
        epoch(warm_cfg, warm, warm_ann, 0)  # fills the cache
        local_runs, warm_runs, warm_bytes = [], [], []
        for r in range(REPEATS):
            local_runs.append(epoch(local_cfg, local, local_ann, r + 1)[0])
            fps, fetched = epoch(warm_cfg, warm, warm_ann, r + 1)
            warm_runs.append(fps)
            warm_bytes.append(fetched)

        # A cache holding half the dataset: LRU over a fresh permutation each epoch.
        small_cfg = config("s3://bench/videos/annotations.json", str(workdir / "small"), cache_gb=dataset_bytes / 2 / 1e9)
        small = VideoSource(small_cfg.storage)
        small_bytes = [epoch(small_cfg, small, warm_ann, r)[1] for r in range(3)]
    finally:
        server.stop()

    local_fps, warm_fps, cold_fps = (statistics.median(x) for x in (local_runs, warm_runs, cold_runs))
    cold_ratio = max(cold_bytes) / dataset_bytes
    return {
        "config": {"videos": VIDEOS, "duration_s": DURATION_S, "fps": FPS, "size": SIZE, **DATA, "temporal_jitter": True,
                   "workers": 1, "storage": "moto S3 server on 127.0.0.1 via s3fs"},
        "dataset_bytes": dataset_bytes,
        "local": {"frames_per_s": local_fps, "runs": local_runs},
        "s3_cold": {"frames_per_s": cold_fps, "runs": cold_runs, "bytes_fetched_per_epoch": cold_bytes, "bytes_ratio": cold_ratio},
        "s3_warm": {"frames_per_s": warm_fps, "runs": warm_runs, "bytes_fetched_per_epoch": warm_bytes,
                    "bytes_ratio": max(warm_bytes) / dataset_bytes},
        "s3_half_size_cache": {"bytes_fetched_per_epoch": small_bytes, "bytes_ratio": [b / dataset_bytes for b in small_bytes]},
        "warm_over_local": warm_fps / local_fps,
        "cold_over_local": cold_fps / local_fps,
        "targets": {"warm_over_local_min": 0.9, "bytes_ratio_max": 1.05,
                    "warm_over_local_met": warm_fps / local_fps >= 0.9, "bytes_ratio_met": max(cold_ratio, max(warm_bytes) / dataset_bytes) <= 1.05},
        "machine": {"cpus": os.cpu_count()},
    }


def main(args: argparse.Namespace) -> int:
    if getattr(args, "real", False):  # real-resolution decode costs, raw vs prepared (re2tal.bench.decode)
        from re2tal.bench.decode import main as real

        return real(args)
    with tempfile.TemporaryDirectory(prefix="re2tal-bench-loader-") as tmp:
        result = run(Path(tmp))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"loader: local {result['local']['frames_per_s']:.0f} frames/s, S3 cold {result['s3_cold']['frames_per_s']:.0f}, "
          f"warm {result['s3_warm']['frames_per_s']:.0f} ({result['warm_over_local']:.2f}x local); bytes per epoch "
          f"cold {result['s3_cold']['bytes_ratio']:.3f}x, warm {result['s3_warm']['bytes_ratio']:.3f}x the dataset -> {out}")
    return 0
