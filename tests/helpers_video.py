"""Builds small test videos with PyAV (good and deliberately broken ones) and reads them back as an oracle."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 16000


@dataclass(frozen=True)
class Tone:
    """One audio track for `write_clip`: a sine of `freq` Hz in `codec`, `seconds` long (None: as long as the
    video) from `start` seconds on, tagged with `language` when one is given."""

    codec: str = "aac"
    rate: int = AUDIO_RATE
    layout: str = "mono"
    seconds: float | None = None
    start: float = 0.0
    freq: float = 440.0
    language: str | None = None


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
               time_base: Fraction | None = None, audio: bool | Sequence[Tone] = False, rotation: int = 0,
               container_options: dict | None = None) -> Path:
    """Encodes RGB frames (H, W, 3) into `path`; optional explicit pts (VFR), display rotation and audio tracks
    (`audio=True`: one mono AAC sine, else one track per `Tone`)."""
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
        tracks = _add_tones(out, audio)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts[i] if pts is not None else round(i / fps / time_base)
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        _write_tones(out, tracks, max(len(frames), 1) / fps if pts is None else float((pts[-1] + 1) * time_base))
    return path


def _add_tones(out, audio: bool | Sequence[Tone]) -> list[tuple[Tone, av.audio.stream.AudioStream]]:
    """`audio=True`: one mono AAC sine; else a track per `Tone`."""
    return [(tone, _add_tone(out, tone)) for tone in ([Tone()] if audio is True else list(audio or []))]


def _write_tones(out, tracks: list[tuple[Tone, av.audio.stream.AudioStream]], video_seconds: float) -> None:
    for tone, stream in tracks:
        _write_tone(out, stream, tone, video_seconds if tone.seconds is None else tone.seconds)


def _add_tone(out, tone: Tone):
    stream = out.add_stream(tone.codec, rate=tone.rate)
    stream.layout = tone.layout
    if tone.language:
        stream.metadata["language"] = tone.language
    return stream


def _write_tone(out, stream, tone: Tone, seconds: float) -> None:
    """The same sine on every channel, interleaved (PyAV fills at most 8 planes); the encoder converts it to its
    own sample format and frame size."""
    total = int(seconds * tone.rate)
    t = np.arange(total, dtype=np.float32) / tone.rate
    wave = (0.3 * np.sin(2 * np.pi * tone.freq * t)).astype(np.float32)
    channels = av.AudioLayout(tone.layout).nb_channels
    first = round(tone.start * tone.rate)
    for start in range(0, total, 1024):
        chunk = np.repeat(wave[start:start + 1024], channels)[None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=tone.layout)
        frame.sample_rate = tone.rate
        frame.pts, frame.time_base = first + start, Fraction(1, tone.rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def lossless_clip(path, frames, **kw) -> Path:
    """Bit-exact RGB clip (libx264rgb at qp 0): decoding it must give back `frames` exactly."""
    return write_clip(path, frames, codec="libx264rgb", pix_fmt="rgb24", options={"qp": 0, "preset": "ultrafast"}, **kw)


def ten_bit_clip(path, frames, **kw) -> Path:
    return write_clip(path, frames, pix_fmt="yuv420p10le", **kw)


def hdr_clip(path, frames, transfer: int = 18, codec: str = "libx264") -> Path:
    """A 10-bit BT.2020 clip tagged HDR (`transfer` 18: HLG, 16: PQ), primaries and matrix BT.2020 (9), limited
    range, as cameras and phones write them. The RGB frames are coded as they are (no transfer function is
    applied): only the tags make it HDR."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=24)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p10le"
        context = stream.codec_context
        context.color_primaries, context.color_trc, context.colorspace, context.color_range = 9, transfer, 9, 1
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p10le", dst_colorspace=9, dst_color_range=1)
            frame.color_primaries, frame.color_trc = 9, transfer
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def truncated_clip(path, frames, keep: float = 0.6, **kw) -> Path:
    """A clip cut short as an interrupted copy leaves it. mp4: the index (moved to the front) declares every frame
    but the sample data stops after `keep` of its bytes; mkv / webm: the first `keep` of the file, its header
    (with the stream's duration) intact. `kw` goes to `write_clip`."""
    path = Path(path)
    if path.suffix in (".mkv", ".webm"):
        write_clip(path, frames, **kw)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path
    write_clip(path, frames, container_options={"movflags": "+faststart"}, **kw)
    data = path.read_bytes()
    media = data.find(b"mdat")
    path.write_bytes(data[: media + int((len(data) - media) * keep)])
    return path


