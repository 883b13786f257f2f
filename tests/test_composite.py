"""Compositor: exact original pixels outside the objects, exact stylized pixels inside hard masks, feathering
only near the edge, depth order, stylized background, and temporal mask smoothing that lowers the flicker."""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from omegaconf import OmegaConf
from scipy.ndimage import distance_transform_cdt

from pipeline.composite import Compositor
from pipeline.soft_masks import _separable_by_matmul, blur_padded
from scripts.profiling import operators
from common.errors import SettingError
from pipeline.record import FrameRecord, StylizedRegion
from segment.structures import Instances
from stylize.apply import crop_boxes
from tests.helpers_cuda import gpu_waits

H, W = 48, 64


def disc(cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).float()


def make_record(image: torch.Tensor, masks: list[torch.Tensor], pixels: list[torch.Tensor | float],
                scores: list[float] | None = None, track_ids: list[int] | None = None, index: int = 0,
                background: torch.Tensor | None = None) -> FrameRecord:
    """A record whose instances are `masks` and whose stylized crops cut `pixels` (full-frame float 3×H×W or a
    constant) at the crop boxes stylize_regions would use."""
    n = len(masks)
    stacked = torch.stack(masks) if masks else torch.zeros(0, H, W)
    boxes = []
    for m in stacked:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0])
    boxes = torch.tensor(boxes).reshape(-1, 4)
    instances = Instances(image_size=(H, W), boxes=boxes, scores=torch.tensor(scores or [0.9] * n),
                          labels=torch.ones(n, dtype=torch.long), masks=stacked)
    regions = []
    for i, (crop, full) in enumerate(zip(crop_boxes(boxes, H, W, margin=8), pixels)):
        full = torch.full((3, H, W), float(full)) if not torch.is_tensor(full) else full
        x1, y1, x2, y2 = crop
        regions.append(StylizedRegion(instance=i, style="s", box=crop, pixels=full[:, y1:y2, x1:x2].clone()))
    return FrameRecord(index=index, pts=index, time_base=Fraction(1, 24), image=image, instances=instances,
                       track_ids=torch.tensor(track_ids if track_ids is not None else list(range(1, n + 1))),
                       styles=["s"] * n, keep=torch.ones(n, dtype=torch.bool), stylized=regions, background=background)


def random_image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def distance_outside(mask: torch.Tensor) -> np.ndarray:
    """Per pixel: chessboard distance (the feather kernel is square) to the nearest mask pixel (0 inside)."""
    return distance_transform_cdt(~mask.bool().numpy(), metric="chessboard")


@pytest.mark.parametrize("feather_px", [0, 3])
def test_original_pixels_outside_instances_are_exact(feather_px):
    image = random_image()
    masks = [disc(20, 20, 9), disc(45, 28, 7)]
    stylized = torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))
    out = Compositor(feather_px=feather_px).composite(make_record(image, masks, [stylized, stylized]))
    far = (distance_outside(masks[0] + masks[1]) > feather_px)
    assert far.sum() > 1000
    assert torch.equal(out[:, torch.from_numpy(far)], image[:, torch.from_numpy(far)])


@pytest.mark.parametrize("probability, mask_threshold, stylized_inside", [
    (1.0, 0.5, True),
    (0.7, 0.5, True),
    (0.7, 0.9, False),  # composite.mask_threshold: a mask below it is not the object, whose pixels stay the input's
])
def test_hard_mask_without_feather_gives_the_stylized_pixels(probability, mask_threshold, stylized_inside):
    image = random_image()
    mask = disc(30, 24, 12)
    stylized = torch.rand(3, H, W, generator=torch.Generator().manual_seed(2))
    compositor = Compositor(feather_px=0, mask_threshold=mask_threshold)
    out = compositor.composite(make_record(image, [probability * mask], [stylized]))
    inside = mask.bool()
    expected = (stylized * 255).round().to(torch.uint8) if stylized_inside else image
    assert torch.equal(out[:, inside], expected[:, inside])
    assert torch.equal(out[:, ~inside], image[:, ~inside])


