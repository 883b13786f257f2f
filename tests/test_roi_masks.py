"""RoIMasks: every form of a mask it gives (whole, per window, counted, shrunk) against the full paste, and the full
paste against torchvision's; the render's stages give the same results from them as from full masks."""
from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.models.detection.roi_heads import paste_masks_in_image

import pipeline.debug as debug
import segment.roi_masks as roi_masks
from pipeline.assign import StyleAssigner
from pipeline.composite import Compositor
from pipeline.record import FrameRecord
from pipeline.segment_stage import SegmentStage
from pipeline.stylize_stage import StylizeStage
from pipeline.track import Tracker
from segment.checkpoint import load_checkpoint
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from stylize.bank import StyleBank
from tests.tiny_models import CLASS_NAMES, tiny_bank, tiny_segmenter

H, W = 150, 210


def same_pixels(got: torch.Tensor, want: torch.Tensor) -> None:
    """Pasted masks computed in chunks of different sizes: on a CPU the same, on a GPU the matmuls may round
    differently by shape (float32, TF32 off)."""
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=1e-6)


def same_counts(got: torch.Tensor, want: torch.Tensor) -> None:
    """Pixel counts at a threshold: exact on a CPU; on a GPU a pixel within rounding of the threshold may fall
    either side (see same_pixels)."""
    slack = 0 if got.device.type == "cpu" else 2
    assert (got.cpu() - want.cpu()).abs().max() <= slack, (got, want)


def masks_and_boxes(n: int = 30, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 28, 28) probabilities and (n, 4) boxes, the first five at the image's edges and beyond it."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * torch.tensor([W, H]) / 2 + 0.3], 1)
    boxes[:5] = torch.tensor([[-20.0, -10.0, 60.5, 40.2],    # sticks out top-left
                              [180.0, 120.0, 260.0, 190.0],  # sticks out bottom-right
                              [5.2, 6.7, 5.4, 6.9],          # sub-pixel
                              [0.0, 0.0, 210.0, 150.0],      # whole image
                              [250.0, 10.0, 300.0, 50.0]])   # right of the image
    return torch.rand(n, 28, 28, generator=g), boxes


@pytest.fixture
def roi(device) -> tuple[RoIMasks, torch.Tensor]:
    """The masks as RoIMasks on the device, and torchvision's full paste of them (on the CPU)."""
    probs, boxes = masks_and_boxes()
    inside = torch.arange(len(boxes)) != 4  # torchvision's paste fails on a box wholly outside the image
    want = torch.zeros(len(boxes), H, W)
    want[inside] = paste_masks_in_image(probs[inside, None], boxes[inside], (H, W))[:, 0]
    return RoIMasks.from_probs(probs.to(device), boxes.to(device), (H, W)), want


def test_the_full_paste_is_torchvisions(roi):
    masks, want = roi
    for chunk_size in (1, 7, 64):
        torch.testing.assert_close(masks.paste(chunk_size).cpu(), want, rtol=0, atol=1e-5)


def test_masks_at_any_pixels_are_the_full_paste_there(roi):
    """`at`: each mask at its own rows and columns of the image, in any order and repeated, as the composite reads
    them (a crop's pixels with its edge rows repeated)."""
    masks, _ = roi
    full = masks.paste().cpu()
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, H, (len(masks), 40), generator=g)
    columns = torch.randint(0, W, (len(masks), 50), generator=g)
    rows[:, :5] = rows[:, 5:6]  # repeats
    for index in (slice(None), torch.tensor([7, 3, 3, 20])):
        picked = torch.arange(len(masks))[index]
        got = masks.at(index if isinstance(index, slice) else index.to(masks.device), rows[picked].to(masks.device),
                       columns[picked].to(masks.device)).cpu()
        want = full[picked[:, None, None], rows[picked][:, :, None], columns[picked][:, None, :]]
        same_pixels(got, want)
        assert want.gt(0.5).any()


