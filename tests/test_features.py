"""Training the localization head on pre-extracted features (`data.features`): windows in seconds
as for frames, bad feature folders refused in one line, and a run under real Ray Train +
DeepSpeed on CPU reading its features from a real S3 endpoint (moto), logged to MLflow with a
model that predicts from feature files.

The features are written here in `re2tal extract`'s layout: `<id>.npy` (clips, channels) float16
and `features.json`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import conftest
from re2tal.errors import BadInput
from test_training import SYNTH, TINY, local_set, mlflow_run, ray_cluster  # noqa: F401  (fixtures)

CLIP_FRAMES = CLIP_STRIDE = 2

tiny_config = functools.partial(conftest.tiny_config, TINY)


def write_features(folder: Path, annotations: str, clip_frames: int = CLIP_FRAMES, clip_stride: int = CLIP_STRIDE,
                   channels: int = 6) -> Path:
    """Features of every video of the annotations: channel c is 1 while an action of class c is
    on screen at the clip's centre (plus noise), at the videos' fps."""
    database = json.loads(Path(annotations).read_text())["database"]
    labels = sorted({a["label"] for v in database.values() for a in v["annotations"]})
    fps = SYNTH.fps
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for vid, v in database.items():
        clips = (round(v["duration"] * fps) - clip_frames) // clip_stride + 1
        x = rng.normal(0, 0.1, (clips, channels))
        centres = (np.arange(clips) * clip_stride + clip_frames / 2) / fps
        for a in v["annotations"]:
            x[:, labels.index(a["label"])] += (centres >= a["segment"][0]) & (centres < a["segment"][1])
        np.save(folder / f"{vid}.npy", x.astype(np.float16))
    (folder / "features.json").write_text(json.dumps({"clip_frames": clip_frames, "clip_stride": clip_stride, "fps": fps,
                                                      "frame_size": 32, "backbone": {"name": "test"}, "weights": None}))
    return folder


# --------------------------------------------------------------------------------------------
# windows: the frame sampler's seconds


def _meta(clip_frames: int, clip_stride: int, fps: float, channels: int = 4):
    from re2tal.data.features import FeatureMeta

    return FeatureMeta("features", clip_frames, clip_stride, fps, channels)


def _video(duration: float):
    from re2tal.data.annotations import Video

    return Video(id="v", url="v.mp4", duration=duration, subset="validation", index=0,
                 segments=np.array([[3.0, 9.5], [20.2, 31.0]], np.float32), labels=np.array([0, 1]))


@pytest.mark.parametrize("interval, frames, duration, overrides", [
    (1, 64, 30.0, {}), (3, 32, 61.7, {"data.last_window": "end_aligned"}), (2, 16, 5.0, {}),
    (2, 32, 40.0, {"data.last_window": "end_aligned", "data.truncate_threshold": 0.5, "data.truncate_crop_ratio": [0.9, 1.0]})])
def test_one_frame_features_at_the_frame_step_have_the_frame_samplers_windows_and_targets(tmp_path, interval, frames, duration,
                                                                                        overrides):
    """Features of single-frame clips every `frame_interval` frames are samples of the frame
    sampler's grid: every evaluation window, and OpenTAD's truncated training window for the same
    random draws, has the seconds and real samples of the frame windows, so the same targets."""
    from re2tal.data.dataset import plan_windows
    from re2tal.data.features import plan_cells
    from re2tal.data.video import VideoInfo
    from re2tal.detection import targets_in_window

    fps = 10.0
    cfg = tiny_config(tmp_path, "a.json", "w", **{"data.sampling": "sliding", "data.num_frames": frames,
                                                   "data.frame_interval": interval, "data.window_stride": frames // 4, **overrides})
    n = round(duration * fps)
    info = VideoInfo(frames=n, fps=fps, duration=duration, height=32, width=32)
    meta, video = _meta(1, interval, fps), _video(duration)
    clips = math.ceil(n / interval)  # a clip at every interval-th frame
    passes = [(False, 0)] + [(True, seed) for seed in range(5)] * ("data.truncate_threshold" in overrides)
    for training, seed in passes:
        by_frames = plan_windows(info, video, cfg, training, np.random.default_rng(seed))
        by_features = [w for _, w in plan_cells(clips, video, cfg, meta, training, np.random.default_rng(seed))]
        assert len(by_features) == len(by_frames)
        for w, f in zip(by_features, by_frames):
            assert (w.start, w.end, w.valid, w.min_inside) == pytest.approx((f.start, f.end, f.valid, f.min_inside))
            ours, theirs = (targets_in_window(video.segments, video.labels, (x.start, x.end), cfg.head.seq_len) for x in (w, f))
            assert np.allclose(ours[0], theirs[0], atol=1e-4) and ours[1].tolist() == theirs[1].tolist()


def test_resampled_features_sit_at_the_seconds_of_the_heads_grid():
    """A feature whose value is the time of its clip's centre, resampled to the head's grid,
    reads back the time `grid_to_seconds` gives each grid position: decoded segments come out
    in the seconds the features were taken at. Uniform sampling spans the whole video."""
    from re2tal.config import validate
    from re2tal.data.features import make_item, plan_cells
    from re2tal.detection import grid_to_seconds

    cfg = validate({"data": {"annotations": "a.json", "sampling": "uniform"},
                    "head": {"num_classes": 2, "seq_len": 16, "fpn_levels": 2}})
    meta = _meta(clip_frames=8, clip_stride=4, fps=10.0, channels=1)
    clips = 32  # 2 x seq_len: linear resampling stays inside the sequence
    centres = (np.arange(clips) * meta.clip_stride + meta.clip_frames / 2) / meta.fps
    video = _video(meta.duration(clips))
    [(j0, w)] = plan_cells(clips, video, cfg, meta, training=False, rng=np.random.default_rng(0))
    item = make_item(centres[:, None], video, j0, w, meta, cfg.head.seq_len)
    grid_times = grid_to_seconds(np.arange(cfg.head.seq_len, dtype=np.float64), item["window"], cfg.head.seq_len)
    assert np.allclose(item["features"][0].numpy(), grid_times, atol=1e-5)
    assert item["valid"] == 1.0 and item["window"][1] - item["window"][0] == pytest.approx(clips * meta.step)
    assert item["segments"].tolist() == [[3.0, 9.5]]  # the action inside the video's 13.2 s


def test_a_bad_features_folder_fails_in_one_line_naming_data_features(local_set, tmp_path):  # noqa: F811
    from re2tal.tasks.features import FeatureLocalization

    def refused(folder: Path) -> str:
        cfg = tiny_config(tmp_path, local_set, "bad", **{"data.features": str(folder)})
        with pytest.raises(BadInput) as err:
            FeatureLocalization().check_data(cfg)
        assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith("data.features: ")
        return str(err.value)

    folder = write_features(tmp_path / "features", local_set)
    assert "does not exist" in refused(tmp_path / "nowhere")
    database = json.loads(Path(local_set).read_text())["database"]
    probe = folder / f"{next(v for v, d in database.items() if d['subset'] == 'training')}.npy"  # whose channels are read
    probe.unlink()
    assert f"no features of 1 video(s) of subset 'training' (e.g. {probe.name})" in refused(folder)
    np.save(probe, np.zeros(5, np.float16))
    assert f"{probe.name} has shape [5]" in refused(folder)
    (folder / "features.json").write_text(json.dumps({"clip_frames": 2, "fps": 5}))
    assert "clip_stride missing" in refused(folder)
    with pytest.raises(BadInput, match="data.loader: ray_data"):
        FeatureLocalization().check_data(tiny_config(tmp_path, local_set, "bad", **{"data.features": str(folder),
                                                                                      "data.loader": "ray_data"}))


# --------------------------------------------------------------------------------------------
# a run under Ray Train, features on S3


@pytest.mark.slow
def test_a_run_on_features_from_s3_trains_evaluates_and_logs_a_model_of_the_head(ray_cluster, local_set, s3, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    import mlflow.pyfunc

    from re2tal.data.synth import class_names
    from re2tal.tasks.features import FeatureLocalization
    from re2tal.tasks.predict import load_model
    from re2tal.tracking import resolve_uri
    from re2tal.training.driver import fit

    local = write_features(tmp_path / "features", local_set)
    s3.fs.put(str(local) + "/", f"{s3.bucket}/features/", recursive=True)
    cfg = tiny_config(tmp_path, local_set, "on-features", **{"data.features": s3.url("features"), "train.epochs": 3, **s3.overrides()})
    metrics = fit(cfg, FeatureLocalization(), show_progress=False)

    assert metrics["step"] == 3 * 2  # 4 training videos / (2 workers x batch 1) per epoch
    maps = {k: v for k, v in metrics.items() if k.startswith("mAP_") or k == "average_mAP"}
    assert len(maps) == 11 and all(math.isfinite(v) and 0 <= v <= 1 for v in maps.values()), maps
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["re2tal.task"] == "localization_features"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    assert "average_mAP" in run.data.metrics and "system/cpu_utilization_percentage" in run.data.metrics
    sources = {i.dataset.source for i in run.inputs.dataset_inputs}
    assert len(sources) == 1 and s3.url("features") in sources.pop()

    with pytest.raises(BadInput, match="is a head trained on features .* not from videos"):  # re2tal predict --model
        load_model(metrics["model_uri"], None, {"tracking.tracking_uri": resolve_uri(cfg.tracking.tracking_uri)}, cfg.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resolve_uri(cfg.tracking.tracking_uri))
    model = mlflow.pyfunc.load_model(metrics["model_uri"])
    npy = sorted(local.glob("*.npy"))[0]
    [answer] = model.predict([str(npy)])
    assert answer["video"] == str(npy) and answer["duration"] == pytest.approx(SYNTH.duration_s)
    assert all(0 <= s["segment"][0] < s["segment"][1] <= SYNTH.duration_s + 1e-6 for s in answer["segments"])
    assert answer["segments"] and {s["label"] for s in answer["segments"]} <= set(class_names(SYNTH.classes))
