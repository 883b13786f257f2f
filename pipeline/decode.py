"""Streaming video decode with PyAV: upright RGB uint8 frames, batched as FrameRecords on the working device.

Frames keep their own presentation timestamps (variable frame rate survives), rotation side data is applied
so frames come out upright, and any pixel format (10-bit, 4:2:2, odd sizes) is converted to rgb24 by swscale.
With `colour=device` (the default on a GPU) 8-bit 4:2:0 frames travel to the device as their YUV planes and
become RGB there (pipeline/colour.py); `decoder=nvdec` decodes on the GPU's NVDEC unit (FFmpeg's *_cuvid
decoders, which hand back NV12 frames). Only one batch at a time lives in memory; the caller decides how far
decode runs ahead.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import torch

from common.settings import check_settings
from gpu.transfer import to_device
from pipeline.errors import (
    AudioOnlyError, EmptyVideoError, InputError, NotAVideoError, PipelineConfigError, TruncatedVideoError,
    ffmpeg_reason,
)
from pipeline.colour import FULL_RANGE, PACKED_420, packed_planes_to_rgb
from pipeline.record import FrameRecord
from pipeline.thread_stream import ThreadStream

DECODERS = ("software", "nvdec")
COLOUR = ("auto", "cpu", "device")


@dataclass(frozen=True)
class VideoInfo:
    """What the encoder and the progress bar need to know about the input video stream."""

    path: Path
    width: int                      # after rotation, i.e. as displayed
    height: int
    time_base: Fraction
    average_rate: Fraction | None   # frames per second (nominal; VFR streams keep per-frame pts anyway)
    frame_count: int                # the container's count when it has one, else estimated from duration
    declared_frames: int            # the container's own count (0 = none given)
    duration: float | None          # seconds
    codec: str
    pix_fmt: str
    rotation: int                   # degrees counter-clockwise applied to decoded frames (0/90/180/270)
    has_audio: bool

    def describe(self) -> str:
        rate = f"{float(self.average_rate):.3g} fps" if self.average_rate else "unknown fps"
        turn = f", rotated {self.rotation}°" if self.rotation else ""
        return f"{self.width}x{self.height} {self.codec}/{self.pix_fmt}, {rate}, ~{self.frame_count} frames{turn}"


def probe(path: str | Path) -> VideoInfo:
    """Opens `path`, checks it holds a decodable video stream and reads its properties (decodes one frame)."""
    path = Path(path)
    container = open_input(path)
    try:
        stream = container.streams.video[0]
        first = next(_decode_frames(container, stream, path), None)
        if first is None:
            raise EmptyVideoError(f"{path}: the video stream has zero frames")
        rotation = _rotation_of(first, stream)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        rate = stream.average_rate or stream.guessed_rate
        duration = _duration_seconds(container, stream)
        declared = int(stream.frames or 0)
        estimate = declared or (round(duration * rate) if duration and rate else 0)
        return VideoInfo(
            path=path, width=width, height=height, time_base=stream.time_base or Fraction(1, 90000),
            average_rate=Fraction(rate) if rate else None, frame_count=int(estimate), declared_frames=declared,
            duration=duration, codec=stream.codec_context.name, pix_fmt=first.format.name,
            rotation=rotation, has_audio=bool(container.streams.audio),
        )
    finally:
        container.close()


def open_input(path: Path) -> av.container.InputContainer:
    """av.open with the failure modes turned into one-line errors; the result has at least one video stream."""
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        raise InputError(f"input is a folder, not a video file: {path}")
    try:
        container = av.open(str(path), mode="r")
    except PermissionError as e:
        raise InputError(f"cannot read input {path}: permission denied") from e
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise NotAVideoError(f"{path} is not a readable video file ({ffmpeg_reason(e)})") from e
    if not container.streams.video:
        has_audio = bool(container.streams.audio)
        container.close()
        if has_audio:
            raise AudioOnlyError(f"{path} holds only audio, no video stream")
        raise NotAVideoError(f"{path} holds no video stream")
    return container


class VideoReader:
    """Iterates over the video of `path` in batches of `batch_size` FrameRecords with images on `device`.

    Raises TruncatedVideoError at the end when the stream broke off, so a render never ends silently short.
    """

    def __init__(self, path: str | Path, batch_size: int = 4, device: torch.device | str = "cpu",
                 decoder: str = "software", colour: str = "auto"):
        if batch_size < 1:
            raise PipelineConfigError(f"batch_size must be >= 1, got {batch_size}")
        if decoder not in DECODERS:
            raise PipelineConfigError(f"decode.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if colour not in COLOUR:
            raise PipelineConfigError(f"decode.colour must be one of {', '.join(COLOUR)}, got {colour!r}")
        self.info = probe(path)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.decoder_name = _hardware_decoder(self.info) if decoder == "nvdec" else None
        if self.decoder_name:  # fail before any output exists, not in the decode thread
            with open_input(self.info.path) as container:
                _open_decoder(container.streams.video[0], self.decoder_name, self.info.path)  # freed when dropped
        self.colour_on_device = colour == "device" or (colour == "auto" and self.device.type == "cuda")
        self.frames_read = 0
        self._stream = ThreadStream(self.device)  # uploads and colour conversion overlap the model stages' work

    @classmethod
    def from_config(cls, path: str | Path, cfg, batch_size: int, device: torch.device) -> VideoReader:
        check_settings(cfg, ("decoder", "colour"), "decode")
        return cls(path, batch_size=batch_size, device=device, decoder=str(cfg.get("decoder", "software")),
                   colour=str(cfg.get("colour", "auto")))

    def __iter__(self) -> Iterator[list[FrameRecord]]:
        info = self.info
        container = open_input(info.path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads inside libavcodec
            batch: list[FrameRecord] = []
            fallback_step = _pts_step(info)
            last_pts: int | None = None
            started = time.perf_counter()
            for index, frame in enumerate(_decode_frames(container, stream, info.path, self.decoder_name)):
                pts = frame.pts
                if pts is None:  # raw streams carry no timestamps: space frames by the nominal rate
                    pts = 0 if last_pts is None else last_pts + fallback_step
                last_pts = pts
                batch.append(FrameRecord(index=index, pts=pts, time_base=info.time_base, image=self._to_tensor(frame)))
                self.frames_read = index + 1
                if len(batch) == self.batch_size:
                    self._stream.synchronize()  # a batch leaves the decode thread with its frames on the device
                    _share_time(batch, "decode", time.perf_counter() - started)
                    yield batch
                    batch = []
                    started = time.perf_counter()
            if batch:
                self._stream.synchronize()
                _share_time(batch, "decode", time.perf_counter() - started)
                yield batch
        finally:
            container.close()
        self._check_complete()

    def _to_tensor(self, frame: av.VideoFrame) -> torch.Tensor:
        with self._stream.active():
            return self._upright_rgb(frame)

    def _upright_rgb(self, frame: av.VideoFrame) -> torch.Tensor:
        layout = frame.format.name
        if self.colour_on_device and layout in PACKED_420 and frame.width % 2 == 0 and frame.height % 2 == 0:
            planes = to_device(torch.from_numpy(frame.to_ndarray()), self.device)
            rgb = packed_planes_to_rgb(planes, layout, frame.colorspace, frame.color_range == FULL_RANGE)
        else:
            rgb = to_device(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1), self.device)
        if self.info.rotation:
            rgb = torch.rot90(rgb, self.info.rotation // 90, dims=(1, 2))  # counter-clockwise, like the matrix
        return rgb.contiguous()

    def _check_complete(self) -> None:
        declared, got = self.info.declared_frames, self.frames_read
        if got == 0:
            raise EmptyVideoError(f"{self.info.path}: the video stream has zero frames")
        # Containers with an index (mp4, mov) state an exact count; allow a frame of slack for edit lists.
        if declared and got < declared - max(1, declared // 100):
            raise TruncatedVideoError(
                f"{self.info.path} is truncated: decoded {got} of the {declared} frames its container declares")


def _hardware_decoder(info: VideoInfo) -> str:
    name = f"{info.codec}_cuvid"
    if name not in av.codecs_available:
        raise PipelineConfigError(f"decode.decoder=nvdec: FFmpeg has no NVDEC decoder for {info.codec} "
                                  f"({name}); use decode.decoder=software")
    return name


def _open_decoder(stream, name: str, path: Path) -> av.CodecContext:
    """A decoder `name` set up from the stream's own parameters (what libavformat would have given it)."""
    context = av.CodecContext.create(name, "r")
    source = stream.codec_context
    context.extradata = source.extradata
    context.width, context.height = source.width, source.height
    try:
        context.open()
    except av.FFmpegError as e:
        hint = " - NVDEC needs an NVIDIA GPU and driver" if name.endswith("_cuvid") else ""
        raise PipelineConfigError(f"decoder {name} cannot start for {path.name} ({ffmpeg_reason(e)}){hint}") from e
    return context


