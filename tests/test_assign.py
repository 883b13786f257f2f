"""StyleAssigner: by_class map, per_instance palette (round robin, kept for a track's life), excluded classes,
score / area thresholds, background, and early errors for unknown styles and classes."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.assign import StyleAssigner
from common.errors import SettingError
from pipeline.record import FrameRecord
from pipeline.track import Tracker
from segment.roi_masks import RoIMasks
from segment.structures import Instances
from stylize.bank import StyleBank
from stylize.errors import StyleError
from tests.helpers_cuda import gpu_waits
from tests.tiny_models import CLASS_NAMES, tiny_bank

CLASSES = ["__background__", "person", "dog", "car"]
H, W = 40, 60


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return StyleBank.load(tiny_bank(tmp_path_factory.mktemp("bank") / "tiny.pt", names=("candy", "mosaic", "udnie")))


def record(objects: list[tuple], track_ids: list[int] | None = None, index: int = 0, roi: bool = False) -> FrameRecord:
    """objects: (x, y, side, label, score) squares → a record with those instances (and track ids, if given);
    `roi`: their masks as RoIMasks (a uniform grid over each box), as the render's segment stage gives them."""
    masks = torch.zeros(len(objects), H, W)
    for k, (x, y, side, _, _) in enumerate(objects):
        masks[k, y:y + side, x:x + side] = 0.9
    boxes = torch.tensor([[x, y, x + s, y + s] for x, y, s, _, _ in objects], dtype=torch.float32).reshape(-1, 4)
    if roi:
        masks = RoIMasks.from_probs(torch.full((len(objects), 28, 28), 0.9), boxes, (H, W))
    instances = Instances(image_size=(H, W), boxes=boxes,
                          scores=torch.tensor([o[4] for o in objects], dtype=torch.float32),
                          labels=torch.tensor([o[3] for o in objects], dtype=torch.long), masks=masks)
    return FrameRecord(index=index, pts=index, time_base=Fraction(1, 24), image=torch.zeros(3, H, W, dtype=torch.uint8),
                       instances=instances, track_ids=None if track_ids is None else torch.tensor(track_ids))


def config(**overrides):
    base = {"assign": "by_class", "palette": ["candy", "mosaic"], "palette_memory": 48, "class_styles": {"person": "candy", "dog": "udnie"},
            "default_style": "mosaic", "background": "original", "exclude_classes": [], "min_score": 0.5,
            "min_area": 64, "margin": 16, "bank": None, "precision": "auto"}
    return OmegaConf.create({**base, **overrides})


def test_by_class_map_and_default_style(bank):
    assigner = StyleAssigner.from_config(config(), bank, CLASSES)
    r = record([(0, 0, 10, 1, 0.9), (20, 0, 10, 2, 0.9), (40, 0, 10, 3, 0.9)])
    assigner([r])
    assert r.styles == ["candy", "udnie", "mosaic"]
    assert r.keep.tolist() == [True, True, True]
    assert assigner.styles_used == {"candy", "udnie", "mosaic"}
    assert r.timings["assign"] >= 0


@pytest.mark.parametrize("roi", [False, True])
def test_filters_are_read_back_once_per_batch(bank, device, roi):
    """The score and area filters run on the instances' device; the batch's labels and score verdicts come back
    to the host in one copy, the areas of those that passed in a second (with RoIMasks, their windows in a third):
    on a GPU a few waits per batch, not per frame. `keep` is on the host, as its readers want it."""
    objects = [[(0, 0, 10, 1, 0.9), (20, 0, 6, 2, 0.9), (40, 0, 10, 3, 0.4)], [], [(5, 5, 12, 2, 0.7)]]
    want = [record(o, index=i, roi=roi) for i, o in enumerate(objects)]
    StyleAssigner.from_config(config(), bank, CLASSES)(want)

    def on_device() -> list[FrameRecord]:
        batch = [record(o, index=i, roi=roi) for i, o in enumerate(objects)]
        for r in batch:
            r.instances, r.image = r.instances.to(device), r.image.to(device)
        return batch

    # once untimed: the paste's constant tensors are made and copied to the device once per process
    StyleAssigner.from_config(config(), bank, CLASSES)(on_device())
    batch, assigner = on_device(), StyleAssigner.from_config(config(), bank, CLASSES)
    _, waits = gpu_waits(device, lambda: assigner(batch))
    assert [r.styles for r in batch] == [r.styles for r in want] == [["candy", None, None], [], ["udnie"]]
    assert [r.keep.tolist() for r in batch] == [[True, False, False], [], [True]]
    assert all(r.keep.device.type == "cpu" for r in batch)
    copies = 3 if roi else 2
    assert waits is None or copies <= waits <= copies + 1  # (+ the timing's synchronize); was three per frame


