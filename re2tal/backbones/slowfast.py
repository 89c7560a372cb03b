"""SlowFast-R50 / R101 (Feichtenhofer et al., ICCV 2019) in pytorchvideo's module layout, so the
Kinetics checkpoints of pytorchvideo's model zoo (slowfast_r50, slowfast_r101) load unrenamed.

(B, 3, T, H, W) -> the slow pathway sees every alpha-th frame, the fast one every frame (with
1/beta of the channels); after the stem and each of the first three stages the fast features are
fused into the slow ones by a strided temporal conv. The output is (B, 2304, T / alpha, H / 32,
W / 32) for the standard widths: the slow features (2048) and the fast ones (256) averaged over
each group of alpha frames, concatenated.

Layout (= pytorchvideo's): blocks.0 = stems, blocks.1..4 = res2..res5; each is
`multipathway_blocks.{0: slow, 1: fast}` + `multipathway_fusion` (none after res5). A stage's
blocks are `res_blocks` (an nn.Sequential, rewired in place by apply_reversible /
apply_activation_checkpointing); its first block projects the shortcut (channels, stride), the
others are post-activation bottlenecks ReLU(x + F(x)), made reversible by ReLU-in.

With `tadaconv=True` (SlowFast + TAdaConv, as in the TAdaConv paper) every bottleneck's spatial
`conv_b` (1, 3, 3) of both pathways is a TAdaConv2d (cal_dim cin) keeping nn.Conv3d's weight key
and shape, calibrated by a route function `conv_b_rf` fed the same input; pytorchvideo's
checkpoints still load (the route functions keep their initialisation, alpha = 1), and at
initialisation the network equals plain SlowFast.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from re2tal.backbones.base import Backbone
from re2tal.backbones.tada import RouteFunc, TAdaConv2d
from re2tal.rev import relu_in

Triple = tuple[int, int, int]


def conv(cin: int, cout: int, kernel: Triple, stride: Triple = (1, 1, 1)) -> nn.Conv3d:
    """A bias-free conv padded to keep the size (up to the stride)."""
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False)


class Stem(nn.Module):
    """conv (kt, 7, 7) stride (1, 2, 2) -> BN -> ReLU -> max pool (1, 3, 3) stride (1, 2, 2)."""

    def __init__(self, cout: int, kt: int) -> None:
        super().__init__()
        self.conv = conv(3, cout, (kt, 7, 7), (1, 2, 2))
        self.norm = nn.BatchNorm3d(cout)
        self.activation = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.norm(self.conv(x))))


class Bottleneck(nn.Module):
    """conv_a (kt, 1, 1) -> conv_b (1, 3, 3) with the spatial stride -> conv_c 1x1x1, each with BN,
    ReLU after the first two: F of the residual block. tadaconv: conv_b is a TAdaConv2d
    calibrated by the route function conv_b_rf."""

    def __init__(self, cin: int, inner: int, cout: int, kt: int, stride: int, tadaconv: bool = False) -> None:
        super().__init__()
        self.conv_a, self.norm_a, self.act_a = conv(cin, inner, (kt, 1, 1)), nn.BatchNorm3d(inner), nn.ReLU(inplace=True)
        if tadaconv:
            self.conv_b = TAdaConv2d(inner, inner, 3, stride=stride, padding=1, weight_layout="conv3d")
            self.conv_b_rf = RouteFunc(inner)
        else:
            self.conv_b = conv(inner, inner, (1, 3, 3), (1, stride, stride))
            self.conv_b_rf = None  # a plain attribute: no keys
        self.norm_b, self.act_b = nn.BatchNorm3d(inner), nn.ReLU(inplace=True)
        self.conv_c, self.norm_c = conv(inner, cout, (1, 1, 1)), nn.BatchNorm3d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.conv_b(x) if self.conv_b_rf is None else self.conv_b(x, self.conv_b_rf(x))
        x = self.act_b(self.norm_b(x))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    """ReLU(shortcut(x) + branch2(x)); the shortcut is a strided 1x1x1 conv + BN (`branch1_*`)
    where channels or size change, else the identity."""

    def __init__(self, cin: int, inner: int, cout: int, kt: int, stride: int, tadaconv: bool = False) -> None:
        super().__init__()
        if cin != cout or stride != 1:
            self.branch1_conv = conv(cin, cout, (1, 1, 1), (1, stride, stride))
            self.branch1_norm = nn.BatchNorm3d(cout)
        else:
            self.branch1_conv = self.branch1_norm = None  # plain attributes: no keys
        self.branch2 = Bottleneck(cin, inner, cout, kt, stride, tadaconv)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    """`depth` ResBlocks, the first one projecting cin -> cout with the stride."""

    def __init__(self, depth: int, cin: int, inner: int, cout: int, kt: int, stride: int, tadaconv: bool = False) -> None:
        super().__init__()
        self.res_blocks = nn.Sequential(*[ResBlock(cin if i == 0 else cout, inner, cout, kt, stride if i == 0 else 1, tadaconv)
                                          for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.res_blocks(x)


class FuseFastToSlow(nn.Module):
    """slow <- cat(slow, ReLU(BN(conv (k, 1, 1), stride alpha, of fast))); fast unchanged."""

    def __init__(self, fast_channels: int, alpha: int, kernel: int) -> None:
        super().__init__()
        self.conv_fast_to_slow = conv(fast_channels, 2 * fast_channels, (kernel, 1, 1), (alpha, 1, 1))
        self.norm = nn.BatchNorm3d(2 * fast_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        lateral = self.activation(self.norm(self.conv_fast_to_slow(fast)))
        return torch.cat([slow, lateral], 1), fast


class TwoPathways(nn.Module):
    """The slow and fast versions of one stage, then the fusion (None: no fusion, no keys)."""

    def __init__(self, slow: nn.Module, fast: nn.Module, fusion: FuseFastToSlow | None) -> None:
        super().__init__()
        self.multipathway_blocks = nn.ModuleList([slow, fast])
        self.multipathway_fusion = fusion

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        slow, fast = self.multipathway_blocks[0](slow), self.multipathway_blocks[1](fast)
        return (slow, fast) if self.multipathway_fusion is None else self.multipathway_fusion(slow, fast)


class SlowFast(Backbone):
    """SlowFast ResNet: depths (3, 4, 6, 3) = R50, (3, 4, 23, 3) = R101. alpha: frame rate ratio
    fast / slow; beta_inv: channel ratio slow / fast; fusion_kernel: temporal size of the fusion
    convs (pytorchvideo's R50 7, R101 5). Temporal conv kernels as the paper: 1 in the slow res2-3,
    3 in the slow res4-5 and all fast stages. tadaconv: TAdaConv in every bottleneck's conv_b."""

    LAYOUT = "pytorchvideo slowfast_r50 / slowfast_r101"
    CLASSIFIER_KEYS = ("blocks.6.proj.weight", "blocks.6.proj.bias")

    def __init__(self, depths: Sequence[int] = (3, 4, 6, 3), alpha: int = 4, beta_inv: int = 8,
                 fusion_kernel: int = 7, width: int = 64, tadaconv: bool = False) -> None:
        super().__init__()
        self.alpha = alpha
        fast_width = width // beta_inv
        blocks = [TwoPathways(Stem(width, 1), Stem(fast_width, 5), FuseFastToSlow(fast_width, alpha, fusion_kernel))]
        slow_in, fast_in = width + 2 * fast_width, fast_width
        for i, depth in enumerate(depths):
            inner, out, stride = width * 2**i, 4 * width * 2**i, 1 if i == 0 else 2
            slow = ResStage(depth, slow_in, inner, out, 1 if i < 2 else 3, stride, tadaconv)
            fast = ResStage(depth, fast_in, inner // beta_inv, out // beta_inv, 3, stride, tadaconv)
            last = i == len(depths) - 1
            blocks.append(TwoPathways(slow, fast, None if last else FuseFastToSlow(out // beta_inv, alpha, fusion_kernel)))
            slow_in, fast_in = out + 2 * (out // beta_inv), out // beta_inv
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = out + out // beta_inv
        self.temporal_stride = alpha
        self.spatial_stride = 4 * 2 ** (len(depths) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # after the loop above: their b must stay zero
            if isinstance(m, RouteFunc):
                m.reset_parameters()

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(pathway, "res_blocks", 1) for block in self.blocks[1:] for pathway in block.multipathway_blocks]

    def reversible_block(self, block: nn.Module) -> nn.Module:
        return relu_in(block, "branch2")

    def frozen_modules(self, stages: int) -> list[str]:
        # stage s = blocks[s] with both pathways and the fusion after it; the stems are blocks[0]
        return [f"blocks.{i}" for i in range(min(stages, len(self.blocks) - 1) + 1)]

    def forward(self, x: Tensor) -> Tensor:
        # the slow frames are those the strided fusion conv is centred on (as mmaction's nearest resize)
        slow, fast = x[:, :, ::self.alpha], x
        for block in self.blocks:
            slow, fast = block(slow, fast)
        fast = F.adaptive_avg_pool3d(fast, slow.shape[2:])  # mean over each group of alpha frames
        return torch.cat([slow, fast], 1)
