"""The arithmetic of the benchmark scripts' derived figures, on hand-made inputs; the scripts' refusals of bad
arguments and outputs before any work; what their reports say and where they go."""
from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from scripts.bench_render import second_half_fps
from scripts.bench_segment_every import Agreement, psnr_by_frame_kind
from segment.structures import Instances
from scripts.crop_batches import replay


def test_second_half_fps_counts_from_the_first_batch_past_half():
    # batches of 4 frames: 8 of 16 frames written at t=5 s, the rest by t=7 s
    written = [(1.0, 4), (3.0, 8), (5.0, 12), (7.0, 16)]
    assert second_half_fps(written) == pytest.approx((16 - 8) / (7.0 - 3.0))
    assert second_half_fps([(2.0, 4)]) is None
    assert second_half_fps([]) is None


def test_replay_counts_a_gpus_calls_shapes_and_padding():
    # two batches over 4 frames; bucket 64: (30, 64), (64, 20), (10, 10) pad to 64², (65, 64) to 128 x 64
    calls = [([(30, 64), (64, 20), (65, 64)], None), ([(10, 10), (65, 64)], None)]
    row = replay(calls, frames=4, bucket=64)
    assert row["calls"] == pytest.approx(4 / 4)  # (64², 2 crops), (128x64, 1), then (64², 1), (128x64, 1)
    assert row["shapes"] == 3                    # (2, 64, 64), (1, 128, 64), (1, 64, 64)
    assert row["graph_shapes"] == 3              # batches of 1 and 2 stay as they are
    crop = 30 * 64 + 64 * 20 + 65 * 64 + 10 * 10 + 65 * 64
    assert row["padding"] == pytest.approx((3 * 64 * 64 + 2 * 128 * 64) / crop)
    assert row["pixels"] == pytest.approx((3 * 64 * 64 + 2 * 128 * 64) / 4)
    # three crops of one padded size: a batch of 3, which CUDA graphs pad to 4
    row = replay([([(60, 60)] * 3, None), ([(60, 60)] * 4, None)], frames=2, bucket=64)
    assert (row["calls"], row["shapes"], row["graph_shapes"]) == (1.0, 2, 1)
    # the recorded limits (a 48-px frame) stop the padding as the stage's own calls do: 48², not 64²
    row = replay([([(30, 40)], [(48, 48)])], frames=1, bucket=64)
    assert row["pixels"] == pytest.approx(48 * 48)


def test_agreement_matches_within_a_class_and_counts_the_misses():
    def squares(cells: list[tuple[int, int, int, int, int]]) -> Instances:  # (label, y1, x1, y2, x2) inclusive
        masks = torch.zeros(len(cells), 10, 10, dtype=torch.bool)
        for k, (_, y1, x1, y2, x2) in enumerate(cells):
            masks[k, y1:y2 + 1, x1:x2 + 1] = True
        return Instances(image_size=(10, 10), boxes=torch.zeros(len(cells), 4), scores=torch.ones(len(cells)),
                         labels=torch.tensor([c[0] for c in cells]), masks=masks)

    reference = squares([(1, 0, 0, 3, 3), (2, 6, 6, 9, 9), (1, 6, 0, 7, 1)])
    # A one column to the right (IoU 12/20), B's place under another class, and an object the segmenter lacks
    shown = squares([(1, 0, 1, 3, 4), (1, 6, 6, 9, 9), (2, 0, 8, 1, 9)])
    result = Agreement(ious=[])
    result.add(3, reference, shown)
    assert result.ious == pytest.approx([0.6, 0.0, 0.0]) and (result.found, result.unmatched) == (1, 2)
    result.add(5, reference[:0], shown[:1])  # a frame where the segmenter finds nothing
    assert result.row() == ["3", "0.200", "33.3%", "3"] and result.skipped == {3, 5}


def test_psnr_by_frame_kind_equals_skimage_on_the_decoded_frames(tmp_path):
    """Two clips alike except on odd frames: every-2nd-frame PSNR splits into the odd frames' (against
    skimage's PSNR of the same decoded frames, stacked) and the even frames' (identical: infinite). The split
    follows the frames given as skipped, not their index: with a cut at frame 3 (segmented), frame 3 counts with
    the segmented frames."""
    from skimage.metrics import peak_signal_noise_ratio

    from pipeline.decode import VideoReader
    from tests.helpers_video import pattern_frames, write_clip

    frames = pattern_frames(6, 48, 32)
    changed = [frame if i % 2 == 0 else np.clip(frame.astype(int) + 40, 0, 255).astype(np.uint8)
               for i, frame in enumerate(frames)]
    lossless = {"qp": 0}  # the even frames then decode alike, whatever the odd ones hold
    a, b = (write_clip(tmp_path / name, clip, options=lossless)
            for name, clip in (("a.mp4", frames), ("b.mp4", changed)))
    skipped, segmented = psnr_by_frame_kind(a, b, {1, 3, 5}, torch.device("cpu"))
    # decoded as the script decodes them (VideoReader's host converter rounds; swscale's rgb24 is a level darker)
    decoded_a, decoded_b = ([r.image.permute(1, 2, 0).numpy() for batch in VideoReader(clip, batch_size=8)
                             for r in batch] for clip in (a, b))
    assert all(np.array_equal(decoded_a[i], decoded_b[i]) for i in (0, 2, 4)) and segmented == float("inf")

    def psnr(frames: list[int]) -> float:
        return peak_signal_noise_ratio(*(np.stack([decoded[i] for i in frames]) for decoded in (decoded_a, decoded_b)),
                                       data_range=255)

    assert skipped == pytest.approx(psnr([1, 3, 5]), abs=1e-9) and skipped < 30
    skipped, segmented = psnr_by_frame_kind(a, b, {1, 5}, torch.device("cpu"))
    assert (skipped, segmented) == (pytest.approx(psnr([1, 5]), abs=1e-9), pytest.approx(psnr([0, 2, 3, 4]), abs=1e-9))


