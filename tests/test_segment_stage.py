"""SegmentStage: one batched predict per batch, detections below the threshold dropped, timings recorded."""
from __future__ import annotations

import functools
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.segment_stage import FLAT, SCENE_CUT, SegmentStage, _spread
from pipeline.track import Tracker
from segment.checkpoint import load_checkpoint
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from tests.conftest import _photo
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
    """Frames of a smooth scene drifting 2 px a frame; at each index in `cuts` a new shot starts (another scene, its
    stripes diagonal, then the first again, shaded differently). Not the first scene upside down: its upright stripes
    stay as they were, and the flat ones come back at a shift, in reach of a pan: half the same picture."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w + 2 * count, dtype=torch.float32),
                            indexing="ij")
    scenes = [torch.stack([128 + 100 * torch.sin(xs / 9), 128 + 100 * torch.cos(ys / 7), xs % 200]),
              torch.stack([128 + 100 * torch.sin((xs + ys) / 6), 128 + 100 * torch.cos((xs - ys) / 10),
                           255 - xs % 200])]
    images, shot = [], 0
    for i in range(count):
        shot += i in cuts
        view = scenes[shot % 2][:, :, 2 * i:2 * i + w]
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
    assert [r.cut for r in stage(shots([], 3, size=(72, 56)))] == [True, False, False]


def test_scene_cut_zero_cuts_at_every_change_and_nowhere_else(model):
    """scene_cut=0: the stream's first frame has no shot before it, and a frame the same as the one before has not
    changed; both were cuts (1 - the correlation of a thumbnail with itself is about 1e-7 in float32: retina's
    +1.2e-7 on a 2-core x86 CPU, which CHANGE_NOISE absorbs)."""
    still = as_records([shots([], 1)[0].image] * 6)
    assert not any(record.cut for record in SegmentStage(model, 0.3, scene_cut=0.0)(still))
    retina = as_records([photo("retina", (144, 256))] * 4)
    assert not any(record.cut for record in SegmentStage(NoDetections(), 0.3, scene_cut=0.0)(retina))
    drifting = SegmentStage(model, 0.3, scene_cut=0.0)(shots([], 6))
    assert [record.cut for record in drifting] == [False] + [True] * 5


class OneObject:
    """A segmenter that finds one square, the middle quarter of every frame, with its RoIMasks."""

    def predict(self, frames, full_masks=True):
        found = []
        for frame in frames:
            h, w = frame.shape[-2:]
            boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])
            found.append(Instances(image_size=(h, w), boxes=boxes, scores=torch.tensor([0.9]), labels=torch.tensor([1]),
                                   masks=RoIMasks.from_probs(torch.ones(1, 28, 28), boxes, (h, w))))
        return found


@pytest.mark.parametrize("scene_cut", [SCENE_CUT, None])
def test_a_new_frame_size_is_a_cut_whatever_scene_cut_says(scene_cut):
    """segment_every=4, frames 0-2 at 64x80, 3-7 at 72x56. Frame 3 starts a new shot at either setting (scene_cut null
    turns off the cuts for the picture only): segmented, marked cut, its object on a track of its own. With null it
    was moved on from frame 2, where no track has its size: the tracker showed nothing until frame 4."""
    stage, tracker = SegmentStage(OneObject(), 0.5, every=4, scene_cut=scene_cut), Tracker()
    frames = shots([], 3) + shots([], 8, size=(72, 56))[3:]
    out = [record for start in (0, 4) for record in tracker(stage(frames[start:start + 4]))]
    assert [(r.propagated, r.cut) for r in out] == [
        (False, False), (True, False), (True, False), (False, True), (False, False), (True, False), (True, False),
        (True, False)]
    assert [r.track_ids.tolist() for r in out] == [[1]] * 3 + [[2]] * 5


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


class NoDetections:
    """A segmenter that finds nothing, at no cost: for the tests of the cut detection alone."""

    def predict(self, frames, full_masks=True):
        return [Instances.empty(tuple(frame.shape[-2:]), with_masks=False) for frame in frames]


@functools.cache
def photo(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """skimage.data's photo `name` (uint8 3xHxW, longer side <= 512), stretched to `size` if given: a frame."""
    image = _photo(name, 512)
    if size is None:
        return image
    return F.interpolate(image[None].float(), size=size, mode="area")[0].round().to(torch.uint8)


