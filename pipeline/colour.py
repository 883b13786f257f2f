"""YUV ↔ RGB with torch, on whatever device the pixels are on.

On a GPU render the decoder hands over its 8-bit 4:2:0 planes as they are (half the bytes of RGB to copy) and
the conversion runs on the GPU instead of in swscale on the CPU. It follows swscale's unscaled converter, the
oracle in the tests: the frame's colour matrix (BT.601 when unspecified) and range, each chroma sample covering
its 2×2 block of pixels.

The encoder gets the same saving the other way round (`rgb_to_packed_yuv420`): the GPU turns the finished RGB
frame into yuv420p planes and only those cross to the host. It follows what swscale does for rgb24 → yuv420p
(the path it replaces, and the oracle in the tests), so CPU and GPU renders encode the same pixels to within a
level.
"""
from __future__ import annotations

import torch
from torch import Tensor

# AVColorSpace → (Kr, Kb). Unspecified (2) and unknown values fall back to BT.601, as swscale does.
_MATRICES = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087),
             9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
BT601 = (0.299, 0.114)
PACKED_420 = ("yuv420p", "yuvj420p", "nv12")   # the layouts `packed_planes_to_rgb` reads
FULL_RANGE = 2                                  # AVCOL_RANGE_JPEG


def coefficients(colorspace: int | None) -> tuple[float, float]:
    return _MATRICES.get(int(colorspace or 2), BT601)


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
