"""Generate the demo clip: textured objects cut from real photos glide across a slowly panning photo background,
crossing (and overlapping) each other while they turn and breathe a little.

    python scripts/make_demo_clip.py --out .cache/demo/demo_clip.mp4 [--frames 96 --size 256x256 --fps 24
                                     --seed 0 --audio --overwrite]

Scenes come from the synthetic scene API of segment/data/synthetic.py (the demo segmenter's training data), so
the demo model sees the kind of objects it learned. Written with PyAV to a temp file beside --out, then renamed;
an existing --out is replaced only with --overwrite.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.signals import STARTING, leaving, on_stop_signals  # noqa: E402 (light: what follows them is not)

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse  # noqa: E402
import math  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from fractions import Fraction  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.arguments import last_output, reports_user_errors, whole_number  # noqa: E402
from common.outputs import AtomicOutput, check_output  # noqa: E402
from pipeline.encode import VIDEO_SUFFIXES  # noqa: E402
from scripts.script_outputs import checked_output  # noqa: E402
from segment.data import synthetic  # noqa: E402

AUDIO_RATE = 48000


@dataclass
class Path2D:
    """One object's motion: from `start` to `end` (fractions of the frame) with a sideways sine wobble."""

    start: np.ndarray
    end: np.ndarray
    wobble: float
    phase: float
    spin: float          # degrees turned over the whole clip
    base_angle: float
    base_size: float     # fraction of the shorter frame side
    breathe: float       # relative size change amplitude

    def at(self, t: float) -> tuple[np.ndarray, float, float]:
        """(centre as fractions, angle in degrees, size as a fraction) at clip time t in [0, 1]."""
        eased = t * t * (3 - 2 * t)  # smoothstep: objects start and stop gently
        direction = self.end - self.start
        normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-9)
        centre = self.start + eased * direction + normal * self.wobble * math.sin(2 * math.pi * t + self.phase)
        angle = self.base_angle + self.spin * t
        size = self.base_size * (1 + self.breathe * math.sin(2 * math.pi * 1.5 * t + self.phase))
        return centre, angle, size


def object_paths(count: int, rng: np.random.Generator) -> list[Path2D]:
    """Lines through (near) the centre from evenly spread directions, so every pair crosses paths mid-clip."""
    paths = []
    for k in range(count):
        heading = 2 * math.pi * k / count + rng.uniform(-0.3, 0.3)
        offset = rng.uniform(-0.08, 0.08, size=2)
        reach = rng.uniform(0.28, 0.38)
        direction = np.array([math.cos(heading), math.sin(heading)])
        paths.append(Path2D(start=0.5 + offset - reach * direction, end=0.5 + offset + reach * direction,
                            wobble=rng.uniform(0.02, 0.06), phase=rng.uniform(0, 2 * math.pi),
                            spin=rng.uniform(-25, 25), base_angle=rng.uniform(-20, 20),
                            base_size=rng.uniform(0.28, 0.4), breathe=rng.uniform(0.05, 0.12)))
    return paths


