"""The published mmaction / Re²TAL checkpoints load unrenamed and compute what their authors'
code computes.

The files are mmaction Recognizer3D checkpoints {"state_dict": {"backbone.*", "cls_head.*"},
"meta": ...}. Nothing downloads: the authors' modules are ported below (their parameter names,
shapes and forwards, from mmaction2 mmaction/models/backbones/swin.py and resnet3d_slowfast.py,
and OpenTAD opentad/models/backbones/re2tal_swin.py and re2tal_slowfast.py), filled with random
weights and saved as such a file. Full-size models are only built on the meta device (keys and
shapes); features are compared at reduced sizes / depths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from re2tal.backbones import SlowFast, SwinTransformer3d, apply_reversible, build_backbone
from re2tal.config import BackboneConfig
from re2tal.errors import BadInput

# mmaction's window_partition / window_reverse / get_window_size / compute_mask, as ported in
# test_pst for the TPS authors' code (theirs are mmaction's)
from test_pst import compute_mask, get_window_size, window_partition, window_reverse

# --------------------------------------------------------------------------------------------
# port of mmaction's Video Swin and the Re²TAL authors' SwinTransformer3D_inv


class WindowAttention3D(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1), num_heads) * 0.5)
        coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window_size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window_size[0] - 1
        rel[:, :, 1] += window_size[1] - 1
        rel[:, :, 2] += window_size[2] - 1
        rel[:, :, 0] *= (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
        rel[:, :, 1] *= 2 * window_size[2] - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)].reshape(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinF(nn.Module):
    """forward_part1 of mmaction's SwinTransformerBlock3D (= Re²'s SwinTransformerBlock3D_F)."""

    def __init__(self, dim, heads, window_size, shift_size):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window_size, heads)

    def forward(self, x, mask_matrix):
        b, d, h, w, c = x.shape
        ws, ss = get_window_size((d, h, w), self.window_size, self.shift_size)
        x = self.norm1(x)
        pad_d1, pad_b, pad_r = ((ws[i] - s % ws[i]) % ws[i] for i, s in enumerate((d, h, w)))
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
        _, dp, hp, wp, _ = x.shape
        shifted = any(i > 0 for i in ss)
        x = torch.roll(x, shifts=tuple(-s for s in ss), dims=(1, 2, 3)) if shifted else x
        out = self.attn(window_partition(x, ws), mask=mask_matrix if shifted else None)
        x = window_reverse(out.view(-1, *(ws + (c,))), ws, b, dp, hp, wp)
        x = torch.roll(x, shifts=ss, dims=(1, 2, 3)) if shifted else x
        return x[:, :d, :h, :w, :].contiguous()


class SwinG(nn.Module):
    """forward_part2 (= Re²'s SwinTransformerBlock3D_G)."""

    def __init__(self, dim):
        super().__init__()
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        return self.mlp(self.norm2(x))


class SwinBlock3D(nn.Module):
    """mmaction's block: x + F(x), then + G."""

    def __init__(self, dim, heads, window_size, shift_size):
        super().__init__()
        f, g = SwinF(dim, heads, window_size, shift_size), SwinG(dim)
        self.norm1, self.attn, self.norm2, self.mlp = f.norm1, f.attn, g.norm2, g.mlp
        self._f, self._g = [f], [g]  # same modules, not registered twice

    def forward(self, x, mask):
        x = x + self._f[0](x, mask)
        return x + self._g[0](x)


class AdditiveCoupling(nn.Module):
    """Re²: (x1, x2) -> (y1 = x1 + Fm(x2), y2 = x2 + Gm(y1)), halves of the channel axis."""

    def __init__(self, dim, heads, window_size, shift_size):
        super().__init__()
        self.Fm, self.Gm = SwinF(dim, heads, window_size, shift_size), SwinG(dim)

    def forward(self, x, mask):
        x1, x2 = torch.chunk(x, 2, dim=4)
        y1 = x1 + self.Fm(x2, mask)
        return torch.cat([y1, x2 + self.Gm(y1)], dim=4)


class InvSwinBlock3D(nn.Module):
    def __init__(self, dim, heads, window_size, shift_size):
        super().__init__()
        self.inv_block = AdditiveCoupling(dim, heads, window_size, shift_size)

    def forward(self, x, mask):
        return self.inv_block(x, mask)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x):
        _, _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.proj, self.norm = nn.Conv3d(3, dim, patch_size, stride=patch_size), nn.LayerNorm(dim)

    def forward(self, x):
        _, _, d, h, w = x.size()
        p = self.patch_size
        x = F.pad(x, (0, (-w) % p[2], 0, (-h) % p[1], 0, (-d) % p[0]))
        x = self.proj(x)
        dp, hp, wp = x.shape[2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).view(-1, self.dim, dp, hp, wp)


