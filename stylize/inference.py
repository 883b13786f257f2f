"""MultiStyleNet prepared for many small inference calls (the stylize stage makes a few per frame).

On a GPU the stage was bound by host work, not by the GPU (docs/benchmarks.md: busy 49.5 ms of 745 ms; about
320 kernel launches per call, autocast re-casting every weight each call). A `StyleRunner` does the per-call
work once: weights already in the run's dtype and memory layout, every layer's style scale/shift from one
matmul, and on CUDA each recurring input shape captured as a CUDA graph and replayed with one launch.
It computes what `MultiStyleNet.forward` computes (tests/test_stylize_apply.py compares them).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gpu.cuda_graph import GraphCache
from gpu.transfer import to_device
from stylize.network import INSTANCE_NORM_EPS, MultiStyleNet

GRAPH_AFTER_CALLS = 2         # a shape is captured when it comes back: one-off crop shapes stay eager
MAX_GRAPHS = 1024             # least recently used graphs beyond this are dropped (they share buffers and pool)
MAX_GRAPH_PIXELS = 16 * 352 ** 2  # larger inputs spend their time in the GPU's work, not in launching it


# On a CPU, a channels_last run pads the input of a layer with fewer output channels than this, and normalises its
# output, in NCHW: PyTorch's reflect pad and batch norm on a channels_last tensor of 3-4 channels are slow on a CPU
# (one 480p frame, bf16, 2 cores: the last layer's pad 2.72 against 0.22 ms, its norm 5.70 against 0.56). Its conv
# stays channels_last, which oneDNN runs faster there (5.91 against 7.33 ms; on another 2-core machine, an AMD EPYC,
# 9.48 against 13.18): the padded input goes to channels_last, the output back to NCHW, each a small copy.
CPU_CHANNELS_LAST_MIN_CHANNELS = 8
# A CPU's instance norm of an NCHW activation takes group norm from this many pixels per image, batch norm below
# (`_cpu_instance_norm`; 8x32x16x16 bf16: group norm 140 us, batch norm 83)
CPU_GROUP_NORM_MIN_PIXELS = 32 * 32
# ... and of a channels_last bf16 image from these many pixels and channels (2 cores: 32x480x852 10.2-16.1 ->
# 7.1-8.8 ms, 32x64x64 0.09-0.14 -> 0.06-0.10, 16x240x426 1.15 -> 0.91; but 32x16x16 0.03-0.07 -> 0.29-0.41,
# 8x240x426 1.24 -> 4.2-4.5)
CPU_CHANNELS_LAST_GROUP_NORM_MIN_CHANNELS = 16
# The upsampling layers as four phases of a conv at the input's resolution (`_phase_weight`); False: upsampled and
# padded at full size first (what bench_stylize.py compares)
UPSAMPLE_BY_PHASES = True


@dataclass(frozen=True)
class _Layer:
    weight: Tensor
    stride: int
    pad: int
    upsample: bool
    layout: torch.memory_format  # the layer's conv input is brought to it; its weight is stored in it
    phases: bool                 # the upsampling by `_phase_weight`: four output phases at the input's resolution
    out_layout: torch.memory_format  # of the output (what its norm reads): `layout`, or NCHW for a narrow CPU layer


class StyleRunner:
    """`runner(x, style_weights)` = `network(x, style_weights).float()` for x already on `device`."""

    def __init__(self, network: MultiStyleNet, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 graphs: bool) -> None:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        modules = network.layers()
        self.layers = []
        for m in modules:
            narrow = device.type == "cpu" and m.conv.out_channels < CPU_CHANNELS_LAST_MIN_CHANNELS
            out_layout = torch.contiguous_format if narrow else layout
            phases = UPSAMPLE_BY_PHASES and m.upsample and m.conv.kernel_size == (3, 3) and m.conv.stride == (1, 1)
            weight = _phase_weight(m.conv.weight.detach()) if phases else m.conv.weight.detach()
            self.layers.append(_Layer(weight.to(device, dtype).contiguous(memory_format=layout),
                                      m.conv.stride[0], m.pad, m.upsample, layout, phases, out_layout))
        # one (S, 2·ΣC) table: a batch's scales and shifts for every layer come out of a single matmul
        self.table = torch.cat([torch.cat([m.norm.scale, m.norm.shift], 1) for m in modules], 1).detach().to(device,
                                                                                                            torch.float32)
        self.widths = [w for m in modules for w in (m.norm.scale.shape[1],) * 2]
        self.num_residual = len(network.res)
        self.dtype, self.layout = dtype, layout
        self.graphs = _GraphCache(self._forward, layout) if graphs and device.type == "cuda" else None

    def __call__(self, x: Tensor, style_weights: Tensor) -> Tensor:
        x = x.to(self.dtype).contiguous(memory_format=self.layout)
        w = to_device(style_weights.float(), x.device)  # from the host: queued, the host does not wait
        if self.graphs is not None:
            return self.graphs(x, w)
        return self._forward(x, w)

    def _forward(self, x: Tensor, style_weights: Tensor) -> Tensor:
        affine = self.affine(style_weights)
        return MultiStyleNet.run_layers(lambda i, h: self.layer(i, h, affine), x, self.num_residual,
                                        inplace=True).float()

    def affine(self, style_weights: Tensor) -> list[Tensor]:
        """Every layer's per-image scales, then shifts, flattened image-major (B·C,) as `instance_norm` takes them."""
        return [t.reshape(-1) for t in (style_weights @ self.table).to(self.dtype).split(self.widths, dim=1)]

    def layer(self, i: int, h: Tensor, affine: list[Tensor]) -> Tensor:
        """The i-th ConvNorm: its input prepared (`resample`), convolved, normalised."""
        return instance_norm(self.convolve(i, self.resample(i, h)), affine[2 * i], affine[2 * i + 1])

    def resample(self, i: int, h: Tensor) -> Tensor:
        """The i-th layer's input in its layout, padded for its conv: reflect-padded (in the layout it came in: the
        narrow layers' NCHW), after a nearest upsampling where the layer upsamples, or for its phases edge-padded at
        the input's resolution."""
        spec = self.layers[i]
        if spec.phases:
            return F.pad(h.contiguous(memory_format=spec.layout), [1] * 4, mode="replicate")
        if spec.upsample:
            h = F.interpolate(h.contiguous(memory_format=spec.layout), scale_factor=2, mode="nearest")
        return F.pad(h, [spec.pad] * 4, mode="reflect").contiguous(memory_format=spec.layout)

    def convolve(self, i: int, padded: Tensor) -> Tensor:
        """The i-th layer's conv of its `resample`d input, in the layout its norm reads; an upsampling layer's four
        phases interleaved."""
        spec = self.layers[i]
        out = F.conv2d(padded, spec.weight, stride=spec.stride)
        if spec.phases:
            return _interleave_phases(out, spec.out_layout)
        return out.contiguous(memory_format=spec.out_layout)


