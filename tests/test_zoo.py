"""torchvision's video zoo as backbones: Swin3D-S / B (the Swin code at their sizes), the video
ResNet-18s R(2+1)D / R3D / MC3 (Re² by ReLU-in) and MViTv2-S (grid-form tokens, pooling blocks
ordinary), each against torchvision's own model with the same random weights loaded from a file,
its Re² version against plain autograd through the same rewired net, and its activations."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.video import mc3_18, mvit_v2_s, r2plus1d_18, r3d_18, swin3d_b, swin3d_s
from torchvision.models.video.swin_transformer import SwinTransformer3d

from re2tal.backbones import build_backbone
from re2tal.backbones.build import CheckpointedSequential
from re2tal.backbones.mvit import MultiscaleBlock, relative_positions
from re2tal.config import BackboneConfig
from re2tal.errors import BadInput
from re2tal.rev import ReluIn, RevStage
from test_backbones import cfg, kept_by_depth, loss_grads, rel, saved_bytes, set_vanilla, tv_features

RESNETS = {"r2plus1d_18": r2plus1d_18, "r3d_18": r3d_18, "mc3_18": mc3_18}
# a reduced MViTv2 (4 stages, every kind of block) for the Re² and memory tests
MVIT_SMALL = dict(embed_dim=16, num_heads=[1, 2, 4, 8], drop_path=0.0)


def saved_file(model, tmp_path_factory, name):
    path = tmp_path_factory.mktemp("weights") / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def grads_match(model, x, tol=1e-4, seed=None):
    """Re² output and gradients vs the vanilla (plain autograd) run of the same rewired model."""
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for vanilla in (True, False):
        model.load_state_dict(initial)
        set_vanilla(model, vanilla)
        results[vanilla] = loss_grads(model, x, seed=seed)
    (yv, xv, pv), (yr, xr, pr) = results[True], results[False]
    assert pr.keys() == pv.keys() == {k for k, p in model.named_parameters() if p.requires_grad}
    assert rel(yr, yv) <= tol and rel(xr, xv) <= tol
    # a gradient that is 0 in exact arithmetic (a BatchNorm shift followed by train-mode
    # BatchNorms) is rounding noise on both paths: compared with a floor of 1e-6 x the largest
    scale = max(g.norm().item() for g in pv.values())
    assert all((pr[k] - pv[k]).norm() <= tol * pv[k].norm() + 1e-6 * scale for k in pv)


# --------------------------------------------------------------------------------------------
# Swin3D-S / B: the Swin code at torchvision's sizes


def test_swin_s_b_defaults_are_torchvision_sizes_and_layouts():
    for name, ctor, dims in (("swin_s", swin3d_s, 768), ("swin_b", swin3d_b, 1024)):
        c = BackboneConfig(name=name)
        with torch.device("meta"):
            want = {k: v.shape for k, v in ctor().state_dict().items() if not k.startswith("head.")}
            for reversible in (False, True):
                model = build_backbone(c.model_copy(update={"reversible": reversible}))
                assert {k: v.shape for k, v in model.state_dict().items()} == want
        assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (dims, 2, 32)
        assert (c.temporal_stride, c.spatial_stride, c.pixel_mean, c.pixel_std) == (2, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert BackboneConfig(name="swin_s").depths == [2, 2, 18, 2] and BackboneConfig(name="swin_s").embed_dim == 96
    b = BackboneConfig(name="swin_b")
    assert (b.depths, b.embed_dim, b.num_heads, b.window_size) == ([2, 2, 18, 2], 128, [4, 8, 16, 32], (8, 7, 7))
    # TPS in the 3-D windows, as on swin_t
    with torch.device("meta"):
        tps = build_backbone(cfg(name="swin_b", patch_shift={}))
    assert sum(b.attn.patch_shift is not None for s in tps.stage_blocks() for b in tps.features[s]) == 12


def test_swin_s_equals_torchvision(tmp_path_factory):
    torch.manual_seed(0)
    ref = swin3d_s().eval()
    path = saved_file(ref, tmp_path_factory, "swin3d_s")
    model = build_backbone(cfg(name="swin_s", pretrained=str(path))).eval()
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        ours, want = model(x), tv_features(ref, x)
    assert ours.shape == (1, 768, 4, 2, 2) and rel(ours, want) <= 1e-5


def test_swin_b_equals_torchvision_at_its_widths(tmp_path_factory):
    """swin3d_b's widths and heads (its full depth only adds more of the same blocks; its keys and
    shapes are checked above), the torchvision model against ours from its file."""
    torch.manual_seed(0)
    sizes = dict(depths=[1, 1, 2, 1])
    ref = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=128, num_heads=[4, 8, 16, 32], window_size=[8, 7, 7], **sizes).eval()
    path = saved_file(ref, tmp_path_factory, "swin3d_b_small")
    model = build_backbone(cfg(name="swin_b", pretrained=str(path), **sizes)).eval()
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        ours, want = model(x), tv_features(ref, x)
    assert ours.shape == (1, 1024, 4, 2, 2) and rel(ours, want) <= 1e-5


# --------------------------------------------------------------------------------------------
# R(2+1)D-18 / R3D-18 / MC3-18


def tv_resnet_features(model, x):
    return model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x)))))


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_video_resnets_equal_torchvision_and_load_unrenamed(name, tmp_path_factory):
    torch.manual_seed(0)
    ref = RESNETS[name]().eval()
    path = saved_file(ref, tmp_path_factory, name)
    model = build_backbone(cfg(name=name, pretrained=str(path))).eval()
    x = torch.randn(2, 3, 16, 48, 64)
    with torch.no_grad():
        ours, want = model(x), tv_resnet_features(ref, x)
    t = 16 if name == "mc3_18" else 2
    assert ours.shape == (2, 512, t, 3, 4) == want.shape and rel(ours, want) <= 1e-5
    c = BackboneConfig(name=name)
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (512, c.temporal_stride, c.spatial_stride) == (512, 16 // t, 16)
    assert (c.depths, c.pixel_mean, c.pixel_std) == ([2, 2, 2, 2], (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state = build_backbone(cfg(name=name, reversible=True, pretrained=str(path))).state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_re2_video_resnets_relu_in_and_gradients_equal_vanilla(name):
    """Blocks with an identity shortcut become x + ReLU(F(x)) in reversible stages (all of
    layer1), the projecting first block of layer2-4 stays ordinary and runs first."""
    torch.manual_seed(0)
    model = build_backbone(cfg(name=name, reversible=True, depths=[2, 2, 2, 1], norm_eval=True)).train()
    assert isinstance(model.layer1, RevStage) and model.layer1.lead == 0 and all(isinstance(b, ReluIn) for b in model.layer1)
    assert isinstance(model.layer2, RevStage) and model.layer2.lead == 1 and model.layer2[0].downsample is not None
    assert isinstance(model.layer2[1], ReluIn) and type(model.layer4) is torch.nn.Sequential  # layer4: its lead only
    with torch.no_grad():
        block, h = model.layer1[0], torch.randn(1, 64, 4, 8, 8)
        assert torch.equal(block(h), h + torch.relu(block.conv2(block.conv1(h))))
    # norm_eval: BatchNorm with frozen statistics, as these nets are fine-tuned for TAL (with batch
    # statistics, see the next test)
    grads_match(model, torch.randn(2, 3, 8, 32, 32))


def test_re2_video_resnet_with_batch_statistics_gradients_equal_vanilla():
    """BatchNorm in train mode (batch statistics, updated once per forward). Its backward makes the
    input gradient of R(2+1)D's layer1 a near-cancellation: in fp32 plain autograd itself is only
    good to ~1e-3 there (a 1e-6 change of its output gradient moves it by that), so the mechanics
    are compared in fp64 (small clip: CPU fp64 convs are slow)."""
    torch.manual_seed(0)
    model = build_backbone(cfg(name="r2plus1d_18", reversible=True, depths=[2, 2, 2, 1])).double().train()
    before = model.state_dict()["layer1.1.conv1.1.running_mean"].clone()
    grads_match(model, torch.randn(2, 3, 4, 16, 16, dtype=torch.float64), tol=1e-9)
    assert not torch.equal(model.state_dict()["layer1.1.conv1.1.running_mean"], before)


def test_re2_video_resnet_keeps_no_block_activations_and_checkpointing_keeps_gradients():
    kept = kept_by_depth(torch.randn(1, 3, 8, 32, 32), lambda depth: [2, 1, depth, 1], name="r2plus1d_18")
    assert kept[False, 5] > kept[False, 2] * 1.2
    assert kept[True, 5] == kept[True, 2] < kept[False, 2]
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 32, 32)
    std = build_backbone(cfg(name="r3d_18", depths=[2, 1, 2, 1])).train()
    ckpt = build_backbone(cfg(name="r3d_18", depths=[2, 1, 2, 1], activation_checkpointing=True)).train()
    assert all(isinstance(getattr(ckpt, f"layer{i}"), CheckpointedSequential) for i in range(1, 5))
    ckpt.load_state_dict(std.state_dict())
    (ys, xs, ps), (yc, xc, pc) = loss_grads(std, x), loss_grads(ckpt, x)
    assert rel(yc, ys) <= 1e-6 and rel(xc, xs) <= 1e-5 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-5


def test_video_resnet_frozen_stages_and_norm_eval():
    model = build_backbone(cfg(name="mc3_18", reversible=True, depths=[2, 2, 1, 1], frozen_stages=1, norm_eval=True)).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("stem.", "layer1."))}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms and not any(m.training for m in norms) and model.layer2.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, grads = loss_grads(model, torch.randn(1, 3, 4, 32, 32))
    assert grads and not any(k.startswith(("stem.", "layer1.")) for k in grads) and "layer2.1.conv1.0.weight" in grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# MViTv2-S


@pytest.fixture(scope="module")
def tv_mvit(tmp_path_factory):
    torch.manual_seed(0)
    model = mvit_v2_s().eval()
    return model, saved_file(model, tmp_path_factory, "mvit_v2_s")


def tv_mvit_features(model, x):
    """torchvision's mvit_v2_s blocks on the clip's token grid, final norm, class token dropped.
    (Its MViT.forward takes the grid from its constructor, 16 x 224 x 224; the blocks take any
    grid and resize their relative position tables to it.)"""
    x = model.conv_proj(x)
    thw = tuple(x.shape[2:])
    x = model.pos_encoding(x.flatten(2).transpose(1, 2))
    for block in model.blocks:
        x, thw = block(x, thw)
    x = model.norm(x)[:, 1:]
    return x.reshape(x.shape[0], *thw, -1).permute(0, 4, 1, 2, 3)


# 16 frames: the pretraining length (temporal table used as is); 24 frames, a 96 x 80 frame: every
# table resized, odd grids pooled (24 x 20 -> 12 x 10 -> 6 x 5 -> 3 x 3)
@pytest.mark.parametrize("shape", [(1, 3, 16, 64, 64), (2, 3, 24, 96, 80)])
def test_mvit_v2_s_equals_torchvision(tv_mvit, shape):
    ref, path = tv_mvit
    model = build_backbone(cfg(name="mvit_v2_s", pretrained=str(path))).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ours, want = model(x), tv_mvit_features(ref, x)
    b, _, t, h, w = shape
    assert ours.shape == (b, 768, t // 2, -(-h // 32), -(-w // 32)) == want.shape
    assert rel(ours, want) <= 1e-5
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (768, 2, 32)


def test_mvit_weight_file_loads_unrenamed_and_layout_errors(tv_mvit, tmp_path):
    """torchvision's `blocks.{i}` land in `stages.{s}.{i}` (same tensors), standard and Re²; a
    file of another depth is an error naming the key."""
    _, path = tv_mvit
    file_state = torch.load(path, weights_only=True)
    model = build_backbone(cfg(name="mvit_v2_s", reversible=True, pretrained=str(path)))
    state = model.state_dict()
    stage = [0, 1, 1] + [2] * 11 + [3, 3]  # of each of torchvision's 16 blocks
    for key, value in file_state.items():
        if key.startswith("head."):
            continue
        if key.startswith("blocks."):
            i, rest = key[len("blocks."):].split(".", 1)
            key = f"stages.{stage[int(i)]}.{i}.{rest}"
        assert torch.equal(state.pop(key), value), key
    assert not state
    assert [type(s).__name__ for s in model.stages] == ["RevStage"] * 4 and [s.lead for s in model.stages] == [0, 1, 1, 1]
    # our own layout (a saved re2tal backbone) loads back
    own = tmp_path / "own.pth"
    torch.save(model.state_dict(), own)
    again = build_backbone(cfg(name="mvit_v2_s", pretrained=str(own)))
    assert torch.equal(again.state_dict()["stages.2.7.attn.rel_pos_t"], file_state["blocks.7.attn.rel_pos_t"])
    with pytest.raises(BadInput, match=r"blocks\.15\.norm1\.weight is a block this model does not have") as err:
        build_backbone(cfg(name="mvit_v2_s", pretrained=str(path), depths=[1, 2, 11, 1]))
    assert "\n" not in str(err.value)


def test_mvit_relative_position_tables_follow_the_grid():
    """At the pretraining grid the tables are used as they are; elsewhere linearly resized to
    2 max(q, k) - 1 rows, offsets scaled by the pooling ratio (torchvision's _add_rel_pos)."""
    table = torch.randn(15, 4)
    assert torch.equal(relative_positions(table, 8, 8), table[(torch.arange(8)[:, None] - torch.arange(8)[None, :] + 7)])
    long = relative_positions(table, 384, 384)  # 768 frames
    assert long.shape == (384, 384, 4)
    resized = torch.nn.functional.interpolate(table.t()[None], size=767, mode="linear")[0].t()
    assert torch.equal(long, resized[torch.arange(384)[:, None] - torch.arange(384)[None, :] + 383])
    spatial = torch.randn(111, 4)  # stage-1 block at 224 px: 56 queries, 7 keys (stride 8)
    assert torch.equal(relative_positions(spatial, 56, 7), spatial[(torch.arange(56)[:, None] - (torch.arange(7)[None, :] - 6) * 8).long()])


def test_re2_mvit_rewires_shape_keeping_blocks_and_gradients_equal_vanilla():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="mvit_v2_s", reversible=True, depths=[2, 2, 3, 2], **{**MVIT_SMALL, "drop_path": 0.3})).train()
    for stage in model.stages:
        assert isinstance(stage, RevStage)
        assert all(isinstance(b, MultiscaleBlock) and b.keeps_shape() for b in stage.reversible_blocks())
        assert all(not b.keeps_shape() for b in list(stage)[:stage.lead])
    grads_match(model, torch.randn(2, 3, 8, 64, 64), seed=3)


