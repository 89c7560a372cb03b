"""Backbones: Video Swin-T (also with TPS in its 3-D windows) against torchvision's swin3d_t,
SlowFast against pytorchvideo's, weight loading, temporal patch shift, and Re² reversible
rewiring (gradients equal to plain autograd, activations not kept). PST-T against its authors'
code: tests/test_pst.py."""

from __future__ import annotations

import fsspec
import pytest
import torch
from pytorchvideo.models.hub.slowfast import slowfast_r50, slowfast_r101
from torchvision.models.video import swin3d_t
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d, SwinTransformer3d

from re2tal.backbones import PATTERNS, TemporalPatchShift, build_backbone
from re2tal.backbones.build import CheckpointedSequential
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.backbones.swin import SwinBlock, WindowAttention3d
from re2tal.config import BackboneConfig
from re2tal.errors import BadInput
from re2tal.rev import Pieces, ReluIn, RevStage

# The reduced Swin of the local debug mode; PST's attends in 2-D windows.
SMALL = dict(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=(8, 4, 4))
PST_SMALL = {**SMALL, "window_size": (1, 4, 4)}


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    return swin3d_t().eval()  # random weights, seeded; nothing downloads


@pytest.fixture(scope="module")
def tv_weights(tv_model, tmp_path_factory):
    """torchvision's full state dict (classifier included), as a user's weight file."""
    path = tmp_path_factory.mktemp("weights") / "swin3d_t.pth"
    torch.save(tv_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tv_small_weights(tmp_path_factory):
    """A torchvision-layout file of the reduced (debug-mode) Swin."""
    torch.manual_seed(0)
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                              window_size=[8, 4, 4], num_classes=5)
    path = tmp_path_factory.mktemp("weights") / "swin3d_small.pth"
    torch.save(model.state_dict(), path)
    return path


def tv_features(model, x):
    """torchvision swin3d_t's features + norm, channels first: what our backbone must equal."""
    return model.norm(model.features(model.patch_embed(x))).permute(0, 4, 1, 2, 3)


def cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"reversible": False, "drop_path": 0.0, **kw})


def set_vanilla(model, vanilla: bool) -> None:
    stages = [m for m in model.modules() if isinstance(m, RevStage)]
    assert stages
    for s in stages:
        s.vanilla = vanilla


