"""Stylize stage: every kept instance of a batch in one `stylize_regions` call, and the background style.

region=crop (default): all crops of the batch (any frames, any styles) go to the network together:
`stylize_regions` buckets them by size and each crop carries its own style weights, so a batch of four frames
with six styled objects costs a handful of network calls, not twenty-four.
region=frame: each frame goes through the network whole, once per style its instances use, and every instance
is cut from its style's frame. The texture then follows the scene, not the crop box (no crop-border artefacts,
no re-phasing when a box moves), at the cost of whole frames instead of crops: a fixed input shape per video.
downsample=N: crops or frames go through the network at 1/N of their size and are scaled back: strokes N times
larger, about N² less network work.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from gpu.transfer import row_index
from pipeline.assign import is_original
from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord, StylizedRegion
from pipeline.stage_timing import timed
from stylize.apply import crop_boxes, net_side, stylize_frames, stylize_regions

CPU_CROP_BUCKET = 16
GPU_BUCKET_STEP = 64  # a GPU's bucket: a quarter of the frame's short side, rounded down to this, at least this
REGIONS = ("crop", "frame")


class StylizeStage:
    """Sets `record.stylized` (one `StylizedRegion` per kept instance) and `record.background`."""

    name = "stylize"

    def __init__(self, bank, margin: int = 16, background=None, precision: str = "auto", crop_bucket="auto",
                 cuda_graphs: bool = False, region: str = "crop", downsample: int = 1):
        if region not in REGIONS:
            raise PipelineConfigError(f"style.region must be crop or frame, got {region!r}")
        if margin < 0:
            raise PipelineConfigError(f"style.margin must be >= 0, got {margin}")
        if crop_bucket != "auto" and (not isinstance(crop_bucket, int) or crop_bucket < 4 or crop_bucket % 4):
            raise PipelineConfigError(f"style.crop_bucket must be auto or a positive multiple of 4, got {crop_bucket}")
        self.bank = bank
        self.margin = int(margin)
        self.crop_bucket = crop_bucket
        self.background = None if is_original(background) else str(background).strip()
        self.precision = precision
        if not isinstance(cuda_graphs, bool):
            raise PipelineConfigError(f"style.cuda_graphs must be true or false, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.region = region
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise PipelineConfigError(f"style.downsample must be a positive integer, got {downsample!r}")
        self.downsample = downsample
        self._weights: dict[str, torch.Tensor] = {}
        if self.background is not None:
            self.weights(self.background)  # a bad spec fails now, not at the first frame

    @classmethod
    def from_config(cls, cfg: DictConfig, bank) -> StylizeStage:
        return cls(bank, margin=int(cfg.get("margin", 16)), background=cfg.get("background"),
                   precision=str(cfg.get("precision", "auto")), crop_bucket=cfg.get("crop_bucket", "auto"),
                   cuda_graphs=cfg.get("cuda_graphs", False), region=str(cfg.get("region", "crop")),
                   downsample=cfg.get("downsample", 1))

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
        if jobs:
            boxes = torch.stack([batch[b].instances.boxes[i] for b, i, _ in jobs]).float()
            if self.region == "crop":
                crops = self._crops(frames, jobs, boxes)
            else:
                styled_frames = self._whole_frames(frames, jobs)
                crops = [(box, styled_frames[style][b][:, box[1]:box[3], box[0]:box[2]])
                         for (b, _, style), box in zip(jobs, crop_boxes(boxes, *frames.shape[-2:], self.margin))]
            for (b, i, style), (box, pixels) in zip(jobs, crops):
                batch[b].stylized.append(StylizedRegion(instance=i, style=style, box=box, pixels=pixels))
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

    def _crops(self, frames: torch.Tensor, jobs: list, boxes: torch.Tensor) -> list:
        device = frames.device
        # both on the host: stylize_regions reads the index as a list, which from a GPU would wait for it, and the
        # weights of each network call go to the GPU without the host waiting (gpu/transfer.py)
        frame_index = torch.tensor([b for b, _, _ in jobs], dtype=torch.long)
        weights = torch.stack([self.weights(style) for _, _, style in jobs])
        net_frame = [net_side(side, self.downsample) for side in frames.shape[-2:]]  # the frame the net sees
        return stylize_regions(self.bank.network, frames, frame_index, boxes, weights, margin=self.margin,
                               precision=self.precision, graphs=self.cuda_graphs, downsample=self.downsample,
                               bucket=self.bucket(device, *net_frame))

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
                                precision=self.precision, graphs=self.cuda_graphs, downsample=self.downsample)
        return dict(zip(indices, styled))


def _keep_list(record: FrameRecord) -> list[bool]:
    return [True] * len(record.styles) if record.keep is None else record.keep.tolist()


def _same_size_groups(batch: list[FrameRecord]) -> list[list[FrameRecord]]:
    """Records grouped by frame size (a video has one size; the groups keep frames stackable regardless)."""
    groups: dict[tuple[int, int], list[FrameRecord]] = {}
    for record in batch:
        groups.setdefault(record.size, []).append(record)
    return list(groups.values())
