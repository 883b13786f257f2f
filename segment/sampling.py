"""Training-time assignment of anchors / proposals to ground truth, and balanced positive/negative sampling."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """IoU matrix (G, N), or a batch of them (B, G, N), -> (N,) or (B, N) index of the matched ground truth, or
    BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS.

    With `allow_low_quality_matches`, every ground truth keeps its best-overlapping predictions (ties included)
    even below the high threshold, so no object goes without a positive anchor. In a batch, rows of NaN stand for
    ground truth an image does not have (images padded to the most objects): they are never matched, and an image
    with none at all has only background. (Any NaN counts as no overlap, also 0/0 from a zero-area GT box against
    itself, where torchvision's Matcher would match on NaN; segment.data drops such boxes.)
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
        matched_vals, best_matches = quality.nan_to_num(-1.0).max(dim=-2)  # padding rows below any IoU
        matches = torch.where(matched_vals < self.high_threshold, BETWEEN_THRESHOLDS, best_matches)
        matches = torch.where(matched_vals < self.low_threshold, BELOW_LOW_THRESHOLD, matches)
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(dim=-1, keepdim=True).values  # NaN for padding rows: equal to nothing
            matches = torch.where((quality == best_per_gt).any(dim=-2), best_matches, matches)
        return matches


def padded(tensors: list[Tensor], value: float) -> Tensor:
    """Per-image (N_i, ...) tensors -> (B, max N_i, ...), shorter ones filled with `value` (stacked when equal)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return pad_sequence(tensors, batch_first=True, padding_value=value)


class BalancedSampler:
    """Per image: up to `batch_size * positive_fraction` random positives (label >= 1), negatives (0) fill the rest.

    Returns, per image, the indices of the sampled positives and of the sampled negatives (labels of -1 are never
    sampled), in the order drawn. The draws are torchvision's BalancedPositiveNegativeSampler's (the same torch RNG
    calls with the same sizes), so seeded runs sample the same elements. torchvision finds each image's positives and
    negatives with a torch.where apiece, each a host sync on a GPU, and a few more launches per image; here the
    batch's counts reach the host in one sync, and one stable sort of the whole batch lists each image's positives,
    then its negatives, each in ascending order as torch.where does.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor] | Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """labels: per image (N_i,), or (B, N) with -1 where an image has no element."""
        batch = labels if isinstance(labels, Tensor) else padded(labels, -1)
        categories = 1 - batch.clamp(max=1)  # 0 positive, 1 negative, 2 ignored (and padding)
        counts = torch.stack(((categories == 0).sum(1), (categories == 1).sum(1)), dim=1).tolist()
        orders = torch.argsort(categories, dim=1, stable=True)
        positives, negatives = [], []
        for order, (num_positive, num_negative) in zip(orders, counts):
            num_pos = min(num_positive, int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(num_negative, self.batch_size_per_image - num_pos)
            pos_draw = torch.randperm(num_positive, device=order.device)[:num_pos]
            neg_draw = torch.randperm(num_negative, device=order.device)[:num_neg]
            positives.append(order[:num_positive][pos_draw])
            negatives.append(order[num_positive : num_positive + num_negative][neg_draw])
        return positives, negatives


def concatenated_indices(indices: list[Tensor], sizes: list[int]) -> Tensor:
    """Per-image indices into per-image tensors of `sizes` -> the same elements' indices into their concatenation,
    image after image (ascending where each image's are: what torch.where gives on the concatenated masks, without
    the host sync)."""
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    return torch.cat([i + offset for i, offset in zip(indices, offsets)])
