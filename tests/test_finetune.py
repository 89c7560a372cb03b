"""`re2tal finetune` end to end: real local Ray Train workers with DeepSpeed engines on CPU, real
MLflow (SQLite), clips cut from a tiny synthetic TAL set; and the clip annotation layouts.

One fine-tuning run is shared by the tests that need one (module fixture): 4 epochs, then the
same run name again with 8 epochs, which resumes; its backbone file then trains a localization
run.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
from re2tal.config import Config, StorageConfig, SynthConfig, validate
from re2tal.errors import BadInput

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SYNTH = SynthConfig(videos=24, val_videos=6, classes=2, duration_s=12, fps=5, size=32, seed=3)
BACKBONE = {"name": "swin_t", "reversible": True, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
            "window_size": [8, 4, 4], "drop_path": 0.0}
TINY = {
    "data": {"sampling": "uniform", "num_frames": 8, "frame_size": 32, "batch_size": 4, "loader_threads": 1, "prefetch_videos": 1},
    "augment": {"crop_scale": [0.8, 1.0]},
    "backbone": BACKBONE,
    "head": {"num_classes": 3},  # 2 actions + background
    "finetune": {"dropout": 0.0},
    "optim": {"backbone_lr": 1e-3, "head_lr": 1e-3, "weight_decay": 0.02, "warmup_epochs": 0},
    # evaluations at the ends only (each Ray Train report waits for its controller's 2 s poll)
    "train": {"epochs": 4, "num_workers": 2, "report_every_steps": 1, "eval_every_epochs": 100},
    "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    "tracking": {"experiment": "re2tal-tests"},
}
FIRST_EPOCHS, EPOCHS = 4, 8


tiny_config = functools.partial(conftest.tiny_config, TINY)


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory) -> Path:
    """The synthetic TAL set and the clips cut from it (`re2tal data synth --clips`)."""
    from re2tal.cli import main

    folder = tmp_path_factory.mktemp("clips")
    s = SYNTH
    assert main(["data", "synth", "--out", str(folder), "--videos", str(s.videos), "--val-videos", str(s.val_videos),
                 "--classes", str(s.classes), "--duration", str(s.duration_s), "--fps", str(s.fps), "--size", str(s.size),
                 "--seed", str(s.seed), "--clips"]) == 0
    return folder


@pytest.fixture(scope="module")
def finetuned(clip_set, tmp_path_factory):
    """4 epochs, then the same run with 8 epochs (resumed): (first, second metrics, config)."""
    import ray

    from re2tal.tasks.finetune import Finetune
    from re2tal.training.driver import fit

    tmp = tmp_path_factory.mktemp("finetune")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))}})
    try:
        first = fit(tiny_config(tmp, str(clip_set / "clips.csv"), "ft", **{"train.epochs": FIRST_EPOCHS}), Finetune(), show_progress=False)
        cfg = tiny_config(tmp, str(clip_set / "clips.csv"), "ft", **{"train.epochs": EPOCHS})
        second = fit(cfg, Finetune(), show_progress=False)
    finally:
        ray.shutdown()
    return first, second, cfg


def _history(cfg: Config, run_id: str, key: str):
    from mlflow.tracking import MlflowClient

    from re2tal.tracking import resolve_uri

    return MlflowClient(resolve_uri(cfg.tracking.tracking_uri)).get_metric_history(run_id, key)


def _steps_per_epoch(cfg: Config) -> int:
    from re2tal.data.clips import load_clips

    return len(load_clips(cfg.data, cfg.storage).subset("training")) // (2 * cfg.data.batch_size)


# --------------------------------------------------------------------------------------------


def test_finetune_reaches_top1_well_above_chance_logged_to_mlflow(finetuned):
    _, second, cfg = finetuned
    assert second["epoch"] == EPOCHS and second["step"] == EPOCHS * _steps_per_epoch(cfg)
    chance = second["chance_top1"]
    assert 0.2 < chance < 0.7
    assert second["top1"] >= max(0.75, chance + 0.25), second
    assert second["top5"] == 1.0  # 3 classes: top-3
    top1 = _history(cfg, second["mlflow_run_id"], "top1")
    assert [m.step for m in top1][0] == 0  # the evaluation before the first step
    assert max(m.step for m in top1) == second["step"] and top1[-1].value == pytest.approx(second["top1"])
    assert second["top1_before"] == pytest.approx(top1[0].value)
    assert _history(cfg, second["mlflow_run_id"], "chance_top1")


def test_rerunning_the_same_name_resumes_the_finetuning(finetuned):
    first, second, cfg = finetuned
    steps = _steps_per_epoch(cfg)
    assert first["step"] == FIRST_EPOCHS * steps
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert [m.value for m in _history(cfg, second["mlflow_run_id"], "resumed_at_step")] == [FIRST_EPOCHS * steps]
    every = cfg.train.report_every_steps
    losses = sorted(m.step for m in _history(cfg, second["mlflow_run_id"], "loss"))
    assert losses == list(range(every, EPOCHS * steps + 1, every)), "a step was repeated or lost"
    assert second["top1_before"] == first["top1_before"]  # kept in the checkpoint, not made again


def test_the_backbone_file_loads_as_pretrained_and_trains_a_localization_run(finetuned, clip_set, tmp_path):
    from re2tal.backbones import build_backbone
    from re2tal.tasks.finetune import Classifier, build_classifier, classifier_prefix
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    _, second, cfg = finetuned
    file = second["backbone_file"]
    saved = torch.load(file, weights_only=True)
    assert saved["meta"]["re2tal"]["classes"] == 3 and saved["meta"]["re2tal"]["backbone"]["reversible"] is True
    backbone = build_backbone(cfg.backbone.model_copy(update={"pretrained": file}))
    state = backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items() if k in state)
    assert set(saved["state_dict"]) - set(state) == {f"{classifier_prefix(backbone)}.{t}" for t in ("weight", "bias")}
    # fine-tuned in Re² form, it computes what it learned only rewired, as the authors' Re² files
    with pytest.raises(BadInput, match=r"holds a Re² \(reversible\) model, .*set backbone.reversible: true"):
        build_backbone(cfg.backbone.model_copy(update={"pretrained": file, "reversible": False}))
    # the file's classifier comes back too (finetune.load_classifier): a rerun scores as the run ended
    model = build_classifier(cfg.with_overrides({"backbone.pretrained": file}))
    assert isinstance(model, Classifier) and torch.equal(model.head.fc.weight, saved["state_dict"][f"{classifier_prefix(backbone)}.weight"])

    tree = {
        "data": {"annotations": str(clip_set / "annotations.json"), "sampling": "uniform", "num_frames": 16, "frame_size": 32,
                 "loader_threads": 1, "prefetch_videos": 1},
        "backbone": BACKBONE | {"pretrained": file},
        "head": {"num_classes": 2, "seq_len": 8, "embed_dim": 16, "fpn_levels": 2, "stem_layers": 1, "attn_window": 3, "num_attn_heads": 2},
        "train": {"name": "from-finetuned", "storage_path": str(tmp_path / "runs"), "num_workers": 0, "epochs": 1},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "tracking": {"enabled": False},
    }
    metrics = fit(validate(tree), Localization(), local=True, show_progress=False)
    assert metrics["step"] >= 1 and math.isfinite(metrics["average_mAP"])


def test_each_finished_launch_logs_the_classifier_as_the_runs_model_which_classifies_videos(finetuned, clip_set, monkeypatch):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from re2tal.data.clips import load_clips
    from re2tal.tasks.finetune import build_classifier
    from re2tal.tasks.mlmodel import load_model
    from re2tal.tracking import resolve_uri
    from re2tal.training.checkpoints import load_weights, local_checkpoint

    first, second, cfg = finetuned
    uri = resolve_uri(cfg.tracking.tracking_uri)
    run = MlflowClient(uri).get_run(second["mlflow_run_id"])
    assert sorted(o.step for o in run.outputs.model_outputs) == [first["step"], second["step"]]  # the resumed run's too

    _, network, labels = load_model(second["model_uri"], tracking_uri=uri)
    assert labels == load_clips(cfg.data, cfg.storage).labels
    trained = build_classifier(cfg)
    with local_checkpoint(second["checkpoint"], cfg.storage) as path:
        load_weights(trained, path)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), trained.state_dict().values()))

    from re2tal.tasks import predict

    with pytest.raises(BadInput, match="is not a localization model"):  # re2tal predict --model
        predict.load_model(second["model_uri"], None, {"tracking.tracking_uri": uri}, cfg.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    [answer] = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict([str(sorted(clip_set.glob("*.mp4"))[0])])
    assert sorted(c["label"] for c in answer["classes"]) == sorted(labels)  # top-3 of 3 classes
    assert sum(c["score"] for c in answer["classes"]) == pytest.approx(1.0, abs=1e-5)


# -- clip annotations (no Ray) ----------------------------------------------------------------


def _data(annotations: str, **extra) -> Config:
    return validate({"data": {"annotations": annotations, "num_frames": 8, "frame_size": 32, **extra},
                     "backbone": BACKBONE, "head": {"num_classes": 2}}).data


def test_kinetics_csv_names_the_trimmed_files_and_clip_csv_takes_start_end(tmp_path):
    from re2tal.data.clips import load_clips

    (tmp_path / "k400.csv").write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                                       "abseiling,-3B32lodo2M,59,69,train,0\n"
                                       "air drumming,--nQbRBEz2s,104,114,val,0\n")
    ann = load_clips(_data(str(tmp_path / "k400.csv"), video_root="s3://k400/{split}"), StorageConfig())
    assert ann.labels == ["abseiling", "air drumming"]
    first, second = ann.videos
    assert first.url == "s3://k400/train/-3B32lodo2M_000059_000069.mp4" and first.subset == "train" and first.clip == (0.0, math.inf)
    assert second.url == "s3://k400/val/--nQbRBEz2s_000104_000114.mp4" and int(second.labels[0]) == 1

    (tmp_path / "clips.csv").write_text("url,id,label,start,end,subset\n"
                                        "s3://b/long.mp4,,jump,12.5,20,training\n"
                                        ",v_1,run,,,validation\n"
                                        ",v_1,run,,,validation\n")
    ann = load_clips(_data(str(tmp_path / "clips.csv"), video_root="s3://b/videos"), StorageConfig())
    assert [v.url for v in ann.videos] == ["s3://b/long.mp4", "s3://b/videos/v_1.mp4", "s3://b/videos/v_1.mp4"]
    assert ann.videos[0].clip == (12.5, 20.0) and ann.videos[1].clip == (0.0, math.inf)
    assert len({v.id for v in ann.videos}) == 3

    for text, what in (("label,subset\nx,training\n", "expected a CSV header"),
                       ("id,label,start,end,subset\nv,x,5,3,training\n", "end 3 is not after start 5"),
                       ("id,label,start,subset\nv,x,soon,training\n", "start must be a number")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(BadInput, match=what):
            load_clips(_data(str(tmp_path / "bad.csv")), StorageConfig())


def test_a_clip_window_stays_inside_its_clip():
    from re2tal.data.sampling import clip_window, sample_times

    rng = np.random.default_rng(0)
    for _ in range(50):
        w = clip_window(12.5, 20.0, 60.0, 2 / 30, 32, rng)  # 32 frames at interval 2 of 30 fps: 2.13 s
        assert 12.5 <= w.start and w.end <= 20.0 + 1e-9 and w.valid == 32
    centred = clip_window(12.5, 20.0, 60.0, 2 / 30, 32, None)
    assert centred.start - 12.5 == pytest.approx(20.0 - centred.end)
    whole = clip_window(0.0, math.inf, 9.0, None, 8, None)  # uniform over a whole (trimmed) file
    assert (whole.start, whole.end) == (0.0, 9.0)
    short = clip_window(3.0, 3.5, 60.0, 0.1, 16, None)  # shorter than 16 samples: padded at its end
    assert short.valid == 5 and sample_times(short, 16).max() < 3.5


def test_finetune_of_detection_annotations_fails_in_one_line_before_any_worker(tmp_path, capsys):
    from re2tal.cli import main

    (tmp_path / "anet.json").write_text('{"database": {}}')
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{annotations: {tmp_path / 'anet.json'}}}\nhead: {{num_classes: 2}}\n"
                      f"train: {{storage_path: {tmp_path / 'runs'}}}\ntracking: {{enabled: false}}\n")
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "re2tal finetune reads a CSV of clips" in err, err


@pytest.mark.parametrize("name", ["swin_t", "pst_t", "slowfast_r50", "tada2d_r50"])
def test_the_backbone_file_of_every_family_loads_with_its_classifier_dropped(name, tmp_path):
    """The file's layout is the backbone's own: `backbone.pretrained` loads it as it is (the
    classifier dropped by the family's classifier keys), also a SlowFast built with mmaction's
    bare laterals (fusion_norm=False), and finetune loads the classifier back."""
    from re2tal.backbones import build_backbone
    from re2tal.backbones.slowfast import SlowFast
    from re2tal.config import BackboneConfig
    from re2tal.tasks.finetune import Classifier, backbone_file_state, build_classifier

    sizes = {"depths": [1, 1, 1, 1]} | ({"embed_dim": 8, "num_heads": [1, 1, 1, 1]} if name in ("swin_t", "pst_t") else {})
    cfg = BackboneConfig(name=name, reversible=True, **sizes)
    torch.manual_seed(0)
    backbone = SlowFast(depths=[1, 1, 1, 1], fusion_kernel=5, fusion_norm=False) if name == "slowfast_r50" else build_backbone(cfg)
    model = Classifier(backbone, 3, 0.5)
    file = tmp_path / "backbone.pth"
    torch.save({"state_dict": backbone_file_state(model), "meta": {}}, file)
    loaded = build_backbone(cfg.model_copy(update={"pretrained": str(file)}))
    assert loaded.state_dict().keys() == backbone.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())
    tree = {"data": {"annotations": "x.csv", "num_frames": 8, "frame_size": 32}, "head": {"num_classes": 3},
            "backbone": cfg.model_dump() | {"pretrained": str(file)}}
    again = build_classifier(validate(tree))
    assert torch.equal(again.head.fc.weight, model.head.fc.weight) and torch.equal(again.head.fc.bias, model.head.fc.bias)
