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
