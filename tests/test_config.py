"""Config tree: YAML round trip, overrides, and malformed configs rejected naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from re2tal.config import Config, load_config, parse_override, reference_markdown, validate
from re2tal.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))
MINIMAL = {"data": {"annotations": "s3://bucket/anet.json"}, "head": {"num_classes": 200}}


def write(tmp_path, tree) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    again = validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def test_minimal_config_gets_documented_defaults():
    cfg = validate(MINIMAL)
    assert cfg.backbone.name == "swin_t" and cfg.backbone.reversible
    assert cfg.data.window_stride == cfg.data.num_frames // 2  # derived once at load
    assert cfg.data.short_side == cfg.data.frame_size
    assert cfg.head.regression_ranges[:3] == [(0, 4), (4, 8), (8, 16)]
    assert cfg.tracking.tracking_uri == "sqlite:///mlflow.db"


def test_config_is_frozen():
    cfg = validate(MINIMAL)
    with pytest.raises(Exception):
        cfg.train.epochs = 3


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.epochs=3", "optim.head_lr=2e-4", "backbone.depths=[1, 1, 2, 1]",
                                                 "backbone.num_heads=[1,2,4,8]", "augment.hflip=false", "storage.endpoint_url=http://127.0.0.1:5000"])
    assert cfg.train.epochs == 3
    assert cfg.optim.head_lr == pytest.approx(2e-4)
    assert cfg.backbone.depths == [1, 1, 2, 1]
    assert cfg.augment.hflip is False
    assert cfg.storage.endpoint_url == "http://127.0.0.1:5000"


def test_with_overrides_revalidates_and_keeps_secrets():
    cfg = validate({**MINIMAL, "storage": {"access_key_id": "AKIA", "secret_access_key": "s3cr3t"}})
    trial = cfg.with_overrides({"augment.rotation": True})
    assert trial.augment.rotation and not cfg.augment.rotation
    assert trial.storage.secret_access_key.get_secret_value() == "s3cr3t"
    with pytest.raises(BadInput, match="deepspeed.zero_stage"):
        cfg.with_overrides({"deepspeed.zero_stage": 4})


def test_secrets_never_in_yaml_or_flat_params():
    cfg = validate({**MINIMAL, "storage": {"access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3cr3t"}})
    assert "s3cr3t" not in cfg.to_yaml() and "AKIAEXAMPLE" not in cfg.to_yaml()
    flat = cfg.flat()
    assert "storage.secret_access_key" not in flat and "s3cr3t" not in str(flat)
    assert flat["backbone.name"] == "swin_t" and flat["data.annotations"] == "s3://bucket/anet.json"


def test_parse_override_rejects_missing_equals():
    with pytest.raises(BadInput, match="expected key.sub=value"):
        parse_override("train.epochs")


BAD = [
    # (override on top of MINIMAL, key that the message must name)
    ({"backbone": {"nmae": "swin_t"}}, "backbone.nmae"),
    ({"bogus_section": {}}, "bogus_section"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"epochs": -1}}, "train.epochs"),
    ({"data": {"num_frames": 0}}, "data.num_frames"),
    ({"data": {"frame_size": -224}}, "data.frame_size"),
    ({"data": {"annotations": None}}, "data.annotations"),
    ({"data": {"annotations": "ftp://host/x.json"}}, "data.annotations"),
    ({"backbone": {"name": "resnet50"}}, "backbone.name"),
    ({"deepspeed": {"zero_stage": 5}}, "deepspeed.zero_stage"),
    ({"deepspeed": {"precision": "fp16"}}, "deepspeed.precision"),  # fp16 on CPU
    ({"deepspeed": {"precision": "int8"}}, "deepspeed.precision"),
    ({"backbone": {"activation_checkpointing": True}}, "backbone.activation_checkpointing"),  # with reversible
    ({"backbone": {"depths": [2, 2]}}, "backbone.num_heads"),
    ({"backbone": {"drop_path": 1.5}}, "backbone.drop_path"),
    ({"backbone": {"name": "slowfast_r50", "patch_shift": {"pattern": "C"}}}, "backbone.patch_shift"),
    ({"backbone": {"name": "pst_t", "patch_shift": {"blocks": "all"}}}, "backbone.patch_shift.blocks"),
    ({"backbone": {"name": "pst_t", "window_size": [8, 7, 7]}}, "backbone.window_size"),
    ({"backbone": {"name": "pst_t", "patch_shift": {"pattern": "E"}}}, "backbone.patch_shift.pattern"),
    ({"data": {"num_frames": 33}}, "data.num_frames"),  # not divisible by temporal patch 2
    ({"data": {"frame_size": 100}}, "data.frame_size"),  # not divisible by 32
    ({"data": {"frame_size": 224, "short_side": 128}}, "data.short_side"),
    ({"head": {"seq_len": 100}}, "head.seq_len"),  # not divisible by 2^5
    ({"head": {"attn_window": 8}}, "head.attn_window"),
    ({"head": {"nms": {"external_scores": "s3://b/cls.json"}}}, "head.nms.external_scores"),  # with 200 classes
    ({"tracking": {"tracking_uri": "./mlruns"}}, "tracking.tracking_uri"),
    ({"train": {"name": "my run/1"}}, "train.name"),
    ({"storage": {"access_key_id": "AKIA"}}, "storage.secret_access_key"),
    ({"augment": {"crop_scale": [0.9, 0.5]}}, "augment.crop_scale"),
    ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas"),
    ({"tune": {"space": {"augment.hflipp": {"choice": [True]}}}}, "tune.space.augment.hflipp"),
    ({"tune": {"space": {"deepspeed.zero_stage": {"choice": [2, 7]}}}}, "tune.space.deepspeed.zero_stage"),
    ({"tune": {"space": {"optim.head_lr": {"uniform": [0.1, 0.2], "choice": [1]}}}}, "tune.space.optim.head_lr"),
    ({"data": {"synth": {"classes": 3}}}, "head.num_classes"),  # 200 head classes vs 3 drawn
]


def merge(base, extra):
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("extra,key", BAD, ids=[k for _, k in BAD])
def test_malformed_config_rejected_naming_the_key(tmp_path, extra, key):
    with pytest.raises(BadInput) as err:
        load_config(write(tmp_path, merge(MINIMAL, extra)))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(key) or f" {key}" in message or f"; {key}" in message, message


def test_missing_required_sections_named(tmp_path):
    with pytest.raises(BadInput, match="head: required key is missing"):
        load_config(write(tmp_path, {"data": MINIMAL["data"]}))


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(BadInput, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_config(bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "re2tal.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_malformed_config_is_one_line_exit_2(tmp_path):
    out = run_cli("train", "--config", str(write(tmp_path, MINIMAL)), "--set", "deepspeed.zero_stage=5")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "deepspeed.zero_stage" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("train", "tune", "eval", "predict", "map", "data", "bench"):
        assert f"    {name}" in out.stdout


def test_readme_config_reference_is_generated_from_schema():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README's config reference is stale: paste re2tal.config.reference_markdown()"
    for name in Config.model_fields:
        assert f"**{name}**" in readme
