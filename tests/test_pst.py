"""PST-T (`backbone.name: pst_t`) against a port of its authors' code: blocks and the whole
backbone on the same weights at 16 frames, their checkpoint layout, Re² gradients, shift and
shift back at every length.

The port below follows github:MartinXM/TPS @ e913d2a, mmaction/models/backbones/
swin_transformer2d_tps.py, line by line where it computes (prints, mmcv / timm / einops, weight
inflation and checkpointing left out; DropPath is off in these tests). Its pattern C code is
theirs verbatim; other patterns use the same slicing with the paper's tiles (`tile=`), which
their source does not have.
"""

from __future__ import annotations

from functools import reduce
from operator import mul

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from re2tal.backbones import PATTERNS, build_backbone
from re2tal.backbones.pst import BIAS_FRAMES, PatchShiftAttention, PSTBlock, channel_shift
from re2tal.backbones.patch_shift import patch_shift, shift_index
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.config import BackboneConfig
from re2tal.errors import BadInput
from re2tal.rev import RevStage

# --------------------------------------------------------------------------------------------
# the authors' code, ported


def window_partition(x, window_size):
    B, D, H, W, C = x.shape
    x = x.view(B, D // window_size[0], window_size[0], H // window_size[1], window_size[1], W // window_size[2], window_size[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, reduce(mul, window_size), C)


def window_reverse(windows, window_size, B, D, H, W):
    x = windows.view(B, D // window_size[0], H // window_size[1], W // window_size[2], window_size[0], window_size[1], window_size[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, D, H, W, -1)


def get_window_size(x_size, window_size, shift_size):
    use_window_size, use_shift_size = list(window_size), list(shift_size)
    for i in range(len(x_size)):
        if x_size[i] <= window_size[i]:
            use_window_size[i] = x_size[i]
            use_shift_size[i] = 0
    return tuple(use_window_size), tuple(use_shift_size)


def compute_mask(D, H, W, window_size, shift_size, device):
    img_mask = torch.zeros((1, D, H, W, 1), device=device)
    cnt = 0
    for d in slice(-window_size[0]), slice(-window_size[0], -shift_size[0]), slice(-shift_size[0], None):
        for h in slice(-window_size[1]), slice(-window_size[1], -shift_size[1]), slice(-shift_size[1], None):
            for w in slice(-window_size[2]), slice(-window_size[2], -shift_size[2]), slice(-shift_size[2], None):
                img_mask[:, d, h, w, :] = cnt
                cnt += 1
    mask_windows = window_partition(img_mask, window_size).squeeze(-1)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


def roll_tile(t, tile, multiplier, dims):
    """Their pattern slicing, for the paper's other tiles: t[..., r::R, c::C] (the last two axes
    are the window's) rolled along `dims` by the tile's offset."""
    out = t.clone()
    R, Cc = len(tile), len(tile[0])
    for r in range(R):
        for c in range(Cc):
            idx = (..., slice(r, None, R), slice(c, None, Cc))
            out[idx] = torch.roll(t[idx], shifts=tile[r][c] * multiplier, dims=dims)
    return out


class TheirWindowAttention3D(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True, shift=True, shift_type='psm', tile=None):
        super().__init__()
        window_size = (16, 7, 7)  # "for bayershift"
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.shift, self.shift_type, self.tile = shift, shift_type, tile
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1), num_heads))
        coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window_size), indexing="ij"))
        coords_old = coords.clone()
        if tile is None:  # pattern patternC - 9
            coords[:, :, 0::3, 0::3] = torch.roll(coords[:, :, 0::3, 0::3], shifts=-4, dims=1)
            coords[:, :, 0::3, 1::3] = torch.roll(coords[:, :, 0::3, 1::3], shifts=1, dims=1)
            coords[:, :, 0::3, 2::3] = torch.roll(coords[:, :, 0::3, 2::3], shifts=2, dims=1)
            coords[:, :, 1::3, 2::3] = torch.roll(coords[:, :, 1::3, 2::3], shifts=3, dims=1)
            coords[:, :, 1::3, 0::3] = torch.roll(coords[:, :, 1::3, 0::3], shifts=-1, dims=1)
            coords[:, :, 2::3, 0::3] = torch.roll(coords[:, :, 2::3, 0::3], shifts=-2, dims=1)
            coords[:, :, 2::3, 1::3] = torch.roll(coords[:, :, 2::3, 1::3], shifts=-3, dims=1)
            coords[:, :, 2::3, 2::3] = torch.roll(coords[:, :, 2::3, 2::3], shifts=4, dims=1)
        else:
            coords = roll_tile(coords, tile, 1, dims=1)
        index = []
        for c in (coords, coords_old):
            flat = torch.flatten(c, 1)
            rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
            rel[:, :, 0] += self.window_size[0] - 1
            rel[:, :, 1] += self.window_size[1] - 1
            rel[:, :, 2] += self.window_size[2] - 1
            rel[:, :, 0] *= (2 * self.window_size[1] - 1) * (2 * self.window_size[2] - 1)
            rel[:, :, 1] *= (2 * self.window_size[2] - 1)
            i = rel.sum(-1)
            wd, n = window_size[0], window_size[1] * window_size[2]
            index.append(i.view(wd, n, wd, n).permute(0, 2, 1, 3).reshape(wd * wd, n, n)[::wd, :, :])
        self.register_buffer("relative_position_index", index[0])
        self.register_buffer("relative_position_index_old", index[1])
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def patch_shift(self, x, inv, batch_size, frame_len):  # their PatchShift.shift, ratio 1
        B, num_heads, N, c = x.size()
        fold = num_heads
        feat = x.view(batch_size, frame_len, -1, num_heads, 7, 7, c)
        out = feat.clone()
        multiplier = -1 if inv else 1
        stride = 1
        if self.tile is None:  # Pattern C
            out[:, :, :, :fold, 0::3, 0::3, :] = torch.roll(feat[:, :, :, :fold, 0::3, 0::3, :], shifts=-4 * multiplier * stride, dims=1)
            out[:, :, :, :fold, 0::3, 1::3, :] = torch.roll(feat[:, :, :, :fold, 0::3, 1::3, :], shifts=multiplier * stride, dims=1)
            out[:, :, :, :fold, 1::3, 0::3, :] = torch.roll(feat[:, :, :, :fold, 1::3, 0::3, :], shifts=-multiplier * stride, dims=1)
            out[:, :, :, :fold, 0::3, 2::3, :] = torch.roll(feat[:, :, :, :fold, 0::3, 2::3, :], shifts=2 * multiplier * stride, dims=1)
            out[:, :, :, :fold, 2::3, 0::3, :] = torch.roll(feat[:, :, :, :fold, 2::3, 0::3, :], shifts=-2 * multiplier * stride, dims=1)
            out[:, :, :, :fold, 1::3, 2::3, :] = torch.roll(feat[:, :, :, :fold, 1::3, 2::3, :], shifts=3 * multiplier * stride, dims=1)
            out[:, :, :, :fold, 2::3, 1::3, :] = torch.roll(feat[:, :, :, :fold, 2::3, 1::3, :], shifts=-3 * multiplier * stride, dims=1)
            out[:, :, :, :fold, 2::3, 2::3, :] = torch.roll(feat[:, :, :, :fold, 2::3, 2::3, :], shifts=4 * multiplier * stride, dims=1)
        else:
            out = roll_tile(feat.permute(0, 1, 2, 3, 6, 4, 5), self.tile, multiplier, dims=1).permute(0, 1, 2, 3, 5, 6, 4)
        return out.reshape(B, num_heads, N, c)

    def temporal_shift(self, x, batch_size, frame_len, fold_div=8):  # their TemporalShift.shift
        B, num_heads, N, c = x.size()
        fold = c // fold_div
        feat = x.view(batch_size, frame_len, -1, num_heads, N, c)
        out = feat.clone()
        out[:, 1:, :, :, :, :fold] = feat[:, :-1, :, :, :, :fold]
        out[:, :-1, :, :, :, fold:2 * fold] = feat[:, 1:, :, :, :, fold:2 * fold]
        return out.view(B, num_heads, N, c)

    def forward(self, x, mask=None, batch_size=8, frame_len=8):
        B_, N, C = x.shape
        if self.shift:
            x = x.view(B_, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
            if self.shift_type == 'psm':
                x = self.patch_shift(x, False, batch_size, frame_len)
            else:
                x = self.temporal_shift(x, batch_size, frame_len)
            x = x.permute(0, 2, 1, 3).reshape(B_, N, C)
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        index = self.relative_position_index if self.shift and self.shift_type == 'psm' else self.relative_position_index_old
        bias = self.relative_position_bias_table[index[:].reshape(-1), :].reshape(frame_len, N, N, -1).permute(0, 3, 1, 2).contiguous()
        attn = attn.view(batch_size, frame_len, -1, self.num_heads, N, N).permute(0, 2, 1, 3, 4, 5) + bias.unsqueeze(0).unsqueeze(1)
        attn = attn.permute(0, 2, 1, 3, 4, 5).view(-1, self.num_heads, N, N)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        if self.shift and self.shift_type == 'psm':
            x = self.patch_shift(attn @ v, True, batch_size, frame_len).transpose(1, 2).reshape(B_, N, C)
        else:
            x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class TheirMlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TheirBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size=(1, 7, 7), shift_size=(0, 0, 0), shift_type='psm', tile=None):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TheirWindowAttention3D(dim, window_size, num_heads, shift=True, shift_type=shift_type, tile=tile)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TheirMlp(dim, 4 * dim)

    def forward_part1(self, x, mask_matrix):
        B, D, H, W, C = x.shape
        window_size, shift_size = get_window_size((D, H, W), self.window_size, self.shift_size)
        x = self.norm1(x)
        pad_d1 = (window_size[0] - D % window_size[0]) % window_size[0]
        pad_b = (window_size[1] - H % window_size[1]) % window_size[1]
        pad_r = (window_size[2] - W % window_size[2]) % window_size[2]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
        _, Dp, Hp, Wp, _ = x.shape
        if any(i > 0 for i in shift_size):
            shifted_x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
            attn_mask = mask_matrix
        else:
            shifted_x, attn_mask = x, None
        x_windows = window_partition(shifted_x, window_size)
        attn_windows = self.attn(x_windows, mask=attn_mask, batch_size=B, frame_len=D)
        attn_windows = attn_windows.view(-1, *(window_size + (C,)))
        shifted_x = window_reverse(attn_windows, window_size, B, Dp, Hp, Wp)
        if any(i > 0 for i in shift_size):
            x = torch.roll(shifted_x, shifts=shift_size, dims=(1, 2, 3))
        else:
            x = shifted_x
        return x[:, :D, :H, :W, :].contiguous()

    def forward(self, x, mask_matrix):
        x = x + self.forward_part1(x, mask_matrix)
        return x + self.mlp(self.norm2(x))


class TheirPatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        B, D, H, W, C = x.shape
        if (H % 2 == 1) or (W % 2 == 1):
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class TheirBasicLayer(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size=(1, 7, 7), downsample=None, shift_type='psm', tile=None):
        super().__init__()
        self.window_size = window_size
        self.shift_size = tuple(i // 2 for i in window_size)
        self.blocks = nn.ModuleList([
            TheirBlock(dim, num_heads, window_size, shift_size=(0, 0, 0) if (i % 2 == 0) else self.shift_size,
                       shift_type='tsm' if (i % 2 == 0 and shift_type == 'psm') or shift_type == 'tsm' else 'psm', tile=tile)
            for i in range(depth)])
        self.downsample = downsample(dim=dim) if downsample is not None else None

    def forward(self, x):  # B, C, D, H, W
        B, C, D, H, W = x.shape
        window_size, shift_size = get_window_size((D, H, W), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)
        Dp, Hp, Wp = (-(-s // w) * w for s, w in zip((D, H, W), window_size))
        attn_mask = compute_mask(Dp, Hp, Wp, window_size, shift_size, x.device)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        x = x.view(B, D, H, W, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


class TheirPatchEmbed3D(nn.Module):
    def __init__(self, patch_size=(2, 4, 4), in_chans=3, embed_dim=96):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        _, _, D, H, W = x.size()
        if W % self.patch_size[2] != 0:
            x = F.pad(x, (0, self.patch_size[2] - W % self.patch_size[2]))
        if H % self.patch_size[1] != 0:
            x = F.pad(x, (0, 0, 0, self.patch_size[1] - H % self.patch_size[1]))
        if D % self.patch_size[0] != 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.patch_size[0] - D % self.patch_size[0]))
        x = self.proj(x)
        D, Wh, Ww = x.size(2), x.size(3), x.size(4)
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).view(-1, self.embed_dim, D, Wh, Ww)


class TheirSwinTransformer2D_TPS(nn.Module):
    """Their K400 PST-T config: patch (2, 4, 4), window (1, 7, 7), patch_norm, qkv_bias."""

    def __init__(self, patch_size=(2, 4, 4), embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(1, 7, 7)):
        super().__init__()
        self.patch_embed = TheirPatchEmbed3D(patch_size, 3, embed_dim)
        self.layers = nn.ModuleList([
            TheirBasicLayer(embed_dim * 2**i, depths[i], num_heads[i], window_size,
                            downsample=TheirPatchMerging if i < len(depths) - 1 else None)
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x.contiguous())
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


# --------------------------------------------------------------------------------------------
# helpers


def randomize(module: nn.Module, seed: int) -> None:
    """Weights far from their init, so that a wrong index or shift shows: every bias-table row
    (each temporal offset) differs at std 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def learned(state: dict) -> dict:
    """Their state dict without the index buffers (derived; ours are checked at load)."""
    return {k: v for k, v in state.items() if "relative_position_index" not in k}


def block_input(h: int, w: int, dim: int = 32, t: int = 16) -> torch.Tensor:
    return torch.randn(1, t, h, w, dim, generator=torch.Generator().manual_seed(h * 100 + w))


def pst_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"name": "pst_t", "reversible": False, "drop_path": 0.0, **kw})


# --------------------------------------------------------------------------------------------
# the authors' block and network == ours


@pytest.mark.parametrize("pattern, size", [("C", 7), ("C", 14), ("C", 8), ("A", 14), ("B", 8), ("D", 14)])
def test_block_equals_authors_block(pattern, size):
    """Even block (channel shift, plain windows) and odd block (patch shift after pad and roll,
    shifted windows with mask), 16 frames, per-frame bias from a table whose every row differs.
    7x7: one window, no roll; 14x14: 2x2 windows, rolled; 8x8: padded to 14x14, rolled."""
    dim, heads = 32, 2
    tile = None if pattern == "C" else PATTERNS[pattern]
    x = block_input(size, size, dim)
    worst = 0.0
    for i in (0, 1):
        theirs = TheirBlock(dim, heads, (1, 7, 7), (0, 0, 0) if i == 0 else (0, 3, 3), "tsm" if i == 0 else "psm", tile)
        randomize(theirs, seed=i)
        ours = PSTBlock(dim, heads, (7, 7), i == 1, 0.0, pattern, "cyclic", ShapeCache())
        ours.load_state_dict(learned(theirs.state_dict()))
        _, shift = get_window_size((16, size, size), (1, 7, 7), (0, 3, 3) if i else (0, 0, 0))
        pad = -(-size // 7) * 7
        mask = compute_mask(16, pad, pad, (1, 7, 7), shift, x.device)
        with torch.no_grad():
            want, got = theirs(x, mask), ours(x)
            assert (want - x).abs().max() > 0.1
        worst = max(worst, (got - want).abs().max().item())
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
    """A small network in their layout (3 stages on 28x28 / 14x14 / 7x7 maps at 16 frames), random
    weights, saved as mmaction saves a Recognizer3D: {"meta", "state_dict": backbone.* + cls_head.*}."""
    torch.manual_seed(0)
    theirs = TheirSwinTransformer2D_TPS(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8)).eval()
    randomize(theirs, seed=7)
    state = {f"backbone.{k}": v for k, v in theirs.state_dict().items()}
    state |= {"cls_head.fc_cls.weight": torch.randn(400, 128), "cls_head.fc_cls.bias": torch.zeros(400)}
    path = tmp_path_factory.mktemp("weights") / "pst_small_k400.pth"
    torch.save({"meta": {"epoch": 30, "mmcv_version": "1.3.3"}, "state_dict": state}, path)
    return theirs, path


def test_authors_checkpoint_loads_and_backbone_equals_theirs(authors_checkpoint):
    theirs, path = authors_checkpoint
    sizes = dict(embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8])
    for reversible in (True, False):  # Re² is another function of the same weights: compare the standard one
        model = build_backbone(pst_cfg(pretrained=str(path), reversible=reversible, **sizes)).eval()
        assert model.state_dict().keys() == learned(theirs.state_dict()).keys()
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 32, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = theirs(x), model(x)
    assert got.shape == want.shape == (1, 128, 16, 7, 7)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_full_size_layout_is_theirs_and_index_is_checked(authors_checkpoint, tmp_path):
    """At their settings every key and shape is theirs (bias tables (5239, heads)); a checkpoint
    whose bias index belongs to another pattern is refused, naming the key."""
    with torch.device("meta"):
        theirs = {k: v.shape for k, v in learned(TheirSwinTransformer2D_TPS().state_dict()).items()}
        ours = {k: v.shape for k, v in build_backbone(pst_cfg(reversible=True)).state_dict().items()}
    assert ours == theirs
    assert ours["layers.1.blocks.0.attn.relative_position_bias_table"] == (5239, 6)
    _, path = authors_checkpoint
    state = torch.load(path, weights_only=True)["state_dict"]
    flipped = "layers.1.blocks.1.attn.relative_position_index_old"
    for key, pattern, file_state in (("layers.0.blocks.0.attn.relative_position_index", "D", state),  # a pattern C file
                                     (flipped, "C", {**state, f"backbone.{flipped}": state[f"backbone.{flipped}"].flip(0)})):
        bad = tmp_path / f"{pattern}.pth"
        torch.save({"state_dict": file_state}, bad)
        with pytest.raises(BadInput, match=rf"{key} is not the bias index of pattern {pattern}") as err:
            build_backbone(pst_cfg(pretrained=str(bad), embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], patch_shift={"pattern": pattern}))
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# other lengths, shift back, Re²


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_patch_shift_then_back_is_identity_at_every_length(pattern):
    """The tile restarts at every window origin; cyclic over the clip at any length T."""
    tile = PATTERNS[pattern]
    for t in range(1, 21):
        x = torch.randn(1, t, 14, 10, 3)
        index = shift_index(pattern, t, 14, 10, "cyclic", False, window=(7, 5))
        back = shift_index(pattern, t, 14, 10, "cyclic", True, window=(7, 5))
        y = patch_shift(x, index, 0)
        assert torch.equal(patch_shift(y, back, 0), x), t
        for h, w in ((0, 0), (8, 6), (13, 9)):  # window origin, inside the second ones
            o = tile[(h % 7) % len(tile)][(w % 5) % len(tile[0])]
            assert torch.equal(y[0, :, h, w], x[0, (torch.arange(t) - o) % t, h, w])


def test_other_lengths_bias_repeats_every_16_frames_and_channel_shift_keeps_the_ends():
    attn = PatchShiftAttention(8, 2, (7, 7), True, "C", "cyclic", ShapeCache())
    randomize(attn, seed=1)
    with torch.no_grad():
        b16, b40 = attn.relative_position_bias(16, (7, 7)), attn.relative_position_bias(40, (7, 7))
    assert b40.shape == (40, 2, 49, 49)
    assert torch.equal(b40, b16[torch.arange(40) % BIAS_FRAMES])
    assert not torch.equal(b16[0], b16[1])  # a per-frame bias
    x = torch.arange(3 * 16, dtype=torch.float32).view(1, 3, 1, 1, 16).expand(1, 3, 1, 1, 16) + 100 * torch.arange(3).view(1, 3, 1, 1, 1)
    y = channel_shift(x.contiguous(), heads=1)  # d = 16: channels 0-1 forward, 2-3 back, 4.. stay
    assert torch.equal(y[0, :, 0, 0, :2], x[0, [0, 0, 1], 0, 0, :2])
    assert torch.equal(y[0, :, 0, 0, 2:4], x[0, [1, 2, 2], 0, 0, 2:4])
    assert torch.equal(y[..., 4:], x[..., 4:])


def test_re2_pst_in_pieces_gradients_equal_whole_vanilla(monkeypatch):
    """Pieces of one window row along H (piece_size 1): 18 rows of windows of 4 cut at 4, 8, 12,
    16 (a ragged last piece of 2) in unshifted blocks and at 2, 6, 10, 14 in shifted ones, whose
    wrapped window lies in the first and the last piece; patch and channel shifts along T inside;
    MLP branches token by token along T; drop path on. Output and gradients equal plain autograd."""
    from test_backbones import loss_grads, record_pieces, rel, set_vanilla

    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = build_backbone(pst_cfg(reversible=True, drop_path=0.3, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                   window_size=(1, 4, 4), piece_size=1)).train()
    x = torch.randn(1, 3, 8, 72, 40)  # 4 x 18 x 10 tokens, then 9 x 5
    set_vanilla(model, True)
    yv, xv, pv = loss_grads(model, x, seed=5)
    set_vanilla(model, False)
    yr, xr, pr = loss_grads(model, x, seed=5)
    assert {(2, 16, 2, 18), (2, 14, 4, 18), (2, 0, 2, 18), (1, 3, 1, 4), (2, 6, 3, 9)} <= set(seen)
    assert torch.allclose(yr, yv, atol=1e-5)
    assert pr.keys() == pv.keys() == {k for k, _ in model.named_parameters()}
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv) <= 1e-4


def test_re2_pst_gradients_equal_vanilla_autograd():
    """Re²PST-T in training mode with drop path, 20 frames (not 16), a map padded and one
    shrunk below the window: the reversible backward gives plain autograd's gradients."""
    torch.manual_seed(0)
    model = build_backbone(pst_cfg(reversible=True, drop_path=0.3, embed_dim=32, depths=[2, 2], num_heads=[2, 4])).train()
    stages = [m for m in model.modules() if isinstance(m, RevStage)]
    assert len(stages) == 2
    x = torch.randn(1, 3, 40, 40, 40)  # 20 x 10 x 10 tokens, then 5 x 5
    results = {}
    for vanilla in (True, False):
        for s in stages:
            s.vanilla = vanilla
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[vanilla] = y.detach(), xi.grad, {k: p.grad for k, p in model.named_parameters()}
    (yv, xv, pv), (yr, xr, pr) = results[True], results[False]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert torch.allclose(yr, yv, atol=1e-5)
    assert all(g is not None for g in pr.values()) and pr.keys() == pv.keys()
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv) <= 1e-4
