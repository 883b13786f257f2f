"""How a GPU's stylize stage would batch a clip's crops at several crop buckets: style network calls per frame,
distinct input shapes, and the pixels padding adds.

    python scripts/crop_batches.py --size 1080p --frames 160 --buckets 64 128 256 384 512 [Hydra overrides ...]

On a GPU the stylize stage is bound by host work per network call, and cuDNN plans each new input shape
(docs/benchmarks.md, GPU session 6). A larger `style.crop_bucket` gives fewer calls and shapes but pads more
pixels, which the GPU convolves. This renders bench_render's generated clip once with the style network skipped,
records each batch's crop sizes, and replays them through the stage's own batching (`stylize.apply.batch_plan`)
as a GPU runs it. The detections are real: on a CPU the segmenter is what takes the time.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stylize.apply  # noqa: E402
from pipeline.render import render  # noqa: E402
from common.arguments import reports_user_errors, torch_device, whole_number, writing_in_place  # noqa: E402
from scripts.bench_render import SIZES, clip_config  # noqa: E402
from scripts.bench_report import add_report_options, device_name, markdown_table, publish  # noqa: E402
from stylize.apply import MAX_CROP_BATCH, batch_plan  # noqa: E402

Sizes = list[tuple[int, int]]
Call = tuple[Sizes, list | None]  # one stylize call's crop sizes, and the limits its padding stops at (batch_plan)


def recorded_crops(cfg) -> tuple[list[Call], int]:
    """Each stylize call's crop sizes at the net's resolution (with the frame's and max_side's limits on their
    padding), and the frames rendered, from one render of `cfg` whose style network returns grey instead of
    running."""
    calls: list[Call] = []

    def record(sizes, bucket, max_batch, cpu, limits=None):
        calls.append((list(sizes), limits))
        return batch_plan(sizes, bucket, max_batch, cpu, limits)

    def grey(network, x, *args, **kwargs):
        return torch.full_like(x, 0.5, dtype=torch.float32)

    with mock.patch.object(stylize.apply, "batch_plan", record), mock.patch.object(stylize.apply, "run_network", grey):
        summary = render(cfg, Path(cfg.output))
    return calls, summary.frames


def replay(calls: list[Call], frames: int, bucket: int) -> dict:
    """A GPU's network calls for the recorded crops at `bucket`."""
    shapes, graph_shapes, crop_pixels, padded_pixels, count = set(), set(), 0, 0, 0
    for sizes, limits in calls:
        crop_pixels += sum(h * w for h, w in sizes)
        for (h_pad, w_pad), chunk in batch_plan(sizes, bucket, MAX_CROP_BATCH, False, limits):
            count += 1
            padded_pixels += len(chunk) * h_pad * w_pad
            shapes.add((len(chunk), h_pad, w_pad))
            graph_shapes.add((1 << (len(chunk) - 1).bit_length(), h_pad, w_pad))  # CUDA graphs pad the batch
    return {"bucket": bucket, "calls": count / max(1, frames), "shapes": len(shapes), "graph_shapes": len(graph_shapes),
            "padding": padded_pixels / max(1, crop_pixels), "pixels": padded_pixels / max(1, frames)}


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1080p", choices=sorted(SIZES))
    parser.add_argument("--frames", type=whole_number(1), default=160)
    parser.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    # multiples of 4: what `style.crop_bucket` takes (pipeline/stylize_stage.py), so each replays a real setting
    parser.add_argument("--buckets", type=whole_number(4, multiple_of=4), nargs="+",
                        default=[64, 128, 192, 256, 384, 512])
    add_report_options(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the render, e.g. segment=r50_fpn ...")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crop_batches_") as tmp:
        calls, frames = recorded_crops(clip_config(Path(tmp), "clip", args.size, args.frames, args.device,
                                                   args.overrides))
    crops = sum(len(sizes) for sizes, _ in calls)
    rows = [replay(calls, frames, bucket) for bucket in args.buckets]
    text = (f"\n## Crop batches on a GPU ({time.strftime('%Y-%m-%d %H:%M')}, scripts/crop_batches.py)\n\n"
            f"{args.size} generated clip, {frames} frames, {crops} stylized crops ({crops / max(1, frames):.2f} per "
            f"frame), detections computed on {device_name(args.device)}, torch "
            f"{torch.__version__}, Python {platform.python_version()}; overrides: {' '.join(args.overrides) or 'none'}"
            "\n\n" + markdown_table(
                ["crop bucket", "network calls / frame", "distinct input shapes", "shapes with CUDA graphs",
                 "padded / crop pixels", "net input px / frame"],
                [[r["bucket"], f"{r['calls']:.2f}", r["shapes"], r["graph_shapes"], f"{r['padding']:.2f}",
                  f"{r['pixels'] / 1e3:.0f}k"] for r in rows]) + "\n")
    with writing_in_place(None if args.no_append else args.output):
        publish(text, args.output, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
