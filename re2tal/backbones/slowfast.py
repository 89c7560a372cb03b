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

mmaction's ResNet3dSlowFast (mmaction/models/backbones/resnet3d_slowfast.py, e.g. its Kinetics
SlowFast-R101) and the Re²TAL authors' ResNet3dSlowFast_inv (OpenTAD re2tal_slowfast.py, their
K400-fine-tuned Re²SlowFast-101) load through one mapping (`SlowFast.checkpoint_state`). Their
fusions ("laterals") are a bare strided conv, without BatchNorm and ReLU: the model is built so
when such a file is loaded (`checkpoint_options`, also reading the fusion kernel from it). Their
Re² stage is ours: block 0 computes P(x) + ReLU(F(x)) (ReLU moved into the branch also where the
shortcut projects; `reversible_lead`), then streams (h, h) with (x1, x2) -> (x2 + ReLU(F_i(x1)), x1),
the mean of the two halves as the output.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from re2tal.backbones.base import Backbone, batch_pieces, mmaction_backbone
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
    """slow <- cat(slow, ReLU(BN(conv (k, 1, 1), stride alpha, of fast))); fast unchanged.
    norm=False: the bare conv (mmaction's lateral connections)."""

    def __init__(self, fast_channels: int, alpha: int, kernel: int, norm: bool = True) -> None:
        super().__init__()
        self.conv_fast_to_slow = conv(fast_channels, 2 * fast_channels, (kernel, 1, 1), (alpha, 1, 1))
        self.norm = nn.BatchNorm3d(2 * fast_channels) if norm else None
        self.activation = nn.ReLU(inplace=True) if norm else None

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        lateral = self.conv_fast_to_slow(fast)
        if self.norm is not None:
            lateral = self.activation(self.norm(lateral))
        return torch.cat([slow, lateral], 1), fast


