"""SegmentStage: one batched predict per batch, detections below the threshold dropped, timings recorded."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from pipeline.record import FrameRecord
from pipeline.segment_stage import SegmentStage
from segment.checkpoint import load_checkpoint
from tests.tiny_models import tiny_segmenter


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_checkpoint(tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny.pt")).eval()


def records(sizes: list[tuple[int, int]]) -> list[FrameRecord]:
    g = torch.Generator().manual_seed(0)
    return [FrameRecord(index=i, pts=i, time_base=Fraction(1, 24),
                        image=torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
            for i, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[(64, 80)] * 3, [(64, 80), (72, 56)]])
def test_keeps_the_detections_at_or_above_the_threshold(model, sizes):
    batch = records(sizes)
    everything = model.predict([r.image for r in batch])
    scores = torch.cat([i.scores for i in everything])
    assert all(torch.equal(i.scores, i.scores.sort(descending=True).values) for i in everything)  # the stage relies on it
    assert len(scores) > 2
    threshold = float(scores.median())
    out = SegmentStage(model, threshold)(batch)
    for record, full in zip(out, everything):
        kept = full.scores >= threshold
        assert record.instances.image_size == record.size
        torch.testing.assert_close(record.instances.scores, full.scores[kept])
        torch.testing.assert_close(record.instances.boxes, full.boxes[kept])
        assert record.instances.masks.shape == (int(kept.sum()), *record.size)
        assert record.timings["segment"] > 0
    assert sum(len(r.instances) for r in out) < len(scores)


def test_bad_threshold(model):
    with pytest.raises(ValueError, match="score_threshold"):
        SegmentStage(model, 1.5)
