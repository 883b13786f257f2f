"""The render CLI end to end (subprocess, tiny random models, tiny clips): frames, timestamps, size and audio
survive; untouched pixels stay the input's; sweeps write one output per run in their own folders."""
from __future__ import annotations

import json
import re
import shutil
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from tests.helpers_video import audio_summary, pattern_frames, psnr, read_frames, write_clip
from tests.render_cli import run_in_process, run_render, sha256, temp_leftovers, tiny_model_overrides
from tests.stylize_fixtures import bank_path  # noqa: F401

PTS_MS = [0, 40, 90, 100, 180, 260, 270, 400]  # variable frame rate


@pytest.fixture(scope="module")
def models(tmp_path_factory, device) -> list[str]:
    return tiny_model_overrides(tmp_path_factory.mktemp("models"), device)


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    return write_clip(folder / "in.mp4", pattern_frames(len(PTS_MS), 64, 48), pts=PTS_MS,
                      time_base=Fraction(1, 1000), audio=True)


def test_render_keeps_frames_timestamps_size_and_audio(tmp_path, models, vfr_clip):
    source = tmp_path / "in.mp4"
    source.write_bytes(vfr_clip.read_bytes())
    digest = sha256(source)
    # relative paths: resolved against the directory the command runs in (Hydra must not chdir)
    result = run_render(["input=in.mp4", "output=renders/out.mp4", *models], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = tmp_path / "renders" / "out.mp4"
    assert f"-> {output}" in result.stdout and f"output: {output}" in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("rendered"))
    assert f"rendered {len(PTS_MS)} frames" in summary and "fps" in summary and "instances" in summary
    assert "temporal stability" in summary and "styles used" in summary
    in_frames, in_times = read_frames(source)
    out_frames, out_times = read_frames(output)
    assert len(out_frames) == len(in_frames) == len(PTS_MS)
    assert out_times == in_times == [Fraction(p, 1000) for p in PTS_MS]
    assert out_frames[0].shape == in_frames[0].shape
    assert audio_summary(output) == pytest.approx(audio_summary(source))
    assert sha256(source) == digest and not temp_leftovers(output.parent)
    # only the output: Hydra's ./outputs/<date>/<time>/ (.hydra/*.yaml, an empty render.log) came with every run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "renders"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_original_background_keeps_pixels_outside_instances(tmp_path, models, vfr_clip):
    output = tmp_path / "out.mp4"
    dump = tmp_path / "dump"
    result = run_in_process([f"input={vfr_clip}", f"output={output}", *models, "style.background=original",
                         "debug.dump=true", f"debug.dir={dump}", "debug.image_format=png"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    in_frames, _ = read_frames(vfr_clip)
    out_frames, _ = read_frames(output)
    records = [json.loads(line) for line in (dump / "frames.jsonl").read_text().splitlines()]
    assert len(records) == len(in_frames)
    inside_diffs, outside_checked = [], 0
    for record, before, after in zip(records, in_frames, out_frames):
        # Soft masks are zero outside their box, so a styled instance can only change pixels in its box
        # (plus the feather radius); its binarised mask is where the style must visibly show.
        boxed = np.zeros(before.shape[:2], bool)
        covered = np.zeros(before.shape[:2], bool)
        for inst in record["instances"]:
            if inst["style"] is None:
                continue
            x1, y1, x2, y2 = inst["box"]
            boxed[int(y1):int(np.ceil(y2)) + 1, int(x1):int(np.ceil(x2)) + 1] = True
            if inst["mask"] is not None:
                covered |= mask_utils.decode(inst["mask"]).astype(bool)
        touched = ndimage.binary_dilation(boxed, iterations=4)  # feathered edges
        if (~touched).sum() > 50:
            assert psnr(after[~touched], before[~touched]) > 33, record["index"]
            outside_checked += 1
        if covered.sum() > 50:
            inside_diffs.append(np.abs(after[covered].astype(int) - before[covered].astype(int)).mean())
    assert outside_checked >= 2, "instances covered (nearly) every frame: nothing was left to compare"
    assert inside_diffs and max(inside_diffs) > 8, "no instance was stylized: the check above proves nothing"
    # the summary line's numbers against the dump and the frames
    numbers = _summary_numbers(result.stdout)
    assert numbers["frames"] == len(records)
    assert numbers["instances"] == sum(len(record["instances"]) for record in records) > len(records)
    seconds = numbers["seconds"]  # printed to 0.1 s, the fps to 0.01
    assert len(records) / (seconds + 0.05) - 0.01 <= numbers["fps"] <= len(records) / max(seconds - 0.05, 1e-3) + 0.01
    # the input's and the composite's frames to the bit: the dump's png layers (full size, below debug.max_side)
    layers = {layer: [np.asarray(Image.open(dump / record["images"][layer])) for record in records]
              for layer in ("original", "composite")}
    for key, layer in (("input_change", "original"), ("stability", "composite")):
        assert abs(numbers[key] - _flicker(layers[layer], records)) <= 0.0005 + 1e-9, (key, numbers)
    assert abs(numbers["stability"] - numbers["input_change"]) > 0.01, "the two figures must differ to be told apart"


def _summary_numbers(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("rendered "))
    found = re.match(r"rendered (?P<frames>\d+) frames in (?P<seconds>[\d.]+) s \((?P<fps>[\d.]+) fps\): "
                     r"(?P<instances>\d+) instances;.* temporal stability (?P<stability>[\d.]+) "
                     r"\(input (?P<input_change>[\d.]+)\) -> ", line)
    assert found, line
    return {key: float(value) for key, value in found.groupdict().items()}


def _flicker(frames: list[np.ndarray], records: list[dict]) -> float:
    """The composite's temporal figure (pipeline/composite.py) over `frames`, from the dump alone: the mean change
    over channels and pixels inside a track's stylized crop's binarized mask in both of two consecutive frames."""
    def tracked(record: dict) -> dict[int, np.ndarray]:
        masks = {}
        for region in record["regions"]:
            instance = record["instances"][region["instance"]]
            if instance["track_id"] >= 0:
                x1, y1, x2, y2 = region["box"]
                mask = np.zeros(tuple(instance["mask"]["size"]), bool)
                mask[y1:y2, x1:x2] = mask_utils.decode(instance["mask"])[y1:y2, x1:x2]
                masks[instance["track_id"]] = mask
        return masks

    total, count = 0, 0
    for (before, now), (was, is_) in zip(zip(frames, frames[1:]), zip(records, records[1:])):
        masks_before, masks_now = tracked(was), tracked(is_)
        inside = np.zeros(now.shape[:2], bool)
        for track in masks_now.keys() & masks_before.keys():
            inside |= masks_now[track] & masks_before[track]
        total += int(np.abs(now.astype(int) - before.astype(int))[inside].sum())
        count += int(inside.sum())
    return total / (3 * count)


def test_sweep_writes_each_run_into_its_own_folder(tmp_path, models, vfr_clip):
    """Output and debug dump alike: a debug.dir given for the sweep was one folder that each run overwrote."""
    result = run_render(["-m", "style.assign=by_class,per_instance", f"input={vfr_clip}", "output=out.mp4",
                         "debug.dump=true", "debug.dir=dumps/shared", *models], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = sorted((tmp_path / "multirun").glob("*/*/*/out.mp4"))
    assert [p.parent.name for p in outputs] == ["0", "1"]
    for output in outputs:
        frames, times = read_frames(output)
        assert len(frames) == len(PTS_MS) and times[-1] == Fraction(PTS_MS[-1], 1000)
        assert (output.parent / ".hydra" / "overrides.yaml").is_file()
        dumped = (output.parent / "shared" / "frames.jsonl").read_text().splitlines()
        assert len(dumped) == len(PTS_MS)
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "dumps").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]
    overrides = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in outputs]
    assert "style.assign=by_class" in overrides[0] and "style.assign=per_instance" in overrides[1]


