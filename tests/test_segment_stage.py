"""SegmentStage: one batched predict per batch, detections below the threshold dropped, timings recorded."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.segment_stage import SCENE_CUT, SegmentStage
from segment.checkpoint import load_checkpoint
from tests.helpers_cuda import gpu_waits
from tests.tiny_models import tiny_segmenter


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_checkpoint(tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny.pt")).eval()


def as_records(images: list[torch.Tensor]) -> list[FrameRecord]:
    """uint8 3xHxW images as a stream's frames 0, 1, ... at 24 fps."""
    return [FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image) for i, image in enumerate(images)]


def records(sizes: list[tuple[int, int]]) -> list[FrameRecord]:
    g = torch.Generator().manual_seed(0)
    return as_records([torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes])


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
    out = SegmentStage(model, 0.0, every=3, scene_cut=None)(batch)  # the frames are noise: each would be a new shot
    assert calls == [2]
    assert [r.propagated for r in out] == [False, True, True, False, True, True]
    assert [r.instances is None for r in out] == [r.propagated for r in out]
    alone = SegmentStage(model, 0.0)([records([(64, 80)] * 6)[i] for i in (0, 3)])
    for record, want in zip((out[0], out[3]), alone):
        torch.testing.assert_close(record.instances.boxes, want.instances.boxes)
    assert all(("segment" in r.timings) != r.propagated for r in out)


@pytest.mark.parametrize("every", [0, 1.5, True, "2"])
def test_bad_interval(model, every):
    with pytest.raises(SettingError, match="segment_every"):
        SegmentStage(model, 0.5, every)
    for bad in (-1, 2.5, True, "0.3"):
        with pytest.raises(SettingError, match=r"scene_cut must be null or a number in \[0, 2\]"):
            SegmentStage(model, 0.5, 2, bad)


