"""SegmentStage: one batched predict per batch, detections below the threshold dropped, timings recorded."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from pipeline.errors import PipelineConfigError
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


def test_segments_only_every_nth_frame(model, monkeypatch):
    """segment_every=3: frames 0 and 3 of 0-5 go through the model, in one call, as they would alone; the others
    are marked for the tracker to fill (pipeline/track.py) and cost the segmenter nothing."""
    batch = records([(64, 80)] * 6)
    calls, predict = [], model.predict
    monkeypatch.setattr(model, "predict", lambda frames, **kw: calls.append(len(frames)) or predict(frames, **kw))
    out = SegmentStage(model, 0.0, every=3)(batch)
    assert calls == [2]
    assert [r.propagated for r in out] == [False, True, True, False, True, True]
    assert [r.instances is None for r in out] == [r.propagated for r in out]
    alone = SegmentStage(model, 0.0)([records([(64, 80)] * 6)[i] for i in (0, 3)])
    for record, want in zip((out[0], out[3]), alone):
        torch.testing.assert_close(record.instances.boxes, want.instances.boxes)
    assert all(("segment" in r.timings) != r.propagated for r in out)


@pytest.mark.parametrize("every", [0, 1.5, True, "2"])
def test_bad_interval(model, every):
    with pytest.raises(PipelineConfigError, match="segment_every"):
        SegmentStage(model, 0.5, every)
