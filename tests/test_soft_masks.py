"""SoftMasks: each region's alpha and binarized mask against a region-by-region reference written out here (the mask
pasted over the crop, the track's previous soft mask pasted where its box moved, kornia's separable Gaussian with
replicate borders), for RoIMasks, full-image masks and boxes; a batch in one call against frame by frame; regions
and frames split over several padded chunks."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from kornia.filters import filter2d_separable, get_gaussian_kernel1d

import pipeline.soft_masks as soft_masks
import segment.roi_masks as roi_masks
from pipeline.record import FrameRecord, StylizedRegion
from pipeline.soft_masks import SMOOTH_REACH_PX, Frame, SoftMasks, blur_padded
from scripts.profiling import operators
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from stylize.apply import crop_boxes

H, W = 90, 120
TRACKS = [1, 2, 3, -1, 5]  # -1: an untracked object
KINDS = ("roi", "full", "box")


def disc_probs(n: int) -> torch.Tensor:
    """(n, 28, 28) a soft disc: probabilities crossing the threshold inside the grid, some near 0.5."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    return (1.3 - (xs ** 2 + ys ** 2).sqrt()).clamp(0, 1)[None].repeat(n, 1, 1)


def frame_records(kind: str, count: int = 8, device: torch.device = torch.device("cpu")) -> list[FrameRecord]:
    """Five objects moving at up to 9 px a frame: some run off the frame's edges (crops cut there), object 3 is
    missing from frame 3 and back after, and frame 5 has no stylized region (every kept mask is forgotten)."""
    g = torch.Generator().manual_seed(7)
    start = torch.tensor([[20.0, 20], [100, 30], [60, 70], [10, 80], [110, 85]])
    velocity = (torch.rand(5, 2, generator=g) - 0.5) * 18
    half = torch.tensor([[12.0, 9], [15, 15], [20, 11], [8, 8], [14, 10]])
    records = []
    for f in range(count):
        keep = [i for i in range(5) if not (f == 3 and i == 2)]
        centre = start[keep] + velocity[keep] * f
        boxes = torch.cat([centre - half[keep], centre + half[keep]], 1)
        masks = RoIMasks.from_probs(disc_probs(len(keep)), boxes, (H, W)).to(device)
        if kind == "full":
            masks = masks.paste()
        instances = Instances(image_size=(H, W), boxes=boxes.to(device), scores=torch.linspace(0.9, 0.6, len(keep)),
                              labels=torch.ones(len(keep), dtype=torch.long), masks=None if kind == "box" else masks)
        crops = crop_boxes(boxes, H, W, margin=6)
        regions = [] if f == 5 else [StylizedRegion(instance=i, style="s", box=crop, pixels=torch.zeros(0))
                                     for i, crop in enumerate(crops)]
        records.append(FrameRecord(index=f, pts=f, time_base=Fraction(1, 24), image=torch.zeros(3, H, W, device=device),
                                   instances=instances, track_ids=torch.tensor([TRACKS[i] for i in keep]),
                                   styles=["s"] * len(keep), stylized=regions))
    return records


def as_frames(records: list[FrameRecord]) -> list[Frame]:
    return [Frame(record, record.stylized[::-1], record.instances.boxes.tolist(), record.track_ids.tolist())
            for record in records]