def _phase_weight(weight: Tensor) -> Tensor:
    """A 3x3 conv's (C_out, C_in, 3, 3) weight -> the (4·C_out, C_in, 3, 3) weight that computes, from its input
    edge-padded by 1, the conv of that input upsampled ×2 (nearest) and reflect-padded by 1: one output phase
    (row parity a, column parity b) per channel 4·c + 2·a + b, as `_interleave_phases` places them.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are input rows i-1, i, i: the kernel's first row on
    row i-1 and the sum of the other two on row i; output row 2i+1 reads input rows i, i, i+1. The padding's
    rows -1 and 2h of the upsampled input are, reflected, its rows 1 and 2h-2: input rows 0 and h-1, which edge
    padding gives. So the conv runs at a quarter of the pixels with four times the channels, the same
    multiply-adds, and nothing upsampled or padded at full size (one 852x480 frame, bf16, 2 cores: the last
    upsampling layer 5.6 -> 1.8 ms). The sums of two weights are made in float64: in fp32 the output matches the
    upsampled conv's to float rounding."""
    rows = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],   # phase 0: (input row i-1, i, i+1) <- kernel rows
                         [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float64, device=weight.device)
    phases = torch.einsum("apu,oiuv,bqv->oabipq", rows, weight.double(), rows)
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 3, 3).to(weight.dtype)