def test_feathering_gives_intermediate_values_only_near_the_edge():
    feather_px = 3
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    mask = disc(30, 24, 14)
    out = Compositor(feather_px=feather_px).composite(make_record(image, [mask], [1.0]))[0].numpy()
    inside_depth = distance_transform_cdt(mask.bool().numpy(), metric="chessboard")  # to the nearest outside pixel
    outside_depth = distance_outside(mask)
    intermediate = (out > 0) & (out < 255)
    near_edge = (inside_depth <= feather_px) & (outside_depth <= feather_px)
    assert intermediate.sum() > 50
    assert not (intermediate & ~near_edge).any()
    assert (out[inside_depth > feather_px] == 255).all()
    assert (out[outside_depth > feather_px] == 0).all()


def test_higher_score_ends_on_top_and_background_style_fills_the_rest():
    image = random_image()
    a, b = disc(26, 24, 12), disc(38, 24, 12)
    background = torch.full((3, H, W), 0.25)
    # The first instance scores higher, so it covers the overlap although the second comes later in the list.
    record = make_record(image, [a, b], [1.0, 0.0], scores=[0.95, 0.6], background=background)
    out = Compositor(feather_px=0).composite(record)
    overlap = (a * b).bool()
    assert overlap.sum() > 20 and (out[:, overlap] == 255).all()
    assert (out[:, (b - a).clamp(min=0).bool()] == 0).all()
    outside = ~(a + b).bool()
    assert (out[:, outside] == round(0.25 * 255)).all()


def jitter_sequence(frames: int = 16) -> list[FrameRecord]:
    """A still object whose detected outline jitters (radius 10 ↔ 12 px plus boundary noise): black frame,
    white stylized crops, one track."""
    rng = torch.Generator().manual_seed(3)
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    records = []
    for i in range(frames):
        radius = 10 + 2 * (i % 2) + float(torch.rand(1, generator=rng)) - 0.5
        records.append(make_record(image, [disc(32, 24, radius)], [1.0], track_ids=[7], index=i))
    return records


def measured_flicker(records: list[FrameRecord], frames: str = "output") -> float:
    """The stability figure computed from all outputs (or inputs: frames="image") at once, over whole frames:
    the oracle for the incremental one. A pixel counts where a track's mask covers it in both frames."""
    total, count = 0.0, 0
    for prev, cur in zip(records, records[1:]):
        inside = torch.zeros(H, W, dtype=torch.bool)
        for i, track in enumerate(cur.track_ids.tolist()):
            if track >= 0 and track in prev.track_ids.tolist():
                j = prev.track_ids.tolist().index(track)
                inside |= (prev.instances.masks[j] >= 0.5) & (cur.instances.masks[i] >= 0.5)
        change = (getattr(cur, frames).float() - getattr(prev, frames).float()).abs().mean(0)
        total += float(change[inside].sum())
        count += int(inside.sum())
    return total / count


def test_mask_smoothing_lowers_the_stability_figure():
    figures = {}
    for smooth in (0.0, 0.6):
        compositor = Compositor(feather_px=3, smooth_masks=smooth)
        records = compositor(jitter_sequence())
        figures[smooth] = compositor.stability()
        assert figures[smooth] == pytest.approx(measured_flicker(records), rel=1e-5)
        assert all(r.timings["composite"] >= 0 for r in records)
    assert figures[0.0] > 1.0
    assert figures[0.6] < 0.7 * figures[0.0], figures


def test_smoothing_follows_a_moving_object():
    # A rigid object moving by whole pixels: the shifted previous mask lines up, so smoothing changes nothing.
    image = random_image(4)
    records = [make_record(image, [disc(16 + 3 * i, 24, 8)], [0.8], track_ids=[1], index=i) for i in range(6)]
    plain = [r.output.clone() for r in Compositor(feather_px=2)(records)]
    smoothed = [r.output for r in Compositor(feather_px=2, smooth_masks=0.6)(records)]
    assert all(torch.equal(p, s) for p, s in zip(plain, smoothed))


