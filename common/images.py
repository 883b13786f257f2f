"""Image reading that stylize's content images and segment's COCO dataset share: PIL's decompression-bomb check
lifted up to a pixel limit of our own, and grey levels wider than 8 bits (16-bit, 32-bit, float) made 8-bit."""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

# Images over PIL's decompression-bomb limit are still read (a big scan or panorama is a fair picture: our own
# files, not a stranger's upload), up to this many pixels: ~16k x 16k, under 1 GB decoded as RGB.
MAX_PIXELS = 1 << 28
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # what grey_to_8bit reads
_PIL_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is global: one reader lifts it at a time


@contextmanager
def pil_limit_lifted() -> Iterator[int | None]:
    """PIL's decompression-bomb limit (None: none) while its checks are off: PIL refuses at twice the limit and
    warns above it, when it opens an image and again when some formats (TIFF) decode; the reader checks the size
    against MAX_PIXELS itself."""
    with _PIL_LIMIT:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield limit
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def grey_to_8bit(grey: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a WIDE_GREY_MODES image as uint8: 16-bit grey (I;16) scaled by 255/65535, rounded; 32-bit
    integer grey (I) the same when its values lie in 0..65535 (what PIL makes of 16-bit PNGs and TIFFs), else
    stretched from its own minimum..maximum, since a full 32-bit range would leave any real picture black; float
    grey (F) read as 0..1 when its maximum is at most 1 (the usual convention for float images), else as 0..255 and
    clipped; NaN is black. (convert("RGB") clips each value at 255: 16-bit pictures came out white, float ones
    black.)"""
    if mode == "F":
        values = np.nan_to_num(grey.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1:
            values = values * 255
    else:
        values = grey.astype(np.float32)  # enough for 0..255; half of float64 on a big image
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        if mode.startswith("I;16") or (low >= 0 and high <= 65535):
            values = values / 257
        else:
            values = (values - low) * (255 / max(high - low, 1))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
