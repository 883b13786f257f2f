"""End-to-end render speed: generated clips at 480p / 720p / 1080p through the full pipeline.

    python scripts/bench_render.py --sizes 480p 720p --frames 48 [--device auto] [-- extra Hydra overrides]

Prints fps, seconds per frame for every stage (from record.timings; decode and encode run on their own threads,
so stage times overlap and add up to more than the wall time), peak RSS and, on CUDA, peak allocated memory.
Appends the table with device, versions and date to docs/benchmarks.md (append only).
`--operators` adds, from one more (untimed) render, the tensor operators each stage runs per frame on the code paths
this device ran: on a GPU nearly each is a kernel launch, the host work a GPU render pays. A CPU's paths are not all a
GPU's (torchvision's batched_nms loops over the classes above 1000 boxes on a CPU, 25,000 on CUDA; the CPU's style
path runs bf16 channels_last with per-image norms and caps a call's pixels), so there the counts overstate a GPU's
launches: the segmenter's back half at 100 detections, 420 operators per frame on a CPU, 84 with a GPU's choices.
`--kernel-time` (CUDA) adds, from one more (profiled) render, each stage's GPU kernel time per frame: a stage whose
wall time is far above it is bound by host work (launches, cuDNN planning new shapes, syncs), not by the GPU.
That render is of a shorter clip of the same scene (`--kernel-frames`, 16; the objects move faster): on an H200
the profiled render of the R50 1080p benchmark did not finish within 110 s at 160 frames, nor within 40 s at 48.

Besides the whole render's fps, the table gives the fps of the clip's second half: caches that warm up as the
video goes on (cuDNN's plan for each new tensor shape, CUDA graphs captured when a shape recurs) weigh on a short
clip's fps more than on a long video's. It also counts the style network's calls per frame and the distinct input
shapes it was called with: on a GPU each call costs host work, and each new shape cuDNN plans.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import psutil
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stylize.apply  # noqa: E402
from gpu.precision import resolve_precision  # noqa: E402
from common.arguments import reports_user_errors, torch_device, whole_number, writing_in_place  # noqa: E402
from scripts.bench_report import add_report_options, device_name, markdown_table, publish  # noqa: E402
from common.device import resolve_device  # noqa: E402
from pipeline.render import build_stages, compose_config, render  # noqa: E402
from scripts.profiling import operators  # noqa: E402
from scripts.make_demo_clip import make_clip  # noqa: E402

SIZES = {"240p": (426, 240), "360p": (640, 360), "480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
STAGES = ("decode", "segment", "track", "assign", "stylize", "composite", "encode")
MODEL_STAGES = ("segment", "track", "assign", "stylize", "composite")  # between decode and encode (stage_threads)


def clip_config(workdir: Path, name: str, size: str, frames: int, device: torch.device | str,
                overrides: list[str]):
    """The render config for the benchmark's generated clip (`frames` at `size`, written into `workdir` as
    `name`), output beside it. Composed before the clip is made: a bad override is refused before that work."""
    clip = workdir / f"{name}_{size}.mp4"
    cfg = compose_config([f"input={clip}", f"output={workdir / f'out_{name}_{size}.mp4'}", "overwrite=true",
                          f"device={device}", *overrides])
    make_clip(clip, frames=frames, size=SIZES[size], fps=24, seed=0)
    return cfg


def bench_one(size: str, frames: int, device: torch.device | str, overrides: list[str], workdir: Path,
              warmup_frames: int, count_operators: bool = False, kernel_frames: int = 0) -> dict:
    width, height = SIZES[size]

    def config(clip_frames: int, name: str):
        return clip_config(workdir, name, size, clip_frames, device, overrides)

    if warmup_frames:  # untimed: CUDA context, cuDNN algorithm search and lazy loading stay out of the figure
        render(config(warmup_frames, "warmup"), workdir / f"out_warmup_{size}.mp4")
    cfg = config(frames, "bench")
    process = psutil.Process()
    peak_rss = process.memory_info().rss
    written: list[tuple[float, int]] = []  # (time, frames written) after each batch

    def sample(summary) -> None:
        nonlocal peak_rss
        peak_rss = max(peak_rss, process.memory_info().rss)
        written.append((time.perf_counter(), summary.frames))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with style_net_calls() as style_shapes:
        summary = render(cfg, Path(cfg.output), on_batch=sample)
    run_device = resolve_device(str(cfg.device))
    row = {"size": f"{size} ({width}x{height})", "frames": summary.frames, "fps": summary.fps,
           "fps_second_half": second_half_fps(written),
           "style_calls": len(style_shapes) / max(1, summary.frames), "style_shapes": len(set(style_shapes)),
           "precision": " / ".join(resolve_precision(str(p), run_device) for p in (cfg.segment.precision,
                                                                                  cfg.style.precision)),
           "instances": summary.instances, "tracks": (summary.tracks or {}).get("tracks", 0),
           "styles": len(summary.styles_used),
           "peak_rss_mb": peak_rss / 2**20,
           "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    for stage in STAGES:
        row[stage] = 1000 * summary.timings.get(stage, 0.0) / max(1, summary.frames)
    if count_operators:
        row["operators"] = operators_per_frame(cfg)
    if kernel_frames:
        row["kernels"] = kernel_ms_per_frame(config(kernel_frames, "kernels"))
    return row


@contextmanager
def style_net_calls() -> Iterator[list[tuple[int, ...]]]:
    """The input shape of every style-network call made in the block (`stylize.apply.run_network`, through which
    the stylize stage runs each batch of crops or frames)."""
    shapes: list[tuple[int, ...]] = []
    run_network = stylize.apply.run_network

    def counted(network, x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return run_network(network, x, *args, **kwargs)

    with mock.patch.object(stylize.apply, "run_network", counted):
        yield shapes


def second_half_fps(written: list[tuple[float, int]]) -> float | None:
    """Frames per second from the first batch written at or past half the frames to the last; None when that is
    the last batch."""
    if not written:
        return None
    end, total = written[-1]
    start, done = next((t, n) for t, n in written if 2 * n >= total)
    return (total - done) / (end - start) if end > start else None


def operators_per_frame(cfg) -> dict[str, float]:
    """Stage -> tensor operators per frame, over a render of the clip (untimed: counting slows every operator)."""
    counts = dict.fromkeys(MODEL_STAGES, 0)

    def counted(name, stage):
        def run(batch):
            result = []
            counts[name] = counts.get(name, 0) + operators(lambda: result.append(stage(batch)))
            return result[0]
        return run

    def build(*args):
        stages = build_stages(*args)
        stages.run = [(name, counted(name, stage)) for name, stage in stages.run]
        return stages

    summary = render(cfg, Path(cfg.output), build=build)
    return {name: count / max(1, summary.frames) for name, count in counts.items()}


def kernel_ms_per_frame(cfg) -> dict[str, float]:
    """Stage -> milliseconds of GPU kernels per frame, over a render of the clip under torch.profiler (untimed:
    profiling slows the host). Each stage runs inside `record_function(stage)` (pipeline/stage_timing.py), and a
    host-side range counts the kernels of every operator under it. That render runs every model stage on the
    calling thread (stage_threads=1): the ranges of the other stage thread came out with no kernels at all."""
    cfg = OmegaConf.merge(cfg, {"stage_threads": 1})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        summary = render(cfg, Path(cfg.output))
    totals = dict.fromkeys(MODEL_STAGES, 0.0)
    for event in profiler.events():
        if event.name in totals and event.device_type == torch.autograd.DeviceType.CPU:
            totals[event.name] += event.device_time_total
    return {name: total / 1000 / max(1, summary.frames) for name, total in totals.items()}


def kernel_table(rows: list[dict]) -> str:
    return markdown_table(["size", *(f"{s} ms/f (kernels)" for s in MODEL_STAGES)], [
        [r["size"], *(f"{r[s]:.1f} ({r['kernels'][s]:.1f})" for s in MODEL_STAGES)] for r in rows])


def operator_caption(device: torch.device) -> str:
    """What the operator table counts: the code paths this device ran, which on a CPU are not all a GPU's."""
    caption = ("Tensor operators per frame, by stage, on the code paths this device ran (views excluded; segment "
               "includes the front that a GPU replays as one CUDA graph)")
    if device.type == "cuda":
        return f"{caption}; nearly each is a kernel launch"
    return (f"{caption}. Not a GPU's kernel launches: some of a GPU's paths differ (batched_nms loops over the "
            "classes above 1000 boxes here, 25,000 on CUDA; the style network's precision, layout and batches), so "
            "these counts are more than a GPU would launch")