def test_re2_mvit_mlp_branches_in_pieces_gradients_equal_whole_vanilla(monkeypatch):
    """The MLP branches run frame by frame of the token grid (piece_size 1), the class-token
    frame a piece of its own; attention (global) whole; drop path on."""
    from test_backbones import record_pieces

    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="mvit_v2_s", reversible=True, depths=[2, 2, 1, 1], piece_size=1,
                                          **{**MVIT_SMALL, "drop_path": 0.3})).train()
    grads_match(model, torch.randn(2, 3, 8, 64, 64), seed=3)
    assert {(1, 0, 1, 5), (1, 4, 1, 5)} <= set(seen)


def test_re2_mvit_keeps_no_block_activations_and_checkpointing_keeps_gradients():
    # depth of stage 1, which has the most tokens
    kept = kept_by_depth(torch.randn(1, 3, 8, 64, 64), lambda depth: [depth, 1, 1, 1], name="mvit_v2_s", **MVIT_SMALL)
    assert kept[False, 5] > kept[False, 2] * 1.2
    assert kept[True, 5] == kept[True, 2] < kept[False, 2]  # (the pooling blocks keep their inputs)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 64, 64)
    std = build_backbone(cfg(name="mvit_v2_s", depths=[1, 2, 2, 1], **MVIT_SMALL)).train()
    ckpt = build_backbone(cfg(name="mvit_v2_s", depths=[1, 2, 2, 1], activation_checkpointing=True, **MVIT_SMALL)).train()
    assert all(isinstance(s, CheckpointedSequential) for s in ckpt.stages)
    ckpt.load_state_dict(std.state_dict())
    (ys, xs, ps), (yc, xc, pc) = loss_grads(std, x), loss_grads(ckpt, x)
    assert rel(yc, ys) <= 1e-6 and rel(xc, xs) <= 1e-5 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-5


