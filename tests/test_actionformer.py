"""head.encoder: actionformer against a port of OpenTAD's ActionFormer neck and heads
(github.com/sming256/OpenTAD, commit 3dd7b03), same weights, same outputs at every real position:
- opentad/models/bricks/conv.py:8-112 (ConvModule), bricks/transformer.py:10-97 (TransformerBlock),
  100-227 (MaskedMHCA), 587-605 (AffineDropPath; drop path itself is off in eval mode);
- opentad/models/projections/actionformer_proj.py:11-186 (Conv1DTransformerProj, its position
  encoding);
- opentad/models/necks/fpn.py:60-127 (FPNIdentity);
- opentad/models/dense_heads/anchor_free_head.py:59-142 (heads, Scale, forward_test).
Their input features at padded positions are edge-repeated frames' features; here they are zero
on both sides (ours zeroes them)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from re2tal.config import HeadConfig
from re2tal.detection import build_detector


class ConvModule(nn.Module):
    def __init__(self, c_in, c_out, kernel_size=1, stride=1, padding=0, groups=1, bias=True, norm=False, act=False):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias and not norm)
        self.norm = nn.LayerNorm(c_out, eps=1e-6) if norm else None
        self.act = act

    def forward(self, x, mask):
        x = self.conv(x)
        if mask.shape[-1] != x.shape[-1]:
            mask = F.interpolate(mask.unsqueeze(1).to(x.dtype), size=x.size(-1), mode="nearest").squeeze(1).to(mask.dtype)
        x = x * mask.unsqueeze(1).float().detach()
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 1)).permute(0, 2, 1)
        if self.act:
            x = F.relu(x)
        return x * mask.unsqueeze(1).float().detach(), mask


class MaskedMHCA(nn.Module):
    def __init__(self, n_embd, n_head, stride):
        super().__init__()
        self.n_head, self.n_channels = n_head, n_embd // n_head
        self.scale = 1.0 / math.sqrt(self.n_channels)
        kernel_size = stride + 1 if stride > 1 else 3
        conv = lambda: ConvModule(n_embd, n_embd, kernel_size, stride, kernel_size // 2, groups=n_embd, bias=False)  # noqa: E731
        self.query_conv, self.key_conv, self.value_conv = conv(), conv(), conv()
        self.query_norm, self.key_norm, self.value_norm = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.key, self.query, self.value = nn.Conv1d(n_embd, n_embd, 1), nn.Conv1d(n_embd, n_embd, 1), nn.Conv1d(n_embd, n_embd, 1)
        self.proj = nn.Conv1d(n_embd, n_embd, 1)

    def forward(self, x, mask):
        B, C, T = x.size()
        ln = lambda norm, t: norm(t.permute(0, 2, 1)).permute(0, 2, 1)  # noqa: E731
        q, qx_mask = self.query_conv(x, mask)
        q = ln(self.query_norm, q)
        k, kv_mask = self.key_conv(x, mask)
        k = ln(self.key_norm, k)
        v, _ = self.value_conv(x, mask)
        v = ln(self.value_norm, v)
        q, k, v = self.query(q), self.key(k), self.value(v)
        k = k.view(B, self.n_head, self.n_channels, -1).transpose(2, 3)
        q = q.view(B, self.n_head, self.n_channels, -1).transpose(2, 3)
        v = v.view(B, self.n_head, self.n_channels, -1).transpose(2, 3)
        att = (q * self.scale) @ k.transpose(-2, -1)
        att = att.masked_fill(torch.logical_not(kv_mask[:, None, None, :]), float("-inf"))
        att = F.softmax(att, dim=-1)
        out = att @ (v * kv_mask[:, None, :, None].to(v.dtype))
        out = out.transpose(2, 3).contiguous().view(B, C, -1)
        return self.proj(out) * qx_mask.unsqueeze(1).to(out.dtype), qx_mask


class AffineDropPath(nn.Module):
    def __init__(self, num_dim):
        super().__init__()
        self.scale = nn.Parameter(1e-4 * torch.ones((1, num_dim, 1)))

    def forward(self, x):
        return self.scale * x  # drop_path is the identity in eval mode


class TransformerBlock(nn.Module):
    def __init__(self, c, n_head, stride):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = MaskedMHCA(c, n_head, stride)
        self.pool_skip = nn.MaxPool1d(stride + 1, stride=stride, padding=(stride + 1) // 2) if stride > 1 else nn.Identity()
        self.mlp = nn.Sequential(nn.Conv1d(c, 4 * c, 1), nn.GELU(), nn.Dropout(0.0), nn.Conv1d(4 * c, c, 1), nn.Dropout(0.0))
        self.drop_path_attn, self.drop_path_mlp = AffineDropPath(c), AffineDropPath(c)

    def forward(self, x, mask):
        out, out_mask = self.attn(self.ln1(x.permute(0, 2, 1)).permute(0, 2, 1), mask)
        out_mask_float = out_mask.to(out.dtype)
        out = self.pool_skip(x) * out_mask_float.unsqueeze(1) + self.drop_path_attn(out)
        out = out + self.drop_path_mlp(self.mlp(self.ln2(out.permute(0, 2, 1)).permute(0, 2, 1)) * out_mask_float.unsqueeze(1))
        return out, out_mask


def get_sinusoid_encoding(n_position, d_hid):
    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])
    return torch.FloatTensor(sinusoid_table).unsqueeze(0).transpose(1, 2)


class OpenTADActionFormer(nn.Module):
    """Conv1DTransformerProj(arch=(embed, stem, levels - 1), use_abs_pe) + FPNIdentity(LN) +
    ActionFormerHead.forward_test (before decoding)."""

    def __init__(self, c_in, c, n_head, embed, stem, levels, num_classes, num_convs, max_seq_len):
        super().__init__()
        self.register_buffer("pos_embed", get_sinusoid_encoding(max_seq_len, c) / (c**0.5), persistent=False)
        self.embed = nn.ModuleList(ConvModule(c_in if i == 0 else c, c, 3, 1, 1, norm=True, act=True) for i in range(embed))
        self.stem = nn.ModuleList(TransformerBlock(c, n_head, 1) for _ in range(stem))
        self.branch = nn.ModuleList(TransformerBlock(c, n_head, 2) for _ in range(levels - 1))
        self.fpn_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for _ in range(levels))
        self.cls_convs = nn.ModuleList(ConvModule(c, c, 3, 1, 1, norm=True, act=True) for _ in range(num_convs))
        self.reg_convs = nn.ModuleList(ConvModule(c, c, 3, 1, 1, norm=True, act=True) for _ in range(num_convs))
        self.cls_head = nn.Conv1d(c, num_classes, kernel_size=3, padding=1)
        self.reg_head = nn.Conv1d(c, 2, kernel_size=3, padding=1)
        self.scale = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in range(levels))

    def forward(self, x, mask):
        for conv in self.embed:
            x, mask = conv(x, mask)
        x = x + self.pos_embed[:, :, : x.shape[-1]] * mask.unsqueeze(1).to(x.dtype)
        for blk in self.stem:
            x, mask = blk(x, mask)
        feats, masks = [x], [mask]
        for blk in self.branch:
            x, mask = blk(x, mask)
            feats.append(x)
            masks.append(mask)
        feats = [norm(f.permute(0, 2, 1)).permute(0, 2, 1) for norm, f in zip(self.fpn_norms, feats)]
        cls_pred, reg_pred = [], []
        for level, (feat, mask) in enumerate(zip(feats, masks)):
            cls_feat = reg_feat = feat
            for i in range(len(self.cls_convs)):
                cls_feat, mask = self.cls_convs[i](cls_feat, mask)
                reg_feat, mask = self.reg_convs[i](reg_feat, mask)
            cls_pred.append(self.cls_head(cls_feat))
            reg_pred.append(F.relu(self.scale[level] * self.reg_head(reg_feat)))
        return cls_pred, reg_pred, masks


def copy_into_ours(theirs: OpenTADActionFormer, ours) -> None:
    """Their weights into our modules (1x1 convs are our linears)."""
    def put(dst, src):
        with torch.no_grad():
            dst.copy_(src.reshape(dst.shape))

    def norm(dst, src):
        put(dst.weight, src.weight)
        put(dst.bias, src.bias)

    for i, conv in enumerate(theirs.embed):
        put(ours.embed[i].conv.weight, conv.conv.weight)
        norm(ours.embed_norms[i], conv.norm)
    for mine, blk in zip([*ours.stem, *ours.branch], [*theirs.stem, *theirs.branch]):
        norm(mine.norm1, blk.ln1)
        norm(mine.norm2, blk.ln2)
        a = blk.attn
        for k, (conv, nrm, lin) in enumerate(((a.query_conv, a.query_norm, a.query), (a.key_conv, a.key_norm, a.key),
                                              (a.value_conv, a.value_norm, a.value))):
            put(mine.attn.convs[k].weight, conv.conv.weight)
            norm(mine.attn.norms[k], nrm)
            norm(mine.attn.qkv[k], lin)
        norm(mine.attn.proj, a.proj)
        norm(mine.mlp[0], blk.mlp[0])
        norm(mine.mlp[3], blk.mlp[3])
        put(mine.scales[0], blk.drop_path_attn.scale)
        put(mine.scales[1], blk.drop_path_mlp.scale)
    for mine, theirs_norm in zip(ours.level_norms, theirs.fpn_norms):
        norm(mine, theirs_norm)
    for head, convs, out in ((ours.cls_head, theirs.cls_convs, theirs.cls_head), (ours.reg_head, theirs.reg_convs, theirs.reg_head)):
        for i, conv in enumerate(convs):
            put(head.convs[i].conv.weight, conv.conv.weight)
            norm(head.norms[i], conv.norm)
        norm(head.out.conv, out)
    for mine, s in zip(ours.reg_scales, theirs.scale):
        put(mine.scale, s)


@pytest.mark.parametrize("valid", [1.0, 0.55])
def test_actionformer_encoder_equals_opentads(valid):
    torch.manual_seed(0)
    cfg = HeadConfig(num_classes=3, seq_len=32, embed_dim=32, embed_convs=2, stem_layers=2, fpn_levels=4, attn_window=-1,
                     num_attn_heads=4, drop_path=0.1, encoder="actionformer")
    ours = build_detector(cfg, 24).eval()
    theirs = OpenTADActionFormer(24, 32, 4, 2, 2, 4, 3, 2, 32).eval()
    with torch.no_grad():  # LayerScales and Scales away from their starting values, so every path counts
        for p in theirs.parameters():
            if p.dim() <= 1 or p.shape[0] == 1:
                p.add_(torch.rand_like(p) * 0.5)
    copy_into_ours(theirs, ours)
    feats = torch.randn(2, 24, 32, 1, 1)
    with torch.no_grad():
        out = ours(feats, torch.tensor([1.0, valid]))
        mask = out.masks[0]
        cls_pred, reg_pred, masks = theirs(feats[..., 0, 0] * mask[:, None].float(), mask)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    for level in range(4):
        assert torch.equal(out.masks[level], masks[level])
        real = masks[level]
        torch.testing.assert_close(out.cls_logits[level][real], cls_pred[level].transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.offsets[level][real], reg_pred[level].transpose(1, 2)[real], rtol=1e-4, atol=1e-5)


def test_actionformer_encoder_starts_with_small_residual_branches_and_trains():
    cfg = HeadConfig(num_classes=2, seq_len=16, embed_dim=16, fpn_levels=3, stem_layers=1, num_attn_heads=2, encoder="actionformer")
    model = build_detector(cfg, 8)
    blk = model.stem[0]
    assert torch.equal(blk.scales[0], torch.full((16,), 1e-4)) and not blk.attn.qkv[0].bias.any()
    out = model(torch.randn(2, 8, 16, 1, 1), torch.tensor([1.0, 0.5]))
    assert [c.shape[1] for c in out.cls_logits] == [16, 8, 4]
    sum(c.sum() for c in out.cls_logits).backward()
    assert blk.scales[0].grad is not None and blk.attn.convs[0].weight.grad.abs().sum() > 0
    no_drop = build_detector(cfg.model_copy(update={"drop_path": 0.0}), 8)
    assert len(no_drop.stem[0].scales) == 0  # as theirs: no AffineDropPath without drop path
