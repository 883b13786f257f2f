"""Fast inference: stylize only the regions that need it, many crops and styles per batch.

Crops (box + margin, clipped to the frame) of similar size share a batch: each is reflect-padded on the
bottom/right to its size bucket (a multiple of `bucket` ≥ 4, which the two stride-2 convs need; at most the frame's
side at the net's resolution, and `max_side`, rounded up to 4), every crop carries its own style weights, and the
padded outputs are cut back to the crop. The margin keeps the network's border artefacts (reflect padding,
instance-norm statistics) away from the instance's mask edge.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from gpu.precision import PRECISIONS, resolve_precision
from gpu.transfer import row_index
from stylize.errors import StyleError
from stylize.inference import runner_for
from stylize.network import MultiStyleNet, check_size

MIN_SIDE = 16  # the net reflect-pads by 1 at quarter resolution, so each side needs ≥ 8 px; 16 leaves room
# On CPU, larger batches run slower per crop (measured on 2 cores: 256² crops 22-25/s one or two at a time,
# 14/s eight at a time; 128² crops 95/s four at a time, 58-82/s eight), so CPU batches stop at this many pixels.
CPU_BATCH_PIXELS = 4 * 128 * 128
MAX_CROP_BATCH = 16  # crops per network call (on a CPU, calls also stop at CPU_BATCH_PIXELS)
STEP_DOWN_FILL = 0.8  # `crop_factors`: an object steps down to a smaller factor once its crop there fills at most this


def _settings(device: torch.device, precision: str, channels_last) -> tuple[bool, bool]:
    if precision not in PRECISIONS:
        raise StyleError(f"style.precision must be auto, fp32 or bf16, got {precision!r}")
    bf16 = resolve_precision(precision, device) == "bf16"
    return bf16, default_channels_last(device, bf16) if channels_last in (None, "auto") else bool(channels_last)


def default_channels_last(device: torch.device, bf16: bool) -> bool:
    """The layout `channels_last="auto"` picks. GPUs, and oneDNN's bf16 convolutions on a CPU, run this network
    faster channels_last (render on this 2-core CPU, bf16: stylize 57-58 -> 52 ms/f at 480p); CPU fp32 batches
    of several crops ran slower in it."""
    return device.type == "cuda" or bf16


def run_network(network: MultiStyleNet, x: Tensor, style_weights: Tensor, precision: str = "auto",
                channels_last="auto", graphs: bool = False) -> Tensor:
    """Network on a ready batch (float B×3×H×W in [0,1], H, W multiples of 4) → float32 output.

    Runs the network's `StyleRunner` (stylize/inference.py) for x's device; `graphs` lets it replay recurring
    shapes as CUDA graphs on a GPU (no effect on a CPU).
    """
    check_size(x)
    bf16, channels_last = _settings(x.device, precision, channels_last)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.inference_mode():
        return runner_for(network, x.device, dtype, channels_last, graphs)(x, style_weights)


def pad_bottom_right(x: Tensor, height: int, width: int) -> Tensor:
    """Pad B×C×h×w up to height×width; reflect where the image is big enough, else replicate."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _round_up(n: int, step: int) -> int:
    return max(MIN_SIDE, math.ceil(n / step) * step)


def crop_boxes(boxes: Tensor, height: int, width: int, margin: int | Tensor, grid: int | Tensor = 4
               ) -> list[tuple[int, int, int, int]]:
    """Float xyxy boxes → integer (x1, y1, x2, y2): `margin` px around, snapped outwards to the frame's
    `grid`-px grid, clipped to the frame; x2/y2 exclusive, ≥ 1 px. `margin` and `grid` are one for all boxes or
    one per box ((K,) tensors).

    The snap keeps each crop in the same phase as the net's two stride-2 convs wherever the box moves,
    so a still object gets the same texture from frame to frame: 4 px, times the downsampling in front of the net.
    """
    b = boxes.detach().float().cpu().reshape(-1, 4)
    x1 = (torch.div(b[:, 0].floor() - margin, grid, rounding_mode="floor") * grid).clamp(0, width - 1)
    y1 = (torch.div(b[:, 1].floor() - margin, grid, rounding_mode="floor") * grid).clamp(0, height - 1)
    x2 = torch.maximum((torch.ceil((b[:, 2].ceil() + margin) / grid) * grid).clamp(max=width), x1 + 1)
    y2 = torch.maximum((torch.ceil((b[:, 3].ceil() + margin) / grid) * grid).clamp(max=height), y1 + 1)
    return [tuple(int(v) for v in row) for row in torch.stack([x1, y1, x2, y2], 1).tolist()]


