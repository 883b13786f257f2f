"""Composite stage: blend each stylized crop into its frame through a feathered soft mask.

Each instance's mask is binarized at `mask_threshold`, optionally averaged with the same track's previous
mask (an EMA, moved by the box's shift so moving objects do not smear; it calms the boundary flicker of
per-frame masks), then blurred by a Gaussian (kornia's kernel) so the edge fades over `feather_px` pixels: every
region of a frame at once (pipeline/soft_masks.py). Crops are
blended in depth order (lower score first, so the most confident instance ends on top) over the original
frame or the stylized background. `stability()` measures the flicker that is left.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor

from common.settings import check_settings, number, whole
from pipeline.host_copy import to_host
from pipeline.record import FrameRecord
from pipeline.soft_masks import Frame, SoftMasks
from pipeline.stage_timing import timed

Box = tuple[int, int, int, int]


def _scores_and_boxes(batch: list[FrameRecord]) -> list[tuple[list[float], list[list[float]]]]:
    """Each frame's instance scores and boxes as lists, read from the device in one copy for the whole batch
    (pipeline/host_copy.py)."""
    host = to_host([None if record.instances is None or not len(record.instances) else
                    torch.cat([record.instances.scores.float()[:, None], record.instances.boxes.float()], 1)
                    for record in batch])
    rows = [[] if frame is None else frame.tolist() for frame in host]
    return [([row[0] for row in frame], [row[1:] for row in frame]) for frame in rows]


def depth_order(regions: list, scores: list[float]) -> list:
    """Stylized regions in the order they are blended, bottom first: lowest score first; among equal scores the
    later instance ends on top (a stable sort). The debug dump's stylized layer stacks its crops the same way."""
    return sorted(regions, key=lambda r: scores[r.instance])


def _frame(record: FrameRecord, scores: list[float], boxes: list[list[float]]) -> Frame:
    """What the soft masks and the blend need of a record: its regions in depth order, its instances' boxes and
    track ids."""
    n = 0 if record.instances is None else len(record.instances)
    tracks = record.track_ids.tolist() if n and record.track_ids is not None else [-1] * n
    return Frame(record, depth_order(record.stylized, scores), boxes, tracks)


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


class Compositor:
    """Sets `record.output` (uint8 3×H×W); `stability()` is the mean flicker inside tracked stylized objects."""

    name = "composite"

    def __init__(self, feather_px: int = 3, smooth_masks: float = 0.0, mask_threshold: float = 0.5):
        self.feather_px = whole(feather_px, "composite.feather_px")
        self.smooth = number(smooth_masks, "composite.smooth_masks", 0.0, 1.0, high_open=True)
        self.threshold = number(mask_threshold, "composite.mask_threshold", 0.0, 1.0, low_open=True)
        self.soft_masks = SoftMasks(self.feather_px, self.smooth, self.threshold)
        self.reset()

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> Compositor:
        keys = ("feather_px", "smooth_masks", "mask_threshold")
        check_settings(cfg, keys, "composite")
        return cls(**{key: cfg[key] for key in keys if key in cfg})

    def reset(self) -> None:
        self.soft_masks.reset()
        self._previous: tuple[Tensor, Tensor, dict] | None = None  # last input, output, track -> (box, crop mask)
        self._change_sum: Tensor | None = None
        self._change_count: Tensor | None = None

    # -- stage -------------------------------------------------------------------------------------

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if batch:
            with timed(batch, self.name):
                self._composite(batch)
        return batch

    def composite(self, record: FrameRecord) -> Tensor:
        """One frame, as a batch of one: its output."""
        self._composite([record])
        return record.output

    def _composite(self, batch: list[FrameRecord]) -> None:
        frames = [_frame(record, scores, boxes) for record, (scores, boxes) in zip(batch, _scores_and_boxes(batch))]
        # mask smoothing and the stability figure run in frame order
        for frame, masks in zip(frames, self.soft_masks(frames)):
            self._blend(frame, masks)

    def _blend(self, frame: Frame, masks: list[tuple[Tensor, Tensor]]) -> None:
        """Sets the frame's output: its regions' pixels blended in through their alphas (`masks`: per region its
        alpha and binarized mask over its crop)."""
        record = frame.record
        image = record.image
        # Work in 0..255 floats over the window the crops cover (the whole frame under a background style): every
        # other pixel keeps the input's value, as the float round trip did when the canvas was the whole frame.
        if record.background is None:
            x0, y0, x_end, y_end = _union([region.box for region in record.stylized])
            canvas = image[:, y0:y_end, x0:x_end].float()
        else:
            x0 = y0 = 0
            canvas = record.background.float() * 255
        hard_masks = {}
        for region, (alpha, hard) in zip(frame.regions, masks):
            x1, y1, x2, y2 = region.box
            track = frame.tracks[region.instance]
            if track >= 0:
                hard_masks[track] = (region.box, hard)
            window = canvas[:, y1 - y0:y2 - y0, x1 - x0:x2 - x0]
            window.lerp_(region.pixels.float() * 255, alpha[None].expand_as(window))
        if not record.stylized and record.background is None:
            output = image
        elif record.background is None:
            output = image.clone()
            output[:, y0:y_end, x0:x_end] = canvas.round_().clamp_(0, 255).to(torch.uint8)
        else:
            output = canvas.round_().clamp_(0, 255).to(torch.uint8)
        self._measure(image, output, hard_masks)
        record.output = output

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
                # in place on the view: `|=` on a slice would copy the result back onto itself
                inside[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1].bitwise_or_(_window(now_mask, now_box, both)
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
