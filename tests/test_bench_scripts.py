"""The arithmetic of the benchmark scripts' derived figures, on hand-made inputs."""
from __future__ import annotations

import pytest

from scripts.bench_render import second_half_fps
from scripts.crop_batches import replay


def test_second_half_fps_counts_from_the_first_batch_past_half():
    # batches of 4 frames: 8 of 16 frames written at t=5 s, the rest by t=7 s
    written = [(1.0, 4), (3.0, 8), (5.0, 12), (7.0, 16)]
    assert second_half_fps(written) == pytest.approx((16 - 8) / (7.0 - 3.0))
    assert second_half_fps([(2.0, 4)]) is None
    assert second_half_fps([]) is None


def test_replay_counts_a_gpus_calls_shapes_and_padding():
    # two batches over 4 frames; bucket 64: (30, 64), (64, 20), (10, 10) pad to 64², (65, 64) to 128 x 64
    calls = [[(30, 64), (64, 20), (65, 64)], [(10, 10), (65, 64)]]
    row = replay(calls, frames=4, bucket=64)
    assert row["calls"] == pytest.approx(4 / 4)  # (64², 2 crops), (128x64, 1), then (64², 1), (128x64, 1)
    assert row["shapes"] == 3                    # (2, 64, 64), (1, 128, 64), (1, 64, 64)
    assert row["graph_shapes"] == 3              # batches of 1 and 2 stay as they are
    crop = 30 * 64 + 64 * 20 + 65 * 64 + 10 * 10 + 65 * 64
    assert row["padding"] == pytest.approx((3 * 64 * 64 + 2 * 128 * 64) / crop)
    assert row["pixels"] == pytest.approx((3 * 64 * 64 + 2 * 128 * 64) / 4)
    # three crops of one padded size: a batch of 3, which CUDA graphs pad to 4
    row = replay([[(60, 60)] * 3, [(60, 60)] * 4], frames=2, bucket=64)
    assert (row["calls"], row["shapes"], row["graph_shapes"]) == (1.0, 2, 1)
