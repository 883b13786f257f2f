"""Model input preparation: [0,1] or uint8 images -> normalised, resized, zero-padded batch; boxes back again.

Resizing follows torchvision's GeneralizedRCNNTransform exactly (shorter side to min_size unless the longer
side would exceed max_size; bilinear, align_corners=False, recomputed scale) so the two models see the same
pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segment.config import SegmenterConfig
from segment.errors import FrameSizeError


@dataclass
class ImageBatch:
    tensors: Tensor  # (B, 3, Hpad, Wpad) normalised, zero-padded to a multiple of size_divisible
    image_sizes: list[tuple[int, int]]  # resized (unpadded) size of each image
    original_sizes: list[tuple[int, int]]  # size of each image as given


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size `ImageTransform` resizes an image to: F.interpolate's with recompute_scale_factor (each side times
    the scale, rounded down). A frame that would keep no row or column is refused here, as torchvision's transform
    would fail deep inside F.interpolate (or on a division by zero for a frame without pixels)."""
    if not height or not width:
        raise FrameSizeError(f"a {width}x{height} frame has no pixels")
    scale = resize_scale(height, width, min_size, max_size)
    size = (math.floor(height * scale), math.floor(width * scale))
    if not all(size):
        raise FrameSizeError(f"a {width}x{height} frame is {size[1]}x{size[0]} pixels once resized (min_size "
                             f"{min_size}, max_size {max_size}): too thin to segment")
    return size