def crop_factors(boxes: Tensor, height: int, width: int, margin: int, downsample: int, max_side: int | None,
                 previous: list[int | None] | None = None) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """Each box's crop (`crop_boxes`) and the factor its crop goes through the net at: `downsample`, or for a crop
    whose longer side would exceed `max_side` net px, the smallest whole factor that fits it (a larger factor widens
    the crop's margin and grid, so a crop is measured again until it fits; a crop never outgrows the frame, so one
    always does).

    `previous` (per box, None for a new object) is the factor each object had on its last frame. An object keeps
    a larger factor until its crop at the next smaller one would fill at most STEP_DOWN_FILL of `max_side`: an
    object whose size hovers at the cap keeps one stroke scale instead of switching every few frames."""
    if max_side is None:
        factors = [downsample] * len(boxes)
        return crops_at(boxes, height, width, margin, factors), factors
    factors = [max(downsample, factor or downsample) for factor in (previous or [None] * len(boxes))]
    while True:  # step down while the next smaller factor leaves room
        smaller = [max(downsample, factor - 1) for factor in factors]
        crops = crops_at(boxes, height, width, margin, smaller)
        down = [k for k, (crop, factor) in enumerate(zip(crops, smaller))
                if factor < factors[k] and net_side(_longer(crop), factor) <= STEP_DOWN_FILL * max_side]
        if not down:
            break
        for k in down:
            factors[k] = smaller[k]
    while True:  # grow while over the cap
        crops = crops_at(boxes, height, width, margin, factors)
        over = [k for k, (crop, factor) in enumerate(zip(crops, factors)) if net_side(_longer(crop), factor) > max_side]
        if not over:
            return crops, factors
        for k in over:
            factors[k] = max(factors[k] + 1, fitting_factor(_longer(crops[k]), factors[k], max_side))


def crops_at(boxes: Tensor, height: int, width: int, margin: int, factors: list[int]
             ) -> list[tuple[int, int, int, int]]:
    """The crops of `boxes` for the net at these factors: margin and grid scale with each."""
    scale = torch.tensor(factors, dtype=torch.float32)
    return crop_boxes(boxes, height, width, margin * scale, grid=4 * scale)


def _longer(crop: tuple[int, int, int, int]) -> int:
    x1, y1, x2, y2 = crop
    return max(x2 - x1, y2 - y1)


