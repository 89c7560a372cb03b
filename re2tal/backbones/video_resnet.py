"""torchvision's video ResNet-18s (Tran et al., CVPR 2018, "A Closer Look at Spatiotemporal
Convolutions"): R(2+1)D-18, R3D-18 and MC3-18, in torchvision's module layout
(torchvision/models/video/resnet.py), so its Kinetics-400 weight files load unrenamed.

(B, 3, T, H, W) -> stem (stride (1, 2, 2)) -> layer1..layer4 -> (B, 512, T / st, H / 16, W / 16),
st = 8 for r2plus1d_18 / r3d_18 (layer2-4 stride 2 in time too), 1 for mc3_18 (3-D convs in
layer1 only, (1, 3, 3) convs after, stride (1, 2, 2)). The blocks are torchvision's BasicBlock:
ReLU(shortcut(x) + conv2(conv1(x))), shortcut = strided 1x1x1 conv + BN (`downsample`) in the first
block of layer2-4, else the identity. Re²: ReLU-in, x + ReLU(conv2(conv1(x))), for the blocks
with an identity shortcut; a stage's projecting first block stays ordinary.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torchvision.models.video.resnet import (
    BasicBlock,
    BasicStem,
    Conv2Plus1D,
    Conv3DNoTemporal,
    Conv3DSimple,
    R2Plus1dStem,
    VideoResNet as TorchvisionVideoResNet,
)

from re2tal.backbones.base import Backbone, batch_pieces
from re2tal.rev import relu_in

# name -> (conv builder of each of the four layers, stem)
VARIANTS = {
    "r2plus1d_18": ([Conv2Plus1D] * 4, R2Plus1dStem),
    "r3d_18": ([Conv3DSimple] * 4, BasicStem),
    "mc3_18": ([Conv3DSimple] + [Conv3DNoTemporal] * 3, BasicStem),
}


def branch(block: nn.Module, x: Tensor) -> Tensor:
    """F of a BasicBlock (or its ReLU-in form): conv2(conv1(x)), both with BN, ReLU inside conv1."""
    return block.conv2(block.conv1(x))


class VideoResNet(Backbone):
    """torchvision's VideoResNet up to layer4 (no pooling, no classifier). `depths`: BasicBlocks
    per layer (torchvision's 18-layer nets: 2-2-2-2)."""

    LAYOUT = "torchvision r2plus1d_18 / r3d_18 / mc3_18"
    CLASSIFIER_KEYS = ("fc.weight", "fc.bias")

    def __init__(self, variant: str = "r2plus1d_18", depths: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        makers, stem = VARIANTS[variant]
        # torchvision's own constructor: its blocks, widths (R(2+1)D's midplanes) and init
        net = TorchvisionVideoResNet(BasicBlock, makers, list(depths), stem)
        self.stem = net.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 512
        self.temporal_stride = 1 if variant == "mc3_18" else 8
        self.spatial_stride = 16

    def layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def residual_stages(self) -> list[tuple[nn.Module, str, int]]:
        # layer1's first block keeps the shape (64 -> 64, stride 1): no leading block there
        return [(self, f"layer{i + 1}", int(getattr(layer[0], "downsample", None) is not None)) for i, layer in enumerate(self.layers())]

    def reversible_block(self, block: nn.Module) -> nn.Module:
        return relu_in(block, branch, pieces=batch_pieces)

    def transitions(self) -> list[str]:
        return ["stem"]

    def frozen_modules(self, stages: int) -> list[str]:
        return ["stem"] + [f"layer{i + 1}" for i in range(min(stages, 4))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for layer in self.layers():
            x = layer(x)
        return x