def demo_frames(frames: int, width: int, height: int, seed: int = 0) -> Iterator[np.ndarray]:
    """HxWx3 uint8 frames of the animated scene."""
    rng = np.random.default_rng(seed)
    textures = synthetic.load_textures(seed)
    backgrounds = synthetic.load_backgrounds()
    photo = _colour_photo(backgrounds, rng)
    pan = max(8, width // 4)  # pixels the camera drifts over the clip
    wide = synthetic.background_crop(photo, height, width + pan, rng)
    count = int(rng.integers(3, 6))
    paths = object_paths(count, rng)
    labels = _labels(count, rng)
    texture_ids = rng.permutation(len(textures))[:count].tolist()
    side = min(width, height)
    for i in range(frames):
        t = i / max(1, frames - 1)
        shift = round(pan * t)
        background = np.ascontiguousarray(wide[:, shift:shift + width])
        objects = []
        for path, label, texture in zip(paths, labels, texture_ids):
            centre, angle, size = path.at(t)
            objects.append(synthetic.SceneObject(label=label, center=(float(centre[0] * width),
                                                                      float(centre[1] * height)),
                                                 size=float(size * side), angle=float(angle), texture=int(texture)))
        image, _ = synthetic.render_scene(background, objects, textures)
        yield np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _labels(count: int, rng: np.random.Generator) -> list[int]:
    """Class labels (1..K) cycling through every class from a random start, so the demo shows them all."""
    first = int(rng.integers(len(synthetic.CLASS_NAMES)))
    return [(first + k) % len(synthetic.CLASS_NAMES) + 1 for k in range(count)]


def _colour_photo(photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random background photo that is not grey (grey photos make a dull demo)."""
    coloured = [p for p in photos if np.abs(p[..., 0].astype(int) - p[..., 2].astype(int)).mean() > 5] or photos
    return coloured[int(rng.integers(len(coloured)))]


def make_clip(out: str | Path, frames: int = 96, size: tuple[int, int] = (256, 256), fps: int = 24, seed: int = 0,
              audio: bool = False, overwrite: bool = False) -> Path:
    """Writes the demo clip (H.264 yuv420p CRF 18, optional 440 Hz sine track) atomically; returns its path.
    An existing `out` is replaced only with `overwrite`; `size` (width, height) must be even (yuv420p)."""
    width, height = size
    if width % 2 or height % 2:  # padded, the file would hold another size than the one asked for and reported
        raise ValueError(f"yuv420p needs an even width and height, got {width}x{height}")
    target = check_output(out, overwrite=overwrite, suffixes=VIDEO_SUFFIXES, kind="video container")
    with AtomicOutput(target, overwrite=overwrite) as temp, av.open(str(temp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"crf": "18", "preset": "medium"}
        sound = container.add_stream("aac", rate=AUDIO_RATE) if audio else None
        for i, image in enumerate(tqdm(demo_frames(frames, width, height, seed), total=frames, unit="frame",
                                       desc="demo clip")):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if sound is not None:
            _write_tone(container, sound, frames / fps)
    return target


def _write_tone(container, stream, seconds: float) -> None:
    """A soft 440 Hz tone fading in and out: something to hear that proves the audio survives the render."""
    total = int(seconds * AUDIO_RATE)
    t = np.arange(total) / AUDIO_RATE
    envelope = np.minimum(1.0, np.minimum(t, seconds - t) / 0.2)
    wave = (0.2 * envelope * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, total, 1024):
        chunk = np.ascontiguousarray(np.repeat(wave[None, start:start + 1024], 2, axis=0))
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_RATE, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 256x256, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"must be at least 16x16, got {text!r}")
    if width % 2 or height % 2:  # H.264 yuv420p halves each side for its chroma: the encoder stores even sizes only
        raise argparse.ArgumentTypeError(f"must be even on both sides (H.264 yuv420p), got {text!r}")
    return width, height


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "demo" / "demo_clip.mp4")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--frames", type=whole_number(1), default=96)
    parser.add_argument("--size", type=_size, default=(256, 256), help="WxH, even (default 256x256, the model's size)")
    parser.add_argument("--fps", type=whole_number(1), default=24)
    parser.add_argument("--seed", type=whole_number(0), default=0)
    parser.add_argument("--audio", action="store_true", help="add a 440 Hz tone track")
    args = parser.parse_args(argv)
    target = checked_output(args.out, args.overwrite, suffixes=VIDEO_SUFFIXES, kind="video container")
    last_output(target)
    path = make_clip(target, args.frames, args.size, args.fps, args.seed, args.audio, overwrite=args.overwrite)
    print(f"demo clip: {path} ({args.frames} frames, {args.size[0]}x{args.size[1]}, {args.fps} fps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