def test_default_style_original_leaves_unmapped_classes(bank):
    assigner = StyleAssigner.from_config(config(default_style="original"), bank, CLASSES)
    r = record([(0, 0, 10, 1, 0.9), (40, 0, 10, 3, 0.9)])
    assigner([r])
    assert r.styles == ["candy", None] and r.keep.tolist() == [True, True]  # kept: an object, left original


def test_excluded_classes_and_thresholds(bank):
    assigner = StyleAssigner.from_config(config(exclude_classes=["dog"], min_score=0.6, min_area=50), bank, CLASSES)
    r = record([(0, 0, 10, 2, 0.9),    # excluded class
                (20, 0, 10, 1, 0.55),  # below min_score
                (40, 0, 7, 1, 0.9),    # 49 px < min_area
                (40, 20, 8, 1, 0.6)])  # 64 px, score at the threshold: kept
    assigner([r])
    assert r.styles == [None, None, None, "candy"]
    assert r.keep.tolist() == [True, False, False, True]  # the dog is an object, left original
    assert assigner.styles_used == {"candy"}


def test_per_instance_round_robin_and_persistence(bank):
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=["candy", "mosaic", "udnie"]),
                                         bank, CLASSES)
    frames = [
        record([(0, 0, 10, 1, 0.9), (20, 0, 10, 1, 0.9)], [1, 2]),
        record([(20, 0, 10, 1, 0.9)], [2]),                                              # track 1 missed
        record([(0, 0, 10, 1, 0.9), (20, 0, 10, 1, 0.9), (40, 0, 10, 2, 0.9)], [1, 2, 3]),
        record([(40, 0, 10, 2, 0.9), (0, 20, 10, 3, 0.9), (20, 20, 10, 1, 0.2)], [3, 4, -1]),
    ]
    assigner(frames)
    assert [r.styles for r in frames] == [["candy", "mosaic"], ["mosaic"], ["candy", "mosaic", "udnie"],
                                          ["udnie", "candy", None]]  # track 4 wraps round; untracked stays
    with pytest.raises(ValueError, match="track ids"):
        assigner([record([(0, 0, 10, 1, 0.9)])])


def test_new_track_skips_the_style_of_a_live_track(bank):
    # Tracks 2 and 3 leave; track 1 (candy) stays. Round robin alone would give new track 4 candy again, and the
    # two objects on screen would look alike.
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=["candy", "mosaic", "udnie"]),
                                         bank, CLASSES)
    a, b, c, d = (0, 0, 10, 1, 0.9), (20, 0, 10, 1, 0.9), (40, 0, 10, 1, 0.9), (0, 20, 10, 1, 0.9)
    frames = [record([a, b, c], [1, 2, 3], index=0), record([a], [1], index=30), record([a, d], [1, 4], index=31)]
    assigner(frames)
    assert frames[-1].styles == ["candy", "mosaic"]


