"""torchvision Mask R-CNNs as oracles for parity tests and benchmarks: one with deterministic, non-trivial weights
(`torchvision_reference`), and one built from torchvision's own parts with any of our configs' architecture
(`torchvision_twin`).

No pretrained weights are available offline, so a seeded random model is made to behave like a trained one
where it matters for comparisons: BatchNorm statistics are calibrated on real images and then frozen
(FrozenBatchNorm2d, eps 0, exactly like torchvision's COCO v1 weights), and the heads are perturbed so there
are many confident detections of several classes with varied boxes and masks.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segment.backbone import ARCHS, norm_layer
from segment.config import SegmenterConfig


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


def torchvision_twin(config: SegmenterConfig) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN built from its own parts (its own ResNet blocks, so a frozen BN runs unfolded) with our
    config's architecture and parameter names: our state_dict loads into it strictly."""
    block, layers, groups, width = ARCHS[config.backbone]
    body = resnet.ResNet(block, layers, groups=groups, width_per_group=width,
                         norm_layer=norm_layer(config.norm, config.bn_eps))
    stage_channels = [64 * block.expansion * 2**i for i in range(4)]
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, stage_channels,
                               config.fpn_channels, extra_blocks=LastLevelMaxPool())
    c = config
    return TorchvisionMaskRCNN(
        backbone, num_classes=None, min_size=c.min_size, max_size=c.max_size, image_mean=c.image_mean,
        image_std=c.image_std,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in c.anchor_sizes), (tuple(c.anchor_ratios),) * 5),
        rpn_pre_nms_top_n_train=c.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train,
        rpn_batch_size_per_image=c.rpn_batch_size_per_image, box_batch_size_per_image=c.box_batch_size_per_image,
        box_head=TwoMLPHead(c.fpn_channels * 7 * 7, c.representation_size),
        box_predictor=FastRCNNPredictor(c.representation_size, c.num_classes),
        mask_head=MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * c.mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels, c.num_classes),
    )
