"""Inference post-processing: per-class boxes -> final detections, and 28x28 mask probabilities -> full-image masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from segment.box_coder import BoxCoder


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


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow boxes about their centre by `scale` and truncate to whole pixels (torchvision's expand_boxes + int64)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1).to(torch.int64)


def _resample_weights(start: Tensor, end: Tensor, length: int, source: int) -> Tensor:
    """(N, length, source) bilinear weights placing a `source`-long signal on pixels start..end (inclusive).

    Same sampling as F.interpolate(bilinear, align_corners=False) to end - start + 1 pixels; zero elsewhere.
    Written as the tent max(0, 1 - |src - tap|) around the clamped source position: the same two weights as
    floor/frac/scatter, in a third of the kernel launches (they dominate on a GPU at batch 1).
    """
    size = (end - start + 1).clamp(min=1)
    pixel = torch.arange(length, device=start.device)
    offset = pixel[None, :] - start[:, None]  # (N, length) position inside the pasted box
    inside = (offset >= 0) & (pixel[None, :] <= end[:, None])
    src = ((source / size.to(torch.float32))[:, None] * (offset.to(torch.float32) + 0.5) - 0.5).clamp_(0, source - 1)
    taps = torch.arange(source, device=start.device, dtype=torch.float32)
    return (1 - (src[..., None] - taps).abs_()).clamp_(min=0).mul_(inside[..., None])


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1, chunk_size: int = 16) -> Tensor:
    """(N, M, M) mask probabilities in (N, 4) image-pixel boxes -> (N, H, W) float32 full-image masks.

    Matches torchvision's paste_masks_in_image (1 px zero border, box grown to match, bilinear resize, paste)
    without its per-instance loop: each instance is a separable resample, weights_y @ mask @ weights_x^T,
    done as batched matmuls on the masks' device. Work is chunked over instances so temporaries stay small;
    the only large tensor is the (N, H, W) result itself.
    """
    height, width = image_size
    out = torch.empty((masks.shape[0], height, width), dtype=torch.float32, device=masks.device)  # bmm fills it all
    if masks.shape[0] == 0:
        return out
    size = masks.shape[-1]
    padded = F.pad(masks.float(), (padding,) * 4)
    int_boxes = _expanded_int_boxes(boxes.float(), float(size + 2 * padding) / size)
    source = size + 2 * padding
    for start in range(0, masks.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        b = int_boxes[chunk]
        wy = _resample_weights(b[:, 1], b[:, 3], height, source)
        wx = _resample_weights(b[:, 0], b[:, 2], width, source)
        torch.bmm(torch.bmm(wy, padded[chunk]), wx.transpose(1, 2), out=out[chunk])
    return out