def _interleave_phases(phases: Tensor, layout: torch.memory_format) -> Tensor:
    """(B, 4·C, h, w) phases (channel 4·c + 2·a + b) -> (B, C, 2h, 2w) in `layout`, pixel (2i+a, 2j+b) of channel
    c from phase (a, b) at (i, j): F.pixel_shuffle's values, written in one copy straight into the layout the norm
    wants (pixel_shuffle, then a layout change, copies twice: the last upsampling layer of a 480p frame, bf16, 2
    cores, 2.75 against 1.8 ms with its pad and conv)."""
    batch, channels, height, width = phases.shape
    out = torch.empty((batch, channels // 4, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                      memory_format=layout)
    out.view(batch, channels // 4, height, 2, width, 2).copy_(
        phases.view(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3))
    return out


def instance_norm(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """instance_norm(h) * scale + shift with a scale and shift per image and channel ((B·C,), image-major).

    F.instance_norm is batch norm over h viewed as one image of B·C channels, but its affine is one per channel,
    shared by the batch; calling batch norm on that view directly takes the per-image affine, applied in the same
    pass as the normalisation instead of a second pass (and kernel launch) over the activation.

    One image (most crop calls at 1080p) needs no view: its channels are batch norm's, in whatever layout h has,
    so a channels_last activation skips the copy to NCHW that the view needs (GPU kernel time of the R50 render's
    crops on an H200: 13.1 -> 10.5 ms per frame, docs/benchmarks.md).

    A CPU has its own choices: `_cpu_instance_norm`."""
    if h.device.type == "cpu":
        return _cpu_instance_norm(h, scale, shift)
    batch, channels = h.shape[:2]
    if batch == 1:
        return F.batch_norm(h, None, None, scale, shift, training=True, eps=INSTANCE_NORM_EPS)
    flat = h.contiguous().view(1, batch * channels, *h.shape[2:])
    return F.batch_norm(flat, None, None, scale, shift, training=True, eps=INSTANCE_NORM_EPS).view(h.shape)


def _cpu_instance_norm(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """`instance_norm` on a CPU. An NCHW batch is one image of B·C channels, as on a GPU, normalised by group norm
    with one channel per group: the same statistics as batch norm, and faster on a CPU from
    CPU_GROUP_NORM_MIN_PIXELS up (fp32, 2 cores, 32x464x464: 3.0 against 8.6 ms). A channels_last batch goes
    image by image: the B·C view would copy it to NCHW, and the next layer's input back (bf16, 2x32x240x240: 8.6
    -> 2.8 ms). Each image takes group norm, again one channel per group, where it is bf16 with
    CPU_CHANNELS_LAST_GROUP_NORM_MIN_CHANNELS channels and CPU_GROUP_NORM_MIN_PIXELS pixels or more; batch norm
    otherwise, and in fp32, where channels_last group norm drifted up to 1.3e-4 from float64 on the net's output,
    against 3e-6."""
    batch, channels = h.shape[:2]
    pixels = h.shape[-2] * h.shape[-1]
    if h.is_contiguous():
        flat = h.view(1, batch * channels, *h.shape[2:])
        if pixels >= CPU_GROUP_NORM_MIN_PIXELS:
            return F.group_norm(flat, batch * channels, scale, shift, eps=INSTANCE_NORM_EPS).view(h.shape)
        return F.batch_norm(flat, None, None, scale, shift, training=True, eps=INSTANCE_NORM_EPS).view(h.shape)
    group_norm = (h.dtype == torch.bfloat16 and channels >= CPU_CHANNELS_LAST_GROUP_NORM_MIN_CHANNELS
                  and pixels >= CPU_GROUP_NORM_MIN_PIXELS)
    images = []
    for i in range(batch):
        image, rows = h[i:i + 1], slice(i * channels, (i + 1) * channels)
        images.append(F.group_norm(image, channels, scale[rows], shift[rows], eps=INSTANCE_NORM_EPS) if group_norm
                      else F.batch_norm(image, None, None, scale[rows], shift[rows], training=True,
                                        eps=INSTANCE_NORM_EPS))
    return images[0] if batch == 1 else torch.cat(images)


class _GraphCache:
    """CUDA graphs of `forward`, one per padded input shape, captured once a shape recurs.

    Batches are padded to a power of two (zero style weights: instance norm keeps each image to itself, so
    whatever the padding rows hold never changes the real rows), which keeps the number of shapes small.
    Every graph reads its input from, and writes its output to, the start of two shared buffers, so a graph
    costs no memory of its own beyond the pool they all share: the cache can keep every crop shape a video
    meets (about 300 at bucket 64 on the R50 benchmark's 1080p clip) instead of capturing the same shapes over
    and over. Each replay's output is copied out before the next replay, as the shared buffers require.
    """

    def __init__(self, forward, layout: torch.memory_format) -> None:
        self.forward, self.layout = forward, layout
        self.graphs = GraphCache(self._forward_into, MAX_GRAPHS, GRAPH_AFTER_CALLS)
        self.arena: tuple[Tensor, Tensor] | None = None  # (input, output) flat buffers of MAX_GRAPH_PIXELS images

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        batch = x.shape[0]
        padded = 1 << (batch - 1).bit_length()
        if padded * x.shape[-2] * x.shape[-1] > MAX_GRAPH_PIXELS:
            return self.forward(x, w)
        graph = self.graphs.lookup((padded, *x.shape[1:], x.dtype, x.device), lambda: self._buffers(x, w, padded))
        if graph is None:
            return self.forward(x, w)
        return graph.replay(x, w)[:batch].clone()  # the next replay overwrites the shared output

    def _forward_into(self, x: Tensor, w: Tensor, out: Tensor) -> Tensor:
        return out.copy_(self.forward(x, w))

    def _buffers(self, x: Tensor, w: Tensor, padded: int) -> tuple[Tensor, Tensor, Tensor]:
        """A new graph's input (x's rows, then zeros) and output at the start of the shared buffers, and its own
        style weights (w's rows, then zeros)."""
        if self.arena is None:
            numel = MAX_GRAPH_PIXELS * x.shape[1]
            self.arena = (x.new_empty(numel), torch.empty(numel, device=x.device, dtype=torch.float32))
        shape = (padded, *x.shape[1:])
        inputs, outputs = (_view(buffer, shape, layout) for buffer, layout in zip(
            self.arena, (self.layout, torch.contiguous_format)))
        inputs.zero_()[:x.shape[0]] = x
        weights = w.new_zeros((padded, *w.shape[1:]))
        weights[:w.shape[0]] = w
        return inputs, weights, outputs


def _view(buffer: Tensor, shape: tuple[int, ...], layout: torch.memory_format) -> Tensor:
    """The start of a flat buffer as a tensor of `shape` (N, C, H, W) in `layout`."""
    n, c, h, w = shape
    flat = buffer[: n * c * h * w]
    if layout == torch.channels_last:
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_for(network: MultiStyleNet, device: torch.device, dtype: torch.dtype, channels_last: bool,
               graphs: bool) -> StyleRunner:
    """The network's runner for these settings, rebuilt whenever its parameters changed (training steps and
    `append_style` bump or replace them)."""
    stamp = tuple((id(p), p._version) for p in network.parameters())
    runners = _RUNNERS.setdefault(network, {})
    key = (device, dtype, channels_last, graphs, UPSAMPLE_BY_PHASES)
    entry = runners.get(key)
    if entry is None or entry[0] != stamp:
        entry = runners[key] = (stamp, StyleRunner(network, device, dtype, channels_last, graphs))
    return entry[1]
