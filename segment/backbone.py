"""ResNet / ResNeXt body with FPN on top: image batch -> {"0".."3", "pool"} feature maps (strides 4..64).

The body is torchvision's ResNet class built with our choice of normalisation (its parameter names are what
torchvision's detection checkpoints use); the classifier tail is dropped and stages can be frozen. Its blocks are
torchvision's with one change to forward: in training, a conv followed by a FrozenBatchNorm2d runs with the BN
folded into the conv (see conv_frozen_bn); the parameters, buffers and their names stay torchvision's.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from segment.config import SegmenterConfig
from segment.fpn import FeaturePyramid

# name -> (torchvision block, blocks per stage, groups, width per group); ResNetBody runs these blocks through
# the subclasses below (FOLDING_BLOCKS), while segment/tv_reference.torchvision_twin builds from the originals
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


def conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: Tensor) -> Tensor:
    """bn(conv(x)) for a frozen BN, made for training: the BN is the fixed per-channel affine map y * scale + shift,
    so it folds into the conv's weights (W * scale) and bias (shift) and the conv output is already normalised.

    torchvision applies that map as extra passes over the activation, forward and backward (and under bf16
    autocast its fp32 buffers promote the activation to fp32); folded, they disappear, and the gradient w.r.t. W is
    the same math (d/dW of conv(x, W * scale) is scale times the one for W), so results differ by float rounding
    only. The fold costs passes over the weights instead (W * scale, and that product's gradient), so where the
    weights outnumber the output (deep stages on small images) the map is applied to the output as torchvision does,
    but in the output's dtype. scale and shift come from frozen_bn_affine (made once per buffer state, not per
    step). The buffers never require grad, so no gradient is made for them. segment/fold.py's inference fold is the
    same arithmetic done once, in place: the BN becomes Identity and the blocks below take their plain path.
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else conv.weight.dtype
    exact_scale, exact_shift = frozen_bn_affine(bn)
    scale, shift = frozen_bn_affine(bn, dtype)  # what autocast would cast them to, cast once
    if conv.bias is not None:  # never for torchvision's ResNets; kept so the helper is right for any conv
        shift = exact_shift + conv.bias * exact_scale
    if fold_into_weights(conv, x):
        return conv._conv_forward(x, conv.weight * exact_scale.reshape(-1, 1, 1, 1), shift)
    out = conv._conv_forward(x, conv.weight, None)  # in fp32 exactly torchvision's arithmetic
    return out * scale.to(out.dtype).reshape(-1, 1, 1) + shift.to(out.dtype).reshape(-1, 1, 1)


_affine_cache: weakref.WeakKeyDictionary[FrozenBatchNorm2d, tuple[tuple, tuple, dict]] = weakref.WeakKeyDictionary()


def frozen_bn_affine(bn: FrozenBatchNorm2d, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a frozen BN's per-channel map y * scale + shift, in the buffers' dtype, or cast to `dtype`.

    Made once and reused while the buffers stay the same tensors, unmodified (a training step would otherwise
    spend five small kernel launches per conv recomputing them; R50 has 53): loading a state dict writes into the
    buffers (their version changes), moving or casting the module replaces them (their identity changes), and
    either makes it recomputed.
    """
    buffers = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state = (tuple(b._version for b in buffers), bn.eps)
    cached = _affine_cache.get(bn)
    # the cache holds the buffers it was made from, so their identities cannot be reused by new tensors
    if cached is None or cached[1] != state or any(a is not b for a, b in zip(cached[0], buffers)):
        with torch.inference_mode(False), torch.no_grad():  # usable by autograd whatever mode made it
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            shift = bn.bias - bn.running_mean * scale
        cached = _affine_cache[bn] = (buffers, state, {None: (scale, shift)})
    by_dtype = cached[2]
    if dtype not in by_dtype:
        scale, shift = by_dtype[None]
        by_dtype[dtype] = (scale.to(dtype), shift.to(dtype))
    return by_dtype[dtype]


def fold_into_weights(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether conv's weights are no larger than its output for input x (output size as for ResNet's paddings)."""
    out_h, out_w = (-(-size // stride) for size, stride in zip(x.shape[-2:], conv.stride))
    return conv.weight.numel() <= x.shape[0] * conv.out_channels * out_h * out_w


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """norm(conv(x)). A FrozenBatchNorm2d goes through conv_frozen_bn while autograd records (training, frozen stages
    included). Inference keeps torchvision's arithmetic exactly, as the as-loaded parity tests expect, and is sped up
    by folding once, in place, with segment/fold.py instead. Any other norm (GN, BN, and the Identity that fold
    leaves) runs as torchvision runs it."""
    if isinstance(norm, FrozenBatchNorm2d) and torch.is_grad_enabled():
        return conv_frozen_bn(conv, norm, x)
    return norm(conv(x))


def _shortcut(block: resnet.BasicBlock | resnet.Bottleneck, x: Tensor) -> Tensor:
    # torchvision's downsample is always Sequential(conv1x1, norm)
    return x if block.downsample is None else conv_norm(block.downsample[0], block.downsample[1], x)


class BasicBlock(resnet.BasicBlock):
    """torchvision's BasicBlock (same submodules, names and order of operations), conv + norm pairs by conv_norm."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        out += _shortcut(self, x)
        return self.relu(out)


class Bottleneck(resnet.Bottleneck):
    """torchvision's Bottleneck (same submodules, names and order of operations), conv + norm pairs by conv_norm."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        out += _shortcut(self, x)
        return self.relu(out)


FOLDING_BLOCKS = {resnet.BasicBlock: BasicBlock, resnet.Bottleneck: Bottleneck}


class ResNetBody(resnet.ResNet):
    """ResNet without avgpool/fc; returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, arch: str, norm: str, bn_eps: float = 1e-5) -> None:
        block, layers, groups, width = ARCHS[arch]
        block = FOLDING_BLOCKS[block]
        super().__init__(block, layers, groups=groups, width_per_group=width, norm_layer=norm_layer(norm, bn_eps))
        del self.avgpool, self.fc
        self.stage_channels = [64 * block.expansion * 2**i for i in range(4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
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
