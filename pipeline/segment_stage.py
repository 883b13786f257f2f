"""Segment stage: one batched `model.predict` per batch of frames, low-score detections dropped; with `every` N > 1
only frames N apart (stream index 0, N, 2N, ...) are segmented, the tracker moving their objects over the others."""
from __future__ import annotations

import torch

from pipeline.errors import PipelineConfigError
from pipeline.record import FrameRecord
from pipeline.stage_timing import timed


class SegmentStage:
    """Fills `record.instances` (on the model's device) with the detections scoring >= `score_threshold`, their masks
    as `RoIMasks` (segment/roi_masks.py): each stage pastes what it reads, nothing holds a full-frame mask."""

    name = "segment"

    def __init__(self, model, score_threshold: float = 0.5, every: int = 1):
        if not 0.0 <= score_threshold <= 1.0:
            raise PipelineConfigError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise PipelineConfigError(f"segment_every must be a whole number >= 1, got {every!r}")
        self.model = model
        self.score_threshold = float(score_threshold)
        self.every = every

    def __call__(self, batch: list[FrameRecord]) -> list[FrameRecord]:
        for record in batch:
            record.propagated = record.index % self.every != 0
        segmented = [record for record in batch if not record.propagated]
        if not segmented:
            return batch
        with timed(segmented, self.name):
            images = [record.image for record in segmented]
            same_size = len({tuple(image.shape) for image in images}) == 1
            results = self.model.predict(torch.stack(images) if same_size else images, full_masks=False)
            # detections come highest score first, so the kept ones are a prefix of each frame's: one host sync
            # for the whole batch's counts, where a boolean index per frame would make the host wait per frame
            counts = torch.stack([(r.scores >= self.score_threshold).sum() for r in results]).tolist()
            for record, instances, count in zip(segmented, results, counts):
                record.instances = instances[:count]
        return batch
