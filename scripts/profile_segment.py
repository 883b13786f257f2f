"""Where our segmenter's time goes: per-stage times (synchronised after each), predict with and without the front's
CUDA graph (and with cuDNN's algorithm timing), host syncs, kernel launches and the profiler's top operators, for one
batch size and precision.
A diagnosis tool for the GPU sessions, not a benchmark.

    python scripts/profile_segment.py --checkpoint R50.pth [--device cuda] [--batch 1] [--precision bf16]

The checkpoint is a torchvision-format Mask R-CNN file, e.g. the one `bench_segment.py --save-reference` writes.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.arguments import existing_file, reports_user_errors, torch_device, whole_number  # noqa: E402
from scripts.bench_segment import photo_frames  # noqa: E402
from scripts.profiling import print_profile  # noqa: E402
from segment.checkpoint import load_torchvision_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=existing_file, required=True)
    p.add_argument("--device", type=torch_device, default="cuda", help="cuda[:N] | cpu | auto")
    p.add_argument("--batch", type=whole_number(1), default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--image-size", type=whole_number(1), nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--detections", type=whole_number(1), default=100)
    p.add_argument("--iterations", type=whole_number(1), default=10)
    return p.parse_args(argv)


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
        batch, features, candidates = model._front_of(frames)  # a CUDA graph replay once the shape recurs
        mark("front (transform, backbone+fpn, rpn top-k)")
        with model._autocast():
            proposals = model.rpn.select_proposals(candidates, batch.image_sizes)
            mark("rpn filter+nms")
            detections = model.roi_heads(features, proposals, batch.image_sizes)
            mark("roi_heads")
        model._instances(batch, detections, full_masks=False)
        mark("RoIMasks (what the render keeps)")
        model._instances(batch, detections)
        mark("full masks pasted")
    return times


def timed_predict(model, frames, iterations: int, synchronize) -> float:
    """Milliseconds per predict as the render calls it (box-local masks), after one untimed call."""
    model.predict(frames, full_masks=False)
    synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        model.predict(frames, full_masks=False)
    synchronize()
    return (time.perf_counter() - start) / iterations * 1000


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def load():
        model = load_torchvision_checkpoint(args.checkpoint, detections_per_img=args.detections).fold_frozen_norms()
        return model.to(device).set_inference_options(precision=args.precision)

    model = load()
    frames = photo_frames(args.batch, tuple(args.image_size)).to(device)
    for _ in range(3):
        model.predict(frames)

    total: Counter = Counter()
    for _ in range(args.iterations):
        total.update(stage_times(model, frames, synchronize))
    print("stage ms per batch (synchronised after each):",
          {name: round(ms / args.iterations, 2) for name, ms in total.items()})
    for graphs in (False, True) if cuda else (False,):
        model.set_inference_options(cuda_graphs=graphs)
        print(f"predict{' (front as a CUDA graph)' if graphs else ''}: "
              f"{timed_predict(model, frames, args.iterations, synchronize):.2f} ms per batch of {args.batch}")
    if cuda:
        # cuDNN timing its algorithms for each conv shape, which the render leaves off: a fresh model, so that the
        # front's graph is captured with the algorithms it picks
        torch.backends.cudnn.benchmark = True
        tuned = load().set_inference_options(cuda_graphs=True)
        for _ in range(3):
            tuned.predict(frames, full_masks=False)
        print(f"predict (front as a CUDA graph, cudnn.benchmark): "
              f"{timed_predict(tuned, frames, args.iterations, synchronize):.2f} ms per batch of {args.batch}")
        torch.backends.cudnn.benchmark = False
        del tuned

    print_profile(lambda: model.predict(frames), 5, cuda, f"predict, batch {args.batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
