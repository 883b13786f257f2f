"""Region proposal network: objectness + box deltas per anchor -> top proposals per image; training losses."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from segment.anchors import AnchorGenerator
from segment.box_coder import BoxCoder
from segment.config import SegmenterConfig
from segment.losses import rpn_loss
from segment.postprocess import large_enough
from segment.sampling import BETWEEN_THRESHOLDS, BalancedSampler, Matcher, concatenated_indices, padded
from segment.transform import ImageBatch


class Candidates(NamedTuple):
    """The RPN's top-k anchors per level and image, decoded, before the data-dependent filters (fixed shapes)."""

    boxes: Tensor   # (N, K, 4) xyxy in padded-image pixels
    scores: Tensor  # (N, K) objectness probabilities
    levels: Tensor  # (N, K) FPN level of each (NMS runs per level)


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A deltas per location."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)))
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten(per_level: list[Tensor], channels: int) -> Tensor:
    """[(N, A*C, H, W)] -> (N, sum(H*W*A), C), ordered level, y, x, anchor like the anchors."""
    out = []
    for t in per_level:
        n, _, h, w = t.shape
        out.append(t.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.anchor_ratios)
        self.head = RPNHead(config.fpn_channels, self.anchor_generator.num_anchors_per_location)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(config.rpn_fg_iou_thresh, config.rpn_bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(config.rpn_batch_size_per_image, config.rpn_positive_fraction)
        self.pre_nms_top_n = {True: config.rpn_pre_nms_top_n_train, False: config.rpn_pre_nms_top_n_test}
        self.post_nms_top_n = {True: config.rpn_post_nms_top_n_train, False: config.rpn_post_nms_top_n_test}
        self.nms_thresh = config.rpn_nms_thresh
        self.score_thresh = config.rpn_score_thresh
        self.min_size = config.rpn_min_size

    def forward(
        self, images: ImageBatch, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        maps = list(features.values())
        objectness, pred_deltas, anchors, per_level = self._predict(tuple(images.tensors.shape), maps)
        # proposals are not differentiated through (Faster R-CNN's approximate joint training)
        candidates = self._top_candidates(objectness.detach(), pred_deltas.detach(), anchors, per_level)
        boxes = self.select_proposals(candidates, images.image_sizes)
        if not self.training:
            return boxes, {}
        if targets is None:
            raise ValueError("RegionProposalNetwork needs targets in training mode")
        labels, matched_boxes = self.assign_targets(anchors, targets)
        regression_targets = self.box_coder.encode(matched_boxes, anchors)
        loss_objectness, loss_box = self.compute_loss(objectness, pred_deltas, labels, regression_targets)
        return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def candidates(self, padded_shape: tuple[int, ...], maps: list[Tensor]) -> Candidates:
        """Inference up to the first data-dependent step: its shapes depend only on the padded batch shape, so
        MaskRCNN can capture it (with the backbone) as one CUDA graph."""
        return self._top_candidates(*self._predict(padded_shape, maps))

    def _predict(self, padded_shape: tuple[int, ...], maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """-> objectness logits (N·A,), box deltas (N·A, 4), anchors (A, 4), anchors per level."""
        logits, deltas = self.head(maps)
        anchors, per_level = self.anchor_generator(
            tuple(padded_shape[-2:]), [tuple(m.shape[-2:]) for m in maps], torch.float32, maps[0].device
        )
        return _flatten(logits, 1).flatten(0, -2).float(), _flatten(deltas, 4).reshape(-1, 4).float(), anchors, per_level

    def _top_candidates(self, objectness: Tensor, pred_deltas: Tensor, anchors: Tensor, per_level: list[int]) -> Candidates:
        """The pre_nms_top_n highest-scoring anchors of each level and image, decoded (only those: decoding is
        per box, so decoding after the top-k gives the same boxes)."""
        num_images = objectness.shape[0] // anchors.shape[0]
        objectness = objectness.view(num_images, -1)
        device = objectness.device
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(per_level)])
        top_idx, offset = [], 0
        for scores in objectness.split(per_level, dim=1):
            k = min(self.pre_nms_top_n[self.training], scores.shape[1])
            top_idx.append(scores.topk(k, dim=1)[1] + offset)
            offset += scores.shape[1]
        top_idx = torch.cat(top_idx, dim=1)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        deltas = pred_deltas.view(num_images, -1, 4)[batch_idx, top_idx]
        boxes = self.box_coder.decode(deltas.reshape(-1, 4), anchors[top_idx].reshape(-1, 4))
        return Candidates(boxes.view(num_images, -1, 4), torch.sigmoid(objectness[batch_idx, top_idx]), levels[top_idx])

    def select_proposals(self, candidates: Candidates, image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Per image: clip, drop tiny / low-score boxes, NMS per level, keep the post-NMS top-k."""
        results = []
        for boxes, scores, lvl, size in zip(*candidates, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            # remove_small_boxes and the score threshold as one filter: same boxes, same order, one host sync
            wanted = large_enough(boxes, self.min_size)
            if self.score_thresh > 0:
                wanted &= scores >= self.score_thresh
            keep = torch.where(wanted)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n[self.training]]
            results.append(boxes[keep])
        return results

    def assign_targets(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """(B, A) anchor labels (1 object, 0 background, -1 ignored) and (B, A, 4) the matched GT box of each
        anchor (zeros in an image without objects), every image matched in one go: their GT boxes padded with NaN
        rows to the most objects, which the Matcher never matches."""
        gt_boxes = padded([t["boxes"] for t in targets], float("nan"))
        num_images, num_anchors = gt_boxes.shape[0], anchors.shape[0]
        if gt_boxes.shape[1] == 0:  # not one object in the batch: all background
            return anchors.new_zeros((num_images, num_anchors)), anchors.new_zeros((num_images, num_anchors, 4))
        matches = self.matcher(box_iou(gt_boxes, anchors))
        image = torch.arange(num_images, device=anchors.device)[:, None]
        matched_boxes = gt_boxes[image, matches.clamp(min=0)]
        if any(len(t["boxes"]) == 0 for t in targets):
            matched_boxes = matched_boxes.nan_to_num(0.0)  # the padding an image without objects matched
        # BELOW_LOW_THRESHOLD is negative, so those anchors are already 0 (background)
        labels = torch.where(matches == BETWEEN_THRESHOLDS, -1.0, (matches >= 0).to(torch.float32))
        return labels, matched_boxes

    def compute_loss(
        self, objectness: Tensor, pred_deltas: Tensor, labels: list[Tensor] | Tensor,
        regression_targets: list[Tensor] | Tensor,
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RegionProposalNetwork.compute_loss (same signature and sampling); labels and
        regression_targets are per image, as there, or batched (B, A) and (B, A, 4)."""
        positives, negatives = self.sampler(labels)
        sizes = [l.numel() for l in labels]
        return rpn_loss(
            objectness.flatten(), pred_deltas, _concatenated(labels), _concatenated(regression_targets),
            # ascending, as torchvision takes them (the sampler gives each image's in the order drawn)
            *(concatenated_indices(indices, sizes).sort().values for indices in (positives, negatives)),
        )


def _concatenated(per_image: list[Tensor] | Tensor) -> Tensor:
    """Per-image tensors, or a batch of equal-sized ones, as one tensor along the first dimension."""
    return per_image.flatten(0, 1) if isinstance(per_image, Tensor) else torch.cat(per_image)