class SwinLayer(nn.Module):
    def __init__(self, dim, depth, heads, window_size, downsample, inv):
        super().__init__()
        self.window_size, self.shift_size, self.inv = window_size, tuple(i // 2 for i in window_size), inv
        block = InvSwinBlock3D if inv else SwinBlock3D
        self.blocks = nn.ModuleList([block(dim, heads, window_size, (0, 0, 0) if i % 2 == 0 else self.shift_size)
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):  # B C D H W -> B C D' H' W'
        if self.inv:
            x = torch.cat((x, x), dim=1)
        b, c, d, h, w = x.shape
        ws, ss = get_window_size((d, h, w), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)
        mask = compute_mask(*(-(-s // win) * win for s, win in zip((d, h, w), ws)), ws, ss, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        if self.inv:
            x = (x[..., : c // 2] + x[..., c // 2:]) / 2
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


class PortSwin(nn.Module):
    """mmaction SwinTransformer3D (inv=False) / Re²TAL SwinTransformer3D_inv (inv=True), patch_norm."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=(8, 7, 7), inv=False):
        super().__init__()
        self.patch_embed = PatchEmbed3D((2, 4, 4), embed_dim)
        self.layers = nn.ModuleList([SwinLayer(embed_dim * 2**i, d, h, window_size, i < len(depths) - 1, inv)
                                     for i, (d, h) in enumerate(zip(depths, heads))])
        self.norm3 = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x.contiguous())
        return self.norm3(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


# --------------------------------------------------------------------------------------------
# port of mmaction's ResNet3dSlowFast and the authors' ResNet3dSlowFast_inv


class ConvModule(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return F.relu(x) if self.act else x


class BottleneckF(nn.Module):
    """conv1 (3x1x1 if inflated) -> conv2 (1x3x3, spatial stride) -> conv3; `relu_in`: the Re²
    Bottleneck3d_inv_F, with a ReLU at the end."""

    def __init__(self, cin, planes, stride, inflate, relu_in):
        super().__init__()
        kt = 3 if inflate else 1
        self.conv1 = ConvModule(cin, planes, (kt, 1, 1), padding=(kt // 2, 0, 0))
        self.conv2 = ConvModule(planes, planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))
        self.conv3 = ConvModule(planes, planes * 4, 1, act=False)
        self.relu_in = relu_in

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x)))
        return F.relu(out) if self.relu_in else out


class Bottleneck3d(BottleneckF):
    """mmaction's: ReLU(F(x) + identity / downsample(x))."""

    def __init__(self, cin, planes, stride, inflate, downsample):
        super().__init__(cin, planes, stride, inflate, relu_in=False)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(super().forward(x) + identity)


class InvFuncWrapper(nn.Module):
    def __init__(self, fm):
        super().__init__()
        self.Fm = fm

    def forward(self, x):
        x1, x2 = torch.chunk(x, 2, dim=1)
        return torch.cat([x2 + self.Fm(x1), x1], dim=1)


class Bottleneck3dInv(nn.Module):
    """Re²: with a downsample, cat(Fm(x) + downsample(x)) twice; else the reversible step."""

    def __init__(self, cin, planes, stride, inflate, downsample):
        super().__init__()
        fm = BottleneckF(cin, planes, stride, inflate, relu_in=True)
        self.downsample = downsample
        if downsample is None:
            self.inv_block = InvFuncWrapper(fm)
        else:
            self.Fm = fm

    def forward(self, x):
        if self.downsample is None:
            return self.inv_block(x)
        out = self.Fm(x) + self.downsample(x)
        return torch.cat((out, out), dim=1)


class InvLayer(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        c = x.shape[1] // 2
        return (x[:, :c] + x[:, c:]) / 2


class Pathway(nn.Module):
    def __init__(self, base, stage_blocks, conv1_kt, inflate, lateral, channel_ratio, speed_ratio, fusion_kernel, inv):
        super().__init__()
        self.conv1 = ConvModule(3, base, (conv1_kt, 7, 7), stride=(1, 2, 2), padding=(conv1_kt // 2, 3, 3))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.lateral = lateral
        inplanes = base
        block = Bottleneck3dInv if inv else Bottleneck3d
        self.res_layers = []
        for i, n in enumerate(stage_blocks):
            planes, stride = base * 2**i, 1 if i == 0 else 2
            cin = inplanes + (inplanes * 2 // channel_ratio if lateral else 0)
            down = ConvModule(cin, planes * 4, 1, stride=(1, stride, stride), act=False)
            blocks = [block(cin, planes, stride, inflate[i], down)] + [block(planes * 4, planes, 1, inflate[i], None) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", InvLayer(blocks) if inv else nn.Sequential(*blocks))
            self.res_layers.append(f"layer{i + 1}")
            inplanes = planes * 4
        if lateral:
            lat = lambda c: ConvModule(c // channel_ratio, c * 2 // channel_ratio, (fusion_kernel, 1, 1), stride=(speed_ratio, 1, 1),
                                       padding=((fusion_kernel - 1) // 2, 0, 0), norm=False, act=False)
            self.conv1_lateral = lat(base)
            for i in range(len(stage_blocks) - 1):
                self.add_module(f"layer{i + 1}_lateral", lat(base * 2**i * 4))


class PortSlowFast(nn.Module):
    """mmaction ResNet3dSlowFast / Re²TAL ResNet3dSlowFast_inv with resample_rate = speed_ratio
    (OpenTAD's Re²SlowFast-101: 4, 4), channel_ratio 8; forward returns (slow, fast)."""

    def __init__(self, stage_blocks=(3, 4, 23, 3), speed_ratio=4, fusion_kernel=7, inv=False):
        super().__init__()
        self.speed_ratio = speed_ratio
        self.slow_path = Pathway(64, stage_blocks, 1, (0, 0, 1, 1), True, 8, speed_ratio, fusion_kernel, inv)
        self.fast_path = Pathway(8, stage_blocks, 5, (1, 1, 1, 1), False, 8, speed_ratio, fusion_kernel, inv)

    def forward(self, x):
        xs = F.interpolate(x, mode="nearest", scale_factor=(1.0 / self.speed_ratio, 1.0, 1.0))
        xs = self.slow_path.maxpool(self.slow_path.conv1(xs))
        xf = self.fast_path.maxpool(self.fast_path.conv1(x))
        xs = torch.cat((xs, self.slow_path.conv1_lateral(xf)), dim=1)
        for i, name in enumerate(self.slow_path.res_layers):
            xs, xf = getattr(self.slow_path, name)(xs), getattr(self.fast_path, name)(xf)
            if i != len(self.slow_path.res_layers) - 1:
                xs = torch.cat((xs, getattr(self.slow_path, f"{name}_lateral")(xf)), dim=1)
        return xs, xf


# --------------------------------------------------------------------------------------------
# helpers


class Recognizer3D(nn.Module):
    """What mmaction saves: backbone + cls_head (fc_cls)."""

    def __init__(self, backbone, features):
        super().__init__()
        self.backbone = backbone
        self.cls_head = nn.Module()
        self.cls_head.fc_cls = nn.Linear(features, 400)


def randomize(model: nn.Module) -> nn.Module:
    """Every parameter and BatchNorm statistic away from its init, so each one shows in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() <= 1 else 0.5 * p.std().clamp_min(0.02)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def save_mmaction(backbone: nn.Module, features: int, path) -> str:
    state = Recognizer3D(backbone, features).state_dict()
    torch.save({"meta": {"mmaction_version": "1.x", "epoch": 30}, "state_dict": state}, path)
    return str(path)


def meta_state(model_fn) -> dict:
    with torch.device("meta"):
        return Recognizer3D(*model_fn()).state_dict()


def same_keys_and_shapes(ours: nn.Module, mapped: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mapped.items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


SWIN_SMALL = dict(embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=(8, 4, 4))
SF_SMALL = (2, 2, 3, 2)

# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("inv", [False, True], ids=["mmaction_swin_t", "re2tal_re2swin_t"])
def test_full_size_swin_t_checkpoints_map_to_every_key(inv):
    """The full Swin-T files (patch_norm, window 8x7x7) give exactly our keys and shapes."""
    state = meta_state(lambda: (PortSwin(inv=inv), 768))
    assert any(".inv_block.Fm.attn.qkv." in k for k in state) == inv
    with torch.device("meta"):
        ours = SwinTransformer3d()
    mapped = ours.checkpoint_state(state)
    same_keys_and_shapes(ours, mapped)
    assert SwinTransformer3d.trained_reversible(state) == inv


@pytest.mark.parametrize("inv", [False, True], ids=["mmaction_slowfast_r101", "re2tal_re2slowfast_101"])
def test_full_size_slowfast_r101_checkpoints_map_to_every_key(inv):
    """The full SlowFast-R101 files (fusion kernel 7, bare lateral convs) fix how ours is built
    and then give exactly its keys and shapes, also rewired."""
    state = meta_state(lambda: (PortSlowFast(inv=inv), 2304))
    opts = SlowFast.checkpoint_options(state)
    assert opts == {"fusion_norm": False, "fusion_kernel": 7}
    with torch.device("meta"):
        ours = SlowFast(depths=(3, 4, 23, 3), alpha=4, **opts)
        if inv:
            apply_reversible(ours)
    same_keys_and_shapes(ours, ours.checkpoint_state(state))
    assert SlowFast.trained_reversible(state) == inv


@pytest.mark.parametrize("shape", [(1, 3, 16, 64, 64), (2, 3, 8, 56, 72)])
def test_mmaction_and_re2tal_swin_files_give_their_features(tmp_path, shape):
    """Loaded through backbone.pretrained (reduced sizes), ours equals the authors' forward:
    mmaction's Video Swin as is, their Re²Swin rewired. (16, 64, 64): shifted 8x4x4 windows;
    (8, 56, 72): the temporal window shrinks, 14x18 pads, odd maps merge."""
    x = torch.randn(*shape)
    for inv in (False, True):
        port = randomize(PortSwin(SWIN_SMALL["embed_dim"], SWIN_SMALL["depths"], SWIN_SMALL["num_heads"],
                                  SWIN_SMALL["window_size"], inv=inv))
        path = save_mmaction(port, 192, tmp_path / f"swin_{inv}.pth")
        ours = build_backbone(BackboneConfig(name="swin_t", reversible=inv, drop_path=0.0, pretrained=path, **SWIN_SMALL)).eval()
        with torch.no_grad():
            ref, got = port(x), ours(x)
        assert got.shape == ref.shape
        assert rel(got, ref) <= 1e-5, (inv, rel(got, ref))


def test_swin_file_without_index_buffers_loads(tmp_path):
    """Some mmaction versions do not save relative_position_index (a function of the window)."""
    port = randomize(PortSwin(SWIN_SMALL["embed_dim"], SWIN_SMALL["depths"], SWIN_SMALL["num_heads"], SWIN_SMALL["window_size"]))
    path = tmp_path / "swin.pth"
    save_mmaction(port, 192, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("relative_position_index")}
    torch.save(ckpt, path)
    ours = build_backbone(BackboneConfig(name="swin_t", reversible=False, drop_path=0.0, pretrained=str(path), **SWIN_SMALL)).eval()
    x = torch.randn(1, 3, 16, 64, 64)
    with torch.no_grad():
        assert rel(ours(x), port(x)) <= 1e-5


def test_re2_file_into_a_non_reversible_model_is_refused(tmp_path):
    port = PortSwin(SWIN_SMALL["embed_dim"], SWIN_SMALL["depths"], SWIN_SMALL["num_heads"], SWIN_SMALL["window_size"], inv=True)
    path = save_mmaction(port, 192, tmp_path / "re2swin.pth")
    with pytest.raises(BadInput, match="Re² .*set backbone.reversible: true"):
        build_backbone(BackboneConfig(name="swin_t", reversible=False, pretrained=path, **SWIN_SMALL))


def test_mmaction_and_re2tal_slowfast_files_give_their_features(tmp_path):
    """SlowFast-R101 at reduced depth (2, 2, 3, 2; alpha 4, fusion kernel 7 read from the file):
    ours equals mmaction's forward (slow, fast), in our output form (fast averaged over alpha
    frames, concatenated); their Re² file rewired equals their Re²SlowFast."""
    x = torch.randn(1, 3, 16, 64, 64)
    for inv in (False, True):
        port = randomize(PortSlowFast(SF_SMALL, inv=inv))
        path = save_mmaction(port, 2304, tmp_path / f"sf_{inv}.pth")
        cfg = BackboneConfig(name="slowfast_r101", reversible=inv, depths=list(SF_SMALL), alpha=4, pretrained=path)
        ours = build_backbone(cfg).eval()
        with torch.no_grad():
            slow, fast = port(x)
            ref = torch.cat([slow, F.avg_pool3d(fast, (4, 1, 1))], 1)
            got = ours(x)
        assert got.shape == ref.shape == (1, 2304, 4, 2, 2)
        assert rel(got, ref) <= 1e-5, (inv, rel(got, ref))


def test_explicit_fusion_kernel_other_than_the_files_names_the_key(tmp_path):
    path = save_mmaction(PortSlowFast(SF_SMALL, fusion_kernel=7), 2304, tmp_path / "sf.pth")
    cfg = BackboneConfig(name="slowfast_r101", reversible=False, depths=list(SF_SMALL), fusion_kernel=5, pretrained=path)
    with pytest.raises(BadInput, match=r"conv_fast_to_slow.weight has shape \[16, 8, 7, 1, 1\], the model needs \[16, 8, 5, 1, 1\]"):
        build_backbone(cfg)


def test_pixel_statistics_on_the_0_255_scale_are_refused():
    """mmaction's data_preprocessor mean / std are on 0-255; ours on 0-1 (theirs / 255 = the defaults)."""
    with pytest.raises(ValueError, match="0-1 scale .*divide mmaction's 0-255 values by 255"):
        BackboneConfig(name="swin_t", pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375))
    default = BackboneConfig(name="swin_t")
    assert torch.allclose(torch.tensor(default.pixel_mean) * 255, torch.tensor([123.675, 116.28, 103.53]))
    assert torch.allclose(torch.tensor(default.pixel_std) * 255, torch.tensor([58.395, 57.12, 57.375]))