def test_mvit_position_tables_get_no_weight_decay():
    from re2tal.config import OptimConfig
    from re2tal.training.optim import param_groups

    with torch.device("meta"):
        model = build_backbone(cfg(name="mvit_v2_s", depths=[1, 1, 1, 1], **MVIT_SMALL))
        groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, torch.nn.Linear(1, 1), OptimConfig())}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i in groups["backbone.no_decay"]}
    assert {n for n in names.values() if ".rel_pos_" in n} <= no_decay and "pos_encoding.class_token" in no_decay
    assert "stages.0.0.attn.qkv.weight" in {names[i] for i in groups["backbone.decay"]}


def test_mvit_frozen_stages():
    model = build_backbone(cfg(name="mvit_v2_s", reversible=True, depths=[2, 2, 1, 1], frozen_stages=1, **MVIT_SMALL)).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("conv_proj.", "pos_encoding.", "stages.0."))}
    assert not model.stages[0].training and model.stages[1].training
    _, _, grads = loss_grads(model, torch.randn(1, 3, 4, 32, 32))
    assert grads and not any(k.startswith(("conv_proj.", "stages.0.")) for k in grads) and "stages.1.3.attn.rel_pos_t" in grads


def test_mvit_long_clip_attends_in_bounded_calls(monkeypatch):
    """A clip past one attention call's budget is split into groups of queries (a ragged last
    one), each call recomputed in backward: same features and gradients, and the calls' biases
    are not kept for backward."""
    from re2tal.backbones import mvit

    torch.manual_seed(0)
    model = build_backbone(cfg(name="mvit_v2_s", depths=[1, 1, 1, 1], **MVIT_SMALL)).train()
    x = torch.randn(1, 3, 32, 32, 32)
    whole, kept_whole = loss_grads(model, x), saved_bytes(model, x.clone())
    monkeypatch.setattr(mvit, "ATTN_CALL_ELEMENTS", 1000)  # stage 1: 58 of its 1024 queries per call
    split, kept_split = loss_grads(model, x), saved_bytes(model, x.clone())
    assert whole[0].shape == (1, 128, 16, 1, 1) and rel(split[0], whole[0]) <= 1e-6 and rel(split[1], whole[1]) <= 1e-5
    scale = max(g.norm() for g in whole[2].values())  # floor: pool_k's LayerNorm bias has gradient 0 (softmax shift)
    assert all((split[2][k] - g).norm() <= 1e-5 * g.norm() + 1e-6 * scale for k, g in whole[2].items())
    assert kept_split < kept_whole


def test_zoo_config_defaults_and_checks():
    m = BackboneConfig(name="mvit_v2_s")
    assert (m.depths, m.embed_dim, m.num_heads, m.drop_path, m.pixel_mean, m.pixel_std) == (
        [1, 2, 11, 2], 96, [1, 2, 4, 8], 0.2, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    assert (m.temporal_stride, m.spatial_stride) == (2, 32)
    assert BackboneConfig(name="mvit_v2_s", drop_path=0.0, pixel_mean=(0.5, 0.5, 0.5)).pixel_mean == (0.5, 0.5, 0.5)
    for bad, message in (({"name": "mvit_v2_s", "num_heads": [1, 2, 4]}, "num_heads: has 3 entries"),
                         ({"name": "mvit_v2_s", "embed_dim": 20, "num_heads": [3, 2, 4, 8]}, "not divisible by 3 heads"),
                         ({"name": "r3d_18", "depths": [2, 2, 2]}, "depths: r3d_18 has 4 stages"),
                         ({"name": "mvit_v2_s", "patch_shift": {}}, "patch_shift: only swin_t / swin_s / swin_b / pst_t")):
        with pytest.raises(ValueError, match=message):
            BackboneConfig(**bad)
