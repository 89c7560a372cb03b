"""VideoMAE(v2) ViTs with AdaTAD adapters (re2tal.backbones.vit): equal to a port of OpenTAD's
module on random weights saved in its layout (and in the VideoMAEv2 release's), Re² gradients
equal plain autograd with functions in pieces, checkpointing, freezing all but the adapters,
config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from re2tal.backbones import build_backbone
from re2tal.backbones.build import CheckpointedSequential
from re2tal.backbones.vit import VisionTransformer
from re2tal.config import BackboneConfig
from re2tal.errors import BadInput
from re2tal.rev import RevStage
from test_backbones import loss_grads, record_pieces, rel, saved_bytes, set_vanilla

# A reduced ViT: 32 channels, 3 blocks (adapters after blocks 1 and 2), patch 16, its position
# table for 16 frames x 32² (grid 8 x 2 x 2).
DIM, DEPTH, HEADS, PATCH, IMG = 32, 3, 2, 16, 32
ADAPTERS = [1, 2]
SIZES = dict(name="vit_s", embed_dim=DIM, depths=[DEPTH], num_heads=[HEADS], patch_size=(2, PATCH, PATCH), adapter={"blocks": ADAPTERS})


# --------------------------------------------------------------------------------------------
# A port of OpenTAD's opentad/models/backbones/vit_adapter.py (sming256/OpenTAD at
# 3dd7b032d7a074bec9665001e4e7f9d1b71405b5) without mmcv / mmengine / mmaction: their
# build_norm_layer(LN, eps 1e-6), FFN (layers.0.0 / layers.1, GELU, add_identity False),
# PatchEmbed (Conv3d `projection`) and mmaction's get_sinusoid_encoding written out. Inference
# only (drop path and dropout off), so DropPath is left out.


def get_sinusoid_encoding(n_position, embed_dims):  # mmaction/models/backbones/vit_mae.py
    vec = torch.arange(embed_dims, dtype=torch.float64)
    vec = (vec - vec % 2) / embed_dims
    vec = torch.pow(10000, -vec).view(1, -1)
    sinusoid_table = torch.arange(n_position).view(-1, 1) * vec
    sinusoid_table[:, 0::2].sin_()
    sinusoid_table[:, 1::2].cos_()
    return sinusoid_table.to(torch.float32).unsqueeze(0)


class RefAdapter(nn.Module):  # vit_adapter.py lines 19-75
    def __init__(self, embed_dims, mlp_ratio=0.25, kernel_size=3, dilation=1, temporal_size=384):
        super().__init__()
        hidden_dims = int(embed_dims * mlp_ratio)
        self.temporal_size = temporal_size
        self.dwconv = nn.Conv1d(hidden_dims, hidden_dims, kernel_size=kernel_size, stride=1,
                                padding=(kernel_size // 2) * dilation, dilation=dilation, groups=hidden_dims)
        self.conv = nn.Conv1d(hidden_dims, hidden_dims, 1)
        self.dwconv.weight.data.normal_(mean=0.0, std=math.sqrt(2.0 / kernel_size))
        self.dwconv.bias.data.zero_()
        self.conv.weight.data.normal_(mean=0.0, std=math.sqrt(2.0 / hidden_dims))
        self.conv.bias.data.zero_()
        self.down_proj = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.up_proj = nn.Linear(hidden_dims, embed_dims)
        self.gamma = nn.Parameter(torch.ones(1))
        nn.init.trunc_normal_(self.down_proj.weight, std=0.02)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x, h, w):
        inputs = x
        x = self.down_proj(x)
        x = self.act(x)
        B, N, C = x.shape
        attn = x.reshape(-1, self.temporal_size, h, w, x.shape[-1])
        attn = attn.permute(0, 2, 3, 4, 1).flatten(0, 2)
        attn = self.dwconv(attn)
        attn = self.conv(attn)
        attn = attn.unflatten(0, (-1, h, w)).permute(0, 4, 1, 2, 3)
        attn = attn.reshape(B, N, C)
        x = x + attn
        x = self.up_proj(x)
        return x * self.gamma + inputs


class RefAttention(nn.Module):  # lines 107-187 (qkv_bias True, qk_scale None)
    def __init__(self, embed_dims, num_heads=8):
        super().__init__()
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.q_bias = nn.Parameter(torch.zeros(embed_dims))
        self.v_bias = nn.Parameter(torch.zeros(embed_dims))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=False)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x):
        B, N, C = x.shape
        k_bias = torch.zeros_like(self.v_bias, requires_grad=False)
        qkv_bias = torch.cat((self.q_bias, k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class RefFFN(nn.Module):  # mmcv.cnn.bricks.transformer.FFN, num_fcs 2
    def __init__(self, embed_dims, feedforward_channels):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(feedforward_channels, embed_dims), nn.Dropout(0.0))

    def forward(self, x):
        return self.layers(x)


class RefBlock(nn.Module):  # lines 190-294
    def __init__(self, embed_dims, num_heads, mlp_ratio=4.0, use_adapter=False, adapter_mlp_ratio=0.25, temporal_size=384):
        super().__init__()
        self.use_adapter = use_adapter
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = RefAttention(embed_dims, num_heads=num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.mlp = RefFFN(embed_dims, int(embed_dims * mlp_ratio))
        if self.use_adapter:
            self.adapter = RefAdapter(embed_dims=embed_dims, kernel_size=3, dilation=1, temporal_size=temporal_size,
                                      mlp_ratio=adapter_mlp_ratio)

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_adapter:
            x = self.adapter(x, h, w)
        return x


class RefPatchEmbed(nn.Module):  # mmcv PatchEmbed, conv_type Conv3d, no norm
    def __init__(self, embed_dims, kernel_size):
        super().__init__()
        self.projection = nn.Conv3d(3, embed_dims, kernel_size, stride=kernel_size)

    def forward(self, x):
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), x.shape[2:]


class RefVisionTransformerAdapter(nn.Module):  # lines 297-482, use_mean_pooling True, return_feat_map True
    def __init__(self, img_size=224, patch_size=16, embed_dims=768, depth=12, num_heads=12, mlp_ratio=4.0, num_frames=16,
                 tubelet_size=2, adapter_mlp_ratio=0.25, total_frames=768, adapter_index=(3, 5, 7, 11)):
        super().__init__()
        self.embed_dims, self.patch_size = embed_dims, patch_size
        self.patch_embed = RefPatchEmbed(embed_dims, (tubelet_size, patch_size, patch_size))
        grid_size = img_size // patch_size
        num_patches = grid_size**2 * (num_frames // tubelet_size)
        self.grid_size = (grid_size, grid_size)
        self.register_buffer("pos_embed", get_sinusoid_encoding(num_patches, embed_dims))
        self.blocks = nn.ModuleList([RefBlock(embed_dims, num_heads, mlp_ratio, use_adapter=i in adapter_index,
                                              adapter_mlp_ratio=adapter_mlp_ratio, temporal_size=total_frames // tubelet_size)
                                     for i in range(depth)])
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dims, eps=1e-6)

    def forward(self, x):
        b, _, _, h, w = x.shape
        h //= self.patch_size
        w //= self.patch_size
        x = self.patch_embed(x)[0]
        if (h, w) != self.grid_size:
            pos_embed = self.pos_embed.reshape(-1, *self.grid_size, self.embed_dims)
            pos_embed = pos_embed.permute(0, 3, 1, 2)
            pos_embed = F.interpolate(pos_embed, size=(h, w), mode="bicubic", align_corners=False)
            pos_embed = pos_embed.permute(0, 2, 3, 1).flatten(1, 2)
            pos_embed = pos_embed.reshape(1, -1, self.embed_dims)
        else:
            pos_embed = self.pos_embed
        x = x + pos_embed
        for blk in self.blocks:
            x = blk(x, h, w)
        x = self.norm(x)
        x = x.reshape(b, -1, h, w, self.embed_dims)
        return x.permute(0, 4, 1, 2, 3)


def opentad_features(ref, clips, chunk=16):
    """OpenTAD's backbone wrapper (configs/adatad: Rearrange "b n c (t1 t) h w -> (b t1) n c t h w",
    the ViT, then "(b t1) c t -> b c (t1 t)") without its spatial mean: (B, C, T / 2, h, w)."""
    b, c, frames, h, w = clips.shape
    n = frames // chunk
    x = clips.view(b, c, n, chunk, h, w).transpose(1, 2).reshape(b * n, c, chunk, h, w)
    feats = ref(x)  # (b n), C, t, h', w'
    return feats.unflatten(0, (b, n)).transpose(1, 2).flatten(2, 3)


@pytest.fixture(scope="module")
def reference():
    """OpenTAD's ViT for 32-frame videos (two 16-frame chunks), random weights, non-zero adapters."""
    torch.manual_seed(0)
    ref = RefVisionTransformerAdapter(img_size=IMG, patch_size=PATCH, embed_dims=DIM, depth=DEPTH, num_heads=HEADS,
                                      total_frames=32, adapter_index=ADAPTERS).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "up_proj" in name or "gamma" in name or "norm" in name or "bias" in name:
                p.normal_(0, 0.5)  # the adapters' zero initialisation would hide them
    return ref


