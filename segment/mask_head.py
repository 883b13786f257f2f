"""Mask branch: pooled 14x14 RoI features -> convs -> 2x deconv -> per-class 28x28 mask logits."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskHead(nn.Sequential):
    """`layers` x (conv3x3 + ReLU); children named 0.0, 1.0, ... like torchvision's MaskRCNNHeads."""

    def __init__(self, in_channels: int, channels: int, layers: int = 4) -> None:
        blocks = []
        for i in range(layers):
            blocks.append(nn.Sequential(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)))
        super().__init__(*blocks)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)


class MaskPredictor(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, channels, 2, 2)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(channels, num_classes, 1)
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.zeros_(param)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))


def class_mask_probs(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """(N, C, M, M) logits and (N,) labels -> (N, M, M) sigmoid probabilities of each RoI's own class."""
    index = torch.arange(mask_logits.shape[0], device=labels.device)
    return mask_logits[index, labels].float().sigmoid()
