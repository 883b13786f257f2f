"""Stylize stage: every kept instance of a batch in one `stylize_regions` call, and the background style.

region=crop (default): all crops of the batch (any frames, any styles) go to the network together:
`stylize_regions` buckets them by size and each crop carries its own style weights, so a batch of four frames
with six styled objects costs a handful of network calls, not twenty-four.
region=frame: each frame goes through the network whole, once per style its instances use, and every instance
is cut from its style's frame. The texture then follows the scene, not the crop box (no crop-border artefacts,
no re-phasing when a box moves), at the cost of whole frames instead of crops: a fixed input shape per video.
downsample=N: crops or frames go through the network at 1/N of their size and are scaled back: strokes N times
larger, about N² less network work.
max_side=M: a crop (region=frame and the background: a frame) whose longer side would exceed M px at the net's
resolution goes through at the smallest larger whole factor that fits: coarser strokes on large objects, network work
bounded by M² per crop, and input shapes from a small fixed set, which CUDA graphs can replay.
propagate=true: on a frame the segmenter skipped (`segment_every` > 1), a tracked object keeps its stylized crop from
the last segmented frame, moved as its mask moved (pipeline/style_carry.py): no network call for it.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from common.settings import flag, whole
from gpu.precision import PRECISIONS
from gpu.transfer import row_index
from pipeline.assign import ORIGINAL, is_original
from pipeline.errors import PipelineConfigError
from pipeline.host_copy import to_host
from pipeline.record import FrameRecord, StylizedRegion
from pipeline.stage_timing import timed
from pipeline.style_carry import StyleCarry
from stylize.apply import crop_boxes, crop_factors, crops_at, net_side, stylize_frames, stylize_regions

CPU_CROP_BUCKET = 16
GPU_BUCKET_STEP = 64  # a GPU's bucket: a quarter of the frame's short side, rounded down to this, at least this
REGIONS = ("crop", "frame")
FACTOR_MEMORY_FRAMES = 48  # a track unseen more than this many frames forgets its max_side factor
MIN_MAX_SIDE = 32  # style.max_side's least value (the net's inputs are at least stylize.apply.MIN_SIDE px anyway)
# style.crop_bucket's largest value: auto reaches 512 at 4K, and padding stops at the frame's side anyway
# (stylize.apply.batch_plan), so a larger bucket only merges crops of very different sizes
MAX_CROP_BUCKET = 1024


class StylizeStage:
    """Sets `record.stylized` (one `StylizedRegion` per kept instance; none for a carried crop moved out of view)
    and `record.background`."""

    name = "stylize"

    def __init__(self, bank, margin: int = 16, background=None, precision: str = "auto", crop_bucket="auto",
                 cuda_graphs: bool = False, region: str = "crop", downsample: int = 1, max_side: int | None = None,
                 propagate: bool = False, feather_px: int = 0):
        if region not in REGIONS:
            raise PipelineConfigError(f"style.region must be crop or frame, got {region!r}")
        if crop_bucket != "auto" and (isinstance(crop_bucket, bool) or not isinstance(crop_bucket, int)
                                      or not 4 <= crop_bucket <= MAX_CROP_BUCKET or crop_bucket % 4):
            raise PipelineConfigError(f"style.crop_bucket must be auto or a positive multiple of 4 up to "
                                      f"{MAX_CROP_BUCKET}, got {crop_bucket}")
        # here, not at the first network call: that comes only once something is detected, frames into the render
        if precision not in PRECISIONS:
            raise PipelineConfigError(f"style.precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                                      f"got {precision!r}")
        self.bank = bank
        self.margin = whole(margin, "style.margin")
        self.crop_bucket = crop_bucket
        self.background = None if is_original(background) else str(background).strip()
        self.precision = precision
        self.cuda_graphs = flag(cuda_graphs, "style.cuda_graphs")
        self.region = region
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise PipelineConfigError(f"style.downsample must be a positive integer, got {downsample!r}")
        self.downsample = downsample
        # a crop spans its box plus 2·margin and up to 8 px of grid at the net's resolution, whatever the factor: a cap
        # below that is met only by shrinking crops until they cover the whole frame
        floor = max(MIN_MAX_SIDE, 2 * self.margin + 16)
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < floor):
            raise PipelineConfigError(f"style.max_side must be null or an integer >= {floor} (with margin "
                                      f"{self.margin}), got {max_side!r}")
        self.max_side = max_side
        # a carried crop must hold its mask and the feather around it, as a fresh crop would
        self.carry = StyleCarry(reach=feather_px) if flag(propagate, "style.propagate") else None
        self._track_factors: dict[int, tuple[int, int]] = {}  # track id -> (its last factor, the frame it had it on)
        self._weights: dict[str, torch.Tensor] = {}
        if self.background is not None:
            self.weights(self.background)  # a bad spec fails now, not at the first frame

    @classmethod
    def from_config(cls, cfg: DictConfig, bank, feather_px: int = 0) -> StylizeStage:
        """`feather_px`: the composite's (composite.feather_px), which `style.propagate`'s carried crops must hold."""
        return cls(bank, margin=cfg.get("margin", 16), background=cfg.get("background"),
                   precision=str(cfg.get("precision", "auto")), crop_bucket=cfg.get("crop_bucket", "auto"),
                   cuda_graphs=cfg.get("cuda_graphs", False), region=str(cfg.get("region", "crop")),
                   downsample=cfg.get("downsample", 1), max_side=cfg.get("max_side"),
                   propagate=cfg.get("propagate", False), feather_px=feather_px)

    def weights(self, spec: str) -> torch.Tensor:
        """(S,) weights of a style spec, parsed once."""
        if spec not in self._weights:
            self._weights[spec] = self.bank.weights_for(spec)
        return self._weights[spec]

    def bucket(self, device: torch.device, height: int, width: int) -> int:
        """Crop sizes (at the net's resolution, in a frame of height × width there) are padded up to multiples of
        this. On a CPU the padding is compute, so fine buckets pay.
        A GPU's stage is bound by host work per network call and by cuDNN planning each new shape, not by its
        kernels, so coarse ones do: on the R50 benchmark's 1080p clip on an H200, buckets of 64 / 128 / 192 / 256
        px gave 14.1 / 20.2-21.9 / 21.9 / 25.5 fps (two calls, docs/benchmarks.md). Scaling the bucket with the
        frame (256 at 1080p, 128 at 720p, 64 at 480p) keeps the number of distinct crop shapes, about (H/b)·(W/b),
        the same at every resolution."""
        if self.crop_bucket != "auto":
            return self.crop_bucket
        if device.type != "cuda":
            return CPU_CROP_BUCKET
        return max(GPU_BUCKET_STEP, min(height, width) // 4 // GPU_BUCKET_STEP * GPU_BUCKET_STEP)

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if not batch:
            return batch
        with timed(batch, self.name):
            for group in _same_size_groups(batch):
                self._stylize(group)
        return batch

    def _stylize(self, batch: list[FrameRecord]) -> None:
        frames = torch.stack([record.image for record in batch])
        jobs = [(b, i, style) for b, record in enumerate(batch)
                for i, (style, keep) in enumerate(zip(record.styles, _keep_list(record))) if style is not None and keep]
        for record in batch:
            record.stylized = []
        styled_frames: dict[str, dict[int, torch.Tensor]] = {}  # style -> frame in batch -> that frame in it
        originals = [_original_rows(record) if self.background is not None else [] for record in batch]
        table, original_boxes = self._read_boxes(batch, jobs, originals)
        if not jobs and self.carry is not None:
            # a segmented frame with nothing to stylize still ends its tracks' sources: skipped frames after it must
            # not carry a crop from a segmented frame before it
            self.carry.place(self.carry.plan(batch, [], [], []), [], tuple(frames.shape[-2:]))
        if jobs:
            for (b, i, style), result in zip(jobs, self._regions(batch, frames, jobs, styled_frames, table)):
                if result is not None:  # None: a carried crop moved out of view
                    box, pixels, carried = result
                    batch[b].stylized.append(StylizedRegion(instance=i, style=style, box=box, pixels=pixels,
                                                            carried=carried))
        if self.background is None:
            for record in batch:
                record.background = None
        else:
            known = styled_frames.get(self.background, {})
            missing = [b for b in range(len(batch)) if b not in known]
            if missing:
                known = {**known, **self._whole(frames, self.background, missing)}
            for b, record in enumerate(batch):
                record.background = known[b]
                record.stylized += self._left_original(record, originals[b], original_boxes[b])

    def _read_boxes(self, batch: list[FrameRecord], jobs: list, originals: list[list[int]]) -> tuple:
        """The host's copy of the jobs' boxes (then, with style.propagate, their masks' paste boxes) and of each
        frame's left-original objects' boxes (None: it has none), in the stage's one wait for a GPU: crop boxes,
        factors and what style.propagate carries are the host's to choose."""
        table = None
        if jobs:
            table = torch.stack([batch[b].instances.boxes[i] for b, i, _ in jobs]).float()
            if self.carry is not None:
                table = torch.cat([table, self.carry.paste_boxes(batch, jobs)], 1)
        boxes = [record.instances.boxes[row_index(rows, record.instances.boxes.device)].float() if rows else None
                 for record, rows in zip(batch, originals)]
        table, *boxes = to_host([table, *boxes])
        return table, boxes

    def _left_original(self, record: FrameRecord, rows: list[int], boxes: torch.Tensor | None) -> list[StylizedRegion]:
        """Under a background style, the objects that assign kept but left original (an excluded class, a class
        styled `original`; `rows`, their host `boxes`): their own pixels, composited like a stylized crop, so that the
        background's texture does not cover them."""
        if not rows:
            return []
        # margin x downsample frame px, as a styled crop gets: composite.feather_px may reach that far (the render's
        # check), and a feather cut at the crop's edge is a seam
        crops = crop_boxes(boxes, *record.image.shape[-2:], self.margin * self.downsample)
        return [StylizedRegion(instance=i, style=ORIGINAL, box=(x1, y1, x2, y2),
                               pixels=record.image[:, y1:y2, x1:x2].float() / 255)
                for i, (x1, y1, x2, y2) in zip(rows, crops)]

    def _regions(self, batch: list[FrameRecord], frames: torch.Tensor, jobs: list, styled_frames: dict,
                 table: torch.Tensor) -> list:
        """Per job, its crop box, stylized pixels and whether they were carried over (None: carried out of view). Jobs
        that `style.propagate` does not carry go through the network: crops, or (region=frame) whole frames, which
        land in `styled_frames`. `table`: the jobs' host boxes (`_read_boxes`)."""
        size = tuple(frames.shape[-2:])
        boxes = table[:, :4]
        factors = [self.downsample] * len(jobs)
        if self.region == "crop" and self.max_side is not None:
            factors = self._factors(batch, jobs, boxes, size)
        # region=frame too: its crops only cut the styled frame, but composite.feather_px may reach margin x downsample
        # frame px (the render's check), and an alpha cut at the crop's edge is a seam; the same boxes as region=crop
        crops = crops_at(boxes, *size, self.margin, factors)
        plan = self.carry.plan(batch, jobs, crops, table[:, 4:].tolist()) if self.carry is not None else None
        fresh = [k for k in range(len(jobs)) if plan is None or k not in plan.carried]
        results: list = [None] * len(jobs)
        if fresh and self.region == "crop":
            stylized = self._crops(frames, [jobs[k] for k in fresh], boxes[fresh], [factors[k] for k in fresh])
            for k, result in zip(fresh, stylized):
                results[k] = result
        elif fresh:
            styled_frames.update(self._whole_frames(frames, [jobs[k] for k in fresh]))
            for k in fresh:
                (b, _, style), (x1, y1, x2, y2) = jobs[k], crops[k]
                results[k] = (crops[k], styled_frames[style][b][:, y1:y2, x1:x2])
        carried = {}
        if plan is not None:
            self.carry.place(plan, results, size)
            carried = plan.carried
        return [None if result is None else (*result, k in carried) for k, result in enumerate(results)]

    def _factors(self, batch: list[FrameRecord], jobs: list, boxes: torch.Tensor, size: tuple[int, int]) -> list[int]:
        """Each job's factor under `max_side` (`stylize.apply.crop_factors`), frame by frame, each tracked object
        starting from its factor on its last frame: near the cap an object keeps one stroke scale."""
        factors = [0] * len(jobs)
        for b, record in enumerate(batch):
            positions = [k for k, job in enumerate(jobs) if job[0] == b]
            track_ids = None if record.track_ids is None else record.track_ids.tolist()  # not an operator per job
            tracks = [-1 if track_ids is None else track_ids[jobs[k][1]] for k in positions]
            previous = [self._track_factors.get(track, (None,))[0] for track in tracks]
            _, chosen = crop_factors(boxes[positions], *size, self.margin, self.downsample, self.max_side, previous)
            for k, track, factor in zip(positions, tracks, chosen):
                factors[k] = factor
                if track >= 0:
                    self._track_factors[track] = (factor, record.index)
        newest = batch[-1].index
        self._track_factors = {track: entry for track, entry in self._track_factors.items()
                               if entry[1] >= newest - FACTOR_MEMORY_FRAMES}
        return factors

    def _crops(self, frames: torch.Tensor, jobs: list, boxes: torch.Tensor, factors: list[int] | None = None) -> list:
        device = frames.device
        # both on the host: stylize_regions reads the index as a list, which from a GPU would wait for it, and the
        # weights of each network call go to the GPU without the host waiting (gpu/transfer.py)
        frame_index = torch.tensor([b for b, _, _ in jobs], dtype=torch.long)
        weights = torch.stack([self.weights(style) for _, _, style in jobs])
        net_frame = [net_side(side, self.downsample) for side in frames.shape[-2:]]  # the frame the net sees
        return stylize_regions(self.bank.network, frames, frame_index, boxes, weights, margin=self.margin,
                               precision=self.precision, graphs=self.cuda_graphs, downsample=self.downsample,
                               max_side=self.max_side, factors=factors, bucket=self.bucket(device, *net_frame))

    def _whole_frames(self, frames: torch.Tensor, jobs: list) -> dict[str, dict[int, torch.Tensor]]:
        """style -> {frame in batch: that frame stylized whole}, for each style and the frames that use it."""
        users: dict[str, list[int]] = {}
        for b, _, style in jobs:
            if b not in users.setdefault(style, []):
                users[style].append(b)
        return {style: self._whole(frames, style, indices) for style, indices in users.items()}

    def _whole(self, frames: torch.Tensor, style: str, indices: list[int]) -> dict[int, torch.Tensor]:
        """{frame in batch: that frame stylized whole in `style`} for the frames `indices`."""
        styled = stylize_frames(self.bank.network, frames[row_index(indices, frames.device)], self.weights(style),
                                precision=self.precision, graphs=self.cuda_graphs, downsample=self.downsample,
                                max_side=self.max_side)
        return dict(zip(indices, styled))


def _keep_list(record: FrameRecord) -> list[bool]:
    return [True] * len(record.styles) if record.keep is None else record.keep.tolist()


def _original_rows(record: FrameRecord) -> list[int]:
    """The instances that assign kept but left original (no style)."""
    return [i for i, (style, keep) in enumerate(zip(record.styles, _keep_list(record))) if style is None and keep]


def _same_size_groups(batch: list[FrameRecord]) -> list[list[FrameRecord]]:
    """Records grouped by frame size (a video has one size; the groups keep frames stackable regardless)."""
    groups: dict[tuple[int, int], list[FrameRecord]] = {}
    for record in batch:
        groups.setdefault(record.size, []).append(record)
    return list(groups.values())
