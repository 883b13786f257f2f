"""Every expected failure of the render CLI: one `error: ...` line, exit code 2, no traceback, no output file,
no temp file, and the input byte-for-byte untouched. Plus the thread runner and atomic output on their own."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common.errors import OutputError
from common.outputs import AtomicOutput
from pipeline.streaming import run_streaming
from tests.helpers_video import (
    audio_only_clip, not_a_video, pattern_frames, read_frames, truncated_clip, write_clip, zero_frame_clip,
)
from tests.helpers_process import as_unprivileged, interruptible_popen, unprivileged_folder
from tests.render_cli import cli_env, run_in_process, run_render, sha256, temp_leftovers, tiny_model_overrides


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    return tiny_model_overrides(tmp_path_factory.mktemp("models"))


@pytest.fixture()
def clip(tmp_path) -> Path:
    return write_clip(tmp_path / "in.mp4", pattern_frames(6, 64, 48))


def assert_refused(result, output: Path, inputs: dict[Path, str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    message = lines[-1].lower()
    for word in words:
        assert word.lower() in message, message
    assert not output.parent.is_dir() or not temp_leftovers(output.parent)
    for path, digest in inputs.items():
        assert sha256(path) == digest, f"{path} was modified"
    return message


@pytest.mark.parametrize("make_input, words", [
    (lambda p: p / "missing.mp4", ["input not found", "missing.mp4"]),
    (lambda p: not_a_video(p / "notes.mp4"), ["notes.mp4", "not a readable video"]),
    (lambda p: audio_only_clip(p / "song.m4a"), ["song.m4a", "only audio"]),
    (lambda p: zero_frame_clip(p / "empty.avi"), ["empty.avi", "zero frames"]),
    (lambda p: p, ["is a folder"]),
], ids=["missing", "not-a-video", "audio-only", "zero-frames", "folder"])
def test_bad_input_files_are_refused(tmp_path, models, make_input, words):
    source = make_input(tmp_path)
    output = tmp_path / "out" / "result.mp4"
    inputs = {source: sha256(source)} if source.is_file() else {}
    result = run_in_process([f"input={source}", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, output, inputs, *words)
    assert not output.exists()


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_video_fails_instead_of_writing_a_short_output(tmp_path, models, suffix):
    """mkv: no frame count to compare with, only the stream's duration; it rendered 5 of 20 frames, exit 0."""
    source = truncated_clip(tmp_path / f"cut{suffix}", pattern_frames(20, 64, 48))
    output = tmp_path / "out.mp4"
    result = run_render([f"input={source}", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, output, {source: sha256(source)}, f"cut{suffix}", "truncated")
    assert not output.exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, models, clip):
    output = tmp_path / "out.mp4"
    output.write_bytes(b"precious")
    result = run_in_process([f"input={clip}", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, "already exists", "overwrite=true")
    assert output.read_bytes() == b"precious"


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hard link"])
def test_output_equal_to_input_is_refused(tmp_path, models, clip, spelling):
    output = {"same": str(clip), "relative": "sub/../in.mp4"}.get(spelling)
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        (tmp_path / "link.mp4").symlink_to(clip)
        output = str(tmp_path / "link.mp4")
    if spelling == "hard link":  # the input by another path, as a bind mount gives one (replacing that replaces it)
        os.link(clip, tmp_path / "sub" / "also.mp4")
        output = str(tmp_path / "sub" / "also.mp4")
    result = run_in_process([f"input={clip}", f"output={output}", "overwrite=true", *models], cwd=tmp_path)
    assert_refused(result, clip, {clip: sha256(clip)}, "is the input file")


def test_unwritable_output_folder(tmp_path, models, clip):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    output = blocker / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, tmp_path / "x", {clip: sha256(clip)}, "cannot create output folder")


def test_read_only_output_folder(models, clip):
    """Run by a user whom the folder's permissions bind (under root, a child that has dropped to nobody), from a
    folder that user can reach, with an input it can read."""
    import pipeline.render  # noqa: F401  (before the fork: see as_unprivileged)

    with unprivileged_folder() as shared:
        source = Path(shutil.copy(clip, shared / "in.mp4"))
        folder = shared / "ro"
        folder.mkdir(mode=0o555)
        result = as_unprivileged(
            lambda: run_in_process([f"input={source}", f"output={folder / 'out.mp4'}", *models], cwd=shared))
        assert_refused(result, folder / "out.mp4", {source: sha256(source)}, "cannot write to output folder",
                       str(folder))


def test_unknown_output_container(tmp_path, models, clip):
    result = run_in_process([f"input={clip}", f"output={tmp_path / 'out.txt'}", *models], cwd=tmp_path)
    assert_refused(result, tmp_path / "out.txt", {clip: sha256(clip)}, "unknown video container")


