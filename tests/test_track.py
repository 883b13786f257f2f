"""Tracker: ids stay with moving objects (crossings, short misses), end after long misses, respect classes;
the Hungarian matching equals brute force; mask IoU equals pycocotools'."""
from __future__ import annotations

import inspect
import itertools
from fractions import Fraction

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from scipy import ndimage
from torchvision.ops import box_iou
from omegaconf import OmegaConf

from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.track import MATCH_ON, Tracker, mask_iou, match, shrink_masks, translated
from scripts.profiling import operators
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from tests.helpers_cuda import gpu_waits

SIZE = (64, 96)
HD = (1080, 1920)  # at the default mask_size (64) a shrunk mask's cell is 30 px square


def disc_instances(objects: list[tuple[float, float, float, int, float]], size=SIZE) -> Instances:
    """objects: (cx, cy, radius, label, score) → Instances with disc masks and their tight boxes."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    if not objects:
        return Instances.empty(size)
    masks = torch.stack([((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).float() for cx, cy, r, _, _ in objects])
    boxes = torch.tensor([[cx - r, cy - r, cx + r, cy + r] for cx, cy, r, _, _ in objects])
    return Instances(image_size=size, boxes=boxes, scores=torch.tensor([o[4] for o in objects]),
                     labels=torch.tensor([o[3] for o in objects]), masks=masks)


def run(tracker: Tracker, frames: list[list[tuple]]) -> list[list[int]]:
    return [tracker.update(disc_instances(objects), SIZE).tolist() for objects in frames]


def brute_force_best(weights: np.ndarray) -> float:
    """Largest summed weight of any partial one-to-one matching (pairs of weight 0 are as good as none)."""
    d, t = weights.shape
    best = 0.0
    for k in range(min(d, t) + 1):
        for rows in itertools.combinations(range(d), k):
            for cols in itertools.permutations(range(t), k):
                best = max(best, float(sum(weights[r, c] for r, c in zip(rows, cols))))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_match_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    d, t = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    iou = torch.tensor(rng.random((d, t)) * (rng.random((d, t)) < 0.7))
    min_iou = float(rng.choice([0.0, 0.3, 0.5]))
    pairs = match(iou, min_iou)
    assert len({r for r, _ in pairs}) == len(pairs) == len({c for _, c in pairs})
    assert all(iou[r, c] >= min_iou and iou[r, c] > 0 for r, c in pairs)
    valid = iou.numpy() * (iou.numpy() >= min_iou)
    assert sum(float(iou[r, c]) for r, c in pairs) == pytest.approx(brute_force_best(valid))


def test_mask_iou_equals_pycocotools():
    rng = np.random.default_rng(0)
    a = rng.random((3, 20, 30)) < 0.4
    b = rng.random((4, 20, 30)) < 0.6
    b[0] = a[1]
    b[3] = False  # an empty mask: IoU 0, not NaN
    encode = lambda m: mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))  # noqa: E731
    expected = mask_utils.iou(encode(a), encode(b), [0] * len(b))
    got = mask_iou(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert got[1, 0] == 1.0


def test_translated_masks_equal_scipy_shift():
    # scipy's linear interpolation with zeros beyond the edge (grid-constant): the oracle for whole, fractional,
    # negative and off-the-mask shifts, on a non-square mask so that x and y cannot be swapped unnoticed
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((6, 12, 20)) < 0.5).float()
    offsets = torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.3, -1.7], [-2.5, 0.5], [7.2, 3.9], [25.0, 0.0]])
    got = translated(masks, offsets)
    for mask, (dx, dy), moved in zip(masks, offsets.tolist(), got):
        want = ndimage.shift(mask.double().numpy(), (dy, dx), order=1, mode="grid-constant")
        np.testing.assert_allclose(moved.numpy(), want, atol=1e-5)
    moved = got >= 0.5  # as the tracker reads them: a whole shift moves each pixel
    assert torch.equal(moved[0, :, 1:], masks[0, :, :-1].bool()) and not moved[0, :, 0].any()
    assert torch.equal(moved[1, :-2], masks[1, 2:].bool()) and not moved[1, -2:].any()
    assert not moved[5].any()


@pytest.mark.parametrize("match_on", ["mask", "box"])
def test_crossing_objects_keep_their_ids(match_on):
    # Two same-class discs cross each other (partly overlapping at the crossing) in opposite directions.
    tracker = Tracker(match_on=match_on, min_iou=0.2, motion=True)
    frames = [[(10 + 5 * i, 30, 8, 1, 0.9), (86 - 5 * i, 36, 8, 1, 0.9)] for i in range(16)]
    ids = run(tracker, frames)
    assert ids[0] == [1, 2]
    assert all(frame == [1, 2] for frame in ids), ids
    assert tracker.summary() == {"tracks": 2, "active": 2, "mean_length": 16.0, "longest": 16, "cuts": 0}


def test_motion_term_follows_fast_objects():
    # After a slow first step (4 px) the object speeds up to 7 px per frame with a 5 px radius:
    # consecutive discs barely overlap (IoU 0.1), the predicted ones do.
    xs = [8, 12] + [12 + 7 * i for i in range(1, 10)]
    frames = [[(x, 32, 5, 1, 0.9)] for x in xs]
    assert run(Tracker(min_iou=0.3, motion=True), frames) == [[1]] * len(xs)
    without = run(Tracker(min_iou=0.3, motion=False), frames)
    assert len({i for frame in without for i in frame}) > 5


def ring_instances(objects: list[tuple[float, float, float, int, float]]) -> Instances:
    """objects: (cx, cy, radius, label, score) → Instances with 3-px-wide ring masks and their boxes."""
    inner = disc_instances([(cx, cy, r - 3, label, score) for cx, cy, r, label, score in objects])
    outer = disc_instances(objects)
    return Instances(image_size=SIZE, boxes=outer.boxes, scores=outer.scores, labels=outer.labels,
                     masks=outer.masks * (1 - inner.masks))


@pytest.mark.parametrize("motion", [True, False])
def test_a_young_track_keeps_a_thin_object_that_moved_off_its_mask(motion):
    """A ring (radius 15, 3 px wide) moves 9 px a frame. After one frame its mask overlaps its track's mask little
    (mask IoU < 0.3), but its box still overlaps (IoU 0.54): a track with one hit has no motion estimate to move its
    mask by, so the two are matched on boxes, and from the next frame on the motion term takes over. A track that
    already has a motion estimate is not matched on boxes: a ring that then jumps back gets a new id, and so does,
    without the motion term, the ring once its track has two hits. A weak detection is not matched on boxes."""
    tracker = Tracker(min_iou=0.3, motion=motion)
    rings = [[(20 + 9 * i, 32, 15, 1, 0.9)] for i in range(4)]
    first, second = (ring_instances(frame) for frame in rings[:2])
    assert float(mask_iou(shrink_masks(first.masks, tracker._small_size(SIZE)),
                          shrink_masks(second.masks, tracker._small_size(SIZE)))) < 0.3
    ids = [tracker.update(ring_instances(frame), SIZE).tolist() for frame in rings]
    # without motion every track moves off its mask once it has two hits, and a new young one takes over
    assert ids == ([[1]] * 4 if motion else [[1], [1], [2], [2]])
    if motion:  # back to where it was two frames before, far from where its track's motion predicts it
        assert tracker.update(ring_instances([(20 + 9 * 2, 32, 15, 1, 0.9)]), SIZE).tolist() == [2]
    weak = Tracker(min_iou=0.3, birth_score=0.5)
    weak.update(ring_instances(rings[0]), SIZE)
    assert weak.update(ring_instances([(29, 32, 15, 1, 0.3)]), SIZE).tolist() == [-1]  # a weak one starts nothing


@pytest.mark.parametrize("side", [20, 30, 45])
def test_objects_too_small_for_the_shrunk_grid_keep_their_ids(side):
    """At 1080p a small object's shrunk mask has a cell or two or none, gained and lost as it moves a pixel, so its
    mask IoU with its track was often 0: a new id (and style) every other frame. Matched on boxes, an object moving
    1 px a frame keeps its id over 40 frames, and so do two of them side by side, 4 px apart, moving together."""
    objects = lambda i: [(500 + i, 500, side, 1, 0.9), (504 + side + i, 500, side, 1, 0.9)]  # noqa: E731
    for count in (1, 2):
        tracker = Tracker()
        ids = [tracker.update(square_instances(objects(i)[:count], size=HD), HD).tolist() for i in range(40)]
        assert ids == [list(range(1, count + 1))] * 40


@pytest.mark.parametrize("mask_size, ids", [(64, [1] * 6), (1920, [1, 1, 2, 2, 3, 3])])
def test_mask_size_sets_the_grid_masks_are_compared_on(mask_size, ids):
    """A ring 200 px across and 7 px wide at 1080p moves 14 px a frame (no motion term). On the default grid
    (mask_size 64: 30-px cells) it fills no cell, so it is matched on its box (IoU 0.87); on the frame's own grid
    (mask_size 1920) its masks are compared, and a ring moved twice its width overlaps its last mask too little: a
    new track every other frame (each young track's second frame is its box round)."""
    tracker = Tracker(motion=False, mask_size=mask_size)
    got = [tracker.update(square_instances([(300 + 14 * i, 300, 200, 1, 0.9)], size=HD, grid=RING), HD).tolist()
           for i in range(6)]
    assert got == [[i] for i in ids]


def test_an_object_of_a_few_shrunk_cells_is_matched_on_its_box():
    """At 1080p (30-px cells) a 90 px disc shrinks to 4 cells, a coarse mask (< COARSE_CELLS, 16), whose IoU with
    itself moved 40 px (a cell and a third) is mostly the grid's rounding: its box IoU, 50 / 130 = 0.38, keeps its
    id. Motion off, the track's mask stays 40 px behind, and from frame 2 on the track is not young (no box round):
    with a cut-off of 4 cells those masks were compared, and the disc took a new id."""
    tracker = Tracker(motion=False)
    frames = [square_instances([(300 + 40 * i, 500, 90, 1, 0.9)], size=HD) for i in range(5)]
    cells = frames[0].masks.shrunk(tracker._small_size(HD)).flatten(1).sum(1)
    assert 4 <= int(cells) < 16
    assert float(box_iou(frames[0].boxes, frames[1].boxes)) == pytest.approx(50 / 130)
    assert [tracker.update(found, HD).tolist() for found in frames] == [[1]] * 5


def test_a_coarse_track_mask_is_matched_on_its_box_when_its_detection_is_not_coarse():
    """A 90 px disc at 1080p grows 40 px a frame and moves 20: on frame 2 its detection (170 px) shrinks to 16 cells
    and its track's mask (frame 1's, 130 px) to 8, coarse: the pair is matched on its box (IoU 110·130 / (130² + 170²
    - 110·130) = 0.45), which keeps its id, not on the coarse track mask's IoU."""
    tracker = Tracker(motion=False)
    frames = [square_instances([(300 + 20 * i, 500, 90 + 40 * i, 1, 0.9)], size=HD) for i in range(5)]
    cells = [int(found.masks.shrunk(tracker._small_size(HD)).flatten(1).sum(1)) for found in frames[1:3]]
    assert cells[0] < 16 <= cells[1]
    inter = 110 * 130
    assert float(box_iou(frames[1].boxes, frames[2].boxes)) == pytest.approx(inter / (130 ** 2 + 170 ** 2 - inter))
    assert [tracker.update(found, HD).tolist() for found in frames] == [[1]] * 5


def test_one_frame_miss_is_bridged_and_long_miss_ends_the_track():
    present = [(30, 30, 10, 2, 0.9)]
    frames = [present] * 4 + [[]] + [present] * 3
    ids = run(Tracker(max_misses=1), frames)
    assert [frame for frame in ids if frame] == [[1]] * 7

    frames = [present] * 4 + [[]] * 3 + [present] * 3
    tracker = Tracker(max_misses=2)
    ids = run(tracker, frames)
    assert ids[:4] == [[1]] * 4 and ids[7:] == [[2]] * 3
    assert tracker.summary() == {"tracks": 2, "active": 1, "mean_length": 3.5, "longest": 4, "cuts": 0}


def test_missed_track_is_rematched_at_its_predicted_place():
    # The object moves on while undetected for two frames; it comes back where its velocity says.
    seen = [[(10 + 4 * i, 30, 6, 1, 0.9)] for i in range(9)]
    frames = seen[:4] + [[], []] + seen[6:]
    ids = run(Tracker(max_misses=2, min_iou=0.3), frames)
    assert [frame for frame in ids if frame] == [[1]] * 7
    # Without the motion term the old box no longer overlaps the object 3 frames on (12 px away).
    assert run(Tracker(max_misses=2, min_iou=0.3, motion=False), frames)[6] == [2]


@pytest.mark.parametrize("same_class, expected", [(True, [[1]] * 3 + [[2]] * 3), (False, [[1]] * 6)])
def test_class_change(same_class, expected):
    frames = [[(40, 30, 10, 1, 0.9)]] * 3 + [[(40, 30, 10, 3, 0.9)]] * 3
    assert run(Tracker(same_class=same_class), frames) == expected


def test_birth_threshold():
    frames = [[(20, 20, 8, 1, 0.3)], [(20, 20, 8, 1, 0.9)], [(20, 20, 8, 1, 0.3)]]
    # A weak detection starts no track, but continues one that a confident detection started.
    assert run(Tracker(birth_score=0.5), frames) == [[-1], [1], [1]]


def test_a_pair_at_exactly_min_iou_is_matched_and_a_score_of_exactly_birth_score_starts_a_track():
    """The thresholds are inclusive, as documented (pairs with IoU >= min_iou; score >= birth_score): a box that
    doubles its height keeps half its area in common (200 / 400 px: 0.5 exactly in float32) and, at min_iou 0.5,
    its id; a detection of score 0.5 at birth_score 0.5 is confident."""
    assert match(torch.tensor([[0.5]]), 0.5) == [(0, 0)]
    tracker = Tracker(match_on="box", min_iou=0.5, motion=False)
    boxes = [[10, 10, 30, 20], [10, 10, 30, 30]]
    ids = [tracker.update(Instances(image_size=SIZE, boxes=torch.tensor([box], dtype=torch.float32),
                                    scores=torch.tensor([0.9]), labels=torch.tensor([1]), masks=None), SIZE).tolist()
           for box in boxes]
    assert ids == [[1], [1]]
    assert run(Tracker(birth_score=0.5), [[(30, 30, 8, 1, 0.5)]] * 2) == [[1], [1]]


@pytest.mark.parametrize("match_on", MATCH_ON)
def test_an_empty_box_matches_nothing_and_stops_nothing(match_on):
    """segment.box_min_size=0 keeps boxes clipped to nothing at the frame's edge: two of them had an IoU of 0 / 0,
    NaN, which the Hungarian solver refused ("matrix contains invalid numeric entries"), ending the render."""
    tracker = Tracker(match_on=match_on, motion=False)
    boxes = torch.tensor([[10, 10, 30, 30], [96, 20, 96, 40]], dtype=torch.float32)  # the second at x = 96 = SIZE[1]
    masks = torch.zeros(2, *SIZE)
    masks[0, 10:30, 10:30] = 1
    frame = Instances(image_size=SIZE, boxes=boxes, scores=torch.tensor([0.9, 0.9]), labels=torch.tensor([1, 1]),
                      masks=masks)
    assert [tracker.update(frame, SIZE).tolist() for _ in range(3)] == [[1, 2], [1, 3], [1, 4]]


def test_confident_detection_keeps_its_track_over_a_weak_fragment_that_overlaps_more():
    # Frame 2: the object moved (IoU with its track ~0.5) and a weak fragment sits where it was (IoU 0.81).
    # One Hungarian round over both would hand the track to the fragment and start a new id for the object.
    frames = [[(40, 30, 10, 1, 0.95)], [(46, 30, 10, 1, 0.95), (40, 30, 9, 1, 0.2)], [(50, 30, 10, 1, 0.95)]]
    assert run(Tracker(min_iou=0.3), frames) == [[1], [1, -1], [1]]


def mask_instances(masks: list[torch.Tensor], scores: list[float]) -> Instances:
    """SIZE masks (class 1) with their tight boxes."""
    boxes = []
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return Instances(image_size=SIZE, boxes=torch.tensor(boxes, dtype=torch.float32), scores=torch.tensor(scores),
                     labels=torch.ones(len(masks), dtype=torch.long), masks=torch.stack(masks))


def test_a_weak_fragment_does_not_take_a_young_track_from_its_object():
    """Frame 1: a thin ring found once (its track has no motion estimate) moved 7 px, off its own mask, and a weak
    half-arc of it is left where it was. The arc overlaps the track's mask, the ring only its box: the confident
    ring's box round comes before the weak detections' round, so the ring keeps its id and the arc gets none (it
    took the track, and the ring a new id and style)."""
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(96) + 0.5, indexing="ij")
    ring = lambda cx: ((((xs - cx) ** 2 + (ys - 30) ** 2).sqrt() - 11.25).abs() <= 1.25).float()  # noqa: E731
    tracker = Tracker(min_iou=0.3)
    assert tracker.update(mask_instances([ring(40)], [0.9]), SIZE).tolist() == [1]
    assert tracker.update(mask_instances([ring(47), ring(40) * (xs < 40)], [0.9, 0.2]), SIZE).tolist() == [1, -1]