def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path, models, vfr_clip):
    """The first job's unknown style ended the whole sweep: the second job never ran."""
    result = run_render(["-m", "style.background=style_99,style_01", f"input={vfr_clip}", "output=out.mp4",
                         *models], cwd=tmp_path)
    assert result.returncode == 2
    outputs = sorted((tmp_path / "multirun").glob("*/*/*/out.mp4"))
    assert [p.parent.name for p in outputs] == ["1"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: job 0 (style.background=style_99): ") and "style_99" in errors[0][40:]
    assert errors[-1] == "error: 1 sweep job(s) failed: job 0 (style.background=style_99)"


def test_paths_that_start_with_a_tilde_are_in_the_home_folder(tmp_path, models, vfr_clip, monkeypatch):
    """input=~/clip.mp4 was looked for as ./~/clip.mp4 (output=~/... was expanded), and style.bank=~/... and
    segment.checkpoint=~/... were Hydra grammar errors (a shell expands ~ only after `name=`, not `style.bank=`)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copy(vfr_clip, home / "clip.mp4")
    files = {"style.bank=": "bank.pt", "segment.checkpoint=": "segmenter.pt"}
    for arg in models:
        for key, name in files.items():
            if arg.startswith(key):
                shutil.copy(arg[len(key):], home / name)
    others = [arg for arg in models if not arg.startswith(tuple(files))]
    result = run_in_process(["input=~/clip.mp4", "output=~/renders/out.mp4", *others, "style.bank=~/bank.pt",
                             "segment.checkpoint=~/segmenter.pt", "debug.dump=true", "debug.dir=~/dump"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_frames(home / "renders" / "out.mp4")[0]) == len(PTS_MS)
    assert (home / "dump" / "frames.jsonl").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_a_comma_in_a_file_name_is_part_of_it_outside_a_sweep(tmp_path, models, vfr_clip):
    """input=take1,final.mp4 was Hydra's multi-line "Ambiguous value" error: read as a sweep of take1 and
    final.mp4, which only -m runs. With -m it still is one."""
    from common.hydra_cli import hydra_readable
    from pipeline.render import PATH_KEYS

    shutil.copy(vfr_clip, tmp_path / "take1,final.mp4")
    result = run_in_process(["input=take1,final.mp4", "output=out,v2.mp4", *models], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_frames(tmp_path / "out,v2.mp4")[0]) == len(PTS_MS)
    sweep = ["input=a.mp4,b.mp4", "output=out.mp4"]
    for flag in ("-m", "--multirun", "--multi", "hydra.mode=MULTIRUN"):
        assert hydra_readable([flag, *sweep], PATH_KEYS) == [flag, *sweep]
    assert hydra_readable(sweep, PATH_KEYS) == ["input='a.mp4,b.mp4'", "output=out.mp4"]


def test_two_or_three_stage_threads_render_what_one_renders(tmp_path, models, vfr_clip, monkeypatch):
    """stage_threads=2: segment, track and assign on a thread of their own, stylize and composite on the caller's;
    3: composite on a third. Batches of two frames, so the threads overlap. Same frames, instances and styles as
    one thread."""
    from pipeline.assign import StyleAssigner
    from pipeline.composite import Compositor
    from pipeline.segment_stage import SegmentStage
    from pipeline.stylize_stage import StylizeStage
    from pipeline.track import Tracker

    stages = {"segment": SegmentStage, "track": Tracker, "assign": StyleAssigner, "stylize": StylizeStage,
              "composite": Compositor}
    threads: dict[str, set[str]] = {name: set() for name in stages}
    for name, stage in stages.items():
        monkeypatch.setattr(stage, "__call__", _noting(stage.__call__, threads[name], _thread_name))
    outputs = {}
    for count in (1, 2, 3):
        for names in threads.values():
            names.clear()
        output, dump = tmp_path / f"out{count}.mp4", tmp_path / f"dump{count}"
        result = run_in_process([f"input={vfr_clip}", f"output={output}", *models, f"stage_threads={count}",
                                 "batch_size=2", "debug.dump=true", f"debug.dir={dump}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert all(len(names) == 1 for names in threads.values()), threads
        assert len(set().union(*threads.values())) == count, threads
        assert threads["segment"] == threads["track"] == threads["assign"], threads  # the split is before stylize
        assert threads["stylize"] == threads["composite"] or count == 3, threads
        records = [json.loads(line) for line in (dump / "frames.jsonl").read_text().splitlines()]
        outputs[count] = read_frames(output)[0], [[(i["box"], i["style"]) for i in r["instances"]] for r in records]
    assert any(style for frame in outputs[1][1] for _, style in frame), "nothing stylized: the check proves little"
    for count in (2, 3):
        assert outputs[count][1] == outputs[1][1]
        assert all(np.array_equal(a, b) for a, b in zip(outputs[count][0], outputs[1][0], strict=True))
    result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'bad.mp4'}", *models, "stage_threads=4"],
                            cwd=tmp_path)
    assert result.returncode == 2 and "error: stage_threads must be a whole number from 1 to 3, got 4" in result.stderr
    assert not (tmp_path / "bad.mp4").exists()


def test_torch_threads_hold_on_every_stage_thread_and_are_restored(tmp_path, models, vfr_clip, device, monkeypatch):
    """torch_threads sets torch's operator threads on the stage threads too (segment runs on a thread of its own),
    `auto` is 1 on a GPU and torch's own setting on a CPU, and the caller's setting comes back afterwards."""
    from pipeline.segment_stage import SegmentStage
    from pipeline.stylize_stage import StylizeStage

    seen: set[int] = set()
    for stage in (SegmentStage, StylizeStage):
        monkeypatch.setattr(stage, "__call__", _noting(stage.__call__, seen, torch.get_num_threads))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for setting, expected in (("3", 3), ("auto", 1 if device.type == "cuda" else 2)):
            seen.clear()
            result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'out.mp4'}", "overwrite=true",
                                     *models, f"torch_threads={setting}", "batch_size=2"], cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert seen == {expected} and torch.get_num_threads() == 2, (setting, seen)
        result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'bad.mp4'}", *models,
                                 "torch_threads=0"], cwd=tmp_path)
        assert result.returncode == 2 and "error: torch_threads must be auto or a positive integer, got 0" \
            in result.stderr
        assert not (tmp_path / "bad.mp4").exists()
    finally:
        torch.set_num_threads(before)


def _noting(call, seen: set, value):
    """A stage's __call__ that first adds `value()` (taken on the thread that runs the stage) to `seen`."""
    def noted(self, batch):
        seen.add(value())
        return call(self, batch)
    return noted


def _thread_name() -> str:
    return threading.current_thread().name


def test_nvdec_and_nvenc_render_like_the_software_path(tmp_path, models, device):
    if device.type != "cuda" or not {"h264_cuvid", "h264_nvenc"} <= av.codecs_available:
        pytest.skip("needs `pytest --device cuda` on an NVIDIA GPU and PyAV with h264_cuvid / h264_nvenc")
    if not nvenc_opens():
        pytest.skip("this GPU has no NVENC unit (as on H100, H200 and A100)")
    clip = write_clip(tmp_path / "in.mp4", pattern_frames(len(PTS_MS), 192, 128), pts=PTS_MS,
                      time_base=Fraction(1, 1000), audio=True)
    outputs = {"software": [], "nvidia": ["decode.decoder=nvdec", "encode=nvenc"]}
    for name, engines in outputs.items():
        result = run_in_process([f"input={clip}", f"output={tmp_path / name}.mp4", *models, *engines], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    software, times = read_frames(tmp_path / "software.mp4")
    nvidia, nvidia_times = read_frames(tmp_path / "nvidia.mp4")
    assert nvidia_times == times == [Fraction(p, 1000) for p in PTS_MS]
    assert min(psnr(a, b) for a, b in zip(software, nvidia)) > 30   # two encoders' losses, same stylized frames
    assert audio_summary(tmp_path / "nvidia.mp4") == pytest.approx(audio_summary(clip))


def nvenc_opens() -> bool:
    stream = av.CodecContext.create("h264_nvenc", "w")
    stream.width, stream.height, stream.pix_fmt, stream.time_base = 256, 144, "yuv420p", Fraction(1, 24)
    try:
        stream.open()
    except av.FFmpegError:
        return False
    return True


def test_segment_every_segments_the_first_frame_of_a_new_shot(tmp_path, models):
    """segment_every=4 over a clip whose second shot starts at frame 6 (the first shot's frames, inverted): frames
    0, 4, 8 and, for the cut, 6 are segmented (scene_cut, on by default), and 6 is marked as a new shot, where the
    tracker ends its tracks; with scene_cut=null only 0, 4, 8, and no cut; with scene_cut=0.04 the frames where the
    blob glides fastest are cuts too, each segmented. At 96x64 the clip's blob glides for 12
    frames without wrapping round to the other side of the frame (at 64x48 it jumps at frame 11: a new picture)."""
    frames = pattern_frames(12, 96, 64)
    clip = write_clip(tmp_path / "cut.mp4", frames[:6] + [255 - frame for frame in frames[6:]])
    # a low scene_cut also cuts where the blob glides fastest: the cuts SegmentStage itself finds in the decoded clip.
    # libx264 encodes clips this small a little differently each run: 0.04 found 6-11 in 12 encodes (and frames 10 and
    # 11 passed 0.05 in all of 8), where 0.05 left as few as [6, 10, 11]
    low_cuts = _scene_cuts(clip, 0.04)
    assert len(low_cuts) > 1 and 6 in low_cuts
    for scene_cut, want, cuts in (("0.5", [0, 4, 6, 8], [6]), ("null", [0, 4, 8], []),
                                  ("0.04", sorted({0, 4, 8, *low_cuts}), low_cuts)):
        dump = tmp_path / f"dump_{scene_cut}"
        result = run_in_process([f"input={clip}", f"output={tmp_path / f'out_{scene_cut}.mp4'}", *models,
                                 "segment_every=4", f"scene_cut={scene_cut}", "debug.dump=true", f"debug.dir={dump}"],
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (dump / "frames.jsonl").read_text().splitlines()]
        assert [r["index"] for r in records if not r["propagated"]] == want
        assert [r["index"] for r in records if r["cut"]] == cuts


def _scene_cuts(clip: Path, scene_cut: float) -> list[int]:
    """The frames SegmentStage marks as new shots in `clip` as the render decodes it (its model never asked)."""
    from pipeline.decode import VideoReader
    from pipeline.render import compose_config
    from pipeline.segment_stage import SegmentStage
    from tests.test_segment_stage import NoDetections

    stage = SegmentStage(NoDetections(), every=len(read_frames(clip)[0]) + 1, scene_cut=scene_cut)
    cfg = compose_config(["input=in.mp4", "output=out.mp4"])
    return [record.index for batch in VideoReader.from_config(clip, cfg.decode, 4, torch.device("cpu"))
            for record in stage(batch) if record.cut]



@pytest.mark.parametrize("propagate", [False, True])
def test_segment_every_second_frame_moves_the_tracked_objects_over_the_others(tmp_path, models, vfr_clip, propagate):
    """segment_every=2: every frame is written, only frames 0, 2, 4, 6 are segmented (the others have no segment
    time), and a skipped frame shows the tracked objects of the frame before it, with their ids and styles (with
    style.propagate too, where their stylized crops come from the frame before)."""
    output, dump = tmp_path / "out.mp4", tmp_path / "dump"
    result = run_in_process([f"input={vfr_clip}", f"output={output}", *models, "segment_every=2", "batch_size=3",
                             "debug.dump=true", f"debug.dir={dump}", f"style.propagate={str(propagate).lower()}"],
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_frames(output)[0]) == len(PTS_MS)
    records = [json.loads(line) for line in (dump / "frames.jsonl").read_text().splitlines()]
    assert [r["propagated"] for r in records] == [False, True] * (len(PTS_MS) // 2)
    assert [("segment" in r["timings"]) for r in records] == [not r["propagated"] for r in records]
    shown = 0
    for before, skipped in zip(records[0::2], records[1::2]):
        tracked = [(i["track_id"], i["style"]) for i in before["instances"] if i["track_id"] >= 0]
        assert [(i["track_id"], i["style"]) for i in skipped["instances"]] == tracked
        shown += len(tracked)
    assert shown, "no tracked objects: the check proves little"
    carried = [[r["carried"] for r in record["regions"]] for record in records]
    assert not any(any(flags) for flags in carried[0::2])  # segmented frames: the network's pixels
    assert any(any(flags) for flags in carried[1::2]) == propagate
    if propagate:  # with every frame segmented there is nothing to carry: the render says so, and runs
        result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'every.mp4'}", *models,
                                 "style.propagate=true"], cwd=tmp_path)
        assert result.returncode == 0
        assert "note: style.propagate acts only on frames the segmenter skips" in result.stderr
    result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'bad.mp4'}", *models, "segment_every=0"],
                            cwd=tmp_path)
    assert result.returncode == 2 and "error: segment_every must be a whole number >= 1, got 0" in result.stderr
    assert not (tmp_path / "bad.mp4").exists()