# Each script refuses a bad argument in one line (argparse's usage, then `error: ...`, exit status 2) before any
# work: found by hand as tracebacks (NotAVideoError for 0 frames, StatisticsError for 0 repeats, torch's for a
# device it has no name for, ...). `{file}` stands for a file that exists, where the script wants one given (a .pt),
# `{dir}` for a folder that exists: a report or a reference checkpoint pointed at a folder was a traceback after
# the whole benchmark had run (IsADirectoryError), an existing reference was replaced without a word.
BAD_ARGUMENTS = [
    ("bench_render", ["--frames", "0"], "argument --frames: must be a whole number >= 1, got 0"),
    ("bench_render", ["--frames", "2", "--warmup-frames", "0", "--device", "banana"],
     "argument --device: must be auto, cpu, cuda or cuda:N, got 'banana'"),
    ("bench_render", ["--warmup-frames", "-1"], "argument --warmup-frames: must be a whole number >= 0, got -1"),
    ("bench_render", ["--kernel-frames", "0"], "argument --kernel-frames: must be a whole number >= 1, got 0"),
    ("bench_segment_every", ["--input", "{file}", "--repeats", "0", "--device", "banana"],
     "argument --device: must be auto"),
    ("bench_segment_every", ["--every", "2", "1"], "argument --every: must be a whole number >= 2, got 1"),
    ("bench_segment_every", ["--repeats", "-1"], "argument --repeats: must be a whole number >= 0, got -1"),
    ("bench_stylize", ["--repeats", "0"], "argument --repeats: must be a whole number >= 1, got 0"),
    ("bench_stylize", ["--bank", "/nonexist.pt"], "argument --bank: no such file: /nonexist.pt"),
    ("bench_stylize", ["--device", "banana"], "argument --device: must be auto"),
    ("bench_train", ["--device", "banana"], "argument --device: must be auto"),
    ("bench_train", ["--size", "0"], "argument --size: must be a whole number >= 32, got 0"),
    ("bench_train", ["--iterations", "0"], "argument --iterations: must be a whole number >= 1, got 0"),
    ("bench_train", ["--batch", "x"], "argument --batch: must be a whole number >= 1, got 'x'"),
    ("bench_train", ["--threads", "0"], "argument --threads: must be a whole number >= 1, got 0"),
    ("crop_batches", ["--frames", "0"], "argument --frames: must be a whole number >= 1, got 0"),
    ("crop_batches", ["--size", "240p", "--frames", "1", "--device", "banana"], "argument --device: must"),
    ("crop_batches", ["--buckets", "64", "6"], "argument --buckets: must be a whole number >= 4 and a multiple of 4"),
    ("memory_soak", ["--frames", "0"], "argument --frames: must be a whole number >= 1, got 0"),
    ("memory_soak", ["--frames", "16", "--every", "4", "--size", "3"],
     "argument --size: must be a whole number >= 2 and a multiple of 2, got 3"),
    ("memory_soak", ["--frames", "11", "--batch-size", "8", "--every", "4"],
     "--frames must be at least --batch-size + --every (12)"),
    ("memory_soak", ["--frames", "16", "--every", "4", "--checkpoint", "/nonexist.pt"],
     "argument --checkpoint: no such file: /nonexist.pt"),
    ("memory_soak", ["--frames", "16", "--every", "4", "--max-growth-mb", "nan"],
     "argument --max-growth-mb: must be a finite number >= 0, got 'nan'"),
    ("profile_segment", ["--checkpoint", "/nonexist.pt"], "argument --checkpoint: no such file: /nonexist.pt"),
    ("profile_segment", ["--batch", "0"], "argument --batch: must be a whole number >= 1, got 0"),
    ("profile_segment", ["--checkpoint", "{file}", "--device", "banana"], "argument --device: must"),
    ("make_readme_figure", ["--input", "/nonexist.mp4", "--render", "{file}", "--out", "{dir}/x.png"],
     "argument --input: no such file: /nonexist.mp4"),
    ("make_readme_figure", ["--gap", "-1"], "argument --gap: must be a whole number >= 0, got -1"),
    # a folder given for a file, refused before it is opened as one (IsADirectoryError, after the set-up)
    ("export_segmenter", ["{dir}", "{dir}/model.pt"], "argument source: not a file: {dir}"),
    ("make_readme_figure", ["--input", "{dir}", "--render", "{file}", "--out", "{dir}/x.png"],
     "argument --input: not a file: {dir}"),
    *((script, ["--output", "{dir}"], "output {dir} is a folder: give a file name such as {dir}/out.md")
      for script in ("bench_segment", "bench_train", "bench_stylize", "bench_segment_every", "crop_batches",
                     "bench_render")),
    ("bench_render", ["--results", "{dir}"], "argument --output/--results: output {dir} is a folder"),
    ("bench_stylize", ["--output", "{dir}/report.txt"],
     "argument --output: output report.txt: unknown report file '.txt'"),
    ("bench_segment", ["--save-reference", "{dir}"], "argument --save-reference: output {dir} is a folder"),
    ("bench_segment", ["--save-reference", "{file}"],
     "argument --save-reference: output {file} already exists: pass --overwrite to replace it"),
    # yuv420p stores even sizes only: 33x17 was written as 34x18 and reported as 33x17
    ("make_demo_clip", ["--out", "{dir}/clip.mp4", "--frames", "1", "--size", "33x17"],
     "argument --size: must be even on both sides (H.264 yuv420p), got '33x17'"),
    ("make_demo_clip", ["--out", "{dir}/clip.mp4", "--frames", "0"], "argument --frames: must be a whole number >= 1"),
    ("make_synthetic_dataset", ["--out", "{dir}/data", "--max-objects", "0"],
     "argument --max-objects: must be a whole number >= 1, got 0"),
]


