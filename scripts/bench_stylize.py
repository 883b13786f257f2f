"""Stylization throughput: crops/s at a few crop sizes (batched vs one by one) and whole 480p frames/s, each
through the plain nn.Module forward (the peer), through our StyleRunner (with CUDA graphs on a GPU), through the
runner in the memory layout its device does not default to (an A/B for the runner's NCHW instance norm), and through
the runner upsampling at full size (an A/B for its upsampling by phases).
`--layers` adds where one 480p frame's time goes: each layer's resample (layout, upsampling, reflect pad),
convolution and instance norm, timed alone in channels_last and in NCHW.

    python scripts/bench_stylize.py [--bank PATH] [--device auto|cpu|cuda] [--repeats N] [--no-append] [--layers]

Prints a table and appends it (device, versions, date) to docs/benchmarks.md (--output). The speed ratio is only
given when ours and the peer compute the same thing: first, once, the runner (and on a GPU its CUDA-graph replay) must
match the module forward on one batch within OUTPUT_TOLERANCE of the precision they run in; otherwise the script says
so and exits 1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stylize.apply  # noqa: E402
import stylize.inference  # noqa: E402
from gpu.precision import resolve_precision  # noqa: E402
from stylize.apply import default_channels_last, stylize_frames, stylize_regions  # noqa: E402
from stylize.inference import GRAPH_AFTER_CALLS, StyleRunner, instance_norm  # noqa: E402
from stylize.network import MultiStyleNet  # noqa: E402
from stylize.bank import StyleBank  # noqa: E402
from common.arguments import (  # noqa: E402
    existing_file, reports_user_errors, torch_device, whole_number, writing_in_place)
from scripts.bench_report import add_report_options, device_name, markdown_table, publish, worst  # noqa: E402
from scripts.profiling import print_profile  # noqa: E402

CROP_SIZES = (64, 128, 256)
CROPS = 8
# The largest and the mean |ours - module| on [0, 1] images that still count as the same computation, per precision.
# Measured on the imported bank: fp32 at most 3.5e-6; bf16 (8 bits, the two sides rounding their sums in different
# orders) a mean of 0.002 with single values up to 0.1 depending on the input. A wrong style gave a mean of 0.19 and
# values up to 0.8; a fault at the borders alone (padding) would show in the largest value only.
OUTPUT_TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (0.25, 0.01)}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call after warm-up (the median shrugs off other processes' bursts)."""
    for _ in range(GRAPH_AFTER_CALLS):  # cuDNN plans, allocator, and the CUDA graph capture when graphs are on
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def module_forward(network, x, style_weights, precision="auto", channels_last="auto", graphs=False):
    """The peer: MultiStyleNet.forward under autocast, as stylize.apply ran it before StyleRunner."""
    bf16 = resolve_precision(precision, x.device) == "bf16"
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return network(x, style_weights.to(x.device)).float()


def auto_channels_last(device: torch.device) -> bool:
    return default_channels_last(device, resolve_precision("auto", device) == "bf16")


def five_ways(fn, device: torch.device, repeats: int) -> tuple[float, float, float | None, float, float]:
    """Seconds per call of fn(graphs, channels_last) through the module peer, our runner, our runner with CUDA
    graphs, our runner in the layout it does not default to (stylize.apply.default_channels_last), and our runner
    upsampling at full size instead of by phases (stylize.inference.UPSAMPLE_BY_PHASES)."""
    with mock.patch.object(stylize.apply, "run_network", module_forward):
        module = timed(lambda: fn(False, "auto"), device, repeats)
    runner = timed(lambda: fn(False, "auto"), device, repeats)
    graphs = timed(lambda: fn(True, "auto"), device, repeats) if device.type == "cuda" else None
    other_layout = timed(lambda: fn(False, not auto_channels_last(device)), device, repeats)
    with mock.patch.object(stylize.inference, "UPSAMPLE_BY_PHASES", False):
        full_size = timed(lambda: fn(False, "auto"), device, repeats)
    return module, runner, graphs, other_layout, full_size


