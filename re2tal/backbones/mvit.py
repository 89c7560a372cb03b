"""MViTv2-S (Li et al., CVPR 2022) as torchvision builds it (torchvision/models/video/mvit.py,
`mvit_v2_s`: pooling attention with residual pooling, decomposed relative position embeddings,
projection after attention), so torchvision's Kinetics-400 file loads as downloaded.

(B, 3, T, H, W) -> patch embedding conv (3, 7, 7) stride (2, 4, 4) -> class token + T' x H' x W'
patch tokens -> 16 blocks in 4 stages (96, 192, 384, 768 channels; 1, 2, 11, 2 blocks) -> the
last stage's patch tokens after the final LayerNorm, class token dropped, as
(B, 768, ceil(T / 2), ~H / 32, ~W / 32). The first block of stages 2-4 pools the query (stride
(1, 2, 2)) and doubles the channels; the others keep the token shape.

Tokens between blocks are in grid form (B, 1 + T', H', W', C): frame 0 holds the class token at
(0, 0) and zeros elsewhere, frames 1.. the patch tokens. So a block maps one tensor to one tensor
whose shape says the token grid, and a shape-keeping block's two residual functions (attention
branch, MLP branch: `residual_fns()`) are plain (B, 1 + T', H', W', C) -> same maps with zeros
in the padding, which Re² rewiring uses unchanged; the pooling blocks stay ordinary.

Layout: ours is `conv_proj`, `pos_encoding.class_token`, `stages.{s}.{i}` (block i of
torchvision's `blocks.{i}`, in stage s), `norm`; `checkpoint_state` maps torchvision's
`blocks.{i}.` to `stages.{s}.{i}.` and drops the classifier `head.1.*`, nothing else.

Clip length and frame size (the weights saw 16 x 224 x 224, grids 8 x 56 x 56): MViTv2-S has
no absolute position embedding (only the class token), and its relative position tables were
sized for that grid: `rel_pos_t` has 2 * 8 - 1 = 15 rows, `rel_pos_h / w` 2 * max(q, kv) - 1 for
the block's pretraining grid. At any other grid each table is linearly resized to the
2 * max(q, k) - 1 rows the grid needs (F.interpolate, mode "linear", align_corners False), and
query / key offsets are scaled by the pooling ratio, exactly as torchvision's `_add_rel_pos` and
the SlowFast code do; at 16 x 224 the tables are used as they are. torchvision's `MViT.forward`
itself runs only at the size it was built for (its grid comes from the constructor, and a
`mvit_v2_s(temporal_size=T)` has tables of another shape than the weights), but its blocks take
any grid; ours derive the grid from the input, so any T and H, W work.

Attention is global within a block: a query attends every (pooled) key of the whole clip, so
its cost grows with T^2 (at 224 px, stage 1 has T' * 3136 queries and T' * 49 keys per head).
It runs through `F.scaled_dot_product_attention` with the decomposed relative position bias as
its additive mask, in calls of at most ATTN_CALL_ELEMENTS bias elements (groups of queries),
recomputed in backward when there is more than one (`QueryChunks`): the (N_q, N_k) bias never
exists whole, in the forward or the backward. Kept per block are q, k, v and the three bias terms (B, heads, N_q, T' + H' + W'),
of which the temporal one, N_q x T', still grows with T^2; time grows with T^2 too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP, StochasticDepth

from re2tal.backbones.base import Backbone, init_linears
from re2tal.rev.pieces import Pieces

Triple = tuple[int, int, int]

# The clip the published weights were trained on, which sized the relative position tables.
PRETRAIN_CLIP: Triple = (16, 224, 224)
PATCH_KERNEL, PATCH_STRIDE, PATCH_PADDING = (3, 7, 7), (2, 4, 4), (1, 3, 3)
# Attention calls hold at most this many elements of the (B, heads, queries, keys) bias each.
ATTN_CALL_ELEMENTS = 2**26


def to_grid(tokens: Tensor, thw: Sequence[int]) -> Tensor:
    """(B, 1 + T H W, C) class token + patch tokens -> grid form (B, 1 + T, H, W, C)."""
    b, _, c = tokens.shape
    t, h, w = thw
    head = F.pad(tokens[:, :1], (0, 0, 0, h * w - 1)).view(b, 1, h, w, c)  # class token at (0, 0), zeros after
    return torch.cat([head, tokens[:, 1:].reshape(b, t, h, w, c)], 1)


def to_tokens(grid: Tensor) -> tuple[Tensor, Triple]:
    """Grid form (B, 1 + T, H, W, C) -> ((B, 1 + T H W, C), (T, H, W))."""
    b, t1, h, w, c = grid.shape
    return torch.cat([grid[:, 0, :1, 0], grid[:, 1:].reshape(b, -1, c)], 1), (t1 - 1, h, w)


class Pool(nn.Module):
    """Pooling of the patch tokens of (B, heads, 1 + N, d) on their (T, H, W) grid, the class
    token passed by; then `norm_act` (LayerNorm) over all tokens, if any (torchvision's Pool)."""

    def __init__(self, pool: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.norm_act = nn.Sequential(norm) if norm is not None else None

    def forward(self, x: Tensor, thw: Sequence[int]) -> tuple[Tensor, Triple]:
        b, heads, _, d = x.shape
        grid = self.pool(x[:, :, 1:].transpose(2, 3).reshape(b * heads, d, *thw))
        pooled = grid.shape[2:]
        x = torch.cat([x[:, :, :1], grid.reshape(b, heads, d, -1).transpose(2, 3)], 2)
        return (x if self.norm_act is None else self.norm_act(x)), tuple(pooled)


def resized_table(table: Tensor, rows: int) -> Tensor:
    """A (L, d) relative position table linearly resized to (rows, d) (identity if L == rows)."""
    if table.shape[0] == rows:
        return table
    return F.interpolate(table.t().unsqueeze(0), size=rows, mode="linear").squeeze(0).t()


def relative_positions(table: Tensor, q: int, k: int) -> Tensor:
    """(q, k, d): the table's row for each query / key position along one axis of sizes q, k,
    offsets scaled by the pooling ratio of the coarser side: row = floor(i * max(k / q, 1) -
    (j + 1 - k) * max(q / k, 1)), from a table resized to 2 max(q, k) - 1 rows."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    dev = table.device
    dist = torch.arange(q, device=dev)[:, None] * q_ratio - (torch.arange(k, device=dev)[None, :] + (1.0 - k)) * k_ratio
    return resized_table(table, 2 * max(q, k) - 1)[dist.long()]


class MultiscaleAttention(nn.Module):
    """Pooling attention of MViTv2: q, k, v pooled by depthwise convs (kernel 3, strides
    stride_q / stride_kv) + LayerNorm, softmax(q k^T / sqrt(d) + bias) v + q (residual pooling,
    not on the class token), bias from the decomposed relative position tables (patch tokens
    only), then the projection. (B, 1 + N, C_in) tokens on grid thw -> (B, 1 + N', C_out), thw'."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, stride_q: Triple, stride_kv: Triple,
                 table_grid: Triple, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_out // num_heads
        self.qkv = nn.Linear(dim_in, 3 * dim_out)
        self.project = nn.Sequential(nn.Linear(dim_out, dim_out))

        def pool(stride: Triple) -> Pool:
            conv = nn.Conv3d(head_dim, head_dim, 3, stride=stride, padding=1, groups=head_dim, bias=False)
            return Pool(conv, norm(head_dim))

        self.pool_q, self.pool_k, self.pool_v = pool(stride_q), pool(stride_kv), pool(stride_kv)
        # table sizes: those torchvision gives the block at the pretraining grid
        size = max(table_grid[1:])
        spatial = 2 * max(size // stride_q[1], size // stride_kv[1]) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(spatial, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(spatial, head_dim))
        self.rel_pos_t = nn.Parameter(torch.zeros(2 * table_grid[0] - 1, head_dim))
        for table in (self.rel_pos_h, self.rel_pos_w, self.rel_pos_t):
            nn.init.trunc_normal_(table, std=0.02)

    def forward(self, x: Tensor, thw: Triple) -> tuple[Tensor, Triple]:
        b, n, _ = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, -1).transpose(1, 3).unbind(2)  # each B, heads, 1 + N, d
        k, k_thw = self.pool_k(k, thw)
        v = self.pool_v(v, thw)[0]
        q, q_thw = self.pool_q(q, thw)
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, :1], k, v), self._attend_patches(q, k, v, q_thw, k_thw)], 2)
        return self.project(out.transpose(1, 2).reshape(b, q.shape[2], -1)), q_thw

    def _attend_patches(self, q: Tensor, k: Tensor, v: Tensor, q_thw: Triple, k_thw: Triple) -> Tensor:
        """softmax(q k^T / sqrt(d) + bias) v + q for the patch queries, (B, heads, N_q, d), in calls of
        at most ATTN_CALL_ELEMENTS bias elements. bias[(t, h, w), (t', h', w')] = q . (Rt[t, t'] +
        Rh[h, h'] + Rw[w, w']), 0 for the class token key; the three terms are (B, heads, N_q, k_*).
        With more than one call and grads on, the calls run in `QueryChunks`: each call's bias is
        rebuilt in backward instead of kept (kept, every call's would add up to the whole
        (N_q, N_k) bias)."""
        b, heads, _, d = q.shape
        (qt, qh, qw), (kt, kh, kw) = q_thw, k_thw
        r_q = q[:, :, 1:].reshape(b, heads, qt, qh, qw, d)
        terms = [torch.einsum(f"bnthwc,{axis}kc->bnthwk", r_q, relative_positions(table, nq, nk)).flatten(2, 4)
                 for axis, table, nq, nk in (("t", self.rel_pos_t, qt, kt), ("h", self.rel_pos_h, qh, kh), ("w", self.rel_pos_w, qw, kw))]
        n_q = qt * qh * qw
        per_call = max(1, ATTN_CALL_ELEMENTS // (b * heads * (1 + kt * kh * kw)))
        if per_call >= n_q:
            return attend_call(q[:, :, 1:], k, v, *terms)
        return QueryChunks.apply(q[:, :, 1:], k, v, *terms, per_call)


def attend_call(q: Tensor, k: Tensor, v: Tensor, rel_t: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v + q for queries q (B, heads, n, d) against all keys
    (B, heads, 1 + N_k, d), bias[i, (t', h', w')] = rel_t[i, t'] + rel_h[i, h'] + rel_w[i, w'] and 0
    for the class token key."""
    n_k = rel_t.shape[-1] * rel_h.shape[-1] * rel_w.shape[-1]
    bias = rel_t[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    # mask rows padded to a multiple of 16 (then sliced): the alignment CUDA's memory-efficient
    # kernel needs of a mask (else it pads a copy itself)
    mask = F.pad(bias.flatten(3), (1, (-1 - n_k) % 16))[..., :1 + n_k]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)) + q


def query_chunks(n: int, per_call: int, device: torch.device) -> list[slice]:
    """Consecutive chunks of at most per_call of n queries. On the meta device (`re2tal plan`),
    where thousands of equal chunks allocate and free alike, the first two stand for all of their
    length (the second runs, as all later ones, next to the sums of dk, dv) and the last for
    itself."""
    chunks = [slice(start, min(start + per_call, n)) for start in range(0, n, per_call)]
    if device.type == "meta" and len(chunks) > 3:
        chunks = chunks[:2] + chunks[-1:]
    return chunks


class QueryChunks(torch.autograd.Function):
    """`attend_call` on chunks of queries: out[:, :, c] = attend_call(q[:, :, c], k, v, rel_t[:, :, c],
    rel_h[:, :, c], rel_w[:, :, c]) for the chunks c of `per_call` queries, the inputs kept; the
    backward recomputes each chunk and back-propagates it: dq, drel_* chunk by chunk, dk, dv summed.
    One chunk's bias and attention temporaries exist at a time, forward or backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rel_t: Tensor, rel_h: Tensor, rel_w: Tensor, per_call: int) -> Tensor:
        ctx.save_for_backward(q, k, v, rel_t, rel_h, rel_w)
        ctx.per_call = per_call
        out = q.new_empty(q.shape)
        for c in query_chunks(q.shape[2], per_call, q.device):
            out[:, :, c] = attend_call(q[:, :, c], k, v, rel_t[:, :, c], rel_h[:, :, c], rel_w[:, :, c])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, *rel = ctx.saved_tensors
        per_query = [q, *rel]  # chunked along the queries; k, v whole
        need = ctx.needs_input_grad
        d_per_query = [t.new_empty(t.shape) if need[i] else None for i, t in zip((0, 3, 4, 5), per_query)]
        dk = dv = None
        for c in query_chunks(q.shape[2], ctx.per_call, q.device):
            inputs = [t[:, :, c].detach().requires_grad_(need[i]) for i, t in zip((0, 3, 4, 5), per_query)]
            kc, vc = k.detach().requires_grad_(need[1]), v.detach().requires_grad_(need[2])
            with torch.enable_grad():
                out = attend_call(inputs[0], kc, vc, *inputs[1:])
            wrt = [t for t in (inputs[0], kc, vc, *inputs[1:]) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, grad[:, :, c]))
            dq_c = next(grads) if need[0] else None
            dk_c = next(grads) if need[1] else None
            dv_c = next(grads) if need[2] else None
            for d, g in zip(d_per_query, [dq_c, *grads]):
                if d is not None:
                    d[:, :, c] = g
            dk = dk_c if dk is None else dk.add_(dk_c) if dk_c is not None else dk
            dv = dv_c if dv is None else dv.add_(dv_c) if dv_c is not None else dv
        dq, drt, drh, drw = d_per_query
        return dq, dk, dv, drt, drh, drw, None


class MultiscaleBlock(nn.Module):
    """torchvision's MultiscaleBlock of MViTv2-S (proj_after_attn, residual pooling), on tokens in
    grid form (B, 1 + T, H, W, C_in) -> (B, 1 + T', H', W', C_out):

        x1 = skip(x) + drop_path(attn(norm1(x))),   y = x1 + drop_path(mlp(norm2(x1)))

    skip = max pool (stride_q) of project(norm1(x)) where channels change, of x otherwise. A block
    with stride_q 1 and C_in = C_out keeps the shape: skip = identity, and `residual_fns()` gives
    [F1 = drop_path o attn o norm1, F2 = drop_path o mlp o norm2] for Re² rewiring."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, stride_q: Triple, stride_kv: Triple,
                 table_grid: Triple, drop_path: float, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.pool_skip = None
        if math.prod(stride_q) > 1:
            kernel = tuple(s + 1 if s > 1 else s for s in stride_q)
            self.pool_skip = Pool(nn.MaxPool3d(kernel, stride=stride_q, padding=tuple(k // 2 for k in kernel)))
        self.norm1 = norm(dim_in)
        self.norm2 = norm(dim_out)
        self.attn = MultiscaleAttention(dim_in, dim_out, num_heads, stride_q, stride_kv, table_grid, norm)
        self.mlp = MLP(dim_out, [4 * dim_out, dim_out], activation_layer=nn.GELU, inplace=None, dropout=0.0)
        self.stochastic_depth = StochasticDepth(drop_path, "row")
        self.project = nn.Linear(dim_in, dim_out) if dim_in != dim_out else None

    def keeps_shape(self) -> bool:
        return self.pool_skip is None and self.project is None

    def attention_branch(self, grid: Tensor) -> Tensor:
        x, thw = to_tokens(grid)
        out, thw = self.attn(self.norm1(x), thw)
        return to_grid(self.stochastic_depth(out), thw)

    def mlp_branch(self, grid: Tensor) -> Tensor:
        x, thw = to_tokens(grid)
        return to_grid(self.stochastic_depth(self.mlp(self.norm2(x))), thw)

    def residual_fns(self) -> list[Callable[[Tensor], Tensor]]:
        if not self.keeps_shape():
            raise TypeError("MultiscaleBlock: a block that pools the query or changes channels is not a residual function")
        return [self.attention_branch, self.mlp_branch]

    def residual_pieces(self) -> list[Pieces | None]:
        """F1 attends globally: not local. F2 is token-wise: local along the grid's frames, where a
        piece from frame 0 holds the class-token frame (zeros off the class token) and any other
        holds patch tokens only."""
        return [None, Pieces(1, at=lambda grid, start, size: self.mlp_branch(grid) if start == 0 else self.stochastic_depth(self.mlp(self.norm2(grid))))]

    def forward(self, grid: Tensor) -> Tensor:
        x, thw = to_tokens(grid)
        x_norm = self.norm1(x)
        out, out_thw = self.attn(x_norm, thw)
        skip = x if self.project is None else self.project(x_norm)
        if self.pool_skip is not None:
            skip = self.pool_skip(skip.unsqueeze(1), thw)[0].squeeze(1)
        x = skip + self.stochastic_depth(out)
        return to_grid(x + self.stochastic_depth(self.mlp(self.norm2(x))), out_thw)


class ClassToken(nn.Module):
    """torchvision's PositionalEncoding of MViTv2 (relative position embeddings): the class token only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.class_token, std=0.02)


class MViT(Backbone):
    """MViTv2 backbone: stage s has embed_dim * 2^s channels and num_heads[s] heads; its first block
    (s >= 1) pools the query by (1, 2, 2); keys and values are pooled by 2^(S-1-s) spatially
    (mvit_v2_s: 8, 4, 2, 1). Drop path rises linearly to `drop_path` over the blocks."""

    LAYOUT = "torchvision mvit_v2_s"
    CLASSIFIER_KEYS = ("head.1.weight", "head.1.bias")

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (1, 2, 11, 2), num_heads: Sequence[int] = (1, 2, 4, 8),
                 drop_path: float = 0.2) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.conv_proj = nn.Conv3d(3, embed_dim, PATCH_KERNEL, stride=PATCH_STRIDE, padding=PATCH_PADDING)
        self.pos_encoding = ClassToken(embed_dim)
        grid = [s // p for s, p in zip(PRETRAIN_CLIP, PATCH_STRIDE)]  # the blocks' pretraining grid
        total, index = sum(depths), 0
        self.stages = nn.ModuleList()
        self.block_stage: dict[int, int] = {}  # torchvision block index -> stage
        dim_in = embed_dim
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim, kv = embed_dim * 2**s, 2 ** (len(depths) - 1 - s)
            blocks = OrderedDict()
            for j in range(depth):
                stride_q = (1, 2, 2) if s > 0 and j == 0 else (1, 1, 1)
                rate = drop_path * index / max(total - 1, 1)
                blocks[str(index)] = MultiscaleBlock(dim_in, dim, heads, stride_q, (1, kv, kv), tuple(grid), rate, norm)
                grid = [g // st for g, st in zip(grid, stride_q)]
                self.block_stage[index] = s
                dim_in, index = dim, index + 1
            self.stages.append(nn.Sequential(blocks))
        self.norm = norm(dim_in)
        self.out_channels = dim_in
        self.temporal_stride = PATCH_STRIDE[0]
        self.spatial_stride = PATCH_STRIDE[1] * 2 ** (len(depths) - 1)
        init_linears(self)

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's keys `blocks.{i}.*` under ours, `stages.{s}.{i}.*` (s: block i's stage);
        the classifier dropped. A file in our own layout passes as it is. ValueError names a
        block index this model does not have."""
        out = {}
        for key, value in super().checkpoint_state(state).items():
            if key.startswith("blocks."):
                index, rest = key.removeprefix("blocks.").split(".", 1)
                if not index.isdigit() or int(index) not in self.block_stage:
                    raise ValueError(f"{key} is a block this model does not have ({len(self.block_stage)} blocks; depths must be the file's)")
                key = f"stages.{self.block_stage[int(index)]}.{index}.{rest}"
            out[key] = value
        return out

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(self.stages, str(s), 0 if s == 0 else 1) for s in range(len(self.stages))]

    def frozen_modules(self, stages: int) -> list[str]:
        return ["conv_proj", "pos_encoding"] + [f"stages.{s}" for s in range(min(stages, len(self.stages)))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x)  # B, C, T', H', W'
        b, c = x.shape[:2]
        tokens = torch.cat([self.pos_encoding.class_token.expand(b, 1, c), x.flatten(2).transpose(1, 2)], 1)
        grid = to_grid(tokens, x.shape[2:])
        for stage in self.stages:
            grid = stage(grid)
        return self.norm(grid[:, 1:]).permute(0, 4, 1, 2, 3)