def placed(args: list[str], tmp_path: Path) -> list[str]:
    """`args` with `{file}` (an existing file, given.pt) and `{dir}` (tmp_path) filled in."""
    given = tmp_path / "given.pt"
    if not given.exists():
        given.write_bytes(b"")
    return [arg.replace("{file}", str(given)).replace("{dir}", str(tmp_path)) for arg in args]


# the scripts that append a section to a report, by default the checkout's docs/benchmarks.md
REPORTING = {"bench_render", "bench_segment", "bench_segment_every", "bench_stylize", "bench_train", "crop_batches"}


def report_in(script: str, argv: list[str], tmp_path: Path) -> list[str]:
    """`argv` with its report sent to tmp_path where it names none: a refusal that regressed then runs the whole
    benchmark, and its section must not land in the checkout (and shows up as something written)."""
    if script in REPORTING and not {"--output", "--results"} & set(argv):
        return [*argv, "--output", str(tmp_path / "report.md")]
    return argv


@pytest.mark.parametrize("script, argv, fragment", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_before_any_work(script, argv, fragment, tmp_path, capsys):
    main = importlib.import_module(f"scripts.{script}").main
    with pytest.raises(SystemExit) as exit_:
        main(report_in(script, placed(argv, tmp_path), tmp_path))
    assert exit_.value.code == 2
    usage, *middle, error = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one line
    (fragment,) = placed([fragment], tmp_path)
    assert usage.startswith("usage: ") and ": error: " in error and fragment in error, error
    assert "Traceback" not in "\n".join(middle)
    assert {p.name for p in tmp_path.iterdir()} <= {"given.pt"}  # nothing written


# A file that is there but is no checkpoint or style bank: the loader's UserError, raised inside the work
@pytest.mark.parametrize("script, argv, fragment", [
    ("bench_stylize", ["--device", "cpu", "--bank", "{file}"], "{file} is not a file of format"),
    ("profile_segment", ["--device", "cpu", "--checkpoint", "{file}"], "{file}"),
    ("bench_train", ["--device", "cpu", "--backbone", "resnet19"], "segment.backbone='resnet19' is not one of"),
])
def test_user_errors_of_the_work_are_one_line(script, argv, fragment, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"scripts.{script}").main
    given = tmp_path / "given.pt"
    given.write_bytes(b"not a torch file")
    assert main(report_in(script, [str(given) if arg == "{file}" else arg for arg in argv], tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment.replace("{file}", str(given)) in err, err
    assert not (tmp_path / "report.md").exists()


def test_a_user_error_of_several_lines_is_its_first_line(capsys):
    # one line: the error's later lines (a loader's detail, indented) would follow `error: ...` unprefixed
    from common.arguments import reports_user_errors
    from common.errors import UserError, one_line

    assert one_line(UserError("bank.pt is not a style bank\n  found keys: a, b")) == "bank.pt is not a style bank"
    assert one_line(UserError("\n  only this\n")) == "only this" and one_line(UserError("  \n")) == "UserError"

    @reports_user_errors
    def main():
        raise UserError("first\n  second")

    assert main() == 2 and capsys.readouterr().err == "error: first\n"


# ---- outputs: refused in one line before any work, nothing lost ----

def clip(path: Path, width: int = 32, height: int = 32, frames: int = 2) -> Path:
    from tests.helpers_video import pattern_frames, write_clip

    return write_clip(path, pattern_frames(frames, width, height))


@pytest.mark.parametrize("script, argv, fragment", [
    # replaced without a word: make_demo_clip's overwrite defaulted to true, export_segmenter never asked
    ("make_demo_clip", ["--out", "{old}.mp4", "--frames", "1", "--size", "16x16"],
     "output {old}.mp4 already exists: pass --overwrite to replace it"),
    ("export_segmenter", ["{file}", "{old}.pt"], "output {old}.pt already exists: pass --overwrite to replace it"),
    ("export_segmenter", ["{file}", "{dir}/model.onnx"], "unknown checkpoint file '.onnx', use one of .pt, .pth"),
    ("make_readme_figure", ["--input", "{file}", "--render", "{file}", "--out", "{old}.png"],
     "output {old}.png already exists: pass --overwrite to replace it"),
    # a folder was an IsADirectoryError traceback once the frames were decoded, beside a stray `.d.png.tmp.png`
    ("make_readme_figure", ["--input", "{file}", "--render", "{file}", "--out", "{dir}"],
     "output {dir} is a folder: give a file name such as {dir}/out.png"),
    ("make_readme_figure", ["--input", "{file}", "--render", "{file}", "--out", "{dir}/figure.gif"],
     "output figure.gif: unknown image type '.gif', use one of .png, .jpg, .jpeg"),
])
def test_outputs_are_refused_before_any_work_and_nothing_is_lost(script, argv, fragment, tmp_path, capsys):
    old = tmp_path / "old"
    for arg in argv:
        if arg.startswith("{old}"):
            old.with_name(arg.replace("{old}", "old")).write_bytes(b"precious")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    main = importlib.import_module(f"scripts.{script}").main
    assert main([arg.replace("{old}", str(old)) for arg in placed(argv, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    (fragment,) = placed([fragment.replace("{old}", str(old))], tmp_path)
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and fragment in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"given.pt": b"", **before}


def test_readme_figure_refuses_videos_of_two_sizes_and_writes_its_suffixs_format(tmp_path, capsys):
    # two sizes were a ValueError traceback from numpy; `--out e.jpg` held PNG data
    from PIL import Image

    from scripts.make_readme_figure import main

    small, wide = clip(tmp_path / "small.mp4"), clip(tmp_path / "wide.mp4", width=48)
    assert main(["--input", str(small), "--render", str(wide), "--frames", "0", "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {small} is 32x32 but {wide} is 48x32: ") and len(err.splitlines()) == 1, err
    for suffix, format in ((".jpg", "JPEG"), (".png", "PNG")):
        out = tmp_path / f"figure{suffix}"
        assert main(["--input", str(small), "--render", str(small), "--frames", "0", "1", "--gap", "2",
                     "--out", str(out)]) == 0
        with Image.open(out) as image:
            assert (image.format, image.size) == (format, (32 + 2 + 32, 32 + 2 + 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.jpg", "figure.png", "small.mp4", "wide.mp4"]


def test_readme_figure_puts_each_frames_input_left_and_render_right_in_the_order_given(tmp_path):
    import av
    from PIL import Image

    from scripts.make_readme_figure import main
    from tests.helpers_video import pattern_frames, write_clip

    frames = pattern_frames(4, 32, 32)
    videos = {name: write_clip(tmp_path / f"{name}.mp4", clip) for name, clip in
              (("input", frames), ("render", [255 - frame for frame in frames]))}
    decoded = {}
    for name, path in videos.items():  # as any player decodes them
        with av.open(str(path)) as container:
            decoded[name] = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    out = tmp_path / "figure.png"
    assert main(["--input", str(videos["input"]), "--render", str(videos["render"]), "--frames", "3", "1",
                 "--gap", "2", "--out", str(out)]) == 0
    figure = np.asarray(Image.open(out))
    for row, index in enumerate((3, 1)):
        top = row * (32 + 2)
        assert np.array_equal(figure[top:top + 32, :32], decoded["input"][index])
        assert np.array_equal(figure[top:top + 32, 34:], decoded["render"][index])
    assert (figure[32:34] == 255).all() and (figure[:, 32:34] == 255).all()


def test_demo_clip_is_replaced_when_told_and_holds_the_size_reported(tmp_path, capsys):
    import av

    from scripts.make_demo_clip import main

    out = tmp_path / "clip.mp4"
    out.write_bytes(b"precious")
    assert main(["--out", str(out), "--frames", "2", "--size", "32x16", "--overwrite"]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height, stream.frames) == (32, 16, 2)
    assert f"demo clip: {out} (2 frames, 32x16, 24 fps)" in capsys.readouterr().out


def test_export_keeps_the_sources_provenance(tmp_path):
    # an export of an export said only "exported from first.pt": the demo model's own provenance was lost
    from scripts.export_segmenter import main
    from tests.tiny_models import tiny_segmenter

    source = tiny_segmenter(tmp_path / "trained.pt")
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    assert main([str(source), str(first), "--note", "tiny random weights"]) == 0
    assert main([str(first), str(second), "--fp32"]) == 0
    provenance = {path: torch.load(path, weights_only=True)["provenance"] for path in (first, second)}
    assert provenance == {first: "tiny random weights", second: f"tiny random weights; exported from {first}"}


def test_synthetic_dataset_checks_both_splits_before_writing_either(tmp_path, capsys):
    # a bad --val used to fail only after the train split had been written (or had replaced an older one)
    from scripts.make_synthetic_dataset import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "data"), "--train", "1", "--val", "-1", "--size", "32"])
    assert exit_.value.code == 2
    assert "argument --val: must be a whole number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# ---- the reports: where they go, what they say ----

def test_publish_appends_a_level_two_section_and_names_the_file_in_full(tmp_path, monkeypatch, capsys):
    # run from elsewhere, bench_segment and bench_train wrote ./docs/benchmarks.md and said "docs/benchmarks.md"
    from scripts.bench_report import publish

    monkeypatch.chdir(tmp_path)
    publish("## Section\n\n| a |\n", Path("report.md"))
    publish("\n## Another\n", Path("report.md"))
    assert (tmp_path / "report.md").read_text() == "# Benchmarks\n\n## Section\n\n| a |\n\n## Another\n"
    assert capsys.readouterr().out.count(f"appended to {tmp_path / 'report.md'}\n") == 2
    with pytest.raises(ValueError, match="starts with a '## ' heading"):  # bench_stylize's was `### stylize: ...`
        publish("### stylize: throughput\n", Path("report.md"), append=False)


@pytest.mark.parametrize("module", ["bench_segment", "bench_train"])
def test_reports_default_to_the_projects_results_file_from_any_folder(module, tmp_path, monkeypatch):
    from scripts.bench_report import RESULTS

    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(f"scripts.{module}").parse_args([]).output == RESULTS
    assert RESULTS.is_absolute() and RESULTS.parent.name == "docs"


@pytest.mark.parametrize("script, argv, maker", [  # maker: the module whose make_clip the script's clip comes from
    ("crop_batches", ["--size", "240p", "--frames", "2", "--device", "cpu", "--no-append", "no_such_key=1"],
     "bench_render"),
    ("bench_render", ["--sizes", "240p", "--frames", "2", "--warmup-frames", "2", "--device", "cpu", "--no-append",
                      "no_such_key=1"], "bench_render"),
    ("memory_soak", ["--frames", "16", "--every", "4", "--batch-size", "4", "no_such_key=1"], "memory_soak"),
])
def test_a_bad_override_fails_before_any_clip_is_made(script, argv, maker):
    module, maker = (importlib.import_module(f"scripts.{name}") for name in (script, maker))
    outcome = None
    with mock.patch.object(maker, "make_clip", wraps=maker.make_clip) as make_clip:
        try:
            outcome = module.main(argv)
        except Exception as error:  # Hydra's own, until pipeline/render.py words it in one line
            outcome = error
    assert outcome not in (0, None) and not make_clip.called, outcome


def test_bench_segment_warms_each_setting_past_the_cuda_graph_capture(tmp_path):
    """GraphCache captures a frame shape's graph on its `after_calls`-th call: with --warmup 1 (the old default)
    that capture landed in ours' first timed batch on a GPU. Counted on a CPU: the calls each (batch, precision)
    row makes before its timed ones, here with --warmup 0."""
    import inspect

    import scripts.bench_segment as bench
    from gpu.cuda_graph import GraphCache

    after_calls = inspect.signature(GraphCache).parameters["after_calls"].default  # as segment/model.py builds it
    untimed, real = [], bench.time_pair

    def counted(runs, device, iterations, warmup):
        calls = Counter()

        def counting(name, run):
            return lambda: calls.update([name]) or run()

        result = real({name: counting(name, run) for name, run in runs.items()}, device, iterations, warmup)
        untimed.append(calls["ours"] - iterations)
        return result

    report = tmp_path / "report.md"
    argv = ["bench_segment.py", "--devices", "cpu", "--image-size", "64", "64", "--min-size", "64", "--max-size", "64",
            "--detections", "2", "--batch-sizes", "1", "2", "--precisions", "fp32", "--iterations", "1",
            "--warmup", "0", "--output", str(report)]
    with mock.patch.object(bench, "time_pair", counted), mock.patch.object(sys, "argv", argv):
        bench.main()
    assert untimed == [after_calls, after_calls]
    assert f"1 timed iterations after {after_calls} warm-up (--warmup 0, " in report.read_text()
    assert bench.parse_args([]).warmup >= after_calls  # the default asks for no less


TINY_TRAIN = ["--device", "cpu", "--size", "64", "--batch", "1", "--iterations", "1", "--warmup", "0",
              "--fpn-channels", "32", "--representation-size", "32", "--mask-head-channels", "32"]


def last_table_row(text: str) -> dict[str, str]:
    header, _, row = (line.strip("| ").split(" | ") for line in text.strip().splitlines()[-3:])
    return dict(zip(header, row))


def test_bench_train_gives_a_ratio_only_when_the_first_step_losses_agree(tmp_path, capsys):
    # the ratio was printed whatever the two computed
    import scripts.bench_train as bench

    report = tmp_path / "report.md"
    assert bench.main([*TINY_TRAIN, "--output", str(report)]) == 0
    row = last_table_row(report.read_text())
    assert float(row["first-step losses, max relative Δ"]) <= bench.LOSS_TOLERANCE["none"], row
    assert row["ours / torchvision"].endswith("x"), row
    real_twin = bench.torchvision_twin

    def skewed(config):  # the twin with its losses half as large again
        twin = real_twin(config)
        forward = twin.forward
        twin.forward = lambda images, targets=None: {k: 1.5 * v for k, v in forward(images, targets).items()}
        return twin

    capsys.readouterr()
    with mock.patch.object(bench, "torchvision_twin", skewed):
        assert bench.main([*TINY_TRAIN, "--output", str(tmp_path / "skewed.md")]) == 1
    out, err = capsys.readouterr()
    assert "error: the first step's losses of ours and torchvision's differ by up to 3.33e-01 " in err, err
    assert "no speed ratio" in err and "ours / torchvision" not in out and not (tmp_path / "skewed.md").exists()


def test_bench_stylize_gives_a_ratio_only_when_ours_and_the_module_agree(tmp_path, capsys):
    # the ratio was printed whatever the two computed; the section was a `### stylize:` under the others' `##`
    import re

    import scripts.bench_stylize as bench
    from scripts.bench_report import device_name
    from tests.tiny_models import tiny_bank

    bank, report = tiny_bank(tmp_path / "bank.pt"), tmp_path / "report.md"
    seconds = (2.0, 1.0, None, 1.6, 1.25)  # per call: module, runner, runner + graphs (none: CPU), NCHW, full size
    real_forward = bench.module_forward
    with mock.patch.object(bench, "bench", return_value=[("frame 854x480", "one by one", 1, seconds)]) as timed:
        assert bench.main(["--device", "cpu", "--bank", str(bank), "--output", str(report)]) == 0
        text = report.read_text()
        assert text.startswith("# Benchmarks\n\n## Stylize: MultiStyleNet throughput (") and "###" not in text
        assert f", {device_name(torch.device('cpu'))})\n" in text
        assert re.search(r"the peer on one batch of two \[0, 1\] images: max \|Δ\| [\d.e-]+, mean [\d.e-]+ \(at most",
                         text), text
        assert "| frame 854x480 | one by one | 0.50 | 1.00 | - (CPU) | 2.00x | 0.62 | 0.80 |" in text
        capsys.readouterr()
        with mock.patch.object(bench, "module_forward", lambda *a, **k: real_forward(*a, **k) + 0.5):
            assert bench.main(["--device", "cpu", "--bank", str(bank), "--output", str(tmp_path / "skewed.md")]) == 1
        assert timed.call_count == 1  # the benchmark did not run for the skewed peer
    out, err = capsys.readouterr()
    assert "error: ours and the module forward disagree on one batch: max |Δ| 0.5" in err and "no speed ratio" in err
    assert "|" not in out and not (tmp_path / "skewed.md").exists()


@pytest.mark.parametrize("script, argv, device_line", [
    ("bench_segment_every", ["--input", "{clip}", "--every", "2", "--repeats", "0", "--device", "cpu"],
     "Device: {cpu};"),
    ("crop_batches", ["--size", "240p", "--frames", "2", "--buckets", "64", "--device", "cpu"],
     "detections computed on {cpu},"),
])
def test_sections_go_to_output_and_name_the_cpu_model(script, argv, device_line, tmp_path):
    # both lacked --output; bench_segment_every named the device "CPU (2 threads)", crop_batches "x86_64 (cpu)"
    from scripts.bench_report import cpu_model, device_name
    from tests.render_cli import tiny_model_overrides

    video, report = clip(tmp_path / "clip.mp4", 64, 48, 4), tmp_path / "report.md"
    main = importlib.import_module(f"scripts.{script}").main
    argv = [arg.replace("{clip}", str(video)) for arg in argv]
    assert main([*argv, "--output", str(report), *tiny_model_overrides(tmp_path / "models")]) == 0
    text = report.read_text()
    assert device_line.replace("{cpu}", device_name(torch.device("cpu"))) in text and cpu_model() in text, text


def first_step_difference(theirs: dict[str, float], ours: dict[str, float]) -> float:
    """bench_train.loss_difference of two steps that return these losses."""
    from scripts.bench_train import loss_difference

    def step(losses):
        return lambda batch: {key: torch.tensor(value) for key, value in losses.items()}

    steps = (("torchvision", step(theirs)), ("ours", step(ours)))
    return loss_difference(steps, {"torchvision": [None], "ours": [None]})


def test_a_nan_loss_after_a_finite_one_fails_the_agreement():
    """Python's max drops a NaN that is not first: a NaN mask loss beside agreeing others passed bench_train's check
    as 0 and a speed ratio was published."""
    from scripts.bench_report import worst

    assert np.isnan(first_step_difference({"loss_box": 1.0, "loss_mask": float("nan")},
                                          {"loss_box": 1.0, "loss_mask": 0.5}))
    assert np.isnan(worst([0.0, float("nan")])) and worst([1.0, 3.0, 2.0]) == 3.0


def test_bench_segment_every_row_from_known_speeds_compares_the_skipped_frames_at_min_score(tmp_path):
    # Speeds faked (every frame 10 fps, N = 2 20 fps: 2.00x); PSNR faked to see what is compared with what.
    # style.min_score 0.25 sits inside the tiny segmenter's scores on this clip (0.22-0.29): both sides of each
    # skipped frame's comparison must hold only what gets styled.
    import scripts.bench_segment_every as bench
    from tests.render_cli import tiny_model_overrides

    video = clip(tmp_path / "clip.mp4", 64, 48, 8)
    compared, scores = [], []
    real_add = bench.Agreement.add

    def add(self, index, reference, shown):
        scores.extend([*reference.scores.tolist(), *shown.scores.tolist()])
        return real_add(self, index, reference, shown)

    def psnr(path, reference, skipped, device):
        compared.append((path.name, reference.name, sorted(skipped)))
        return 30.0, 40.0

    speeds = {bench.Variant(1): 10.0, bench.Variant(2): 20.0, bench.Variant(2, True): 15.0}
    report = tmp_path / "report.md"
    timed = {v: bench.Timed(fps, 1.0, 1.0, 0.5) for v, fps in speeds.items()}
    with mock.patch.object(bench, "speeds", lambda cfgs, *a: {v: timed[v] for v in cfgs}), \
            mock.patch.object(bench, "psnr_by_frame_kind", psnr), mock.patch.object(bench.Agreement, "add", add):
        assert bench.main(["--input", str(video), "--every", "2", "--propagate", "--repeats", "1", "--device", "cpu",
                           "--output", str(report), *tiny_model_overrides(tmp_path / "models"),
                           "style.min_score=0.25", "batch_size=4"]) == 0
    assert compared == [("every2p.mp4", "every2.mp4", [1, 3, 5, 7])]
    assert scores and min(scores) >= 0.25, scores
    rows = {row[0]: row for row in (line.strip("| ").split(" | ") for line in report.read_text().splitlines()[-3:])}
    assert rows["1"][1:3] == ["10.00", "1.00x"] and rows["2"][1:3] == ["20.00", "2.00x"], rows
    assert rows["2 + style.propagate"][1:3] == ["15.00", "1.50x"] and rows["2 + style.propagate"][6] == "30.00 / 40.00"


def test_bench_train_rates_from_known_step_times():
    # fake clock: each torchvision step 2 s, each of ours 1 s, batches of 2 -> 1 and 2 img/s, ours 2.00x
    import itertools
    import types

    import scripts.bench_train as bench

    clock = itertools.accumulate(itertools.cycle([0, 2, 0, 1]))
    texts = []
    with mock.patch.object(bench, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)))), \
            mock.patch.object(bench, "publish", lambda text, *a, **k: texts.append(text)):
        argv = [*TINY_TRAIN, "--no-append"]
        argv[argv.index("--batch") + 1] = "2"
        assert bench.main(argv) == 0
    row = last_table_row(texts[0])
    assert (row["batch"], row["torchvision img/s"], row["ours img/s"], row["ours / torchvision"]) == \
        ("2", "1.00", "2.00", "2.00x"), row


def test_one_loss_off_alone_is_the_loss_difference():
    # the worst key decides: a lone skewed loss beside agreeing others must not average or min away
    assert first_step_difference({"loss_box": 1.0, "loss_mask": 0.5, "loss_rpn": 2.0},
                                 {"loss_box": 1.0, "loss_mask": 0.75, "loss_rpn": 2.0}) == pytest.approx(0.5)


def test_second_half_fps_starts_at_the_batch_that_reaches_half_with_uneven_times():
    # even spacing hid the start: from the batch past half (t=5) gives 4/5 fps, the right one (t=3) 8/7
    assert second_half_fps([(1.0, 4), (3.0, 8), (5.0, 12), (10.0, 16)]) == pytest.approx(8 / 7)


def fake_render_for_bench(frames: int):
    """A render of `frames` frames in batches of 4 that calls the style network twice per frame."""
    from types import SimpleNamespace

    import stylize.apply

    def render(cfg, output, on_batch=None, build=None):
        stages = build(cfg, "cpu", None, None) if build else None
        for done in range(4, frames + 1, 4):
            for _ in range(2 * 4):
                stylize.apply.run_network(None, torch.zeros(1, 3, 8, 8))
            for _, stage in stages.run if stages else ():
                stage([None] * 4)
            if on_batch:
                on_batch(SimpleNamespace(frames=done))
        return SimpleNamespace(frames=frames, fps=1.0, timings={}, instances=0, tracks=None, styles_used=set())
    return render


@pytest.mark.parametrize("frames", [8, 16])
def test_bench_render_row_per_frame_figures_and_peak_rss_in_mib(frames, tmp_path):
    # RSS 100 MiB before the render, 300 after its first batch, 150 after the others: the peak, in MiB
    from types import SimpleNamespace

    import scripts.bench_render as bench
    import stylize.apply

    rss = iter([100, 300, *[150] * 10])
    process = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=next(rss) * 2**20))
    with mock.patch.object(bench, "make_clip") as make_clip, \
            mock.patch.object(bench, "render", fake_render_for_bench(frames)), \
            mock.patch.object(bench.psutil, "Process", return_value=process), \
            mock.patch.object(stylize.apply, "run_network", lambda *a, **k: None):
        row = bench.bench_one("360p", frames, "cpu", [], tmp_path, 0)
    assert {call.kwargs["size"] for call in make_clip.call_args_list} == {bench.SIZES["360p"]}
    assert row["peak_rss_mb"] == pytest.approx(300) and row["style_calls"] == pytest.approx(2)


