"""`re2tal data prepare`: a real Ray Data job on a local Ray over a real S3 endpoint (moto server):
sizes, frame rates and durations of the prepared copies, the new annotation file trains, a rerun
prepares nothing, a job killed part-way is finished by a rerun, a corrupt source is listed and
the others are prepared. Plus the exact frame mapping of the transcoder (no Ray)."""

from __future__ import annotations

import fractions
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from re2tal.config import SynthConfig, validate
from re2tal.data.annotations import load_annotations
from re2tal.data.prepare import Settings, transcode
from re2tal.data.video import VideoFile, VideoSource

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SYNTH = SynthConfig(videos=5, val_videos=1, classes=2, duration_s=6.3, fps=10, size=64, seed=4)
SETTINGS = Settings(short_side=32, fps=5, gop=5)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def synthetic_on_s3(s3, prefix: str, cfg: SynthConfig = SYNTH, corrupt: bool = False) -> str:
    """The synthetic set under s3://bucket/prefix (plus a corrupt video 'v_bad' if asked); its annotation URL."""
    from re2tal.data.synth import write_synthetic

    write_synthetic(s3.url(prefix), cfg, s3.storage)
    if corrupt:
        tree = json.loads(s3.fs.cat_file(f"{s3.bucket}/{prefix}/annotations.json"))
        tree["database"]["v_bad"] = {"subset": "training", "duration": 5.0, "annotations": [{"segment": [1, 2], "label": "disk_sway"}]}
        s3.put_bytes(os.urandom(5000), f"{prefix}/v_bad.mp4")
        s3.put_bytes(json.dumps(tree).encode(), f"{prefix}/annotations.json")
    return s3.url(f"{prefix}/annotations.json")


def data_config(annotations: str, s3):
    return validate({"data": {"annotations": annotations, "num_frames": 16, "frame_size": 32}, "head": {"num_classes": 2}}
                    ).with_overrides(s3.overrides())


