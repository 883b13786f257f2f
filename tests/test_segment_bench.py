"""scripts/bench_segment.py checks its arguments before building anything: one line each, argparse's exit status."""
from __future__ import annotations

import pytest
import torch

from scripts.bench_segment import parse_args


@pytest.mark.parametrize("argv, fragment", [
    # found by hand: ZeroDivisionError, KeyError, a RuntimeError from the model, torch's _cuda_init traceback
    (["--iterations", "0"], "argument --iterations: must be a whole number >= 1, got 0"),
    (["--iterations", "-2"], "argument --iterations: must be a whole number >= 1, got -2"),
    (["--batch-sizes", "1", "0"], "argument --batch-sizes: must be a whole number >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be a whole number >= 0, got -1"),
    (["--image-size", "0", "640"], "argument --image-size: must be a whole number >= 1, got 0"),
    (["--min-size", "0"], "argument --min-size: must be a whole number >= 1, got 0"),
    (["--detections", "0"], "argument --detections: must be a whole number >= 1, got 0"),
    (["--devices", "cpu", "gpu"], "argument --devices: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--devices", f"cuda:{torch.cuda.device_count()}"], "argument --devices: cuda:"),
])
def test_bad_arguments_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    *usage, error = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one line
    assert usage[0].startswith("usage: ") and "error: " in error and fragment in error


def test_good_arguments_become_devices():
    args = parse_args(["--devices", "cpu", "--iterations", "1", "--warmup", "0", "--batch-sizes", "1", "2"])
    assert args.devices == [torch.device("cpu")] and args.iterations == 1 and args.batch_sizes == [1, 2]


def test_bench_segment_rows_from_known_times_and_both_models_given_the_same_work(tmp_path):
    # Times faked at theirs 2 s, ours 1 s per batch of 2: the img/s and ratio cells are exact. The two models'
    # backbones must see the same batch (frames, resized size) under the same autocast, and the peer keep
    # --detections: a row that times unequal work reads as a speed-up.
    from unittest import mock

    import scripts.bench_segment as bench

    seen: dict[str, set] = {"theirs": set(), "ours": set()}
    models = {}
    real_reference, real_load = bench.torchvision_reference, bench.load_torchvision_checkpoint
    real_pair = bench.time_pair

    def spied(name, model):
        models[name] = model
        model.backbone.register_forward_pre_hook(lambda module, inputs: seen[name].add(
            (tuple(inputs[0].shape), torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))))
        return model

    def pair(runs, device, iterations, warmup):
        for name in seen:
            seen[name].clear()
        _, outputs = real_pair(runs, device, iterations, warmup)
        assert seen["theirs"] == seen["ours"] and len(seen["ours"]) == 1, seen
        return {"theirs": 2.0, "ours": 1.0}, outputs

    report = tmp_path / "report.md"
    with mock.patch.object(bench, "torchvision_reference", lambda *a, **k: spied("theirs", real_reference(*a, **k))), \
            mock.patch.object(bench, "load_torchvision_checkpoint",
                              lambda *a, **k: spied("ours", real_load(*a, **k))), \
            mock.patch.object(bench, "time_pair", pair):
        assert bench.main(["--devices", "cpu", "--image-size", "64", "64", "--min-size", "48", "--max-size", "48",
                           "--detections", "3", "--batch-sizes", "2", "--precisions", "fp32", "bf16",
                           "--iterations", "1", "--warmup", "0", "--output", str(report)]) == 0
    assert models["theirs"].roi_heads.detections_per_img == 3
    lines = report.read_text().strip().splitlines()
    rows = {row[2]: row for row in (line.strip("| ").split(" | ") for line in lines[-2:])}
    assert set(rows) == {"fp32", "bf16"}, lines
    for row in rows.values():
        assert row[1:6] == ["2", row[2], "1.00", "2.00", "2.00x"], row
    box, score, matched = rows["fp32"][6:]
    count, total = matched.split("/")
    assert count == total == "3" and float(box) < 1e-2 and float(score) < 1e-3, rows["fp32"]