@pytest.mark.parametrize("memory, expected", [
    (3, "mosaic"),    # tracks 2 (mosaic, seen at 1) and 3 (udnie, seen at 0) both expired: round robin order
    (10, "udnie"),    # every style held: the one whose holder was seen longest ago
])
def test_palette_memory_expiry_and_least_recent_fallback(bank, memory, expected):
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=["candy", "mosaic", "udnie"],
                                                palette_memory=memory), bank, CLASSES)
    a, b, c, d = (0, 0, 10, 1, 0.9), (20, 0, 10, 1, 0.9), (40, 0, 10, 1, 0.9), (0, 20, 10, 1, 0.9)
    frames = [record([a, b, c], [1, 2, 3], index=0), record([a, b], [1, 2], index=1), record([a], [1], index=2),
              record([a, d], [1, 4], index=5)]
    assigner(frames)
    assert frames[-1].styles == ["candy", expected]


def palette_styles(bank, memory: int, frames: list[tuple[int, list[int]]]) -> list[list[str | None]]:
    """Per frame (its index, its track ids: one 10 px square each), the styles per_instance gives from the palette
    candy, mosaic, udnie at palette_memory `memory`."""
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=["candy", "mosaic", "udnie"],
                                                palette_memory=memory), bank, CLASSES)
    records = [record([(12 * k, 0, 10, 1, 0.9) for k in range(len(ids))], ids, index=index) for index, ids in frames]
    return [r.styles for r in assigner(records)]


def test_a_track_seen_exactly_palette_memory_frames_ago_still_holds_its_style(bank):
    """memory 2. Frame 0: tracks 1, 2 take candy, mosaic. Frame 3: track 2 (seen at 0, 3 > 2 frames ago) holds
    nothing, track 1 candy: new track 3 takes the next in turn, udnie. Frame 5: tracks 1 and 3, seen at 3, 5 - 3 = 2
    frames ago, still hold candy and udnie (the memory counts "within", <=), so new track 4 takes mosaic, not candy."""
    assert palette_styles(bank, 2, [(0, [1, 2]), (3, [1, 3]), (5, [4])]) == [
        ["candy", "mosaic"], ["candy", "udnie"], ["mosaic"]]


def test_two_new_tracks_in_one_frame_take_different_styles_when_every_style_is_held(bank):
    """memory 4. Frame 4: track 1 candy. Frame 7: tracks 2, 3 mosaic, udnie. Frame 8: every style is held (track 1,
    seen 4 frames ago, within the memory), so new track 4 takes the one whose holders were seen longest ago: candy
    (4, against 7 and 7). Then candy is held by track 4 too, seen now: its holders were last seen at 8, not 4, so new
    track 5 takes mosaic (7; udnie's 7 too, mosaic first in turn), not candy a second time."""
    assert palette_styles(bank, 4, [(4, [1]), (7, [2, 3]), (8, [4, 5])]) == [
        ["candy"], ["mosaic", "udnie"], ["candy", "mosaic"]]


def test_round_robin_goes_on_after_the_style_taken_not_after_the_one_in_turn(bank):
    """memory 3. Frame 3: tracks 1, 2 candy, mosaic. Frame 6: track 3 takes udnie (free); next in turn candy, but
    every style is held, so new track 4 takes mosaic (track 2, seen at 3, longest ago), and round robin goes on after
    mosaic. Frame 9: track 2 is past the memory; candy, udnie, mosaic all held by tracks seen at 6, a tie kept in turn
    from udnie: track 5 udnie, track 6 candy (udnie now held at 9). Going on after the style in turn (candy) instead
    gave mosaic, udnie."""
    assert palette_styles(bank, 3, [(3, [1, 2]), (6, [1, 3, 4]), (9, [5, 6])]) == [
        ["candy", "mosaic"], ["candy", "udnie", "mosaic"], ["udnie", "candy"]]


@pytest.mark.parametrize("memory", [-1, 2.5, "long", True])
def test_bad_palette_memory_is_rejected(bank, memory):
    with pytest.raises(SettingError, match="palette_memory"):
        StyleAssigner.from_config(config(assign="per_instance", palette_memory=memory), bank, CLASSES)


