"""ActionFormer-style neck and heads. Modules only: no targets, losses or decoding here.

    feats (B, C, T', H', W') --mean over H', W'--> (B, C, T') --linear resample--> (B, C, L)
    --embed convs--> (B, L, D) --stem: local-attention blocks--> level 0
    level l = block(maxpool_2(level l-1)),  l = 1 .. fpn_levels - 1          (B, L / 2^l, D)
    shared heads on every level: class logits (B, T_l, K); distances (B, T_l, 2) >= 0 to the
    segment's start and end in units of the level's stride 2^l.

Padding: `valid` is the fraction of real frames in each clip (the rest is padding at its end);
grid position p is real when its centre (p + 0.5) / L <= valid. Masked positions are zeroed
after every layer, cannot be attended to, and come back in `masks` so losses and decoding skip them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from re2tal.config import HeadConfig


class DetectorOutput(NamedTuple):
    """Per pyramid level l (stride 2^l, T_l = L / 2^l positions):
    cls_logits (B, T_l, K), offsets (B, T_l, 2) >= 0 in strides, masks (B, T_l) bool (real
    positions), points (T_l,) grid position of each point (j * 2^l).

    A named tuple of lists, so that wrappers which walk a module's outputs (DeepSpeed ZeRO-3
    backward hooks) reach every tensor."""

    cls_logits: list[torch.Tensor]
    offsets: list[torch.Tensor]
    masks: list[torch.Tensor]
    points: list[torch.Tensor]
    strides: list[int]
    seq_len: int
    frame_logits: torch.Tensor | None = None  # (B, L, K + 1), background first; with head.frame_loss_weight > 0

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels concatenated: logits (B, P, K), offsets (B, P, 2), mask (B, P), points (P,),
        strides (P,), with P = sum_l T_l."""
        strides = torch.cat([torch.full_like(p, s) for p, s in zip(self.points, self.strides)])
        return (torch.cat(self.cls_logits, 1), torch.cat(self.offsets, 1), torch.cat(self.masks, 1),
                torch.cat(self.points), strides)


class MaskedConv(nn.Module):
    """Conv1d (kernel 3, same length) on (B, T, C) features; padded positions zeroed."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2) * mask[..., None].to(x.dtype)


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention where position i attends to the real positions j with
    |i - j| <= window // 2 (all real positions when window is -1)."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T, device=x.device)
        allowed = mask[:, None, None, :]  # (B, 1, 1, T) keys
        if self.window > 0:
            allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= self.window // 2)
        # a padded query may have no real key in reach; letting it see itself avoids NaN
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x)))."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LocalSelfAttention(dim, heads, window, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        x = x + self.drop_path(self.attn(self.norm1(x), mask)) * m
        return x + self.drop_path(self.mlp(self.norm2(x))) * m


class Scale(nn.Module):
    """x * s with one learnable scalar s (per pyramid level, on the shared regression head)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # 1-D: DeepSpeed cannot broadcast 0-dim bf16 parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Head(nn.Module):
    """Conv head shared by all levels: `depth` x (conv, LayerNorm, ReLU), then a conv to `c_out`."""

    def __init__(self, dim: int, c_out: int, depth: int):
        super().__init__()
        self.convs = nn.ModuleList(MaskedConv(dim, dim, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.out = MaskedConv(dim, c_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x, mask)))
        return self.out(x, mask)


class Detector(nn.Module):
    """Neck (embedding, local-attention pyramid) and classification / regression heads."""

    def __init__(self, cfg: HeadConfig, in_channels: int):
        super().__init__()
        D = cfg.embed_dim
        self.seq_len = cfg.seq_len
        self.embed = nn.ModuleList(MaskedConv(in_channels if i == 0 else D, D, bias=False) for i in range(cfg.embed_convs))
        self.embed_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.embed_convs))
        if cfg.abs_position:
            self.register_buffer("position", sinusoid(cfg.seq_len, D), persistent=False)
        else:
            self.position = None
        block = partial(EncoderBlock, D, cfg.num_attn_heads, cfg.attn_window, cfg.dropout, cfg.drop_path)
        self.stem = nn.ModuleList(block() for _ in range(cfg.stem_layers))
        self.branch = nn.ModuleList(block() for _ in range(cfg.fpn_levels - 1))
        self.level_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.fpn_levels))
        self.cls_head = Head(D, cfg.num_classes, cfg.head_convs)
        self.reg_head = Head(D, 2, cfg.head_convs)
        self.reg_scales = nn.ModuleList(Scale() for _ in range(cfg.fpn_levels))
        # start every class at probability cls_prior_prob so the focal loss starts small (RetinaNet)
        nn.init.constant_(self.cls_head.out.conv.bias, -math.log((1 - cfg.cls_prior_prob) / cfg.cls_prior_prob))
        self.frame_cls = nn.Linear(in_channels, cfg.num_classes + 1) if cfg.frame_loss_weight > 0 else None

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> DetectorOutput:
        """feats (B, C, T', H', W') from the backbone; valid (B,) fraction of real frames."""
        x = feats.mean(dim=(3, 4))
        if x.shape[-1] != self.seq_len:
            x = F.interpolate(x, size=self.seq_len, mode="linear", align_corners=False)
        x = x.transpose(1, 2)  # (B, L, C)
        centres = (torch.arange(self.seq_len, device=x.device, dtype=torch.float32) + 0.5) / self.seq_len
        mask = centres[None, :] <= valid.float()[:, None] + 1e-6
        mask[:, 0] = True  # every clip has at least one real position
        x = x * mask[..., None].to(x.dtype)
        frame_logits = self.frame_cls(x) if self.frame_cls is not None else None

        for conv, norm in zip(self.embed, self.embed_norms):
            x = F.relu(norm(conv(x, mask)))
        if self.position is not None:
            x = x + self.position.to(x.dtype) * mask[..., None].to(x.dtype)
        for blk in self.stem:
            x = blk(x, mask)
        feats_l, masks = [x], [mask]
        for blk in self.branch:
            x = F.max_pool1d(x.transpose(1, 2), 3, 2, 1).transpose(1, 2)
            mask = mask[:, ::2]
            x = blk(x, mask)
            feats_l.append(x)
            masks.append(mask)

        cls_logits, offsets, points, strides = [], [], [], []
        for level, (f, m) in enumerate(zip(feats_l, masks)):
            f = self.level_norms[level](f)
            cls_logits.append(self.cls_head(f, m))
            offsets.append(F.relu(self.reg_scales[level](self.reg_head(f, m))))
            strides.append(2**level)
            points.append(torch.arange(f.shape[1], device=f.device, dtype=torch.float32) * 2**level)
        return DetectorOutput(cls_logits, offsets, masks, points, strides, self.seq_len, frame_logits)


def sinusoid(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sine / cosine position encoding (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def build_detector(cfg: HeadConfig, in_channels: int) -> Detector:
    """The neck and heads for backbone features with `in_channels` channels."""
    return Detector(cfg, in_channels)
