"""Where our segmenter's time goes: per-stage times (synchronised after each), host syncs, kernel launches and the
profiler's top operators, for one batch size and precision. A diagnosis tool for the GPU sessions, not a benchmark.

    python scripts/profile_segment.py --checkpoint R50.pth [--device cuda] [--batch 1] [--precision bf16]

The checkpoint is a torchvision-format Mask R-CNN file, e.g. the one `bench_segment.py --save-reference` writes.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench_segment import photo_frames  # noqa: E402
from segment.checkpoint import load_torchvision_checkpoint  # noqa: E402
from segment.postprocess import paste_masks  # noqa: E402
from segment.transform import rescale_boxes  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--iterations", type=int, default=10)
    return p.parse_args()


def stage_times(model, frames, synchronize) -> dict[str, float]:
    """Milliseconds of each stage of one predict, the device synchronised after each (so they add up to more than
    an unsynchronised predict: no stage overlaps the next)."""
    times, start = {}, time.perf_counter()

    def mark(name: str) -> None:
        nonlocal start
        synchronize()
        times[name] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()

    with torch.inference_mode():
        batch = model.transform.uint8_batch(frames)
        mark("transform")
        with model._autocast():
            features = model.backbone(model._layout(batch.tensors))
            mark("backbone+fpn")
            proposals, _ = model.rpn(batch, features)
            mark("rpn")
            detections = model.roi_heads(features, proposals, batch.image_sizes)
            mark("roi_heads")
        for (boxes, _, _, probs), resized, original in zip(detections, batch.image_sizes, batch.original_sizes):
            paste_masks(probs, rescale_boxes(boxes, resized, original), original,
                        chunk_size=model.config.paste_chunk_size)
        mark("paste")
    return times


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    model = load_torchvision_checkpoint(args.checkpoint, detections_per_img=args.detections).fold_frozen_norms()
    model.to(device).set_inference_options(precision=args.precision)
    frames = photo_frames(args.batch, tuple(args.image_size)).to(device)
    for _ in range(3):
        model.predict(frames)

    total: Counter = Counter()
    for _ in range(args.iterations):
        total.update(stage_times(model, frames, synchronize))
    print("stage ms per batch (synchronised after each):",
          {name: round(ms / args.iterations, 2) for name, ms in total.items()})
    synchronize()
    start = time.perf_counter()
    for _ in range(args.iterations):
        model.predict(frames)
    synchronize()
    print(f"predict: {(time.perf_counter() - start) / args.iterations * 1000:.2f} ms per batch of {args.batch}")

    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.predict(frames)
        torch.cuda.set_sync_debug_mode(0)
        print("host syncs per predict:", sum("synchroniz" in str(w.message) for w in caught))

    runs = 5
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        for _ in range(runs):
            model.predict(frames)
        synchronize()
    events = profiler.key_averages()
    if cuda:
        kernels = sum(e.self_device_time_total for e in events  # kernel rows, as the profiler's own total counts them
                      if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        print(f"GPU kernels per predict: {kernels / runs / 1000:.2f} ms in {launches / runs:.0f} launches")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
