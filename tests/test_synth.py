"""Synthetic dataset: real mp4 files whose decoded frames show the annotated actions, ActivityNet
annotations, determinism, atomic writing (ensure_synthetic), S3 through a real moto server, CLI."""

import io
import json
import os
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path

import av
import boto3
import decord
import numpy as np
import pytest
import s3fs

from re2tal.config import DataConfig, StorageConfig, SynthConfig
from re2tal.data import synth
from re2tal.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
# 3 classes: disk, square, triangle; 8 s at 10 fps, 64x64
SMALL = SynthConfig(videos=4, val_videos=1, classes=3, duration_s=8.0, fps=10.0, size=64, seed=3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.write_synthetic(str(out), SMALL, StorageConfig(), processes=1)
    return out


def decode_all(source) -> tuple[np.ndarray, list[bool]]:
    """RGB frames (T, H, W, 3) and per-frame keyframe flags, decoded with PyAV."""
    with av.open(source) as container:
        frames = [(f.to_ndarray(format="rgb24"), f.key_frame) for f in container.decode(video=0)]
    return np.stack([f for f, _ in frames]), [k for _, k in frames]


def bright(rgb: np.ndarray) -> np.ndarray:
    """Saturated, bright pixels: the drawn shapes and the small distractor dots (the background
    texture is low-saturation and mid-dark)."""
    mx, mn = rgb.max(-1).astype(float), rgb.min(-1).astype(float)
    return (mx > 0.7 * 255) & (mx - mn > 0.55 * mx)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component."""
    seen, best = np.zeros_like(mask), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            a, b = queue.popleft()
            comp.append((a, b))
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < mask.shape[0] and 0 <= d < mask.shape[1] and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    queue.append((c, d))
        best = max(best, comp, key=len)
    out = np.zeros_like(mask)
    out[tuple(np.array(best).T)] = True
    return out


def shape_of(comp: np.ndarray) -> str:
    """disk / square / triangle: the ideal shape inscribed in the blob's bounding box that
    overlaps it best (IoU)."""
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = comp[y0:y1, x0:x1]
    v, u = np.meshgrid((np.arange(y1 - y0) + 0.5) / (y1 - y0), (np.arange(x1 - x0) + 0.5) / (x1 - x0), indexing="ij")
    ideal = {"disk": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25, "square": np.ones_like(box),
             "triangle": np.abs(u - 0.5) <= v / 2}  # apex up
    return max(ideal, key=lambda k: (ideal[k] & box).sum() / (ideal[k] | box).sum())


def test_files_have_the_configured_frames_fps_duration_and_size(small_set):
    ann = json.loads((small_set / "annotations.json").read_text())
    assert sorted(ann["database"]) == [synth.video_id(SMALL, i) for i in range(4)]
    assert sorted(p.name for p in small_set.iterdir()) == sorted(["annotations.json"] + [f"{v}.mp4" for v in ann["database"]])
    for vid, meta in ann["database"].items():
        reader = decord.VideoReader(str(small_set / f"{vid}.mp4"))  # what the loader decodes with
        assert len(reader) == 80 and reader.get_avg_fps() == pytest.approx(10.0)
        assert reader.get_batch([0, 1]).shape == (2, 64, 64, 3)
        assert meta["duration"] == pytest.approx(len(reader) / reader.get_avg_fps()) == 8.0
        with av.open(str(small_set / f"{vid}.mp4")) as c:
            stream = c.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert float(stream.duration * stream.time_base) == pytest.approx(8.0)
        _, keys = decode_all(str(small_set / f"{vid}.mp4"))
        assert [i for i, k in enumerate(keys) if k] == list(range(0, 80, 10))  # a keyframe every second


def test_annotations_are_activitynet_format_with_valid_segments(small_set):
    ann = json.loads((small_set / "annotations.json").read_text())
    names = [t["nodeName"] for t in ann["taxonomy"]]
    assert names == synth.class_names(3) == ["disk_sway", "square_bob", "triangle_orbit"]
    subsets = Counter(meta["subset"] for meta in ann["database"].values())
    assert subsets == {"training": 3, "validation": 1}
    for meta in ann["database"].values():
        assert meta["fps"] == 10.0 and 1 <= len(meta["annotations"]) <= 4
        segments = [a["segment"] for a in meta["annotations"]]
        assert all(a["label"] in names for a in meta["annotations"])
        gap = 8.0 / 30
        bounds = [0.0 - gap] + [t for s in segments for t in s] + [8.0 + gap]
        assert all(b - a >= gap - 1e-9 for a, b in zip(bounds, bounds[1:]))  # ordered, disjoint, with gaps
        assert all(8.0 / 15 - 0.1 <= e - s <= 8.0 / 3 + 0.1 for s, e in segments)


def test_drawn_actions_match_the_annotations(small_set):
    """A big saturated shape is on screen exactly on the frames of each annotated segment, and
    its shape is the one its label names."""
    ann = json.loads((small_set / "annotations.json").read_text())
    checked = Counter()
    for vid, meta in ann["database"].items():
        frames, _ = decode_all(str(small_set / f"{vid}.mp4"))
        counts = bright(frames).sum((1, 2))
        times = np.arange(len(frames)) / meta["fps"]
        inside = np.zeros(len(frames), bool)
        for a in meta["annotations"]:
            s, e = a["segment"]
            frames_in = (times >= s - 1e-9) & (times < e - 1e-9)
            inside |= frames_in
            shapes = Counter(shape_of(largest_component(bright(f))) for f in frames[frames_in])
            assert shapes.most_common(1)[0][0] == a["label"].split("_")[0], (vid, a, shapes)
            checked[a["label"]] += 1
        # the shape covers ~6% of the frame or more, the two distractor dots ~1%
        assert counts[inside].min() > 0.04 * 64**2 and counts[~inside].max() < 0.02 * 64**2, (vid, counts)
    assert len(checked) >= 2


def test_same_seed_same_bytes_any_process_count_other_seed_differs(small_set, tmp_path):
    synth.write_synthetic(str(tmp_path / "again"), SMALL, StorageConfig(), processes=2)
    for p in small_set.iterdir():
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name
    other = SMALL.model_copy(update={"seed": 4})
    synth.write_synthetic(str(tmp_path / "other"), other, StorageConfig(), processes=1)
    a = json.loads((small_set / "annotations.json").read_text())["database"]
    b = json.loads((tmp_path / "other" / "annotations.json").read_text())["database"]
    assert a != b


def test_ensure_synthetic_writes_once_and_never_leaves_a_complete_looking_partial_set(tmp_path, monkeypatch):
    data = DataConfig(annotations=str(tmp_path / "set" / "anet.json"), synth=SMALL.model_dump())
    # a crash while writing the third video: no annotation file, so the set is not taken as complete
    encode, calls = synth.encode_mp4, []

    def failing(frames, fps):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return encode(frames, fps)

    monkeypatch.setattr(synth, "encode_mp4", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synth.write_synthetic(str(tmp_path / "set"), SMALL, StorageConfig(), annotations_name="anet.json", processes=1)
    assert not (tmp_path / "set" / "anet.json").exists()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["v_0000.mp4", "v_0001.mp4"]
    monkeypatch.undo()

    assert synth.ensure_synthetic(data, StorageConfig()) is True
    files = sorted((tmp_path / "set").iterdir())
    assert [p.name for p in files] == ["anet.json", "v_0000.mp4", "v_0001.mp4", "v_0002.mp4", "v_0003.mp4"]  # no temporaries
    assert max(p.stat().st_mtime_ns for p in files if p.suffix == ".mp4") <= (tmp_path / "set" / "anet.json").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in files}
    assert synth.ensure_synthetic(data, StorageConfig()) is False  # second call: no-op
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set").iterdir()} == before
    assert synth.ensure_synthetic(DataConfig(annotations=str(tmp_path / "none.json")), StorageConfig()) is False
    assert not (tmp_path / "none.json").exists()
    # the same place, other settings (an older demo config): refused, nothing rewritten
    stale = DataConfig(annotations=data.annotations, synth=SMALL.model_copy(update={"videos": 6}).model_dump())
    with pytest.raises(BadInput, match=r"anet.json is a synthetic set made with other settings \(videos 4 \(config: 6\)\)"):
        synth.ensure_synthetic(stale, StorageConfig())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set").iterdir()} == before


def test_ensure_synthetic_writes_videos_under_video_root(tmp_path):
    data = DataConfig(annotations=str(tmp_path / "ann" / "a.json"), video_root=str(tmp_path / "videos"),
                      synth=SMALL.model_copy(update={"videos": 2}).model_dump())
    assert synth.ensure_synthetic(data, StorageConfig())
    assert [p.name for p in (tmp_path / "ann").iterdir()] == ["a.json"]
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["v_0000.mp4", "v_0001.mp4"]


def test_config_limits_match_the_generator():
    assert SynthConfig.model_fields["classes"].metadata[-1].le == synth.MAX_CLASSES == len(set(synth.class_names(synth.MAX_CLASSES)))
    first = synth.CLASSES[: min(len(synth.SHAPES), len(synth.MOTIONS))]
    assert len({s for s, _ in first}) == len({m for _, m in first}) == len(first)  # differ in shape and motion
    for size in (48, 63):
        with pytest.raises(ValueError, match="size"):
            SynthConfig(size=size)
    with pytest.raises(ValueError, match="duration_s"):
        SynthConfig(duration_s=2.0)


# ------------------------------------------------------------------------------------------
# S3 (real moto server on loopback) and CLI


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_storage(endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing")


def s3(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                             skip_instance_cache=True)


def make_bucket(endpoint: str, name: str) -> None:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)


def test_writes_to_s3(s3_endpoint):
    make_bucket(s3_endpoint, "synth-bucket")
    fs = s3(s3_endpoint)
    cfg = SMALL.model_copy(update={"videos": 3})
    synth.write_synthetic("s3://synth-bucket/sets/small", cfg, s3_storage(s3_endpoint), processes=1)
    assert sorted(fs.ls("synth-bucket/sets/small")) == [f"synth-bucket/sets/small/{n}" for n in ("annotations.json", "v_0000.mp4", "v_0001.mp4", "v_0002.mp4")]
    ann = json.loads(fs.cat_file("synth-bucket/sets/small/annotations.json"))
    frames, _ = decode_all(io.BytesIO(fs.cat_file("synth-bucket/sets/small/v_0001.mp4")))
    assert frames.shape == (80, 64, 64, 3) and ann["database"]["v_0001"]["duration"] == 8.0

    with pytest.raises(BadInput, match="already exists"):
        synth.write_synthetic("s3://synth-bucket/sets/small", cfg, s3_storage(s3_endpoint), processes=1)
    with pytest.raises(BadInput, match="s3://no-such-bucket/x: cannot write"):
        synth.write_synthetic("s3://no-such-bucket/x", cfg, s3_storage(s3_endpoint), processes=1)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "re2tal.cli", "data", "synth", *args], capture_output=True, text=True, env=env, timeout=300)


SMALL_ARGS = ("--videos", "3", "--val-videos", "1", "--classes", "2", "--duration", "6", "--size", "32")


def test_cli_writes_local_and_s3_and_refuses_to_overwrite(tmp_path, s3_endpoint):
    out = tmp_path / "cli"
    done = run_cli("--out", str(out), *SMALL_ARGS)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 videos" in done.stdout
    ann = json.loads((out / "annotations.json").read_text())
    assert [t["nodeName"] for t in ann["taxonomy"]] == ["disk_sway", "square_bob"] and len(ann["database"]) == 3
    assert len(decord.VideoReader(str(out / "v_0000.mp4"))) == 60

    before = (out / "annotations.json").read_bytes()
    again = run_cli("--out", str(out), *SMALL_ARGS, "--seed", "1")
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (out / "annotations.json").read_bytes() == before

    make_bucket(s3_endpoint, "cli-bucket")
    done = run_cli("--out", "s3://cli-bucket/synth", *SMALL_ARGS, env={**S3_ENV, "AWS_ENDPOINT_URL_S3": s3_endpoint})
    assert done.returncode == 0, done.stderr
    assert json.loads(s3(s3_endpoint).cat_file("cli-bucket/synth/annotations.json")) == ann


@pytest.mark.parametrize("args, flag", [(("--size", "48"), "--size"), (("--videos", "4", "--val-videos", "4"), "--val-videos"),
                                        (("--classes", "49"), "--classes"), (("--duration", "1"), "--duration")])
def test_cli_bad_arguments_exit_2_naming_the_flag(tmp_path, args, flag):
    done = run_cli("--out", str(tmp_path / "bad"), *args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"re2tal data synth: error: {flag}:") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