def test_weak_detection_continues_a_track_the_confident_ones_left_free():
    frames = [[(20, 30, 8, 1, 0.9), (70, 30, 8, 1, 0.9)], [(21, 30, 8, 1, 0.9), (70, 31, 8, 1, 0.2)]]
    assert run(Tracker(), frames) == [[1, 2], [1, 2]]


def test_stage_fills_records_and_timings():
    tracker = Tracker.from_config(OmegaConf.create({"match_on": "box", "max_misses": 3}))
    batch = []
    for i in range(3):
        instances = disc_instances([(20 + 2 * i, 30, 8, 1, 0.9), (70, 30, 8, 2, 0.8)])
        image = torch.zeros(3, *SIZE, dtype=torch.uint8)
        batch.append(FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image, instances=instances))
    out = tracker(batch)
    assert [r.track_ids.tolist() for r in out] == [[1, 2]] * 3
    assert all(r.track_ids.dtype == torch.int64 and r.timings["track"] >= 0 for r in out)


def test_stage_matches_on_the_host_after_one_copy_per_batch(device):
    """On any device the ids are those of the same frames on the CPU, and on the host; on a GPU the stage waits for
    the device once per batch (one copy), not at each read of a frame's matching."""
    frames = [[(20 + 3 * i, 30, 8, 1, 0.9), (70 - 2 * i, 30, 8, 2, 0.8), (45, 50, 6, 1, 0.3)] for i in range(8)]
    want = run(Tracker(), frames)

    batches = [[FrameRecord(index=i, pts=i, time_base=Fraction(1, 24),
                            image=torch.zeros(3, *SIZE, dtype=torch.uint8, device=device),
                            instances=disc_instances(objects).to(device))
                for i, objects in enumerate(frames[start:start + 4], start)] for start in (0, 4)]
    tracker = Tracker()
    records, waits = gpu_waits(device, lambda: [record for batch in batches for record in tracker(batch)])
    assert [r.track_ids.tolist() for r in records] == want
    assert all(r.track_ids.device.type == "cpu" for r in records)
    assert waits is None or 2 <= waits <= 2 * 2  # per batch one copy (+ the timing's synchronize); was ~12 per frame