@pytest.mark.parametrize("edge", ["right", "left", "bottom"])
def test_smoothing_follows_a_rigid_object_out_of_the_frame(edge):
    """Its box, clipped at the frame's edge, moved at half the object's speed: the old mask, moved by the box
    centre's shift, lagged behind and left a ghost of stylized pixels up to 20 levels strong outside the object.
    Moved by the shift of the box's unclipped side, it lines up as for an object inside the frame."""
    def square(i: int) -> torch.Tensor:
        mask, at = torch.zeros(H, W), 30 + 4 * i
        if edge == "right":
            mask[16:32, at:at + 16] = 1
        elif edge == "left":
            mask[16:32, max(0, 40 - at):56 - at] = 1
        else:
            mask[at - 14:at + 2, 24:40] = 1
        return mask

    image = random_image(6)
    frames = range(8 if edge == "right" else 6)
    records = [make_record(image, [square(i)], [0.8], track_ids=[1], index=i) for i in frames]
    plain = [r.output.clone() for r in Compositor(feather_px=2)(records)]
    smoothed = [r.output for r in Compositor(feather_px=2, smooth_masks=0.6)(records)]
    assert all(torch.equal(p, s) for p, s in zip(plain, smoothed))


def test_smoothing_leaves_no_ring_around_a_shrinking_object():
    """The previous soft mask, faded by `smooth` each frame, reached out to the crop's edge around an object that
    shrank: a ring of stylized pixels 19 px wide on the demo clip. It now counts only SMOOTH_REACH_PX around the
    current mask, so beyond that and the feather the input is untouched."""
    from pipeline.soft_masks import SMOOTH_REACH_PX

    image, feather = random_image(7), 2
    squares = []
    for i in range(6):
        mask = torch.zeros(H, W)
        mask[4 + 2 * i:44 - 2 * i, 12 + 2 * i:52 - 2 * i] = 1
        squares.append(mask)
    records = [make_record(image, [m], [0.8], track_ids=[1], index=i) for i, m in enumerate(squares)]
    for record, mask in zip(Compositor(feather_px=feather, smooth_masks=0.6)(records), squares):
        far = torch.from_numpy(distance_outside(mask) > SMOOTH_REACH_PX + feather)
        assert torch.equal(record.output[:, far], image[:, far])


def test_input_change_is_the_same_figure_on_the_input_frames():
    frames = [random_image(seed) for seed in range(5)]
    records = [make_record(image, [disc(30, 24, 10)], [0.9], track_ids=[2], index=i) for i, image in enumerate(frames)]
    compositor = Compositor(feather_px=2)
    compositor(records)
    assert compositor.input_change() == pytest.approx(measured_flicker(records, "image"), rel=1e-5)
    assert compositor.stability() == pytest.approx(measured_flicker(records), rel=1e-5)
    assert compositor.input_change() > 10  # independent random frames differ a lot


def test_stability_over_several_moving_tracks_equals_the_whole_frame_figure():
    # two tracks moving apart, an untracked object, and a track that leaves halfway and comes back
    frames = [random_image(seed) for seed in range(8)]
    records = []
    for i, image in enumerate(frames):
        masks, tracks = [disc(12 + 2 * i, 14, 7), disc(50 - 2 * i, 34, 9), disc(32, 40, 5)], [4, 9, -1]
        if i not in (3, 4):
            masks.append(disc(40, 10, 6))
            tracks.append(5)
        records.append(make_record(image, masks, [0.2 * k for k in range(len(masks))], track_ids=tracks, index=i))
    compositor = Compositor(feather_px=2)
    compositor(records)
    assert compositor.stability() == pytest.approx(measured_flicker(records), rel=1e-5)
    assert compositor.input_change() == pytest.approx(measured_flicker(records, "image"), rel=1e-5)