def through_stage(frames: list[torch.Tensor], every: int = 1) -> list[FrameRecord]:
    """The frames through a SegmentStage at the default scene_cut, in batches of 4."""
    stage, records = SegmentStage(NoDetections(), 0.5, every), as_records(frames)
    return [record for start in range(0, len(records), 4) for record in stage(records[start:start + 4])]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "rocket", "camera", "brick"])
def test_a_pan_is_no_cut(name):
    """The camera pans across a photo (frames half its size along the pan) by 2% to 15% of the frame a frame, across,
    down and diagonally: no cut, as the thumbnail is matched at shifts of up to a sixth of the frame. Before, brick
    panned across by 8% a frame changed by 1.04, diagonally by 8% or 4% by 0.84 or 0.73: sampled every 4th pixel with
    no filter in between, its fine texture aliased into a pattern that each step of the pan reshuffled."""
    image = photo(name)
    for fraction, (down, across) in itertools.product((0.02, 0.04, 0.08, 0.125, 0.15), ((0, 1), (1, 0), (1, 1))):
        h, w = image.shape[-2] // (1 + down), image.shape[-1] // (1 + across)
        dy, dx = round(h * fraction) * down, round(w * fraction) * across
        frames = [image[:, dy * i:dy * i + h, dx * i:dx * i + w] for i in range(min(9, 1 + int(0.5 / fraction)))]
        assert not any(record.cut for record in through_stage(frames)), (fraction, down, across)


PHOTOS = ("astronaut", "camera", "clock", "coffee", "coins", "colorwheel", "immunohistochemistry", "page", "retina",
          "rocket")


def test_a_cut_between_two_unrelated_photos_is_a_cut():
    """Every ordered pair of 10 unrelated photos, each a shot of two 144x256 frames: the second shot's first frame
    is a cut, at the default scene_cut (changes of 0.72 and up). The 8x8 grey-level thumbnail before missed 22 of the
    90 (changes of 0.20 to 0.50: page -> camera 0.20, retina -> rocket 0.25, clock -> astronaut 0.35, astronaut ->
    coffee 0.42): its best of 9 shifts of 36 cells often correlated by chance."""
    missed = []
    for first, second in itertools.permutations(PHOTOS, 2):
        out = through_stage([photo(first, (144, 256))] * 2 + [photo(second, (144, 256))] * 2)
        if [record.index for record in out if record.cut] != [2]:
            missed.append((first, second))
    assert not missed


def plain_sky_and_a_figure() -> torch.Tensor:
    """A 144x256 frame of plain sky, a dark figure (a disc) filling its lower right corner."""
    ys, xs = torch.meshgrid(torch.arange(144), torch.arange(256), indexing="ij")
    sky = torch.tensor([90, 140, 200], dtype=torch.uint8)[:, None, None].repeat(1, 144, 256)
    sky[:, (xs - 235) ** 2 + (ys - 117) ** 2 <= 53 ** 2] = 20
    return sky


@pytest.mark.parametrize("every", [1, 3])
def test_a_plain_patch_in_the_shot_before_hides_no_cut(every):
    """Plain sky with a figure in a corner, then coffee; the Hubble deep field (black, a few faint galaxies), then
    astronaut: the second shot's first frame is a cut, and is segmented. Before, one near-uniform window of the frame
    before, of the 9 it was compared with, made the frame's change 0: no cut, and segmenting every third frame, the
    first shot's objects were moved onto the second. A frame that is near uniform as a whole still starts no shot
    (test_a_change_of_light_is_no_cut, test_a_cut_through_black_is_a_cut)."""
    for first, second in ((plain_sky_and_a_figure(), photo("coffee", (144, 256))),
                          (photo("hubble_deep_field", (144, 256)), photo("astronaut", (144, 256)))):
        out = through_stage([first] * 4 + [second] * 4, every)
        assert [record.index for record in out if record.cut] == [4]
        assert not out[4].propagated


