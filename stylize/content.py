"""Training images: a folder of photos (or frames sampled from a video), kept in memory, random square crops."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from common.images import MAX_PIXELS, WIDE_GREY_MODES, grey_to_8bit, pil_limit_lifted
from stylize.errors import StyleError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


def read_image(path: str | Path) -> Tensor:
    """uint8 3×H×W RGB, as the image is meant to be seen:

    - turned upright by its EXIF orientation;
    - transparency (RGBA, LA, a palette or grey image with a transparent colour) composited over white, as a
      viewer shows it (the hidden colour under alpha 0 is often black);
    - 16-bit grey (I;16) scaled by 255/65535; 32-bit integer grey (I) the same when its values lie in 0..65535
      (what PIL makes of 16-bit PNGs and TIFFs), else stretched from its own minimum..maximum, since a full
      32-bit range would leave any real picture black; float grey (F) read as 0..1 when its maximum is at most 1
      (the usual convention for float images), else as 0..255 and clipped; NaN is black;
    - over PIL's decompression-bomb limit (up to MAX_PIXELS): shrunk by the least whole factor that fits under it.
    """
    path = Path(path)
    if not path.is_file():
        raise StyleError(f"image not found: {path}")
    try:
        with pil_limit_lifted() as limit, Image.open(path) as image:
            if limit is not None and image.width * image.height > MAX_PIXELS:
                raise StyleError(f"image {path} is {image.width}x{image.height} pixels, more than the {MAX_PIXELS:,} "
                                 "this reads: shrink it first")
            pixels = _rgb(ImageOps.exif_transpose(_fit_under(image, limit)))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise StyleError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()


def _fit_under(image: Image.Image, limit: int | None) -> Image.Image:
    """An image over `limit` pixels shrunk by the least whole factor that fits (a JPEG decodes at that scale)."""
    if limit is None or image.width * image.height <= limit:
        return image
    factor = math.ceil(math.sqrt(image.width * image.height / limit))
    image.draft(image.mode, (math.ceil(image.width / factor), math.ceil(image.height / factor)))
    factor = math.ceil(math.sqrt(image.width * image.height / limit))  # after what draft did
    if factor <= 1:
        return image
    if image.mode in ("P", "PA", "1") or image.mode.startswith("I;16"):  # modes PIL's reduce cannot average
        image = image.convert("L" if image.mode == "1" else "I" if image.mode.startswith("I;16") else
                              "RGBA" if _has_alpha(image) else "RGB")  # I keeps 16-bit values: read the same
    return image.reduce(factor)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _rgb(image: Image.Image) -> np.ndarray:
    """H×W×3 uint8 of an upright image (see read_image for each mode)."""
    if image.mode in WIDE_GREY_MODES:
        image = Image.fromarray(grey_to_8bit(np.asarray(image), image.mode), "L")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def resize_shorter(image: Tensor, side: int) -> Tensor:
    """uint8 3×H×W → float 3×h×w in [0,1] with min(h, w) == side."""
    h, w = image.shape[-2:]
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    return F.interpolate(image[None].float() / 255, size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)


def _video_frames(path: Path, max_frames: int, prepare: Callable[[Tensor], Tensor] = lambda t: t) -> list[Tensor]:
    """Up to `max_frames` frames spread evenly over the video, each through `prepare` as it is decoded: never more
    than `max_frames` are held (every frame of a long clip would not fit in memory), and decoding stops at the
    last one wanted."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise StyleError(f"content={path} is not a readable video ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise StyleError(f"content={path} has no video stream")
        stream = container.streams.video[0]
        start, duration = _span(container, stream)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        # Matroska and WebM declare no frame count (stream.frames is 0): it comes from the duration then
        total = stream.frames or (round(duration * rate) if duration and rate else 0)
        with closing(_decoded(container, stream, path)) as frames:
            if duration and total:
                kept = _at_times(frames, start, duration, min(max_frames, total), prepare)
            else:  # a raw stream declares no length: thinned as it goes
                kept = _thinned(frames, max_frames, prepare)
    if not kept:
        raise StyleError(f"content={path} has no decodable video frames")
    return kept


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def _span(container, stream) -> tuple[float, float | None]:
    """(start, duration) in seconds: the stream's, else the container's (all Matroska and WebM declare)."""
    import av

    if stream.duration and stream.time_base:
        start = stream.start_time * stream.time_base if stream.start_time is not None else 0
        return float(start), float(stream.duration * stream.time_base)
    start = container.start_time / av.time_base if container.start_time is not None else 0.0
    return start, (container.duration / av.time_base if container.duration else None)


def _decoded(container, stream, path: Path) -> Iterator[tuple[float | None, object]]:
    """(seconds or None, frame) in presentation order; a decoder error is one line."""
    import av

    try:
        for frame in container.decode(stream):
            yield frame.time, frame
    except av.error.FFmpegError as exc:
        raise StyleError(f"content={path} is not a readable video ({_reason(exc)})") from None


def _to_tensor(frame) -> Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def _at_times(frames: Iterator, start: float, duration: float, count: int, prepare) -> list[Tensor]:
    """The first frame at or after each of `count` times spaced evenly from `start` over `duration`."""
    step = duration / count
    kept, k = [], 0
    for index, (time, frame) in enumerate(frames):
        time = start + index * step if time is None else time  # no timestamp: counted at the spacing's pace
        if time + 1e-6 < start + k * step:
            continue
        kept.append(prepare(_to_tensor(frame)))
        while k < count and start + k * step <= time + 1e-6:  # a frame that covers several times is kept once
            k += 1
        if k == count:
            break
    return kept


def _thinned(frames: Iterator, max_frames: int, prepare) -> list[Tensor]:
    """Every `step`-th frame, the step doubling (and every other kept frame dropped) whenever `max_frames` fill."""
    kept, step = [], 1
    for index, (_, frame) in enumerate(frames):
        if index % step:
            continue
        if len(kept) == max_frames:
            kept, step = kept[::2], step * 2
            if index % step:
                continue
        kept.append(prepare(_to_tensor(frame)))
    return kept


class ContentImages:
    """All content images resized so their shorter side is `size`; `batch(n, generator)` → n random crops."""

    def __init__(self, source: str | Path, size: int, max_video_frames: int = 200):
        source = Path(source)

        def prepare(image: Tensor) -> Tensor:  # resized as read: full-size photos or frames are never all held
            return resize_shorter(image, size)

        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images = [prepare(read_image(p)) for p in files]
        elif source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
            images = _video_frames(source, max_video_frames, prepare)
        else:
            raise StyleError(f"content={source}: expected a folder of images or a video file")
        if not images:
            raise StyleError(f"content={source}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.size = size
        self.images = images

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