def loss_grads(model, x, seed=None):
    """Output, input grad and parameter grads of a fixed random projection of the output."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = model(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def record_pieces(monkeypatch) -> list[tuple[int, int, int, int]]:
    """(dim, start, length, size) of every piece a residual function runs on from now on."""
    seen = []
    call = Pieces.call

    def recording(self, fn, x, start, size):
        seen.append((self.dim, start, x.shape[self.dim], size))
        return call(self, fn, x, start, size)

    monkeypatch.setattr(Pieces, "call", recording)
    return seen


# --------------------------------------------------------------------------------------------
# Video Swin-T == torchvision swin3d_t


# (1, 3, 24, 64, 64): T'=12 pads to 16 under a temporal window shift; 16x16 pads to 21x21,
#   windows shrink to the input in stages 3-4.
# (2, 3, 8, 112, 112): batch of 2; the temporal window shrinks to T'=4; 28x28 needs no padding;
#   stage 4 merges an odd 7x7 (112 is not a multiple of 32), as the memory benchmark does.
@pytest.mark.parametrize("shape", [(1, 3, 24, 64, 64), (2, 3, 8, 112, 112)])
def test_swin_t_equals_torchvision_features(tv_model, tv_weights, shape):
    model = build_backbone(cfg(name="swin_t", pretrained=str(tv_weights))).eval()
    torch.manual_seed(1)
    x = torch.randn(shape)
    with torch.no_grad():
        ours, ref = model(x), tv_features(tv_model, x)
    b, _, t, h, w = shape
    assert ours.shape == (b, 768, t // 2, -(-h // 32), -(-w // 32)) == ref.shape
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (768, 2, 32)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_torchvision_state_dict_loads_unrenamed(tv_model, tv_weights):
    """Every key of the file except the classifier lands in the same-named tensor, for the
    standard and the reversible model alike."""
    file_state = torch.load(tv_weights, weights_only=True)
    expected = {k: v for k, v in file_state.items() if not k.startswith("head.")}
    for reversible in (False, True):
        model = build_backbone(cfg(name="swin_t", reversible=reversible, pretrained=str(tv_weights)))
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_weights_load_through_fsspec_url(tv_weights):
    fs = fsspec.filesystem("memory")
    fs.pipe("/w/swin.pth", tv_weights.read_bytes())
    model = build_backbone(cfg(name="swin_t", patch_shift={}, reversible=True, pretrained="memory://w/swin.pth"))
    want = torch.load(tv_weights, weights_only=True)["features.4.5.mlp.3.weight"]
    assert torch.equal(model.state_dict()["features.4.5.mlp.3.weight"], want)


def test_bad_weight_files_name_key_and_file(tv_small_weights, tmp_path):
    state = torch.load(tv_small_weights, weights_only=True)

    def save(name, obj):
        path = tmp_path / name
        torch.save(obj, path)
        return str(path)

    cases = {
        save("missing.pth", {k: v for k, v in state.items() if k != "features.4.1.attn.qkv.weight"}): "missing key features.4.1.attn.qkv.weight",
        save("extra.pth", {**state, "features.9.weight": torch.zeros(1)}): "unexpected key features.9.weight",
        save("shape.pth", {**state, "norm.weight": torch.zeros(5)}): "norm.weight has shape [5], the model needs [192]",
        save("nested.pth", {"weights": state}): "not a flat state dict of tensors",
    }
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    cases[str(garbage)] = "is not a torch state dict"
    cases[str(tmp_path / "absent.pth")] = "does not exist"
    for path, message in cases.items():
        with pytest.raises(BadInput) as err:
            build_backbone(cfg(name="swin_t", pretrained=path, **SMALL))
        assert message in str(err.value) and path in str(err.value) and "\n" not in str(err.value)
    # a training checkpoint holding the state dict under model_state / state_dict is unwrapped
    model = build_backbone(cfg(name="swin_t", pretrained=save("ckpt.pth", {"model_state": state, "epoch": 3}), **SMALL))
    assert torch.equal(model.state_dict()["norm.weight"], state["norm.weight"])
    # the config's sizes must match the file's too
    with pytest.raises(BadInput, match="relative_position_bias_table has shape"):
        build_backbone(cfg(name="swin_t", pretrained=str(tv_small_weights), **{**SMALL, "window_size": (4, 4, 4)}))


# --------------------------------------------------------------------------------------------
# temporal patch shift


def naive_shift(x, pattern, sign):
    """y[:, t, h, w] = x[:, (t - sign * o[h, w]) mod T, h, w], by loops."""
    tile = PATTERNS[pattern]
    y = torch.empty_like(x)
    t = x.shape[1]
    for h in range(x.shape[2]):
        for w in range(x.shape[3]):
            o = tile[h % len(tile)][w % len(tile[0])]
            for f in range(t):
                y[:, f, h, w] = x[:, (f - sign * o) % t, h, w]
    return y


def test_patterns_are_the_papers_tiles():
    """TPS supplement, Fig. 1: frame offsets of each patch position; C spans 9 consecutive
    frames, D 16, each frame exactly once."""
    figure = {
        "A": [[0, 1], [-1, 0]],
        "B": [[0, 1], [-1, 2]],
        "C": [[-4, 1, 2], [-1, 0, 3], [-2, -3, 4]],
        "D": [[0, 1, 2, 3], [-1, -7, 4, 5], [-2, -4, 7, 6], [-3, -5, -6, 8]],
    }
    for name, tile in figure.items():
        # the layout a shift produces: a clip whose every token holds its frame index
        t, rows, cols = 20, 2 * len(tile), 2 * len(tile[0]) + 1
        frames = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1).expand(1, t, rows, cols, 1)
        got = TemporalPatchShift(name, "cyclic", ShapeCache())(frames)
        for h in range(rows):
            for w in range(cols):
                offset = tile[h % len(tile)][w % len(tile[0])]
                assert torch.equal(got[0, :, h, w, 0], (torch.arange(t) - offset).remainder(t).float()), (name, h, w)
    assert sorted(v for row in figure["C"] for v in row) == list(range(-4, 5))
    assert sorted(v for row in figure["D"] for v in row) == list(range(-7, 9))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_shift_then_shift_back_is_identity(pattern):
    torch.manual_seed(0)
    for t in (3, 16):  # shorter and longer than the pattern's span
        x = torch.randn(2, t, 9, 10, 4)
        cyclic = TemporalPatchShift(pattern, "cyclic", ShapeCache())
        shifted = cyclic(x)
        assert torch.equal(shifted, naive_shift(x, pattern, +1))
        assert torch.equal(cyclic(shifted, inverse=True), x)
        # zero boundary: a token survives the round trip iff the shift kept it inside the
        # clip (frame t + o exists); the others were shifted out and come back as zeros
        zero = TemporalPatchShift(pattern, "zero", ShapeCache())
        back = zero(zero(x), inverse=True)
        kept = torch.zeros(1, t, 9, 10, 1, dtype=torch.bool)
        for h in range(9):
            for w in range(10):
                o = PATTERNS[pattern][h % len(PATTERNS[pattern])][w % len(PATTERNS[pattern][0])]
                kept[0, :, h, w, 0] = (torch.arange(t) + o >= 0) & (torch.arange(t) + o < t)
        assert torch.equal(back, torch.where(kept, x, torch.zeros(())))


@pytest.mark.parametrize("boundary", ["cyclic", "zero"])
def test_tps_in_swin_attention_is_shifted_swin_attention(boundary):
    """Swin-T + TPS (ours): its window attention = shift back(torchvision's attention(shift(x))):
    q, k, v see the shifted patches, the result returns to its frame."""
    torch.manual_seed(0)
    dim, heads, window, shift = 32, 2, [4, 4, 4], [2, 2, 2]
    ref = ShiftedWindowAttention3d(dim, window, shift, heads).eval()
    tps = TemporalPatchShift("C", boundary, ShapeCache())
    ours = WindowAttention3d(dim, heads, tuple(window), tuple(shift), ShapeCache(), tps).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 9, 7, dim)  # every axis padded to the window
    with torch.no_grad():
        got = ours(x)
        want = tps(ref(tps(x)), inverse=True)
    if boundary == "cyclic":
        assert torch.allclose(want, naive_shift(ref(naive_shift(x, "C", +1)), "C", -1), atol=1e-6)
    assert (got - want).abs().max().item() <= 1e-5


def test_tps_in_swin_blocks_and_parameters(tv_small_weights):
    """swin_t + patch_shift: TPS in the chosen blocks, swin3d_t's weights, zero new parameters."""
    swin = build_backbone(cfg(name="swin_t", pretrained=str(tv_small_weights), **SMALL)).eval()
    for blocks, expect in (("alternate", lambda i: i % 2 == 1), ("all", lambda i: True)):
        tps = build_backbone(cfg(name="swin_t", pretrained=str(tv_small_weights), patch_shift={"blocks": blocks}, **SMALL))
        shifted = [(s, i) for s in tps.stage_blocks() for i, b in enumerate(tps.features[s]) if b.attn.patch_shift is not None]
        assert shifted == [(s, i) for s in tps.stage_blocks() for i in range(len(tps.features[s])) if expect(i)]
        assert all((tps.features[s][i].attn.patch_shift.pattern, tps.features[s][i].attn.patch_shift.boundary) == ("C", "cyclic") for s, i in shifted)
        assert sum(p.numel() for p in tps.parameters()) == sum(p.numel() for p in swin.parameters())
    x = torch.randn(1, 3, 16, 64, 64)
    with torch.no_grad():
        assert (tps.eval()(x) - swin(x)).abs().max() > 1e-3  # the shift changes the features


# --------------------------------------------------------------------------------------------
# reversible (Re²) and checkpointed


def test_re2_swin_t_gradients_equal_vanilla_autograd(tv_weights):
    """Full Swin-T, fp32: the reversible backward (recomputing activations) gives the gradients
    of plain autograd through the same rewired network."""
    model = build_backbone(cfg(name="swin_t", reversible=True, pretrained=str(tv_weights))).train()
    x = torch.randn(1, 3, 24, 32, 32)  # T'=12: padded, temporally shifted windows
    set_vanilla(model, True)
    yv, xv, pv = loss_grads(model, x)
    set_vanilla(model, False)
    yr, xr, pr = loss_grads(model, x)
    assert torch.allclose(yr, yv, atol=1e-5)
    assert pr.keys() == pv.keys() == {k for k, p in model.named_parameters()}
    assert rel(xr, xv) <= 1e-4
    assert max(rel(pr[k], pv[k]) for k in pv) <= 1e-4


@pytest.mark.parametrize("name, sizes", [("swin_t", SMALL), ("pst_t", PST_SMALL)])
def test_reversible_with_drop_path_replays_it(name, sizes):
    """Training mode with stochastic depth: recomputation draws the same drops."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name=name, reversible=True, drop_path=0.5, **sizes)).train()
    x = torch.randn(2, 3, 16, 64, 64)
    set_vanilla(model, True)
    yv, xv, pv = loss_grads(model, x, seed=3)
    set_vanilla(model, False)
    yr, xr, pr = loss_grads(model, x, seed=3)
    assert torch.allclose(yr, yv, atol=1e-5)
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv) <= 1e-4


def test_re2_swin_in_pieces_gradients_equal_whole_vanilla(monkeypatch):
    """Pieces of one window along T (piece_size 1) at T' = 13 tokens: unshifted windows cut at 8
    (a ragged last piece of 5), shifted ones at 4 and 12, so the window that wraps around the
    clip's end has its two regions in the first and the last piece; drop path on. Output, input
    and every parameter's gradient equal plain autograd through whole functions."""
    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="swin_t", reversible=True, drop_path=0.5, piece_size=1, **SMALL)).train()
    x = torch.randn(2, 3, 26, 64, 64)
    set_vanilla(model, True)
    yv, xv, pv = loss_grads(model, x, seed=3)
    assert not seen
    set_vanilla(model, False)
    yr, xr, pr = loss_grads(model, x, seed=3)
    assert {(1, 8, 5, 13), (1, 4, 8, 13), (1, 12, 1, 13), (1, 7, 1, 13)} <= set(seen)
    assert torch.allclose(yr, yv, atol=1e-5)
    assert pr.keys() == pv.keys() == {k for k, _ in model.named_parameters()}
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv) <= 1e-4


