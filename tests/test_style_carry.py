"""style.propagate (pipeline/style_carry.py): on a frame the segmenter skipped, a tracked object carries its
stylized crop from the last segmented frame, moved by the whole pixels its mask moved, with no network call; the
composite then shows a rigidly moving object exactly as on that frame, moved. Objects the carried crop cannot
cover are stylized afresh."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

import pipeline.stylize_stage
from pipeline.assign import StyleAssigner
from pipeline.composite import Compositor
from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.style_carry import StyleCarry
from pipeline.stylize_stage import StylizeStage
from pipeline.track import Tracker
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from stylize.bank import StyleBank
from tests.tiny_models import distinct_styles, tiny_bank

SIZE = (64, 96)
CLASSES = ["__background__", "person", "dog"]
SIDE = 24  # the moving square's side


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return distinct_styles(StyleBank.load(tiny_bank(tmp_path_factory.mktemp("bank") / "tiny.pt",
                                                    names=("candy", "mosaic", "udnie"))))


def style_cfg(**overrides):
    return OmegaConf.create({"assign": "by_class", "palette": ["candy"], "class_styles": {"person": "candy",
                             "dog": "udnie"}, "default_style": "original", "background": "original",
                             "exclude_classes": [], "min_score": 0.5, "min_area": 16, "margin": 8, "bank": None,
                             "precision": "fp32", "crop_bucket": 4, **overrides})


def instances(boxes: list[list[float]], labels: list[int], full_masks: bool = False) -> Instances:
    """Square objects: each box's mask is the whole box (RoIMasks of ones; or the same, pasted)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = RoIMasks.from_probs(torch.ones(len(boxes), 28, 28), boxes, SIZE)
    return Instances(image_size=SIZE, boxes=boxes, scores=torch.full((len(boxes),), 0.9),
                     labels=torch.tensor(labels, dtype=torch.long), masks=masks.paste() if full_masks else masks)


def moving_square(frames: int, device: torch.device, step: int = 3) -> list[FrameRecord]:
    """A textured square moving `step` px a frame to the right over a flat grey frame, segmented on even frames
    (as SegmentStage leaves them with segment_every=2), on `device`."""
    texture = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    records = []
    for i in range(frames):
        x, y = 20 + step * i, 20
        image = torch.full((3, *SIZE), 128, dtype=torch.uint8)
        image[:, y:y + SIDE, x:x + SIDE] = texture
        found = None if i % 2 else instances([[x, y, x + SIDE, y + SIDE]], [1]).to(device)
        records.append(FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image.to(device),
                                   propagated=bool(i % 2), instances=found))
    return records


def render_stages(bank, records: list[FrameRecord], monkeypatch, batch_size: int = 3, **style) -> tuple[list, int]:
    """The records through track → assign → stylize → composite in batches; also how many crops (region=frame:
    whole frames) went through the network."""
    cfg = style_cfg(**style)
    stages = [Tracker(), StyleAssigner.from_config(cfg, bank, CLASSES), StylizeStage.from_config(cfg, bank, 2),
              Compositor(feather_px=2)]
    inputs = []
    for name in ("stylize_regions", "stylize_frames"):
        def counted(network, frames, *args, original=getattr(pipeline.stylize_stage, name), name=name, **kwargs):
            inputs.append(len(args[1]) if name == "stylize_regions" else len(frames))  # boxes, or frames
            return original(network, frames, *args, **kwargs)
        monkeypatch.setattr(pipeline.stylize_stage, name, counted)
    done = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        for stage in stages:
            batch = stage(batch)
        done += batch
    monkeypatch.undo()
    return done, sum(inputs)


@pytest.mark.parametrize("region", ["crop", "frame"])
def test_skipped_frames_carry_the_crop_moved_as_the_mask_moved_and_skip_the_network(bank, device, monkeypatch,
                                                                                    region):
    """Batches of 3: frame 3 carries frame 2's crop from the batch before, frame 5 frame 4's from its own batch.
    Frame 1 comes before the track has a velocity: the object stays put, and so does its crop. From frame 3 on the
    mask moves 3 px a frame, and so do the crop and, on a flat background, the whole composite around the object.
    region=frame carries the crop cut from the segmented frame's whole stylized frame the same way."""
    records, stylized = render_stages(bank, moving_square(8, device), monkeypatch, propagate=True, region=region)
    assert stylized == 4  # frames 0, 2, 4, 6: one crop (or frame) each; the skipped frames none
    fresh, stylized = render_stages(bank, moving_square(8, device), monkeypatch, propagate=False, region=region)
    assert stylized == 8
    for record, restyled in zip(records, fresh):
        region, = record.stylized
        if not record.propagated:  # segmented frames: what the stage gives without style.propagate (whose network
            assert region.box == restyled.stylized[0].box  # calls batch them with the skipped frames' crops)
            torch.testing.assert_close(region.pixels, restyled.stylized[0].pixels, atol=1e-5, rtol=1e-5)
            continue
        before = records[record.index - 1].stylized[0]
        dx = 0 if record.index == 1 else 3
        x1, y1, x2, y2 = before.box
        assert region.box == (x1 + dx, y1, x2 + dx, y2) and region.style == before.style == "candy"
        assert region.carried and not before.carried and not restyled.stylized[0].carried
        assert torch.equal(region.pixels, before.pixels)
        if dx:
            # the object and its mask moved rigidly by 3 px: so did everything the composite made of them
            shown = record.output[:, y1:y2, x1 + dx:x2 + dx]
            assert torch.equal(shown, records[record.index - 1].output[:, y1:y2, x1:x2])
            # restyling it instead re-phases the crop against the net's stride-4 grid: other pixels
            assert not torch.equal(restyled.output[:, y1:y2, x1 + dx:x2 + dx], shown)
        outside = torch.ones(SIZE, dtype=torch.bool, device=device)
        outside[region.box[1]:region.box[3], region.box[0]:region.box[2]] = False
        assert torch.equal(record.output[:, outside], record.image[:, outside])