def bench(bank: StyleBank, device: torch.device, repeats: int) -> list[tuple[str, str, int, tuple]]:
    network = bank.network.to(device)
    styles = torch.eye(len(bank))[torch.arange(CROPS) % len(bank)]
    frame = torch.randint(0, 256, (1, 3, 480, 854), dtype=torch.uint8, device=device)
    rows = []
    for size in CROP_SIZES:
        boxes = torch.tensor([[8.0 * i, 8.0 * i, 8.0 * i + size - 1, 8.0 * i + size - 1] for i in range(CROPS)])
        index = torch.zeros(CROPS, dtype=torch.long)
        for mode, batch in (("batched", CROPS), ("one by one", 1)):
            run = partial(lambda b, graphs, layout: stylize_regions(network, frame, index, boxes, styles, margin=0,
                                                                    max_batch=b, graphs=graphs, channels_last=layout),
                          batch)
            rows.append((f"crop {size}x{size} ({CROPS} styles)", mode, CROPS, five_ways(run, device, repeats)))
    frames = frame.expand(2, -1, -1, -1).contiguous()
    rows.append(("frame 854x480", "batch of 2", 2, five_ways(
        lambda graphs, layout: stylize_frames(network, frames, styles[:2], max_batch=2, graphs=graphs,
                                              channels_last=layout), device, repeats)))
    rows.append(("frame 854x480", "one by one", 1, five_ways(
        lambda graphs, layout: stylize_frames(network, frame, styles[0], graphs=graphs, channels_last=layout),
        device, repeats)))
    return rows


def agreement(network, device: torch.device, styles: torch.Tensor) -> tuple[float, float]:
    """The largest and the mean |ours - module forward| over one batch of two [0, 1] images in two styles, of the
    runner's output and on a GPU also of its CUDA graph's replay (the calls before it capture the graph)."""
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0)).to(device)
    weights = styles[:2].to(device)
    expected = module_forward(network.to(device), x, weights)
    ours = [stylize.apply.run_network(network, x, weights)]
    if device.type == "cuda":
        for _ in range(GRAPH_AFTER_CALLS + 1):
            replayed = stylize.apply.run_network(network, x, weights, graphs=True)
        ours.append(replayed)
    differences = [(output - expected).abs() for output in ours]
    return worst(float(d.max()) for d in differences), worst(float(d.mean()) for d in differences)


