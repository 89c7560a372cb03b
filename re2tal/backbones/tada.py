"""TAdaConv (Huang et al., ICLR 2022, "TAda! Temporally-adaptive convolutions for video
understanding") and TAda2D-R50 in the official code's module layout
(alibaba-mmai-research/TAdaConv), so its Kinetics checkpoints load unrenamed.

A TAdaConv calibrates a spatial conv per frame, W_t = alpha_t * W_b, with alpha_t generated from
the frame's local and global temporal context by a route function whose last conv is zero
initialised: alpha = 1, the layer equals the pretrained conv W_b at initialisation.

TAda2D layout (= the official ResNet3D with TAda2DBlock branches; `backbone.` prefix dropped):
`conv1` = stem (`a` conv (1, 7, 7) stride (1, 2, 2), `a_bn`, `a_relu`; no max pool), `conv2` ..
`conv5` = res2 .. res5, each an nn.Sequential of blocks `res_1`, `res_2`, ...; a block is
ReLU(shortcut(x) + conv_branch(x)) with `short_cut` / `short_cut_bn` (1x1x1, strided) where
channels or size change. Every stage's first block is strided (res2's too: it takes the stem's
max pool's place), on `b` and on the shortcut. Temporal stride 1 throughout.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from re2tal.backbones.base import Backbone, batch_pieces
from re2tal.rev import relu_in

Pair = tuple[int, int]
CalDim = Literal["cin", "cout"]

# the official TAda2D config (configs/pool/backbone/tada2d.yaml)
ROUTE_RATIO = 4  # ROUTE_FUNC_R: the route function's hidden channels are C / 4
ROUTE_KERNELS = (3, 3)  # ROUTE_FUNC_K: temporal kernels of its convs a and b
POOL_T = 3  # POOL_K[0]: temporal average pool of the aggregation


def _pair(v: int | Sequence[int]) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tada_conv(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
              groups: int, cal_dim: CalDim) -> Tensor:
    """Per-frame calibrated conv without per-frame kernels (see TAdaConv2d).

    x (B, C_in, T, H, W), alpha (B, C_in | C_out, T, 1, 1), weight (C_out, C_in / groups, 1, kh, kw)
    -> (B, C_out, T, H', W')."""
    conv = dict(stride=(1, *stride), padding=(0, *padding), groups=groups)
    if cal_dim == "cin":
        y = F.conv3d(x * alpha, weight, None, **conv)
    else:
        y = F.conv3d(x, weight, None, **conv) * alpha
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1)


class TAdaConv2d(nn.Module):
    """Temporally adaptive 2-D conv: frame t of x is convolved with W_t = alpha_t * W_b.

    forward(x, alpha): x (B, C_in, T, H, W), alpha (B, C_in, T, 1, 1) for cal_dim "cin" (the kernel's
    input channels are calibrated) or (B, C_out, T, 1, 1) for "cout" -> (B, C_out, T, H', W').

    W_b is `weight`, of the official shape (1, 1, C_out, C_in / groups, kh, kw), or with
    weight_layout="conv3d" of nn.Conv3d's (C_out, C_in / groups, 1, kh, kw), so that a conv (1, k, k)
    of a published 3-D network (pytorchvideo's SlowFast conv_b) keeps its key and shape. `bias`
    (C_out, uncalibrated, as officially) is 1-D here; the official code, which has none in TAda2D,
    would store (1, 1, C_out).

    No per-frame kernel is formed. alpha_t is constant over space, so with c(o, j) the input
    channel that entry j of output channel o's kernel reads (group g(o): c = g(o) C_in/G + j):

      cin:  y_t[o, p] = sum_{j,u,v} alpha_t[c] W_b[o, j, u, v] x_t[c, s p + (u, v) - pad]
                      = sum_{j,u,v} W_b[o, j, u, v] (alpha_t[c] x_t[c, s p + (u, v) - pad])
                      = (W_b * (alpha_t . x_t))[o, p]:   scale the input channels, then conv;
            a padded position reads 0, and alpha 0 = 0: zero padding is unaffected.
      cout: y_t[o, p] = sum_{j,u,v} alpha_t[o] W_b[o, j, u, v] x_t[...] = alpha_t[o] (W_b * x_t)[o, p]:
            conv, then scale the output channels (before the bias, which is not calibrated).

    Both are one ordinary conv (1, kh, kw) over all B T frames at once plus one elementwise
    product. The official code instead forms the B T kernels and runs one conv grouped over
    B T: at TAda2D's stage 5 with B T = 64 in fp32 that is 64 x 512 x 512 x 9 x 4 B = 604 MB of
    kernels (and as much again for their gradient). For groups > 1 the official broadcast of a
    C_in-long alpha against C_in / groups kernel channels does not apply; here "cin" means the
    definition above (for depthwise convs: the same as "cout").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair, stride: int | Pair = 1,
                 padding: int | Pair = 0, groups: int = 1, bias: bool = False, cal_dim: CalDim = "cin",
                 weight_layout: Literal["tada", "conv3d"] = "tada") -> None:
        super().__init__()
        if cal_dim not in ("cin", "cout"):
            raise ValueError(f"TAdaConv2d: cal_dim must be 'cin' or 'cout', got {cal_dim!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"TAdaConv2d: groups={groups} does not divide {in_channels} -> {out_channels} channels")
        self.in_channels, self.out_channels, self.groups, self.cal_dim = in_channels, out_channels, groups, cal_dim
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        kh, kw = self.kernel_size
        shape = (1, 1, out_channels, in_channels // groups, kh, kw) if weight_layout == "tada" else (out_channels, in_channels // groups, 1, kh, kw)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def kernel(self) -> Tensor:
        """W_b as a conv (1, kh, kw) weight (C_out, C_in / groups, 1, kh, kw): a view of `weight`."""
        kh, kw = self.kernel_size
        return self.weight.view(self.out_channels, self.in_channels // self.groups, 1, kh, kw)

    def reset_parameters(self) -> None:
        # He init (fan out) as the official ResNet3D's c2_msra_fill of its convs; zero bias
        nn.init.kaiming_normal_(self.kernel(), mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, alpha: Tensor) -> Tensor:
        channels = self.in_channels if self.cal_dim == "cin" else self.out_channels
        b, _, t = x.shape[:3]
        if alpha.shape != (b, channels, t, 1, 1):
            raise ValueError(f"TAdaConv2d: alpha has shape {list(alpha.shape)}, expected {[b, channels, t, 1, 1]} for x {list(x.shape)} (cal_dim {self.cal_dim})")
        return tada_conv(x, alpha, self.kernel(), self.bias, self.stride, self.padding, self.groups, self.cal_dim)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, cal_dim={self.cal_dim!r}")


class RouteFunc(nn.Module):
    """The calibration generator of a TAdaConv (the official RouteFuncMLP, same names):

        alpha = 1 + b(ReLU(bn(a(pool_s(x) + g(pool_all(x))))))

    x (B, C, T, H, W) -> alpha (B, C, T, 1, 1). pool_s: spatial mean per frame (local temporal
    context after `a`'s temporal conv); pool_all: mean over T, H, W (global descriptor), through
    `g` (1x1x1 conv with bias); `a`: temporal conv (k0, 1, 1), C -> C / ratio, bias; `b`: temporal
    conv (k1, 1, 1), C / ratio -> C, no bias, zero initialised so that alpha == 1 at
    initialisation."""

    def __init__(self, channels: int, ratio: int = ROUTE_RATIO, kernels: Pair = ROUTE_KERNELS) -> None:
        super().__init__()
        hidden = channels // ratio
        self.g = nn.Conv3d(channels, channels, 1)
        self.a = nn.Conv3d(channels, hidden, (kernels[0], 1, 1), padding=(kernels[0] // 2, 0, 0))
        self.bn = nn.BatchNorm3d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv3d(hidden, channels, (kernels[1], 1, 1), padding=(kernels[1] // 2, 0, 0), bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: g, a as the network's convs (He, fan out; zero bias), BN
        weight 1 / bias 0, b zero."""
        for conv in (self.g, self.a):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.bn.reset_parameters()
        nn.init.zeros_(self.b.weight)

    def forward(self, x: Tensor) -> Tensor:
        local = x.mean((3, 4), keepdim=True)
        context = x.mean((2, 3, 4), keepdim=True)
        return self.b(self.relu(self.bn(self.a(local + self.g(context))))) + 1


class ZeroInitBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose affine weight and bias start at zero (TAda2D's `b_avgpool_bn`: the
    temporal aggregation adds nothing at initialisation)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.affine:
            nn.init.zeros_(self.weight)


def conv(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)) -> nn.Conv3d:
    """A bias-free conv padded to keep the size (up to the stride)."""
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False)


class Stem(nn.Module):
    """`a` conv (1, 7, 7) stride (1, 2, 2) -> `a_bn` -> ReLU (the official Base2DStem; no max pool)."""

    def __init__(self, cout: int) -> None:
        super().__init__()
        self.a, self.a_bn, self.a_relu = conv(3, cout, (1, 7, 7), (1, 2, 2)), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.a_relu(self.a_bn(self.a(x)))


class TAda2DBranch(nn.Module):
    """F of a TAda2D bottleneck (the official TAda2DBlock):

        a (1x1x1) -> a_bn -> ReLU -> y = b(x, b_rf(x)) (TAdaConv2d 3x3, cin, strided)
        -> b_bn(y) + b_avgpool_bn(avgpool_t(y)) -> ReLU -> c (1x1x1) -> c_bn

    avgpool_t: average pool (3, 1, 1), stride 1, zero padding (1, 0, 0) counted in the mean
    (nn.AvgPool3d's count_include_pad, as officially). b_avgpool_bn starts at zero."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.a_bn, self.a_relu = conv(cin, inner, (1, 1, 1)), nn.BatchNorm3d(inner), nn.ReLU(inplace=True)
        self.b = TAdaConv2d(inner, inner, 3, stride=stride, padding=1, cal_dim="cin")
        self.b_rf = RouteFunc(inner)
        self.b_bn = nn.BatchNorm3d(inner)
        self.b_avgpool = nn.AvgPool3d((POOL_T, 1, 1), stride=1, padding=(POOL_T // 2, 0, 0))
        self.b_avgpool_bn = ZeroInitBatchNorm3d(inner)
        self.b_relu = nn.ReLU(inplace=True)
        self.c, self.c_bn = conv(inner, cout, (1, 1, 1)), nn.BatchNorm3d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b(x, self.b_rf(x))
        x = self.b_relu(self.b_bn(x) + self.b_avgpool_bn(self.b_avgpool(x)))
        return self.c_bn(self.c(x))


class TAda2DBlock(nn.Module):
    """ReLU(shortcut(x) + conv_branch(x)) (the official Base3DBlock); the shortcut is `short_cut`
    + `short_cut_bn` (1x1x1, strided) where channels or size change, else the identity."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int) -> None:
        super().__init__()
        if cin != cout or stride != 1:
            self.short_cut = conv(cin, cout, (1, 1, 1), (1, stride, stride))
            self.short_cut_bn = nn.BatchNorm3d(cout)
        else:
            self.short_cut = self.short_cut_bn = None  # plain attributes: no keys
        self.conv_branch = TAda2DBranch(cin, inner, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.short_cut is None else self.short_cut_bn(self.short_cut(x))
        return self.relu(shortcut + self.conv_branch(x))


class TAda2D(Backbone):
    """TAda2D ResNet: (B, 3, T, H, W) -> (B, 2048, T, H / 32, W / 32) for depths (3, 4, 6, 3) (R50)."""

    LAYOUT = "official TAdaConv TAda2D (or torchvision resnet50)"
    # the official checkpoint's classifier; torchvision resnet50's
    CLASSIFIER_KEYS = ("head.out.weight", "head.out.bias", "fc.weight", "fc.bias")

    def __init__(self, depths: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        self.conv1 = Stem(width)
        cin = width
        for i, depth in enumerate(depths):
            inner, cout = width * 2**i, 4 * width * 2**i
            blocks = [(f"res_{j + 1}", TAda2DBlock(cin if j == 0 else cout, inner, cout, 2 if j == 0 else 1)) for j in range(depth)]
            setattr(self, f"conv{i + 2}", nn.Sequential(OrderedDict(blocks)))
            cin = cout
        self.num_stages = len(depths)
        self.out_channels = cin
        self.temporal_stride = 1
        self.spatial_stride = 2 * 2 ** len(depths)
        # the official initialisation (c2_msra_fill of every conv; BatchNorm 1 / 0), then the
        # route functions' own (b = 0)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, RouteFunc):
                m.reset_parameters()

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(self, f"conv{i + 2}", 1) for i in range(self.num_stages)]

    def reversible_block(self, block: nn.Module) -> nn.Module:
        return relu_in(block, "conv_branch", pieces=batch_pieces)

    def transitions(self) -> list[str]:
        return ["conv1"]

    def frozen_modules(self, stages: int) -> list[str]:
        return ["conv1"] + [f"conv{i + 2}" for i in range(min(stages, self.num_stages))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for i in range(self.num_stages):
            x = getattr(self, f"conv{i + 2}")(x)
        return x
