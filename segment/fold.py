"""Inference-only folding of FrozenBatchNorm into the convolution before it.

A frozen BN is a fixed per-channel affine map, so conv → FrozenBN equals one conv with scaled weights and a
bias. torchvision recomputes that affine map and applies it as an extra pass over every activation on every
forward; folded, the pass disappears (the result equals the unfolded model up to float rounding).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def _conv_feeding(parent: nn.Module, bn_name: str, previous: str | None) -> nn.Conv2d | None:
    """The conv a BN child normalises: `convK` for `bnK` (ResNet blocks), else the previous child (Sequential)."""
    if bn_name.startswith("bn"):
        conv = getattr(parent, "conv" + bn_name[2:], None)
    else:
        conv = getattr(parent, previous, None) if previous is not None else None
    return conv if isinstance(conv, nn.Conv2d) else None


@torch.no_grad()
def fold_conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (conv_bias - bn.running_mean) * scale + bn.bias
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=False)
    else:
        conv.bias.copy_(bias)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Folds every conv → FrozenBatchNorm2d pair inside `module` in place (the BN becomes Identity).

    Returns the number of folded pairs. A FrozenBatchNorm2d without a conv right before it is left alone.
    """
    folded = 0
    for parent in list(module.modules()):
        previous = None
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                conv = _conv_feeding(parent, name, previous)
                if conv is not None and conv.out_channels == child.weight.numel():
                    fold_conv_frozen_bn(conv, child)
                    setattr(parent, name, nn.Identity())
                    folded += 1
            previous = name
    return folded