@pytest.mark.parametrize("name, sizes", [("swin_t", SMALL), ("slowfast_r50", {"depths": [1, 2, 1, 1]})])
def test_re2_runs_the_layers_between_its_stages_checkpointed(name, sizes):
    """Patch embedding and merges (Swin), stems (SlowFast) keep only their inputs in a Re² model:
    same keys, output and gradients as with them run plainly, and fewer bytes kept."""
    from re2tal.backbones.build import CheckpointedForward

    torch.manual_seed(0)
    model = build_backbone(cfg(name=name, reversible=True, **sizes)).train()
    assert model.transitions() and all(isinstance(model.get_submodule(n).forward, CheckpointedForward) for n in model.transitions())
    x = torch.randn(2, 3, 8, 64, 64)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    got, kept = loss_grads(model, x), saved_bytes(model, x.clone())
    for n in model.transitions():
        del model.get_submodule(n).forward  # the class's own forward again
    model.load_state_dict(initial)
    want, kept_plain = loss_grads(model, x), saved_bytes(model, x.clone())
    assert list(model.state_dict()) == list(initial)
    assert torch.equal(got[0], want[0]) and rel(got[1], want[1]) <= 1e-6 and max(rel(got[2][k], want[2][k]) for k in want[2]) <= 1e-6
    assert kept < kept_plain


