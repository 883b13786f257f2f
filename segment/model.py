"""Mask R-CNN (He et al. 2017): ResNet-FPN backbone, RPN, box and mask heads; training losses and inference."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor, nn

from gpu.cuda_graph import GraphCache
from gpu.precision import resolve_precision
from segment.backbone import BackboneWithFPN
from segment.config import SegmenterConfig
from segment.fold import fold_frozen_batchnorm
from segment.roi_heads import RoIHeads
from segment.roi_masks import RoIMasks
from segment.rpn import Candidates, RegionProposalNetwork
from segment.structures import Instances
from segment.transform import ImageBatch, ImageTransform, rescale_boxes

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# oneDNN (torch 2.14.1, x86 CPUs) computes bf16 convs of stride 2 wrongly where their output is one pixel wide and
# several tall (docs/benchmarks.md, 2026-11-27, sixth CPU session): the backbone's last stride-2 conv has such an
# output for a padded batch at most this wide (its total stride), where the features came out wrong or NaN
CPU_BF16_UNSAFE_WIDTH = 32
GRAPHED_FRAME_SHAPES = 4  # front graphs kept (a video has one frame size; each graph holds its activations)


class MaskRCNN(nn.Module):
    """Parameter names equal torchvision's maskrcnn_resnet50_fpn, so its state_dicts load strictly.

    - train mode: `model(images, targets)` -> {loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
      loss_mask}; images: list of float (3, H, W) in [0, 1]; targets: dicts of boxes (G, 4) xyxy float,
      labels (G,) int64, masks (G, H, W) uint8.
    - inference: `model.predict(frames)` (uint8) or `model(images)` in eval mode (float [0, 1]) -> list[Instances].
    """

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        self.transform = ImageTransform(config)
        self.backbone = BackboneWithFPN(config)
        self.rpn = RegionProposalNetwork(config)
        self.roi_heads = RoIHeads(config)
        self.precision = config.precision
        self.channels_last = config.channels_last
        self.cuda_graphs = config.cuda_graphs
        self._graphs = GraphCache(self._front, GRAPHED_FRAME_SHAPES)
        self.folded = False  # FrozenBatchNorm folded into the convs: inference only (see fold_frozen_norms)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    def set_inference_options(self, precision: str | None = None, channels_last: bool | None = None,
                              cuda_graphs: bool | None = None) -> MaskRCNN:
        """Autocast precision (auto | fp32 | bf16 | fp16), memory layout and CUDA graphs used by predict / eval
        forward; auto is bf16 on a device with native bf16, else fp32 (gpu/precision.py)."""
        if cuda_graphs is not None:
            self.cuda_graphs = bool(cuda_graphs)
        if precision is not None:
            if precision not in ("auto", "fp32", *_AUTOCAST_DTYPES):
                raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
            self.precision = precision
        if channels_last is not None:
            self.channels_last = channels_last
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    def fold_frozen_norms(self) -> MaskRCNN:
        """Folds the backbone's FrozenBatchNorm layers into their convs (segment/fold.py): same outputs up to float
        rounding, one activation pass less per layer. The model is then for inference only (no train, no save)."""
        if fold_frozen_batchnorm(self.backbone) and self.channels_last:
            self.to(memory_format=torch.channels_last)
        self._graphs.clear()  # they hold the replaced layers' kernels
        self.folded = True
        return self.eval()

    def train(self, mode: bool = True) -> MaskRCNN:
        if mode and self.folded:
            raise RuntimeError("this model's frozen BatchNorm is folded into its convs (inference only): "
                               "load the checkpoint again to train it")
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._graphs.clear()  # .to(), .cuda(), .half() give the parameters new storage; the graphs read the old
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if isinstance(images, Tensor):  # list() would split it into its images, or one image into its channels
            raise TypeError(f"pass a list of float (3, H, W) images in [0, 1], got a tensor of shape "
                            f"{tuple(images.shape)}")
        if not self.training:
            with torch.inference_mode():  # as torchvision's eval forward, without the caller's no_grad
                batch, _ = self.transform.float_batch(list(images))
                return self._detect(batch)
        _check_targets(targets, len(images))
        batch, targets = self.transform.float_batch(list(images), targets, training=True)
        features = self.backbone(self._layout(batch.tensors))
        proposals, rpn_losses = self.rpn(batch, features, targets)
        return {**rpn_losses, **self.roi_heads(features, proposals, batch.image_sizes, targets)}

    @torch.inference_mode()
    def predict(self, frames: Tensor | list[Tensor], full_masks: bool = True) -> list[Instances]:
        """uint8 (B, 3, H, W) or list of uint8 (3, H, W) of any sizes, on any device -> Instances on the model's device.

        `full_masks=False` leaves each frame's masks as `RoIMasks` (segment/roi_masks.py), pasted only where read:
        what the render wants, where a frame may have a hundred detections and full masks of 8 MB each at 1080p.

        Images of the same size run as one batch; different sizes run as separate batches, so an image's result
        does not depend on what it was batched with, up to float rounding (in bf16 on a CPU, where oneDNN's
        channels_last convolutions take another path for a batch of one, boxes move by up to about 2 px).
        """
        was_training = self.training
        self.eval()
        if isinstance(frames, Tensor) and frames.dim() == 3:  # one frame: one result (len(frames) is its channels)
            frames = frames[None]
        try:
            results: list[Instances | None] = [None] * len(frames)
            for indices, stack in _group_by_size(frames):
                if stack.dtype != torch.uint8:
                    raise TypeError(f"predict expects uint8 frames, got {stack.dtype}")
                # a copy to the host is only safe to read once finished: non_blocking only towards a GPU
                stack = stack.to(self.device, non_blocking=self.device.type == "cuda")
                batch, features, candidates = self._front_of(stack)
                for index, instances in zip(indices, self._finish(batch, features, candidates, full_masks)):
                    results[index] = instances
            return results
        finally:
            self.train(was_training)

    def _layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _autocast(self, cache: bool = True, width: int | None = None):
        """The autocast of `self.precision`; given the padded batch's `width`, fp32 for a backbone that bf16 would
        get wrong on a CPU (CPU_BF16_UNSAFE_WIDTH)."""
        dtype = _AUTOCAST_DTYPES.get(resolve_precision(self.precision, self.device))
        unsafe = (dtype == torch.bfloat16 and self.device.type == "cpu" and width is not None
                  and width <= CPU_BF16_UNSAFE_WIDTH)
        if dtype is None or unsafe:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache)

    def _front_of(self, frames: Tensor) -> tuple[ImageBatch, dict[str, Tensor], Candidates]:
        """`_front`, replayed from a CUDA graph on a GPU once a frame shape recurs (a video has one): at batch 1
        the front is bound by launching its few hundred kernels, not by running them."""
        if self.cuda_graphs and frames.is_cuda:
            key = (tuple(frames.shape), frames.device, self.precision, self.channels_last)
            graph = self._graphs.lookup(key, lambda: (frames.clone(),))
            if graph is not None:
                return graph.replay(frames)
        return self._front(frames)

    def _front(self, frames: Tensor) -> tuple[ImageBatch, dict[str, Tensor], Candidates]:
        """uint8 frames -> the batch, FPN features and RPN candidates: fixed shapes for a fixed frame shape."""
        batch = self.transform.uint8_batch(frames)
        return (batch, *self._dense(batch))

    def _dense(self, batch: ImageBatch) -> tuple[dict[str, Tensor], Candidates]:
        # no autocast weight cache: a CUDA graph must cast the weights itself, not read casts freed after capture
        with self._autocast(cache=False, width=batch.tensors.shape[-1]):
            features = self.backbone(self._layout(batch.tensors))
            return features, self.rpn.candidates(tuple(batch.tensors.shape), list(features.values()))

    def _detect(self, batch: ImageBatch) -> list[Instances]:
        return self._finish(batch, *self._dense(batch))

    def _finish(self, batch: ImageBatch, features: dict[str, Tensor], candidates: Candidates,
                full_masks: bool = True) -> list[Instances]:
        """Proposals, detections and pasted masks: the data-dependent rest of inference."""
        with self._autocast():
            proposals = self.rpn.select_proposals(candidates, batch.image_sizes)
            detections = self.roi_heads(features, proposals, batch.image_sizes)
        return self._instances(batch, detections, full_masks)

    def _instances(self, batch: ImageBatch, detections: list[tuple[Tensor, Tensor, Tensor, Tensor]],
                   full_masks: bool = True) -> list[Instances]:
        """The RoI heads' per-image (boxes, scores, labels, 28x28 mask probs) -> Instances in original pixels.

        The images of one size (all of predict's batch) are rescaled and pasted together: the same work per
        instance, in a few calls for the batch instead of a few per image."""
        same_size: dict[tuple, list[int]] = defaultdict(list)
        for index, sizes in enumerate(zip(batch.image_sizes, batch.original_sizes)):
            same_size[sizes].append(index)
        results: list[Instances | None] = [None] * len(detections)
        for (resized, original), members in same_size.items():
            boxes = rescale_boxes(torch.cat([detections[i][0] for i in members]), resized, original)
            masks = RoIMasks.from_probs(torch.cat([detections[i][3] for i in members]), boxes, original)
            counts = [len(detections[i][0]) for i in members]
            split = masks.paste(self.config.paste_chunk_size).split(counts) if full_masks else masks.split(counts)
            for i, image_boxes, image_masks in zip(members, boxes.split(counts), split):
                _, scores, labels, _ = detections[i]
                results[i] = Instances(image_size=tuple(original), boxes=image_boxes, scores=scores, labels=labels,
                                       masks=image_masks)
        return results


def _group_by_size(frames: Tensor | list[Tensor]) -> list[tuple[list[int], Tensor]]:
    if isinstance(frames, Tensor):
        if frames.dim() == 3:
            frames = frames[None]
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"predict expects (B, 3, H, W) frames, got shape {tuple(frames.shape)}")
        return [(list(range(frames.shape[0])), frames)] if len(frames) else []
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise ValueError(f"predict: frame {index} must be (3, H, W), got shape {tuple(frame.shape)}")
        groups[tuple(frame.shape)].append(index)
    return [(indices, torch.stack([frames[i] for i in indices])) for indices in groups.values()]


def _check_targets(targets: list[dict[str, Tensor]] | None, num_images: int) -> None:
    if targets is None or len(targets) != num_images:
        raise ValueError("training forward needs one target dict per image")
    for i, t in enumerate(targets):
        missing = {"boxes", "labels", "masks"} - set(t)
        if missing:
            raise ValueError(f"target {i} lacks {sorted(missing)}")
        if not t["boxes"].is_floating_point():
            raise TypeError(f"target {i}: boxes must be float, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"target {i}: labels must be int64, got {t['labels'].dtype}")
        if t["boxes"].dim() != 2 or t["boxes"].shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be (N, 4), got shape {tuple(t['boxes'].shape)}")
    # A box without width or height matches no anchor, so the low-quality rule would make every anchor its
    # positive (torchvision refuses them too). One check of all targets: one host sync per step.
    boxes = torch.cat([t["boxes"] for t in targets])
    if (boxes[:, 2:] <= boxes[:, :2]).any():
        for i, t in enumerate(targets):
            bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(1).nonzero()
            if len(bad):
                raise ValueError(f"target {i}: box {t['boxes'][int(bad[0])].tolist()} has no width or height "
                                 "(x1 < x2 and y1 < y2 needed)")


def build_model(config: SegmenterConfig | dict) -> MaskRCNN:
    if not isinstance(config, SegmenterConfig):
        config = SegmenterConfig.from_dict(config)
    model = MaskRCNN(config)
    if config.channels_last:
        model.set_inference_options(channels_last=True)
    return model