def test_the_default_models_work_from_any_directory(tmp_path, bank_path, vfr_clip):
    """The embedded segmenter (a path relative to the project) and the imported bank (style.bank=null) are found
    from a directory other than the project's: both were looked up from the working directory."""
    result = run_in_process([f"input={vfr_clip}", f"output={tmp_path / 'out.mp4'}", "encode.preset=ultrafast"],
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_frames(tmp_path / "out.mp4")[0]) == len(PTS_MS)


def test_a_trained_style_renders_by_name(tmp_path, models, vfr_clip):
    """style.extra_styles adds stylize.train checkpoints to the bank: a checkpoint holding a bank style's scales and
    shifts under a new name renders as that style does, given as a list or, for one palette entry, as itself."""
    from stylize.bank import STYLE_FORMAT, StyleBank, atomic_save
    from tests.tiny_models import distinct_styles

    bank_file = next(arg.split("=", 1)[1] for arg in models if arg.startswith("style.bank="))
    bank = distinct_styles(StyleBank.load(bank_file))
    bank.save(tmp_path / "bank.pt")
    atomic_save({"format": STYLE_FORMAT, "name": "painting", "source": "test", "preview": None,
                 "conv_fingerprint": bank.network.conv_fingerprint(), "params": bank.network.style_params(4)},
                tmp_path / "painting.pt")
    outputs = {}
    for label, style in (("copy", ["style.extra_styles=[painting.pt]", "style.palette=[painting]"]),
                         ("one", [f"style.extra_styles={tmp_path / 'painting.pt'}", "style.palette=painting"]),
                         ("bank", ["style.palette=[style_04]"]), ("other", ["style.palette=[style_05]"])):
        out = tmp_path / f"{label}.mp4"
        result = run_in_process([f"input={vfr_clip}", f"output={out}", *models, f"style.bank={tmp_path / 'bank.pt'}",
                                 *style], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[label] = sha256(out)
    assert outputs["copy"] == outputs["one"] == outputs["bank"] != outputs["other"]


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "Could not override 'bogus': the config has no key or group 'bogus' (known: decode, segment, style, "
                "track, composite, encode, debug, input, output, overwrite, device, batch_size, segment_every, "
                "scene_cut, queue_size, stage_threads, torch_threads)"),
    ("segment=r50fpn", "In 'render': Could not find 'segment/r50fpn' (options: demo, r18_fpn, r50_fpn)"),
])
def test_scripts_composing_the_render_config_get_a_bad_override_in_one_line(override, message):
    """The benchmarks and the soak compose conf/render.yaml in-process: Hydra's error was a 22-frame traceback."""
    from pipeline.errors import PipelineConfigError
    from pipeline.render import compose_config

    with pytest.raises(PipelineConfigError) as refused:
        compose_config(["input=x.mp4", "output=y.mp4", override])
    assert str(refused.value) == message


