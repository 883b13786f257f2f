"""YUV → RGB with torch, on whatever device the planes are on.

On a GPU render the decoder hands over its 8-bit 4:2:0 planes as they are (half the bytes of RGB to copy) and
the conversion runs on the GPU instead of in swscale on the CPU. It follows swscale's unscaled converter, the
oracle in the tests: the frame's colour matrix (BT.601 when unspecified) and range, each chroma sample covering
its 2×2 block of pixels.
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
    else:
        u = chroma[: height // 4].reshape(height // 2, width // 2)
        v = chroma[height // 4:].reshape(height // 2, width // 2)
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