def rescale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """xyxy float32 boxes measured on an image of `from_size` (H, W) -> the same boxes on `to_size`.

    The ratios are float32 divisions, as torchvision's resize_boxes makes them, but made on the host: as tensors
    made on a GPU they cost a copy each, and the host waits for every one."""
    ratio_h, ratio_w = (float(np.float32(t) / np.float32(f)) for t, f in zip(to_size, from_size))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _source_rows(in_size: int, out_size: int) -> tuple[Tensor, Tensor]:
    """Bilinear resizing (align_corners=False) of `in_size` rows to `out_size`: the two input rows of each output row,
    interleaved (2·out_size,), and the second one's weight (out_size, 1). The source coordinate is PyTorch's:
    float32 scale in/out, then scale·(i + 0.5) - 0.5 rounded once (the kernel's fused multiply-add; rounding twice
    moved 209 rows of 50-1200-row ramps by an ulp, which a noisy frame turns into 4e-3 levels), clamped at 0."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale.double() - 0.5).float().clamp_(min=0)
    first = source.long()
    second = (first + 1).clamp_(max=in_size - 1)
    return torch.stack([first, second], 1).flatten(), (source - first)[:, None]


class ImageTransform:
    def __init__(self, config: SegmenterConfig) -> None:
        self.min_sizes = config.min_sizes
        self.max_size = config.max_size
        self.mean = list(config.image_mean)
        self.std = list(config.image_std)
        self.size_divisible = config.size_divisible
        self._stats: dict[tuple, tuple[Tensor, Tensor]] = {}

    def normalize(self, images: Tensor) -> Tensor:
        mean, std = self._statistics(images.dtype, images.device)
        return (images - mean) / std

    def _statistics(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(3, 1, 1) mean and std on the device, made once: a copy from the host cannot be part of a CUDA graph."""
        key = (dtype, device)
        if key not in self._stats:
            self._stats[key] = tuple(torch.as_tensor(v, dtype=dtype, device=device)[:, None, None]
                                     for v in (self.mean, self.std))
        return self._stats[key]

    def _min_size(self, training: bool) -> int:
        if not training:
            return self.min_sizes[-1]
        # drawn from torch's RNG even for a single size, like torchvision, so seeded runs consume the same numbers
        return self.min_sizes[int(torch.empty(1).uniform_(0.0, float(len(self.min_sizes))).item())]

    def _resize(self, images: Tensor, min_size: int) -> Tensor:
        """(B, 3, H, W) float -> resized (B, 3, h, w)."""
        scale = resize_scale(images.shape[-2], images.shape[-1], min_size, self.max_size)
        return F.interpolate(images, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False)

    def _shrink_uint8(self, frames: Tensor, min_size: int) -> Tensor:
        """(B, 3, H, W) uint8 -> float, resized. On a CPU frame by frame, and only the rows that bilinear reads
        become float: each output row is a blend of two input rows (`_source_rows`), so those pairs are taken in
        uint8, blended, and the columns resized by F.interpolate (its rows then map one to one). A 1080p frame
        shrinking to 216 rows reads 432 of its 1080, with no 24 MB float copy of the whole frame: CPU time per
        frame 8.3 -> 4.0 ms (2 cores; 17.4 -> 5.2 on one), the render's segment stage at 1080p with one stage
        thread 55.0-56.2 -> 47.8-50.5 ms/frame. The values are F.interpolate's up to float rounding (a blend
        a + w·(b - a) instead of a·(1 - w) + b·w)."""
        if frames.device.type != "cpu":
            return self._resize(frames.float(), min_size)
        height = frames.shape[-2]
        size = resized_size(*frames.shape[-2:], min_size, self.max_size)
        rows, weights = _source_rows(height, size[0])
        shrunk = []
        for frame in frames:
            pairs = frame.index_select(1, rows).float()
            blended = torch.lerp(pairs[:, 0::2], pairs[:, 1::2], weights)
            shrunk.append(F.interpolate(blended[None], size=size, mode="bilinear", align_corners=False))
        return torch.cat(shrunk)

    def _pad(self, images: list[Tensor]) -> Tensor:
        stride = self.size_divisible
        height = int(math.ceil(max(i.shape[-2] for i in images) / stride) * stride)
        width = int(math.ceil(max(i.shape[-1] for i in images) / stride) * stride)
        if len(images) == 1 or all(i.shape == images[0].shape for i in images):
            stacked = torch.stack(images) if images[0].dim() == 3 else torch.cat(images)
            return F.pad(stacked, (0, width - stacked.shape[-1], 0, height - stacked.shape[-2]))
        batch = images[0].new_zeros((len(images), images[0].shape[-3], height, width))
        for slot, image in zip(batch, images):
            slot[:, : image.shape[-2], : image.shape[-1]].copy_(image.squeeze(0))
        return batch

    def uint8_batch(self, frames: Tensor) -> ImageBatch:
        """(B, 3, H, W) uint8 frames of one size, already on the model's device -> ImageBatch (inference)."""
        original = (frames.shape[-2], frames.shape[-1])
        min_size = self._min_size(False)
        resized_size(*original, min_size, self.max_size)
        # Normalising is an affine map per channel and bilinear resizing takes convex combinations of pixels, so
        # the two commute up to float rounding: normalise at the smaller resolution. A video frame usually
        # shrinks (480p to the demo model's 256: three full-frame passes fewer); an enlarged one keeps
        # torchvision's order and its exact values.
        if resize_scale(*original, min_size, self.max_size) < 1:
            images = self.normalize(self._shrink_uint8(frames, min_size) / 255)
        else:
            images = self._resize(self.normalize(frames.float() / 255), min_size)
        size = (images.shape[-2], images.shape[-1])
        return ImageBatch(self._pad([images]), [size] * frames.shape[0], [original] * frames.shape[0])

    def float_batch(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, training: bool = False
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        """List of float (3, H, W) images in [0, 1] (any sizes) and optional targets -> ImageBatch, resized targets."""
        resized, sizes, originals, new_targets = [], [], [], []
        for index, image in enumerate(images):
            if image.dim() != 3 or not image.is_floating_point():
                raise TypeError(f"image {index}: expected a float (3, H, W) tensor in [0, 1], got {image.dtype} {tuple(image.shape)}")
            original = (image.shape[-2], image.shape[-1])
            min_size = self._min_size(training)
            resized_size(*original, min_size, self.max_size)
            out = self._resize(self.normalize(image)[None], min_size)
            size = (out.shape[-2], out.shape[-1])
            resized.append(out)
            sizes.append(size)
            originals.append(original)
            if targets is not None:
                new_targets.append(self._resize_target(targets[index], original, size))
        batch = ImageBatch(self._pad(resized), sizes, originals)
        return batch, (new_targets if targets is not None else None)

    @staticmethod
    def _resize_target(target: dict[str, Tensor], original: tuple[int, int], size: tuple[int, int]) -> dict[str, Tensor]:
        target = dict(target)
        target["boxes"] = rescale_boxes(target["boxes"], original, size)
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].byte()
        return target
