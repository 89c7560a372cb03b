"""`re2tal predict` and `re2tal extract` as Ray Data jobs (re2tal.raydata.inference): a real local
Ray, real mp4s, a moto S3 server, a tiny reversible Swin trained once here by `re2tal train`'s
local mode. Predict over an S3 prefix with a corrupt video; a predict job SIGKILLed part-way and
run again; extract against the backbone's own forward; bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from re2tal.config import StorageConfig, SynthConfig, validate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SYNTH = SynthConfig(videos=4, val_videos=1, classes=2, duration_s=6, fps=5, size=32, seed=3)
# sliding windows of 16 frames, 8 apart: a 6 s video at 5 fps (30 frames) has 3 of them
TINY = {
    "data": {"sampling": "sliding", "num_frames": 16, "frame_size": 32, "loader_threads": 1, "prefetch_videos": 1},
    "backbone": {"name": "swin_t", "reversible": True, "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                 "window_size": [8, 4, 4]},
    "head": {"num_classes": 2, "seq_len": 8, "embed_dim": 16, "fpn_levels": 2, "stem_layers": 1, "attn_window": 3,
             "num_attn_heads": 2},
    "train": {"name": "tiny", "epochs": 1, "num_workers": 0},
    "deepspeed": {"zero_stage": 0, "precision": "fp32"},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """(a checkpoint of the tiny model, its training set's annotation file): `re2tal train --local`'s run."""
    from re2tal.data.synth import write_synthetic
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    folder = tmp_path_factory.mktemp("trained")
    write_synthetic(str(folder / "synth"), SYNTH, StorageConfig())
    annotations = str(folder / "synth" / "annotations.json")
    tree = {**TINY, "data": {**TINY["data"], "annotations": annotations}, "train": {**TINY["train"], "storage_path": str(folder / "runs")}}
    metrics = fit(validate(tree), Localization(), local=True, show_progress=False)
    return metrics["checkpoint"], annotations


def synthetic_videos(folder: Path, cfg: SynthConfig) -> list[Path]:
    from re2tal.data.synth import write_synthetic

    write_synthetic(str(folder), cfg, StorageConfig())
    return sorted(folder.glob("*.mp4"))


def assert_same_segments(got: list[dict], want: list[dict]) -> None:
    assert [s["label"] for s in got] == [s["label"] for s in want]
    assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], rel=1e-4, abs=1e-6)
    assert [s["segment"] for s in got] == [pytest.approx(s["segment"], abs=1e-4) for s in want]


# --------------------------------------------------------------------------------------------


def test_predict_over_an_s3_prefix_lists_a_corrupt_video_and_predicts_the_others_through_the_evaluation_windows(
        ray_cluster, trained, s3, capfd):
    from re2tal.data.collection import collection
    from re2tal.data.dataset import VideoDataset, batches
    from re2tal.tasks.localization import predict as predict_in_process
    from re2tal.tasks.predict import load_model, predict

    checkpoint, annotations = trained
    for path in sorted(Path(annotations).parent.glob("*.mp4")):
        s3.put(path, f"videos/{path.name}")
    s3.put_bytes(os.urandom(5000), "videos/v_bad.mp4")
    s3.put_bytes(b"not a video", "videos/notes.txt")
    model = load_model(checkpoint, None, s3.overrides(), s3.storage)  # its config from the checkpoint, S3 keys on top
    assert model.labels == ["disk_sway", "square_bob"] and model.cfg.data.sampling == "sliding"
    videos = collection(s3.url("videos/"), model.cfg.data, model.cfg.storage)
    assert sorted(v.id for v in videos) == ["v_0000", "v_0001", "v_0002", "v_0003", "v_bad"]
    capfd.readouterr()

    submission, result = predict(model, videos, s3.url("out/predictions.json"), progress=False)

    [bad] = result.failed
    assert bad["id"] == "v_bad" and bad["url"] == s3.url("videos/v_bad.mp4") and "cannot open" in bad["reason"]
    listed = [line for line in capfd.readouterr().err.splitlines() if "v_bad" in line]
    assert len(listed) == 1 and listed[0].startswith("cannot read v_bad (s3://")
    good = ["v_0000", "v_0001", "v_0002", "v_0003"]
    assert result.stats["processed"] == 4 and result.stats["units"] == 4 * 3  # every sliding window of every good video
    written = json.loads(s3.fs.cat_file(f"{s3.bucket}/out/predictions.json"))
    assert written == submission and sorted(written["results"]) == good and written["version"] == "re2tal"
    s3.fs.invalidate_cache()
    assert sorted(Path(p).name for p in s3.fs.ls(f"{s3.bucket}/out/predictions.json.parts")) == [f"{v}.json" for v in good]

    # what evaluation computes in one process from the same windows of the same files
    local = model.cfg.with_overrides({"data.annotations": annotations})
    for subset in ("training", "validation"):
        clips = VideoDataset(local, subset, training=False)
        expected = predict_in_process(model.module, batches(clips, 1), local, torch.device("cpu"), model.labels)["results"]
        for vid, segments in expected.items():
            assert segments and all(0 <= s["segment"][0] < s["segment"][1] <= SYNTH.duration_s for s in segments)
            assert_same_segments(written["results"][vid], segments)


def test_a_predict_job_killed_part_way_run_again_predicts_only_the_rest_and_writes_what_an_uninterrupted_run_does(
        ray_cluster, trained, tmp_path):
    from re2tal.data.collection import collection
    from re2tal.tasks.predict import load_model, predict

    checkpoint, _ = trained
    many = SynthConfig(videos=8, val_videos=1, classes=2, duration_s=20, fps=5, size=32, seed=5)  # 12 windows each
    folder = tmp_path / "videos"
    synthetic_videos(folder, many)
    out = tmp_path / "killed" / "predictions.json"
    parts = Path(f"{out}.parts")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen([sys.executable, "-m", "re2tal.cli", "predict", "--model", checkpoint, "--videos", f"{folder}/",
                            "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(parts.glob("*.json")):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "no video predicted within 180 s"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(2)  # Ray ends the dead driver's tasks and actors
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.glob("*.json")}
    assert 0 < len(first) < many.videos, "the job was not killed part-way"
    assert not out.exists()  # nothing that looks finished

    model = load_model(checkpoint, None, {}, StorageConfig())
    videos = collection(f"{folder}/", model.cfg.data, model.cfg.storage)
    again, result = predict(model, videos, str(out), progress=False)
    assert (result.stats["done_before"], result.stats["processed"]) == (len(first), many.videos - len(first))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.glob("*.json") if p.name in first} == first
    assert sorted(p.name for p in parts.glob("*.json")) == [f"{v.id}.json" for v in videos]

    whole, _ = predict(model, videos, str(tmp_path / "whole" / "predictions.json"), progress=False)
    assert json.loads(out.read_text()) == again == whole


def test_extract_writes_the_backbones_pooled_features_of_every_clip_and_a_rerun_does_nothing(ray_cluster, trained, tmp_path):
    from re2tal.backbones import build_backbone
    from re2tal.data.collection import collection
    from re2tal.data.video import VideoFile
    from re2tal.tasks.extract import extract
    from re2tal.tasks.localization import model_input

    _, annotations = trained
    weights = tmp_path / "backbone.pth"
    cfg = validate({**TINY, "data": {**TINY["data"], "annotations": annotations}})
    torch.save(build_backbone(cfg.backbone).state_dict(), weights)  # random weights, as a pretrained file
    cfg = cfg.with_overrides({"backbone.pretrained": str(weights), "extract.clip_frames": 4, "extract.clip_stride": 4,
                              "extract.frame_interval": 2, "inference.batch_size": 4})
    out = tmp_path / "features"
    videos = collection(annotations, cfg.data, cfg.storage)  # every subset
    features, result = extract(cfg, videos, str(out), progress=False)

    assert result.stats["processed"] == SYNTH.videos and not result.failed
    meta = json.loads((out / "features.json").read_text())
    assert meta == features
    assert {k: meta[k] for k in ("clip_frames", "clip_stride", "frame_interval", "fps", "frame_size", "short_side", "dtype")} == \
        {"clip_frames": 4, "clip_stride": 4, "frame_interval": 2, "fps": 5.0, "frame_size": 32, "short_side": 32, "dtype": "float16"}
    assert meta["backbone"]["name"] == "swin_t" and meta["weights"] == str(weights) and meta["channels"] == 64
    backbone = build_backbone(cfg.backbone, cfg.storage).eval()
    clips = np.arange(6)[:, None] * 4 + np.arange(4)[None, :] * 2  # 30 frames: clips start at 0, 4, ..., 20 (last frame 26)
    for video in videos:
        array = np.load(out / f"{video.id}.npy")
        assert array.dtype == np.float16 and array.shape == (6, 64)
        assert meta["videos"][video.id] == {"clips": 6, "channels": 64, "fps": 5.0, "frames": 30, "duration": 6.0}
        file = VideoFile(video.url, cfg.data.short_side)
        frames = torch.from_numpy(file.read(clips.reshape(-1)).reshape(6, 4, 32, 32, 3))
        with torch.no_grad():
            expected = backbone(model_input(frames, cfg, "cpu", torch.float32)).mean(dim=(2, 3, 4)).half().numpy()
        np.testing.assert_allclose(array.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)

    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    _, again = extract(cfg, videos, str(out), progress=False)
    assert (again.stats["done_before"], again.stats["processed"]) == (SYNTH.videos, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == written


def test_clip_grid_takes_whole_clips_only_and_one_padded_clip_of_a_short_video():
    from re2tal.config import ExtractConfig
    from re2tal.tasks.extract import clip_grid

    tadaconv = ExtractConfig(clip_frames=8, clip_stride=16)
    assert clip_grid(100, tadaconv).tolist() == [list(range(k, k + 8)) for k in range(0, 96, 16)]  # 88..95 the last whole clip
    assert clip_grid(5, tadaconv).tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    assert clip_grid(7, ExtractConfig(clip_frames=4, clip_stride=2, frame_interval=2)).tolist() == [[0, 2, 4, 6]]


def test_bad_input_is_one_line_naming_the_flag_and_exit_2(trained, tmp_path, capsys):
    from re2tal.cli import main

    checkpoint, annotations = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    video = str(min(Path(annotations).parent.glob("*.mp4")))
    (tmp_path / "dup" / "a").mkdir(parents=True)
    (tmp_path / "dup" / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / "dup" / sub / "x.mp4").write_bytes(b"")
    config = tmp_path / "tiny.yaml"
    config.write_text((Path(checkpoint) / "config.yaml").read_text())
    out = str(tmp_path / "out.json")
    cases = [
        (["predict", "--model", checkpoint, "--videos", f"{tmp_path / 'empty'}/", "--out", out], "--videos: no video files"),
        (["predict", "--model", checkpoint, "--videos", str(tmp_path / "dup"), "--out", out], "--videos: two videos named 'x'"),
        (["predict", "--model", str(tmp_path), "--videos", video, "--out", out], "--model: "),  # a folder, not a checkpoint
        (["predict", "--model", str(tmp_path / "nothing"), "--videos", video, "--out", out], "--model: "),
        (["predict", "--model", "models:/tiny/1", "--videos", video, "--out", out], "--model: "),
        (["predict", "--model", checkpoint, "--videos", annotations, "--subset", "testing", "--out", out], "--subset: "),
        (["predict", "--model", checkpoint, "--videos", video, "--out", out, "--set", "inference.actors=0"], "inference.actors"),
        (["extract", "--config", str(config), "--set", "extract.clip_frames=3", "--out", str(tmp_path / "f")], "extract.clip_frames"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"re2tal {argv[0]}: error: " in err[0] and named in err[0], (argv, err)


def test_videos_of_an_annotation_file_are_its_subsets_files(trained):
    from re2tal.data.collection import collection

    _, annotations = trained
    data = validate({**TINY, "data": {**TINY["data"], "annotations": "elsewhere.json"}}).data
    tree = json.loads(Path(annotations).read_text())["database"]
    for subsets in (["validation"], ["training"], None):
        videos = collection(annotations, data, StorageConfig(), subsets)
        assert [v.id for v in videos] == [k for k, e in tree.items() if subsets is None or e["subset"] in subsets]
        assert all(Path(v.url) == Path(annotations).parent / f"{v.id}.mp4" and Path(v.url).exists() for v in videos)