def test_existing_output_is_kept_unless_overwrite_is_true_itself(tmp_path, models, clip):
    """overwrite=no is the text "no", which Python takes as true: it replaced the file."""
    output = tmp_path / "out.mp4"
    output.write_bytes(b"precious")
    for value in ("no", "maybe", "1"):
        result = run_in_process([f"input={clip}", f"output={output}", *models, f"overwrite={value}"], cwd=tmp_path)
        assert_refused(result, output, {clip: sha256(clip), output: sha256(output)}, "overwrite must be true or false")


@pytest.mark.parametrize("override, words", [
    ("batch_size=abc", ["batch_size", "whole number"]), ("batch_size=1.5", ["batch_size"]),
    ("batch_size=true", ["batch_size"]), ("queue_size=abc", ["queue_size"]), ("stage_threads=2.0", ["stage_threads"]),
    ("segment_every=abc", ["segment_every"]), ("device=bogus", ["device must be"]), ("device=CPU", ["device must be"]),
    ("segment.score_threshold=abc", ["segment.score_threshold"]), ("style.margin=1.5", ["style.margin"]),
    ("style.min_score=abc", ["style.min_score"]), ("style.min_score=-1", ["style.min_score"]),
    ("style.min_area=-5", ["style.min_area"]), ("composite.feather_px=abc", ["composite.feather_px"]),
    ("composite.smooth_masks=abc", ["composite.smooth_masks"]), ("composite.mask_threshold=0", ["mask_threshold"]),
    ("track.min_iou=abc", ["track.min_iou"]), ("track.max_misses=1.5", ["track.max_misses"]),
    ("track.same_class=maybe", ["track.same_class", "true or false"]), ("track.motion=maybe", ["track.motion"]),
    ("debug.dump=maybe", ["debug.dump"]), ("+debug.typo=1", ["unknown debug setting", "typo"]),
    ("debug.workers=0", ["debug.workers"]), ("encode.audio=bogus", ["encode.audio must be copy or none"]),
    ("encode.crf=abc", ["libx264", "encode.crf=abc"]),
    ("encode.pix_fmt=rgb24", ["cannot open encoder libx264", "encode.pix_fmt=rgb24"]),
    ("style.margin=0", ["composite.feather_px=3 reaches past the crops' margin (0 px"]),  # a hard edge, silently
    ("encode.options=abc", ["encode.options must be a map"]), ("style.class_styles=abc", ["style.class_styles must"]),
    ("+encode.cq=19", ["libx264 does not take encode.cq:"]), ("+encode.rc=vbr", ["libx264 does not take encode.rc:"]),
    ("+encode.options.foo=1", ["libx264 does not take encode.options.foo:"]),
    ("encode.crf=100", ["encode.crf=100: libx264 takes a number from 0 to 51"]),
    ("style.extra_styles=[/nonexist.pt]", ["style.extra_styles: file not found: /nonexist.pt"]),
    ("segment.backbone=foo", ["segment.backbone='foo' is not one of"]), ("segment.norm=foo", ["segment.norm="]),
    ("segment.bn_eps=-1", ["segment.bn_eps must be"]), ("segment.class_names=abc", ["segment.class_names must be"]),
    ("+segment_evry=2", ["unknown top-level setting(s) segment_evry; known: input, output"]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_settings_of_the_wrong_type_or_range_are_one_line(tmp_path, models, clip, override, words):
    """Text where a number belongs was a traceback; 1.5, true and "maybe" were rounded or taken as true; unknown
    debug keys, a bad audio mode and debug.workers=0 were accepted; a bad x264 setting said to try x264. A class map
    or encoder options that were no map were tracebacks; encoder settings libx264 does not take, or a crf it clamps,
    and the segmenter's architecture keys (which our checkpoints keep as trained), bad values included, were
    ignored, exit 0; a missing style checkpoint did not name the setting; a top-level key the render does not read
    rendered as if it were not there."""
    output = tmp_path / "out.mp4"
    extra = ["debug.dump=true"] if override.startswith(("debug.workers", "+debug")) else []
    result = run_in_process([f"input={clip}", f"output={output}", *models, override, *extra], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, *words)
    assert not output.exists() and not (tmp_path / "out_debug").exists()


def test_a_debug_dump_where_the_output_goes_is_refused_up_front(tmp_path, models, clip):
    """debug.dir equal to the output rendered everything, then failed (a folder left at the output's path)."""
    output = tmp_path / "final" / "out.mp4"
    for overwrite in ("false", "true"):
        result = run_in_process([f"input={clip}", f"output={output}", *models, "debug.dump=true",
                                 f"debug.dir={output}", f"overwrite={overwrite}"], cwd=tmp_path)
        assert_refused(result, output, {clip: sha256(clip)}, "is the output file")
        assert not output.exists()


def test_corrupt_and_missing_checkpoint(tmp_path, models, clip):
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"\x80\x02not really a checkpoint" * 10)
    output = tmp_path / "out.mp4"
    args = [f"input={clip}", f"output={output}", *models]
    result = run_in_process([*args, f"segment.checkpoint={corrupt}"], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip), corrupt: sha256(corrupt)}, "broken.pt")
    result = run_in_process([*args, f"segment.checkpoint={tmp_path / 'nowhere.pt'}"], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, "nowhere.pt", "not found")
    assert not output.exists()


