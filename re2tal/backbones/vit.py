"""VideoMAE / VideoMAEv2 ViTs (Tong et al., NeurIPS 2022; Wang et al., CVPR 2023) with AdaTAD's
temporal adapters (Liu et al., CVPR 2024), as OpenTAD builds them
(opentad/models/backbones/vit_adapter.py, `VisionTransformerAdapter` with return_feat_map).

(B, 3, T, H, W) -> tubelet embedding conv (2, p, p) stride (2, p, p) -> + position embedding ->
`depth` blocks of joint space-time attention within chunks of `chunk_frames` frames (16 in
AdaTAD: the clip length the weights saw), the chunks of all videos batched -> (B, C, T / 2, H / p,
W / p), the chunks' tokens concatenated in time; no final norm (AdaTAD's feature map).

Tokens between blocks are (B, n, t, h, w, C): n chunks of t = chunk_frames / 2 token frames. A
block is x1 = x + F1(x), x2 = x1 + F2(x1), with an adapter y = x2 + F3(x2):

    F1 = drop_path o attn o norm1      attention within each chunk (B n, t h w tokens)
    F2 = drop_path o mlp o norm2       token-wise
    F3 = gamma * up(z + conv(dwconv_t(z))),  z = GELU(down(x))   (AdaTAD's Adapter)

dwconv_t is a depth-wise conv (k = 3, zero padding) along the *whole video's* time axis, across
chunks; conv a 1x1 conv; up zero-initialised, gamma 1. drop path draws one mask per chunk (as
mmcv's DropPath on OpenTAD's (B n, N, C) batch). Attention has a bias on q and v only (zero k
bias) and scale head_dim^-0.5.

Re²: F1, F2 (and F3) are the residual functions of one reversible stage of all blocks. F1 and F2
are local along the chunks (dim 1): a piece of chunks draws its rows of the whole's drop-path
masks. F3 is not (its conv mixes neighbouring chunks' frames) but is local along H (dim 3): every
op of it acts on one (h, w) location's time series.

Layout: mmaction's `VisionTransformer` keys, those OpenTAD's converted VideoMAE / VideoMAEv2
files hold (`patch_embed.projection`, `blocks.{i}.attn.{qkv.weight, q_bias, v_bias, proj}`,
`blocks.{i}.mlp.layers.{0.0, 1}`, `norm1`, `norm2`, the `pos_embed` buffer; adapters
`blocks.{i}.adapter.{down_proj, dwconv, conv, up_proj, gamma}`), loaded unrenamed, also inside
an mmaction Recognizer3D checkpoint (`backbone.` stripped). The VideoMAE / VideoMAEv2 release
files (`patch_embed.proj`, `mlp.fc1`, `mlp.fc2`, `head`; under `module` or `model`) are mapped as
OpenTAD's tools/model_converters/convert_videomaev2.py does. Dropped: the classifier and the
mean-pooling norm `fc_norm` (unused by a feature map). A file without `pos_embed` (the release's
fixed sin-cos table is not stored) gets mmaction's `get_sinusoid_encoding` table; one with it
(sin-cos or learned) keeps its values. Adapters absent from a file keep AdaTAD's initialisation.

Position embedding: the file's (1, t0 h0 w0, C) table for the pretraining clip (16 frames x 224²:
t0 = 8, h0 = w0 = 224 / p) is resized to the chunk's grid as OpenTAD does, bicubic over (h, w)
per frame (align_corners False), and linearly along t when chunk_frames is not 16.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from re2tal.backbones.base import Backbone, mmaction_backbone
from re2tal.rev.pieces import Pieces

# The clip the published weights were trained on, which sized the position table.
PRETRAIN_FRAMES, PRETRAIN_SIZE = 16, 224
# release-layout names -> ours (OpenTAD's convert_videomaev2.py)
RELEASE_NAMES = (("patch_embed.proj.", "patch_embed.projection."), (".mlp.fc1.", ".mlp.layers.0.0."), (".mlp.fc2.", ".mlp.layers.1."))


def sinusoid_table(n: int, dim: int) -> Tensor:
    """mmaction's `get_sinusoid_encoding`: (1, n, dim), position i, channel j:
    sin / cos (even / odd j) of i * 10000^(-2 floor(j / 2) / dim), computed in float64."""
    vec = torch.arange(dim, dtype=torch.float64)
    vec = torch.pow(10000, -(vec - vec % 2) / dim).view(1, -1)
    table = torch.arange(n, dtype=torch.float64).view(-1, 1) * vec
    table[:, 0::2].sin_()
    table[:, 1::2].cos_()
    return table.float().unsqueeze(0)


def drop_path(x: Tensor, rate: float, training: bool, start: int = 0, total: int | None = None) -> Tensor:
    """Stochastic depth with one mask per chunk of x (B, n, ...). The masks of all `total` chunks
    are drawn, and the rows [start, start + n) used, so a piece of chunks gets the whole's."""
    if not training or rate == 0.0:
        return x
    b, n = x.shape[:2]
    keep = x.new_empty(b, total or n).bernoulli_(1 - rate)[:, start:start + n].div_(1 - rate)
    return x * keep.view(b, n, *[1] * (x.dim() - 2))