def _size_changing_clip(path: Path) -> Path:
    """8 frames at 64x64, 8 at 48x24, 8 at 64x64: three raw H.264 pieces (headers repeated) joined in MPEG-TS, as
    an adaptive-bitrate recording changes size mid-stream."""
    stream = b""
    for index, (width, height) in enumerate([(64, 64), (48, 24), (64, 64)]):
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height, codec.pix_fmt, codec.time_base = width, height, "yuv420p", Fraction(1, 24)
        codec.options = {"x264-params": "repeat-headers=1:annexb=1", "bf": "0"}
        for i, rgb in enumerate(pattern_frames(8, width, height, seed=index)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            stream += b"".join(bytes(packet) for packet in codec.encode(frame))
        stream += b"".join(bytes(packet) for packet in codec.encode(None))
    raw = path.with_suffix(".h264")
    raw.write_bytes(stream)
    with av.open(str(raw), format="h264") as source, av.open(str(path), "w") as out:
        video = out.add_stream("h264", rate=24)
        video.width = video.height = 64
        for n, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.stream, packet.pts, packet.dts, packet.time_base = video, n * 3750, n * 3750, Fraction(1, 90000)
            out.mux(packet)
    return path


def test_a_stream_that_changes_size_is_rendered_in_the_videos_size_as_new_shots(tmp_path, models):
    """The docs promised a frame whose size changes starts a new shot; the encoder refused it instead ("frame 8 is
    48x24, the video is 64x64", exit 2). Those frames are now fitted inside the video's size, aspect kept, on black
    (48x24 -> 64x32, 16 black rows above and below), with one note, and each change is a cut."""
    clip = _size_changing_clip(tmp_path / "sizes.ts")
    assert [f.width for f in av.open(str(clip)).decode(video=0)] == [64] * 8 + [48] * 8 + [64] * 8
    output = tmp_path / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("note: frame 8 is 48x24, the video 64x64: fitted inside it") == 1
    assert "cuts=2" in result.stdout
    frames, _ = read_frames(output)
    assert len(frames) == 24 and all(f.shape == (64, 64, 3) for f in frames)
    bands = [float(np.concatenate([f[:14], f[-14:]]).mean()) for f in frames]
    assert max(bands[8:16]) < 20 < min(bands[:8] + bands[16:])