@pytest.mark.parametrize("override, words", [("style.palette=[bogus_style]", ["unknown style 'bogus_style'"]),
                                             ("encode.preset=bogus", ["encode.preset=bogus"]),
                                             ("+encode.cq=19", ["does not take encode.cq"])],
                         ids=["style", "encoder", "encoder-opened"])
def test_a_refused_render_leaves_no_folders_behind(tmp_path, models, clip, override, words):
    """The output's missing folders were made before the stages were built, and stayed when the render failed: a
    bad style name now fails before they are made, and an encoder that cannot open, or opens without taking every
    setting, takes them away again."""
    output = tmp_path / "newtree" / "a" / "b" / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models, override], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.parametrize("deleted, words", [("track", ["no track group in the config", "~track"]),
                                             ("encode", ["no encode group in the config", "~encode"]),
                                             ("style", ["no style group in the config", "~style"]),
                                             ("input", ["no input given: pass input=PATH"]),
                                             ("output", ["no output given: pass output=PATH"])])
def test_a_deleted_group_or_setting_is_one_line(tmp_path, models, clip, deleted, words):
    """~track, ~encode, ~style, ~input and ~output were omegaconf's ConfigAttributeError tracebacks, exit 1."""
    output = tmp_path / "out.mp4"
    kept = [arg for arg in models if not arg.startswith(f"{deleted}.")]  # Hydra refuses a setting of a deleted group
    result = run_in_process([f"input={clip}", f"output={output}", *kept, f"~{deleted}"], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.parametrize("given, words", [("input=", ["no input given: pass input=PATH"]),
                                          ("input=null", ["no input given: pass input=PATH"]),
                                          ("output=", ["no output given: pass output=PATH"])])
def test_an_empty_input_or_output_is_no_path_given(tmp_path, models, clip, given, words):
    """`input=` and `output=` were "is a folder" errors naming the working folder: Path("") is "."."""
    output = tmp_path / "out.mp4"
    defaults = {"input": f"input={clip}", "output": f"output={output}"}
    defaults[given.split("=")[0]] = given
    result = run_in_process([*defaults.values(), *models], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_url_input_is_named_a_url(tmp_path, models):
    """It was made a path: "input not found: <cwd>/https:/example.com/clip.mp4"."""
    output = tmp_path / "out.mp4"
    result = run_in_process(["input=https://example.com/clip.mp4", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, output, {}, "input https://example.com/clip.mp4 is a URL: the render reads local files; "
                                       "download it first")
    assert not any(tmp_path.iterdir())


def test_a_debug_dir_without_debug_dump_is_refused(tmp_path, models, clip):
    """debug.dir alone rendered the video and wrote no dump, silently."""
    output = tmp_path / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models, f"debug.dir={tmp_path / 'dump'}"],
                            cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, "writes nothing without debug.dump=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_frame_too_thin_to_segment_is_named_width_first(tmp_path, models):
    """The message gave the size height first ("a 4x2048 frame is 0x128 pixels"), unlike every other message."""
    source = write_clip(tmp_path / "thin.mp4", pattern_frames(3, 2048, 4))
    output = tmp_path / "out.mp4"
    result = run_in_process([f"input={source}", f"output={output}", *models], cwd=tmp_path)
    assert_refused(result, output, {source: sha256(source)}, "a 2048x4 frame is 128x0 pixels once resized")
    assert not output.exists()


def test_unknown_style_name(tmp_path, models, clip):
    output = tmp_path / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models, "style.background=no_such_style"],
                        cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, "no_such_style")
    assert not output.exists()


def test_missing_input_argument(tmp_path, models):
    result = run_render([f"output={tmp_path / 'out.mp4'}", *models], cwd=tmp_path)  # a real process: exit code
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: no input given" in result.stderr
    assert not list(tmp_path.iterdir()), "a refused run wrote Hydra's outputs/<date>/<time>/ folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="NVENC / NVDEC may work on a GPU machine")