def test_each_window_holds_its_mask(roi):
    """Inside its window a mask's pixels are the full paste's; outside it the full paste is zero."""
    masks, want = roi
    full = masks.paste().cpu()
    windows = masks.windows()
    assert windows[4][0] == windows[4][2] == W  # a box right of the image has an empty window at its edge
    for rows in (None, [5, 3, 9, 10, 29]):  # consecutive rows are sliced, the others indexed
        rows_or_all = range(len(masks)) if rows is None else rows
        for row, local in zip(rows_or_all, masks.local(rows)):
            x1, y1, x2, y2 = windows[row]
            assert local.shape == (y2 - y1, x2 - x1)
            torch.testing.assert_close(local.cpu(), full[row, y1:y2, x1:x2], rtol=0, atol=1e-6)
            outside = full[row].clone()
            outside[y1:y2, x1:x2] = 0
            assert outside.abs().max() == 0


@pytest.mark.parametrize("chunk_pixels", [roi_masks.LOCAL_CHUNK_PIXELS, 5000])
def test_areas_count_the_full_masks_pixels(roi, monkeypatch, chunk_pixels):
    monkeypatch.setattr(roi_masks, "LOCAL_CHUNK_PIXELS", chunk_pixels)  # 5000: windows alone or a few together
    masks, want = roi
    full = masks.paste().cpu()
    for threshold in (0.5, 0.9):
        same_counts(masks.areas(threshold), (full >= threshold).flatten(1).sum(1))
    assert masks.areas().sum() > 0
    rows = [7, 2, 11]
    same_counts(masks.areas(rows=rows), (full[rows] >= 0.5).flatten(1).sum(1))
    assert masks.areas(0.0).tolist() == [H * W] * len(masks)


@pytest.mark.parametrize("size", [(32, 45), (64, 91), (H, W)])
def test_shrunk_is_the_area_average_of_the_full_masks(roi, size):
    masks, _ = roi
    full = masks.paste()
    want = F.interpolate(full[:, None], size=size, mode="area")[:, 0] >= 0.5
    got = masks.shrunk(size)
    assert got.shape == want.shape and got.dtype == torch.bool
    # the same sums in another order: a pixel within rounding of the threshold may fall either side
    assert (got != want).float().mean() <= 1e-3
    assert want.any(2).any(1).sum() > 20  # most masks are non-empty at this size


def test_slicing_splitting_and_joining_keep_the_masks(roi):
    masks, _ = roi
    full = masks.paste()
    masks.windows()
    parts = masks.split([10, 0, 20])
    assert [len(p) for p in parts] == [10, 0, 20]
    assert parts[2].windows() == masks.windows()[10:]  # read once, carried along
    joined = RoIMasks.cat(parts)
    assert joined.windows() == masks.windows()
    same_pixels(joined.paste(), full)
    same_pixels(masks[-1].paste(), full[-1:])
    same_pixels(masks[3].paste(), full[3:4])
    taken = masks.take([9, 2, 20])
    assert taken.windows() == [masks.windows()[r] for r in (9, 2, 20)]
    same_pixels(taken.paste(), full[[9, 2, 20]])
    with pytest.raises(ValueError, match="different image sizes"):
        RoIMasks.cat([masks, RoIMasks.from_probs(masks.grids[:1, 1:-1, 1:-1], torch.zeros(1, 4), (H + 1, W))])
    assert masks.shape == (30, H, W) and masks[3:3].paste().shape == (0, H, W)
    assert masks[3:3].areas().shape == (0,) and masks[3:3].shrunk((8, 8)).shape == (0, 8, 8)