@pytest.mark.parametrize("name", ["coffee", "camera"])
def test_light_noise_and_a_second_camera_are_no_cut(name):
    """Within one shot of a photo: a white frame, a fade to black and back, noise of sigma 20 on every frame, the
    scene darkened to 8% under noise of sigma 6, and a second camera 4% to the side and 20 levels brighter (the same
    objects: their tracks may go on): no cut."""
    image = photo(name, (144, 256)).float()
    g = torch.Generator().manual_seed(0)

    def noisy(picture: torch.Tensor, sigma: float) -> torch.Tensor:
        return picture + sigma * torch.randn(picture.shape, generator=g)

    moved = torch.cat([image[:, :, 10:], image[:, :, -10:]], -1) + 20
    frames = [image, image, torch.full_like(image, 255), image, *(image * k for k in (0.5, 0.1, 0, 0.1, 0.5, 1)),
              *(noisy(image, 20) for _ in range(4)), *(noisy(image * 0.08, 6) for _ in range(4)), moved, moved]
    assert not any(record.cut for record in through_stage([f.clamp(0, 255).round().to(torch.uint8) for f in frames]))


@pytest.mark.parametrize("sigma", [4, 16, 24])
def test_dark_noisy_frames_in_a_shot_are_no_cut(sigma):
    """Two frames of a camera's noise in the dark (level 10, noise of sigma 4 to 24 per pixel and channel) within a
    shot: averaged over a thumbnail's cells the noise spreads 0.8 to 3.3 levels, less than FLAT, so they are near
    uniform, start no shot and are no reference (the frame after them is compared with the last that had a picture).
    With FLAT at 0.5, or as a variance (no root: 5.6 and 10.7 at sigma 16 and 24), they were pictures unrelated to
    the shot: cuts on both sides."""
    g = torch.Generator().manual_seed(0)
    image = photo("coffee", (144, 256))
    dark = (10 + sigma * torch.randn((3, 144, 256), generator=g)).clamp(0, 255).round().to(torch.uint8)
    assert not any(record.cut for record in through_stage([image, image, dark, dark, image, image]))


def test_a_thumbnails_spread_is_the_standard_deviation_of_its_cells():
    """FLAT is in grey levels, a standard deviation of the cells (colour counted in): the root of the mean squared
    distance of each cell's (grey, blue - grey, red - grey) from their mean. Four cells of grey 0, 0, 6, 6 and red -
    grey 8, 8, 0, 0: 3 and 4 levels, 5 together."""
    cells = np.array([[0.0, 0, 6, 6], [0, 0, 0, 0], [8, 8, 0, 0]])
    want = np.sqrt(((cells - cells.mean(1, keepdims=True)) ** 2).sum(0).mean())
    assert want == 5.0
    assert float(_spread(torch.from_numpy(cells).var(-1, unbiased=False))) == pytest.approx(want)