def widening_box(frames: int, growth: int) -> list[FrameRecord]:
    """A textured box 20 px wide and high about the frame's centre on frame 0, `growth` px wider on each side every
    frame after, segmented on even frames."""
    records = []
    for i in range(frames):
        half = 10 + growth * i
        image = torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        records.append(FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image, propagated=bool(i % 2),
                                   instances=None if i % 2 else instances([[48 - half, 22, 48 + half, 42]], [1])))
    return records


@pytest.mark.parametrize("growth, carried", [(2, True), (6, False)])
def test_an_object_that_grew_past_its_carried_crop_is_stylized_afresh(bank, monkeypatch, growth, carried):
    """Frame 5 (skipped) moves each side of the box along its own velocity: the mask widens with it. Widened 2 px a
    side, it and the feather stay inside frame 4's crop (margin 8), carried; widened 6, they leave it, and the part
    outside was left as the input, behind a hard edge (only a crop cut at the frame's edge was checked)."""
    records, _ = render_stages(bank, widening_box(6, growth), monkeypatch, batch_size=6, propagate=True)
    record = records[5]
    assert record.track_ids.tolist() == [1]
    region, = record.stylized
    assert region.carried == carried
    mask = record.instances.masks.paste()[0] >= 0.5
    x1, y1, x2, y2 = region.box
    outside = mask.clone()
    outside[y1:y2, x1:x2] = False
    assert mask.sum() > 0 and not outside.any()


def plan_for(frames: list[tuple[Instances, list[int], list[str], bool]], crops: list[tuple[int, int, int, int]],
             carry: StyleCarry | None = None) -> tuple[StyleCarry, dict]:
    """StyleCarry.plan over records given as (instances, track ids, styles, propagated), one job per instance."""
    batch = [FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=torch.zeros(3, *SIZE, dtype=torch.uint8),
                         instances=found, track_ids=torch.tensor(ids, dtype=torch.long), styles=styles,
                         propagated=propagated) for i, (found, ids, styles, propagated) in enumerate(frames)]
    jobs = [(b, i, style) for b, record in enumerate(batch) for i, style in enumerate(record.styles)]
    carry = carry or StyleCarry()
    plan = carry.plan(batch, jobs, crops, StyleCarry.paste_boxes(batch, jobs).tolist())
    return carry, plan


def test_what_cannot_be_carried_is_stylized_afresh():
    """Frame 0 (segmented): A's crop touches the left edge, B, C untracked, D in udnie. Frame 1 (skipped), each
    moved 4 px right: A's crop would leave the strip its motion pulls into view without pixels (afresh); B carried;
    C untracked; D now candy (its style changed); E a track frame 0 did not stylize. Moving left, A is carried."""
    boxes = [[2, 10, 20, 30], [40, 10, 60, 30], [40, 35, 50, 45], [70, 10, 90, 30]]
    crops = [(0, 0, 28, 40), (32, 0, 68, 40), (32, 24, 60, 56), (60, 0, 96, 40)]
    frame0 = (instances(boxes, [1] * 4), [1, 2, -1, 4], ["candy", "candy", "candy", "udnie"], False)

    def moved(dx):
        return instances([[x1 + dx, y1, x2 + dx, y2] for x1, y1, x2, y2 in boxes] + [[10, 40, 20, 50]], [1] * 5)

    frame1 = (moved(4), [1, 2, -1, 4, 5], ["candy"] * 5, True)
    later_crops = [(0, 0, 32, 40), (36, 0, 72, 40), (36, 24, 64, 56), (64, 0, 96, 40), (0, 28, 28, 60)]
    _, plan = plan_for([frame0, frame1], crops + later_crops)
    assert {k: (move.source.job, move.dx, move.dy) for k, move in plan.carried.items()} == {5: (1, 4, 0)}
    _, plan = plan_for([frame0, (moved(-4), *frame1[1:])], crops + later_crops)
    assert {k: (move.source.job, move.dx) for k, move in plan.carried.items()} == {4: (0, -4), 5: (1, -4)}
    # without RoIMasks nothing says how a mask moved: nothing is carried
    full = [(instances(boxes, [1] * 4, full_masks=True), *frame0[1:]),
            (instances([[x1 + 4, y1, x2 + 4, y2] for x1, y1, x2, y2 in boxes], [1] * 4, full_masks=True),
             [1, 2, -1, 4], ["candy"] * 4, True)]
    assert plan_for(full, crops + later_crops[:4])[1].carried == {}


