"""The three Mask R-CNN training losses (RPN, box head, mask head), as defined by torchvision's reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

SMOOTH_L1_BETA = 1.0 / 9


def rpn_loss(
    objectness: Tensor, deltas: Tensor, labels: Tensor, regression_targets: Tensor, sampled_pos: Tensor, sampled_neg: Tensor
) -> tuple[Tensor, Tensor]:
    """Objectness BCE over the sampled anchors; smooth-L1 on the positives, summed / number sampled.

    objectness (A,), deltas (A, 4), labels (A,) in {1, 0, -1}, regression_targets (A, 4); sampled_* index tensors.
    """
    sampled = torch.cat([sampled_pos, sampled_neg])
    box_loss = F.smooth_l1_loss(
        deltas[sampled_pos], regression_targets[sampled_pos], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    return objectness_loss, box_loss


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor],
    positive: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sampled RoIs; smooth-L1 on the GT class's deltas of positives, summed / RoIs.

    `positive`: the ascending indices of the RoIs whose label is > 0, when the caller knows them (torch.where finds
    them otherwise, a host sync on a GPU)."""
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    classification_loss = F.cross_entropy(class_logits, labels_all)
    if positive is None:
        positive = torch.where(labels_all > 0)[0]
    num_rois = class_logits.shape[0]
    per_class = box_regression.reshape(num_rois, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(
        per_class[positive, labels_all[positive]], targets[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / labels_all.numel()
    return classification_loss, box_loss


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """GT masks (G, H, W) cropped to `boxes` (R, 4) of their matched GT and resampled to size x size."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def maskrcnn_loss(
    mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor], gt_labels: list[Tensor], matched_idxs: list[Tensor]
) -> Tensor:
    """Mean per-pixel BCE of the GT class's mask logits against roi-aligned GT masks, over positive RoIs."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[idx] for gt, idx in zip(gt_labels, matched_idxs)])
    targets = torch.cat([mask_targets(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)])
    if targets.numel() == 0:
        return mask_logits.sum() * 0  # keeps the graph (and DDP) intact when no RoI is positive
    chosen = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, targets)