def documented_changes(images: list[torch.Tensor]) -> list[float]:
    """The cut measure as segment_stage.py documents it, window by window in float64 (frames a multiple of 48 px, so
    that a half-cell is a block of whole pixels): each region (the centre's 15x15 cells, its quarters) correlated, on
    its edges, with the same cells of every window of the frame before at half-cell offsets (17x17), where both have a
    picture (their cells spread FLAT or more); the change the lesser of the whole's and the quarters' median, over the
    quarters that found a match; 0 for the first frame and a frame whose centre has no match at all; a near-uniform
    frame is no reference."""
    def features(image: torch.Tensor) -> np.ndarray:  # (9, 45, 45): cells at every half-cell, their x and y edges
        rgb = image.double().numpy().reshape(3, 48, image.shape[1] // 48, 48, image.shape[2] // 48).mean((2, 4))
        grey = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        half = np.stack([grey, rgb[2] - grey, rgb[0] - grey])
        cells = (half[:, :-1, :-1] + half[:, 1:, :-1] + half[:, :-1, 1:] + half[:, 1:, 1:]) / 4
        return np.concatenate([cells[:, :-2, :-2], cells[:, :-2, 2:] - cells[:, :-2, :-2],
                               cells[:, 2:, :-2] - cells[:, :-2, :-2]])

    def picture(cells: np.ndarray) -> bool:
        return np.sqrt(cells[:3].var(1).sum()) >= FLAT

    halves = (slice(0, 8), slice(8, 15))
    regions = [(slice(0, 15), slice(0, 15)), *itertools.product(halves, halves)]
    changes, base = [], None
    for image in images:
        now = features(image)
        before = now if base is None else base
        bests = []
        for rows, columns in regions:
            centre = now[:, 8::2, 8::2][:, :15, :15][:, rows, columns].reshape(9, -1)
            best = np.nan
            for dy, dx in itertools.product(range(17), repeat=2):
                window = before[:, dy::2, dx::2][:, :15, :15][:, rows, columns].reshape(9, -1)
                if picture(centre) and picture(window):
                    a, b = (edges - edges.mean(1, keepdims=True) for edges in (centre[3:], window[3:]))
                    best = np.nanmax([best, (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())])
            bests.append(best)
        quarters = [1 - best for best in bests[1:] if not np.isnan(best)]
        unmatched = base is None or np.isnan(bests[0])
        changes.append(0.0 if unmatched else min(1 - bests[0], np.median(quarters) if quarters else 2.0))
        base = now if picture(now[:, 8::2, 8::2][:, :15, :15].reshape(9, -1)) else base
    return changes


def test_the_change_is_the_documented_measure_where_quarters_have_no_picture():
    """Plain sky over the top half (two quarters with no picture), a flickering screen bottom left, a still wall
    bottom right: the stage's changes are those of the measure computed window by window. A quarter with no picture
    says nothing; counted as unmatched it moved the quarters' median up (frames 2-4: 0.59-0.67 for 0.56-0.62)."""
    g = torch.Generator().manual_seed(1)
    wall = photo("brick", (48, 96))

    def frame() -> torch.Tensor:
        image = torch.tensor([90, 140, 200], dtype=torch.uint8)[:, None, None].repeat(1, 96, 192)
        screen = (torch.rand(1, 1, 6, 12, generator=g) * 255).round().to(torch.uint8)
        image[:, 48:, :96] = F.interpolate(screen, size=(48, 96), mode="nearest")[0]
        image[:, 48:, 96:] = wall
        return image

    frames = [frame() for _ in range(6)]
    got = SegmentStage(NoDetections(), 0.5)._changes(as_records(frames))
    np.testing.assert_allclose(got.numpy(), documented_changes(frames), atol=1e-4)


def test_objects_moving_in_a_shot_are_no_cut():
    """The demo clip's scene (scripts/make_demo_clip.py: textured objects crossing, turning and growing over a
    panning photo), at twice the demo's speed: no cut."""
    from scripts.make_demo_clip import demo_frames

    frames = [torch.from_numpy(frame).permute(2, 0, 1).contiguous() for frame in demo_frames(48, 256, 256)]
    assert not any(record.cut for record in through_stage(frames))


@pytest.mark.parametrize("side", [256, 128])
def test_large_objects_moving_fast_in_a_shot_are_no_cut(side):
    """The demo scene at four times its speed: its large textured objects cross, turn and grow so fast that the
    centre of the thumbnail as a whole no longer matches the frame before (changes up to 0.63), but the quarters they
    leave mostly do (their median: up to 0.44). Measured on the centre alone, up to 4 of the 23 frames were cuts:
    every object took a new track, and a new style, in the middle of the shot."""
    from scripts.make_demo_clip import demo_frames

    frames = [torch.from_numpy(frame).permute(2, 0, 1).contiguous() for frame in demo_frames(24, side, side)]
    assert [record.index for record in through_stage(frames) if record.cut] == []


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
