"""Video Swin Transformer (Liu et al., CVPR 2022), optionally with temporal patch shift (TPS) in
its 3-D windows (ours, see patch_shift.py; the authors' PST-T is pst.py).

Modules only (STYLE #1). Parameter names and shapes are those of
`torchvision.models.video.swin3d_t` (without its classifier), so its state dicts load as they
are, and the standard forward equals torchvision's `features` + `norm`. Differences, all
without numeric effect beyond float rounding:
  - attention runs through F.scaled_dot_product_attention with the relative position bias
    (+ shifted-window mask) as float attn_mask;
  - shifted windows are attended in groups (interior windows vs the last window along each
    shifted axis) so the mask stays (nH, N, N) for any input length instead of torchvision's
    (windows, N, N);
  - masks and shift indices are built once per shape in a ShapeCache owned by the backbone.
Each block exposes its two residual functions for reversible rewiring (`re2tal.rev`) and where
they are local (`residual_pieces()`): the MLP branch token-wise, the attention branch along T in
whole windows, evaluated on a piece of frames at its position in the clip (`WindowAttention3d`'s
`span`).

mmaction's Video Swin (mmaction/models/backbones/swin.py, `SwinTransformer3D`, e.g. its
Kinetics-400 Swin-T) and the Re²TAL authors' Re²Swin (OpenTAD re2tal_swin.py,
`SwinTransformer3D_inv`, their K400-fine-tuned Re²Swin-T) load too, through one mapping
(`SwinTransformer3d.checkpoint_state`): same modules and function, other names. Their Re²
stage is ours: streams (x, x), block i: y1 = x1 + F_i(x2), y2 = x2 + G_i(y1), output the mean
of the two halves, patch merging after it, all blocks reversible.
"""

from __future__ import annotations

import itertools
import math
import re
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging
from torchvision.models.video.swin_transformer import PatchEmbed3d
from torchvision.ops import MLP, StochasticDepth

from re2tal.backbones.base import Backbone, init_linears, mmaction_backbone
from re2tal.backbones.patch_shift import TemporalPatchShift
from re2tal.backbones.shape_cache import ShapeCache
from re2tal.rev.pieces import Pieces, window_cuts

Triple = tuple[int, int, int]

# Additive mask between tokens of different regions of a shifted window; Video Swin uses -100
# rather than -inf, and so do we, for bit-level parity with pretrained behaviour.
MASK_VALUE = -100.0
# Windows are attended in calls of at most this many attention-matrix elements (windows x heads
# x N x N), in at most ATTN_MAX_CALLS calls: the backward's attention temporaries (CPU's math
# path keeps three such matrices, CUDA's memory-efficient kernel a full-size gradient of the
# expanded bias) are then bounded per call instead of growing with the clip. The price: the fused
# kernels keep each call's output for backward, so the joined output is one more such tensor.
ATTN_CALL_ELEMENTS = 2**21
ATTN_MAX_CALLS = 64


def relative_position_index(window: Sequence[int]) -> Tensor:
    """(N, N) int64, N = Wt*Wh*Ww: row of the bias table for each pair of tokens in a window.

    index[i, j] = ((t_i - t_j + Wt - 1) * (2Wh - 1) + (h_i - h_j + Wh - 1)) * (2Ww - 1) + (w_i - w_j + Ww - 1)
    """
    wt, wh, ww = window
    coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij")).flatten(1)  # 3, N
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([wt - 1, wh - 1, ww - 1]).view(3, 1, 1)
    return (rel[0] * (2 * wh - 1) + rel[1]) * (2 * ww - 1) + rel[2]


def effective_window(size: Triple, window: Triple, shift: Triple) -> tuple[Triple, Triple]:
    """Video Swin's rule: along an axis no longer than the window, the window shrinks to the
    input and does not shift."""
    win = tuple(s if s <= w else w for s, w in zip(size, window))
    sh = tuple(0 if s <= w else d for s, w, d in zip(size, window, shift))
    return win, sh  # type: ignore[return-value]


def region_mask(window: Triple, shift: Triple, last: tuple[bool, bool, bool]) -> Tensor:
    """(N, N) float additive mask of one kind of shifted window.

    After the cyclic roll by -shift, the last window along a shifted axis holds two regions that
    are not neighbours in the video: local positions [0, W - s) and [W - s, W). Tokens attend
    only within their region: mask[i, j] = 0 if region(i) == region(j) else MASK_VALUE.
    `last[a]`: the window is the last one along axis a.
    """
    ids = [(torch.arange(w) >= w - s) & (s > 0) & is_last for w, s, is_last in zip(window, shift, last)]
    region = (ids[0].view(-1, 1, 1) * 4 + ids[1].view(1, -1, 1) * 2 + ids[2].view(1, 1, -1)).flatten()
    return (region[:, None] != region[None, :]).float() * MASK_VALUE


