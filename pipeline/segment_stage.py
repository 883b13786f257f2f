"""Segment stage: one batched `model.predict` per batch of frames, low-score detections dropped; with `every` N > 1
only frames N apart (stream index 0, N, 2N, ...) are segmented, the tracker moving their objects over the others,
and any frame that starts a new shot (`scene_cut`): the objects of the shot before must not be moved onto it. At any
N such a frame is marked `cut`, where the tracker ends every track: an object of the new shot that happens to
overlap one of the last shot's is another object, and must take neither its id (its style) nor its velocity.

A cut is a change of the picture's structure, not of its light or of where the camera points: the centre of a frame's
grey thumbnail is compared by correlation with the frame before's at the nine places one thumbnail cell apart, and the
best match counts. A flash, a light switched on or an exposure change leaves a correlation near 1, and so does a pan
of up to about an eighth of the frame per frame; they end no track (every object would change style) and cost no
extra segmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.settings import number, whole
from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed

# A cut: 1 - the best correlation of a frame's grey 8x8 thumbnail's central 6x6 cells with any 6x6 window of the
# frame before's exceeds this (0: the same picture up to brightness, contrast and a shift of a cell; 1: unrelated; 2:
# inverted). On generated clips: at most 0.15 within a shot (objects crossing), 0.66-0.88 at cuts between two; a frame
# brightened by 80 levels at most 0.04; a pan of 5-15% of the frame's width at most 0.21 (0.36-0.89 at 25%). Without
# the shifts a 10% pan gave 0.44-0.52, and the mean |Δ| measure before that fired at every flash and change of light.
SCENE_CUT = 0.5
# A thumbnail with less spread than this (grey levels, standard deviation) is near uniform (a black or white frame, a
# fade's end): its correlation says nothing, so it starts no shot, and the next frame is compared with the last one
# that had a picture (a cut through a fade to black is still a cut; a black frame within a shot is not).
FLAT = 4.0
THUMBNAIL = 8     # the thumbnails' side
SAMPLE = 64       # pixels read along the frame's shorter side to make one (every k-th: 1080p reads 1/256 of them)
CHANGE_NOISE = 1e-5  # float32 rounding of 1 - correlation between identical thumbnails (~1e-7): no change at all
GREY = (0.299, 0.587, 0.114)


class SegmentStage:
    """Fills `record.instances` (on the model's device) with the detections scoring >= `score_threshold`, their masks
    as `RoIMasks` (segment/roi_masks.py): each stage pastes what it reads, nothing holds a full-frame mask."""

    name = "segment"

    def __init__(self, model, score_threshold: float = 0.5, every: int = 1, scene_cut: float | None = SCENE_CUT):
        number(score_threshold, "segment.score_threshold", 0.0, 1.0)
        whole(every, "segment_every", 1)
        if scene_cut is not None and (isinstance(scene_cut, bool) or not isinstance(scene_cut, (int, float))
                                      or not 0 <= scene_cut <= 2):
            raise PipelineConfigError(f"scene_cut must be null or a number in [0, 2], got {scene_cut!r}")
        self.model = model
        self.score_threshold = float(score_threshold)
        self.every = every
        self.scene_cut = scene_cut
        self._last: tuple[torch.Tensor, tuple[int, int]] | None = None  # the last frame's thumbnail and size

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        changes, resized = self._changes(batch) if self.scene_cut is not None and batch else (None, [])
        if self.every > 1 and changes is not None:  # which frames to segment depends on the cuts: read them now
            self._mark_cuts(batch, changes.tolist(), resized)
            changes = None
        for record in batch:
            record.propagated = record.index % self.every != 0 and not record.cut
        segmented = [record for record in batch if not record.propagated]
        if not segmented:
            return batch
        with timed(segmented, self.name):
            images = [record.image for record in segmented]
            same_size = len({tuple(image.shape) for image in images}) == 1
            results = self.model.predict(torch.stack(images) if same_size else images, full_masks=False)
            # detections come highest score first, so the kept ones are a prefix of each frame's: one host sync
            # for the whole batch's counts (and, segmenting every frame, its changes), where a boolean index per
            # frame would make the host wait per frame
            counts = torch.stack([(r.scores >= self.score_threshold).sum() for r in results])
            if changes is None:
                counts = counts.tolist()
            else:
                read = torch.cat([counts.float(), changes.to(counts.device)]).tolist()
                counts = [int(count) for count in read[:len(results)]]
                self._mark_cuts(batch, read[len(results):], resized)
            for record, instances, count in zip(segmented, results, counts):
                record.instances = instances[:count]
        return batch

    def _changes(self, batch: list[FrameRecord]) -> tuple[torch.Tensor, list[bool]]:
        """Per frame: 1 - the best correlation of its thumbnail's centre with a window of the last earlier thumbnail
        that was not near uniform, 0 where either is (on the frames' device), and whether its size changed."""
        thumbnails = torch.stack([_thumbnail(record.image) for record in batch])
        sizes = [record.size for record in batch]
        first = self._last is None
        last = self._last or (thumbnails[0], sizes[0])
        side = THUMBNAIL - 2
        centre = _centred(thumbnails[:, 1:-1, 1:-1].flatten(1))                            # (B, 36)
        spread = centre.norm(dim=-1)
        flat = spread < FLAT * side
        bases = [last[0]]  # what each frame is compared with, chosen on the device: no wait
        for thumbnail, is_flat in zip(thumbnails, flat):
            bases.append(torch.where(is_flat, bases[-1], thumbnail))
        before = torch.stack(bases[:-1])
        windows = _centred(before.unfold(1, side, 1).unfold(2, side, 1).flatten(3).flatten(1, 2))  # (B, 9, 36)
        spread_before = windows.norm(dim=-1)
        correlation = (windows @ centre[..., None])[..., 0] / (spread[:, None] * spread_before).clamp_min(1e-6)
        flat |= spread_before.amin(1) < FLAT * side
        self._last = (bases[-1], sizes[-1])
        resized = [size != old for size, old in zip(sizes, [last[1], *sizes[:-1]])]
        changes = (1 - correlation.amax(1)).masked_fill_(flat, 0.0)
        if first:
            changes[0] = 0.0  # the stream's first frame: no shot before it (compared with itself, float noise)
        return changes, resized

    def _mark_cuts(self, batch: list[FrameRecord], changes: list[float], resized: list[bool]) -> None:
        """`cut` where a new shot starts: the thumbnail changed more than `scene_cut`, or the frame's size did."""
        for record, change, new_size in zip(batch, changes, resized):
            record.cut = change > self.scene_cut + CHANGE_NOISE or new_size


def _centred(cells: torch.Tensor) -> torch.Tensor:
    """Thumbnail cells (..., n) less their mean over the last dimension."""
    return cells - cells.mean(-1, keepdim=True)


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 → (THUMBNAIL, THUMBNAIL) float grey, 0-255: every k-th pixel (about SAMPLE along the shorter
    side), area-averaged."""
    step = max(1, min(image.shape[-2:]) // SAMPLE)
    sample = image[:, ::step, ::step].float()
    grey = sum(weight * channel for weight, channel in zip(GREY, sample))
    return F.interpolate(grey[None, None], size=(THUMBNAIL, THUMBNAIL), mode="area")[0, 0]
