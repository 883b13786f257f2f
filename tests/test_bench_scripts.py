"""The arithmetic of the benchmark scripts' derived figures, on hand-made inputs."""
from __future__ import annotations

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
# device it has no name for, ...). `{file}` stands for a file that exists, where the script wants one given.
BAD_ARGUMENTS = [
    ("bench_render", ["--frames", "0"], "argument --frames: must be a whole number >= 1, got 0"),
    ("bench_render", ["--frames", "2", "--warmup-frames", "0", "--device", "banana"],
     "argument --device: device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    ("bench_render", ["--warmup-frames", "-1"], "argument --warmup-frames: must be a whole number >= 0, got -1"),
    ("bench_render", ["--kernel-frames", "0"], "argument --kernel-frames: must be a whole number >= 1, got 0"),
    ("bench_segment_every", ["--input", "{file}", "--repeats", "0", "--device", "banana"],
     "argument --device: device must be auto"),
    ("bench_segment_every", ["--every", "2", "1"], "argument --every: must be a whole number >= 2, got 1"),
    ("bench_segment_every", ["--repeats", "-1"], "argument --repeats: must be a whole number >= 0, got -1"),
    ("bench_stylize", ["--repeats", "0"], "argument --repeats: must be a whole number >= 1, got 0"),
    ("bench_stylize", ["--bank", "/nonexist.pt"], "argument --bank: no such file: /nonexist.pt"),
    ("bench_stylize", ["--device", "banana"], "argument --device: device must be auto"),
    ("bench_train", ["--device", "banana"], "argument --device: device must be auto"),
    ("bench_train", ["--size", "0"], "argument --size: must be a whole number >= 32, got 0"),
    ("bench_train", ["--iterations", "0"], "argument --iterations: must be a whole number >= 1, got 0"),
    ("bench_train", ["--batch", "x"], "argument --batch: must be a whole number >= 1, got 'x'"),
    ("bench_train", ["--threads", "0"], "argument --threads: must be a whole number >= 1, got 0"),
    ("crop_batches", ["--frames", "0"], "argument --frames: must be a whole number >= 1, got 0"),
    ("crop_batches", ["--size", "240p", "--frames", "1", "--device", "banana"], "argument --device: device must"),
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
    ("profile_segment", ["--checkpoint", "{file}", "--device", "banana"], "argument --device: device must"),
    ("make_readme_figure", ["--input", "/nonexist.mp4", "--render", "{file}", "--out", "x.png"],
     "argument --input: no such file: /nonexist.mp4"),
    ("make_readme_figure", ["--gap", "-1"], "argument --gap: must be a whole number >= 0, got -1"),
]


@pytest.mark.parametrize("script, argv, fragment", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_before_any_work(script, argv, fragment, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"scripts.{script}").main
    given = tmp_path / "given.bin"
    given.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main([str(given) if arg == "{file}" else arg for arg in argv])
    assert exit_.value.code == 2
    usage, *middle, error = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one line
    assert usage.startswith("usage: ") and ": error: " in error and fragment in error, error
    assert "Traceback" not in "\n".join(middle)


# A file that is there but is no checkpoint or style bank: the loader's UserError, raised inside the work
@pytest.mark.parametrize("script, argv, fragment", [
    ("bench_stylize", ["--device", "cpu", "--bank", "{file}"], "{file} is not a file of format"),
    ("profile_segment", ["--device", "cpu", "--checkpoint", "{file}"], "{file}"),
    ("bench_train", ["--device", "cpu", "--norm", "gn", "--fpn-channels", "40"], "divisible by 32"),
])
def test_user_errors_of_the_work_are_one_line(script, argv, fragment, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"scripts.{script}").main
    given = tmp_path / "given.pt"
    given.write_bytes(b"not a torch file")
    assert main([str(given) if arg == "{file}" else arg for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment.replace("{file}", str(given)) in err, err
