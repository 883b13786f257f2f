"""Second stage: pooled RoI features -> class scores + per-class boxes, and masks for the kept boxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from segment.box_coder import BoxCoder
from segment.config import SegmenterConfig
from segment.losses import fastrcnn_loss, maskrcnn_loss
from segment.mask_head import MaskHead, MaskPredictor, class_mask_probs
from segment.postprocess import select_detections
from segment.roi_pool import MultiLevelRoIAlign, poolable
from segment.sampling import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, BalancedSampler, Matcher, concatenated_indices,
                              padded)

BOX_POOL_SIZE = 7
MASK_POOL_SIZE = 14
# device type -> the mask head runs on a multiple of this many RoIs there (see RoIHeads._mask_logits)
MASK_BATCH_BUCKETS = {"cuda": 32}


class TwoMLPHead(nn.Module):
    def __init__(self, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class BoxPredictor(nn.Module):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        channels = config.fpn_channels
        self.box_roi_pool = MultiLevelRoIAlign(BOX_POOL_SIZE, sampling_ratio=2)
        self.box_head = TwoMLPHead(channels * BOX_POOL_SIZE**2, config.representation_size)
        self.box_predictor = BoxPredictor(config.representation_size, config.num_classes)
        self.mask_roi_pool = MultiLevelRoIAlign(MASK_POOL_SIZE, sampling_ratio=2)
        self.mask_head = MaskHead(channels, config.mask_head_channels, config.mask_head_layers)
        self.mask_predictor = MaskPredictor(config.mask_head_channels, config.mask_head_channels, config.num_classes)
        self.box_coder = BoxCoder(tuple(config.bbox_reg_weights))
        self.matcher = Matcher(config.box_fg_iou_thresh, config.box_bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(config.box_batch_size_per_image, config.box_positive_fraction)
        self.score_thresh = config.score_threshold
        self.nms_thresh = config.nms_threshold
        self.detections_per_img = config.detections_per_img
        self.box_min_size = config.box_min_size

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ):
        """Inference -> per image (boxes, scores, labels, mask_probs (K, 28, 28)); training -> loss dict."""
        maps = poolable([features[str(i)] for i in range(len(self.box_roi_pool.scales))])
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads needs targets in training mode")
            return self._losses(maps, proposals, targets)

        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(maps, proposals)))
        detections = select_detections(
            class_logits, box_regression, proposals, image_sizes, self.box_coder,
            self.score_thresh, self.nms_thresh, self.detections_per_img, self.box_min_size,
        )
        boxes = [d[0] for d in detections]
        labels = torch.cat([d[2] for d in detections])
        mask_logits = self._mask_logits(maps, boxes)
        probs = class_mask_probs(mask_logits, labels).split([len(b) for b in boxes])
        return [(b, s, l, p) for (b, s, l), p in zip(detections, probs)]

    def _mask_logits(self, maps: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """(sum R_i, C, 28, 28) mask logits for per-image RoI boxes.

        On a GPU the RoI batch goes through the mask head zero-padded to a multiple of 32 RoIs: cuDNN
        chooses each conv's algorithm on the host for every new input shape (about 1 ms per conv, pytorch/pytorch
        #187212; the head's six convs, forward and backward), and the number of positive RoIs or of detections
        changes every step and every frame. The head treats each RoI alone, so padding never changes the others.
        """
        pooled = self.mask_roi_pool(maps, boxes)
        count, bucket = pooled.shape[0], MASK_BATCH_BUCKETS.get(pooled.device.type, 1)
        if count % bucket:
            pooled = torch.cat((pooled, pooled.new_zeros((bucket - count % bucket, *pooled.shape[1:]))))
        return self.mask_predictor(self.mask_head(pooled))[:count]

    def _losses(self, maps: list[Tensor], proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, regression_targets, positives = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(maps, proposals)))
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits.float(), box_regression.float(), labels, regression_targets,
            concatenated_indices(positives, [len(p) for p in proposals]),
        )

        # the mask branch learns from positive RoIs only
        mask_proposals = [p[i] for p, i in zip(proposals, positives)]
        mask_matched = [m[i] for m, i in zip(matched_idxs, positives)]
        mask_logits = self._mask_logits(maps, mask_proposals)
        loss_mask = maskrcnn_loss(
            mask_logits.float(), mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets], mask_matched
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Add GT boxes to the proposals, match them to GT, sample positives/negatives, encode box targets.

        Returns per image the sampled RoIs (in ascending proposal order, as torchvision keeps them), their matched
        GT index, label and box target, and where the positives are among them (ascending); found from the
        sampler's indices, with no host sync."""
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        all_matched, all_labels = self.assign_targets(proposals, gt_boxes, [t["labels"] for t in targets])
        sampled_positives, sampled_negatives = self.sampler(all_labels)
        matched_idxs, labels, matched_boxes, positives = [], [], [], []
        for i, (pos, neg) in enumerate(zip(sampled_positives, sampled_negatives)):
            keep = torch.cat((pos, neg)).sort().values
            positives.append(torch.searchsorted(keep, pos.sort().values))
            proposals[i], labels_i, matched_i = proposals[i][keep], all_labels[i][keep], all_matched[i][keep]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=proposals[i].device)
            matched_boxes.append(gt[matched_i])
            labels.append(labels_i)
            matched_idxs.append(matched_i)
        # one call for the whole batch
        regression_targets = self.box_coder.encode(torch.cat(matched_boxes), torch.cat(proposals))
        regression_targets = list(regression_targets.split([len(p) for p in proposals]))
        return proposals, matched_idxs, labels, regression_targets, positives

    def assign_targets(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-image proposals, GT boxes and classes -> (B, P) matched GT index (0 where none) and label (the GT
        class, 0 background, -1 ignored), P the most proposals of an image (an image with fewer: -1 after its own).

        Every image is matched in one go, padded with NaN boxes: a NaN GT row is never matched (the Matcher), a
        NaN proposal is labelled -1 here, so the sampler never draws it."""
        batch = padded(proposals, float("nan"))
        gt = padded(gt_boxes, float("nan"))
        if gt.shape[1] == 0:  # not one object in the batch: every proposal is background
            matched = labels = torch.zeros(batch.shape[:2], dtype=torch.int64, device=batch.device)
        else:
            matches = self.matcher(box_iou(gt, batch))
            matched = matches.clamp(min=0)
            labels = padded(gt_labels, 0).gather(1, matched)
            labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, labels)  # no host sync, unlike
            labels = torch.where(matches == BETWEEN_THRESHOLDS, -1, labels)  # masked assignment
        if any(len(p) < batch.shape[1] for p in proposals):
            labels = torch.where(batch[..., 0].isnan(), -1, labels)
        return matched, labels