class PatchEmbed(nn.Module):
    """mmcv's PatchEmbed (Conv3d): (B, 3, T, H, W) -> (B, C, T / 2, H / p, W / p). Kernel = stride,
    so the whole clip at once equals its 16-frame chunks one by one."""

    def __init__(self, dim: int, tubelet: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv3d(3, dim, (tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x)


class Attention(nn.Module):
    """Multi-head self-attention on (B', N, C) with learnable q and v biases (k's is zero)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    """mmcv's FFN (two layers, GELU, no identity): keys `layers.0.0`, `layers.1`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Adapter(nn.Module):
    """AdaTAD's temporal-informative adapter on tokens (B, n, t, h, w, C), the video's time axis
    being (n, t): `residual(x)` = gamma * up(z + conv(dwconv_t(z))), z = GELU(down(x)), hidden
    C * ratio channels; forward x + residual(x)."""

    def __init__(self, dim: int, ratio: float = 0.25, kernel: int = 3) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.dwconv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.conv = nn.Conv1d(hidden, hidden, 1)
        self.down_proj = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up_proj = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """AdaTAD's initialisation: the convs N(0, 2 / fan) with zero bias, down_proj truncated
        normal (std 0.02, zero bias), up_proj all zero, gamma 1: the adapter starts as identity."""
        with torch.no_grad():
            self.dwconv.weight.normal_(0.0, math.sqrt(2.0 / self.dwconv.kernel_size[0]))
            self.conv.weight.normal_(0.0, math.sqrt(2.0 / self.conv.in_channels))
            nn.init.trunc_normal_(self.down_proj.weight, std=0.02)
            for t in (self.dwconv.bias, self.conv.bias, self.down_proj.bias, self.up_proj.weight, self.up_proj.bias):
                t.zero_()
            self.gamma.fill_(1.0)

    def residual(self, x: Tensor) -> Tensor:
        z = self.act(self.down_proj(x))
        b, n, t, h, w, c = z.shape
        seq = z.permute(0, 3, 4, 5, 1, 2).reshape(b * h * w, c, n * t)  # each location's time series
        seq = self.conv(self.dwconv(seq))
        z = z + seq.view(b, h, w, c, n, t).permute(0, 4, 5, 1, 2, 3)
        return self.up_proj(z) * self.gamma

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


class ViTBlock(nn.Module):
    """A pre-norm ViT block on chunked tokens (B, n, t, h, w, C), with an optional adapter after
    it (module docstring: F1, F2, F3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, adapter_ratio: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FFN(dim, int(dim * mlp_ratio))
        self.adapter = Adapter(dim, adapter_ratio) if adapter_ratio is not None else None
        self.drop_path = drop_path

    def attention_branch(self, x: Tensor, start: int = 0, total: int | None = None) -> Tensor:
        """F1 on chunks [start, start + n) of `total` (default: x holds them all)."""
        b, n, t, h, w, c = x.shape
        out = self.attn(self.norm1(x).reshape(b * n, t * h * w, c)).view(x.shape)
        return drop_path(out, self.drop_path, self.training, start, total)

    def mlp_branch(self, x: Tensor, start: int = 0, total: int | None = None) -> Tensor:
        return drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, start, total)

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.attention_branch, self.mlp_branch] + ([self.adapter.residual] if self.adapter is not None else [])

    def residual_pieces(self) -> list[Pieces | None]:
        """F1, F2: along the chunks, each piece drawing its rows of the drop-path masks; F3 along H."""
        attention = Pieces(1, at=lambda x, start, size: self.attention_branch(x, start, size))
        mlp = Pieces(1, at=lambda x, start, size: self.mlp_branch(x, start, size))
        return [attention, mlp] + ([Pieces(3)] if self.adapter is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention_branch(x)
        x = x + self.mlp_branch(x)
        return x if self.adapter is None else self.adapter(x)


class VisionTransformer(Backbone):
    """VideoMAE(v2) ViT with AdaTAD adapters in `adapter_blocks` (None: no adapters). Drop path
    rises linearly from 0 to `drop_path` over the blocks. `pretrain_grid` (t0, h0, w0): the
    position table's grid (default: 16 frames x 224² in tubelets / patches)."""

    LAYOUT = "VideoMAE / VideoMAEv2 (mmaction's VisionTransformer, OpenTAD's converted files, or the release's)"
    # the release's classifier first: `re2tal finetune` writes its classifier there
    CLASSIFIER_KEYS = ("head.weight", "head.bias", "cls_head.fc_cls.weight", "cls_head.fc_cls.bias", "fc_norm.weight", "fc_norm.bias",
                       "norm.weight", "norm.bias")

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 16, tubelet: int = 2,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1, chunk_frames: int = 16, adapter_blocks: Sequence[int] | None = None,
                 adapter_ratio: float = 0.25, pretrain_grid: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        if chunk_frames % tubelet:
            raise ValueError(f"chunk_frames: {chunk_frames} is not a multiple of the tubelet size {tubelet}")
        self.chunk_frames, self.embed_dim = chunk_frames, embed_dim
        self.pretrain_grid = pretrain_grid or (PRETRAIN_FRAMES // tubelet, PRETRAIN_SIZE // patch_size, PRETRAIN_SIZE // patch_size)
        self.patch_embed = PatchEmbed(embed_dim, tubelet, patch_size)
        self.register_buffer("pos_embed", sinusoid_table(math.prod(self.pretrain_grid), embed_dim))
        adapters = set(adapter_blocks or ())
        self.blocks = nn.Sequential(*[ViTBlock(embed_dim, num_heads, mlp_ratio, drop_path * i / max(depth - 1, 1),
                                               adapter_ratio if i in adapters else None) for i in range(depth)])
        self.out_channels = embed_dim
        self.temporal_stride = tubelet
        self.spatial_stride = patch_size
        # mmaction's init_cfg: truncated-normal Linear weights, zero biases (then the adapters' own)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(m, Adapter):
                m.reset_parameters()

    @classmethod
    def checkpoint_options(cls, state: dict[str, Tensor]) -> dict:
        """The position table's grid: 8 token frames (16-frame clips), square frames."""
        table = state.get("pos_embed", state.get("backbone.pos_embed"))
        if table is None or table.dim() != 3:
            return {}
        side = math.isqrt(table.shape[1] // (PRETRAIN_FRAMES // 2))
        return {"pretrain_grid": (PRETRAIN_FRAMES // 2, side, side)}

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """mmaction Recognizer files unwrapped, release names mapped (module docstring), classifier
        and fc_norm dropped, a missing `pos_embed` filled with the fixed sin-cos table."""
        if any(k.startswith("backbone.") for k in state):
            state = mmaction_backbone(state)
        out = {}
        for key, value in super().checkpoint_state(state).items():
            for old, new in RELEASE_NAMES:
                key = key.replace(old, new)
            out[key] = value
        out.setdefault("pos_embed", sinusoid_table(math.prod(self.pretrain_grid), self.embed_dim))
        return out

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(self, "blocks", 0)]

    def transitions(self) -> list[str]:
        return ["patch_embed"]

    def frozen_modules(self, stages: int) -> list[str]:
        return ["patch_embed"] + (["blocks"] if stages >= 1 else [])

    def adapter_names(self) -> list[str]:
        return [name for name, m in self.named_modules() if isinstance(m, Adapter)]

    def position_embedding(self, t: int, h: int, w: int) -> Tensor:
        """The table on a chunk's (t, h, w) grid: (t, h, w, C)."""
        t0, h0, w0 = self.pretrain_grid
        pos = self.pos_embed.reshape(t0, h0, w0, -1)
        if (h, w) != (h0, w0):  # OpenTAD's: bicubic over each frame
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        if t != t0:
            pos = F.interpolate(pos.permute(1, 2, 3, 0).reshape(1, -1, t0), size=t, mode="linear").reshape(h, w, -1, t).permute(3, 0, 1, 2)
        return pos

    def forward(self, x: Tensor) -> Tensor:
        b, _, frames = x.shape[:3]
        if frames % self.chunk_frames:
            raise ValueError(f"VisionTransformer: {frames} frames are not a multiple of chunk_frames={self.chunk_frames}")
        z = self.patch_embed(x)  # B, C, T', h, w
        c, tokens, h, w = z.shape[1:]
        n = frames // self.chunk_frames
        t = tokens // n
        # contiguous: the sum of a permuted view keeps its channels-first strides
        z = (z.view(b, c, n, t, h, w).permute(0, 2, 3, 4, 5, 1) + self.position_embedding(t, h, w)).contiguous()
        z = self.blocks(z)  # B, n, t, h, w, C
        return z.reshape(b, n * t, h, w, c).permute(0, 4, 1, 2, 3)