def shots(cuts: list[int], count: int, size=(64, 80)) -> list[FrameRecord]:
    """Frames of a smooth scene drifting 2 px a frame; at each index in `cuts` a new shot starts (the scene upside
    down, then upright again and shaded differently)."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w + 2 * count, dtype=torch.float32),
                            indexing="ij")
    scene = torch.stack([128 + 100 * torch.sin(xs / 9), 128 + 100 * torch.cos(ys / 7), xs % 200])
    images, shot = [], 0
    for i in range(count):
        shot += i in cuts
        view = scene[:, :, 2 * i:2 * i + w]
        view = view.flip(-2) if shot % 2 else view
        images.append((view * (1 - 0.3 * (shot % 3 == 2))).clamp(0, 255).to(torch.uint8))
    return as_records(images)


@pytest.mark.parametrize("scene_cut", [SCENE_CUT, None])
def test_a_new_shot_is_segmented_between_the_nth_frames(model, monkeypatch, scene_cut):
    """segment_every=3 over shots starting at frames 5 and 8 (8 begins the third batch of 4, so it is compared with
    the batch before's last frame): those frames are segmented too, unless scene_cut is null. Drifting within a
    shot is no cut; neither is the first frame. A change of frame size is one."""
    calls, predict = [], model.predict
    monkeypatch.setattr(model, "predict", lambda frames, **kw: calls.append(len(frames)) or predict(frames, **kw))
    stage, frames = SegmentStage(model, 0.0, every=3, scene_cut=scene_cut), shots([5, 8], 12)
    out = [record for start in range(0, 12, 4) for record in stage(frames[start:start + 4])]
    segmented = [i for i, record in enumerate(out) if not record.propagated]
    assert segmented == ([0, 3, 5, 6, 8, 9] if scene_cut is not None else [0, 3, 6, 9])
    assert [i for i, record in enumerate(out) if record.cut] == ([5, 8] if scene_cut is not None else [])
    assert calls == ([2, 2, 2] if scene_cut is not None else [2, 1, 1])
    resized = SegmentStage(model, 0.0, every=3)
    resized(shots([], 4))
    # frames 4-7 at another size: 4 starts a new shot (the tracker starts over too), 6 is on the grid
    assert [(r.propagated, r.cut) for r in resized(shots([], 8, size=(72, 56))[4:])] == [
        (False, True), (True, False), (False, False), (True, False)]


@pytest.mark.parametrize("scene_cut", [SCENE_CUT, None])
def test_segmenting_every_frame_marks_the_cuts_for_the_tracker(model, monkeypatch, scene_cut):
    """segment_every=1: every frame goes through the model as without scene_cut, and the frames that start a shot
    (5 and 8, and the first of a new size) are marked `cut`, the tracker's cue to end its tracks; their changes come
    to the host with the batch's detection counts, in one copy."""
    calls, predict = [], model.predict
    monkeypatch.setattr(model, "predict", lambda frames, **kw: calls.append(len(frames)) or predict(frames, **kw))
    stage, frames = SegmentStage(model, 0.3, scene_cut=scene_cut), shots([5, 8], 12)
    out = [record for start in range(0, 12, 4) for record in stage(frames[start:start + 4])]
    assert calls == [4, 4, 4] and not any(record.propagated for record in out)
    assert [i for i, record in enumerate(out) if record.cut] == ([5, 8] if scene_cut is not None else [])
    plain = [record for start in range(0, 12, 4) for record in SegmentStage(model, 0.3, scene_cut=None)(
        shots([5, 8], 12)[start:start + 4])]
    for record, want in zip(out, plain):
        torch.testing.assert_close(record.instances.boxes, want.instances.boxes, rtol=0, atol=0)
    assert [r.cut for r in stage(shots([], 3, size=(72, 56)))] == [scene_cut is not None, False, False]


def test_scene_cut_zero_cuts_at_every_change_and_nowhere_else(model):
    """scene_cut=0: the stream's first frame has no shot before it, and a frame the same as the one before has not
    changed; both were cuts (1 - the correlation of a thumbnail with itself is about 1e-7 in float32)."""
    still = as_records([shots([], 1)[0].image] * 6)
    assert not any(record.cut for record in SegmentStage(model, 0.3, scene_cut=0.0)(still))
    drifting = SegmentStage(model, 0.3, scene_cut=0.0)(shots([], 6))
    assert [record.cut for record in drifting] == [False] + [True] * 5


@pytest.mark.parametrize("every", [1, 3])
def test_a_change_of_light_is_no_cut(model, every):
    """Within one shot: a flash (frame 3 brightened by 80 levels), the light scaled by 0.5 from frame 6 on, a black
    frame (9) and the frame after it: no cut, so no track ends and, skipping frames, no extra segmentation. The
    measure before, the thumbnails' mean |change| above 20, made a cut of each of frames 3, 4, 6, 9 and 10."""
    frames = shots([], 12)
    for i, record in enumerate(frames):
        light = record.image.float() * (0.5 if i >= 6 else 1.0) + (80 if i == 3 else 0)
        record.image = torch.zeros_like(record.image) if i == 9 else light.clamp(0, 255).to(torch.uint8)
    stage = SegmentStage(model, 0.3, every)
    out = [record for start in range(0, 12, 4) for record in stage(frames[start:start + 4])]
    assert not any(record.cut for record in out)
    assert [i for i, record in enumerate(out) if not record.propagated] == list(range(0, 12, every))


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_a_fast_pan_is_no_cut(model, real_photos, name):
    """The camera pans across a photo by an eighth of the frame's width a frame: no cut, as the thumbnail is matched
    at shifts of up to a cell (change 0.0). Compared without the shifts, these pans changed by up to 0.59 and 0.68:
    cuts, which would have restyled every object of a tracking shot."""
    photo = real_photos[name]
    width, step = photo.shape[-1] // 2, photo.shape[-1] // 16
    frames = as_records([photo[:, :, step * i:step * i + width] for i in range(9)])
    assert not any(record.cut for record in SegmentStage(model, 0.3)(frames))


def test_a_cut_through_black_is_a_cut(model, real_photos):
    """One shot fades to black for three frames, another comes up: the first frame of the second shot is compared
    with the last frame that had a picture, so it is a cut (compared with the black frame before it, it was none)."""
    first, second = real_photos["astronaut"], real_photos["chelsea"]
    views = [first[:, 40:168, 8 * i:8 * i + 128] for i in range(3)] + [torch.zeros(3, 128, 128, dtype=torch.uint8)] * 3
    views += [second[:, 20:148, 8 * i:8 * i + 128] for i in range(3)]
    frames = as_records(views)
    assert [record.index for record in SegmentStage(model, 0.3)(frames) if record.cut] == [6]


def test_finding_cuts_costs_a_gpu_no_wait_when_every_frame_is_segmented(tmp_path, device):
    """On the device under test: segmenting every frame, the batch's cuts come to the host in the detection counts'
    copy, so the stage waits as often with scene_cut as without; skipping frames, once more per batch (what to
    segment depends on the cuts). The cut falls on frame 6, which N=3 segments anyway, so both settings segment the
    same frames. Shapes are warmed up first: CUDA graphs capture on a shape's second call."""
    model = load_checkpoint(tiny_segmenter(tmp_path / "tiny.pt")).eval().to(device)

    def run(every: int, scene_cut: float | None) -> tuple[list[FrameRecord], int | None]:
        stage, frames = SegmentStage(model, 0.3, every, scene_cut), shots([6], 8)
        for record in frames:
            record.image = record.image.to(device)
        return gpu_waits(device, lambda: [r for start in (0, 4) for r in stage(frames[start:start + 4])])

    settings = [(1, SCENE_CUT), (1, None), (3, SCENE_CUT), (3, None)]
    for setting in settings * 2:
        run(*setting)
    (cut_1, waits_1), (_, plain_1), (cut_3, waits_3), (_, plain_3) = [run(*setting) for setting in settings]
    assert [r.index for r in cut_1 if r.cut] == [r.index for r in cut_3 if r.cut] == [6]
    if device.type == "cuda":
        assert waits_1 == plain_1 and waits_3 == plain_3 + 2, (waits_1, plain_1, waits_3, plain_3)