@pytest.mark.parametrize("frames", [8, 16])
def test_bench_render_operators_are_per_frame(frames):
    # each stage call counts 12 operators on a batch of 4 frames: 3 per frame, whatever the clip's length
    from types import SimpleNamespace

    import scripts.bench_render as bench

    stages = SimpleNamespace(run=[(name, lambda batch: batch) for name in bench.MODEL_STAGES])
    with mock.patch.object(bench, "render", fake_render_for_bench(frames)), \
            mock.patch.object(bench, "build_stages", return_value=stages), \
            mock.patch.object(bench, "operators", side_effect=lambda fn: fn() or 12), \
            mock.patch("stylize.apply.run_network", lambda *a, **k: None):
        counts = bench.operators_per_frame(SimpleNamespace(output="unused.mp4"))
    assert counts == {name: pytest.approx(3) for name in bench.MODEL_STAGES}


def test_bench_stylize_best_of_ours_is_the_faster_and_any_pixel_off_fails(tmp_path, capsys):
    # graphs faster than the plain runner (0.5 s against 1 s, module 2 s): best ours is the graphs' 4.00x
    import scripts.bench_stylize as bench
    from tests.tiny_models import tiny_bank

    bank, texts = tiny_bank(tmp_path / "bank.pt"), []
    real_forward = bench.module_forward

    def one_pixel_off(*args, **kwargs):  # the mean stays far inside its bound, the max does not
        out = real_forward(*args, **kwargs).clone()
        out[0, 0, 0, 0] += 0.5
        return out

    with mock.patch.object(bench, "bench", return_value=[("frame", "one", 1, (2.0, 1.0, 0.5, 1.6, 1.25))]), \
            mock.patch.object(bench, "publish", lambda text, *a, **k: texts.append(text)):
        assert bench.main(["--device", "cpu", "--bank", str(bank), "--no-append"]) == 0
        assert texts[0].strip().splitlines()[-1] == "| frame | one | 0.50 | 1.00 | 2.00 | 4.00x | 0.62 | 0.80 |"
        with mock.patch.object(bench, "module_forward", one_pixel_off):
            assert bench.main(["--device", "cpu", "--bank", str(bank), "--no-append"]) == 1
    assert "error: ours and the module forward disagree" in capsys.readouterr().err and len(texts) == 1