def fitting_factor(side: int, downsample: int, max_side: int | None) -> int:
    """The smallest factor ≥ `downsample` that brings `side` px within `max_side` net px (None: `downsample`)."""
    return downsample if max_side is None else max(downsample, -(-side // max_side))


def stylize_regions(network: MultiStyleNet, frames: Tensor, frame_index: Tensor, boxes: Tensor,
                    style_weights: Tensor, margin: int = 16, max_batch: int = MAX_CROP_BATCH, precision: str = "auto",
                    channels_last="auto", bucket: int = 16, graphs: bool = False, downsample: int = 1,
                    max_side: int | None = None, factors: list[int] | None = None,
                    ) -> list[tuple[tuple[int, int, int, int], Tensor]]:
    """Stylize K boxes of a batch of frames.

    frames: uint8 B×3×H×W; frame_index: (K,) long into frames; boxes: (K, 4) float xyxy pixels;
    style_weights: (K, S), best on the host: each call's rows then reach a GPU without the host waiting for it.
    Returns, per box in input order, (crop box int xyxy with x2/y2 exclusive, float 3×h×w stylized crop in [0, 1]
    on the frames' device). Crops whose sizes round up to the same multiple of `bucket` run together, up to
    `max_batch` at a time (on CPU, up to CPU_BATCH_PIXELS): `batch_plan`. No side is padded past the frame's side at
    the crop's factor, nor past `max_side`, each rounded up to 4.
    `downsample` N > 1 runs each crop through the net at 1/N of its size (`shrink`) and scales the result back
    (`enlarge`); `margin` and `bucket` count the net's pixels (a margin of N·margin frame pixels keeps the net's
    border artefacts as far from the object, in the net's pixels, as at N = 1). `max_side` caps the net's input:
    a crop whose longer side would exceed it goes through at the smallest larger factor that fits (`crop_factors`),
    so large objects get coarser strokes and every network call has one of a few bounded shapes. `factors` gives
    each crop's factor instead, as `crop_factors` chose it with each object's factor on its last frame (the
    stylize stage keeps those).

    This net's texture reacts to everything within ~60 px, borders included, so padding a crop changes
    its stylization (mean |Δ| ≈ 0.03–0.1 for 4–32 px of padding): a larger `bucket` batches more crops
    together; `bucket=4` pads only to what the net needs and equals stylizing each crop alone.
    """
    if bucket % 4:
        raise ValueError(f"bucket must be a multiple of 4, got {bucket}")
    height, width = frames.shape[-2:]
    if factors is None:
        crops, factors = crop_factors(boxes, height, width, margin, downsample, max_side)
    else:
        crops = crops_at(boxes, height, width, margin, factors)
    index = frame_index.tolist()
    sizes = [(net_side(y2 - y1, factor), net_side(x2 - x1, factor)) for (x1, y1, x2, y2), factor in zip(crops, factors)]
    # a bucket past the frame (or past max_side) would pad a crop with nothing but more work: bucket 1024 on a 256²
    # frame made every input 1024², and max_side 100 at bucket 64 made inputs of 128
    cap = math.inf if max_side is None else max_side
    limits = [(min(net_side(height, factor), cap), min(net_side(width, factor), cap)) for factor in factors]
    results: list[Tensor | None] = [None] * len(crops)
    for (h_pad, w_pad), chunk in batch_plan(sizes, bucket, max_batch, frames.device.type == "cpu", limits):
        batch = torch.cat([
            pad_bottom_right(shrink(frames[index[k], :, y1:y2, x1:x2][None].float() / 255, factors[k]), h_pad, w_pad)
            for k in chunk for (x1, y1, x2, y2) in [crops[k]]])
        out = run_network(network, batch, style_weights[row_index(chunk, style_weights.device)], precision,
                          channels_last, graphs)
        for row, k in zip(out, chunk):
            x1, y1, x2, y2 = crops[k]
            results[k] = enlarge(row[None], y2 - y1, x2 - x1, factors[k])[0]
    return list(zip(crops, results))


def batch_plan(sizes: list[tuple[int, int]], bucket: int, max_batch: int, cpu: bool,
               limits: list[tuple[float, float]] | None = None) -> list[tuple[tuple[int, int], list[int]]]:
    """The network calls for crops of `sizes` ((h, w) at the net's resolution): (padded size, the crops' positions)
    per call. Sizes rounding up to the same multiple of `bucket` share calls of up to `max_batch` crops; on a CPU
    of up to CPU_BATCH_PIXELS padded pixels. `limits` (per crop, (h, w)) caps each padded side at that side rounded
    up to 4 (the frame the net sees, `max_side`), never below what the crop itself needs."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (h, w) in enumerate(sizes):
        padded = (_round_up(h, bucket), _round_up(w, bucket))
        if limits is not None:
            padded = tuple(max(min(side, _round_up(limit, 4)), _round_up(need, 4))
                           for side, limit, need in zip(padded, limits[k], (h, w)))
        groups[padded].append(k)
    plan = []
    for (h_pad, w_pad), members in groups.items():
        step = max(1, min(max_batch, CPU_BATCH_PIXELS // (h_pad * w_pad))) if cpu else max_batch
        plan += [((h_pad, w_pad), members[start:start + step]) for start in range(0, len(members), step)]
    return plan


def stylize_frames(network: MultiStyleNet, frames: Tensor, style_weights: Tensor, max_batch: int = 4,
                   precision: str = "auto", channels_last="auto", graphs: bool = False, downsample: int = 1,
                   max_side: int | None = None) -> Tensor:
    """Whole frames (uint8 B×3×H×W) in one style each ((B, S) or one (S,) for all) → float B×3×H×W in [0,1];
    through the net at 1/`downsample` of their size, or smaller where their longer side would exceed `max_side`
    net px (`fitting_factor`)."""
    height, width = frames.shape[-2:]
    downsample = fitting_factor(max(height, width), downsample, max_side)
    weights = style_weights.expand(frames.shape[0], -1) if style_weights.dim() == 1 else style_weights
    outputs = []
    for start in range(0, frames.shape[0], max_batch):
        x = shrink(frames[start:start + max_batch].float() / 255, downsample)
        x = pad_bottom_right(x, _round_up(x.shape[-2], 4), _round_up(x.shape[-1], 4))
        out = run_network(network, x, weights[start:start + max_batch], precision, channels_last, graphs)
        outputs.append(enlarge(out, height, width, downsample))
    return torch.cat(outputs)


def net_side(size: int, downsample: int) -> int:
    """A side of `size` px at 1/downsample, rounded up (a partial block of pixels still makes one)."""
    return -(-size // downsample)


def shrink(x: Tensor, downsample: int) -> Tensor:
    """B×C×h×w → B×C×⌈h/N⌉×⌈w/N⌉, each pixel the mean of the ones it covers (N = downsample; 1: x itself)."""
    if downsample == 1:
        return x
    return F.interpolate(x, size=(net_side(x.shape[-2], downsample), net_side(x.shape[-1], downsample)), mode="area")


def enlarge(out: Tensor, height: int, width: int, downsample: int) -> Tensor:
    """The net's B×3 output for an input `shrink` made from height×width pixels → B×3×height×width (bilinear;
    1: the output cut to that size)."""
    out = out[:, :, :net_side(height, downsample), :net_side(width, downsample)]
    if downsample == 1:
        return out
    return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)


if __name__ == "__main__":  # not a command: say so (and what it is for) instead of exiting 0 without a word
    import sys

    from common.arguments import library_main

    sys.exit(library_main(sys.argv[1:], "python -m stylize.apply", __doc__,
                          "pipeline/stylize_stage.py, stylize/bank.py and list.py, and scripts/bench_stylize.py, "
                          "bench_render.py and crop_batches.py"))
