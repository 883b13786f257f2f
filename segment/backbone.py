"""ResNet / ResNeXt body with FPN on top: image batch -> {"0".."3", "pool"} feature maps (strides 4..64).

The body is torchvision's ResNet class built with our choice of normalisation (its parameter names are what
torchvision's detection checkpoints use); the classifier tail is dropped and stages can be frozen.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from segment.config import SegmenterConfig
from segment.fpn import FeaturePyramid

# name -> (block, blocks per stage, groups, width per group)
ARCHS = {
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnext50_32x4d": (resnet.Bottleneck, [3, 4, 6, 3], 32, 4),
}
# trainable_layers counts stages from the top, like torchvision's resnet_fpn_backbone
_STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1")


def norm_layer(norm: str, eps: float):
    if norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if norm == "bn":
        return partial(nn.BatchNorm2d, eps=eps)
    return lambda channels: nn.GroupNorm(32, channels)


class ResNetBody(resnet.ResNet):
    """ResNet without avgpool/fc; returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, arch: str, norm: str, bn_eps: float = 1e-5) -> None:
        block, layers, groups, width = ARCHS[arch]
        super().__init__(block, layers, groups=groups, width_per_group=width, norm_layer=norm_layer(norm, bn_eps))
        del self.avgpool, self.fc
        self.stage_channels = [64 * block.expansion * 2**i for i in range(4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs


class BackboneWithFPN(nn.Module):
    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.body = ResNetBody(config.backbone, config.norm, config.bn_eps)
        self.fpn = FeaturePyramid(self.body.stage_channels, config.fpn_channels)
        self.out_channels = config.fpn_channels
        trainable = list(_STAGES_TOP_DOWN[: config.trainable_layers])
        if config.trainable_layers == 5:
            trainable.append("bn1")
        self.frozen_prefixes = tuple(s for s in (*_STAGES_TOP_DOWN, "bn1") if s not in trainable)
        for name, parameter in self.body.named_parameters():
            if name.startswith(self.frozen_prefixes):
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> BackboneWithFPN:
        # frozen stages keep their running statistics too (matters only for norm=bn)
        super().train(mode)
        for name, module in self.body.named_children():
            if name.startswith(self.frozen_prefixes):
                module.eval()
        return self

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))
