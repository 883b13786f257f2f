"""Multi-level RoIAlign over FPN levels P2..P5: each RoI is pooled from the level its size maps to (FPN eq. 1).

torchvision's CPU roi_align kernels run on one thread, so on a multi-core CPU each level's RoIs are split into
chunks pooled by a thread pool (`_ThreadedRoIAlign`): the kernels release the GIL, the results are bit-identical,
and the box head's RoIAlign (a quarter of an R50 forward on 2 cores) gets about 1.5-2x faster. In training the
backward runs an image (or a channel slice of one) per thread.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import box_area, roi_align

FPN_STRIDES = (4, 8, 16, 32)
MIN_ROIS_PER_THREAD = 16   # below this a chunk costs more in hand-off than it saves
_pool: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="roi-align")
    return _pool


def map_levels(
    boxes: Tensor, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6
) -> Tensor:
    """(R, 4) boxes -> (R,) index into levels k_min..k_max: floor(k0 + log2(sqrt(area) / 224)), clamped."""
    s = torch.sqrt(box_area(boxes))
    target = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return torch.clamp(target, min=k_min, max=k_max).to(torch.int64) - k_min


def poolable(features: list[Tensor]) -> list[Tensor]:
    """The FPN levels as torchvision's roi_align kernels run them: float32 and contiguous (not channels_last).

    Given anything else, roi_align converts the whole level on every call: under autocast (CPU or CUDA) its
    wrapper casts the input to float32 and the result back, and the kernel copies channels_last into contiguous
    layout; that for each level, each thread's chunk, and box and mask heads alike. Converting once here gives
    the heads the same values: their first layer rounds its input to the autocast dtype either way."""
    return [f.to(torch.float32 if f.dtype in (torch.bfloat16, torch.float16) else f.dtype,
                 memory_format=torch.contiguous_format) for f in features]


class MultiLevelRoIAlign:
    def __init__(self, output_size: int, sampling_ratio: int = 2, strides: tuple[int, ...] = FPN_STRIDES) -> None:
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.scales = [1.0 / s for s in strides]
        self.k_min = int(math.log2(strides[0]))
        self.k_max = int(math.log2(strides[-1]))

    def __call__(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Level maps (B, C, H_l, W_l) and per-image (R_i, 4) boxes in padded-image pixels -> (sum R_i, C, S, S)."""
        flat = torch.cat(boxes)
        image_ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
        rois = torch.cat([image_ids, flat], dim=1)
        levels = map_levels(flat, self.k_min, self.k_max)
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for index, feature, scale in zip(self._split_by_level(levels, len(features)), features, self.scales):
            # autocast may pool in another dtype than the features
            result[index] = self._pool(feature, rois[index], scale).to(result.dtype)
        return result

    @staticmethod
    def _split_by_level(levels: Tensor, num_levels: int) -> tuple[Tensor, ...]:
        """The ascending indices of each level's RoIs (torch.where per level, but with one host sync, not one each).

        A box with NaN coordinates (a diverged model) maps to no level; as with torchvision, its row stays zero."""
        ids = torch.arange(num_levels, device=levels.device)
        counts = (levels[None] == ids[:, None]).sum(1).tolist()
        order = torch.argsort(torch.where((levels >= 0) & (levels < num_levels), levels, num_levels), stable=True)
        return order.split([*counts, len(levels) - sum(counts)])[:num_levels]

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if feature.device.type == "cpu" and torch.get_num_threads() > 1:
            return _ThreadedRoIAlign.apply(feature, rois, scale, self.output_size, self.sampling_ratio)
        return roi_align(feature, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio)


class _ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's roi_align on the CPU thread pool: forward in chunks of RoIs (inference and training), backward
    an image per thread. Bit-identical to torchvision's single-threaded kernels.

    The CPU backward kernel scatters every sample of every RoI into the feature gradient on one thread: half of a
    CPU training step of the demo model (ResNet-18 GN, 128 px, batch 2: 80 ms per call, eight calls). Split by
    image (and by channels when there are more threads than images), each thread owns its slice of the gradient
    and adds that image's RoIs in their original order, so every sum is made in the same order, with no extra
    memory.
    """

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, scale: float, size: tuple[int, int], sampling_ratio: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (scale, size, sampling_ratio, feature.shape)

        # grad, inference and autocast modes are thread-local: the workers take the caller's (grad is off in here)
        inference = torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def pool(chunk: Tensor) -> Tensor:
            with torch.inference_mode(inference), torch.no_grad(), \
                    torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                return torch.ops.torchvision.roi_align(feature, chunk, scale, *size, sampling_ratio, False)

        chunks = rois.tensor_split(max(1, min(torch.get_num_threads(), len(rois) // MIN_ROIS_PER_THREAD)))
        return torch.cat(list(_thread_pool().map(pool, chunks))) if len(chunks) > 1 else pool(rois)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        scale, (height, width), sampling_ratio, shape = ctx.settings
        grad_feature = grad.new_zeros(shape)
        image_of_roi = rois[:, 0].to(torch.int64)
        images, channels = shape[:2]
        groups = max(1, min(channels, torch.get_num_threads() // images))

        def one_slice(job: tuple[int, range]) -> None:
            image, part = job
            index = torch.nonzero(image_of_roi == image)[:, 0]
            if len(index):
                local = rois[index]
                local[:, 0] = 0  # the slice of the gradient is a batch of one
                grad_feature[image:image + 1, part.start:part.stop] = torch.ops.torchvision._roi_align_backward(
                    grad[index, part.start:part.stop].contiguous(), local, scale, height, width, 1, len(part),
                    *shape[2:], sampling_ratio, False)

        bounds = [channels * g // groups for g in range(groups + 1)]
        parts = [range(start, stop) for start, stop in zip(bounds, bounds[1:])]
        list(_thread_pool().map(one_slice, [(image, part) for image in range(images) for part in parts]))
        return grad_feature, None, None, None, None
