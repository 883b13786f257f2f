"""Training images: a folder of photos (or frames sampled from a video), kept in memory, random square crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from stylize.errors import StyleError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


def read_image(path: str | Path) -> Tensor:
    """uint8 3×H×W RGB."""
    path = Path(path)
    if not path.is_file():
        raise StyleError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise StyleError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def resize_shorter(image: Tensor, side: int) -> Tensor:
    """uint8 3×H×W → float 3×h×w in [0,1] with min(h, w) == side."""
    h, w = image.shape[-2:]
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    return F.interpolate(image[None].float() / 255, size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)


def _video_frames(path: Path, max_frames: int) -> list[Tensor]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames or 0
        step = max(1, total // max_frames) if total else 1
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                  for i, f in enumerate(container.decode(stream)) if i % step == 0]
    return frames[:max_frames]


class ContentImages:
    """All content images resized so their shorter side is `size`; `batch(n, generator)` → n random crops."""

    def __init__(self, source: str | Path, size: int, max_video_frames: int = 200):
        source = Path(source)
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images = [read_image(p) for p in files]
        elif source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
            images = _video_frames(source, max_video_frames)
        else:
            raise StyleError(f"content={source}: expected a folder of images or a video file")
        if not images:
            raise StyleError(f"content={source}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.size = size
        self.images = [resize_shorter(im, size) for im in images]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, n: int, generator: torch.Generator) -> Tensor:
        picks = torch.randperm(len(self), generator=generator).tolist()
        picks = (picks * (n // len(picks) + 1))[:n]
        crops = []
        for i in picks:
            image = self.images[i]
            top = int(torch.randint(image.shape[1] - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(image.shape[2] - self.size + 1, (1,), generator=generator))
            crops.append(image[:, top:top + self.size, left:left + self.size])
        return torch.stack(crops)
