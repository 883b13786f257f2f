"""The GPU waits that the stages' docstrings and docs/architecture.md promise, counted on the CPU: each stage runs on
batches of 4 frames whose device tensors stand for a GPU's (tests/helpers_host_waits.py), and the list of its waits
(what waited, and in which file) is asserted exactly, for each of two batches in a row. A wait added per frame or per
detection fails these; `gpu_waits` (tests/helpers_cuda.py) counts the real ones, but only under `--device cuda`."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.assign import StyleAssigner
from pipeline.composite import Compositor
from pipeline.record import FrameRecord
from pipeline.segment_stage import SCENE_CUT, SegmentStage
from pipeline.stylize_stage import StylizeStage
from pipeline.track import Tracker
from segment.roi_masks import RoIMasks
from stylize.bank import StyleBank
from tests.helpers_host_waits import SimulatedGpuTensor, counted_waits, instances_on_gpu, on_gpu
from tests.test_segment_stage import shots
from tests.test_track import square_instances
from tests.tiny_models import distinct_styles, tiny_bank

H, W = 48, 80
CLASSES = ["__background__", "person", "dog"]
STAGES = ("track", "assign", "stylize", "composite")
# (what waited, the file that asked)
COPY = ("cpu", "pipeline/host_copy.py")           # to_host: a batch's small per-frame tensors in one copy
WINDOWS = ("tolist", "segment/roi_masks.py")      # RoIMasks.read_windows: a batch's mask windows in one copy
COUNTS = ("tolist", "pipeline/segment_stage.py")  # the batch's detection counts (with them, or before, its changes)


@dataclass(frozen=True)
class Setting:
    every: int = 1                                # segment_every: the frames between are `propagated`
    roi: bool = True                              # masks as RoIMasks, as the render's segment stage gives them
    track: dict = field(default_factory=dict)
    style: dict = field(default_factory=dict)
    composite: dict = field(default_factory=dict)


SETTINGS = {
    "default": Setting(),
    "segment_every=3 propagate": Setting(every=3, style={"propagate": True}),
    "region=frame": Setting(style={"region": "frame"}),
    "background, a class left original": Setting(style={"background": "udnie", "exclude_classes": ["dog"]}),
    "max_side": Setting(style={"max_side": 32}),
    "smooth_masks": Setting(composite={"smooth_masks": 0.5, "feather_px": 2, "mask_threshold": 0.4}),
    "match_on=box": Setting(track={"match_on": "box"}),
    "full masks": Setting(roi=False),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: torch's threads cost more than they save (a busy 2-core machine ran these renders in 42 s on
    two threads, 3 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> StyleBank:
    return distinct_styles(StyleBank.load(tiny_bank(tmp_path_factory.mktemp("bank") / "tiny.pt",
                                                    names=("candy", "mosaic", "udnie"))))


def frames(start: int, setting: Setting, gpu: bool) -> list[FrameRecord]:
    """Frames start..start+3 as the segment stage leaves them: a person moving right (its crop over style.max_side),
    a dog moving down and a weak detection (no track, below min_score); `propagated` between the segmented frames."""
    records = []
    for i in range(start, start + 4):
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        skipped = i % setting.every != 0
        instances = None if skipped else square_instances(
            [(6 + 2 * i, 8, 28, 1, 0.9), (56, 20 + i, 14, 2, 0.8), (40, 34, 10, 1, 0.3)], size=(H, W))
        if instances is not None and not setting.roi:
            instances = replace(instances, masks=instances.masks.paste())
        record = FrameRecord(index=i, pts=i, time_base=Fraction(1, 24), image=image, instances=instances,
                             propagated=skipped)
        records.append(on_gpu(record) if gpu else record)
    return records


def stages(setting: Setting, bank: StyleBank) -> list:
    style = OmegaConf.create({"assign": "per_instance", "palette": ["candy", "mosaic"], "min_area": 16, "margin": 4,
                              "precision": "fp32", **setting.style})
    return [Tracker(**setting.track), StyleAssigner.from_config(style, bank, CLASSES),
            StylizeStage.from_config(style, bank), Compositor(**setting.composite)]


def by_file(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Waits as (what, file): the lines move with every edit."""
    return [(what, line.rsplit(":", 1)[0]) for what, line in found]


@pytest.fixture(scope="module")
def render(bank):
    """render(setting's name, gpu=True): two batches through track, assign, stylize and composite (each setting
    run once): per stage, each batch's waits; and the records."""
    @functools.cache
    def run(name: str, gpu: bool = True) -> tuple[dict[str, list[list[tuple[str, str]]]], list[FrameRecord]]:
        setting = SETTINGS[name]
        waits: dict[str, list[list[tuple[str, str]]]] = {stage: [] for stage in STAGES}
        records, chain = [], stages(setting, bank)
        for start in (0, 4):
            batch = frames(start, setting, gpu)
            for stage in chain:
                with counted_waits() as found:
                    stage(batch)
                waits[stage.name].append(by_file(found))
            records += batch
        return waits, records
    return run


@pytest.mark.parametrize("name, waits", [
    *((name, [WINDOWS, COPY]) for name in SETTINGS if name not in ("match_on=box", "full masks")),
    ("match_on=box", [COPY]), ("full masks", [COPY])])
def test_track_waits_once_per_batch_and_once_for_the_mask_windows(render, name, waits):
    """track.py: "a batch's boxes, scores, labels and shrunk masks come from the model's device in one copy ... so
    the stage waits for a GPU once per batch" (the scores' birth threshold, the Hungarian matching and the track
    ids all on the host); shrinking RoIMasks reads the batch's windows first, in one copy that the stages after
    reuse (segment/roi_masks.py::per_frame). Matching on boxes, or on full-mask tensors, reads no windows. The
    frames the segmenter skipped get their instances on the device without a wait (gpu/transfer.py)."""
    assert render(name)[0]["track"] == [waits, waits]