def test_stability_is_none_without_tracked_objects_and_zero_for_a_still_one():
    image = random_image()
    compositor = Compositor()
    compositor([make_record(image, [], []) for _ in range(3)])
    assert compositor.stability() is None
    compositor([make_record(image, [disc(30, 24, 10)], [0.5], track_ids=[3], index=i) for i in range(3)])
    assert compositor.stability() == 0.0


def test_no_regions_returns_the_frame():
    image = random_image()
    out = Compositor().composite(make_record(image, [disc(30, 24, 10)], []))
    assert torch.equal(out, image)


def test_a_batch_reads_its_scores_and_boxes_once(device):
    """The stage reads the batch's instance scores and boxes back in one copy (on a GPU one wait per batch) and
    composites on the frames' device what the CPU composites, which is the input beyond the feather around the
    objects and each object's stylized value deeper inside it than the feather."""
    feather_px, values = 3, (0.25, 0.75)

    def masks(i):
        return [disc(20 + 2 * i, 20, 9), disc(45, 28, 7)]  # apart in every frame

    def batch(on):
        records = [make_record(random_image(i), masks(i), list(values), scores=[0.6, 0.9], index=i) for i in range(3)]
        for r in records:
            r.image, r.instances = r.image.to(on), r.instances.to(on)
            r.stylized = [dataclasses.replace(region, pixels=region.pixels.to(on)) for region in r.stylized]
        return records

    want = [r.output for r in Compositor(feather_px)(batch(torch.device("cpu")))]
    for i, expected in enumerate(want):  # the batch's CPU composite against what no blending can change
        far = torch.from_numpy(distance_outside(sum(masks(i))) > feather_px)
        assert torch.equal(expected[:, far], random_image(i)[:, far])
        for mask, value in zip(masks(i), values):
            deep = torch.from_numpy(distance_transform_cdt(mask.bool().numpy(), metric="chessboard") > feather_px)
            assert deep.sum() > 20 and (expected[:, deep] == round(value * 255)).all(), (i, value)
    Compositor(feather_px)(batch(device))  # the feather's kernel is built and moved to the device once per process
    records, compositor = batch(device), Compositor(feather_px)
    _, waits = gpu_waits(device, lambda: compositor(records))
    for record, expected in zip(records, want):
        assert (record.output.cpu().int() - expected.int()).abs().max() <= 1  # GPU feather: matmul rounding
    assert waits is None or 1 <= waits <= 2  # the one copy (+ the timing's synchronize); was two per frame


def test_config():
    """Every setting of the config file reaches the compositor and its soft masks: the file's values, and values
    that are no setting's default (a setting dropped on the way would leave its default)."""
    where = {"feather_px": "feather_px", "smooth_masks": "smooth", "mask_threshold": "threshold"}
    default = OmegaConf.to_container(OmegaConf.load("conf/composite/default.yaml"))
    assert default.keys() == where.keys()  # a new setting needs its attribute here
    for settings in (default, {"feather_px": 5, "smooth_masks": 0.25, "mask_threshold": 0.8}):
        compositor = Compositor.from_config(settings)
        for owner in (compositor, compositor.soft_masks):
            assert {key: getattr(owner, name) for key, name in where.items()} == settings, owner
    with pytest.raises(SettingError, match="unknown composite setting"):
        Compositor.from_config({"feather": 3})
    for smooth in (1.5, 1.0):  # 1.0 would keep the first frame's mask for ever
        with pytest.raises(SettingError, match="smooth_masks"):
            Compositor.from_config({"smooth_masks": smooth})