def mmaction_file(ref, path):
    """What OpenTAD's pretrained (and trained-adapter) files look like: an mmaction Recognizer3D
    checkpoint, {"meta", "state_dict": {"backbone.<their keys>", "cls_head.fc_cls.*"}}."""
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    state |= {"cls_head.fc_cls.weight": torch.randn(5, DIM), "cls_head.fc_cls.bias": torch.randn(5)}
    torch.save({"meta": {"mmengine_version": "0.10"}, "state_dict": state}, path)
    return path


def test_equals_opentads_vit_adapter_loading_its_layout(reference, tmp_path):
    path = mmaction_file(reference, tmp_path / "vit_adapter.pth")
    model = build_backbone(BackboneConfig(reversible=False, **SIZES, pretrained=str(path))).eval()
    theirs = set(reference.state_dict())
    assert set(model.state_dict()) == theirs - {"fc_norm.weight", "fc_norm.bias"}  # fc_norm: mean pooling only
    torch.manual_seed(1)
    for shape in [(2, 3, 32, 32, 32), (1, 3, 32, 48, 64)]:  # at the table's grid, and resized (bicubic)
        x = torch.randn(shape)
        with torch.no_grad():
            want, got = opentad_features(reference, x), model(x)
        assert got.shape == want.shape == (shape[0], DIM, 16, shape[3] // PATCH, shape[4] // PATCH)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_release_layout_loads_mapped_and_adapters_keep_their_init(reference, tmp_path):
    """A VideoMAEv2 release file ({"module": ...}, `patch_embed.proj`, `mlp.fc1 / fc2`, `head`, no
    adapters, no stored position table) loads into the same model (adapters at AdaTAD's zero init);
    a shape that does not fit names the key."""
    renames = (("patch_embed.projection.", "patch_embed.proj."), (".mlp.layers.0.0.", ".mlp.fc1."), (".mlp.layers.1.", ".mlp.fc2."))
    release = {}
    for key, value in reference.state_dict().items():
        if ".adapter." in key or key == "pos_embed":
            continue
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        release[key] = value
    release |= {"head.weight": torch.randn(7, DIM), "head.bias": torch.randn(7)}
    torch.save({"module": release}, tmp_path / "release.pth")
    model = build_backbone(BackboneConfig(reversible=False, **SIZES, pretrained=str(tmp_path / "release.pth"))).eval()
    assert torch.equal(model.pos_embed, get_sinusoid_encoding(8 * 14 * 14, DIM))  # the release's: 16 x 224², patch 16
    assert model.blocks[1].adapter.up_proj.weight.abs().sum() == 0 and model.blocks[1].adapter.gamma.item() == 1.0
    assert torch.equal(model.blocks[2].mlp.layers[1].weight, reference.blocks[2].mlp.layers[1].weight)
    plain = RefVisionTransformerAdapter(img_size=224, patch_size=PATCH, embed_dims=DIM, depth=DEPTH, num_heads=HEADS,
                                        total_frames=32, adapter_index=[]).eval()
    plain.load_state_dict({k: v for k, v in reference.state_dict().items() if ".adapter." not in k and k != "pos_embed"}, strict=False)
    x = torch.randn(1, 3, 32, 32, 32)
    with torch.no_grad():
        # zero adapters: the plain ViT, its table resized from 14² to 2² as OpenTAD does
        assert torch.allclose(model(x), opentad_features(plain, x), atol=1e-5, rtol=1e-5)
    release["blocks.0.attn.q_bias"] = torch.zeros(DIM + 1)
    torch.save({"module": release}, tmp_path / "bad.pth")
    with pytest.raises(BadInput, match=r"blocks\.0\.attn\.q_bias has shape \[33\]"):
        build_backbone(BackboneConfig(reversible=False, **SIZES, pretrained=str(tmp_path / "bad.pth")))


def test_adapter_convolves_across_chunks():
    """The adapter's temporal conv runs over the whole video: a change in chunk 1's first frame
    moves chunk 0's last token frame after an adapter block, not without adapters."""
    torch.manual_seed(0)
    for adapter in (True, False):
        sizes = {**SIZES, "adapter": {"blocks": [0]} if adapter else None, "depths": [1]}
        model = build_backbone(BackboneConfig(reversible=False, drop_path=0.0, **sizes)).eval()
        if adapter:
            torch.nn.init.normal_(model.blocks[0].adapter.up_proj.weight)
        x = torch.randn(1, 3, 32, 32, 32)
        x2 = x.clone()
        x2[:, :, 16:18] += 1.0  # the first tubelet of chunk 1
        with torch.no_grad():
            moved = (model(x2) - model(x))[:, :, 7].abs().max()  # chunk 0's last token frame
        assert (moved > 1e-3) == adapter


# --------------------------------------------------------------------------------------------
# modes


def random_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_proj" in name:
                p.normal_(0, 0.2)


def test_re2_vit_in_pieces_gradients_equal_whole_vanilla(monkeypatch):
    """Re² ViT with adapters, drop path on, pieces of one chunk (attention, MLP: dim 1, each piece
    drawing its rows of the whole's drop-path masks) and of one row of tokens (adapter: dim 3, the
    whole time axis): output, input and every parameter's gradient equal plain autograd through
    whole functions."""
    seen = record_pieces(monkeypatch)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(reversible=True, drop_path=0.5, piece_size=1, **SIZES)).train()
    assert isinstance(model.blocks, RevStage) and len(model.blocks.residual_fns()) == 2 * DEPTH + len(ADAPTERS)
    random_adapters(model)
    x = torch.randn(2, 3, 48, 32, 48)  # 3 chunks, 2 x 3 tokens per frame
    set_vanilla(model, True)
    yv, xv, pv = loss_grads(model, x, seed=3)
    assert not seen
    set_vanilla(model, False)
    yr, xr, pr = loss_grads(model, x, seed=3)
    assert {(1, 1, 1, 3), (1, 2, 1, 3), (3, 1, 1, 2)} <= set(seen)
    assert torch.allclose(yr, yv, atol=1e-5)
    assert pr.keys() == pv.keys() == {k for k, _ in model.named_parameters()}
    assert rel(xr, xv) <= 1e-4 and max(rel(pr[k], pv[k]) for k in pv) <= 1e-4