@pytest.mark.parametrize("override, message", [("encode=nvenc", "h264_nvenc"),
                                               ("decode.decoder=nvdec", "h264_cuvid cannot start")])
def test_nvidia_video_engines_without_gpu_are_a_clear_error(tmp_path, models, clip, override, message):
    output = tmp_path / "out.mp4"
    result = run_in_process([f"input={clip}", f"output={output}", *models, override], cwd=tmp_path)
    assert_refused(result, output, {clip: sha256(clip)}, message)
    assert not output.exists()


STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]  # a signal's exit status: 128 + it


def _stopped(proc: subprocess.Popen, signum: int) -> str:
    """Sends `signum` to a running `proc` (kills it if it has not ended a minute later); its stderr."""
    try:
        if proc.poll() is None:
            proc.send_signal(signum)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("signum, status", STOPS, ids=[s.name for s, _ in STOPS])
def test_interrupt_leaves_nothing_behind(tmp_path, models, signum, status):
    """SIGHUP (the terminal closed) killed the render outright, leaving its temp file; SIGTERM exited 130."""
    source = write_clip(tmp_path / "long.mp4", pattern_frames(400, 64, 48))
    digest = sha256(source)
    output = tmp_path / "new" / "out.mp4"  # a folder the render makes, and must take away again
    proc = interruptible_popen([sys.executable, "-m", "pipeline.render", f"input={source}", f"output={output}",
                                *models], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output.parent.is_dir() and temp_leftovers(output.parent)) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "render ended before it could be interrupted"
        time.sleep(1.0)  # let frames flow through all three threads
    finally:
        err = _stopped(proc, signum)
    assert proc.returncode == status, err
    assert err.rstrip().endswith("error: interrupted: no output written") and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no output, temp file, folder or outputs/
    assert sha256(source) == digest