def test_bench_stylize_five_ways_time_the_peer_then_ours_in_the_other_layout():
    import stylize.apply
    import stylize.inference
    import scripts.bench_stylize as bench

    calls = []

    def fn(graphs, layout):
        calls.append((graphs, layout, stylize.apply.run_network is bench.module_forward,
                      stylize.inference.UPSAMPLE_BY_PHASES))

    cpu = torch.device("cpu")
    with mock.patch.object(bench, "timed", lambda f, device, repeats: f() or 1.0):
        assert bench.five_ways(fn, cpu, 1) == (1.0, 1.0, None, 1.0, 1.0)
    by_phases = stylize.inference.UPSAMPLE_BY_PHASES
    assert calls == [(False, "auto", True, by_phases), (False, "auto", False, by_phases),
                     (False, not bench.auto_channels_last(cpu), False, by_phases), (False, "auto", False, False)]


def test_markdown_table_separates_every_column_and_no_append_writes_nothing(tmp_path, monkeypatch, capsys):
    # a separator short of a cell is no table in GitHub's markdown: the rows show as text
    from scripts.bench_report import markdown_table, publish

    assert markdown_table(["a", "b", "c"], [["1", "2", "3"]]) == "| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |"
    monkeypatch.chdir(tmp_path)
    publish("## Section\n", tmp_path / "report.md", append=False)
    assert list(tmp_path.iterdir()) == [] and "appended" not in capsys.readouterr().out