def test_checkpointed_vit_gives_standard_gradients_and_keeps_less():
    torch.manual_seed(0)
    std = build_backbone(BackboneConfig(reversible=False, drop_path=0.3, **SIZES)).train()
    ckpt = build_backbone(BackboneConfig(reversible=False, drop_path=0.3, activation_checkpointing=True, **SIZES)).train()
    assert isinstance(ckpt.blocks, CheckpointedSequential)
    random_adapters(std)
    ckpt.load_state_dict(std.state_dict())
    x = torch.randn(1, 3, 32, 32, 32)
    ys, xs, ps = loss_grads(std, x, seed=5)
    yc, xc, pc = loss_grads(ckpt, x, seed=5)
    assert torch.equal(ys, yc) and rel(xc, xs) <= 1e-6 and max(rel(pc[k], ps[k]) for k in ps) <= 1e-6
    rev = build_backbone(BackboneConfig(reversible=True, drop_path=0.3, **SIZES)).train()
    kept = {name: saved_bytes(m, x.clone()) for name, m in (("standard", std), ("checkpoint", ckpt), ("reversible", rev))}
    assert kept["reversible"] < kept["checkpoint"] < kept["standard"]


def test_freeze_all_but_adapters_trains_only_them_and_refuses_re2():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(reversible=False, activation_checkpointing=True, freeze="all_but_adapters", **SIZES)).train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("blocks.1.adapter.", "blocks.2.adapter.")) for n in trained)
    assert len(trained) == 2 * 9
    random_adapters(model)
    x = torch.randn(1, 3, 32, 32, 32)
    _, _, grads = loss_grads(model, x)
    assert set(grads) == trained
    # kept: the inputs of the two adapter blocks (2 chunks x 8 x 2 x 2 tokens x 32 fp32); block 0 needs no graph
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    assert sum(kept.values()) == 2 * (2 * 8 * 2 * 2 * DIM * 4)
    with pytest.raises(ValueError, match="freeze: a frozen pretrained ViT must not be rewired"):
        BackboneConfig(reversible=True, freeze="all_but_adapters", **SIZES)


