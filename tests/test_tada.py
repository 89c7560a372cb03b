"""TAdaConv and its backbones: TAdaConv2d against per-frame calibrated kernels, TAda2D against R2D
on torchvision resnet weights, the official TAda2D and pytorchvideo SlowFast key layouts, Re²
rewiring (gradients equal to plain autograd, no block activations kept, BatchNorm statistics),
and a short DeepSpeed training run of each new backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from re2tal.backbones import RouteFunc, TAda2D, TAdaConv2d, build_backbone, load_pretrained
from re2tal.backbones.build import CheckpointedSequential
from re2tal.backbones.tada import ZeroInitBatchNorm3d
from re2tal.config import BackboneConfig
from re2tal.rev import ReluIn, RevStage
from test_backbones import loss_grads, rel, saved_bytes, set_vanilla


def cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"reversible": False, **kw})


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move the zero-initialised parts (route functions' b, b_avgpool_bn) and the BatchNorm
    statistics off their initial values, so that calibration and aggregation are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RouteFunc):
                m.b.weight.copy_(0.1 * torch.randn(m.b.weight.shape, generator=gen))
            if isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
    return model


# --------------------------------------------------------------------------------------------
# TAdaConv2d


def per_frame_reference(x, alpha, weight, bias, stride, groups, cal_dim):
    """Frame by frame, F.conv2d with the explicitly calibrated kernel W_t = alpha_t * W_b."""
    b, c_in, t = x.shape[:3]
    c_out = weight.shape[0]
    frames = []
    for i in range(b):
        per_t = []
        for f in range(t):
            a = alpha[i, :, f, 0, 0]
            if cal_dim == "cin":  # entry j of output o's kernel reads input channel g(o) C_in/G + j
                kernel = (weight.view(groups, c_out // groups, c_in // groups, 3, 3) * a.view(groups, 1, c_in // groups, 1, 1)).reshape(weight.shape)
            else:
                kernel = weight * a.view(c_out, 1, 1, 1)
            per_t.append(F.conv2d(x[i:i + 1, :, f], kernel, bias, stride, 1, 1, groups))
        frames.append(torch.stack(per_t, 2))
    return torch.cat(frames)


@pytest.mark.parametrize("cal_dim", ["cin", "cout"])
@pytest.mark.parametrize("groups", [1, 8])  # 8 = depthwise
@pytest.mark.parametrize("stride", [1, 2])
def test_tadaconv_equals_per_frame_calibrated_kernels(cal_dim, groups, stride):
    torch.manual_seed(0)
    conv = TAdaConv2d(8, 8, 3, stride=stride, padding=1, groups=groups, bias=stride == 2, cal_dim=cal_dim)
    assert conv.weight.shape == (1, 1, 8, 8 // groups, 3, 3)
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    x = torch.randn(2, 8, 3, 9, 9, requires_grad=True)
    alpha = (1 + 0.5 * torch.randn(2, 8, 3, 1, 1)).requires_grad_()
    y = conv(x, alpha)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, alpha, conv.weight), dy)
    w = conv.weight.view(8, 8 // groups, 3, 3)
    y_ref = per_frame_reference(x, alpha, w, conv.bias, stride, groups, cal_dim)
    grads_ref = torch.autograd.grad(y_ref, (x, alpha, conv.weight), dy)
    assert y.shape == y_ref.shape == (2, 8, 3, 5 if stride == 2 else 9, 5 if stride == 2 else 9)
    assert rel(y, y_ref) <= 1e-5
    assert max(rel(g, r) for g, r in zip(grads, grads_ref)) <= 1e-5


def test_tadaconv_matches_the_official_grouped_formulation_and_rejects_bad_alpha():
    from re2tal.bench.tadaconv import measure, official, tadaconv

    torch.manual_seed(0)
    x, alpha, w = torch.randn(2, 16, 4, 7, 7), 1 + 0.3 * torch.randn(2, 16, 4, 1, 1), torch.randn(1, 1, 16, 16, 3, 3)
    assert rel(tadaconv(x, alpha, w), official(x, alpha, w)) <= 1e-5
    with pytest.raises(ValueError, match=r"alpha has shape \[2, 16, 1, 1, 1\], expected \[2, 16, 4, 1, 1\]"):
        TAdaConv2d(16, 16, 3, padding=1)(x, alpha[:, :, :1])
    # the benchmark's self-check, on a tiny shape
    result = measure(dict(kind="speed", batch=2, frames=2, channels=8, size=5, device="cpu", threads=1, warmup=0, repeats=1, seed=0))
    assert result["self_check"]["output_error"] <= 1e-5 and result["self_check"]["grad_error"] <= 1e-5
    assert set(result["impls"]) == {"plain", "tadaconv", "official"}
    # the official formulation keeps its B T kernels for backward (2 x 2 x 8 x 8 x 9 floats), ours does not
    assert result["impls"]["official"]["activation_bytes"] >= 2 * 2 * 8 * 8 * 9 * 4 > result["impls"]["tadaconv"]["activation_bytes"]


def test_route_function_at_initialisation_gives_the_plain_conv():
    torch.manual_seed(0)
    conv, route = TAdaConv2d(16, 32, 3, stride=2, padding=1), RouteFunc(16).train()
    x = torch.randn(2, 16, 5, 12, 12)
    alpha = route(x)
    assert alpha.shape == (2, 16, 5, 1, 1) and torch.equal(alpha, torch.ones_like(alpha))
    plain = F.conv3d(x, conv.weight.view(32, 16, 1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    assert (conv(x, alpha) - plain).abs().max().item() <= 1e-6
    assert {n for n, _ in route.named_parameters()} == {"g.weight", "g.bias", "a.weight", "a.bias", "bn.weight", "bn.bias", "b.weight"}
    assert (route.g.weight.shape, route.a.weight.shape, route.b.weight.shape) == ((16, 16, 1, 1, 1), (4, 16, 3, 1, 1), (16, 4, 3, 1, 1))


# --------------------------------------------------------------------------------------------
# TAda2D: torchvision resnet weights, the official layout


DEPTHS = [2, 1, 2, 1]


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A torchvision resnet (Bottleneck, reduced depths) with random weights and statistics."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, DEPTHS, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet.pth"
    torch.save(model.state_dict(), path)
    return model, path


def r2d_features(resnet: ResNet, x):
    """The same weights as plain per-frame 2-D convs (R2D) in TAda2D's arrangement: no max pool,
    res2's first block strided on conv2 and the shortcut."""
    net = copy.deepcopy(resnet)
    net.maxpool = nn.Identity()
    net.layer1[0].conv2.stride = net.layer1[0].downsample[0].stride = (2, 2)
    b, c, t, h, w = x.shape
    y = net.relu(net.bn1(net.conv1(x.transpose(1, 2).reshape(b * t, c, h, w))))
    y = net.layer4(net.layer3(net.layer2(net.layer1(y))))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


