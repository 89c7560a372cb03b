"""PST-T: Swin-T with temporal patch shift, as its authors built it (Xiang et al., ECCV 2022;
github:MartinXM/TPS, mmaction/models/backbones/swin_transformer2d_tps.py, `SwinTransformer2D_TPS`
with their Kinetics-400 settings: patch (2, 4, 4), window (1, 7, 7), 16 frames after patch
embedding).

Modules only (STYLE #1). Parameter names are theirs (`layers.{s}.blocks.{i}...`,
`layers.{s}.downsample`, `mlp.fc1/fc2`), so their checkpoints load through one small mapping
(`PatchShiftTransformer.checkpoint_state`). What their code does, and we do:
  - attention in 2-D windows (1, 7, 7) of each frame; odd blocks of a stage use Swin's shifted
    windows (0, 3, 3) with its -100 region mask, even blocks plain ones;
  - odd blocks: temporal patch shift of the attention input and shift back of its output, in the
    padded and rolled map, by the pattern's tile restarting at every window origin
    (o[h, w] = tile[(h % 7) % rows][(w % 7) % cols] in the rolled map), cyclic over the clip;
  - even blocks: TSM channel shift of the attention input, per head 1/8 of its channels one
    frame forward and 1/8 one back; the boundary frame keeps its own channels (their `clone()`,
    not zeros); not shifted back;
  - relative position bias from a table of (2 * 16 - 1) * 13 * 13 rows per head, each frame f
    with its own rows (`relative_position_index`): see `relative_position_index`.
Both branches of a block are residual functions of its input (`residual_fns()`), so Re²
rewiring applies unchanged; the shifts are inside the attention branch, which is local along H
in whole windows (`residual_pieces()`), the MLP branch token-wise.

Any clip length T (their code runs only at T = 16 after patch embedding):
  - the patch shift and the channel shift act over the T frames of the clip (cyclic patch shift:
    modulo T, so shift then shift back is the identity at every T);
  - frame f takes the bias rows their code gives frame f mod 16 of a 16-frame clip, i.e. the
    per-frame bias repeats every 16 frames. Only trained rows are used and every 16-frame block
    of a longer clip sees the biases as trained; for T < 16 the frames take the first T frames'
    rows, whose source coordinates were computed modulo 16 while the data wraps modulo T
    (they differ only for patches shifted across the clip's ends).
Windows shrink to maps smaller than 7 (Swin's rule; their code would fail there): the tile
restarts at the window's origin, and the bias rows are those of the tokens' offsets inside it.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging
from torchvision.models.video.swin_transformer import PatchEmbed3d
from torchvision.ops import StochasticDepth

from re2tal.backbones.base import Backbone, init_linears
from re2tal.backbones.patch_shift import PATTERNS, Boundary, max_offset, offset_map, patch_shift, shift_index
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.backbones.swin import effective_window, region_mask, window_runs
from re2tal.rev.pieces import Pieces, window_cuts

Pair = tuple[int, int]

# Temporal extent of the bias table: the authors fix the attention's window to (16, 7, 7) for
# the table and index whatever the configured window ("for bayershift").
BIAS_FRAMES = 16
# TSM: 1 / CHANNEL_FOLD of each head's channels move one frame forward, as many one back.
CHANNEL_FOLD = 8


def relative_position_index(pattern: str | None, window: Pair, table_window: Pair, frames: int = BIAS_FRAMES) -> Tensor:
    """(frames, N, N) int64, N = wh * ww: the bias-table row of query token i and key token j of a
    window in frame f, as the authors build it.

        row = ((dt + F - 1) * (2 Th - 1) + dh + Th - 1) * (2 Tw - 1) + dw + Tw - 1
        dh, dw = h_i - h_j, w_i - w_j (positions in the window), (Th, Tw) = table_window, F = frames
        dt = s_i(f) - s_j(0),  s_i(f) = (f - o_i) mod F

    s_i(f) is the source frame of the patch shifted to position i of frame f (o: the pattern's
    tile from the window's origin; 0 without a pattern, the channel-shift blocks, so dt = f).
    The key's source is taken in frame 0, not f: their index is built for one (F, 7, 7) window
    and frame f's rows are those of query frame f against key frame 0 (`[::F]` of its
    (F * F, N, N) view), which makes the bias a per-frame one.
    """
    wh, ww = window
    th, tw = table_window
    o = (offset_map(pattern, wh, ww) if pattern else torch.zeros(wh, ww, dtype=torch.long)).flatten()  # N
    hh, ww_ = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    hh, ww_ = hh.flatten(), ww_.flatten()
    src_q = (torch.arange(frames)[:, None] - o[None, :]) % frames  # F, N
    src_k = (-o) % frames  # N
    dt = src_q[:, :, None] - src_k[None, None, :]  # F, N, N
    dh = (hh[:, None] - hh[None, :])[None]
    dw = (ww_[:, None] - ww_[None, :])[None]
    return ((dt + frames - 1) * (2 * th - 1) + dh + th - 1) * (2 * tw - 1) + dw + tw - 1


def channel_shift(x_BTHWC: Tensor, heads: int) -> Tensor:
    """TSM inside each head: with d = C / heads and k = d // 8, channels [0, k) of a head take the
    previous frame's, [k, 2k) the next frame's; the first / last frame keeps its own (the
    authors' clone, not zero padding). (B, T, H, W, C) -> (B, T, H, W, C)."""
    b, t, h, w, c = x_BTHWC.shape
    k = c // heads // CHANNEL_FOLD
    x = x_BTHWC.view(b, t, h, w, heads, c // heads)
    fwd = torch.cat([x[:, :1, ..., :k], x[:, :-1, ..., :k]], 1)
    bwd = torch.cat([x[:, 1:, ..., k:2 * k], x[:, -1:, ..., k:2 * k]], 1)
    return torch.cat([fwd, bwd, x[..., 2 * k:]], -1).view(b, t, h, w, c)


class PatchShiftAttention(nn.Module):
    """PST's window attention over 2-D windows of each frame. (B, T, H, W, C) -> (B, T, H, W, C).

    odd (shifted) blocks:  x -> pad -> roll by -(3, 3) -> patch shift -> windows ->
        softmax(q k^T / sqrt(d) + bias_f + mask) v -> shift back -> roll back -> unpad -> proj
    even blocks:           x -> channel shift -> pad -> windows -> softmax(q k^T / sqrt(d) + bias_f) v -> unpad -> proj
    bias_f: (nH, N, N), the rows of `relative_position_index` for frame f mod 16.
    """

    def __init__(self, dim: int, num_heads: int, window: Pair, shifted: bool, pattern: str, boundary: Boundary,
                 cache: ShapeCache) -> None:
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"unknown TPS pattern {pattern!r}; one of {sorted(PATTERNS)}")
        self.num_heads = num_heads
        self.window = tuple(window)
        self.shifted = shifted
        self.shift = tuple(w // 2 for w in window) if shifted else (0, 0)
        self.pattern, self.boundary, self.cache = pattern, boundary, cache
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        rows = (2 * BIAS_FRAMES - 1) * math.prod(2 * w - 1 for w in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        kind = f"patch shift {self.pattern}, {self.boundary}" if self.shifted else "channel shift"
        return f"heads={self.num_heads}, window={self.window}, shift={self.shift}, {kind}"

    def relative_position_bias(self, t: int, window: Pair) -> Tensor:
        """(t, nH, N, N): frame f's bias is the 16-frame clip's frame f mod 16."""
        pattern = self.pattern if self.shifted else None
        key = ("pst-bias-index", pattern, window, self.window, self.relative_position_bias_table.device)
        index = self.cache.get(key, lambda: relative_position_index(pattern, window, self.window).to(key[-1]))
        n = index.shape[-1]
        bias = self.relative_position_bias_table[index.view(-1)].view(BIAS_FRAMES, n, n, -1).permute(0, 3, 1, 2)
        return bias[torch.arange(t, device=bias.device) % BIAS_FRAMES]

    def _patch_shift(self, x: Tensor, window: Pair, inverse: bool) -> Tensor:
        _, t, h, w, _ = x.shape
        key = ("pst-shift", self.pattern, self.boundary, inverse, t, h, w, window, x.device)
        index = self.cache.get(key, lambda: shift_index(self.pattern, t, h, w, self.boundary, inverse, window).to(x.device))
        return patch_shift(x, index, max_offset(self.pattern) if self.boundary == "zero" else 0)

    def forward(self, x: Tensor, span: tuple[int, int] | None = None) -> Tensor:
        """span (start, total): x is rows [start, start + h) of a map of `total` rows, cut at
        window borders (`height_cuts`); the result is those rows of the whole map's. Windows along
        H then follow the whole map: a shifted grid is padded instead of rolled along H (see
        swin.WindowAttention3d.forward)."""
        b, t, h, w, c = x.shape
        heads = self.num_heads
        start, total = span or (0, h)
        (_, wh, ww), (_, sh, sw) = effective_window((t, total, w), (1, *self.window), (0, *self.shift))
        if not self.shifted:
            x = channel_shift(x, heads)
        last = start + h == total
        if span is None:
            before, after, roll = 0, (-h) % wh, (sh, sw)
        else:  # a piece: rows padded, not rolled
            before = wh - sh if sh and start == 0 else 0
            after = (-total) % wh + sh if last else 0
            roll = (0, sw)
        x = F.pad(x, (0, 0, 0, (-w) % ww, before, after))
        hp, wp = x.shape[2:4]
        if any(roll):
            x = torch.roll(x, shifts=(-roll[0], -roll[1]), dims=(2, 3))
        if self.shifted:
            x = self._patch_shift(x, (wh, ww), inverse=False)
        gh, gw, n = hp // wh, wp // ww, wh * ww
        masked_h: tuple[int, ...] = ()
        if sh:
            masked_h = (gh - 1,) if span is None else tuple(i for i, on in ((0, before > 0), (gh - 1, last)) if on)
        x = x.view(b, t, gh, wh, gw, ww, c).permute(0, 2, 4, 1, 3, 5, 6).reshape(b, gh, gw, t, n, c)
        qkv = self.qkv(x).view(b, gh, gw, t, n, 3, heads, c // heads).permute(5, 0, 1, 2, 3, 6, 4, 7)
        q, k, v = qkv.unbind(0)  # each B, gH, gW, T, nH, N, d
        masked = (masked_h, (gw - 1,) if sw else ())
        out = self._attend(q, k, v, self.relative_position_bias(t, (wh, ww)), (wh, ww), (sh, sw), masked)
        out = out.transpose(-3, -2).reshape(b, gh, gw, t, wh, ww, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, t, hp, wp, c)
        if self.shifted:
            out = self._patch_shift(out, (wh, ww), inverse=True)
        if any(roll):
            out = torch.roll(out, shifts=roll, dims=(2, 3))
        return self.proj(out[:, :, before:before + h, :w])

    def height_cuts(self, size: int) -> list[int]:
        """Where a map of `size` rows may be cut into pieces for `forward(x, span)`: window
        borders along H, shift + k * wh (the rule along H does not depend on T, W)."""
        (_, wh, _), (_, sh, _) = effective_window((1, size, self.window[1]), (1, *self.window), (0, *self.shift))
        return window_cuts(size, wh, sh)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, window: Pair, shift: Pair,
                masked: tuple[tuple[int, ...], tuple[int, ...]]) -> Tensor:
        """softmax(q k^T / sqrt(d) + bias + mask) v; q, k, v (B, gH, gW, T, nH, N, d), bias (T, nH, N, N).

        Frames and heads form SDPA's head axis (the bias differs per frame, not per window), the
        windows its batch; only the windows listed in `masked` along a shifted axis need the region
        mask (see swin.WindowAttention3d._attend), so windows are attended in a few groups, each
        with one (T * nH, N, N) mask."""
        t, heads, n, d = q.shape[-4:]

        def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
            shape = q.shape
            q, k, v = (z.reshape(-1, t * heads, n, d) for z in (q, k, v))
            mask = mask.to(q.dtype).reshape(1, t * heads, n, n).contiguous()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(shape)

        if not any(masked):
            return sdpa(q, k, v, bias)
        out = q.new_empty(q.shape)
        parts = [window_runs(g, m) for g, m in zip(q.shape[1:3], masked)]
        for (sh, lh), (sw, lw) in itertools.product(*parts):
            mask = bias
            if lh or lw:
                last = (False, lh, lw)
                key = ("swin-mask", (1, *window), (0, *shift), last, q.device)
                mask = bias + self.cache.get(key, lambda: region_mask((1, *window), (0, *shift), last).to(q.device))
            idx = (slice(None), sh, sw)
            out[idx] = sdpa(q[idx], k[idx], v[idx], mask)
        return out


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (the authors' names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PSTBlock(nn.Module):
    """x -> x + F1(x) -> (x + F1(x)) + F2(x + F1(x)), with F1(x) = drop_path(attn(norm1(x)))
    (the shifts inside) and F2(x) = drop_path(mlp(norm2(x))); x is (B, T, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: Pair, shifted: bool, drop_path: float, pattern: str,
                 boundary: Boundary, cache: ShapeCache, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = PatchShiftAttention(dim, num_heads, window, shifted, pattern, boundary, cache)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attention_branch(self, x: Tensor) -> Tensor:
        return self.drop_path(self.attn(self.norm1(x)))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.drop_path(self.mlp(self.norm2(x)))

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.attention_branch, self.mlp_branch]

    def residual_pieces(self) -> list[Pieces | None]:
        """F1 is local along H in whole windows, at its position in the map (its patch and channel
        shifts move features across frames, so not along T); F2 along T anywhere (token-wise)."""
        attention = Pieces(2, self.attn.height_cuts, lambda x, start, size: self.drop_path(self.attn(self.norm1(x), (start, size))))
        return [attention, Pieces(1)]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention_branch(x)
        return x + self.mlp_branch(x)


class PSTStage(nn.Module):
    """The authors' BasicLayer: `blocks` (an nn.Sequential, rewired in place), then `downsample`
    (patch merging) or None in the last stage."""

    def __init__(self, blocks: Sequence[PSTBlock], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class PatchShiftTransformer(Backbone):
    """PST (the authors' SwinTransformer2D_TPS): (B, 3, T, H, W) -> (B, C, T / pt, H / (ph 2^(S-1)), W / ...),
    channels first after the final LayerNorm, C = embed_dim 2^(S-1).

    Layout (= theirs, without `backbone.`): patch_embed (proj, norm), layers[s] = (blocks, downsample),
    norm. `window`: the spatial window (7, 7); the temporal one is 1.
    """

    LAYOUT = "TPS authors' mmaction SwinTransformer2D_TPS"
    CLASSIFIER_PREFIX = "cls_head."
    BACKBONE_PREFIX = "backbone."

    def __init__(self, patch_size: tuple[int, int, int] = (2, 4, 4), embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window: Pair = (7, 7), drop_path: float = 0.1,
                 pattern: str = "C", boundary: Boundary = "cyclic") -> None:
        super().__init__()
        self.cache = ShapeCache()
        self.pattern, self.window = pattern, tuple(window)
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.patch_embed = PatchEmbed3d(list(patch_size), embed_dim=embed_dim, norm_layer=norm)
        total, block_id = sum(depths), 0
        self.layers = nn.ModuleList()
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**stage
            blocks = []
            for i in range(depth):
                rate = drop_path * block_id / max(total - 1, 1)  # linear over all blocks, as theirs
                blocks.append(PSTBlock(dim, heads, window, i % 2 == 1, rate, pattern, boundary, self.cache))
                block_id += 1
            merge = PatchMerging(dim, norm) if stage < len(depths) - 1 else None
            self.layers.append(PSTStage(blocks, merge))
        self.out_channels = embed_dim * 2 ** (len(depths) - 1)
        self.norm = norm(self.out_channels)
        self.temporal_stride = patch_size[0]
        self.spatial_stride = patch_size[1] * 2 ** (len(depths) - 1)
        init_linears(self)

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The authors' mmaction checkpoint (Recognizer3D `state_dict`) under our keys; the one place
        their layout is mapped:
          - `backbone.` is stripped (a bare backbone state dict, without it, loads too);
          - `cls_head.*` (their I3DHead, the Kinetics classifier) is dropped;
          - `*.attn.relative_position_index` / `_old` (buffers of theirs: the bias rows of the odd /
            even blocks at 16 frames, functions of the pattern) are checked against ours and
            dropped; a difference means the checkpoint was trained with another pattern.
        Every other key is named as ours."""
        out = {}
        for key, value in state.items():
            key = key.removeprefix(self.BACKBONE_PREFIX)
            if key.startswith(self.CLASSIFIER_PREFIX):
                continue
            kind = key.rpartition(".")[2]
            if kind in ("relative_position_index", "relative_position_index_old"):
                pattern = self.pattern if kind == "relative_position_index" else None
                ours = relative_position_index(pattern, self.window, self.window)
                if not torch.equal(value.cpu().long(), ours):
                    raise ValueError(f"{key} is not the bias index of pattern {self.pattern} at {BIAS_FRAMES} frames "
                                     f"(backbone.patch_shift.pattern must be the checkpoint's)")
                continue
            out[key] = value
        return out

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(layer, "blocks", 0) for layer in self.layers]

    def transitions(self) -> list[str]:
        return ["patch_embed"] + [f"layers.{s}.downsample" for s, layer in enumerate(self.layers) if layer.downsample is not None]

    def frozen_modules(self, stages: int) -> list[str]:
        # stage s = layers[s]: its blocks and the patch merging after them, as their _freeze_stages
        return ["patch_embed"] + [f"layers.{i}" for i in range(min(stages, len(self.layers)))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # B, T', H', W', C
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 4, 1, 2, 3)