def test_config_errors_are_one_line():
    with pytest.raises(SettingError, match="match_on"):
        Tracker.from_config({"match_on": "pixels"})
    with pytest.raises(SettingError, match="unknown track setting"):
        Tracker.from_config({"min_iuo": 0.3})


def _another(value):
    """A valid track setting other than `value`, of its type."""
    if isinstance(value, str):
        return "box" if value == "mask" else "mask"
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else value / 2


def test_default_config_sets_every_tracker_setting():
    """conf/track/default.yaml names every Tracker setting, and each reaches the tracker: at its value, and at
    another one (not the constructor's default by chance)."""
    cfg = OmegaConf.load("conf/track/default.yaml")
    assert set(cfg) == set(inspect.signature(Tracker).parameters)
    attribute = {"velocity_momentum": "momentum"}
    for key, value in cfg.items():
        for setting in (value, _another(value)):
            tracker = Tracker.from_config(OmegaConf.merge(cfg, {key: setting}))
            assert getattr(tracker, attribute.get(key, key)) == setting, key


_CELL_RADII = ((torch.arange(28, dtype=torch.float32) - 13.5)[:, None] ** 2
               + (torch.arange(28, dtype=torch.float32) - 13.5)[None, :] ** 2).sqrt()
DISC = (1.6 - _CELL_RADII / 10).clamp(0, 1)  # a mask head's 28x28 probabilities: >= 0.5 within 11 cells
RING = ((_CELL_RADII - 12).abs() <= 0.5).float()  # one cell wide


