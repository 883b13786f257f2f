"""Boxes <-> regression deltas (dx, dy, dw, dh) relative to reference boxes, with per-coordinate weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float], clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip  # keeps exp() of width/height deltas finite

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """(N, 4) target boxes relative to (N, 4) reference boxes -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h
        gt_w = targets[:, 2] - targets[:, 0]
        gt_h = targets[:, 3] - targets[:, 1]
        gt_x = targets[:, 0] + 0.5 * gt_w
        gt_y = targets[:, 1] + 0.5 * gt_h
        weights = torch.as_tensor(self.weights, dtype=targets.dtype, device=targets.device)
        # computed as in torchvision's encode_boxes (weight tensor first) so losses match bit for bit
        return torch.stack(
            (
                weights[0] * (gt_x - ref_x) / ref_w,
                weights[1] * (gt_y - ref_y) / ref_h,
                weights[2] * torch.log(gt_w / ref_w),
                weights[3] * torch.log(gt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """(N, K*4) deltas for (N, 4) references -> (N, K, 4) boxes (K = classes, 1 for the RPN)."""
        references = references.to(deltas.dtype)
        widths = references[:, 2] - references[:, 0]
        heights = references[:, 3] - references[:, 1]
        ctr_x = references[:, 0] + 0.5 * widths
        ctr_y = references[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
        )
