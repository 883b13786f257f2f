"""The one typed record that flows through every pipeline stage, one per video frame."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from torch import Tensor

from segment.roi_masks import RoIMasks
from segment.structures import Instances


@dataclass
class FrameRecord:
    """A frame and everything the stages learned about it.

    Filled in stage order: decode sets index/pts/time_base/image; segment sets `cut`, and instances, or `propagated`
    on a frame it skips (`segment_every`), whose instances track then sets; track sets track_ids; assign sets styles
    and keep; stylize sets stylized (one entry per kept instance) and background; composite sets output; every
    stage adds its seconds to timings.
    """

    index: int                      # 0-based position in the decoded stream
    pts: int | None                 # presentation timestamp in time_base units (kept for the encoder)
    time_base: Fraction
    image: Tensor                   # uint8 (3, H, W) RGB, on the working device
    instances: Instances | None = None
    propagated: bool = False                 # not segmented: instances are the last segmented frame's, moved
    cut: bool = False                        # a new shot starts here (`scene_cut`): the tracker ends every track
    track_ids: Tensor | None = None          # (N,) int64 on the CPU, aligned with instances; -1 = not tracked
    styles: list[str | None] = field(default_factory=list)  # per instance; None = left original
    keep: Tensor | None = None               # (N,) bool on the CPU: instances that pass assign's filters
    stylized: list["StylizedRegion"] = field(default_factory=list)
    background: Tensor | None = None         # float (3, H, W) in [0, 1]: background style, None = original
    output: Tensor | None = None             # uint8 (3, H, W) RGB composite
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds spent on this frame

    @property
    def time(self) -> float | None:
        return None if self.pts is None else float(self.pts * self.time_base)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor the record holds, on any device (pipeline/thread_stream.py marks the CUDA ones)."""
        instances = [] if self.instances is None else [
            self.instances.boxes, self.instances.scores, self.instances.labels, *_mask_tensors(self.instances.masks)]
        regions = [region.pixels for region in self.stylized]
        for tensor in (self.image, *instances, self.track_ids, self.keep, *regions, self.background, self.output):
            if tensor is not None:
                yield tensor


def _mask_tensors(masks: Tensor | RoIMasks | None) -> tuple[Tensor | None, ...]:
    return masks.tensors() if isinstance(masks, RoIMasks) else (masks,)


@dataclass
class StylizedRegion:
    """One instance's stylized crop: `pixels` covers `box` (int xyxy, exclusive x2/y2) of the frame."""

    instance: int                   # index into the frame's instances
    style: str
    box: tuple[int, int, int, int]
    pixels: Tensor                  # float (3, y2-y1, x2-x1) in [0, 1]
    carried: bool = False           # style.propagate: the last segmented frame's pixels, moved; not the network's
