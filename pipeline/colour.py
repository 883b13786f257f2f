"""YUV ↔ RGB with torch, on whatever device the pixels are on.

On a GPU render the decoder hands over its 8-bit 4:2:0 planes as they are (half the bytes of RGB to copy) and
the conversion runs on the GPU instead of in swscale on the CPU. It follows swscale's unscaled converter, the
oracle in the tests: the frame's colour matrix (BT.601 when unspecified) and range, each chroma sample covering
its 2×2 block of pixels.

Frames that do not travel to a GPU as planes are converted on the host (`host_yuv_to_rgb`): the same formula in
integer fixed point with numpy, for every planar 8 to 12-bit YUV layout. swscale's fast YUV → RGB truncates
where it should round: FFmpeg 8's yuv420p → rgb24 comes out about a level dark in every channel (R −0.97,
G −1.44, B −0.98 against the exact BT.709 conversion), 10-bit input up to two; and the torch formula, run in
float32 on a CPU, is tens of times slower than the integer one (320-450 ms against 7-25 ms a 1080p frame on 2
shared cores).

The encoder gets the same saving the other way round (`rgb_to_packed_yuv420`): the GPU turns the finished RGB
frame into yuv420p planes and only those cross to the host. It follows what swscale does for rgb24 → yuv420p
(the path it replaces, and the oracle in the tests), so CPU and GPU renders encode the same pixels to within a
level.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# AVColorSpace → (Kr, Kb). Unspecified (2) and unknown values fall back to BT.601, as swscale does.
_MATRICES = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087),
             9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
BT601 = (0.299, 0.114)
PACKED_420 = ("yuv420p", "yuvj420p", "nv12")   # the layouts `packed_planes_to_rgb` reads
FULL_RANGE = 2                                  # AVCOL_RANGE_JPEG


# The colorspaces whose matrix `coefficients` knows (2, unspecified, is BT.601 by swscale's convention); others
# (RGB in YUV planes, YCgCo, ICtCp, ...) stay with swscale.
KNOWN_MATRICES = frozenset(_MATRICES) | {2}
HOST_MAX_BITS = 12      # `host_yuv_to_rgb`'s fixed point keeps int32 sums up to 12-bit codes
_HOST_CHUNK_PIXELS = 1 << 17  # the rows converted at a time: their work stays in the CPU's cache
_SUM_BITS = 5           # fraction bits of `host_yuv_to_rgb`'s int16 sums: up to ±1000 levels fit


def coefficients(colorspace: int | None) -> tuple[float, float]:
    return _MATRICES.get(int(colorspace or 2), BT601)


@lru_cache(maxsize=64)
def _host_factors(bits: int, colorspace: int | None, full_range: bool) -> tuple[int, int, int, tuple[int, ...]]:
    """Fixed-point factors of `host_yuv_to_rgb`: (fraction bits, luma code zero, chroma code zero, integer factors
    per code: Y, V→R, U→G, V→G, U→B). A fraction of bits + 8 bits keeps each factor's rounding under 1/256 of a
    level over the whole code range."""
    kr, kb = coefficients(colorspace)
    kg = 1.0 - kr - kb
    fraction = bits + 8
    if full_range:
        luma_zero, luma_step = 0, 255 / (2 ** bits - 1)
        chroma_step = luma_step
    else:
        luma_zero, luma_step = 16 << (bits - 8), 255 / 219 / 2 ** (bits - 8)
        chroma_step = 255 / 224 / 2 ** (bits - 8)
    chroma_zero = 1 << (bits - 1)
    factors = (luma_step, 2 * (1 - kr) * chroma_step, -2 * (1 - kb) * kb / kg * chroma_step,
               -2 * (1 - kr) * kr / kg * chroma_step, 2 * (1 - kb) * chroma_step)
    return fraction, luma_zero, chroma_zero, tuple(round(f * (1 << fraction)) for f in factors)


def host_yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, bits: int, colorspace: int | None,
                    full_range: bool) -> np.ndarray:
    """Planes of `bits`-bit codes (8 to `HOST_MAX_BITS`; views with any strides), Y (H, W) and U, V subsampled by
    whole factors (4:2:0, 4:2:2, 4:4:4, 4:4:0, 4:1:1; at odd sizes the last chroma sample covers what is left)
    → (3, H, W) uint8 RGB: the exact conversion rounded to the nearest level (a value within 1/32 of a level of
    a half may round the other way). Each chroma sample covers its block of pixels, as in `yuv_to_rgb` and
    swscale's unscaled converter."""
    if not 8 <= bits <= HOST_MAX_BITS:
        raise ValueError(f"bits must be 8 to {HOST_MAX_BITS}, got {bits}")
    height, width = y.shape
    rows, columns = u.shape
    step_y, step_x = -(-height // rows), -(-width // columns)
    if u.shape != v.shape or -(-height // step_y) != rows or -(-width // step_x) != columns:
        raise ValueError(f"chroma planes {u.shape}, {v.shape} do not subsample luma {y.shape} by whole factors")
    fraction, luma_zero, chroma_zero, (luma, red_v, green_u, green_v, blue_u) = _host_factors(
        bits, colorspace, full_range)
    drop = fraction - _SUM_BITS
    half = 1 << (drop - 1)
    # The sums run in int16 (half the memory traffic of int32, and twice the SIMD lanes), with _SUM_BITS
    # fraction bits; each term is worked out exactly in int32 first and rounded to that once. A chroma term is
    # widened to the luma's columns here, its rows by broadcasting below.
    terms = []
    for factor_u, factor_v in ((0, red_v), (green_u, green_v), (blue_u, 0)):
        term = None
        for plane, factor in ((u, factor_u), (v, factor_v)):
            if factor:
                product = np.multiply(plane, factor, dtype=np.int32)
                term = product if term is None else np.add(term, product, out=term)
        term += half - chroma_zero * (factor_u + factor_v)
        term >>= drop
        wide = np.empty((rows, columns, step_x), np.int16)
        for k in range(step_x):
            wide[:, :, k] = term
        terms.append(wide.reshape(rows, columns * step_x)[:, :width])
    # The luma term carries the half level that makes the final floor round. It is cut to the sums' fraction by a
    # floor, not rounded like the chroma terms: the final floor then splits exactly at each half level, where a
    # rounded luma would tip the sums that land on a half (one in 32) upwards, +0.016 levels on average.
    constant = (1 << (fraction - 1)) - luma_zero * luma
    rgb = np.empty((3, height, width), np.uint8)
    chunk = max(1, _HOST_CHUNK_PIXELS // (width * step_y))  # chroma rows at a time
    exact = np.empty((chunk * step_y, width), np.int32)
    base = np.empty((chunk * step_y, width), np.int16)
    work = np.empty_like(base)
    for first in range(0, rows, chunk):
        last = min(rows, first + chunk)
        top, bottom = first * step_y, min(height, last * step_y)
        lines = bottom - top
        np.multiply(y[top:bottom], luma, out=exact[:lines], dtype=np.int32, casting="unsafe")
        exact[:lines] += constant
        np.right_shift(exact[:lines], drop, out=exact[:lines])
        base[:lines] = exact[:lines]
        for channel, term in enumerate(terms):
            out = work[:lines]
            if lines == (last - first) * step_y:
                shape = (last - first, step_y, width)
                np.add(base[:lines].reshape(shape), term[first:last, None], out=out.reshape(shape))
            else:  # the last row of an odd height: fewer luma rows than its chroma row covers
                np.add(base[:lines], np.repeat(term[first:last], step_y, axis=0)[:lines], out=out)
            np.clip(out, 0, (256 << _SUM_BITS) - 1, out=out)
            np.right_shift(out, _SUM_BITS, out=rgb[channel, top:bottom], casting="unsafe")
    return rgb


def packed_planes_to_rgb(packed: Tensor, layout: str, colorspace: int | None, full_range: bool) -> Tensor:
    """(H*3/2, W) uint8 planes as `VideoFrame.to_ndarray()` gives them for yuv420p (Y, U, V) or nv12 (Y, UV
    interleaved) → (3, H, W) uint8 RGB on the same device. H and W must be even."""
    if layout not in PACKED_420:
        raise ValueError(f"layout must be one of {', '.join(PACKED_420)}, got {layout!r}")
    height, width = packed.shape[0] * 2 // 3, packed.shape[1]
    if height % 2 or width % 2 or packed.shape[0] != height * 3 // 2:
        raise ValueError(f"packed 4:2:0 planes need an even frame size, got {tuple(packed.shape)}")
    y = packed[:height]
    chroma = packed[height:]
    if layout == "nv12":
        uv = chroma.reshape(height // 2, width // 2, 2)
        u, v = uv[..., 0], uv[..., 1]
    else:  # U then V, each H/2 × W/2 values: a whole number of W-wide rows only when H is a multiple of 4
        u, v = chroma.reshape(2, height // 2, width // 2)
    return yuv_to_rgb(y, u, v, colorspace, full_range or layout == "yuvj420p")


def yuv_to_rgb(y: Tensor, u: Tensor, v: Tensor, colorspace: int | None, full_range: bool) -> Tensor:
    """8-bit planes, Y (H, W) and U, V (H/2, W/2) → (3, H, W) uint8 RGB."""
    kr, kb = coefficients(colorspace)
    kg = 1.0 - kr - kb
    dtype = torch.float32
    if full_range:
        luma = y.to(dtype) / 255.0
        cb, cr = (u.to(dtype) - 128.0) / 255.0, (v.to(dtype) - 128.0) / 255.0
    else:
        luma = (y.to(dtype) - 16.0) / 219.0
        cb, cr = (u.to(dtype) - 128.0) / 224.0, (v.to(dtype) - 128.0) / 224.0
    cb = cb.repeat_interleave(2, 0).repeat_interleave(2, 1)
    cr = cr.repeat_interleave(2, 0).repeat_interleave(2, 1)
    red = luma + 2.0 * (1.0 - kr) * cr
    blue = luma + 2.0 * (1.0 - kb) * cb
    green = (luma - kr * red - kb * blue) / kg
    rgb = torch.stack([red, green, blue])
    return (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def rgb_to_packed_yuv420(rgb: Tensor, colorspace: int = 1, full_range: bool = False) -> Tensor:
    """(3, H, W) uint8 RGB, H and W even → (H*3/2, W) uint8 yuv420p planes (Y, U, V back to back, the layout
    `VideoFrame.from_ndarray(x, format="yuv420p")` takes), on the same device.

    Chroma is filtered as swscale's default (bilinear) rgb24 → yuv420p filters it: the mean of each horizontal
    pixel pair, then a [1, 3, 3, 1] / 8 filter down the rows centred on the 2×2 block (edge rows repeated). A plain
    2×2 mean would differ from swscale by up to ~25 levels on noise; this lands within one level of it (on frames
    at least 8 rows high: swscale shortens its filter on tinier ones).
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) RGB tensor, got {tuple(rgb.shape)}")
    height, width = rgb.shape[1:]
    if height % 2 or width % 2:
        raise ValueError(f"4:2:0 planes need an even frame size, got {width}x{height}")
    kr, kb = coefficients(colorspace)
    kg = 1.0 - kr - kb
    luma_scale, luma_offset, chroma_scale = (1.0, 0.0, 1.0) if full_range else (219 / 255, 16.0, 224 / 255)
    x = rgb.to(torch.float32)
    y = (kr * x[0] + kg * x[1] + kb * x[2]) * luma_scale + luma_offset

    # The matrix is linear, so filtering RGB before it equals filtering U and V after it, at a quarter of the work.
    pairs = x.reshape(3, height, width // 2, 2).sum(-1)
    rows = torch.cat([pairs[:, :1], pairs, pairs[:, -1:]], dim=1)         # row k here is image row k - 1
    block = (rows[:, 0:height:2] + rows[:, 3:height + 2:2]
             + 3.0 * (rows[:, 1:height + 1:2] + rows[:, 2:height + 2:2])) / 16.0
    block_luma = kr * block[0] + kg * block[1] + kb * block[2]
    u = (block[2] - block_luma) * (chroma_scale / (2.0 * (1.0 - kb))) + 128.0
    v = (block[0] - block_luma) * (chroma_scale / (2.0 * (1.0 - kr))) + 128.0
    planes = torch.cat([y.flatten(), u.flatten(), v.flatten()])
    # round half up, as swscale's fixed point does
    return planes.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).view(height * 3 // 2, width)