@pytest.mark.parametrize("feather_px", [1, 3, 8])
def test_feather_blurs_like_kornias_separable_filter(feather_px, device):
    """Both blurs against kornia's conv on the CPU: the GPU's matmuls (no cuDNN algorithm choice per new crop
    size) and the CPU's shifted adds (oneDNN's one-channel convs are slow), with odd sizes, masks touching the
    border, and crops smaller than the kernel."""
    g = torch.Generator().manual_seed(feather_px)
    for h, w in [(37, 53), (5, 3), (120, 90), (301, 402)]:
        mask = (torch.rand(h, w, generator=g) > 0.5).float()
        mask[:, :2] = 1.0
        kernel = get_gaussian_kernel1d(2 * feather_px + 1, feather_px / 2)
        want = filter2d_separable(mask[None, None], kernel, kernel, border_type="replicate")[0, 0]
        padded = torch.nn.functional.pad(mask[None, None], [feather_px] * 4, mode="replicate")[0, 0]
        got = _separable_by_matmul(padded.to(device), kernel[0].to(device)).cpu()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(blur_padded(padded, feather_px), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(blur_padded(padded.to(device), feather_px).cpu(), want, rtol=0, atol=1e-6)


def test_the_stability_union_takes_two_operators_a_track():
    """Each track's overlap of its two masks is and-ed, then or-ed into the union in place: `|=` on the union's
    slice copied the result back onto itself, a third operator per track."""
    def counted(tracks: int) -> int:
        compositor, image, output = Compositor(), random_image(), random_image(1)
        masks = {t: ((4 * t, 2, 4 * t + 8, 10), torch.ones(8, 8, dtype=torch.bool)) for t in range(tracks)}
        compositor._measure(image, output, masks)
        return operators(lambda: compositor._measure(image, output, masks))

    assert counted(8) - counted(4) == 2 * 4


def test_equal_scores_put_the_later_instance_on_top():
    """The documented tie order (a stable sort): the later instance is blended last, so it covers the overlap."""
    image = random_image()
    a, b = disc(26, 24, 12), disc(38, 24, 12)
    out = Compositor(feather_px=0).composite(make_record(image, [a, b], [1.0, 0.0], scores=[0.8, 0.8]))
    overlap = (a * b).bool()
    assert overlap.sum() > 20 and (out[:, overlap] == 0).all()
    assert (out[:, (a - b).clamp(min=0).bool()] == 255).all()


def test_a_track_whose_masks_do_not_overlap_in_consecutive_frames_has_no_figure():
    # radius 8 discs 30 px apart: 0 pixels in both masks, so no pixel to average over (not a division by zero)
    first, second = disc(16, 24, 8), disc(46, 24, 8)
    assert first.sum() > 150 and (first * second).sum() == 0
    compositor = Compositor(feather_px=2)
    compositor([make_record(random_image(i), [m], [0.8], track_ids=[1], index=i)
                for i, m in enumerate((first, second))])
    assert compositor.stability() is None and compositor.input_change() is None


def test_a_frame_without_the_track_breaks_the_pair():
    """Frames 0 and 2 are not consecutive: a track absent from frame 1 adds nothing across it."""
    mask = disc(30, 24, 10)
    records = [make_record(random_image(0), [mask], [0.8], track_ids=[1], index=0),
               make_record(random_image(1), [], [], index=1),
               make_record(random_image(2), [mask], [0.8], track_ids=[1], index=2)]
    compositor = Compositor(feather_px=2)
    compositor(records)
    assert compositor.stability() is None and compositor.input_change() is None


def test_a_frame_of_another_size_is_not_compared_with_the_last_one(monkeypatch):
    """Only pairs of frames of one size are measured: after a size change the figure is the later pair's alone."""
    mask = disc(30, 24, 10)
    small = make_record(random_image(0), [mask], [0.8], track_ids=[1], index=0)
    monkeypatch.setitem(globals(), "W", W + 16)  # disc and make_record build the wider frames
    wide = [make_record(random_image(i), [disc(30, 24, 10)], [0.8], track_ids=[1], index=i) for i in (1, 2)]
    compositor = Compositor(feather_px=2)
    compositor([small, *wide])
    assert compositor.input_change() == pytest.approx(measured_flicker(wide, "image"), rel=1e-5)
    assert compositor.stability() == pytest.approx(measured_flicker(wide), rel=1e-5)