def paste(source: torch.Tensor, origin: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """The window `box` (x1, y1, x2, y2) of a zero canvas on which `source` (h, w) lies at origin (x, y)."""
    x1, y1, x2, y2 = box
    out = source.new_zeros((y2 - y1, x2 - x1))
    sx, sy = origin
    ox1, oy1 = max(x1, sx), max(y1, sy)
    ox2, oy2 = min(x2, sx + source.shape[1]), min(y2, sy + source.shape[0])
    if ox1 < ox2 and oy1 < oy2:
        out[oy1 - y1:oy2 - y1, ox1 - x1:ox2 - x1] = source[oy1 - sy:oy2 - sy, ox1 - sx:ox2 - sx]
    return out


def reference(frames: list[Frame], feather_px: int, smooth: float, threshold: float) -> list[list[tuple]]:
    """Region by region, as the composite did before `SoftMasks`, on the CPU."""
    kernel = get_gaussian_kernel1d(2 * feather_px + 1, feather_px / 2)
    kept, out = {}, []
    for frame in frames:
        instances = frame.record.instances
        if instances.masks is None:  # 1 inside the rounded box
            full = torch.zeros(len(instances), H, W)
            for i, box in enumerate(frame.boxes):
                x1, y1, x2, y2 = (round(v) for v in box)
                full[i, max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 1
        else:
            masks = instances.masks
            full = (masks.paste() if isinstance(masks, RoIMasks) else masks).cpu()
        now, alphas = {}, []
        for region in frame.regions:
            x1, y1, x2, y2 = region.box
            hard = (full[region.instance, y1:y2, x1:x2] >= threshold).float()
            box, track = frame.boxes[region.instance], frame.tracks[region.instance]
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            soft = hard
            if smooth > 0 and track in kept:
                previous, (px, py), (cx, cy) = kept[track]
                moved = (px + round(centre[0] - cx), py + round(centre[1] - cy))
                reach = torch.nn.functional.max_pool2d(hard[None], 2 * SMOOTH_REACH_PX + 1, 1, SMOOTH_REACH_PX)[0]
                soft = torch.lerp(hard, torch.minimum(paste(previous, moved, region.box), reach), smooth)
            if smooth > 0 and track >= 0:
                now[track] = (soft, (x1, y1), centre)
            alpha = soft
            if feather_px:
                alpha = filter2d_separable(soft[None, None], kernel, kernel, border_type="replicate")[0, 0]
            alphas.append((alpha, hard.bool()))
        kept = now
        out.append(alphas)
    return out


def soft_masks_of(records: list[FrameRecord], batch: int, **settings) -> list[list[tuple]]:
    """The records through one SoftMasks, `batch` frames per call."""
    masks = SoftMasks(**settings)
    frames = as_frames(records)
    return [m for start in range(0, len(frames), batch) for m in masks(frames[start:start + batch])]


def assert_same(got: list[list[tuple]], want: list[list[tuple]], atol: float = 0.0, flips: int = 0) -> None:
    assert [len(frame) for frame in got] == [len(frame) for frame in want]
    for frame_got, frame_want in zip(got, want):
        for (alpha, binary), (alpha_want, binary_want) in zip(frame_got, frame_want):
            assert alpha.shape == alpha_want.shape and binary.dtype == torch.bool
            assert (binary.cpu() != binary_want.cpu()).sum() <= flips
            if not flips:
                torch.testing.assert_close(alpha.cpu(), alpha_want.cpu(), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feather_px, smooth, threshold", [(3, 0.4, 0.5), (0, 0.4, 0.5), (2, 0.0, 0.5), (3, 0.4, 1.0)])
def test_each_region_matches_the_region_by_region_reference(kind, feather_px, smooth, threshold, device):
    """Four frames per call, as the stage gives them: the batch's masks read at once, smoothing frame by frame
    across calls, tracks forgotten after a frame without regions and when missing for a frame. mask_threshold 1.0,
    its largest value, keeps the pixels of probability 1 (the discs' centres): the threshold is inclusive."""
    settings = dict(feather_px=feather_px, smooth=smooth, threshold=threshold)
    records = frame_records(kind, device=device)
    got = soft_masks_of(records, 4, **settings)
    want = reference(as_frames(frame_records(kind)), **settings)
    assert sum(map(len, got)) == 5 * 8 - 1 - 5  # object 3 missing from frame 3, no regions on frame 5
    on_cpu = device.type == "cpu"
    # kornia's conv against shifted adds (CPU) or matmuls (GPU); a GPU's matmuls may round a probability at the
    # threshold the other way
    assert_same(got, want, atol=1e-6 if on_cpu else 1e-5, flips=0 if on_cpu or kind == "box" else 3)
    moved = [alpha for frame in got[1:5] for alpha, _ in frame]
    assert smooth == 0 or any(((a > 0) & (a < 1)).any() for a in moved)  # something to compare


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_in_one_call_is_frame_by_frame(kind):
    records = frame_records(kind)
    settings = dict(feather_px=3, smooth=0.4, threshold=0.5)
    assert_same(soft_masks_of(records, 8, **settings), soft_masks_of(records, 1, **settings))


def test_regions_and_frames_split_over_chunks_give_the_same(monkeypatch):
    """A pixel budget that puts a few regions in each padded chunk: frames spread over several chunks, and
    a region's previous soft mask read from any of the frame before's parts."""
    records = frame_records("roi")
    settings = dict(feather_px=3, smooth=0.4, threshold=0.5)
    want = soft_masks_of(records, 4, **settings)
    used = []
    gather = SoftMasks._gather
    monkeypatch.setattr(SoftMasks, "_gather", lambda self, parts, *rest: used.append(len(parts)) or
                        gather(self, parts, *rest))
    monkeypatch.setattr(roi_masks, "LOCAL_CHUNK_PIXELS", 12000)
    assert_same(soft_masks_of(records, 4, **settings), want)
    assert max(used) > 1 and 1 in used  # both ways of reading the previous masks ran


def test_frames_of_different_kinds_in_one_call():
    """RoIMasks frames read together; a full-mask frame and a box frame each alone; smoothing runs through all."""
    mixed = [*frame_records("roi")[:3], frame_records("full")[3], frame_records("box")[4], *frame_records("roi")[5:]]
    groups = soft_masks._joinable(as_frames(mixed))
    assert [len(group) for group in groups] == [3, 1, 1, 3]
    settings = dict(feather_px=3, smooth=0.4, threshold=0.5)
    assert_same(soft_masks_of(mixed, 8, **settings), reference(as_frames(mixed), **settings), atol=1e-6)


def grid_frames(n: int) -> list[Frame]:
    """Two frames of n tracked squares of one size on a grid (n <= 12), moved a pixel: each frame's regions in one
    padded part, the second's smoothed with the first's."""
    records = []
    for f in range(2):
        corners = torch.tensor([[10.0 + 28 * (i % 4) + f, 10.0 + 28 * (i // 4)] for i in range(n)])
        boxes = torch.cat([corners, corners + 12], 1)
        instances = Instances(image_size=(H, W), boxes=boxes, scores=torch.full((n,), 0.9),
                              labels=torch.ones(n, dtype=torch.long),
                              masks=RoIMasks.from_probs(disc_probs(n), boxes, (H, W)))
        regions = [StylizedRegion(instance=i, style="s", box=crop, pixels=torch.zeros(0))
                   for i, crop in enumerate(crop_boxes(boxes, H, W, margin=4))]
        records.append(FrameRecord(index=f, pts=f, time_base=Fraction(1, 24), image=torch.zeros(3, H, W),
                                   instances=instances, track_ids=torch.arange(n) + 1, styles=["s"] * n,
                                   stylized=regions))
    return as_frames(records)


def test_operators_per_frame_do_not_grow_with_the_regions():
    """On a CPU too a part's regions are blurred in one filter and their smoothing's sources planned on the host:
    a frame of 12 regions runs the operators of a frame of 4 (region by region the blur was 14 more per region at
    feather_px 3), with the region-by-region reference's values."""
    settings = dict(feather_px=3, smooth=0.4, threshold=0.5)

    def counted(n: int) -> int:
        masks, frames = SoftMasks(**settings), grid_frames(n)
        masks(frames[:1])
        got = []
        count = operators(lambda: got.append(masks(frames[1:])[0]))
        assert_same([got[0]], reference(frames, **settings)[1:], atol=1e-6)
        assert any(((alpha > 0) & (alpha < 1)).any() for alpha, _ in got[0])
        return count

    assert counted(12) == counted(4)


@pytest.mark.parametrize("feather_px", [1, 3, 8])
def test_a_parts_blur_cut_at_a_region_is_its_own_blur_to_the_bit(feather_px):
    """What blurring a CPU part at once rests on (a guard: `blur_padded` itself is unchanged): each region's alpha
    cut from the part's blur is the blur of the region's own padded crop bit for bit, for soft values (smoothing
    blends them) and at widths on and off the vector lanes."""
    r = feather_px
    soft = torch.rand(6, 37 + 2 * r, 53 + 2 * r, generator=torch.Generator().manual_seed(r))
    alpha = blur_padded(soft, r)
    for j, (h, w) in enumerate([(37, 53), (1, 1), (20, 17), (5, 31), (36, 9), (12, 52)]):
        assert torch.equal(alpha[j, :h, :w], blur_padded(soft[j, :h + 2 * r, :w + 2 * r], r))


def test_a_cpu_part_padded_past_twice_its_regions_is_blurred_region_by_region(monkeypatch):
    """Padding small regions to a large one's crop would filter many more pixels than they have: such a part's
    regions are each filtered over their own crop; a part of like regions at once. The same alphas either way."""
    blurred = []
    monkeypatch.setattr(soft_masks, "blur_padded", lambda soft, r: blurred.append(soft.dim()) or blur_padded(soft, r))
    masks, r = SoftMasks(feather_px=2, smooth=0.0, threshold=0.5), 2

    def blur(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        blurred.clear()
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        soft = torch.rand(len(sizes), height + 2 * r, width + 2 * r, generator=torch.Generator().manual_seed(1))
        regions = [StylizedRegion(instance=j, style="s", box=(0, 0, w, h), pixels=torch.zeros(0))
                   for j, (h, w) in enumerate(sizes)]
        alphas = masks._blur(soft, regions)
        for j, (alpha, (h, w)) in enumerate(zip(alphas, sizes)):
            assert torch.equal(alpha, blur_padded(soft[j, :h + 2 * r, :w + 2 * r], r))
        return list(blurred)

    assert blur([(20, 16), (18, 16), (20, 14), (17, 15)]) == [3]
    assert blur([(50, 60), (8, 8), (10, 6), (9, 9)]) == [2] * 4


def test_the_cpu_reach_is_max_pools_dilation_without_max_pool(monkeypatch):
    """On a CPU max_pool2d is slow (4.5 against 0.8 ms for (100, 40, 40)): the reach is shifted maxima there, with
    max_pool2d's values to the bit, at the crop's edges too."""
    hard = (torch.rand(5, 23, 31, generator=torch.Generator().manual_seed(3)) > 0.9).float()
    hard[0], hard[1] = 0, 1
    hard[2, 0, 0] = hard[2, -1, -1] = hard[2, 0, -1] = 1
    want = torch.nn.functional.max_pool2d(hard[:, None], 2 * SMOOTH_REACH_PX + 1, 1, SMOOTH_REACH_PX)[:, 0]

    def no_max_pool(*args, **kwargs):
        raise AssertionError("max_pool2d ran on a CPU")

    monkeypatch.setattr(torch.nn.functional, "max_pool2d", no_max_pool)
    assert torch.equal(soft_masks._near(hard), want)


def test_the_reach_at_a_crop_cut_by_the_frame_is_the_crops_own(device):
    """Frame 0: an object partly off the top of the frame, its mask opaque up to row 0. Frame 1: found again from
    row 1. Row 0's reach (SMOOTH_REACH_PX) takes in row 1's mask, so the previous mask counts there; the feather's
    replicate border copies row 0 above the frame. The reach was taken over those copies, which reach fewer of the
    crop's rows: alpha 0.5596 at row 0 against the region by region 0.6188."""
    def frame(index: int, mask_box: list[float], box: list[float]) -> Frame:
        boxes = torch.tensor([box])
        masks = RoIMasks.from_probs(torch.ones(1, 28, 28), torch.tensor([mask_box]), (H, W))
        crop = crop_boxes(boxes, H, W, 16)[0]
        record = FrameRecord(index=index, pts=index, time_base=Fraction(1, 24),
                             image=torch.zeros(3, H, W, dtype=torch.uint8, device=device),
                             instances=Instances((H, W), boxes, torch.tensor([0.9]), torch.tensor([1]), masks).to(
                                 device), track_ids=torch.tensor([1]), styles=["s"],
                             stylized=[StylizedRegion(0, "s", crop, torch.zeros(0))])
        return Frame(record, record.stylized, boxes.tolist(), [1])

    frames = [frame(0, [10.0, -10.0, 40.0, 20.0], [10.0, 0.0, 40.0, 20.0]), frame(1, [10.0, 1.0, 40.0, 20.0],
                                                                                 [10.0, 1.0, 40.0, 20.0])]
    settings = dict(feather_px=3, smooth=0.4, threshold=0.5)
    masks = SoftMasks(**settings)
    got = [masks([f])[0] for f in frames]
    want = reference(frames, **settings)
    assert got[1][0][0][0, 20] < 1 and want[1][0][0][0, 20] < 1  # the previous mask weighs on row 0
    assert_same(got, want, atol=1e-6 if device.type == "cpu" else 1e-5)


def test_box_shifts_round_half_to_even_and_follow_the_unclipped_side():
    """The smoothing's shifts for a frame's regions at once: the centre's, rounded half to even as Python's round
    did; a box clipped at one edge of the frame (120 x 90) moves by its other side; one clipped at both, by its
    centre. (A guard of the vectorised rule.)"""
    before = np.array([[10, 10, 20, 20], [10, 10, 20, 20], [0, 5, 8, 15], [110, 5, 120, 15], [0, 40, 120, 50]],
                      dtype=np.float64)
    now = np.array([[11, 10, 20, 20], [13, 10, 20, 20], [0, 5, 11, 15], [107, 5, 120, 15], [0, 43, 120, 52]],
                   dtype=np.float64)
    assert soft_masks._shifts(before, now, (90, 120)).tolist() == [[0, 0], [2, 0], [3, 0], [-3, 0], [0, 2]]