def _decode_frames(container, stream, path: Path, decoder_name: str | None = None) -> Iterator[av.VideoFrame]:
    """Decoded frames of `stream` (by the decoder `decoder_name` instead of the stream's own, when given); a
    decoder failure mid-stream becomes TruncatedVideoError."""
    decoded = 0
    context = None if decoder_name is None else _open_decoder(stream, decoder_name, path)
    try:
        for packet in container.demux(stream):
            if context is None:
                frames = packet.decode()
            else:  # the flush packet (no data) at the end drains the decoder
                frames = context.decode(None if packet.size == 0 else packet)
            for frame in frames:
                decoded += 1
                yield frame
    except av.FFmpegError as e:
        if decoded == 0:
            raise NotAVideoError(f"{path}: the video stream cannot be decoded ({ffmpeg_reason(e)})") from e
        raise TruncatedVideoError(f"{path} is truncated or corrupt after frame {decoded} ({ffmpeg_reason(e)})") from e


def _rotation_of(frame: av.VideoFrame, stream) -> int:
    """Counter-clockwise degrees (0/90/180/270) that make the frame upright."""
    degrees = frame.rotation  # display-matrix side data, already counter-clockwise
    if not degrees:
        try:
            degrees = -float(stream.metadata.get("rotate", 0))  # legacy tag: clockwise degrees
        except ValueError:
            degrees = 0
    return int(round(degrees / 90.0)) % 4 * 90


def _duration_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _pts_step(info: VideoInfo) -> int:
    rate = info.average_rate or Fraction(25)
    return max(1, round(1 / (rate * info.time_base)))


def _share_time(batch: list[FrameRecord], stage: str, seconds: float) -> None:
    for record in batch:
        record.timings[stage] = record.timings.get(stage, 0.0) + seconds / len(batch)