def square_instances(objects: list[tuple[float, float, float, int, float]], device="cpu", size=SIZE,
                     grid=DISC) -> Instances:
    """objects: (x1, y1, side, label, score) → Instances with RoIMasks masks (`grid`'s probabilities)."""
    boxes = torch.tensor([[x, y, x + side, y + side] for x, y, side, _, _ in objects], dtype=torch.float32)
    boxes = boxes.reshape(-1, 4)
    probs = grid.expand(len(objects), -1, -1)
    return Instances(image_size=size, boxes=boxes, scores=torch.tensor([o[4] for o in objects]),
                     labels=torch.tensor([o[3] for o in objects], dtype=torch.long),
                     masks=RoIMasks.from_probs(probs, boxes, size)).to(device)


def run_every(tracker: Tracker, frames: list[list[tuple]], every: int, device="cpu", cuts=()) -> list[FrameRecord]:
    """The frames as SegmentStage leaves them with segment_every=every (only 0, every, 2·every, ... segmented, and
    the frames in `cuts`, which start a new shot), through the tracker in batches of 4."""
    image = torch.zeros(3, *SIZE, dtype=torch.uint8)
    skipped = [bool(i % every) and i not in cuts for i in range(len(frames))]
    records = [FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image, propagated=skip, cut=i in cuts,
                           instances=None if skip else square_instances(objects, device))
               for i, (objects, skip) in enumerate(zip(frames, skipped))]
    return [record for start in range(0, len(records), 4) for record in tracker(records[start:start + 4])]


