"""`style.propagate`: on a frame the segmenter skipped, each object keeps its stylized pixels from the last segmented
frame, moved as its mask moved, instead of going through the style network again.

On such a frame (`FrameRecord.propagated`, `segment_every` > 1) the tracker gives every object the last segmented
frame's mask over its moved box (`RoIMasks.moved`): the pasted mask moves by whole pixels, the shift of its paste
box. The object's stylized crop from that frame, shifted by the same pixels, lies over the mask exactly as it did
there. So the frame costs no style network for it; its texture shows the object as it was on the segmented frame
(up to N-1 frames old), and it stays fixed to the object instead of being made afresh from new content.

An object is stylized afresh instead where the carried crop would not cover its mask: where the mask's paste box,
grown by the composite's feather (`reach`), leaves the moved crop inside the crop a fresh stylization would have
(an object that grew on screen: the tracker moves each side of its box on its own), and where its source crop was
cut at the frame's edge on the side the motion pulls into view (the network saw no context there). So are objects
without `RoIMasks` (nothing says how their masks moved), objects whose style changed, and objects not stylized on
the segmented frame.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.record import FrameRecord
from segment.roi_masks import RoIMasks

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Source:
    """A tracked object's stylized crop on a segmented frame: what the frames after it carry."""

    style: str
    crop: Box                  # the crop box (x2, y2 exclusive) on that frame
    paste: Box                 # the object's mask paste box there (RoIMasks.boxes)
    size: tuple[int, int]      # the frame's height and width
    pixels: Tensor | None      # float 3×h×w over `crop`; None while its network call is still to come
    job: int | None = None     # its position among the batch's jobs while `pixels` is None


@dataclass(frozen=True)
class Carried:
    """A job whose pixels are `source`'s, moved by (dx, dy) px."""

    source: Source
    dx: int
    dy: int


@dataclass(frozen=True)
class CarryPlan:
    carried: dict[int, Carried]   # job position -> where its pixels come from
    sources: dict[int, Source]    # track -> its source for the skipped frames after the batch


class StyleCarry:
    """Which of a batch's stylize jobs carry a segmented frame's pixels over (`plan`), and those pixels placed on
    their frames (`place`). Keeps, per track, the last segmented frame's `Source` from batch to batch."""

    def __init__(self, reach: int = 0) -> None:
        self.reach = reach  # px past a mask's paste box that the composite blends (composite.feather_px)
        self._sources: dict[int, Source] = {}

    @staticmethod
    def paste_boxes(batch: list[FrameRecord], jobs: list[tuple[int, int, str]]) -> Tensor:
        """(K, 4) float paste boxes of the jobs' masks, on their device (zeros where masks are not RoIMasks): read to
        the host with the crop boxes, in the stage's one copy."""
        rows = []
        for b, i, _ in jobs:
            masks = batch[b].instances.masks
            rows.append(masks.boxes[i] if _has_roi_masks(batch[b]) else
                        torch.zeros(4, dtype=torch.int64, device=batch[b].instances.boxes.device))
        return torch.stack(rows).float()  # views stacked, then one cast: no kernel per job on a GPU

    def plan(self, batch: list[FrameRecord], jobs: list[tuple[int, int, str]], crops: list[Box],
             pastes: list[list[float]]) -> CarryPlan:
        """In frame order: a segmented frame's tracked jobs become the sources of the skipped frames after it (the
        batch's, or the next batch's); a skipped frame's job carries its track's source over where it can."""
        sources = self._sources
        carried: dict[int, Carried] = {}
        for b, record in enumerate(batch):
            ids = [-1] * len(record.styles) if record.track_ids is None else record.track_ids.tolist()
            if not _has_roi_masks(record):  # nothing says how its masks moved: it neither carries nor is carried
                if not record.propagated:
                    sources = {}
                continue
            frame_jobs = [(k, ids[i], style) for k, (job_frame, i, style) in enumerate(jobs) if job_frame == b]
            if not record.propagated:
                sources = {track: Source(style, crops[k], tuple(int(v) for v in pastes[k]), record.size, None, k)
                           for k, track, style in frame_jobs if track >= 0}
                continue
            for k, track, style in frame_jobs:
                source = sources.get(track)
                if source is None or source.style != style or source.size != record.size:
                    continue
                dx, dy = (_shift(pastes[k], source.paste, axis) for axis in (0, 1))
                needed = _blended(pastes[k], crops[k], self.reach)
                if _covers(source.crop, dx, dy, record.size) and _holds(source.crop, dx, dy, needed):
                    carried[k] = Carried(source, dx, dy)
        return CarryPlan(carried, sources)

    def place(self, plan: CarryPlan, results: list[tuple[Box, Tensor] | None], size: tuple[int, int]) -> None:
        """Fills `results` (per job: crop box and pixels, None for the carried ones) with each carried job's moved
        crop, cut to the frame (None where nothing of it is left in view), and keeps the plan's sources."""
        def pixels(source: Source) -> Tensor:
            return source.pixels if source.job is None else results[source.job][1]

        for k, move in plan.carried.items():
            results[k] = _moved(move.source.crop, pixels(move.source), move.dx, move.dy, size)
        self._sources = {track: replace(source, pixels=pixels(source), job=None)
                         for track, source in plan.sources.items()}


def _has_roi_masks(record: FrameRecord) -> bool:
    return record.instances is not None and isinstance(record.instances.masks, RoIMasks)


def _shift(now: list[float], then: Box, axis: int) -> int:
    """Whole pixels the paste box moved along x (axis 0) or y (1): its centre's move (its size changes only
    where rounding does, by a pixel)."""
    return int(now[axis] + now[axis + 2] - then[axis] - then[axis + 2]) // 2


def _covers(crop: Box, dx: int, dy: int, size: tuple[int, int]) -> bool:
    """False where the crop was cut at a frame edge that the motion pulls into view: pixels of the moved mask there
    have no stylized pixels under them."""
    height, width = size
    x1, y1, x2, y2 = crop
    return not ((x1 == 0 and dx > 0) or (y1 == 0 and dy > 0) or (x2 == width and dx < 0) or (y2 == height and dy < 0))


def _blended(paste: list[float], crop: Box, reach: int) -> Box:
    """What a fresh stylization would blend of the object: its fresh `crop` where its mask's paste box (x2, y2
    inclusive) grown by `reach` px lies."""
    x1, y1, x2, y2 = (int(v) for v in paste)
    return (max(x1 - reach, crop[0]), max(y1 - reach, crop[1]), min(x2 + 1 + reach, crop[2]),
            min(y2 + 1 + reach, crop[3]))


def _holds(crop: Box, dx: int, dy: int, needed: Box) -> bool:
    """Whether the crop moved by (dx, dy) holds the `needed` box (nothing needed holds)."""
    x1, y1, x2, y2 = needed
    return x1 >= x2 or y1 >= y2 or (crop[0] + dx <= x1 and crop[1] + dy <= y1 and crop[2] + dx >= x2
                                    and crop[3] + dy >= y2)


def _moved(crop: Box, pixels: Tensor, dx: int, dy: int, size: tuple[int, int]) -> tuple[Box, Tensor] | None:
    """The crop moved by (dx, dy) and cut to the frame: its box and a view of its pixels."""
    height, width = size
    x1, y1, x2, y2 = crop[0] + dx, crop[1] + dy, crop[2] + dx, crop[3] + dy
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if cx1 >= cx2 or cy1 >= cy2:
        return None
    return (cx1, cy1, cx2, cy2), pixels[:, cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