def test_vit_config_defaults_and_checks():
    g = BackboneConfig(name="vit_g", reversible=False)
    assert (g.depths, g.embed_dim, g.num_heads, g.patch_size, g.mlp_ratio, g.chunk_frames) == ([40], 1408, [16], (2, 14, 14), 48 / 11, 16)
    assert (g.temporal_stride, g.spatial_stride, g.frame_multiple) == (2, 14, 16)
    for name, dim, depth in (("vit_s", 384, 12), ("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)):
        c = BackboneConfig(name=name)
        assert (c.embed_dim, c.depths, c.patch_size) == (dim, [depth], (2, 16, 16))
    with torch.device("meta"):
        model = build_backbone(BackboneConfig(name="vit_g", reversible=False, adapter={"blocks": list(range(20, 40))}))
    assert isinstance(model, VisionTransformer) and model.pos_embed.shape == (1, 8 * 16 * 16, 1408)
    assert model.blocks[0].mlp.layers[0][0].out_features == 6144 and model.blocks[20].adapter.down_proj.out_features == 352
    for bad, message in (({"name": "vit_b", "depths": [6, 6]}, "depths: vit_b has one stage"),
                         ({"name": "vit_b", "adapter": {"blocks": [12]}}, "adapter.blocks: block 12 does not exist"),
                         ({"name": "vit_b", "chunk_frames": 15}, "chunk_frames: 15 is not a multiple"),
                         ({"name": "vit_b", "reversible": False, "freeze": "all_but_adapters"}, "freeze: all_but_adapters needs"),
                         ({"name": "swin_t", "adapter": {}}, "adapter: only vit_"),
                         ({"name": "vit_b", "freeze": "all_but_adapters", "adapter": {}}, "must not be rewired")):
        with pytest.raises(ValueError, match=message):
            BackboneConfig(**bad)


def test_re2_vit_with_frozen_patch_embedding_keeps_only_its_two_streams():
    """Re² with `frozen_stages: 0` (the patch embedding frozen, the blocks all trained): kept for
    backward are the reversible stage's two tensors (y, b_n), not the clip, not any block's."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(reversible=True, frozen_stages=0, **SIZES)).train()
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(torch.randn(1, 3, 32, 32, 32))
    y.sum().backward()
    assert sum(kept.values()) == 2 * (2 * 8 * 2 * 2 * DIM * 4)  # 2 chunks x 8 x 2 x 2 tokens x 32 fp32, twice
    assert model.patch_embed.projection.weight.grad is None and model.blocks[0].attn.qkv.weight.grad is not None