def test_tracked_object_keeps_its_style_through_a_miss(bank):
    tracker = Tracker(max_misses=2)
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=["candy", "mosaic", "udnie"]),
                                         bank, CLASSES)
    a, b = (5, 5, 12, 1, 0.9), (40, 20, 12, 2, 0.9)
    frames = [record([a, b], index=0), record([b], index=1), record([b, (6, 5, 12, 1, 0.9)], index=2),
              record([(7, 6, 12, 1, 0.9), b], index=3)]
    assigner(tracker(frames))
    assert [r.styles for r in frames] == [["candy", "mosaic"], ["mosaic"], ["mosaic", "candy"], ["candy", "mosaic"]]


@pytest.mark.parametrize("memory", [0, 4, 9])
def test_forgetting_ended_tracks_changes_no_style_and_bounds_what_is_held(bank, memory):
    """A long run of short-lived tracks (five new ones a frame, as a COCO model's busy scene starts them), some
    seen again after gaps of up to the horizon: the styles equal those of an assigner that forgets nothing, frame by
    frame, while it holds exactly the tracks seen within the horizon (or the palette's memory, if longer) instead
    of every track so far (each new track's palette choice read them all: the stage's time grew with the video)."""
    g = torch.Generator().manual_seed(0)
    horizon, styled = 6, config(assign="per_instance", palette=["candy", "mosaic", "udnie"], palette_memory=memory)
    forgetful = StyleAssigner.from_config(styled, bank, CLASSES, track_horizon=horizon)
    keeper = StyleAssigner.from_config(styled, bank, CLASSES)
    last_seen: dict[int, int] = {}
    for index in range(300):
        alive = [t for t, seen in last_seen.items() if index - seen <= horizon]
        ids = [t for t in alive if torch.rand((), generator=g) < 0.2][:6] + list(range(5 * index + 1, 5 * index + 6))
        last_seen.update((t, index) for t in ids)
        objects = [(10 * (i % 6), 10 * (i // 6), 8, 1, 0.9) for i in range(len(ids))]  # 64 px: min_area
        frames = [record(objects, ids, index=index) for _ in range(2)]
        forgetful(frames[:1])
        keeper(frames[1:])
        assert frames[0].styles == frames[1].styles and None not in frames[0].styles
        assert sorted(forgetful._track_styles) == sorted(
            t for t, seen in last_seen.items() if index - seen <= max(horizon, memory))
    assert len(keeper._track_styles) == 1500


def test_the_render_forgets_tracks_after_the_trackers_horizon(tmp_path):
    """Missed on max_misses segmented frames, each up to segment_every apart, a track can still come back."""
    from pipeline.render import build_stages, compose_config
    from tests.render_cli import tiny_model_overrides

    assert Tracker(max_misses=5).horizon(1) == 6 and Tracker(max_misses=2).horizon(3) == 9
    # the render's assigner keeps a track that long (palette_memory=0: the horizon alone decides)
    cfg = compose_config(["input=in.mp4", "output=out.mp4", *tiny_model_overrides(tmp_path), "segment_every=4",
                          "track.max_misses=2", "style.palette_memory=0"])
    assigner = dict(build_stages(cfg, torch.device("cpu"), None, tmp_path / "out.mp4").run)["assign"]
    assert assigner.horizon == Tracker(max_misses=2).horizon(4) == 12


def test_blend_spec_and_background_count_as_used(bank):
    assigner = StyleAssigner.from_config(config(class_styles={"person": "0.5*candy+0.5*udnie"}, background="mosaic"),
                                         bank, CLASSES)
    r = record([(0, 0, 10, 1, 0.9)])
    assigner([r])
    assert r.styles == ["0.5*candy+0.5*udnie"]
    assert assigner.styles_used == {"0.5*candy+0.5*udnie", "mosaic"}


def test_an_index_spec_counts_by_its_style_name(bank):
    """style.palette=[1] (an index, which the docs allow) gave the render's summary "styles used: 1"."""
    assigner = StyleAssigner.from_config(config(assign="per_instance", palette=[1], background=2), bank, CLASSES)
    r = record([(0, 0, 10, 1, 0.9)], track_ids=[0])
    assigner([r])
    assert r.styles == ["1"] and assigner.styles_used == {"mosaic", "udnie"}


def test_empty_frame(bank):
    r = record([])
    StyleAssigner.from_config(config(), bank, CLASSES)([r])
    assert r.styles == [] and r.keep.shape == (0,)


@pytest.mark.parametrize("key, value, setting", [
    ("palette", ["candy", "van_gogh"], "style.palette"), ("default_style", "nope", "style.default_style"),
    ("background", "0.5*candy+0.5*nope", "style.background"), ("class_styles", {"dog": "x"}, "style.class_styles.dog"),
])
def test_unknown_style_fails_early_naming_the_setting_and_listing_the_bank(bank, key, value, setting):
    """The message named the style and the bank's, not the setting that gave it."""
    with pytest.raises(StyleError, match="available: candy, mosaic, udnie$") as error:
        StyleAssigner.from_config(config(**{key: value}), bank, CLASSES)
    assert str(error.value).startswith(f"{setting}: unknown style ")


def test_a_bank_of_other_names_runs_per_instance_with_the_default_style_group(tmp_path):
    """style.bank=<a bank holding 'paint'> style.palette=[paint] stopped every per_instance render with "unknown
    style 'style_01'": the default group's class_styles and default_style, which only by_class uses, were checked
    against the bank under every policy."""
    from pipeline.render import compose_config

    paint = tiny_bank(tmp_path / "paint.pt", names=("paint",))
    cfg = compose_config(["input=x.mp4", "output=y.mp4", f"style.bank={paint}", "style.palette=[paint]"]).style
    assert cfg.class_styles and cfg.default_style == "style_19"  # the group's, naming the 26 imported styles
    assigner = StyleAssigner.from_config(cfg, StyleBank.load(paint), CLASS_NAMES)
    frame = record([(0, 0, 10, 1, 0.9)], track_ids=[1])
    assigner([frame])
    assert frame.styles == ["paint"]
    cfg.assign = "by_class"  # the policy that reads them: refused, naming the setting
    with pytest.raises(StyleError, match=r"^style\.class_styles\.\w+: unknown style 'style_\d\d'; available: paint$"):
        StyleAssigner.from_config(cfg, StyleBank.load(paint), CLASS_NAMES)


@pytest.mark.parametrize("policy", ["by_class", "per_instance"])
@pytest.mark.parametrize("value", ["abc", ["candy"], 3])
def test_a_class_map_that_is_no_map_is_one_line(bank, policy, value):
    """style.class_styles=abc was AttributeError: 'str' object has no attribute 'items'."""
    with pytest.raises(SettingError, match=r"^style\.class_styles must be a map of class to style \("):
        StyleAssigner.from_config(config(assign=policy, class_styles=value), bank, CLASSES)


@pytest.mark.parametrize("key, value", [("class_styles", {"cat": "candy"}), ("exclude_classes", ["horse"])])
def test_unknown_class_fails_early_listing_the_model_classes(bank, key, value):
    with pytest.raises(SettingError, match="the model's classes: person, dog, car$") as error:
        StyleAssigner.from_config(config(**{key: value}), bank, CLASSES)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key, value", [("class_styles", {"N/A": "candy"}), ("exclude_classes", ["N/A"]),
                                        ("exclude_classes", ["unicorn"])])
def test_coco_gaps_are_not_classes(bank, key, value):
    """torchvision's 91 COCO names hold 11 'N/A' gaps: the list of the model's classes repeated "N/A" 11 times, and
    'N/A' passed as a class to exclude or style."""
    from segment.config import coco_class_names

    with pytest.raises(SettingError) as error:
        StyleAssigner.from_config(config(**{key: value}), bank, coco_class_names())
    message = str(error.value)
    assert f"unknown class {next(iter(value))!r} in style.{key}" in message
    assert "N/A" not in message.split("the model's classes: ")[1] and "person, bicycle, car" in message


def test_class_map_is_not_checked_when_unused(bank):
    # per_instance ignores class_styles, so a map for another model's classes must not stop the render.
    StyleAssigner.from_config(config(assign="per_instance", class_styles={"circle": "candy"}), bank, CLASSES)


def test_bad_settings(bank):
    with pytest.raises(SettingError, match="by_class, per_instance"):
        StyleAssigner.from_config(config(assign="random"), bank, CLASSES)
    with pytest.raises(SettingError, match="palette"):
        StyleAssigner.from_config(config(assign="per_instance", palette=[]), bank, CLASSES)
    with pytest.raises(SettingError, match="unknown style setting"):
        StyleAssigner.from_config(config(min_scor=0.3), bank, CLASSES)


@pytest.mark.parametrize("class_map", ["shapes", "coco"])
def test_default_config_with_the_real_bank_names(class_map):
    """The composed render config's style group names styles of the 26-style bank, and each class map names classes
    of the segmenter it is meant for (shapes: the demo model, coco: torchvision's 91 COCO categories)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from segment.config import coco_class_names
    from segment.data.synthetic import CLASS_NAMES

    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="render", overrides=[f"style/class_styles={class_map}"]).style
    names = [f"style_{i:02d}" for i in range(26)]
    specs = [*cfg.palette, *cfg.class_styles.values(), cfg.default_style]
    assert all(s in names for s in specs)
    assert set(cfg.class_styles) <= set(CLASS_NAMES if class_map == "shapes" else coco_class_names())
    assert set(cfg) == {"assign", "palette", "palette_memory", "class_styles", "default_style", "background", "exclude_classes",
                        "min_score", "min_area", "margin", "region", "downsample", "max_side", "propagate", "crop_bucket",
                        "cuda_graphs", "bank", "extra_styles", "precision"}


def test_one_item_given_for_a_list_is_that_item(bank):
    """style.palette=mosaic and style.exclude_classes=dog from the command line are strings: one style, one class
    (they were taken character by character: "unknown style 'm'")."""
    frames = [record([(0, 0, 10, 1, 0.9), (20, 0, 10, 2, 0.9)], track_ids=[1, 2])]
    for palette, excluded in (("mosaic", "dog"), (["mosaic"], ["dog"])):
        assigner = StyleAssigner.from_config(config(assign="per_instance", palette=palette, exclude_classes=excluded),
                                             bank, CLASSES)
        assigner(frames)
        assert frames[0].styles == ["mosaic", None]


def test_only_shown_tracks_take_palette_styles(bank):
    """A track of an excluded class, or one below min_score or min_area, took the next palette style although it
    was never drawn, so the objects drawn shared one: palette [candy, mosaic], an excluded dog between two people
    gave both people candy. A track takes its style on the first frame it is drawn, and keeps it."""
    assigner = StyleAssigner.from_config(config(assign="per_instance", exclude_classes=["dog"]), bank, CLASSES)
    first = record([(0, 0, 10, 1, 0.9), (20, 0, 10, 2, 0.9), (40, 0, 4, 3, 0.9), (0, 20, 10, 3, 0.3),
                    (40, 20, 10, 1, 0.9)], track_ids=[1, 2, 3, 4, 5])
    assigner([first])
    assert first.styles == ["candy", None, None, None, "mosaic"]  # the dog, the tiny car, the weak car: not drawn
    later = record([(0, 20, 10, 3, 0.9), (0, 0, 10, 1, 0.9)], track_ids=[4, 1], index=1)
    assigner([later])
    assert later.styles == ["mosaic", "candy"]  # the car, drawn now, takes a palette style; the person keeps his
