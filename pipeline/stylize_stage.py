"""Stylize stage: every kept instance of a batch in one `stylize_regions` call, and the background style.

All crops of the batch (any frames, any styles) go to the network together: `stylize_regions` buckets them
by size and each crop carries its own style weights, so a batch of four frames with six styled objects
costs a handful of network calls, not twenty-four.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline.assign import is_original
from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord, StylizedRegion
from pipeline.stage_timing import timed
from stylize.apply import stylize_frames, stylize_regions

CPU_CROP_BUCKET, GPU_CROP_BUCKET = 16, 64


class StylizeStage:
    """Sets `record.stylized` (one `StylizedRegion` per kept instance) and `record.background`."""

    name = "stylize"

    def __init__(self, bank, margin: int = 16, background=None, precision: str = "auto", crop_bucket="auto",
                 cuda_graphs: bool = False):
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
        self._weights: dict[str, torch.Tensor] = {}
        if self.background is not None:
            self.weights(self.background)  # a bad spec fails now, not at the first frame

    @classmethod
    def from_config(cls, cfg: DictConfig, bank) -> StylizeStage:
        return cls(bank, margin=int(cfg.get("margin", 16)), background=cfg.get("background"),
                   precision=str(cfg.get("precision", "auto")), crop_bucket=cfg.get("crop_bucket", "auto"),
                   cuda_graphs=cfg.get("cuda_graphs", False))

    def weights(self, spec: str) -> torch.Tensor:
        """(S,) weights of a style spec, parsed once."""
        if spec not in self._weights:
            self._weights[spec] = self.bank.weights_for(spec)
        return self._weights[spec]

    def bucket(self, device: torch.device) -> int:
        """Crop sizes are padded up to multiples of this. On a GPU the stage is bound by host work per network
        call and by cuDNN planning each new shape (measured on an H100, docs/benchmarks.md), so coarse buckets
        pay; on a CPU the padding is compute, so fine ones do."""
        if self.crop_bucket != "auto":
            return self.crop_bucket
        return GPU_CROP_BUCKET if device.type == "cuda" else CPU_CROP_BUCKET

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        if not batch:
            return batch
        with timed(batch, self.name):
            for group in _same_size_groups(batch):
                self._stylize(group)
        return batch

    def _stylize(self, batch: list[FrameRecord]) -> None:
        frames = torch.stack([record.image for record in batch])
        network = self.bank.network
        jobs = [(b, i, style) for b, record in enumerate(batch)
                for i, (style, keep) in enumerate(zip(record.styles, _keep_list(record))) if style is not None and keep]
        for record in batch:
            record.stylized = []
        if jobs:
            device = frames.device
            frame_index = torch.tensor([b for b, _, _ in jobs], dtype=torch.long, device=device)
            boxes = torch.stack([batch[b].instances.boxes[i] for b, i, _ in jobs]).float()
            weights = torch.stack([self.weights(style) for _, _, style in jobs]).to(device)
            crops = stylize_regions(network, frames, frame_index, boxes, weights, margin=self.margin,
                                    precision=self.precision, bucket=self.bucket(device), graphs=self.cuda_graphs)
            for (b, i, style), (box, pixels) in zip(jobs, crops):
                batch[b].stylized.append(StylizedRegion(instance=i, style=style, box=box, pixels=pixels))
        if self.background is None:
            for record in batch:
                record.background = None
        else:
            styled = stylize_frames(network, frames, self.weights(self.background).to(frames.device),
                                    precision=self.precision, graphs=self.cuda_graphs)
            for record, image in zip(batch, styled):
                record.background = image


def _keep_list(record: FrameRecord) -> list[bool]:
    return [True] * len(record.styles) if record.keep is None else record.keep.tolist()


def _same_size_groups(batch: list[FrameRecord]) -> list[list[FrameRecord]]:
    """Records grouped by frame size (a video has one size; the groups keep frames stackable regardless)."""
    groups: dict[tuple[int, int], list[FrameRecord]] = {}
    for record in batch:
        groups.setdefault(record.size, []).append(record)
    return list(groups.values())
