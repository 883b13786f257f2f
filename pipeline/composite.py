"""Composite stage: blend each stylized crop into its frame through a feathered soft mask.

Each instance's mask is binarized at `mask_threshold`, optionally averaged with the same track's previous
mask (an EMA, moved by the box's shift so moving objects do not smear; it calms the boundary flicker of
per-frame masks), then blurred by a Gaussian (kornia's kernel) so the edge fades over `feather_px` pixels. Crops are
blended in depth order (lower score first, so the most confident instance ends on top) over the original
frame or the stylized background. `stability()` measures the flicker that is left.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from omegaconf import DictConfig
from torch import Tensor

from pipeline.errors import PipelineConfigError, check_settings
from pipeline.host_copy import to_host
from pipeline.record import FrameRecord, StylizedRegion
from pipeline.stage_timing import timed
from segment.roi_masks import RoIMasks, per_frame

Box = tuple[int, int, int, int]


def feather(mask: Tensor, feather_px: int) -> Tensor:
    """(h, w) mask in [0, 1] → its edge softened over ±feather_px px (values change only within that
    chessboard distance of it: the kernel is square).

    The Gaussian's σ is feather_px / 2 and its kernel is cut at ±feather_px; "replicate" borders keep a mask
    that runs off the frame fully opaque at the frame's edge.
    """
    if feather_px <= 0:
        return mask
    if mask.is_cuda:
        return _separable_by_matmul(mask, _gaussian_kernel(feather_px, mask.device, mask.dtype)[0])
    return _separable_by_shifts(mask, _gaussian_taps(feather_px))


def _separable_by_shifts(mask: Tensor, taps: tuple[float, ...]) -> Tensor:
    """kornia's filter2d_separable (replicate borders) as shifted, scaled adds, in place: one pass per tap and
    axis over the padded mask.

    On a CPU, oneDNN's one-channel convolutions that kornia runs are slow, and for some sizes very slow (2-core
    CPU, a 7-tap kernel: 0.67 -> 0.21 ms at 150x200, 1.8 -> 0.32 at 300x400, 50 -> 2.7 at 1000x700); the result
    was bit-identical on every size measured. On a GPU each add would be a kernel launch: the matmuls do it there.
    """
    r = len(taps) // 2
    padded = F.pad(mask[None, None], (r, r, r, r), mode="replicate")[0, 0]
    height, width = mask.shape
    return _taps_along(_taps_along(padded, taps, 1, width), taps, 0, height)


def _taps_along(x: Tensor, taps: tuple[float, ...], dim: int, length: int) -> Tensor:
    """Σ_i taps[i] · x shifted by i along `dim`, `length` long there (a new tensor, summed in tap order)."""
    out = x.narrow(dim, 0, length) * taps[0]
    for i, tap in enumerate(taps[1:], 1):
        out.add_(x.narrow(dim, i, length), alpha=tap)
    return out


def _separable_by_matmul(mask: Tensor, kernel: Tensor) -> Tensor:
    """filter2d_separable's result (replicate borders) as two window-by-kernel matmuls.

    On a GPU every crop has a new size, and cuDNN spends about a millisecond of host time choosing a
    convolution algorithm for each new shape (pytorch/pytorch#187212 measures 1.27 ms per cold conv): two convs
    per instance made that most of the composite's time with a detector whose boxes change every frame. A
    matmul needs no such choice; the sums differ from the conv's in float rounding only (~2e-7).
    """
    r = kernel.shape[0] // 2
    padded = F.pad(mask[None, None], (r, r, r, r), mode="replicate")[0, 0]
    rows = padded.unfold(1, kernel.shape[0], 1) @ kernel      # (h + 2r, w)
    return rows.unfold(0, kernel.shape[0], 1) @ kernel         # (h, w)


@lru_cache(maxsize=16)
def _gaussian_taps(feather_px: int) -> tuple[float, ...]:
    return tuple(_gaussian_kernel(feather_px, torch.device("cpu"), torch.float32)[0].tolist())


@lru_cache(maxsize=16)
def _gaussian_kernel(feather_px: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 2·feather_px + 1) Gaussian, σ = feather_px / 2; built once, not per instance and frame as
    gaussian_blur2d does (three quarters of the composite stage's kernel launches with ten instances)."""
    return get_gaussian_kernel1d(2 * feather_px + 1, feather_px / 2).to(device, dtype)


def _scores_and_boxes(batch: list[FrameRecord]) -> list[tuple[list[float], list[list[float]]]]:
    """Each frame's instance scores and boxes as lists, read from the device in one copy for the whole batch
    (pipeline/host_copy.py)."""
    host = to_host([None if record.instances is None or not len(record.instances) else
                    torch.cat([record.instances.scores.float()[:, None], record.instances.boxes.float()], 1)
                    for record in batch])
    rows = [[] if frame is None else frame.tolist() for frame in host]
    return [([row[0] for row in frame], [row[1:] for row in frame]) for frame in rows]


def _local_masks(batch: list[FrameRecord]) -> list[dict[int, Tensor] | None]:
    """Per frame with RoIMasks, its stylized instances' masks over their windows (instance -> mask), pasted for the
    whole batch in one call; None for the other frames."""
    roi = [b for b, record in enumerate(batch) if record.stylized and isinstance(record.instances.masks, RoIMasks)]
    rows = [[region.instance for region in batch[b].stylized] for b in roi]
    local: list[dict[int, Tensor] | None] = [None] * len(batch)
    for b, instances, masks in zip(roi, rows, per_frame([batch[b].instances.masks for b in roi], RoIMasks.local, rows)):
        local[b] = dict(zip(instances, masks))
    return local


def _summed_change(now: Tensor, before: Tensor, inside: Tensor) -> Tensor:
    """Σ over the `inside` pixels of Σ over channels |now − before| (uint8 3×h×w), exactly, as an int64 tensor.

    |Δ| as max − min stays in uint8 (no float copies of the window: at 1080p on a CPU 7 against 34 ms for a
    3×950×1700 window), and integer sums do not round. A product, not inside-indexing: boolean indexing would wait
    for the GPU to count the pixels. The channels add up in int16 (at most 3 × 255), one plane at a time: a sum
    over channels with a wider dtype first copies the whole window to it (2 cores, 3×700×1000: 2.7 -> 1.5 ms)."""
    delta = torch.maximum(now, before).sub_(torch.minimum(now, before)).mul_(inside)
    summed = delta[0].to(torch.int16)
    for plane in delta[1:]:
        summed += plane
    return summed.sum()


def _window(mask: Tensor, box: Box, window: Box) -> Tensor:
    """The part of `mask` (over `box`) that lies in `window`, which must lie inside `box`."""
    return mask[window[1] - box[1]:window[3] - box[1], window[0] - box[0]:window[2] - box[0]]


def _union(boxes: list[Box]) -> Box:
    """The smallest box holding every box (an empty one for none)."""
    if not boxes:
        return (0, 0, 0, 0)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def paste(source: Tensor, origin: tuple[int, int], box: Box) -> Tensor:
    """The window `box` (x1, y1, x2, y2) of a zero canvas on which `source` (h, w) lies at origin (x, y)."""
    x1, y1, x2, y2 = box
    out = source.new_zeros((y2 - y1, x2 - x1))
    sx, sy = origin
    ox1, oy1 = max(x1, sx), max(y1, sy)
    ox2, oy2 = min(x2, sx + source.shape[1]), min(y2, sy + source.shape[0])
    if ox1 < ox2 and oy1 < oy2:
        out[oy1 - y1:oy2 - y1, ox1 - x1:ox2 - x1] = source[oy1 - sy:oy2 - sy, ox1 - sx:ox2 - sx]
    return out


class Compositor:
    """Sets `record.output` (uint8 3×H×W); `stability()` is the mean flicker inside tracked stylized objects."""

    name = "composite"

    def __init__(self, feather_px: int = 3, smooth_masks: float = 0.0, mask_threshold: float = 0.5):
        if feather_px < 0:
            raise PipelineConfigError(f"composite.feather_px must be >= 0, got {feather_px}")
        if not 0.0 <= smooth_masks < 1.0:
            raise PipelineConfigError(f"composite.smooth_masks must be in [0, 1), got {smooth_masks}")
        if not 0.0 < mask_threshold <= 1.0:
            raise PipelineConfigError(f"composite.mask_threshold must be in (0, 1], got {mask_threshold}")
        self.feather_px, self.smooth, self.threshold = int(feather_px), float(smooth_masks), float(mask_threshold)
        self.reset()

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> Compositor:
        keys = ("feather_px", "smooth_masks", "mask_threshold")
        check_settings(cfg, keys, "composite")
        return cls(**{key: cfg[key] for key in keys if key in cfg})

    def reset(self) -> None:
        # track -> (smoothed mask over its crop, the crop's top-left corner, the box centre)
        self._smoothed: dict[int, tuple[Tensor, tuple[int, int], tuple[float, float]]] = {}
        self._previous: tuple[Tensor, Tensor, dict] | None = None  # last input, output, track -> (box, crop mask)
        self._change_sum: Tensor | None = None
        self._change_count: Tensor | None = None

    # -- stage -------------------------------------------------------------------------------------

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if batch:
            with timed(batch, self.name):
                # mask smoothing and the stability figure run in frame order
                for record, (scores, boxes), local in zip(batch, _scores_and_boxes(batch), _local_masks(batch)):
                    self.composite(record, scores, boxes, local)
        return batch

    def composite(self, record: FrameRecord, scores: list[float] | None = None,
                  boxes: list[list[float]] | None = None, local: dict[int, Tensor] | None = None) -> Tensor:
        """One frame; `scores` and `boxes` are its instances' as lists, and `local` its regions' RoIMasks over their
        windows (instance -> mask), when the caller has them already."""
        image = record.image
        # Work in 0..255 floats over the window the crops cover (the whole frame under a background style): every
        # other pixel keeps the input's value, as the float round trip did when the canvas was the whole frame.
        if record.background is None:
            x0, y0, x_end, y_end = _union([region.box for region in record.stylized])
            canvas = image[:, y0:y_end, x0:x_end].float()
        else:
            x0 = y0 = 0
            canvas = record.background.float() * 255
        n = 0 if record.instances is None else len(record.instances)
        if scores is None or boxes is None:
            scores, boxes = _scores_and_boxes([record])[0]
        track_ids = record.track_ids.tolist() if n and record.track_ids is not None else [-1] * n
        smoothed, hard_masks = {}, {}
        # Depth order: lowest score first; among equal scores the later instance ends on top (stable sort).
        regions = sorted(record.stylized, key=lambda r: scores[r.instance])
        for region, hard in zip(regions, self._hard_masks(record, regions, boxes, local)):
            x1, y1, x2, y2 = region.box
            track = track_ids[region.instance]
            soft = self._smoothed_mask(track, hard, region.box, boxes[region.instance], smoothed)
            if track >= 0:
                hard_masks[track] = (region.box, hard.bool())
            alpha = feather(soft, self.feather_px)
            window = canvas[:, y1 - y0:y2 - y0, x1 - x0:x2 - x0]
            window.lerp_(region.pixels.float() * 255, alpha[None].expand_as(window))
        self._smoothed = smoothed  # tracks absent this frame start afresh when they return
        if not record.stylized and record.background is None:
            output = image
        elif record.background is None:
            output = image.clone()
            output[:, y0:y_end, x0:x_end] = canvas.round_().clamp_(0, 255).to(torch.uint8)
        else:
            output = canvas.round_().clamp_(0, 255).to(torch.uint8)
        self._measure(image, output, hard_masks)
        record.output = output
        return output

    def _hard_masks(self, record: FrameRecord, regions: list[StylizedRegion], boxes: list[list[float]],
                    local: dict[int, Tensor] | None) -> list[Tensor]:
        """Each region's instance mask, binarized, over the region's crop (its box when the model gave no masks)."""
        masks = record.instances.masks if regions else None
        if masks is None:
            return [paste(torch.ones((by2 - by1, bx2 - bx1), device=record.image.device), (bx1, by1), region.box)
                    for region in regions for bx1, by1, bx2, by2 in [[round(v) for v in boxes[region.instance]]]]
        if isinstance(masks, RoIMasks):  # pasted over each mask's own window, placed in the crop
            if local is None:
                local = _local_masks([record])[0]
            windows = masks.windows()
            probs = [paste(local[region.instance], windows[region.instance][:2], region.box) for region in regions]
        else:
            probs = [masks[region.instance, y1:y2, x1:x2] for region in regions for x1, y1, x2, y2 in [region.box]]
        return [(p >= self.threshold).float() for p in probs]

    def _smoothed_mask(self, track: int, hard: Tensor, crop: Box, box: list[float], smoothed: dict) -> Tensor:
        if self.smooth <= 0 or track < 0:
            return hard
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        soft = hard
        if track in self._smoothed:
            previous, (px, py), (cx, cy) = self._smoothed[track]
            dx, dy = round(centre[0] - cx), round(centre[1] - cy)  # follow the object, keep its outline
            soft = torch.lerp(hard, paste(previous, (px + dx, py + dy), crop), self.smooth)
        smoothed[track] = (soft, (crop[0], crop[1]), centre)
        return soft

    # -- temporal stability ------------------------------------------------------------------------

    def _measure(self, image: Tensor, output: Tensor, masks: dict[int, tuple[Box, Tensor]]) -> None:
        """Adds |Δ output| and |Δ input| over the pixels inside the same track's mask in this frame and the last
        one: the input's change is what the objects' own motion explains, the rest is flicker we added.

        `masks`: track -> (crop box, its binarized mask over the crop). Those pixels lie within the union of the
        tracks' crop boxes in this frame, so only that window is compared, not the whole frame (at 480p on a CPU
        the whole-frame version was 9 of the stage's 23 ms per frame)."""
        previous = self._previous
        self._previous = (image, output, masks)
        if previous is None or previous[1].shape != output.shape:
            return
        tracks = sorted(masks.keys() & previous[2].keys())
        if not tracks:
            return
        x1, y1, x2, y2 = _union([masks[t][0] for t in tracks])
        inside = torch.zeros((y2 - y1, x2 - x1), dtype=torch.bool, device=output.device)
        for t in tracks:  # each track's two masks overlap only where its two crop boxes do
            (now_box, now_mask), (before_box, before_mask) = masks[t], previous[2][t]
            ix1, iy1 = max(now_box[0], before_box[0]), max(now_box[1], before_box[1])
            ix2, iy2 = min(now_box[2], before_box[2]), min(now_box[3], before_box[3])
            if ix1 < ix2 and iy1 < iy2:
                both = (ix1, iy1, ix2, iy2)
                inside[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1] |= (_window(now_mask, now_box, both)
                                                                 & _window(before_mask, before_box, both))
        changes = torch.stack([_summed_change(now[:, y1:y2, x1:x2], before[:, y1:y2, x1:x2], inside)
                               for now, before in ((output, previous[1]), (image, previous[0]))])
        count = inside.sum()
        # Kept on the device: reading them back every frame would stall the pipeline.
        self._change_sum = changes if self._change_sum is None else self._change_sum + changes
        self._change_count = count if self._change_count is None else self._change_count + count

    def stability(self) -> float | None:
        """Mean absolute change (0–255) between consecutive outputs inside tracked stylized objects; lower is
        steadier. None when no tracked object was stylized in two consecutive frames."""
        return self._mean_change(0)

    def input_change(self) -> float | None:
        """The same figure on the input frames over the same pixels: the floor that motion alone explains."""
        return self._mean_change(1)

    def _mean_change(self, which: int) -> float | None:
        if self._change_count is None or int(self._change_count) == 0:
            return None
        return int(self._change_sum[which]) / (3 * int(self._change_count))  # the sums are over 3 channels
