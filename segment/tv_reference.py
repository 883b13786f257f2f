"""A torchvision Mask R-CNN with deterministic, non-trivial weights: the oracle for parity tests and benchmarks.

No pretrained weights are available offline, so a seeded random model is made to behave like a trained one
where it matters for comparisons: BatchNorm statistics are calibrated on real images and then frozen
(FrozenBatchNorm2d, eps 0, exactly like torchvision's COCO v1 weights), and the heads are perturbed so there
are many confident detections of several classes with varied boxes and masks.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops import FrozenBatchNorm2d


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


@torch.no_grad()
def torchvision_reference(calibration_images: list[torch.Tensor], seed: int = 0, favoured_classes=(1, 3, 17, 18, 62), **kwargs) -> nn.Module:
    """torchvision maskrcnn_resnet50_fpn (eval mode) with calibrated frozen BN and perturbed heads.

    calibration_images: float (3, H, W) in [0, 1] used to set BatchNorm running statistics.
    kwargs go to maskrcnn_resnet50_fpn (min_size, box_score_thresh, ...).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    body = model.backbone.body
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=generator))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
    body.train()
    batch, _ = model.transform(calibration_images)
    body(batch.tensors)
    _freeze_batchnorm(model)
    overwrite_eps(model, 0.0)

    def perturb(param: torch.Tensor, std: float) -> None:
        param.add_(std * torch.randn(param.shape, generator=generator))

    head = model.rpn.head
    perturb(head.cls_logits.weight, 0.05)
    perturb(head.bbox_pred.weight, 0.01)
    predictor = model.roi_heads.box_predictor
    perturb(predictor.cls_score.weight, 0.05)
    predictor.cls_score.bias.zero_()
    predictor.cls_score.bias[list(favoured_classes)] = torch.linspace(3.0, 4.5, len(favoured_classes))
    perturb(predictor.bbox_pred.weight, 0.01)
    perturb(model.roi_heads.mask_predictor.mask_fcn_logits.bias, 1.0)
    return model.eval()