@pytest.mark.parametrize("name, waits", [
    *((name, [COPY, COPY]) for name in SETTINGS if name not in ("segment_every=3 propagate", "match_on=box")),
    ("segment_every=3 propagate", [COPY, WINDOWS, COPY]), ("match_on=box", [COPY, WINDOWS, COPY])])
def test_assign_reads_the_filters_then_the_areas(render, name, waits):
    """assign.py: "labels and score verdicts come back in one copy per batch, then the areas of those that passed
    ... in a second"; the masks' windows in one more copy where the tracker did not read them: on the frames it
    moved the last detections onto (segment_every > 1), or matching on boxes."""
    assert render(name)[0]["assign"] == [waits, waits]


@pytest.mark.parametrize("name", SETTINGS)
def test_stylize_waits_once_per_batch(render, name):
    """stylize_stage.py: "on a GPU the stage waits once per batch, to read the crop boxes (with style.propagate,
    the masks' paste boxes in the same copy)", the left-original objects' boxes under a background style too; the
    style weights and each network call's rows reach the GPU without a wait, whole frames too (region=frame)."""
    assert render(name)[0]["stylize"] == [[COPY], [COPY]]


@pytest.mark.parametrize("name", SETTINGS)
def test_composite_waits_once_per_batch(render, name):
    """composite.py: "reads the batch's instance scores and boxes back in one copy"; the soft masks' pixel indices
    go to the GPU in one copy that the host does not wait for (soft_masks.py), and the stability sums stay there."""
    assert render(name)[0]["composite"] == [[COPY], [COPY]]


@pytest.mark.parametrize("name", SETTINGS)
def test_the_stand_in_changes_nothing_the_stages_do(render, name):
    """What the waits above were counted on: the same ids, styles, crops and output pixels as on plain CPU tensors,
    every region really stylized or carried (style.propagate), and what a render holds on its device still there
    after each stage: a stage that moved its work to the host would wait nowhere the stand-in sees."""
    (_, records), (_, plain) = render(name), render(name, gpu=False)
    for record, want in zip(records, plain):
        assert record.track_ids.tolist() == want.track_ids.tolist() and record.styles == want.styles
        assert [(r.instance, r.style, r.box, r.carried) for r in record.stylized] == [
            (r.instance, r.style, r.box, r.carried) for r in want.stylized]
        assert torch.equal(record.output.as_subclass(torch.Tensor), want.output)
        masks = record.instances.masks
        device_tensors = [record.image, record.instances.boxes, record.instances.scores, record.instances.labels,
                          *(masks.tensors() if isinstance(masks, RoIMasks) else [masks]), record.output,
                          *(r.pixels for r in record.stylized), *([] if record.background is None else
                                                                   [record.background])]
        assert all(isinstance(t, SimulatedGpuTensor) for t in device_tensors)
    assert {r.style for record in records for r in record.stylized} == (
        {"candy", "original"} if "background" in name else {"candy", "mosaic"})
    assert any(r.carried for record in records for r in record.stylized) == ("propagate" in name)


class Detector:
    """A segmenter's `predict` on the simulated GPU: three detections a frame, highest score first, RoIMasks."""

    def predict(self, frames, full_masks=True):
        return [instances_on_gpu(square_instances([(4, 4, 20, 1, 0.9), (30, 10, 16, 2, 0.6), (40, 30, 12, 1, 0.2)],
                                                  size=tuple(frame.shape[-2:]))) for frame in frames]


def segment_waits(every: int, scene_cut: float | None) -> tuple[list[list[tuple[str, str]]], list[FrameRecord]]:
    """Frames 0-7 of two shots (the second from frame 5) through the segment stage in batches of 4: each batch's
    waits outside the model (`Detector`), and the records."""
    stage, records, waits = SegmentStage(Detector(), 0.5, every, scene_cut), [on_gpu(r) for r in shots([5], 8)], []
    for start in (0, 4):
        with counted_waits() as found:
            stage(records[start:start + 4])
        waits.append(by_file(found))
    return waits, records


@pytest.mark.parametrize("scene_cut", [SCENE_CUT, None])
def test_segmenting_every_frame_the_cuts_come_with_the_detection_counts(scene_cut):
    """segment_stage.py: the kept detections are each frame's prefix, "one host sync for the whole batch's counts
    (and, segmenting every frame, its changes)": finding the cuts adds no wait."""
    waits, records = segment_waits(1, scene_cut)
    assert waits == [[COUNTS], [COUNTS]]
    assert [r.index for r in records if r.cut] == ([5] if scene_cut is not None else [])
    assert [len(r.instances) for r in records] == [2] * 8
    assert all(isinstance(r.instances.masks.grids, SimulatedGpuTensor) for r in records)


@pytest.mark.parametrize("scene_cut, waits", [(SCENE_CUT, [COUNTS, COUNTS]), (None, [COUNTS])])
def test_skipping_frames_the_cuts_are_read_before_the_model_runs(scene_cut, waits):
    """segment_every=3: which frames to segment depends on the cuts, so their changes come to the host in one copy
    before the model runs, then the counts in another (architecture.md: "the differences then read in one copy
    before it runs"); without scene_cut only the counts."""
    found, records = segment_waits(3, scene_cut)
    assert found == [waits, waits]
    cut = scene_cut is not None
    assert [r.index for r in records if not r.propagated] == ([0, 3, 5, 6] if cut else [0, 3, 6])