def test_instances_read_roi_masks_as_full_ones(roi):
    masks, _ = roi
    n = len(masks)
    boxes = torch.zeros((n, 4), device=masks.device)
    instances = Instances(image_size=(H, W), boxes=boxes, scores=torch.linspace(1, 0, n, device=masks.device),
                          labels=torch.ones(n, dtype=torch.long, device=masks.device), masks=masks)
    full = instances.pasted()
    assert isinstance(full.masks, torch.Tensor) and torch.equal(full.masks, masks.paste())
    same_counts(instances.mask_areas(), full.mask_areas())
    same_counts(instances.mask_areas(rows=[4, 1]), full.mask_areas(rows=[4, 1]))
    assert torch.equal(instances.binarize().masks, full.binarize().masks)  # the same paste
    same_pixels(instances[2:5].pasted().masks, full.masks[2:5])
    same_pixels(Instances.cat([instances[:3], instances[3:]]).pasted().masks, full.masks)
    same_pixels(instances.to("cpu").pasted().masks, full.masks)
    assert "RoIMasks" in repr(instances)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_checkpoint(tiny_segmenter(folder / "segmenter.pt")).eval()
    return model, StyleBank.load(tiny_bank(folder / "bank.pt"))


def test_the_model_gives_roi_masks_that_paste_to_its_full_masks(tiny):
    model, _ = tiny
    frames = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    full, roi = model.predict(frames), model.predict(frames, full_masks=False)
    assert sum(len(f) for f in full) > 2
    for f, r in zip(full, roi):
        assert isinstance(r.masks, RoIMasks) and torch.equal(r.boxes, f.boxes)
        torch.testing.assert_close(r.masks.paste(), f.masks, rtol=0, atol=1e-6)


def test_the_stages_render_the_same_from_roi_masks_as_from_full_masks(tiny):
    """Track, assign, stylize and composite on a tiny model's detections: the same ids, styles and frames whether
    the masks are RoIMasks (what the render passes) or pasted in full."""
    model, bank = tiny
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=g)
    frames = [torch.roll(base, shifts=2 * i, dims=2) for i in range(8)]
    records = [FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=frame) for i, frame in enumerate(frames)]
    roi_batches = [SegmentStage(model, 0.0)(records[start:start + 4]) for start in (0, 4)]
    full_batches = copy.deepcopy(roi_batches)
    for record in (r for batch in full_batches for r in batch):
        record.instances = record.instances.pasted()
    assert all(isinstance(r.instances.masks, RoIMasks) for batch in roi_batches for r in batch)
    style = OmegaConf.create({"assign": "per_instance", "palette": ["style_03", "style_17"], "palette_memory": 48,
                              "default_style": "style_19", "background": "original", "exclude_classes": [],
                              "min_score": 0.0, "min_area": 400, "class_styles": {}})
    outputs = []
    for batches in (roi_batches, full_batches):
        # birth_score 0: the random model scores about 0.25
        stages = [Tracker(birth_score=0.0), StyleAssigner.from_config(style, bank, CLASS_NAMES), StylizeStage(bank),
                  Compositor(smooth_masks=0.4)]
        for batch in batches:
            for stage in stages:
                stage(batch)
        outputs.append([(r.track_ids.tolist(), r.styles, r.keep.tolist(), r.output)
                        for batch in batches for r in batch])
    kept = [keep for _, _, keep, _ in outputs[0]]
    assert sum(map(sum, kept)) > 4 and not all(map(all, kept))  # some pass the area filter, some do not
    for (ids, styles, keep, output), (ids_, styles_, keep_, output_) in zip(*outputs):
        assert (ids, styles, keep) == (ids_, styles_, keep_)
        assert torch.equal(output, output_)


def test_the_debug_dump_downscales_roi_masks_as_full_ones(roi, monkeypatch):
    monkeypatch.setattr(debug, "PASTE_CHUNK", 7)  # pasted in chunks of 7, 30 masks
    masks, _ = roi
    got, want = debug.downscale_masks(masks, (40, 56)), debug.downscale_masks(masks.paste(), (40, 56))
    assert got.shape == want.shape == (30, 40, 56) and want.any()
    assert (got != want).sum() <= (0 if masks.device.type == "cpu" else 2)  # see same_counts
    assert debug.downscale_masks(masks[:0], (40, 56)).shape == (0, 40, 56)