def operator_table(rows: list[dict]) -> str:
    stages = list(rows[0]["operators"])
    return markdown_table(["size", "instances / frame", *stages, "total"], [
        [r["size"], f"{r['instances'] / max(1, r['frames']):.1f}", *(f"{r['operators'][s]:.0f}" for s in stages),
         f"{sum(r['operators'].values()):.0f}"] for r in rows])


def table(rows: list[dict]) -> str:
    head = ["size", "precision (segment / style)", "frames", "fps", "fps, 2nd half", "instances", "tracks", "styles",
            "style net calls / frame", "style net shapes", *(f"{s} ms/f" for s in STAGES), "peak RSS MB",
            "CUDA peak MB"]
    return markdown_table(head, [
        [r["size"], r["precision"], r["frames"], f"{r['fps']:.2f}",
         "-" if r["fps_second_half"] is None else f"{r['fps_second_half']:.2f}", r["instances"], r["tracks"],
         r["styles"], f"{r['style_calls']:.2f}", r["style_shapes"],
         *(f"{r[s]:.1f}" for s in STAGES), f"{r['peak_rss_mb']:.0f}",
         "-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"]
        for r in rows])


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["480p"], choices=sorted(SIZES))
    parser.add_argument("--frames", type=whole_number(1), default=48)
    parser.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--warmup-frames", type=whole_number(0), default=8,
                        help="an untimed render of this many frames first")
    add_report_options(parser, "--results")  # --results: its name before the benchmarks shared --output
    parser.add_argument("--operators", action="store_true",
                        help="also count each stage's tensor operators per frame (one more, untimed render)")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also measure each stage's GPU kernel time per frame (CUDA; one more, profiled render)")
    parser.add_argument("--kernel-frames", type=whole_number(1), default=16,
                        help="frames of the profiled render's clip")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the render, e.g. segment.checkpoint=...")
    args = parser.parse_args(argv)
    if args.kernel_time and args.device.type != "cuda":
        parser.error("--kernel-time needs a CUDA GPU")
    with tempfile.TemporaryDirectory(prefix="bench_render_") as tmp:
        rows = []
        for size in args.sizes:
            rows.append(bench_one(size, args.frames, args.device, args.overrides, Path(tmp), args.warmup_frames,
                                  args.operators, args.kernel_frames if args.kernel_time else 0))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    import av
    text = (f"\n## Render benchmark ({time.strftime('%Y-%m-%d %H:%M')}, scripts/bench_render.py)\n\n"
            f"Device: {device_name(args.device)}; torch {torch.__version__}, PyAV {av.__version__}, "
            f"Python {platform.python_version()}; "
            f"overrides: {' '.join(args.overrides) or 'none'}\n\n{table(rows)}\n")
    if args.operators:
        text += f"\n{operator_caption(args.device)}:\n\n{operator_table(rows)}\n"
    if args.kernel_time:
        text += ("\nStage wall time per frame and, in brackets, the GPU kernel time inside it (from a profiled render "
                 f"of a {args.kernel_frames}-frame clip of the same scene):\n\n{kernel_table(rows)}\n")
    with writing_in_place(None if args.no_append else args.output):
        publish(text, args.output, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