def test_recorded_crops_keep_each_calls_limits():
    # the limits (frame and max_side) stop a call's padding: replay pads past them without
    from types import SimpleNamespace

    import scripts.crop_batches as crop_batches
    import stylize.apply

    def render(cfg, output):
        stylize.apply.batch_plan([(30, 40), (20, 20)], 64, 8, True, [(48, 48), (64, 64)])
        stylize.apply.batch_plan([(10, 10)], 64, 8, True)
        return SimpleNamespace(frames=3)

    with mock.patch.object(crop_batches, "render", render):
        calls, frames = crop_batches.recorded_crops(SimpleNamespace(output="unused.mp4"))
    assert (calls, frames) == ([([(30, 40), (20, 20)], [(48, 48), (64, 64)]), ([(10, 10)], None)], 3)


def test_demo_clip_at_another_rate_plays_at_it_with_a_tone_as_long(tmp_path, capsys):
    # 30 frames at --fps 30: one second of video and of sound, not 30 frames played at 24 fps (1.25 s)
    import av

    from scripts.make_demo_clip import main

    out = tmp_path / "clip.mp4"
    assert main(["--out", str(out), "--frames", "30", "--size", "32x16", "--fps", "30", "--audio"]) == 0
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert (video.average_rate, video.frames) == (30, 30)
        video_seconds = float(video.duration * video.time_base)
        samples = sum(frame.samples for frame in container.decode(audio=0))
        rate = container.streams.audio[0].rate
    assert video_seconds == pytest.approx(1.0, abs=0.04) and samples / rate == pytest.approx(1.0, abs=0.05)
    assert f"demo clip: {out} (30 frames, 32x16, 30 fps)" in capsys.readouterr().out
