"""ActionFormer-style neck and heads. Modules only: no targets, losses or decoding here.

    feats (B, C, T', H', W') --mean over H', W'--> (B, C, T') --linear resample--> (B, C, L)
    --embed convs--> (B, L, D) --stem: local-attention blocks--> level 0
    level l = block(maxpool_2(level l-1)),  l = 1 .. fpn_levels - 1          (B, L / 2^l, D)
    shared heads on every level: class logits (B, T_l, K); distances (B, T_l, 2) >= 0 to the
    segment's start and end in units of the level's stride 2^l.

head.encoder "actionformer" builds ActionFormer's own blocks (OpenTAD bricks/transformer.py
TransformerBlock + MaskedMHCA): query, key and value each through a depth-wise conv (kernel 3,
stride 2 in the levels after the first) and a LayerNorm before their projections; the skip path
max-pooled; each residual branch scaled per channel by a LayerScale starting at 1e-4 (their
AffineDropPath, present when drop_path > 0); the position encoding divided by sqrt(D).

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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(mask, self.window))
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


class ConvAttention(nn.Module):
    """ActionFormer's masked multi-head conv attention (MaskedMHCA) on (B, T, C):
    q, k, v = W_{q,k,v} LN(dwconv_s(x)) with s = `stride` (T -> T / s), attention over the real
    keys (within the window when window > 0), out = W_o(att v) * mask_s. Returns (out, mask_s)."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float, stride: int):
        super().__init__()
        self.heads, self.window, self.stride = heads, window, stride
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 3, stride, 1, groups=dim, bias=False) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask[:, :: self.stride]
        m = mask[..., None].to(x.dtype)
        q, k, v = (lin(norm(conv(x.transpose(1, 2)).transpose(1, 2) * m)) for conv, norm, lin in zip(self.convs, self.norms, self.qkv))
        B, T, C = q.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(mask, self.window))
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C))) * m, mask


def attention_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may attend to the real keys j with |i - j| <= window // 2 (all
    real keys when window is -1), and to itself, so a padded query has a key (no NaN)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device)
    allowed = mask[:, None, None, :]
    if window > 0:
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= window // 2)
    return allowed | torch.eye(T, dtype=torch.bool, device=mask.device)


class ActionFormerBlock(nn.Module):
    """ActionFormer's TransformerBlock on (B, T, C), stride s (1 or 2):
    y = maxpool_s(x) * mask_s + drop_path(g1 * attn(LN(x))), out = y + drop_path(g2 * mlp(LN(y)) * mask_s),
    g1, g2 per-channel LayerScales starting at 1e-4 (none when drop_path is 0, as theirs)."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float, drop_path: float, stride: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, heads, window, dropout, stride)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.stride = stride
        self.scales = nn.ParameterList(nn.Parameter(torch.full((dim,), 1e-4)) for _ in range(2 if drop_path > 0 else 0))
        self.drop_path = StochasticDepth(drop_path, "row")
        for module in self.modules():  # ActionFormer starts its linear / conv biases at 0
            if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, mask = self.attn(self.norm1(x), mask)
        m = mask[..., None].to(x.dtype)
        if self.stride > 1:
            x = F.max_pool1d(x.transpose(1, 2), self.stride + 1, self.stride, (self.stride + 1) // 2).transpose(1, 2)
        g1, g2 = self.scales if len(self.scales) else (1.0, 1.0)
        x = x * m + self.drop_path(g1 * y)
        return x + self.drop_path(g2 * self.mlp(self.norm2(x)) * m), mask


class Scale(nn.Module):
    """x * s with one learnable scalar s (per pyramid level, on the shared regression head)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # 1-D: DeepSpeed cannot broadcast 0-dim bf16 parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Head(nn.Module):
    """Conv head shared by all levels: `depth` x (conv, LayerNorm, ReLU), then a conv to `c_out`."""

    def __init__(self, dim: int, c_out: int, depth: int, eps: float = 1e-5):
        super().__init__()
        self.convs = nn.ModuleList(MaskedConv(dim, dim, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(depth))
        self.out = MaskedConv(dim, c_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x, mask))) * m
        return self.out(x, mask)


class Detector(nn.Module):
    """Neck (embedding, local-attention pyramid) and classification / regression heads."""

    def __init__(self, cfg: HeadConfig, in_channels: int):
        super().__init__()
        D = cfg.embed_dim
        self.seq_len = cfg.seq_len
        self.actionformer = cfg.encoder == "actionformer"
        eps = 1e-6 if self.actionformer else 1e-5  # ActionFormer's conv modules and FPN norms
        self.embed = nn.ModuleList(MaskedConv(in_channels if i == 0 else D, D, bias=False) for i in range(cfg.embed_convs))
        self.embed_norms = nn.ModuleList(nn.LayerNorm(D, eps=eps) for _ in range(cfg.embed_convs))
        if cfg.abs_position:
            pe = sinusoid(cfg.seq_len, D) / (math.sqrt(D) if self.actionformer else 1.0)
            self.register_buffer("position", pe, persistent=False)
        else:
            self.position = None
        if self.actionformer:
            block = partial(ActionFormerBlock, D, cfg.num_attn_heads, cfg.attn_window, cfg.dropout, cfg.drop_path)
            self.stem = nn.ModuleList(block(1) for _ in range(cfg.stem_layers))
            self.branch = nn.ModuleList(block(2) for _ in range(cfg.fpn_levels - 1))
        else:
            block = partial(EncoderBlock, D, cfg.num_attn_heads, cfg.attn_window, cfg.dropout, cfg.drop_path)
            self.stem = nn.ModuleList(block() for _ in range(cfg.stem_layers))
            self.branch = nn.ModuleList(block() for _ in range(cfg.fpn_levels - 1))
        self.level_norms = nn.ModuleList(nn.LayerNorm(D, eps=eps) for _ in range(cfg.fpn_levels))
        self.cls_head = Head(D, cfg.num_classes, cfg.head_convs, eps)
        self.reg_head = Head(D, 2, cfg.head_convs, eps)
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
            x = F.relu(norm(conv(x, mask))) * mask[..., None].to(x.dtype)
        if self.position is not None:
            x = x + self.position.to(x.dtype) * mask[..., None].to(x.dtype)
        for blk in self.stem:
            x = blk(x, mask)[0] if self.actionformer else blk(x, mask)
        feats_l, masks = [x], [mask]
        for blk in self.branch:
            if self.actionformer:  # downsamples inside
                x, mask = blk(x, mask)
            else:
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