@pytest.mark.parametrize("signum, status", STOPS[:2], ids=[s.name for s, _ in STOPS[:2]])
def test_interrupt_while_starting_up_is_one_line(tmp_path, signum, status):
    """Ctrl-C while the modules load (torch, Hydra) was a traceback from inside an import and exit -2; SIGTERM
    ended the process without a word (-15)."""
    proc = interruptible_popen([sys.executable, "-m", "pipeline.render", "input=in.mp4", "output=out.mp4"],
                               cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, "the render started up too fast to be interrupted doing so"
    finally:
        err = _stopped(proc, signum)
    assert proc.returncode == status, err
    assert err.strip() == "error: interrupted: no output written", err
    assert not list(tmp_path.iterdir())


# Runs the CLI with the rename (overwrite=true) or link (false) that puts the output in place followed at once by
# SIGTERM, as if it came then.
LATE_SIGNAL = """
import os, signal, sys
for name in ("replace", "link"):
    def put_then_stop(source, target, put=getattr(os, name)):
        put(source, target)
        if os.path.basename(target) == "out.mp4":
            os.kill(os.getpid(), signal.SIGTERM)
    setattr(os, name, put_then_stop)
from pipeline import render
render.main()  # sys.argv[1:]: the overrides
"""


@pytest.mark.parametrize("overwrite", ["true", "false"])
def test_a_signal_once_the_output_is_in_place_says_so(tmp_path, models, clip, overwrite):
    """SIGTERM right after the rename said "interrupted: no output written" and exited 130, with the output
    replaced. A signal then stops nothing: the render reports the output it wrote, and exits 0."""
    output = tmp_path / "out.mp4"
    if overwrite == "true":
        output.write_bytes(b"PREVIOUS")
    result = subprocess.run([sys.executable, "-c", LATE_SIGNAL, f"input={clip}", f"output={output}", *models,
                             f"overwrite={overwrite}"], cwd=tmp_path, env=cli_env(), text=True, capture_output=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr
    assert "no output written" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "note: SIGTERM came once the output was complete: it is kept" in result.stderr
    assert f"output: {output}" in result.stdout
    assert len(read_frames(output)[0]) == 6 and not temp_leftovers(tmp_path)


# -- the building blocks on their own -------------------------------------------------------------------------

@pytest.mark.parametrize("failing", ["source", "process", "worker step", "sink"])
def test_streaming_reraises_the_first_error_and_stops_every_thread(failing):
    """With two steps, "worker step" is the first (on a thread of its own), "process" the last (caller's)."""
    def source():
        for i in range(1000):
            if failing == "source" and i == 5:
                raise ValueError("source broke")
            yield i

    def process(item):
        if failing == "process" and item == 5:
            raise ValueError("process broke")
        return item

    def worker_step(item):
        if failing == "worker step" and item == 5:
            raise ValueError("worker step broke")
        return item

    def sink(item):
        if failing == "sink" and item == 5:
            raise ValueError("sink broke")

    for steps in ([process], [worker_step, process]):
        if failing == "worker step" and len(steps) == 1:
            continue
        before = threading.active_count()
        with pytest.raises(ValueError, match=f"{failing} broke"):
            run_streaming(source(), steps, sink, queue_size=2)
        assert threading.active_count() == before


def test_streaming_reraises_the_root_cause_not_what_followed_from_it():
    """The encoder fails; a stage that needed it fails after it. The caller must see the encoder's error."""
    def source():
        yield from range(100)

    def process(item):
        if item == 1:  # runs once the sink has failed on item 0: a consequence of that failure
            next(t for t in threading.enumerate() if t.name == "encode").join(10)
            raise RuntimeError("no encoder left to take the frame")
        return item

    def sink(item):
        raise ValueError("the encoder broke")

    with pytest.raises(ValueError, match="the encoder broke"):
        run_streaming(source(), process, sink, queue_size=2)


def test_streaming_keeps_order_and_bounds_the_queues():
    produced, sunk = [], []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    def sink(item):
        time.sleep(0.002)  # a slow encoder: decode must not run far ahead
        assert len(produced) - len(sunk) <= 2 * 2 + 3
        sunk.append(item)

    assert run_streaming(source(), lambda x: x * 10, sink, queue_size=2) == 50
    assert sunk == [10 * i for i in range(50)]

    # two steps at queue_size 8: 8 items may wait after the source and 8 before the sink, but only
    # STEP_QUEUE_SIZE (2) between the steps, where each waiting item is a batch of frames on the GPU; add one
    # item held by each of the four threads (the source blocked on a full queue, each step, the sink): 8 + 2 + 8 + 4
    produced.clear()
    sunk.clear()
    peak = 0

    def slow_sink(item):
        nonlocal peak
        time.sleep(0.002)
        peak = max(peak, len(produced) - len(sunk))
        sunk.append(item)

    assert run_streaming(source(), [lambda x: x + 1, lambda x: x * 10], slow_sink, queue_size=8) == 50
    assert sunk == [10 * (i + 1) for i in range(50)] and peak <= 22


def test_streaming_steps_run_in_turn_each_on_its_own_thread():
    seen: dict[str, set[str]] = {"first": set(), "second": set()}

    def step(name, change):
        def run(item):
            seen[name].add(threading.current_thread().name)
            time.sleep(0.001)  # the two steps overlap: a fast one could finish before the other starts
            return change(item)
        return run

    sunk = []
    assert run_streaming(range(30), [step("first", lambda x: x + 1), step("second", lambda x: x * 10)],
                         sunk.append, queue_size=2) == 30
    assert sunk == [10 * (i + 1) for i in range(30)]
    assert seen["second"] == {threading.current_thread().name} and seen["first"].isdisjoint(seen["second"])


def test_atomic_output_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "video.mp4"
    with AtomicOutput(target) as temp:
        assert temp.parent == tmp_path and temp.suffix == ".mp4" and temp != target
        temp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not temp_leftovers(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(tmp_path / "other.mp4") as temp:
            temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not (tmp_path / "other.mp4").exists() and not temp_leftovers(tmp_path)
    with pytest.raises(OutputError, match="appeared while it was being written"):
        with AtomicOutput(tmp_path / "race.mp4") as temp:
            (tmp_path / "race.mp4").write_bytes(b"someone else's")
    assert (tmp_path / "race.mp4").read_bytes() == b"someone else's" and not temp_leftovers(tmp_path)


def test_the_feather_may_reach_as_far_as_the_margin_in_frame_pixels(models):
    """The crops' margin in the frame's pixels is style.margin x style.downsample: a feather of exactly that many
    pixels builds, one more is refused (the stages are built without a render: the check is made there)."""
    from pipeline.errors import PipelineConfigError
    from pipeline.render import build_stages, compose_config

    def stages(feather_px: int):
        cfg = compose_config(["input=in.mp4", "output=out.mp4", *models, "style.margin=2", "style.downsample=2",
                              f"composite.feather_px={feather_px}"])
        return build_stages(cfg, torch.device("cpu"), None, Path("out.mp4"))

    assert [name for name, _ in stages(4).run] == ["segment", "track", "assign", "stylize", "composite"]
    with pytest.raises(PipelineConfigError, match=r"feather_px=5 reaches past the crops' margin \(4 px"):
        stages(5)