def layer_rows(bank: StyleBank, device: torch.device, repeats: int) -> list[list[str]]:
    """Per layer of the runner on one 854x480 frame (852x480: H and W multiples of 4): input size and channels,
    then ms of resample / conv / norm, each timed alone, in channels_last and in NCHW; the last column is the
    layout the runner picks on this device."""
    network = bank.network.to(device)
    dtype = torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32
    with mock.patch.object(stylize.inference, "CPU_CHANNELS_LAST_MIN_CHANNELS", 0):  # every layer as asked
        runners = {layout: StyleRunner(network, device, dtype, layout == "channels_last", graphs=False)
                   for layout in ("channels_last", "NCHW")}
    picked = StyleRunner(network, device, dtype, auto_channels_last(device), graphs=False)
    frame = torch.rand(1, 3, 480, 852, device=device)
    style = torch.eye(len(bank), device=device)[:1]
    inputs: list[torch.Tensor] = []
    with torch.inference_mode():
        affine = picked.affine(style)
        MultiStyleNet.run_layers(lambda i, h: inputs.append(h) or picked.layer(i, h, affine),
                                 frame.to(dtype).contiguous(memory_format=picked.layout), picked.num_residual)
        rows = []
        for i, h in enumerate(inputs):
            times = []
            for runner in runners.values():
                padded = runner.resample(i, h)
                conv = runner.convolve(i, padded)
                times += [timed(partial(fn, *args), device, repeats) * 1000 for fn, args in (
                    (runner.resample, (i, h)),
                    (runner.convolve, (i, padded)),
                    (instance_norm, (conv, affine[2 * i], affine[2 * i + 1])))]
            spec = picked.layers[i]
            layout = " -> ".join(dict.fromkeys(  # a layer that upsamples by phases may change layout
                "channels_last" if memory_format == torch.channels_last else "NCHW"
                for memory_format in (spec.layout, spec.out_layout)))
            rows.append([str(i), f"{h.shape[-2]}x{h.shape[-1]}", f"{h.shape[1]} -> {conv.shape[1]}",
                         *(f"{t:.2f}" for t in times), layout])
        totals = [sum(float(r[3 + k]) for r in rows) for k in range(6)]
        rows.append(["all", "", "", *(f"{t:.1f}" for t in totals), ""])
    return rows


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=existing_file, default=None,
                        help="style bank file (default .cache/styles/multistyle26.pt)")
    parser.add_argument("--device", type=torch_device, default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--repeats", type=whole_number(1), default=3, help="timed runs of each, after warm-up")
    add_report_options(parser)
    parser.add_argument("--layers", action="store_true",
                        help="also time each layer's resample, conv and norm on a 480p frame, in both layouts")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, profile the runner on a 480p frame (which kernels the GPU spends it in)")
    args = parser.parse_args(argv)
    device = args.device
    resolved = resolve_precision("auto", device)
    precision = resolved + (" + channels_last" if auto_channels_last(device) else "")
    bank = StyleBank.load(args.bank)
    difference, tolerance = agreement(bank.network, device, torch.eye(len(bank))), OUTPUT_TOLERANCE[resolved]
    agree = (f"max |Δ| {difference[0]:.2g}, mean {difference[1]:.2g} (at most {tolerance[0]:g} and {tolerance[1]:g} "
             f"in {resolved})")
    if not all(value <= limit for value, limit in zip(difference, tolerance)):  # nan too
        print(f"error: ours and the module forward disagree on one batch: {agree}: they do not compute the same "
              "thing, no speed ratio", file=sys.stderr)
        return 1
    rows = bench(bank, device, args.repeats)
    other = "NCHW" if auto_channels_last(device) else "channels_last"
    header = ["input", "mode", "module images/s", "runner images/s", "runner + graphs images/s", "best ours / module",
              f"runner in {other} images/s", "runner, upsampling at full size images/s"]
    cells = []
    for what, mode, count, (module, runner, graphs, other_layout, full_size) in rows:
        best = min(runner, graphs or runner)
        graphed = f"{count / graphs:.2f}" if graphs else "- (CPU)"
        cells.append([what, mode, f"{count / module:.2f}", f"{count / runner:.2f}", graphed, f"{module / best:.2f}x",
                      f"{count / other_layout:.2f}", f"{count / full_size:.2f}"])
    text = (f"## Stylize: MultiStyleNet throughput ({datetime.date.today()}, {device_name(device)})\n\n"
            f"torch {torch.__version__}, {precision}, median of {args.repeats} runs after warm-up, "
            f"load average {os.getloadavg()[0]:.1f} before (others' work skews CPU figures); peer: the nn.Module "
            "forward under autocast; ours: stylize.inference.StyleRunner, with CUDA graphs on a GPU; ours against "
            f"the peer on one batch of two [0, 1] images: {agree}; `python scripts/bench_stylize.py`"
            f"\n\n{markdown_table(header, cells)}\n")
    if args.layers:
        head = ["layer", "input", "channels", *(f"{layout} {part} ms" for layout in ("channels_last", "NCHW")
                                                for part in ("resample", "conv", "norm")), "runner's layout"]
        text += ("\nOne 852x480 frame, layer by layer (each part timed alone, median of "
                 f"{args.repeats}; each resample starts from the input as the runner hands it over, any layout "
                 "change included):"
                 f"\n\n{markdown_table(head, layer_rows(bank, device, args.repeats))}\n")
    with writing_in_place(None if args.no_append else args.output, last=not args.profile):
        publish(text, args.output, append=not args.no_append)
    if args.profile:
        frame = torch.randint(0, 256, (1, 3, 480, 854), dtype=torch.uint8, device=device)
        run = partial(stylize_frames, bank.network.to(device), frame, torch.eye(len(bank))[0])
        run()
        print_profile(run, 5, device.type == "cuda", "StyleRunner on one 854x480 frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