@pytest.mark.parametrize("edge, box, crop, step", [
    ("left", [4, 20, 24, 40], (0, 12, 32, 48), (4, 0)),
    ("top", [40, 4, 60, 24], (32, 0, 68, 32), (0, 4)),
    ("right", [72, 20, 92, 40], (64, 12, 96, 48), (-4, 0)),
    ("bottom", [40, 40, 60, 60], (32, 32, 68, 64), (0, -4))])
def test_a_crop_cut_at_any_frame_edge_is_stylized_afresh_where_the_motion_pulls_that_edge_into_view(
        edge, box, crop, step):
    """A's crop (frame 0) is cut at one edge of the 96x64 frame. Moved 4 px away from that edge (frame 1), the strip
    of its mask next to the edge has no stylized pixels under it: stylized afresh. Moved 4 px towards the edge, what
    leaves the frame is only cut off: carried."""
    frame0 = (instances([box], [1]), [1], ["candy"], False)
    for sign in (1, -1):
        dx, dy = sign * step[0], sign * step[1]
        moved = instances([[box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]], [1])
        _, plan = plan_for([frame0, (moved, [1], ["candy"], True)], [crop, crop])
        want = {} if sign == 1 else {1: (0, dx, dy)}
        assert {k: (move.source.job, move.dx, move.dy) for k, move in plan.carried.items()} == want, edge


def test_sources_outlive_the_batch_and_a_crop_moved_off_the_frame_is_cut():
    """The next batch's skipped frame carries the last segmented frame's crop; moved partly off the frame, the crop
    and its pixels are cut to it; moved wholly off, the object gets no region."""
    carry, plan = plan_for([(instances([[60, 10, 80, 30]], [1]), [7], ["candy"], False)], [(52, 0, 88, 40)])
    pixels = torch.arange(3 * 40 * 36, dtype=torch.float32).reshape(3, 40, 36)
    carry.place(plan, [((52, 0, 88, 40), pixels)], SIZE)
    # off the left edge (-60: x from -8), the crop's first 8 columns are cut, and the view starts after them
    for dx, want in ((-10, ((42, 0, 78, 40), pixels)), (10, ((62, 0, 96, 40), pixels[:, :, :34])),
                     (-60, ((0, 0, 28, 40), pixels[:, :, 8:])), (50, None)):
        _, plan = plan_for([(instances([[60 + dx, 10, 80 + dx, 30]], [1]), [7], ["candy"], True)], [(0, 0, 1, 1)],
                           carry=carry)
        results = [None]
        carry.place(plan, results, SIZE)
        if want is None:
            assert results == [None]
        else:
            assert results[0][0] == want[0] and torch.equal(results[0][1], want[1])
    # a segmented frame replaces the sources: a track it did not stylize carries nothing after it
    _, plan = plan_for([(instances([[10, 10, 20, 20]], [1]), [8], ["candy"], False),
                        (instances([[60, 10, 80, 30]], [1]), [7], ["candy"], True)], [(0, 0, 28, 28), (52, 0, 88, 40)],
                       carry=carry)
    assert plan.carried == {}


def test_propagate_must_be_a_bool(bank):
    with pytest.raises(SettingError, match="style.propagate must be true or false, got 'yes'"):
        StylizeStage.from_config(style_cfg(propagate="yes"), bank)


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_a_segmented_frame_with_nothing_stylized_ends_what_is_carried(bank, batch_size):
    """Segmented frames 0 and 3: the object is stylized on frame 0, not kept on frame 3, kept again on the skipped
    frame 4. Frame 4 must not carry frame 0's crop (4 frames old): in a batch with no job at all (batch size 1)
    the segmented frame did not reach StyleCarry, which kept frame 0's sources; batches of 3 or 6 restyled it."""
    def record(index, x, keep, propagated):
        image = torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
        return FrameRecord(index=index, pts=index, time_base=Fraction(1, 24), image=image,
                           instances=instances([[x, 20, x + SIDE, 20 + SIDE]], [1]), track_ids=torch.tensor([1]),
                           styles=["candy"], keep=torch.tensor([keep]), propagated=propagated)

    records = [record(i, 20 + i, keep=i != 3, propagated=i % 3 != 0) for i in range(6)]
    stage = StylizeStage.from_config(style_cfg(propagate=True), bank)
    for start in range(0, len(records), batch_size):
        stage(records[start:start + batch_size])
    assert [[region.carried for region in r.stylized] for r in records] == [[False], [True], [True], [], [False],
                                                                             [False]]
