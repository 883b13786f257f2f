"""Inference post-processing: per-class boxes -> final detections, and 28x28 mask probabilities -> full-image masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from segment.box_coder import BoxCoder
from segment.roi_masks import RoIMasks


def select_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: float = 1e-2,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Every (RoI, foreground class) pair is a candidate: score > threshold, non-empty, per-class NMS, top-k.

    Returns per image (boxes (K, 4), scores (K,), labels (K,)) sorted by score, in resized-image pixels.
    """
    num_classes = class_logits.shape[-1]
    per_image = [p.shape[0] for p in proposals]
    boxes_all = box_coder.decode(box_regression.float(), torch.cat(proposals)).split(per_image)
    scores_all = F.softmax(class_logits.float(), -1).split(per_image)
    class_ids = torch.arange(num_classes, device=class_logits.device)

    results = []
    for boxes, scores, size in zip(boxes_all, scores_all, image_sizes):
        boxes = clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
        labels = class_ids.view(1, -1).expand_as(scores)[:, 1:].reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        # torchvision's two filters (score, then remove_small_boxes) as one: the same boxes in the same order, one
        # host sync fewer (each index-producing filter waits for the GPU)
        keep = torch.where((scores > score_thresh) & large_enough(boxes, min_size))[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        results.append((boxes[keep], scores[keep], labels[keep]))
    return results


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """(N,) bool: boxes at least `min_size` wide and high, torchvision's remove_small_boxes as a mask, so that it
    can join other conditions in one filter."""
    return (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1,
                chunk_size: int = 16) -> Tensor:
    """(N, M, M) mask probabilities in (N, 4) image-pixel boxes -> (N, H, W) float32 full-image masks.

    Matches torchvision's paste_masks_in_image (1 px zero border, box grown to match, bilinear resize, paste)
    without its per-instance loop: each instance is a separable resample, weights_y @ mask @ weights_x^T,
    done as batched matmuls on the masks' device (segment/roi_masks.py). Work is chunked over instances so
    temporaries stay small; the only large tensor is the (N, H, W) result itself.
    """
    return RoIMasks.from_probs(masks, boxes, image_size, padding).paste(chunk_size)
