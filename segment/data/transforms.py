"""Training-time augmentation applied to an image and its target together (torchvision.transforms.v2 does the
geometry, so boxes, crowd boxes and masks always move with the pixels).

Who resizes what: the model (`segment/transform.py`) always resizes every image to its own min_size / max_size
before the backbone. The dataset-side resize here is optional (off by default): turn it on to shrink big images
early (less decode-to-model memory traffic, cheaper collation) or to train multi-scale (a tuple of shorter sides,
one picked per image). Flipping is only done here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from segment.data.coco import Target

_BOX_KEYS = ("boxes", "crowd_boxes")


class PairTransform:
    """Wraps a v2 transform so it takes and returns plain tensors: (float image (3, H, W), target dict)."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        size = tuple(image.shape[-2:])
        wrapped = dict(target)
        for key in _BOX_KEYS:
            if key in target:
                wrapped[key] = tv_tensors.BoundingBoxes(target[key], format="XYXY", canvas_size=size)
        if "masks" in target:
            wrapped["masks"] = tv_tensors.Mask(target["masks"])
        image, wrapped = self.transform(tv_tensors.Image(image), wrapped)
        out = dict(target)
        for key in (*_BOX_KEYS, "masks"):
            if key in wrapped:
                out[key] = wrapped[key].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), out

    def __repr__(self) -> str:
        return f"PairTransform({self.transform!r})"


def build_transforms(
    train: bool,
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = 1333,
    hflip_prob: float = 0.5,
) -> PairTransform | None:
    """Resize (shorter side = min_size, or one of several picked at random; longer side <= max_size) when
    min_size is set, then (training only) a horizontal flip with probability hflip_prob. None if nothing to do."""
    steps: list[v2.Transform] = []
    if min_size is not None:
        sizes = [int(min_size)] if isinstance(min_size, int) else [int(s) for s in min_size]
        if not train:  # evaluation resizes deterministically to the largest training scale
            sizes = [max(sizes)]
        steps.append(v2.RandomShortestSize(min_size=sizes, max_size=max_size, antialias=True))
    if train and hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    if not steps:
        return None
    return PairTransform(steps[0] if len(steps) == 1 else v2.Compose(steps))