def window_runs(count: int, masked: Sequence[int]) -> list[tuple[slice, bool]]:
    """The windows 0..count-1 of an axis as runs (slice, masked) of consecutive windows that are
    all masked or all not."""
    runs: list[tuple[slice, bool]] = []
    for i in range(count):
        m = i in masked
        if runs and runs[-1][1] == m:
            runs[-1] = (slice(runs[-1][0].start, i + 1), m)
        else:
            runs.append((slice(i, i + 1), m))
    return runs


class WindowAttention3d(nn.Module):
    """(Shifted-)window multi-head self-attention with relative position bias, optionally with
    temporal patch shift. (B, T, H, W, C) -> (B, T, H, W, C).

    x -> [TPS] -> pad to windows -> roll by -shift -> windows of N = Wt*Wh*Ww tokens ->
    softmax(q k^T / sqrt(d) + bias + mask) v -> proj -> merge windows -> roll back -> unpad ->
    [TPS back].
    """

    def __init__(self, dim: int, num_heads: int, window_size: Triple, shift_size: Triple, cache: ShapeCache,
                 patch_shift: TemporalPatchShift | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.cache = cache
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        table_rows = math.prod(2 * w - 1 for w in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent: part of torchvision's state dict (a pure function of window_size).
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.patch_shift = patch_shift

    def relative_position_bias(self, n: int) -> Tensor:
        """(nH, n, n). For windows shrunk to the input, the first n rows/cols of the full
        window's index are used, exactly as Video Swin and torchvision do."""
        index = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, span: tuple[int, int] | None = None) -> Tensor:
        """span (start, total): x is frames [start, start + t) of a clip of `total` frames, cut at
        window borders (`time_cuts`); the result is those frames of the whole clip's. Windows along
        T then follow the whole clip: a shifted grid is not rolled but padded, on the left by
        W - s zero frames before its head group [0, s) and on the right, after the clip's own
        padding, by s: each such window is a region of the wrapped window and masked as it."""
        b, t, h, w, c = x.shape
        start, total = span or (0, t)
        window, shift = effective_window((total, h, w), self.window_size, self.shift_size)
        if self.patch_shift is not None:
            x = self.patch_shift(x)
        pad = [(-s) % win for s, win in zip((total, h, w), window)]
        first, last = start == 0, start + t == total
        if span is None:
            before, after, roll = 0, pad[0], shift
        else:  # a piece: frames padded, not rolled
            before = window[0] - shift[0] if shift[0] and first else 0
            after = pad[0] + shift[0] if last else 0
            roll = (0, *shift[1:])
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], before, after))
        if any(roll):
            x = torch.roll(x, shifts=tuple(-s for s in roll), dims=(1, 2, 3))
        grid = tuple(size // win for size, win in zip(x.shape[1:4], window))
        masked_t: tuple[int, ...] = ()
        if shift[0]:
            masked_t = (grid[0] - 1,) if span is None else tuple(i for i, on in ((0, before > 0), (grid[0] - 1, last)) if on)
        n, heads = math.prod(window), self.num_heads
        x = x.view(b, grid[0], window[0], grid[1], window[1], grid[2], window[2], c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, *grid, n, c)  # B, gT, gH, gW, N, C
        qkv = self.qkv(x).view(b, *grid, n, 3, heads, c // heads).permute(5, 0, 1, 2, 3, 6, 4, 7)
        q, k, v = qkv.unbind(0)  # each B, gT, gH, gW, nH, N, d
        masked = (masked_t, *(((g - 1,) if s else ()) for g, s in zip(grid[1:], shift[1:])))
        out = self._attend(q, k, v, self.relative_position_bias(n), window, shift, masked)
        out = self.proj(out.transpose(-3, -2).reshape(b, *grid, n, c))
        padded = tuple(g * win for g, win in zip(grid, window))
        out = out.view(b, *grid, *window, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *padded, c)
        if any(roll):
            out = torch.roll(out, shifts=roll, dims=(1, 2, 3))
        out = out[:, before:before + t, :h, :w]
        if self.patch_shift is not None:
            out = self.patch_shift(out, inverse=True)
        return out

    def time_cuts(self, size: int) -> list[int]:
        """Where a clip of `size` frames may be cut into pieces for `forward(x, span)`: window
        borders along T, shift + k * W (the rule along T does not depend on H, W)."""
        window, shift = effective_window((size, *self.window_size[1:]), self.window_size, self.shift_size)
        return window_cuts(size, window[0], shift[0])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, window: Triple, shift: Triple,
                masked: tuple[tuple[int, ...], ...]) -> Tensor:
        """softmax(q k^T / sqrt(d) + bias + mask) v over windows; q, k, v (B, gT, gH, gW, nH, N, d).

        Only the windows listed in `masked` along each shifted axis (the last one of a rolled
        grid; the first and last of a padded piece) hold two regions and need a mask, so windows
        are attended in a few groups (runs of masked / unmasked windows per axis), each with one
        (nH, N, N) mask. Inputs go to SDPA as 4-D tensors with a contiguous 4-D mask: that is what
        selects its fused CPU kernel (other layouts fall back to the slower math path); windows
        are split into calls of bounded size (ATTN_CALL_ELEMENTS, by torch.split, whose backward
        is one cat)."""
        heads, n, d = q.shape[-3:]

        def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
            shape = q.shape
            q, k, v = (t.reshape(-1, heads, n, d) for t in (q, k, v))
            mask = mask.to(q.dtype).unsqueeze(0).contiguous()
            calls = min(ATTN_MAX_CALLS, math.ceil(q.shape[0] * heads * n * n / ATTN_CALL_ELEMENTS))
            per_call = math.ceil(q.shape[0] / calls)
            if per_call >= q.shape[0]:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(shape)
            outs = [F.scaled_dot_product_attention(*qkv, attn_mask=mask) for qkv in zip(q.split(per_call), k.split(per_call), v.split(per_call))]
            # joined in (windows, N, heads, d) memory order, the fused kernels' own: the caller's
            # transpose + reshape is then a view, as for one call, not a copy
            return torch.cat([o.transpose(1, 2) for o in outs]).transpose(1, 2).view(shape)

        if not any(masked):
            return sdpa(q, k, v, bias)
        out = q.new_empty(q.shape)
        parts = [window_runs(g, m) for g, m in zip(q.shape[1:4], masked)]
        for (st, lt), (sh, lh), (sw, lw) in itertools.product(*parts):
            last = (lt, lh, lw)
            mask = bias
            if any(last):
                key = ("swin-mask", window, shift, last, q.device)
                mask = bias + self.cache.get(key, lambda: region_mask(window, shift, last).to(q.device))
            idx = (slice(None), st, sh, sw)
            out[idx] = sdpa(q[idx], k[idx], v[idx], mask)
        return out


class SwinBlock(nn.Module):
    """x -> x + F1(x) -> (x + F1(x)) + F2(x + F1(x)), with
    F1(x) = drop_path(attn(norm1(x))) and F2(x) = drop_path(mlp(norm2(x))); x is (B, T, H, W, C).
    `residual_fns()` gives [F1, F2] for reversible rewiring."""

    def __init__(self, dim: int, num_heads: int, window_size: Triple, shift_size: Triple, drop_path: float,
                 cache: ShapeCache, patch_shift: TemporalPatchShift | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention3d(dim, num_heads, window_size, shift_size, cache, patch_shift)
        self.stochastic_depth = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, [int(dim * mlp_ratio), dim], activation_layer=nn.GELU, inplace=None, dropout=0.0)

    def attention_branch(self, x: Tensor) -> Tensor:
        return self.stochastic_depth(self.attn(self.norm1(x)))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.stochastic_depth(self.mlp(self.norm2(x)))

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.attention_branch, self.mlp_branch]

    def residual_pieces(self) -> list[Pieces | None]:
        """F1 is local along T in whole windows, at its position in the clip (not with TPS, whose
        shift moves features across the clip); F2 along T anywhere (token-wise)."""
        attention = None
        if self.attn.patch_shift is None:
            attention = Pieces(1, self.attn.time_cuts, lambda x, start, size: self.stochastic_depth(self.attn(self.norm1(x), (start, size))))
        return [attention, Pieces(1)]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention_branch(x)
        return x + self.mlp_branch(x)


