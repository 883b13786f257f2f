"""Feature pyramid (Lin et al. 2017): lateral 1x1 + top-down nearest upsampling + 3x3 smoothing, P6 by max-pool."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn


class FeaturePyramid(nn.Module):
    """Stage outputs C2..C5 -> OrderedDict "0".."3" (P2..P5) and "pool" (P6 = stride-2 max-pool of P5).

    Sub-module names (inner_blocks.i.0, layer_blocks.i.0) equal torchvision's FeaturePyramidNetwork.
    """

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, stages: list[Tensor]) -> OrderedDict[str, Tensor]:
        last_inner = self.inner_blocks[-1](stages[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(stages) - 2, -1, -1):
            lateral = self.inner_blocks[idx](stages[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        names = [str(i) for i in range(len(results))]
        out = OrderedDict(zip(names, results))
        out["pool"] = F.max_pool2d(results[-1], 1, 2, 0)
        return out
