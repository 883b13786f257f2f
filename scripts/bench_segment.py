"""Benchmark our Mask R-CNN against torchvision's on the same weights and frames, in one run.

    python scripts/bench_segment.py --min-size 320 --image-size 240 320 --iterations 3

Prints images/s of both models for every device x batch size x precision, their ratio and the largest
box / score difference on the first frame, and appends the table to docs/benchmarks.md (--output).
Each setting's warm-up is at least the calls after which our segmenter captures a frame shape's CUDA graph
(gpu/cuda_graph.py GraphCache), so that no capture lands in a timed batch.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.arguments import reports_user_errors, torch_device, whole_number, writing_in_place  # noqa: E402
from common.errors import OutputError, one_line  # noqa: E402
from common.torch_save import atomic_save  # noqa: E402
from segment.checkpoint import load_torchvision_checkpoint  # noqa: E402
from segment.tv_reference import torchvision_reference  # noqa: E402
from scripts.bench_report import add_report_options, device_name, markdown_table, publish  # noqa: E402
from scripts.script_outputs import checked_output  # noqa: E402

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=whole_number(1), nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="input frame size")
    p.add_argument("--min-size", type=whole_number(1), default=800,
                   help="model resize: shorter side (torchvision default 800)")
    p.add_argument("--max-size", type=whole_number(1), default=1333, help="model resize: longer side cap")
    p.add_argument("--detections", type=whole_number(1), default=100,
                   help="detections per image (the mask head runs on each)")
    p.add_argument("--batch-sizes", type=whole_number(1), nargs="+", default=[1, 8])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--devices", type=torch_device, nargs="+", default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--iterations", type=whole_number(1), default=5, help="timed batches per setting")
    p.add_argument("--warmup", type=whole_number(0), default=2,
                   help="untimed batches per setting, at least the calls after which our segmenter captures a "
                        "shape's CUDA graph")
    add_report_options(p)
    p.add_argument("--save-reference", type=Path, default=None,
                   help="also keep the reference weights here (a torchvision-format checkpoint, e.g. for bench_render)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-reference file")
    args = p.parse_args(argv)
    if args.save_reference is not None:  # before minutes of building: a traceback, or a file lost, came after them
        try:
            args.save_reference = checked_output(args.save_reference, args.overwrite, suffixes=(".pth", ".pt"),
                                                 kind="checkpoint file")
        except OutputError as error:
            p.error(f"argument --save-reference: {one_line(error)}")
    args.devices = args.devices or [torch.device(d) for d in ("cpu", "cuda")[:1 + torch.cuda.is_available()]]
    return args


def photo_frames(count: int, size: tuple[int, int]) -> torch.Tensor:
    """(count, 3, H, W) uint8 frames cycled from skimage's real photos, resized to `size`."""
    from skimage import data

    photos = [torch.from_numpy(getattr(data, n)()).permute(2, 0, 1).float() for n in ("astronaut", "coffee", "chelsea")]
    resized = [F.interpolate(p[None], size=size, mode="bilinear", antialias=True)[0] for p in photos]
    return torch.stack([resized[i % len(resized)] for i in range(count)]).round().clamp(0, 255).to(torch.uint8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_batches(requested: int, model) -> int:
    """`requested`, raised where lower to the calls after which `model` captures a shape's CUDA graph (its
    GraphCache's `after_calls`): a capture in a timed batch would be billed to ours (on a CPU too, so that the
    rows of every device are warmed alike)."""
    return max(requested, model._graphs.after_calls)


def time_pair(runs: dict, device: torch.device, iterations: int, warmup: int):
    """Seconds per batch and last output of each run, timed in alternation so load drift hits both alike."""
    seconds, outputs = dict.fromkeys(runs, 0.0), {}
    for step in range(warmup + iterations):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            outputs[name] = run()
            synchronize(device)
            if step >= warmup:
                seconds[name] += time.perf_counter() - start
    return {name: total / iterations for name, total in seconds.items()}, outputs


def difference(ours, theirs) -> tuple[str, str, str]:
    """Largest box / score gap between each of our detections and the nearest same-class one of theirs on the
    first frame, and how many of ours overlap a same-class one of theirs at IoU >= 0.9. Near-tied detections may be
    listed in either order (TF32 or bf16 rounding differs between the two models), so they are matched, not compared
    by rank; under bf16 the last few places of the top-N list can hold different objects, which the max alone would
    not tell."""
    o, t = ours[0], theirs[0]
    if len(o) != len(t["labels"]):
        return f"detections differ ({len(o)} vs {len(t['labels'])})", "-", "-"
    if len(o) == 0:
        return "0", "0", "0/0"
    our_boxes, their_boxes = o.boxes.float().cpu(), t["boxes"].float().cpu()
    other_class = o.labels.cpu()[:, None] != t["labels"].cpu()[None]
    gap = (our_boxes[:, None] - their_boxes[None]).abs().amax(-1).masked_fill(other_class, float("inf"))
    nearest = gap.min(1)
    iou = box_iou(our_boxes, their_boxes).masked_fill(other_class, 0)
    matched = f"{int((iou.amax(1) >= 0.9).sum())}/{len(o)}"
    if not torch.isfinite(nearest.values).all():
        return "classes differ", "-", matched
    score = (o.scores.float().cpu() - t["scores"].float().cpu()[nearest.indices]).abs().max().item()
    return f"{nearest.values.max().item():.2e}", f"{score:.2e}", matched


def load_average() -> str:
    try:
        import os

        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    devices = args.devices
    settings = dict(min_size=args.min_size, max_size=args.max_size)
    frames_all = photo_frames(max(args.batch_sizes), tuple(args.image_size))
    theirs = torchvision_reference([f.float() / 255 for f in frames_all[:3]], box_detections_per_img=args.detections,
                                   **settings)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.save_reference or Path(tmp) / "maskrcnn_resnet50_fpn.pth"
        atomic_save(theirs.state_dict(), path)
        # what the render runs: loaded, then FrozenBatchNorm folded into the convs (segment/fold.py)
        ours = load_torchvision_checkpoint(path, detections_per_img=args.detections, **settings).fold_frozen_norms()
    warmup, capture = warmup_batches(args.warmup, ours), ours._graphs.after_calls
    if warmup > args.warmup:
        print(f"--warmup {args.warmup} raised to {warmup}: on a GPU our segmenter captures a shape's CUDA graph on "
              f"its call {capture}, which must not be timed")

    rows = []
    for device in devices:
        theirs.to(device)
        ours.to(device)
        for precision in args.precisions:
            ours.set_inference_options(precision=precision)
            dtype = AUTOCAST.get(precision)
            for batch_size in args.batch_sizes:
                frames = frames_all[:batch_size].to(device)

                def run_theirs():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                                enabled=dtype is not None):
                        return theirs([f.float() / 255 for f in frames])

                def run_ours():
                    return ours.predict(frames)

                try:
                    times, outputs = time_pair({"theirs": run_theirs, "ours": run_ours}, device, args.iterations,
                                               warmup)
                except RuntimeError as e:  # e.g. a precision the device does not support
                    print(f"skipped {device} {precision} batch {batch_size}: {str(e).splitlines()[0]}")
                    continue
                t_theirs, t_ours = times["theirs"], times["ours"]
                box_diff, score_diff, matched = difference(outputs["ours"], outputs["theirs"])
                rows.append([
                    device_name(device), str(batch_size), precision, f"{batch_size / t_theirs:.2f}",
                    f"{batch_size / t_ours:.2f}", f"{t_theirs / t_ours:.2f}x", box_diff, score_diff, matched,
                ])
                print(" | ".join(rows[-1]), flush=True)

    header = ["device", "batch", "precision", "torchvision img/s", "ours img/s", "ours / torchvision", "max Δbox px",
              "max Δscore", "ours at IoU ≥ 0.9 with theirs"]
    title = (
        f"## Segmenter: ours vs torchvision Mask R-CNN R50-FPN — {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
        f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}; "
        f"frames {args.image_size[0]}x{args.image_size[1]}, min/max size {args.min_size}/{args.max_size}, "
        f"{args.detections} detections/image, {args.iterations} timed iterations after {warmup} warm-up "
        f"(--warmup {args.warmup}, at least the {capture} calls on whose last a GPU captures a shape's CUDA graph), "
        "the two models alternating; "
        "seeded reference weights (calibrated frozen BN), ours as the render runs it (BN folded into the convs, "
        "channels_last, on a GPU the front replayed as a CUDA graph); differences on the first frame; "
        f"1/5/15-min load average before: {load_before}.\n"
    )
    with writing_in_place(None if args.no_append else args.output):
        publish(title + "\n" + markdown_table(header, rows) + "\n", args.output, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