class SwinTransformer3d(Backbone):
    """Video Swin backbone: (B, 3, T, H, W) -> (B, C, T / pt, H / (ph * 2^(S-1)), W / ...),
    channels-first after the final LayerNorm, C = embed_dim * 2^(S-1) for S stages.

    Layout (= torchvision's): patch_embed, features = [stage 0 blocks, merge, stage 1 blocks,
    merge, ...], norm. Stage s's blocks are `features[2 s]` (an nn.Sequential, rewired in place by
    apply_reversible / apply_activation_checkpointing). Blocks with odd index in a stage use
    shifted windows. `patch_shift(stage, block)` gives the TPS module of a block or None.
    """

    LAYOUT = "torchvision swin3d_t, mmaction SwinTransformer3D or Re²TAL's SwinTransformer3D_inv"
    CLASSIFIER_KEYS = ("head.weight", "head.bias")
    # mmaction's names -> ours, applied in order to each key once `backbone.` is stripped; the
    # first rule turns the Re² blocks (attention + norm1 in `inv_block.Fm`, MLP + norm2 in
    # `inv_block.Gm`) into plain ones.
    MMACTION_KEYS: tuple[tuple[str, Callable[[re.Match], str] | str], ...] = (
        (r"^layers\.(\d+)\.blocks\.(\d+)\.inv_block\.[FG]m\.", r"layers.\1.blocks.\2."),
        (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."),
        (r"^layers\.(\d+)\.blocks\.", lambda m: f"features.{2 * int(m[1])}."),
        (r"^layers\.(\d+)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 1}."),
        (r"^norm3\.", "norm."),
    )

    def __init__(self, patch_size: Triple = (2, 4, 4), embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: Triple = (8, 7, 7), drop_path: float = 0.1,
                 patch_shift: Callable[[int, int, ShapeCache], TemporalPatchShift | None] | None = None) -> None:
        super().__init__()
        self.cache = ShapeCache()
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.patch_embed = PatchEmbed3d(list(patch_size), embed_dim=embed_dim, norm_layer=norm)
        layers: list[nn.Module] = []
        total, block_id = sum(depths), 0
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**stage
            blocks = []
            for i in range(depth):
                shift = tuple(0 if i % 2 == 0 else w // 2 for w in window_size)
                tps = patch_shift(stage, i, self.cache) if patch_shift is not None else None
                rate = drop_path * block_id / max(total - 1, 1)  # linear over all blocks, as torchvision
                blocks.append(SwinBlock(dim, heads, window_size, shift, rate, self.cache, tps))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if stage < len(depths) - 1:
                layers.append(PatchMerging(dim, norm))
        self.features = nn.Sequential(*layers)
        self.out_channels = embed_dim * 2 ** (len(depths) - 1)
        self.norm = norm(self.out_channels)
        self.temporal_stride = patch_size[0]
        self.spatial_stride = patch_size[1] * 2 ** (len(depths) - 1)
        self.num_stages = len(depths)
        init_linears(self)

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A torchvision swin3d_t state dict loads as it is (head dropped). An mmaction Recognizer3D
        checkpoint (keys `backbone.layers...`; SwinTransformer3D or the Re² SwinTransformer3D_inv)
        is mapped, the one place: `backbone.` stripped, `cls_head.*` / `data_preprocessor.*`
        dropped, names by MMACTION_KEYS (its `norm3` is our final `norm`, `mlp.fc1 / fc2` torchvision's
        `mlp.0 / 3`, `layers.s.downsample` `features.2s+1`). Its relative_position_index buffers
        equal ours (same formula) and load as they are; a file without them (non-persistent in
        some versions) gets ours."""
        if not any(k.removeprefix("backbone.").startswith("layers.") for k in state):
            return super().checkpoint_state(state)
        out = {}
        for key, value in mmaction_backbone(state).items():
            for pattern, repl in self.MMACTION_KEYS:
                key = re.sub(pattern, repl, key)
            out[key] = value
        for key in self.state_dict():
            if key.endswith(".relative_position_index") and key not in out:
                out[key] = relative_position_index(self.get_submodule(key.rpartition(".")[0]).window_size)
        return out

    @classmethod
    def trained_reversible(cls, state: dict[str, Tensor]) -> bool:
        return any(".inv_block." in k for k in state)

    def stage_blocks(self) -> list[int]:
        """Indices into `features` of the block stages."""
        return list(range(0, len(self.features), 2))

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(self.features, str(i), 0) for i in self.stage_blocks()]

    def transitions(self) -> list[str]:
        return ["patch_embed"] + [f"features.{i}" for i in range(1, len(self.features), 2)]

    def frozen_modules(self, stages: int) -> list[str]:
        # stage s = features[2 s] (blocks) + features[2 s + 1] (the merge after it, if any)
        return ["patch_embed"] + [f"features.{i}" for i in range(min(2 * stages, len(self.features)))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # B, T', H', W', C
        x = self.features(x)
        return self.norm(x).permute(0, 4, 1, 2, 3)
