"""StylizeStage: exactly the kept instances get stylized, each with its assigned style (checked against
stylize_regions called on that box alone); a background style fills everything outside the objects."""
from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

import pipeline.stylize_stage
import stylize.apply
from pipeline.assign import StyleAssigner
from pipeline.composite import Compositor
from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.stylize_stage import FACTOR_MEMORY_FRAMES, StylizeStage
from scripts.profiling import operators
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from stylize.apply import run_network, stylize_frames, stylize_regions
from stylize.bank import StyleBank
from stylize.errors import StyleError
from tests.helpers_cuda import gpu_waits
from tests.helpers_host_waits import as_on_gpu, counted_waits
from tests.tiny_models import distinct_styles, tiny_bank

H, W = 56, 72
CLASSES = ["__background__", "person", "dog"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return distinct_styles(StyleBank.load(tiny_bank(tmp_path_factory.mktemp("bank") / "tiny.pt",
                                                    names=("candy", "mosaic", "udnie"))))


def frame(index: int, squares: list[tuple[int, int, int, int, float]]) -> FrameRecord:
    """A textured frame with square instances (x, y, side, label, score)."""
    g = torch.Generator().manual_seed(index)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    masks = torch.zeros(len(squares), H, W)
    for k, (x, y, s, _, _) in enumerate(squares):
        masks[k, y:y + s, x:x + s] = 1.0
    instances = Instances(image_size=(H, W),
                          boxes=torch.tensor([[x, y, x + s, y + s] for x, y, s, _, _ in squares], dtype=torch.float32),
                          scores=torch.tensor([q[4] for q in squares]), labels=torch.tensor([q[3] for q in squares]),
                          masks=masks)
    return FrameRecord(index=index, pts=index, time_base=Fraction(1, 24), image=image, instances=instances,
                       track_ids=torch.arange(len(squares)) + 1)


def style_cfg(**overrides):
    return OmegaConf.create({"assign": "by_class", "palette": ["candy"], "class_styles": {"person": "candy",
                             "dog": "0.5*mosaic+0.5*udnie"}, "default_style": "original", "background": "original",
                             "exclude_classes": [], "min_score": 0.5, "min_area": 64, "margin": 8, "bank": None,
                             "precision": "fp32", **overrides})


@pytest.mark.parametrize("crop_bucket", [16, 64, "auto"])
def test_stylizes_exactly_the_kept_instances_with_their_styles(bank, crop_bucket):
    cfg = style_cfg(crop_bucket=crop_bucket)
    batch = [frame(0, [(4, 4, 20, 1, 0.9), (30, 10, 16, 2, 0.3), (40, 30, 20, 2, 0.8)]),
             frame(1, [(10, 20, 24, 2, 0.95), (44, 6, 6, 1, 0.9)])]   # 36 px < min_area
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    stage = StylizeStage.from_config(cfg, bank)
    stage(batch)
    assert [[(r.instance, r.style) for r in rec.stylized] for rec in batch] == [
        [(0, "candy"), (2, "0.5*mosaic+0.5*udnie")], [(0, "0.5*mosaic+0.5*udnie")]]
    assert all(rec.background is None and rec.timings["stylize"] >= 0 for rec in batch)
    frames = torch.stack([rec.image for rec in batch])
    for b, rec in enumerate(batch):
        for region in rec.stylized:
            alone = stylize_regions(bank.network, frames, torch.tensor([b]), rec.instances.boxes[region.instance][None],
                                    bank.weights_for(region.style)[None], margin=8, precision="fp32",
                                    bucket=16 if crop_bucket == "auto" else crop_bucket)
            (box, pixels), = alone
            assert region.box == box
            assert region.pixels.shape == (3, box[3] - box[1], box[2] - box[0])
            torch.testing.assert_close(region.pixels, pixels, atol=1e-5, rtol=1e-5)
    # The blend really is a different style from either of its parts.
    region = batch[1].stylized[0]
    alone = stylize_regions(bank.network, frames, torch.tensor([1]), batch[1].instances.boxes[:1],
                            bank.weights_for("mosaic")[None], margin=8, precision="fp32")[0][1]
    assert (alone - region.pixels).abs().max() > 1e-3


@pytest.mark.parametrize("region, propagate, calls", [
    ("crop", False, [2, 2, 2]), ("frame", False, [2, 2]), ("crop", True, [2, 2, 1]), ("frame", True, [2, 2])])
def test_network_calls_do_not_wait_for_the_gpu(bank, device, monkeypatch, region, propagate, calls):
    """Three crop sizes in two frames make three network calls, each on crops that are not neighbours in the batch
    (region=frame: one per style, on both frames). Their style weights reach the GPU without the host waiting
    (gpu/transfer.py): on a GPU the stage waits once per batch, to read the crop boxes, not once per call. It
    stylizes on the frames' device what the CPU does.
    With style.propagate and frame 1 skipped by the segmenter, the third object carries its crop over (the other
    two crops touch the frame's top or left edge, which their motion pulls into view): the masks' paste boxes come
    in the same one copy."""
    cfg = style_cfg(crop_bucket=4, class_styles={"person": "candy", "dog": "udnie"}, region=region,
                    propagate=propagate)
    squares = [(8, 8, 10, 1, 0.9), (28, 8, 16, 2, 0.9), (36, 26, 18, 1, 0.9)]  # crops of 28², 32², 36²

    def batch(on):
        records = [frame(0, squares), frame(1, [(x + 4, y + 4, side, label, score)  # on the crop grid: same sizes
                                                for x, y, side, label, score in squares])]
        StyleAssigner.from_config(cfg, bank, CLASSES)(records)
        for record in records:
            if propagate:  # square masks as the render has them, over their boxes
                found = record.instances
                record.instances = replace(found, masks=RoIMasks.from_probs(torch.ones(len(found), 28, 28),
                                                                            found.boxes, (H, W)))
            record.image, record.instances = record.image.to(on), record.instances.to(on)
        records[1].propagated = propagate
        return records

    want = StylizeStage.from_config(cfg, bank)(batch(torch.device("cpu")))
    seen = []
    monkeypatch.setattr(stylize.apply, "run_network",
                        lambda net, x, w, *args: seen.append(len(x)) or run_network(net, x, w, *args))
    stage = StylizeStage.from_config(cfg, bank)
    stage(batch(device))  # untimed once: first launches, the pinned memory pool
    seen.clear()
    records = batch(device)
    _, waits = gpu_waits(device, lambda: stage(records))
    assert seen == calls
    for record, expected in zip(records, want):
        assert [(r.instance, r.style, r.box) for r in record.stylized] == [
            (r.instance, r.style, r.box) for r in expected.stylized]
        for region, reference in zip(record.stylized, expected.stylized):
            torch.testing.assert_close(region.pixels.cpu(), reference.pixels, atol=2e-4, rtol=0)
    assert [r.carried for record in records for r in record.stylized] == [False] * 5 + [propagate]
    assert waits is None or waits <= 2  # the crop boxes (+ the timing's synchronize); was one more per call


@pytest.mark.parametrize("left_original", [{"dog": "original"}, {"exclude_classes": ["dog"]}])
def test_objects_left_original_under_a_background_add_no_gpu_wait(bank, left_original):
    """Under a background style, the objects left original (a class styled `original`, an excluded class) are
    composited from their own pixels over their crop boxes: those boxes come to the host in the stage's one read
    with the styled crops' (CPU stand-in for a GPU, tests/helpers_host_waits.py). Each frame read its own, twice:
    nine waits for four frames."""
    styles = {"class_styles": {"person": "mosaic", **left_original}} if "dog" in left_original else left_original
    cfg = style_cfg(background="candy", crop_bucket=16, **styles)
    records = [frame(i, [(8 + i, 8, 12, 1, 0.9), (30, 20 + i, 14, 2, 0.9)]) for i in range(4)]
    StyleAssigner.from_config(cfg, bank, CLASSES)(records)
    want = StylizeStage.from_config(cfg, bank)([replace(record) for record in records])
    for record in records:
        record.image = as_on_gpu(record.image)
        found = record.instances
        record.instances = replace(found, boxes=as_on_gpu(found.boxes), scores=as_on_gpu(found.scores),
                                   labels=as_on_gpu(found.labels), masks=as_on_gpu(found.masks))
    with counted_waits() as waits:
        StylizeStage.from_config(cfg, bank)(records)
    assert [what for what, _ in waits] == ["cpu"], waits
    assert [[(r.instance, r.style, r.box) for r in record.stylized] for record in records] == [
        [(r.instance, r.style, r.box) for r in record.stylized] for record in want]
    assert all(r.style == "original" for record in records for r in record.stylized if r.instance == 1)


@pytest.mark.parametrize("background", ["original", "candy", "udnie"])
def test_frame_region_cuts_each_instance_from_its_style_of_the_whole_frame(bank, background, monkeypatch):
    """region=frame: each kept instance's pixels are its style's stylization of the whole frame (stylize_frames
    on that frame alone, the oracle), over the same crop box as region=crop; a background style that an instance
    also uses is not run twice, and equals the oracle too."""
    cfg = style_cfg(region="frame", background=background)
    batch = [frame(0, [(4, 4, 20, 1, 0.9), (30, 10, 16, 2, 0.3), (40, 30, 20, 2, 0.8)]),
             frame(1, [(10, 20, 24, 2, 0.95), (44, 6, 10, 1, 0.9)]), frame(2, [])]
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    runs = []
    monkeypatch.setattr(pipeline.stylize_stage, "stylize_frames",
                        lambda network, frames, *a, **k: runs.append(len(frames)) or stylize_frames(network, frames, *a, **k))
    StylizeStage.from_config(cfg, bank)(batch)
    monkeypatch.undo()
    expected_regions = [[(0, "candy"), (2, "0.5*mosaic+0.5*udnie")], [(0, "0.5*mosaic+0.5*udnie"), (1, "candy")], []]
    assert [[(r.instance, r.style) for r in rec.stylized] for rec in batch] == expected_regions
    crop_mode = StylizeStage.from_config(style_cfg(background=background), bank)
    for b, rec in enumerate(batch):
        for region in rec.stylized:
            whole = stylize_frames(bank.network, rec.image[None], bank.weights_for(region.style), precision="fp32")[0]
            x1, y1, x2, y2 = region.box
            torch.testing.assert_close(region.pixels, whole[:, y1:y2, x1:x2], atol=1e-5, rtol=1e-5)
        if background == "original":
            assert rec.background is None
        else:
            torch.testing.assert_close(rec.background, stylize_frames(bank.network, rec.image[None],
                                       bank.weights_for(background), precision="fp32")[0], atol=1e-5, rtol=1e-5)
    crop_batch = [frame(r.index, []) for r in batch]
    for src, dst in zip(batch, crop_batch):
        dst.instances, dst.styles, dst.keep = src.instances, src.styles, src.keep
    crop_mode(crop_batch)
    assert [[r.box for r in rec.stylized] for rec in crop_batch] == [[r.box for r in rec.stylized] for rec in batch]
    # candy on frames 0 and 1, the blend on 0 and 1; udnie as background: frames 0-2 again, candy: frame 2 only
    assert runs == {"original": [2, 2], "candy": [2, 2, 1], "udnie": [2, 2, 3]}[background]


def test_background_style_fills_the_rest(bank):
    cfg = style_cfg(background="udnie")
    batch = [frame(0, [(10, 10, 20, 1, 0.9)]), frame(1, [])]
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    StylizeStage.from_config(cfg, bank)(batch)
    Compositor(feather_px=0)(batch)
    frames = torch.stack([rec.image for rec in batch])
    expected = stylize_frames(bank.network, frames, bank.weights_for("udnie"), precision="fp32")
    for rec, styled in zip(batch, expected):
        torch.testing.assert_close(rec.background, styled, atol=1e-5, rtol=1e-5)
        outside = torch.ones(H, W, dtype=torch.bool)
        outside[10:30, 10:30] = rec.index != 0
        target = (styled * 255).round().clamp(0, 255).to(torch.uint8)
        assert (rec.output[:, outside].int() - target[:, outside].int()).abs().max() <= 1
    inside = batch[0].output[:, 10:30, 10:30]
    crop = batch[0].stylized[0]
    x1, y1 = crop.box[:2]
    assert torch.equal(inside, (crop.pixels[:, 10 - y1:30 - y1, 10 - x1:30 - x1] * 255).round().to(torch.uint8))


@pytest.mark.parametrize("left_original", [dict(exclude_classes=["dog"]), dict(class_styles={"person": "candy"})])
def test_objects_left_original_stay_original_over_a_styled_background(bank, left_original):
    """conf/style: exclude_classes are "always left original", a class styled `original` is "left as it is"; under a
    background style they took the background's texture (the demo's excluded circle: 43 levels off its input). An
    object below min_score is no object: the background covers it."""
    cfg = style_cfg(background="udnie", **left_original)
    batch = [frame(0, [(8, 8, 20, 2, 0.9), (40, 8, 20, 1, 0.9), (8, 34, 20, 2, 0.3)])]
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    StylizeStage.from_config(cfg, bank)(batch)
    Compositor(feather_px=0)(batch)
    out, image, background = batch[0].output.int(), batch[0].image.int(), batch[0].background
    assert torch.equal(out[:, 8:28, 8:28], image[:, 8:28, 8:28])  # the dog, left original
    assert (out[:, 8:28, 40:60] - image[:, 8:28, 40:60]).abs().float().mean() > 10  # the person, candy
    weak = (background[:, 34:54, 8:28] * 255).round().int()
    assert (out[:, 34:54, 8:28] - weak).abs().max() <= 1  # the weak dog: under the background


def test_nothing_kept_and_original_background_costs_no_network(bank):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("the network must not run")

    class NoNetworkBank:
        network = Untouchable()
        weights_for = bank.weights_for

    batch = [frame(0, [(4, 4, 20, 1, 0.2)])]
    StyleAssigner.from_config(style_cfg(), bank, CLASSES)(batch)
    StylizeStage.from_config(style_cfg(), NoNetworkBank())(batch)
    assert batch[0].stylized == [] and batch[0].background is None


def test_bad_background_fails_at_construction(bank):
    with pytest.raises(StyleError, match="unknown style 'starry'"):
        StylizeStage.from_config(style_cfg(background="starry"), bank)
    with pytest.raises(SettingError, match="style.crop_bucket must be auto or a positive multiple of 4"):
        StylizeStage.from_config(style_cfg(crop_bucket=30), bank)
    with pytest.raises(SettingError, match="style.cuda_graphs must be true or false"):
        StylizeStage.from_config(style_cfg(cuda_graphs="yes"), bank)
    with pytest.raises(SettingError, match="style.region must be crop or frame, got 'box'"):
        StylizeStage.from_config(style_cfg(region="box"), bank)
    for bad in (0, 1.5, True):
        with pytest.raises(SettingError, match="style.downsample must be a positive integer"):
            StylizeStage.from_config(style_cfg(downsample=bad), bank)
    for bad in (47, 64.0, True, "256"):
        with pytest.raises(SettingError, match=r"style.max_side must be null or an integer >= 48 \(with margin"):
            StylizeStage.from_config(style_cfg(max_side=bad, margin=16), bank)
    with pytest.raises(SettingError, match="an integer >= 32 "):
        StylizeStage.from_config(style_cfg(max_side=16, margin=4), bank)
    assert StylizeStage.from_config(style_cfg(max_side=48, margin=16), bank).max_side == 48


def test_auto_crop_bucket_is_coarse_on_gpus_only_and_scales_with_the_frame(bank):
    stage = StylizeStage.from_config(style_cfg(), bank)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert stage.bucket(cpu, 1080, 1920) == 16 and stage.bucket(cpu, 240, 426) == 16
    sizes = {(240, 426): 64, (480, 854): 64, (720, 1280): 128, (1080, 1920): 256, (1920, 1080): 256,
             (2160, 3840): 512}
    assert {size: stage.bucket(cuda, *size) for size in sizes} == sizes
    assert StylizeStage.from_config(style_cfg(crop_bucket=32), bank).bucket(cuda, 1080, 1920) == 32


def test_a_tracked_object_keeps_its_max_side_factor_from_frame_to_frame(bank):
    """An object whose crop hovers at style.max_side keeps the factor it had (one stroke scale), frame to frame and
    across batches; an untracked one (-1) and a track unseen for more than FACTOR_MEMORY_FRAMES start afresh.
    Missing from a batch's last frame, or unseen for 48 frames, a track still has its factor when it is back;
    unseen for 49, not."""
    stage = StylizeStage.from_config(style_cfg(max_side=40, margin=8), bank)
    # crops at factor 1 (margin 8, 4 px grid): 30 px box -> 44 px, over the cap; 26 -> 40 and 22 -> 36, near it;
    # 14 -> 28, 0.7 of it
    sides = [30, 26, 22, 26, 14, 26, 22]

    def batch_factors(stage, start, sides, track_ids):
        batch = [frame(start + k, [(4, 4, side, 1, 0.9)]) for k, side in enumerate(sides)]
        for record, track in zip(batch, track_ids):
            record.track_ids = torch.tensor([track])
        jobs = [(b, 0, "candy") for b in range(len(batch))]
        boxes = torch.stack([record.instances.boxes[0] for record in batch])
        return stage._factors(batch, jobs, boxes, (H, W))

    def factors(start, track_ids):
        return batch_factors(stage, start, sides, track_ids)

    assert factors(0, [5] * 7) == [2, 2, 2, 2, 1, 1, 1]  # keeps 2 near the cap, back to 1 with room
    assert factors(7, [-1] * 7) == [2, 1, 1, 1, 1, 1, 1]  # untracked: each frame on its own
    assert factors(14, [5] * 7) == [2, 2, 2, 2, 1, 1, 1]
    assert stage._track_factors[5] == (1, 20)
    factors(14 + FACTOR_MEMORY_FRAMES + 7, [6] * 7)
    assert 5 not in stage._track_factors

    # a 26 px box takes factor 1 afresh, 2 on a track that had 2 (the memory kept only the batch's last frame's)
    missing = StylizeStage.from_config(style_cfg(max_side=40, margin=8), bank)
    assert batch_factors(missing, 0, [30, 26, 26], [5, 5, 7]) == [2, 2, 1]
    assert batch_factors(missing, 3, [26], [5]) == [2]
    for unseen, factor in ((47, 2), (FACTOR_MEMORY_FRAMES, 2), (49, 1)):
        gap = StylizeStage.from_config(style_cfg(max_side=40, margin=8), bank)
        assert batch_factors(gap, 0, [30], [5]) == [2]
        batch_factors(gap, 1, [14] * unseen, [6] * unseen)
        assert batch_factors(gap, unseen + 1, [26], [5]) == [factor], unseen


@pytest.mark.parametrize("downsample", [2, 3])
def test_downsample_reaches_the_network_with_the_bucket_of_the_frame_it_sees(bank, monkeypatch, downsample):
    """The stage hands `downsample` and `max_side` to stylize_regions and stylize_frames, and picks the bucket for
    the frame the net sees (1080p at 1/2: 540×960, 128 px on a GPU)."""
    seen = {}

    def regions(network, frames, frame_index, boxes, weights, **options):
        seen.update(options)
        return [((0, 0, 8, 8), torch.zeros(3, 8, 8)) for _ in boxes]

    def bucket(device, height, width):
        seen["net frame"] = (height, width)
        return 64

    monkeypatch.setattr(pipeline.stylize_stage, "stylize_regions", regions)
    stage = StylizeStage.from_config(style_cfg(downsample=downsample, max_side=96), bank)
    monkeypatch.setattr(stage, "bucket", bucket)
    frames = torch.zeros(1, 3, 1080, 1920, dtype=torch.uint8)
    stage._crops(frames, [(0, 0, "candy")], torch.tensor([[10.0, 10, 50, 50]]))
    assert seen["downsample"] == downsample and seen["max_side"] == 96 and seen["bucket"] == 64
    monkeypatch.setattr(pipeline.stylize_stage, "stylize_frames", lambda network, x, w, **options: seen.update(
        frame_options=options) or x.float())
    stage._whole(frames, "candy", [0])  # region=frame and the background
    assert seen["frame_options"]["downsample"] == downsample and seen["frame_options"]["max_side"] == 96
    assert seen["net frame"] == (math.ceil(1080 / downsample), math.ceil(1920 / downsample))
    assert StylizeStage.from_config(style_cfg(), bank).bucket(torch.device("cuda"), 540, 960) == 128


@pytest.mark.parametrize("setting", [dict(region="frame"), dict(background="udnie", exclude_classes=["dog"])],
                         ids=["region=frame", "left original under a background"])
def test_the_feather_fades_out_inside_every_crop_when_downsampled(bank, setting):
    """The render lets composite.feather_px reach style.margin x style.downsample frame px. region=frame's crops and
    those of objects left original under a background style took style.margin px only: the feathered alpha was cut
    at the crop's edge, 0.22 one pixel inside (a seam). Every crop leaves the feather its room, as a styled crop
    does. A 16 px square 2 px off the 4 px grid on every side: margin 2 alone would end each crop there."""
    cfg = style_cfg(margin=2, downsample=2, **setting)
    batch = [frame(0, [(30, 22, 16, 1 if setting.get("region") else 2, 0.9)])]
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    StylizeStage.from_config(cfg, bank)(batch)
    record = batch[0]
    region, = record.stylized
    assert region.style == ("candy" if setting.get("region") else "original")
    # white regions over black: the output is the alpha, in 0..255
    record.image = torch.zeros_like(record.image)
    record.background = None if record.background is None else torch.zeros_like(record.background)
    region.pixels = torch.ones_like(region.pixels)
    Compositor(feather_px=4)(batch)
    alpha = record.output[0].float() / 255
    x1, y1, x2, y2 = region.box
    assert 0 < x1 and 0 < y1 and x2 < W and y2 < H
    ring = torch.cat([alpha[y1, x1:x2], alpha[y2 - 1, x1:x2], alpha[y1:y2, x1], alpha[y1:y2, x2 - 1]])
    assert ring.max() < 0.01, (region.box, ring.max())
    assert alpha[30, 38] == 1  # the object's middle: fully its region's


def test_precision_is_checked_at_construction(bank):
    """style.precision=fp16 was refused only at the first network call: a render with nothing detected went
    through, one with objects failed frames in."""
    with pytest.raises(SettingError, match=r"^style.precision must be auto, fp32 or bf16, got 'fp16'$"):
        StylizeStage.from_config(style_cfg(precision="fp16"), bank)
    assert StylizeStage.from_config(style_cfg(precision="bf16"), bank).precision == "bf16"


def test_crop_bucket_is_bounded_and_padding_stops_at_the_frame(bank, monkeypatch):
    """A crop bucket larger than the frame padded every crop to it (1024² inputs on a 256² frame: 40x slower), and
    any bucket was taken (4000 did not finish): each padded side stops at the frame's, rounded up to 4."""
    with pytest.raises(SettingError, match=r"style.crop_bucket must be auto or a positive multiple of 4 up to 1024"):
        StylizeStage.from_config(style_cfg(crop_bucket=1028), bank)
    shapes = []
    monkeypatch.setattr(stylize.apply, "run_network",
                        lambda net, x, *args: shapes.append(tuple(x.shape[-2:])) or run_network(net, x, *args))
    cfg = style_cfg(crop_bucket=1024)
    batch = [frame(0, [(4, 4, 20, 1, 0.9), (40, 30, 20, 2, 0.8)])]
    StyleAssigner.from_config(cfg, bank, CLASSES)(batch)
    StylizeStage.from_config(cfg, bank)(batch)
    assert shapes and all(h <= H and w <= W for h, w in shapes), shapes


def test_factors_read_a_frames_track_ids_once(bank):
    """`_factors` reads a frame's track ids as one list: an element of the tensor per job was an operator per object."""
    stage = StylizeStage.from_config(style_cfg(max_side=40, margin=8), bank)

    def counted(n: int) -> int:
        record = frame(0, [(2 + 8 * k, 4, 6, 1, 0.9) for k in range(n)])
        jobs = [(0, k, "candy") for k in range(n)]
        return operators(lambda: stage._factors([record], jobs, record.instances.boxes, (H, W)))

    assert counted(6) == counted(2)
    assert sorted(stage._track_factors) == list(range(1, 7))
