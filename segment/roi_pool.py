"""Multi-level RoIAlign over FPN levels P2..P5: each RoI is pooled from the level its size maps to (FPN eq. 1)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, roi_align

FPN_STRIDES = (4, 8, 16, 32)


def map_levels(
    boxes: Tensor, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6
) -> Tensor:
    """(R, 4) boxes -> (R,) index into levels k_min..k_max: floor(k0 + log2(sqrt(area) / 224)), clamped."""
    s = torch.sqrt(box_area(boxes))
    target = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return torch.clamp(target, min=k_min, max=k_max).to(torch.int64) - k_min


class MultiLevelRoIAlign:
    def __init__(self, output_size: int, sampling_ratio: int = 2, strides: tuple[int, ...] = FPN_STRIDES) -> None:
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.scales = [1.0 / s for s in strides]
        self.k_min = int(torch.log2(torch.tensor(float(strides[0]))))
        self.k_max = int(torch.log2(torch.tensor(float(strides[-1]))))

    def __call__(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Level maps (B, C, H_l, W_l) and per-image (R_i, 4) boxes in padded-image pixels -> (sum R_i, C, S, S)."""
        flat = torch.cat(boxes)
        image_ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
        rois = torch.cat([image_ids, flat], dim=1)
        levels = map_levels(flat, self.k_min, self.k_max)
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio)
            result[index] = pooled.to(result.dtype)  # autocast may pool in another dtype than the features
        return result
