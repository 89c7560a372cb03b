"""Config tree: YAML round trip, overrides, and malformed configs rejected naming the key."""

import itertools
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
    ({"data": {"truncate_crop_ratio": [0.9, 1.0]}}, "data.truncate_crop_ratio"),  # without truncate_threshold
    ({"data": {"truncate_threshold": 1.5}}, "data.truncate_threshold"),
    ({"data": {"truncate_threshold": 0.5, "truncate_crop_ratio": [1.0, 0.9]}}, "data.truncate_crop_ratio"),
    ({"data": {"last_window": "middle"}}, "data.last_window"),
    ({"data": {"min_segment_fraction": 1.0}}, "data.min_segment_fraction"),
    ({"data": {"blocked_videos": "ftp://host/blocked.json"}}, "data.blocked_videos"),
    ({"head": {"nms": {"voting_threshold": 1.5}}}, "head.nms.voting_threshold"),
    ({"head": {"encoder": "bert"}}, "head.encoder"),
    ({"augment": {"rand_augment_ops": 20}}, "augment.rand_augment_ops"),
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


# OpenTAD's configs/re2tal/e2e_*.py (commit 3dd7b03) with their _base_ files, the values that differ
# between the eight runs (the README's table has every key)
OPENTAD = {
    "anet": {"data.batch_size": 8, "train.num_workers": 4, "data.num_frames": 768, "head.seq_len": 192, "head.embed_dim": 256,
             "head.abs_position": True, "head.label_smoothing": 0.1, "head.reg_loss_weight": 2.0, "head.init_loss_norm": 200,
             "head.nms.max_segments": 100, "head.nms.class_agnostic": True, "head.nms.voting_threshold": 0.9,
             "head.nms.topk_classes": 2, "optim.head_lr": 1e-3, "train.epochs": 15, "data.min_segment_fraction": 0.01,
             "train.eval_every_epochs": 1, "train.eval_start_epoch": 8},
    "thumos": {"data.batch_size": 2, "train.num_workers": 2, "data.num_frames": 1024, "data.frame_interval": 2, "data.window_stride": 512,
               "data.truncate_threshold": 0.75, "data.truncate_crop_ratio": [0.9, 1.0], "data.last_window": "end_aligned",
               "head.seq_len": 512, "head.embed_dim": 512, "head.abs_position": False, "head.label_smoothing": 0.0,
               "head.reg_loss_weight": 1.0, "head.init_loss_norm": 100, "head.nms.max_segments": 2000,
               "head.nms.class_agnostic": False, "head.nms.voting_threshold": 0.7, "optim.head_lr": 1e-4, "train.epochs": 120,
               "train.eval_every_epochs": 5, "train.eval_start_epoch": 79},
    "both": {"head.encoder": "actionformer", "head.attn_window": -1, "head.fpn_levels": 6, "head.drop_path": 0.1, "head.nms.sigma": 0.7,
             "head.nms.min_score": 0.001, "optim.backbone_lr": 1e-5, "optim.weight_decay": 0.05, "optim.warmup_epochs": 5,
             "optim.ema": True, "deepspeed.gradient_clipping": 1.0, "augment.crop_scale": [0.08, 1.0], "augment.temporal_jitter": False,
             "augment.rand_augment": True, "augment.rotation": False, "augment.brightness": 0.5, "augment.eval_resize": True,
             "data.short_side": 256, "data.frame_size": 224, "backbone.norm_eval": True,
             "backbone.pixel_mean": [0.485, 0.456, 0.406]},
}
PAPER = [f"{d}_{b}" for d in ("anet", "thumos") for b in ("swin_t", "re2swin_t", "slowfast_r101", "re2slowfast_r101")]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_carry_opentads_settings(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml").flat()
    want = {**OPENTAD["both"], **OPENTAD[name.split("_")[0]]}
    re2 = "re2" in name
    want |= {"backbone.reversible": re2, "backbone.activation_checkpointing": not re2}
    if "swin" in name:
        want["backbone.drop_path"] = 0.2 if re2 else 0.1  # drop_path_rate
    got = {k: cfg[k] for k in want}
    assert got == want
    pretrained = cfg["backbone.pretrained"]
    assert ("_k400_ft_e30.pth" in pretrained) == re2 and (pretrained.startswith("https://download.openmmlab.com/") == (not re2))


def opentad_evaluates(epoch: int, val_start_epoch: int, val_eval_interval: int) -> bool:
    """Port of OpenTAD's tools/train.py:212-213 (3dd7b03), whether eval_one_epoch runs after `epoch`."""
    if epoch >= val_start_epoch:
        if (val_eval_interval > 0) and ((epoch + 1) % val_eval_interval == 0):
            return True
    return False


def test_evaluation_epochs_follow_opentads_val_start_epoch_and_interval_plus_the_last():
    """Ours evaluates after the epochs OpenTAD's loop does, and always after the last (its result)."""
    thumos = load_config(ROOT / "configs" / "thumos_re2swin_t.yaml")
    for start, every, epochs in itertools.product((0, 3, 8, 79), (1, 2, 5), (7, 15, 120)):
        train = thumos.with_overrides({"train.epochs": epochs, "train.eval_every_epochs": every, "train.eval_start_epoch": start}).train
        want = [e for e in range(epochs) if opentad_evaluates(e, start, every) or e == epochs - 1]
        assert [e for e in range(epochs) if train.evaluates(e)] == want
    assert [e for e in range(120) if thumos.train.evaluates(e)] == [79, 84, 89, 94, 99, 104, 109, 114, 119]


@pytest.mark.parametrize("name", ["mvit_v2_s", "swin_b", "vit_l", "pst_t", "r3d_18", "slowfast_r101"])
def test_a_new_backbone_name_on_a_loaded_config_takes_its_family_sizes_as_set_in_the_file(name):
    """Tune trials switch `backbone.name` on a resolved config: the new family's depths, heads,
    windows and patch sizes apply as with `--set` on the file, not the old family's."""
    path = ROOT / "configs" / "anet_re2swin_t.yaml"
    switched = load_config(path).with_overrides({"backbone.name": name}).backbone
    assert switched == load_config(path, [f"backbone.name={name}"]).backbone
    # sizes the file gives itself are kept (debug.yaml's tiny Swin)
    tiny = load_config(ROOT / "configs" / "debug.yaml")
    assert tiny.with_overrides({"backbone.name": "mvit_v2_s"}).backbone.depths == tiny.backbone.depths