def test_per_frame_joins_the_frames_of_one_size_and_splits_the_result_back(roi):
    masks, _ = roi
    probs, boxes = masks_and_boxes(6, seed=8)
    other = RoIMasks.from_probs(probs.to(masks.device), boxes.to(masks.device), (H + 10, W))
    items, rows = [masks[:12], other, masks[12:]], [[3, 0, 7], [5, 1], [4]]
    calls = []

    def areas(joined: RoIMasks) -> torch.Tensor:
        calls.append(joined.image_size)
        return joined.areas()

    got = roi_masks.per_frame(items, areas, rows)
    assert sorted(calls) == [(H, W), (H + 10, W)]  # one call per image size
    for item, item_rows, result in zip(items, rows, got):
        same_counts(result, item.areas(rows=item_rows))
    assert [len(r) for r in roi_masks.per_frame(items, RoIMasks.local)] == [12, 6, 18]
    # a full-image mask tensor among them takes `full`, with its rows
    mixed = roi_masks.per_frame([masks[:12], masks[12:].paste()], RoIMasks.areas, [[3, 0], [4, 1]],
                                full=lambda full, full_rows: (full[full_rows] >= 0.5).flatten(1).sum(1))
    same_counts(mixed[0], masks.areas(rows=[3, 0]))
    same_counts(mixed[1], masks.areas(rows=[16, 13]))


def test_moved_masks_are_the_probabilities_pasted_over_the_new_boxes(roi):
    """RoIMasks.moved (a skipped frame's masks, pipeline/track.py): to the bit what from_probs makes of the same
    probabilities over the new boxes, edges and boxes beyond the image included; a box moved by whole pixels
    pastes as the old paste shifted by as many pixels."""
    masks, _ = roi
    other = masks_and_boxes(seed=9)[1].to(masks.device)
    moved, fresh = masks.moved(other), RoIMasks.from_probs(masks.grids[:, 1:-1, 1:-1], other, (H, W))
    for name in roi_masks.TENSORS:
        assert torch.equal(getattr(moved, name), getattr(fresh, name)), name
    assert moved.image_size == (H, W) and moved.padding == masks.padding

    probs = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(2)).to(masks.device)
    boxes = torch.tensor([[30.3, 20.6, 80.1, 70.9], [100.5, 40.2, 140.7, 100.3]], device=masks.device)
    shifts = [(7, -5), (-12, 9)]  # (dx, dy): both windows stay inside the image
    original = RoIMasks.from_probs(probs, boxes, (H, W))
    offsets = torch.tensor([[dx, dy, dx, dy] for dx, dy in shifts], dtype=torch.float32, device=masks.device)
    pasted = original.moved(boxes + offsets).paste()
    for k, (dx, dy) in enumerate(shifts):
        same_pixels(pasted[k], torch.roll(original.paste()[k], shifts=(dy, dx), dims=(0, 1)))
        assert pasted[k].sum() > 100


def test_moved_instances_clip_their_boxes_and_keep_the_masks_whole():
    probs = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(3))
    inside = torch.tensor([[150.0, 40.0, 200.0, 90.0]])
    instances = Instances(image_size=(H, W), boxes=inside, scores=torch.tensor([0.9]), labels=torch.tensor([2]),
                          masks=RoIMasks.from_probs(probs, inside, (H, W)))
    beyond = inside + torch.tensor([[30.0, 80.0, 30.0, 80.0]])  # half out of the bottom-right corner
    moved = instances.moved(beyond)
    assert moved.boxes.tolist() == [[180.0, 120.0, W, H]] and torch.equal(moved.scores, instances.scores)
    # the mask is where the whole box puts it, cut by the image: not squeezed into the clipped box
    assert torch.equal(moved.masks.paste(), RoIMasks.from_probs(probs, beyond, (H, W)).paste())
    with pytest.raises(ValueError, match="RoIMasks"):
        instances.pasted().moved(beyond)