def objects(s3, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under the prefix."""
    return {k: v["ETag"] for k, v in s3.fs.find(f"{s3.bucket}/{prefix}", detail=True).items()}


def test_prepared_copies_have_the_size_fps_and_duration_asked_a_corrupt_source_is_listed_and_a_rerun_does_nothing(
        ray_cluster, s3, tmp_path):
    from re2tal.raydata.prepare import run

    source = synthetic_on_s3(s3, "src", corrupt=True)
    out = s3.url("prepared")
    summary = run(source, out, SETTINGS, s3.storage, progress=False)
    assert (summary["videos"], summary["prepared"], summary["skipped"]) == (SYNTH.videos + 1, SYNTH.videos, 0)
    [bad] = summary["failed"]
    assert bad["id"] == "v_bad" and bad["source"].endswith("src/v_bad.mp4") and "cannot open" in bad["reason"]
    assert json.loads(s3.fs.cat_file(f"{s3.bucket}/prepared/prepare.json")) == summary
    assert 0 < summary["bytes"] < summary["source_bytes"]

    src_cfg, out_cfg = data_config(source, s3), data_config(summary["annotations"], s3)
    before, after = load_annotations(src_cfg.data, src_cfg.storage), load_annotations(out_cfg.data, out_cfg.storage)
    assert [v.id for v in after.videos] == [v.id for v in before.videos if v.id != "v_bad"]
    assert after.labels == before.labels
    source_files = VideoSource(s3.storage)
    for v in after.videos:
        old = before.video(v.id)
        assert v.url == f"{out}/videos/{v.id}.mp4"
        assert v.duration == old.duration and v.subset == old.subset
        np.testing.assert_array_equal(v.segments, old.segments)
        np.testing.assert_array_equal(v.labels, old.labels)
        with source_files.acquire(v.url) as lease, source_files.acquire(old.url) as src_lease:
            info, src_info = VideoFile(lease.path).info, VideoFile(src_lease.path).info
        assert (info.height, info.width) == (32, 32) and info.fps == pytest.approx(5.0)
        assert info.frames == round(src_info.duration * 5) == 32  # 6.3 s at 5 fps
        assert abs(info.duration - src_info.duration) <= 1 / 5
    assert not [k for k in objects(s3, "prepared") if ".partial-" in k]

    done = objects(s3, "prepared/videos")
    again = run(source, out, SETTINGS, s3.storage, progress=False)
    assert (again["prepared"], again["skipped"], len(again["failed"])) == (0, SYNTH.videos, 1)
    assert objects(s3, "prepared/videos") == done  # nothing rewritten

    other = run(source, s3.url("prepared"), Settings(short_side=32, fps=4, gop=4), s3.storage, progress=False)
    assert other["prepared"] == SYNTH.videos  # other settings: done again, not taken for prepared


def test_the_prepared_annotation_file_trains(ray_cluster, s3, tmp_path):
    from re2tal.raydata.prepare import run
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    small = SynthConfig(videos=3, val_videos=1, classes=2, duration_s=6, fps=10, size=64, seed=1)
    summary = run(synthetic_on_s3(s3, "src", small), s3.url("prepared"), SETTINGS, s3.storage, progress=False)
    tree = {
        "data": {"annotations": summary["annotations"], "sampling": "uniform", "num_frames": 8, "frame_size": 32,
                 "loader_threads": 1, "prefetch_videos": 1},
        "backbone": {"name": "swin_t", "reversible": True, "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                     "window_size": [8, 4, 4]},
        "head": {"num_classes": 2, "seq_len": 4, "embed_dim": 16, "fpn_levels": 2, "stem_layers": 1, "attn_window": 3,
                 "num_attn_heads": 2},
        "train": {"name": "prepared", "storage_path": str(tmp_path / "runs"), "epochs": 1, "num_workers": 0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "tracking": {"enabled": False},
    }
    cfg = validate(tree).with_overrides(s3.overrides())
    metrics = fit(cfg, Localization(), local=True, show_progress=False)
    assert metrics["step"] == 2 and 0.0 <= metrics["average_mAP"] <= 1.0  # 2 training videos, batch 1


def test_a_job_killed_part_way_is_finished_by_a_rerun_which_does_only_the_rest(ray_cluster, s3, tmp_path):
    from re2tal.raydata.prepare import run

    many = SynthConfig(videos=10, val_videos=1, classes=2, duration_s=20, fps=10, size=128, seed=2)
    source = synthetic_on_s3(s3, "src", many)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen([sys.executable, "-m", "re2tal.cli", "data", "prepare", "--annotations", source,
                            "--out", s3.url("prepared"), "--short-side", "32", "--fps", "5", "--gop", "5"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def records() -> set[str]:
        return {k for k in objects(s3, "prepared/videos") if k.endswith(".json")} if s3.fs.exists(f"{s3.bucket}/prepared") else set()

    deadline = time.monotonic() + 120
    while not records():
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "no video prepared within 120 s"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(2)  # Ray ends the dead driver's tasks
    done = {k: v for k, v in objects(s3, "prepared/videos").items() if k.endswith(".json")}
    assert 0 < len(done) < many.videos, "the job was not killed part-way"
    assert not s3.fs.exists(f"{s3.bucket}/prepared/annotations.json")  # nothing that looks finished

    rest = run(source, s3.url("prepared"), SETTINGS, s3.storage, progress=False)
    assert (rest["skipped"], rest["prepared"], rest["failed"]) == (len(done), many.videos - len(done), [])
    assert {k: v for k, v in objects(s3, "prepared/videos").items() if k in done} == done  # kept, not redone
    assert not [k for k in objects(s3, "prepared") if ".partial-" in k]
    assert len(json.loads(s3.fs.cat_file(f"{s3.bucket}/prepared/annotations.json"))["database"]) == many.videos


@pytest.mark.parametrize("fps", [10, 45])  # fewer and more frames than the 29.97 fps source
def test_each_prepared_frame_is_the_source_frame_on_screen_at_its_centre(tmp_path, make_video, read_frame_number, fps):
    src = make_video(tmp_path / "ntsc.mp4", 150, fractions.Fraction(30000, 1001), width=80, height=64)
    transcode(str(src), str(tmp_path / "out.mp4"), Settings(short_side=32, fps=fps, gop=fps, crf=10))
    out = VideoFile(str(tmp_path / "out.mp4"))
    assert (out.info.height, out.info.width, out.info.frames) == (32, 40, round(5.005 * fps))
    numbers = [read_frame_number(f) for f in out.read(np.arange(out.info.frames))]
    assert numbers == [int((j + 0.5) / fps * 30000 / 1001) for j in range(out.info.frames)]


def test_cli_bad_settings_are_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "re2tal.cli", "data", "prepare", "--annotations", str(tmp_path / "a.json"),
                          "--out", str(tmp_path / "out"), "--short-side", "255"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "--short-side" in out.stderr and len(out.stderr.strip().splitlines()) == 1