def edit_list_clip(path, frames, skip: int, fps: int = 24) -> Path:
    """An mp4 as `ffmpeg -ss T -c copy` cuts one: every sample from the keyframe before T is kept (the container
    counts them all), and an edit list hides the first `skip` frames, which decoders then drop."""
    path = Path(path)
    whole = write_clip(path.with_name(f"{path.stem}_whole.mp4"), frames, fps=fps)
    with av.open(str(whole)) as source, av.open(str(path), mode="w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = round(Fraction(skip, fps) / stream.time_base)
        for packet in source.demux(stream):
            if packet.dts is None:
                continue
            packet.pts, packet.dts = packet.pts - shift, packet.dts - shift  # negative: before the cut
            packet.stream = copy
            out.mux(packet)
    whole.unlink()
    return path


def cover_clip(path, frames, *, attached: bool, audio: bool | Sequence[Tone] = False) -> Path:
    """A still picture as the first video stream, then `frames` as H.264 (none: an audio-only file with cover
    art). `attached`: flagged as an attached picture (cover art); otherwise an ordinary one-frame mjpeg stream."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        still = out.add_stream("mjpeg", rate=1)
        still.width, still.height, still.pix_fmt = 32, 32, "yuvj420p"
        if attached:
            still.disposition = av.stream.Disposition.attached_pic
        video = None
        if frames:
            video = out.add_stream("libx264", rate=24)
            video.height, video.width = frames[0].shape[:2]
            video.pix_fmt = "yuv420p"
        tracks = _add_tones(out, audio)
        picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")
        picture.pts = 0
        out.mux(still.encode(picture) + still.encode(None))
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        if video is not None:
            out.mux(video.encode(None))
        _write_tones(out, tracks, len(frames) / 24)
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
        _write_tone(out, _add_tone(out, Tone()), Tone(), seconds)
    return Path(path)


def not_a_video(path) -> Path:
    Path(path).write_text("this is a text file, not a video\n" * 20)
    return Path(path)


def read_frames(path, stream_index: int | None = None) -> tuple[list[np.ndarray], list[Fraction]]:
    """Plain PyAV decode (no project code): RGB frames and their presentation times in seconds, of the first video
    stream or of the stream `stream_index`."""
    images, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if stream_index is None else container.streams[stream_index]
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


@dataclass(frozen=True)
class AudioTrack:
    """What PyAV decodes of one audio stream: codec (its canonical name: "mp3", not the decoder's "mp3float"),
    channels, rate, language tag, when its sound starts and ends (seconds: decoded frames, so encoder priming that
    the container marks for skipping does not count), and its samples (channels x samples, float)."""

    codec: str
    channels: int
    rate: int
    language: str | None
    start: float
    end: float
    samples: np.ndarray


def audio_tracks(path) -> list[AudioTrack]:
    """Every audio stream of `path`, in order, read and decoded by plain PyAV."""
    with av.open(str(path)) as container:
        indices = [stream.index for stream in container.streams.audio]
    return [_audio_track(path, index) for index in indices]


def _audio_track(path, index: int) -> AudioTrack:
    with av.open(str(path)) as container:  # a container of its own: each track decoded from the file's start
        return _decoded_track(container, container.streams[index])


def _decoded_track(container, stream) -> AudioTrack:
    channels = stream.codec_context.channels
    chunks, start, end = [], None, None
    for frame in container.decode(stream):
        data = frame.to_ndarray().astype(np.float64)
        chunks.append(data if frame.format.is_planar else data.reshape(-1, channels).T)
        time = float(frame.pts * frame.time_base)
        start = time if start is None else start
        end = time + frame.samples / frame.sample_rate
    return AudioTrack(stream.codec_context.codec.canonical_name, channels, stream.sample_rate,
                      stream.metadata.get("language"), start, end, np.concatenate(chunks, axis=1))


def tone_frequency(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency (Hz) of the first channel: which sine a track carries."""
    wave = samples[0] - samples[0].mean()  # unsigned PCM sits around its mid-level, not zero
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(samples.shape[1], 1 / rate)[int(np.argmax(spectrum))])


# The standard's Kr, Kb per AVColorSpace, written out here rather than taken from pipeline.colour: the oracle.
# 4: FCC (47 CFR 73.682, NTSC 1953); 7: SMPTE 240M (1988 HDTV), its own Kr, Kb, not BT.709's.
STANDARD_MATRICES = {1: (0.2126, 0.0722), 2: (0.299, 0.114), 4: (0.30, 0.11), 5: (0.299, 0.114),
                     6: (0.299, 0.114), 7: (0.212, 0.087), 9: (0.2627, 0.0593)}


def exact_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) float64 RGB of a planar YUV frame by the standard's formula, unrounded and unclipped but for the
    0..255 range, each chroma sample covering its block (FFmpeg's ranges: limited 16..235 / 16..240 scaled by
    2^(bits-8), full 0..2^bits-1 around 2^(bits-1))."""
    bits = frame.format.components[0].bits
    y, u, v = (np.frombuffer(p, np.uint8 if bits == 8 else "<u2").reshape(p.height, -1)[:, :p.width].astype(float)
               for p in frame.planes)
    height, width = y.shape
    u, v = (c.repeat(-(-height // c.shape[0]), 0).repeat(-(-width // c.shape[1]), 1)[:height, :width]
            for c in (u, v))
    if frame.color_range == 2 or frame.format.name.startswith("yuvj"):
        top = 2 ** bits - 1
        luma, cb, cr = y / top, (u - 2 ** (bits - 1)) / top, (v - 2 ** (bits - 1)) / top
    else:
        scale = 2 ** (bits - 8)
        luma, cb, cr = (y / scale - 16) / 219, (u / scale - 128) / 224, (v / scale - 128) / 224
    kr, kb = STANDARD_MATRICES[frame.colorspace]
    red, blue = luma + 2 * (1 - kr) * cr, luma + 2 * (1 - kb) * cb
    green = (luma - kr * red - kb * blue) / (1 - kr - kb)
    return np.clip(np.stack([red, green, blue], axis=-1) * 255, 0, 255)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