def projection(block: nn.Module, x: Tensor) -> Tensor:
    """The projecting shortcut of a ResBlock (or its ReluIn form)."""
    return block.branch1_norm(block.branch1_conv(x))


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
    convs (pytorchvideo's R50 7, R101 5); fusion_norm: BatchNorm + ReLU after them (pytorchvideo)
    or not (mmaction). Temporal conv kernels as the paper: 1 in the slow res2-3, 3 in the slow
    res4-5 and all fast stages. tadaconv: TAdaConv in every bottleneck's conv_b."""

    LAYOUT = "pytorchvideo slowfast_r50 / slowfast_r101, mmaction ResNet3dSlowFast or Re²TAL's ResNet3dSlowFast_inv"
    CLASSIFIER_KEYS = ("blocks.6.proj.weight", "blocks.6.proj.bias")
    # mmaction's names inside a residual block -> ours (Bottleneck3d's ConvModules conv1..3, downsample)
    MMACTION_BLOCK = {"conv1.conv": "branch2.conv_a", "conv1.bn": "branch2.norm_a", "conv2.conv": "branch2.conv_b",
                      "conv2.bn": "branch2.norm_b", "conv3.conv": "branch2.conv_c", "conv3.bn": "branch2.norm_c",
                      "downsample.conv": "branch1_conv", "downsample.bn": "branch1_norm"}
    PATHWAYS = {"slow": 0, "fast": 1}

    def __init__(self, depths: Sequence[int] = (3, 4, 6, 3), alpha: int = 4, beta_inv: int = 8,
                 fusion_kernel: int = 7, width: int = 64, fusion_norm: bool = True, tadaconv: bool = False) -> None:
        super().__init__()
        self.alpha = alpha
        fast_width = width // beta_inv
        blocks = [TwoPathways(Stem(width, 1), Stem(fast_width, 5), FuseFastToSlow(fast_width, alpha, fusion_kernel, fusion_norm))]
        slow_in, fast_in = width + 2 * fast_width, fast_width
        for i, depth in enumerate(depths):
            inner, out, stride = width * 2**i, 4 * width * 2**i, 1 if i == 0 else 2
            slow = ResStage(depth, slow_in, inner, out, 1 if i < 2 else 3, stride, tadaconv)
            fast = ResStage(depth, fast_in, inner // beta_inv, out // beta_inv, 3, stride, tadaconv)
            last = i == len(depths) - 1
            fusion = None if last else FuseFastToSlow(out // beta_inv, alpha, fusion_kernel, fusion_norm)
            blocks.append(TwoPathways(slow, fast, fusion))
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

    @classmethod
    def checkpoint_options(cls, state: dict[str, Tensor]) -> dict[str, Any]:
        """An mmaction / Re²TAL file (keys `[backbone.]slow_path...`) has fusions without BatchNorm;
        the fusion kernel is the temporal size of the file's first fusion conv."""
        mmaction = any(k.removeprefix("backbone.").startswith("slow_path.") for k in state)
        name = "slow_path.conv1_lateral.conv.weight" if mmaction else "blocks.0.multipathway_fusion.conv_fast_to_slow.weight"
        weight = state.get(name, state.get("backbone." + name))
        # our own layout without the fusion norms: a file re2tal wrote from an mmaction-shaped model
        norm = "blocks.0.multipathway_fusion.norm.weight" in state or weight is None
        opts: dict[str, Any] = {"fusion_norm": not mmaction and norm}
        if weight is not None and weight.dim() == 5:
            opts["fusion_kernel"] = weight.shape[2]
        return opts

    @classmethod
    def trained_reversible(cls, state: dict[str, Tensor]) -> bool:
        return any(".inv_block." in k for k in state)

    def checkpoint_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A pytorchvideo state dict loads as it is (classifier dropped). An mmaction Recognizer3D
        checkpoint (keys `backbone.slow_path...`, `backbone.fast_path...`; ResNet3dSlowFast or the
        Re² ResNet3dSlowFast_inv) is mapped, the one place: `backbone.` stripped, `cls_head.*` /
        `data_preprocessor.*` dropped;
          {p}_path.conv1.{conv,bn}                     -> blocks.0.multipathway_blocks.{p}.{conv,norm}
          slow_path.conv1_lateral.conv                 -> blocks.0.multipathway_fusion.conv_fast_to_slow
          slow_path.layer{s}_lateral.conv              -> blocks.{s}.multipathway_fusion.conv_fast_to_slow
          {p}_path.layer{s}.{i}.<MMACTION_BLOCK name>  -> blocks.{s}.multipathway_blocks.{p}.res_blocks.{i}.<ours>
        where the Re² file's `layer{s}.blocks.{i}.Fm.` / `.blocks.{i}.inv_block.Fm.` read as `layer{s}.{i}.`
        (slow = 0, fast = 1). An unknown key stays as it is (and is reported as unexpected)."""
        if not any(k.removeprefix("backbone.").startswith("slow_path.") for k in state):
            return super().checkpoint_state(state)
        return {self._mmaction_key(k): v for k, v in mmaction_backbone(state).items()}

    @classmethod
    def _mmaction_key(cls, key: str) -> str:
        if m := re.fullmatch(r"(slow|fast)_path\.conv1\.(conv|bn)\.(\w+)", key):
            return f"blocks.0.multipathway_blocks.{cls.PATHWAYS[m[1]]}.{'conv' if m[2] == 'conv' else 'norm'}.{m[3]}"
        if m := re.fullmatch(r"slow_path\.(?:conv1|layer(\d+))_lateral\.conv\.(\w+)", key):
            return f"blocks.{m[1] or 0}.multipathway_fusion.conv_fast_to_slow.{m[2]}"
        m = re.fullmatch(r"(slow|fast)_path\.layer(\d+)\.(?:blocks\.)?(\d+)\.(?:inv_block\.)?(?:Fm\.)?(\w+\.\w+)\.(\w+)", key)
        if m and m[4] in cls.MMACTION_BLOCK:
            return f"blocks.{m[2]}.multipathway_blocks.{cls.PATHWAYS[m[1]]}.res_blocks.{m[3]}.{cls.MMACTION_BLOCK[m[4]]}.{m[5]}"
        return key

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        return [(pathway, "res_blocks", 1) for block in self.blocks[1:] for pathway in block.multipathway_blocks]

    def reversible_block(self, block: nn.Module) -> nn.Module:
        return relu_in(block, "branch2", pieces=batch_pieces)

    def reversible_lead(self, block: nn.Module) -> nn.Module:
        """P(x) + ReLU(F(x)) for a stage's projecting first block, as the authors' Re²SlowFast."""
        return relu_in(block, "branch2", projection if block.branch1_conv is not None else None)

    def transitions(self) -> list[str]:
        # the stems; not the fusions: checkpointed, one would keep the slow features it only
        # concatenates (it keeps the fast ones, its conv's output and its ReLU's)
        return [f"blocks.0.multipathway_blocks.{p}" for p in range(2)]

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