def test_checkpointing_gives_standard_gradients():
    torch.manual_seed(0)
    std = build_backbone(cfg(name="pst_t", drop_path=0.3, **PST_SMALL)).train()
    ckpt = build_backbone(cfg(name="pst_t", drop_path=0.3, activation_checkpointing=True, **PST_SMALL)).train()
    assert all(isinstance(getattr(parent, name), CheckpointedSequential) for parent, name, _ in ckpt.residual_stages())
    ckpt.load_state_dict(std.state_dict())
    x = torch.randn(1, 3, 16, 64, 64)
    ys, xs, ps = loss_grads(std, x, seed=5)
    yc, xc, pc = loss_grads(ckpt, x, seed=5)
    assert torch.equal(ys, yc) and rel(xc, xs) <= 1e-6 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-6


def saved_bytes(model, x) -> int:
    """Bytes of distinct floating-point tensors autograd keeps for backward during one forward
    (activations; RevStage's RNG states for drop-path replay, uint8, are left out)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_()).sum()
    return sum(seen.values())


def kept_by_depth(x, depths_of, **kw) -> dict[tuple[bool, int], int]:
    """{(reversible, depth): saved_bytes} of the backbone cfg(**kw, depths=depths_of(depth)) in
    training mode, standard and Re², for depth 2 and 5."""
    return {(reversible, depth): saved_bytes(build_backbone(cfg(reversible=reversible, depths=depths_of(depth), **kw)).train(), x.clone())
            for reversible in (False, True) for depth in (2, 5)}


def test_reversible_keeps_no_block_activations():
    """Standard Swin keeps activations growing with depth; Re² keeps the same whatever the
    number of blocks (stage outputs, patch embedding and merges only)."""
    x = torch.randn(1, 3, 16, 64, 64)
    kept = {}
    for reversible in (False, True):
        for depth in (2, 6):
            sizes = {**SMALL, "depths": [1, 1, depth, 1]}
            kept[reversible, depth] = saved_bytes(build_backbone(cfg(name="swin_t", reversible=reversible, **sizes)).train(), x)
    assert kept[False, 6] > kept[False, 2] * 1.3
    assert kept[True, 6] == kept[True, 2]
    assert kept[True, 2] < kept[False, 2] / 3


# --------------------------------------------------------------------------------------------
# long clips, frozen stages, block interface


def test_long_clip_same_path_and_fixed_mask_memory():
    """T = 768 frames runs through the same code; the cached masks do not grow with T."""
    # a shifted-window block in stage 0 (8x8 tokens, windows 4x4), where the region masks are used
    model = build_backbone(cfg(name="pst_t", reversible=True, **{**PST_SMALL, "depths": [2, 1, 2, 1]})).eval()
    masks = {}
    for t in (32, 768):
        model.cache._items.clear()
        with torch.no_grad():
            y = model(torch.randn(1, 3, t, 32, 32))
        assert y.shape == (1, 192, t // 2, 1, 1) and torch.isfinite(y).all()
        masks[t] = sum(v.numel() for k, v in model.cache._items.items() if k[0] == "swin-mask")
    assert masks[768] == masks[32] > 0


def test_frozen_stages_and_norm_eval():
    model = build_backbone(cfg(name="swin_t", reversible=True, drop_path=0.5, frozen_stages=1, norm_eval=True, **SMALL))
    model.train()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("patch_embed.", "features.0.", "features.1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("features.2.", "norm.")))
    assert not model.patch_embed.training and not model.features[0].training and not model.features[1].training
    assert model.features[2].training and model.norm.training
    x = torch.randn(1, 3, 16, 64, 64)
    _, _, grads = loss_grads(model, x)
    assert not any(k.startswith(("patch_embed.", "features.0.", "features.1.")) for k in grads)
    assert "features.2.0.attn.qkv.weight" in grads


def test_blocks_expose_residual_functions():
    torch.manual_seed(0)
    block = SwinBlock(24, 2, (4, 4, 4), (2, 2, 2), 0.0, ShapeCache())
    x = torch.randn(1, 8, 8, 8, 24)
    f1, f2 = block.residual_fns()
    h = x + f1(x)
    assert torch.equal(block(x), h + f2(h))


# --------------------------------------------------------------------------------------------
# SlowFast == pytorchvideo's, Re²SlowFast


@pytest.fixture(scope="module")
def pv_slowfast_r50(tmp_path_factory):
    """pytorchvideo's SlowFast-R50 (random weights, seeded) and its checkpoint file, wrapped as
    the model zoo's .pyth files are: {"model_state": state dict}."""
    torch.manual_seed(0)
    model = slowfast_r50(pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": model.state_dict(), "epoch": 196}, path)
    return model, path


def pv_features(model, x, alpha=4):
    """pytorchvideo's SlowFast up to res5 on (every alpha-th frame, every frame), in our output
    form: slow features and fast ones averaged over alpha frames, concatenated."""
    paths = [x[:, :, ::alpha], x]
    for block in model.blocks[:5]:
        paths = block(paths)
    slow, fast = paths
    return torch.cat([slow, torch.nn.functional.avg_pool3d(fast, (alpha, 1, 1))], 1)


def test_slowfast_r50_equals_pytorchvideo_features(pv_slowfast_r50):
    reference, path = pv_slowfast_r50
    model = build_backbone(cfg(name="slowfast_r50", pretrained=str(path))).eval()
    x = torch.randn(2, 3, 16, 64, 96)
    with torch.no_grad():
        ours, ref = model(x), pv_features(reference, x)
    assert ours.shape == (2, 2304, 4, 2, 3) == ref.shape
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (2304, 4, 32)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_pytorchvideo_slowfast_state_dicts_load_unrenamed(pv_slowfast_r50):
    """Every key of the file but the classifier lands in the same-named tensor, standard and
    reversible alike; R101 has the same key layout and shapes as pytorchvideo's (fusion kernel 5)."""
    _, path = pv_slowfast_r50
    expected = {k: v for k, v in torch.load(path, weights_only=True)["model_state"].items() if not k.startswith("blocks.6.")}
    for reversible in (False, True):
        state = build_backbone(cfg(name="slowfast_r50", reversible=reversible, pretrained=str(path))).state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    with torch.device("meta"):
        r101 = {k: v.shape for k, v in slowfast_r101(pretrained=False).state_dict().items() if not k.startswith("blocks.6.")}
        ours = build_backbone(cfg(name="slowfast_r101", reversible=True))
    assert {k: v.shape for k, v in ours.state_dict().items()} == r101
    assert sum(len(s) for s in ours.modules() if isinstance(s, RevStage)) == 2 * (3 + 4 + 23 + 3)


def test_re2_slowfast_is_relu_in_rewired_and_gradients_equal_vanilla_autograd():
    """Each stage's projecting first block becomes P(x) + ReLU(F(x)) and runs first (as the
    authors' Re²SlowFast); blocks 1.. become x + ReLU(F(x)) in a reversible stage, whose
    backward gives plain autograd's gradients. BatchNorm statistics are
    updated once per forward, not again by the recomputation."""
    torch.manual_seed(0)
    model = build_backbone(cfg(name="slowfast_r50", reversible=True, depths=[2, 2, 3, 2])).train()
    stage = model.blocks[3].multipathway_blocks[1].res_blocks
    assert isinstance(stage, RevStage) and stage.lead == 1
    assert all(isinstance(b, ReluIn) for b in stage) and stage[0].branch1_conv is not None
    with torch.no_grad():
        h = torch.randn(1, stage[0].branch1_conv.in_channels, 4, 8, 8)
        lead = stage[0]
        assert torch.equal(lead(h), lead.branch1_norm(lead.branch1_conv(h)) + torch.relu(lead.branch2(h)))
    x = torch.randn(2, 3, 16, 64, 64)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results, stats = {}, {}
    for vanilla in (True, False):
        model.load_state_dict(initial)
        set_vanilla(model, vanilla)
        results[vanilla] = loss_grads(model, x)
        stats[vanilla] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    (yv, xv, pv), (yr, xr, pr) = results[True], results[False]
    assert torch.allclose(yr, yv, atol=1e-5 * yv.abs().max().item())
    assert pr.keys() == pv.keys() == {k for k, p in model.named_parameters()}
    # the slow res2 shortcut BN's bias reaches the output only through train-mode BatchNorms,
    # which cancel a per-channel constant: its true gradient is 0, both paths give rounding noise
    # (~1e-4 against ~1e2 for its weight), so gradients are compared with an absolute floor
    # of 1e-6 x the largest gradient.
    scale = max(g.norm().item() for g in pv.values())
    assert rel(xr, xv) <= 1e-4 and all((pr[k] - pv[k]).norm() <= 1e-4 * pv[k].norm() + 1e-6 * scale for k in pv)
    assert not torch.equal(stats[False]["blocks.3.multipathway_blocks.1.res_blocks.1.branch2.norm_a.running_mean"],
                           initial["blocks.3.multipathway_blocks.1.res_blocks.1.branch2.norm_a.running_mean"])


def test_re2_slowfast_with_frozen_batchnorm_runs_its_bottlenecks_sample_by_sample(monkeypatch):
    """norm_eval: BatchNorm normalises with running statistics, so a bottleneck is local along
    the batch and runs one sample at a time; with batch statistics (training mode) it runs whole."""
    from test_zoo import grads_match

    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = build_backbone(cfg(name="slowfast_r50", reversible=True, norm_eval=True, piece_size=1, depths=[2, 2, 2, 2])).train()
    x = torch.randn(3, 3, 8, 32, 32)
    grads_match(model, x)
    assert {(0, 1, 1, 3), (0, 2, 1, 3)} <= set(seen)
    stage = model.blocks[1].multipathway_blocks[0].res_blocks
    assert stage.residual_pieces() == [Pieces(0)]
    stage[1].branch2.norm_b.train()
    assert stage.residual_pieces() == [None]


def test_re2_slowfast_keeps_no_block_activations_and_checkpointing_keeps_gradients_and_statistics():
    kept = kept_by_depth(torch.randn(1, 3, 16, 64, 64), lambda depth: [1, 2, depth, 1], name="slowfast_r50")
    assert kept[False, 5] > kept[False, 2] * 1.2
    assert kept[True, 5] == kept[True, 2] < kept[False, 2]
    torch.manual_seed(0)
    std = build_backbone(cfg(name="slowfast_r50", depths=[1, 2, 2, 1])).train()
    ckpt = build_backbone(cfg(name="slowfast_r50", depths=[1, 2, 2, 1], activation_checkpointing=True)).train()
    assert isinstance(ckpt.blocks[3].multipathway_blocks[0].res_blocks, CheckpointedSequential)
    ckpt.load_state_dict(std.state_dict())
    x = torch.randn(1, 3, 16, 64, 64)
    (ys, xs, ps), (yc, xc, pc) = loss_grads(std, x), loss_grads(ckpt, x)
    assert torch.allclose(ys, yc, atol=1e-6) and rel(xc, xs) <= 1e-5 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-5
    # the recomputation does not update BatchNorm statistics a second time
    stats = [k for k in std.state_dict() if k.endswith(("running_mean", "num_batches_tracked"))]
    assert all(torch.allclose(ckpt.state_dict()[k], std.state_dict()[k], atol=1e-6) for k in stats)
    assert std.state_dict()["blocks.1.multipathway_blocks.0.res_blocks.0.branch1_norm.num_batches_tracked"] == 1


def test_slowfast_frozen_stages_and_norm_eval():
    """frozen_stages=1: stems, res2 and the fusions after them train nothing; norm_eval keeps every
    BatchNorm's statistics through a training forward."""
    model = build_backbone(cfg(name="slowfast_r50", reversible=True, depths=[1, 2, 2, 2], frozen_stages=1, norm_eval=True)).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1."))}
    assert not model.blocks[1].training and model.blocks[2].training
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms and not any(m.training for m in norms)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, grads = loss_grads(model, torch.randn(1, 3, 8, 64, 64))
    assert grads and not any(k.startswith(("blocks.0.", "blocks.1.")) for k in grads)
    assert "blocks.2.multipathway_blocks.0.res_blocks.1.branch2.conv_a.weight" in grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_slowfast_config_defaults_and_checks():
    r101 = BackboneConfig(name="slowfast_r101")
    assert (r101.depths, r101.temporal_stride, r101.spatial_stride, r101.resolved_fusion_kernel) == ([3, 4, 23, 3], 4, 32, 5)
    r50 = BackboneConfig(name="slowfast_r50", alpha=8, fusion_kernel=9)
    assert (r50.depths, r50.temporal_stride, r50.resolved_fusion_kernel) == ([3, 4, 6, 3], 8, 9)
    assert BackboneConfig(name="swin_t").depths == [2, 2, 6, 2]
    with pytest.raises(ValueError, match="depths: slowfast_r50 has 4 stages"):
        BackboneConfig(name="slowfast_r50", depths=[2, 2, 2])
    with pytest.raises(ValueError, match="fusion_kernel: must be odd"):
        BackboneConfig(name="slowfast_r50", fusion_kernel=4)
    model = build_backbone(cfg(name="slowfast_r50", alpha=8, fusion_kernel=9, depths=[1, 1, 1, 1])).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 32, 32)).shape == (1, 2304, 2, 1, 1)