def test_tada2d_from_torchvision_resnet_equals_r2d_at_initialisation(resnet_file):
    resnet, path = resnet_file
    model = build_backbone(cfg(name="tada2d_r50", depths=DEPTHS, pretrained=str(path))).eval()
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (2048, 1, 32)
    x = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        ours, ref = model(x), r2d_features(resnet, x)
    assert ours.shape == ref.shape == (2, 2048, 4, 2, 2)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # what the file lacks keeps its initialisation: every route function and b_avgpool_bn
    fresh = TAda2D(DEPTHS)
    kept = load_pretrained(fresh, str(path))
    assert sorted(kept) == sorted(n for n, m in fresh.named_modules() if isinstance(m, (RouteFunc, ZeroInitBatchNorm3d)))
    assert len(kept) == 2 * sum(DEPTHS)
    assert torch.equal(model.conv2.res_1.conv_branch.b.weight, resnet.layer1[0].conv2.weight[None, None])
    # a file from before torch 0.4.1 (the official code's resnet50 download) has no num_batches_tracked
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path.with_name("old.pth"))
    load_pretrained(TAda2D(DEPTHS), str(path.with_name("old.pth")))


def official_tada2d_state(depths=(3, 4, 6, 3), classes=400) -> dict[str, torch.Tensor]:
    """A state dict with the official TAda2D-R50 checkpoint's key names and shapes, written from
    the official modules (ResNet3D + Base2DStem + Base3DResStage of Base3DBlock / TAda2DBlock,
    RouteFuncMLP, BaseHead), not from ours."""
    gen = torch.Generator().manual_seed(0)
    state = {}

    def t(key, *shape):
        state[f"backbone.{key}"] = torch.randn(shape, generator=gen)

    def bn(key, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            t(f"{key}.{name}", c)
        state[f"backbone.{key}.num_batches_tracked"] = torch.tensor(100)

    t("conv1.a.weight", 64, 3, 1, 7, 7)
    bn("conv1.a_bn", 64)
    filters = [64, 256, 512, 1024, 2048]
    for s, depth in enumerate(depths, start=1):
        for j in range(depth):
            block = f"conv{s + 1}.res_{j + 1}"
            cin, cout, inner = filters[s - 1] if j == 0 else filters[s], filters[s], filters[s] // 4
            if j == 0:
                t(f"{block}.short_cut.weight", cout, cin, 1, 1, 1)
                bn(f"{block}.short_cut_bn", cout)
            branch = f"{block}.conv_branch"
            t(f"{branch}.a.weight", inner, cin, 1, 1, 1)
            bn(f"{branch}.a_bn", inner)
            t(f"{branch}.b.weight", 1, 1, inner, inner, 3, 3)
            t(f"{branch}.b_rf.g.weight", inner, inner, 1, 1, 1)
            t(f"{branch}.b_rf.g.bias", inner)
            t(f"{branch}.b_rf.a.weight", inner // 4, inner, 3, 1, 1)
            t(f"{branch}.b_rf.a.bias", inner // 4)
            bn(f"{branch}.b_rf.bn", inner // 4)
            t(f"{branch}.b_rf.b.weight", inner, inner // 4, 3, 1, 1)
            bn(f"{branch}.b_bn", inner)
            bn(f"{branch}.b_avgpool_bn", inner)
            t(f"{branch}.c.weight", cout, inner, 1, 1, 1)
            bn(f"{branch}.c_bn", cout)
    state["head.out.weight"], state["head.out.bias"] = torch.randn(classes, 2048, generator=gen), torch.randn(classes, generator=gen)
    return state


def test_official_tada2d_checkpoint_loads_unrenamed(tmp_path):
    state = official_tada2d_state()
    path = tmp_path / "tada2d_8x8.pyth"
    torch.save({"epoch": 100, "model_state": state, "cfg": "MODEL: {NAME: TAda2D}"}, path)  # as save_checkpoint writes it
    want = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    for reversible in (False, True):
        model = build_backbone(cfg(name="tada2d_r50", reversible=reversible))
        assert load_pretrained(model, str(path)) == []  # nothing missing, nothing kept from init
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------------------------
# SlowFast + TAdaConv


def test_pytorchvideo_slowfast_loads_into_slowfast_tada_and_equals_slowfast(tmp_path):
    from pytorchvideo.models.hub.slowfast import slowfast_r50

    torch.manual_seed(0)
    reference = slowfast_r50(pretrained=False)
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": perturb(reference).state_dict()}, path)
    plain = build_backbone(cfg(name="slowfast_r50", pretrained=str(path))).eval()
    tada = build_backbone(cfg(name="slowfast_r50", tadaconv=True, pretrained=str(path))).eval()
    file_keys = {k for k in torch.load(path, weights_only=True)["model_state"] if not k.startswith("blocks.6.")}
    route_keys = {k for k in tada.state_dict() if ".conv_b_rf." in k}
    assert tada.state_dict().keys() == file_keys | route_keys and route_keys
    assert all(tada.state_dict()[k].shape == plain.state_dict()[k].shape for k in file_keys)
    assert isinstance(tada.blocks[1].multipathway_blocks[1].res_blocks[0].branch2.conv_b, TAdaConv2d)
    kept = load_pretrained(build_backbone(cfg(name="slowfast_r50", tadaconv=True)), str(path))
    assert {k for k in route_keys if any(k.startswith(n + ".") for n in kept)} == route_keys
    assert len(kept) == 2 * (3 + 4 + 6 + 3)  # one per bottleneck of each pathway
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(tada(x), plain(x))


# --------------------------------------------------------------------------------------------
# Re²


@pytest.mark.parametrize("name", ["tada2d_r50", "slowfast_r50"])
def test_re2_tada_gradients_and_statistics_equal_vanilla_autograd(name):
    """First block of each stage ordinary, the others ReLU-in inside a RevStage; the reversible
    backward gives plain autograd's gradients through the same rewired net, and BatchNorm
    statistics (route functions' included) are updated once, as vanilla's."""
    torch.manual_seed(0)
    extra = {"tadaconv": True} if name == "slowfast_r50" else {}
    model = perturb(build_backbone(cfg(name=name, reversible=True, depths=[1, 2, 2, 1], **extra))).train()
    stage = model.conv3 if name == "tada2d_r50" else model.blocks[2].multipathway_blocks[0].res_blocks
    assert isinstance(stage, RevStage) and stage.lead == 1 and all(isinstance(b, ReluIn) for b in stage.reversible_blocks())
    x = torch.randn(2, 3, 4 if name == "tada2d_r50" else 8, 32, 32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results, stats = {}, {}
    for vanilla in (True, False):
        model.load_state_dict(initial)
        set_vanilla(model, vanilla)
        results[vanilla] = loss_grads(model, x)
        stats[vanilla] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    (yv, xv, pv), (yr, xr, pr) = results[True], results[False]
    assert rel(yr, yv) <= 1e-5
    assert pr.keys() == pv.keys() == {k for k, _ in model.named_parameters()}
    # a route function's `a` feeds a training-mode BatchNorm, which removes any per-channel
    # shift: the gradient of a's bias is zero up to rounding in both, so compared absolutely
    zero = {k for k in pv if k.endswith("_rf.a.bias")}
    assert zero and all(max(pr[k].abs().max(), pv[k].abs().max()) <= 1e-4 * xv.abs().max() for k in zero)
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv.keys() - zero) <= 1e-4
    assert all(torch.equal(stats[True][k], stats[False][k]) for k in stats[True])
    route_mean = next(k for k in stats[False] if ".b_rf.bn.running_mean" in k or ".conv_b_rf.bn.running_mean" in k)
    assert not torch.equal(stats[False][route_mean], initial[route_mean])


def test_re2_tada2d_with_frozen_batchnorm_in_samples_gradients_equal_whole_vanilla(monkeypatch):
    """norm_eval: every BatchNorm (route functions' included) uses running statistics, so a
    bottleneck, whose route function pools over T, H, W of one sample, runs sample by sample."""
    from test_backbones import record_pieces
    from test_zoo import grads_match

    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = perturb(build_backbone(cfg(name="tada2d_r50", reversible=True, norm_eval=True, piece_size=1, depths=[1, 2, 2, 1]))).train()
    grads_match(model, torch.randn(3, 3, 4, 32, 32))
    assert {(0, 0, 1, 3), (0, 2, 1, 3)} <= set(seen)


def test_re2_tada2d_keeps_no_block_activations_and_checkpointing_and_freezing_work():
    kept = {}
    for reversible in (False, True):
        for depth in (2, 4):
            model = build_backbone(cfg(name="tada2d_r50", reversible=reversible, depths=[1, 1, depth, 1])).train()
            kept[reversible, depth] = saved_bytes(model, torch.randn(1, 3, 4, 32, 32))
    assert kept[False, 4] > kept[False, 2] * 1.2
    assert kept[True, 4] == kept[True, 2] < kept[False, 2]
    # activation checkpointing: the standard gradients, statistics updated once
    torch.manual_seed(0)
    std = perturb(build_backbone(cfg(name="tada2d_r50", depths=[1, 2, 2, 1]))).train()
    ckpt = build_backbone(cfg(name="tada2d_r50", depths=[1, 2, 2, 1], activation_checkpointing=True)).train()
    assert isinstance(ckpt.conv3, CheckpointedSequential) and list(ckpt.state_dict()) == list(std.state_dict())
    ckpt.load_state_dict(std.state_dict())
    x = torch.randn(2, 3, 4, 32, 32)
    (ys, xs, ps), (yc, xc, pc) = loss_grads(std, x), loss_grads(ckpt, x)
    assert torch.allclose(ys, yc, atol=1e-6) and rel(xc, xs) <= 1e-5 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-5
    assert all(torch.allclose(ckpt.state_dict()[k], v, atol=1e-6) for k, v in std.state_dict().items() if "running" in k)
    # frozen_stages=1: the stem and res2 train nothing and stay in eval mode; norm_eval: no BN updates
    model = build_backbone(cfg(name="tada2d_r50", reversible=True, depths=[1, 2, 2, 1], frozen_stages=1, norm_eval=True)).train()
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "conv2."))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, grads = loss_grads(model, x)
    assert grads and not any(k.startswith(("conv1.", "conv2.")) for k in grads) and "conv3.res_2.conv_branch.b_rf.a.weight" in grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_config_checks():
    tada = BackboneConfig(name="tada2d_r50")
    assert (tada.depths, tada.temporal_stride, tada.spatial_stride) == ([3, 4, 6, 3], 1, 32)
    with pytest.raises(ValueError, match="tadaconv: only slowfast_\\* take TAdaConv in \\(tada2d_r50 has it built in\\)"):
        BackboneConfig(name="tada2d_r50", tadaconv=True)
    with pytest.raises(ValueError, match="depths: tada2d_r50 has 4 stages"):
        BackboneConfig(name="tada2d_r50", depths=[1, 1, 1])
    assert BackboneConfig(name="slowfast_r101", tadaconv=True).tadaconv


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_short_deepspeed_training_run_of_each_new_backbone(tmp_path):
    """`re2tal train --local` (Ray Train local mode: DeepSpeed ZeRO-2 on CPU in the process), one
    epoch on a tiny synthetic set, for Re²TAda2D and Re²SlowFast+TAdaConv at reduced depths. Each
    run is its own process (DeepSpeed keeps process-group state across runs in one process); the
    two run side by side."""
    import os
    import subprocess
    import sys

    from re2tal.config import StorageConfig, validate
    from re2tal.data.synth import write_synthetic
    from test_training import ROOT, SYNTH, TINY

    write_synthetic(str(tmp_path / "synth"), SYNTH, StorageConfig())
    runs = {}
    for name, backbone in (("tada2d", {"name": "tada2d_r50", "depths": [1, 2, 1, 1]}),
                           ("slowfast-tada", {"name": "slowfast_r50", "tadaconv": True, "depths": [1, 2, 1, 1]})):
        tree = {section: dict(values) for section, values in TINY.items()}
        tree["data"] |= {"annotations": str(tmp_path / "synth" / "annotations.json"), "num_frames": 8}
        tree["backbone"] = {**backbone, "reversible": True}
        tree["train"] |= {"name": name, "storage_path": str(tmp_path / "runs"), "num_workers": 0, "epochs": 1}
        tree["tracking"] = {"enabled": False}
        path = tmp_path / f"{name}.yaml"
        path.write_text(validate(tree).to_yaml())
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        runs[name] = subprocess.Popen([sys.executable, "-m", "re2tal.cli", "train", "--config", str(path), "--local"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "average mAP" in out
        # one worker, 4 training videos: 4 optimizer steps, then the epoch's checkpoint
        assert (tmp_path / "runs" / name / "epoch0001-step00000004" / "state").is_dir()
