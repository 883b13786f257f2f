"""Builds small test videos with PyAV (good and deliberately broken ones) and reads them back as an oracle."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 16000


def pattern_frames(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients (red grows to the right, green downwards, so any rotation shows) with a soft blob that
    moves every frame: every frame distinct, and smooth enough that 4:2:0 chroma loses little."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 + 0 * xx], axis=-1) * 180 + 30
    base += rng.uniform(-15, 15, size=3)
    radius = max(3.0, min(width, height) / 6)
    frames = []
    for i in range(n):
        cx = radius + (i * 5) % max(1, int(width - 2 * radius))
        cy = radius + (i * 3) % max(1, int(height - 2 * radius))
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))[..., None]
        img = base * (1 - blob) + np.array([230, 200, 60], np.float32) * blob
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def write_clip(path: str | Path, frames: list[np.ndarray], *, fps: int = 24, codec: str = "libx264",
               pix_fmt: str = "yuv420p", options: dict | None = None, pts: list[int] | None = None,
               time_base: Fraction | None = None, audio: bool = False, rotation: int = 0,
               container_options: dict | None = None) -> Path:
    """Encodes RGB frames (H, W, 3) into `path`; optional explicit pts (VFR), display rotation and a sine track."""
    path = Path(path)
    height, width = frames[0].shape[:2] if frames else (48, 64)
    time_base = time_base or Fraction(1, fps)
    with av.open(str(path), mode="w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        stream.codec_context.options = {k: str(v) for k, v in (options or {}).items()}
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = _add_sine(out) if audio else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts[i] if pts is not None else round(i / fps / time_base)
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio_stream is not None:
            duration = max(len(frames), 1) / fps if pts is None else float((pts[-1] + 1) * time_base)
            _write_sine(out, audio_stream, duration)
    return path


def _add_sine(out):
    stream = out.add_stream("aac", rate=AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _write_sine(out, stream, seconds: float) -> None:
    total = int(seconds * AUDIO_RATE)
    t = np.arange(total, dtype=np.float32) / AUDIO_RATE
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, total, 1024):
        chunk = wave[start:start + 1024][None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def lossless_clip(path, frames, **kw) -> Path:
    """Bit-exact RGB clip (libx264rgb at qp 0): decoding it must give back `frames` exactly."""
    return write_clip(path, frames, codec="libx264rgb", pix_fmt="rgb24", options={"qp": 0, "preset": "ultrafast"}, **kw)


def ten_bit_clip(path, frames, **kw) -> Path:
    return write_clip(path, frames, pix_fmt="yuv420p10le", **kw)


def truncated_clip(path, frames, keep: float = 0.6) -> Path:
    """A clip whose index (moved to the front) declares every frame but whose sample data stops after `keep`
    of its bytes, as a copy cut short leaves it."""
    path = Path(path)
    write_clip(path, frames, container_options={"movflags": "+faststart"})
    data = path.read_bytes()
    media = data.find(b"mdat")
    path.write_bytes(data[: media + int((len(data) - media) * keep)])
    return path


def zero_frame_clip(path) -> Path:
    """A video stream that holds no frames. Use .avi: mp4/mov drop empty tracks and mkv will not open."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return Path(path)


def audio_only_clip(path, seconds: float = 0.5) -> Path:
    with av.open(str(path), mode="w") as out:
        _write_sine(out, _add_sine(out), seconds)
    return Path(path)


def not_a_video(path) -> Path:
    Path(path).write_text("this is a text file, not a video\n" * 20)
    return Path(path)


def read_frames(path) -> tuple[list[np.ndarray], list[Fraction]]:
    """Plain PyAV decode (no project code): RGB frames and their presentation times in seconds."""
    images, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            images.append(frame.to_ndarray(format="rgb24"))
            times.append(Fraction(frame.pts) * stream.time_base)
    return images, times


def audio_summary(path) -> tuple[int, float]:
    """(number of audio packets, audio duration in seconds) of the first audio stream; (0, 0.0) without one."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return 0, 0.0
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        end = max(float((p.pts + (p.duration or 0)) * p.time_base) for p in packets)
        start = min(float(p.pts * p.time_base) for p in packets)
        return len(packets), end - start


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
