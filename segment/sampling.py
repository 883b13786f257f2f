"""Training-time assignment of anchors / proposals to ground truth, and balanced positive/negative sampling."""
from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """IoU matrix (G, N) -> (N,) index of the matched ground truth, or BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS.

    With `allow_low_quality_matches`, every ground truth keeps its best-overlapping predictions (ties included)
    even below the high threshold, so no object goes without a positive anchor.
    """

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low threshold {low_threshold} > high threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        if quality.numel() == 0:
            raise ValueError("Matcher needs at least one ground-truth box and one prediction per image")
        # torch.where throughout, not masked assignment: a boolean-mask index makes the host wait for the GPU
        matched_vals, best_matches = quality.max(dim=0)
        matches = torch.where(matched_vals < self.high_threshold, BETWEEN_THRESHOLDS, best_matches)
        matches = torch.where(matched_vals < self.low_threshold, BELOW_LOW_THRESHOLD, matches)
        if self.allow_low_quality_matches:
            best_per_gt, _ = quality.max(dim=1)
            matches = torch.where((quality == best_per_gt[:, None]).any(dim=0), best_matches, matches)
        return matches


class BalancedSampler:
    """Per image: up to `batch_size * positive_fraction` random positives (label >= 1), negatives (0) fill the rest.

    Returns per-image uint8 masks of the sampled positives and negatives (labels of -1 are never sampled).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]
            negative = torch.where(labels_per_image == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.uint8)
            pos_mask[pos] = 1
            neg_mask[neg] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