def test_skipped_frames_move_the_last_detections_along_their_tracks(device):
    """segment_every=3: A moves 3 px a frame to the right, B stands still. On the frames after the first segmented
    one the tracks have no velocity yet, so A stays where it was found; from the second on, A's boxes and masks on
    the skipped frames are those the segmenter would give at A's true places (the same probabilities over the true
    boxes), with the segmented frame's ids, on the device the detections were on."""
    truth = [[(10 + 3 * i, 20, 30, 1, 0.9), (75, 2, 12, 2, 0.8)] for i in range(9)]
    records = run_every(Tracker(), truth, every=3, device=device)
    assert [r.track_ids.tolist() for r in records] == [[1, 2]] * 9
    assert [r.propagated for r in records] == [False, True, True] * 3
    for i, record in enumerate(records):
        placed = truth[3 * (i // 3)] if i < 3 else truth[i]  # no velocity before the second segmented frame
        want = square_instances(placed)
        assert record.instances.device.type == device.type
        torch.testing.assert_close(record.instances.boxes.cpu(), want.boxes, rtol=0, atol=0)
        torch.testing.assert_close(record.instances.masks.paste().cpu(), want.masks.paste(), rtol=0, atol=1e-6)
        assert torch.equal(record.instances.labels.cpu(), want.labels)
        assert torch.equal(record.instances.scores.cpu(), want.scores)


def test_skipped_frames_show_only_tracked_objects_still_in_the_frame():
    """Not moved onto skipped frames: a weak detection that started no track (C), an object that moves out of the
    frame (A, 4 px a frame: x1 94 on frame 4, 98 > 96 on frame 5), a track not found on the last segmented frame
    (B on frame 3). max_misses counts segmented frames, so B, missed once, keeps its id when found on frame 6."""
    a, b, c = (lambda x: (x, 20, 20, 1, 0.9)), (40, 40, 10, 2, 0.9), (5, 45, 8, 3, 0.2)
    frames = [[a(78), b, c], [], [], [a(90)], [], [], [b], [], []]
    records = run_every(Tracker(match_on="box", min_iou=0.2, max_misses=1), frames, every=3)
    assert [r.track_ids.tolist() for r in records] == [[1, 2, -1], [1, 2], [1, 2], [1], [1], [], [2], [2], [2]]
    assert records[4].instances.boxes.tolist() == [[94, 20, 96, 40]]  # clipped to the image, as a detector's
    assert len(records[5].instances) == 0 and records[5].instances.image_size == SIZE


def test_a_box_that_shrinks_to_nothing_on_skipped_frames_is_not_shown():
    """segment_every=5: the object's left side moves 5 px a frame (hidden behind something), its right side stays
    at 60. Moved on along each side's velocity, the box has no width on frame 8 and is inverted on frame 9
    ([65, 20, 60, 40]): such boxes (an empty mask, and a debug dump's box drawing refused them: "Boxes need to be
    in (xmin, ymin, xmax, ymax) format", which ended the render) are not shown, as an object gone from the frame."""
    records = []
    for i in range(10):
        found = None
        if i % 5 == 0:
            boxes = torch.tensor([[20.0 + 5 * i, 20, 60, 40]])
            found = Instances(image_size=SIZE, boxes=boxes, scores=torch.tensor([0.9]), labels=torch.tensor([1]),
                              masks=RoIMasks.from_probs(torch.ones(1, 28, 28), boxes, SIZE))
        records.append(FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=torch.zeros(3, *SIZE,
                                   dtype=torch.uint8), propagated=i % 5 != 0, instances=found))
    tracker = Tracker(match_on="box")
    records = [record for start in (0, 5) for record in tracker(records[start:start + 5])]
    assert [r.track_ids.tolist() for r in records] == [[1]] * 8 + [[], []]
    assert [r.instances.boxes[:, 0].tolist() for r in records[5:8]] == [[45], [50], [55]]
    assert len(records[8].instances) == len(records[9].instances) == 0


@pytest.mark.parametrize("every", [1, 2])
def test_a_new_shot_ends_every_track(every):
    """A moves 4 px a frame; frame 4 starts a new shot (`FrameRecord.cut`) in which another object of A's class
    stands where A was headed. Without the cut it continues A's track, id and velocity, and the skipped frame after
    it (segment_every=2) shows it moved on by A's 4 px; with the cut it starts a track of its own, without a
    velocity, and stays put. The tracks the cut ended count as finished, and the summary counts the cut."""
    frames = [[(10 + 4 * i, 20, 24, 1, 0.9)] for i in range(4)] + [[(26, 20, 24, 1, 0.9)]] * 4
    for cuts, ids in (((), [1] * 8), ((4,), [1] * 4 + [2] * 4)):
        tracker = Tracker()
        records = run_every(tracker, frames, every, cuts=cuts)
        assert [r.track_ids.tolist() for r in records] == [[i] for i in ids]
        if every == 2:
            assert records[5].instances.boxes[0, 0].item() == (26 if cuts else 30)
        assert tracker.summary()["tracks"] == max(ids) and tracker.summary()["cuts"] == len(cuts)


@pytest.mark.parametrize("momentum, velocity", [(0.0, 8.0), (0.5, 7.0), (0.9, 4.76)])
def test_velocity_momentum_weighs_the_last_estimate(momentum, velocity):
    """segment_every=2: the object steps 4, then 8, then 8 px a frame between its segmented frames (0, 2, 4, 6). The
    first estimate is the observed step (4); each later one is momentum · the last + (1 - momentum) · the observed:
    8 / 7 / 4.76 px a frame at momentum 0 / 0.5 / 0.9, which is what frame 7, skipped, moves it on by."""
    frames = [[(x, 20, 20, 1, 0.9)] for x in (0, 4, 8, 16, 24, 32, 40, 48)]
    records = run_every(Tracker(match_on="box", velocity_momentum=momentum), frames, every=2)
    assert [r.track_ids.tolist() for r in records] == [[1]] * 8
    assert records[7].instances.boxes[0, 0].item() == pytest.approx(40 + velocity, abs=1e-4)


@pytest.mark.parametrize("cuts, summary", [((), {"tracks": 2, "active": 2, "mean_length": 8.0, "longest": 10}),
                                           ((8,), {"tracks": 4, "active": 2, "mean_length": 4.0, "longest": 8})])
def test_track_lengths_count_the_video_frames_a_track_is_shown_on(cuts, summary):
    """segment_every=4 over 10 frames: A is found on every segmented frame (0, 4, 8), so shown on all 10; B is
    missed on frame 4, so not shown on 4-7: 6 frames (not 3 and 2 segmented frames). A cut on frame 8 ends both
    (8 and 4 frames) and starts two tracks of 2 frames."""
    a, b = (20, 20, 20, 1, 0.9), (60, 30, 20, 2, 0.9)
    tracker = Tracker()
    records = run_every(tracker, [[a, b]] * 4 + [[a]] * 4 + [[a, b]] * 2, every=4, cuts=cuts)
    assert [len(r.track_ids) for r in records] == [2] * 4 + [1] * 4 + [2] * 2
    assert tracker.summary() == {**summary, "cuts": len(cuts)}


def test_operators_per_frame_do_not_grow_with_the_detections():
    """A frame's track ids become a tensor at once: written into one an element at a time, they were an operator per
    born or matched detection."""
    def counted(n: int) -> tuple[int, int]:
        tracker = Tracker()
        objects = [(10 + 10 * i, 20, 4, 1, 0.9) for i in range(n)]
        born, matched = (disc_instances([(x + step, y, r, label, score) for x, y, r, label, score in objects])
                         for step in (0, 1))
        counts = operators(lambda: tracker.update(born, SIZE)), operators(lambda: tracker.update(matched, SIZE))
        assert tracker.update(matched, SIZE).tolist() == list(range(1, n + 1))
        return counts

    assert counted(8) == counted(2)
