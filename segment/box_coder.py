"""Boxes <-> regression deltas (dx, dy, dw, dh) relative to reference boxes, with per-coordinate weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float], clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip  # keeps exp() of width/height deltas finite
        self._weight_tensors: dict[tuple, tuple[Tensor, Tensor]] = {}

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """(..., 4) target boxes relative to (..., 4) reference boxes (broadcast: a batch of images' matched boxes
        against one set of anchors in one call) -> (..., 4) deltas."""
        weights_xy, weights_wh = self._weights(targets.dtype, targets.device)
        ref_wh = references[..., 2:] - references[..., :2]
        ref_ctr = references[..., :2] + 0.5 * ref_wh
        gt_wh = targets[..., 2:] - targets[..., :2]
        gt_ctr = targets[..., :2] + 0.5 * gt_wh
        # x and y (w and h) together, each element computed as torchvision's encode_boxes does (weight first), so
        # losses match bit for bit
        return torch.cat((weights_xy * (gt_ctr - ref_ctr) / ref_wh, weights_wh * torch.log(gt_wh / ref_wh)), dim=-1)

    def _weights(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(wx, wy) and (ww, wh) as tensors on the device, made once (a copy from the host each call costs a launch)."""
        key = (dtype, device)
        if key not in self._weight_tensors:
            weights = torch.tensor(self.weights, dtype=dtype, device=device)
            self._weight_tensors[key] = (weights[:2], weights[2:])
        return self._weight_tensors[key]

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
