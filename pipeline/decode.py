"""Streaming video decode with PyAV: upright RGB uint8 frames, batched as FrameRecords on the working device.

The video is FFmpeg's choice of video stream, never a cover picture (`video_stream`). Frames keep their own
presentation timestamps (variable frame rate survives), rotation side data is applied so frames come out upright,
and any pixel format (10-bit, 4:2:2, odd sizes) becomes 8-bit RGB: planar YUV of 8 to 12 bits and NV12 by
`pipeline.colour.host_yuv_to_rgb` (the exact conversion, rounded: swscale's fast path truncates, a level dark),
every other format (RGB, grey, alpha, big-endian, 16-bit) by swscale.
With `colour=device` (the default on a GPU) 8-bit 4:2:0 frames travel to the device as their YUV planes and
become RGB there (pipeline/colour.py); `decoder=nvdec` decodes on the GPU's NVDEC unit (FFmpeg's *_cuvid
decoders, which hand back NV12 frames). The input's colour tags (primaries, transfer, matrix) are kept in
`VideoInfo` for the encoder: RGB values pass through unchanged, so an HDR input's stay HDR-coded. Only one batch
at a time lives in memory; the caller decides how far decode runs ahead.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from common.settings import check_settings
from gpu.transfer import to_device
from pipeline.errors import (
    AudioOnlyError, EmptyVideoError, InputError, NotAVideoError, PipelineConfigError, TruncatedVideoError,
    ffmpeg_reason,
)
from pipeline.colour import FULL_RANGE, HOST_MAX_BITS, KNOWN_MATRICES, PACKED_420, host_yuv_to_rgb, packed_planes_to_rgb
from pipeline.record import FrameRecord
from pipeline.thread_stream import ThreadStream

DECODERS = ("software", "nvdec")
COLOUR = ("auto", "cpu", "device")
# A stream may end this much before the end its container declares without counting as truncated: timestamp
# rounding (Matroska keeps milliseconds) and a few dropped frames at the very end (AVI's empty chunks).
TRUNCATION_SLACK_S = 0.25
TRUNCATION_SLACK_FRAMES = 3
# Formats whose durations are no declaration: raw streams (a guess from the bitrate at best) and MPEG-TS / PS
# (read from the last timestamps in the file: they end where the data does).
_NO_DECLARED_END = av.format.Flags.no_timestamps.value | av.format.Flags.ts_discont.value
# The layouts `host_yuv_to_rgb` converts: planar Y'CbCr (yuvj: full range) of 8 to HOST_MAX_BITS bits, and the
# semi-planar NV12 / NV21 (the chroma plane's U and V interleaved, in that order / the other way round).
_PLANAR_YUV = frozenset(f"yuv{sub}p{depth}" for sub in ("420", "422", "444", "440", "411", "410")
                        for depth in ("", "9le", "10le", "12le")) | {f"yuvj{s}p" for s in ("420", "422", "444", "440")}
_SEMI_PLANAR = {"nv12": (0, 1), "nv21": (1, 0)}
UNSPECIFIED = 2         # AVCOL_PRI / AVCOL_TRC / AVCOL_SPC_UNSPECIFIED
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}  # AVCOL_TRC_SMPTE2084, AVCOL_TRC_ARIB_STD_B67


@dataclass(frozen=True)
class VideoInfo:
    """What the encoder and the progress bar need to know about the input video stream."""

    path: Path
    width: int                      # after rotation, i.e. as displayed
    height: int
    time_base: Fraction
    average_rate: Fraction | None   # frames per second (nominal; VFR streams keep per-frame pts anyway)
    frame_count: int                # the container's count when it has one, else estimated from duration
    declared_frames: int            # the container's own count (0 = none given; an edit list may show fewer)
    duration: float | None          # seconds
    codec: str
    pix_fmt: str
    rotation: int                   # degrees counter-clockwise applied to decoded frames (0/90/180/270)
    has_audio: bool
    stream_index: int = 0           # the video stream's index in the container (`video_stream`)
    declared_end: float | None = None  # seconds: where the container says the stream ends (None: it does not say)
    # The input's colour tags (FFmpeg's AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace; 2 =
    # unspecified) and bits per sample: decoded RGB keeps the input's primaries and transfer, which the output
    # must then name too.
    color_primaries: int = UNSPECIFIED
    color_trc: int = UNSPECIFIED
    colorspace: int = UNSPECIFIED
    bit_depth: int = 8

    @property
    def hdr(self) -> str | None:
        """The HDR transfer ("PQ", "HLG") the input is coded with, None for SDR."""
        return HDR_TRANSFERS.get(self.color_trc)

    def describe(self) -> str:
        rate = f"{float(self.average_rate):.3g} fps" if self.average_rate else "unknown fps"
        # without the container's count, duration x nominal rate: a variable rate makes that a guess (Matroska
        # states no average rate, only its nominal one)
        frames = f"{self.frame_count} frames" if self.declared_frames else f"about {self.frame_count} frames"
        turn = f", rotated {self.rotation}°" if self.rotation else ""
        hdr = f", HDR ({self.hdr})" if self.hdr else ""
        return f"{self.width}x{self.height} {self.codec}/{self.pix_fmt}{hdr}, {rate}, {frames}{turn}"


def probe(path: str | Path) -> VideoInfo:
    """Opens `path`, checks it holds a decodable video stream and reads its properties (decodes one frame)."""
    path = Path(path)
    container = open_input(path)
    try:
        stream = video_stream(container)
        first = next(_decode_frames(container, stream, path), None)
        if first is None:
            raise EmptyVideoError(f"{path}: the video stream has zero frames")
        rotation = _rotation_of(first, stream)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        rate = stream.average_rate or stream.guessed_rate
        duration = _duration_seconds(container, stream)
        declared = int(stream.frames or 0)
        estimate = declared or (round(duration * rate) if duration and rate else 0)
        context = stream.codec_context
        return VideoInfo(
            path=path, width=width, height=height, time_base=stream.time_base or Fraction(1, 90000),
            average_rate=Fraction(rate) if rate else None, frame_count=int(estimate), declared_frames=declared,
            duration=duration, codec=context.name, pix_fmt=first.format.name,
            rotation=rotation, has_audio=bool(container.streams.audio), stream_index=stream.index,
            declared_end=_declared_end(container, stream),
            # the decoded frame's tags (the bitstream's), else the container's (an mp4 colr box, Matroska's Colour)
            color_primaries=_tag(first.color_primaries, context.color_primaries),
            color_trc=_tag(first.color_trc, context.color_trc), colorspace=_tag(first.colorspace, context.colorspace),
            bit_depth=max((c.bits for c in first.format.components), default=8),
        )
    finally:
        container.close()


def open_input(path: Path) -> av.container.InputContainer:
    """av.open with the failure modes turned into one-line errors; the result holds a video (`video_stream`)."""
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
    if video_stream(container) is None:
        has_audio = bool(container.streams.audio)
        cover = " and a cover picture" if container.streams.video else ""
        container.close()
        if has_audio:
            raise AudioOnlyError(f"{path} holds only audio{cover}, no video stream")
        raise NotAVideoError(f"{path} holds no video stream" + (" (only a cover picture)" if cover else ""))
    return container


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The input's video: FFmpeg's best video stream (its own pick, av_find_best_stream) that is not an attached
    picture (cover art); None when the container holds only such pictures. Every reader of the input (probe,
    decode, the NVDEC check) takes this one, so they all see the same frames."""
    moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not moving:
        return None
    best = container.streams.best("video")
    return next((s for s in moving if best is not None and s.index == best.index), moving[0])


class VideoReader:
    """Iterates over the video of `path` in batches of `batch_size` FrameRecords with images on `device`.

    Raises TruncatedVideoError at the end when the stream broke off (a decoder error, or its last frame ends well
    before the end its container declares), so a render never ends silently short.
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
            with open_input(self.info.path) as container:  # the decoder is freed when dropped
                _open_decoder(container.streams[self.info.stream_index], self.decoder_name, self.info.path)
        self.colour_on_device = colour == "device" or (colour == "auto" and self.device.type == "cuda")
        self.frames_read = 0
        self._end_pts: int | None = None  # the latest end (pts + duration) of a decoded frame with a timestamp
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
            stream = container.streams[info.stream_index]
            stream.thread_type = "AUTO"  # frame + slice threads inside libavcodec
            batch: list[FrameRecord] = []
            fallback_step = _pts_step(info)
            last_pts: int | None = None
            started = time.perf_counter()
            gpu = _decoder_gpu(self.device) if self.decoder_name else None
            for index, frame in enumerate(_decode_frames(container, stream, info.path, self.decoder_name, gpu)):
                pts = frame.pts
                if pts is None:  # raw streams carry no timestamps: space frames by the nominal rate
                    pts = 0 if last_pts is None else last_pts + fallback_step
                else:  # the latest end, not the last frame's: with B-frames those differ
                    end = pts + (frame.duration or fallback_step)
                    self._end_pts = end if self._end_pts is None else max(self._end_pts, end)
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
            rgb = to_device(host_rgb(frame), self.device)
        if self.info.rotation:
            rgb = torch.rot90(rgb, self.info.rotation // 90, dims=(1, 2))  # counter-clockwise, like the matrix
        return rgb.contiguous()

    def _check_complete(self) -> None:
        """Judged by time, not by the container's frame count: an edit list (a cut made without re-encoding) shows
        fewer frames than the container stores, and an AVI counts its dropped frames. The declared end holds in
        both cases: an edit list shortens the duration with the frames, dropped frames keep the later ones' pts."""
        info, got = self.info, self.frames_read
        if got == 0:
            raise EmptyVideoError(f"{info.path}: the video stream has zero frames")
        if info.declared_end is None or self._end_pts is None:
            return
        stopped = float(self._end_pts * info.time_base)
        slack = max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAMES * float(_pts_step(info) * info.time_base))
        if stopped < info.declared_end - slack:
            raise TruncatedVideoError(
                f"{info.path} is truncated: its video stops at {stopped:.2f} s of the {info.declared_end:.2f} s its "
                f"container declares ({got} frames decoded)")


def host_rgb(frame: av.VideoFrame) -> torch.Tensor:
    """`frame` as a (3, H, W) uint8 RGB tensor on the host: YUV the exact conversion rounded (`host_yuv_to_rgb`),
    what that does not read through swscale."""
    planes = yuv_planes(frame)
    if planes is not None:
        y, u, v, bits = planes
        full = frame.color_range == FULL_RANGE or frame.format.name.startswith("yuvj")
        return torch.from_numpy(host_yuv_to_rgb(y, u, v, bits, frame.colorspace, full))
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()


def yuv_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Y, U and V of `frame` as numpy views of its planes (no copy), and their bits per sample; None for a layout
    or matrix that `host_yuv_to_rgb` does not handle (RGB in YUV planes, YCgCo, ...)."""
    name = frame.format.name
    if name not in _PLANAR_YUV and name not in _SEMI_PLANAR or frame.colorspace not in KNOWN_MATRICES:
        return None
    bits = frame.format.components[0].bits
    if bits > HOST_MAX_BITS:
        return None
    dtype = np.dtype(np.uint8) if bits == 8 else np.dtype("<u2")
    arrays = [np.frombuffer(plane, dtype).reshape(plane.height, -1) for plane in frame.planes]
    if name in _SEMI_PLANAR:
        luma, chroma = arrays
        first, second = _SEMI_PLANAR[name]
        width = frame.planes[1].width
        return luma[:, :frame.width], chroma[:, first:2 * width:2], chroma[:, second:2 * width:2], bits
    y, u, v = (array[:, :plane.width] for array, plane in zip(arrays, frame.planes))
    return y, u, v, bits


def _tag(frame_value, stream_value) -> int:
    """A colour tag: the frame's where it states one, else the stream's."""
    value = int(frame_value or UNSPECIFIED)
    return value if value != UNSPECIFIED else int(stream_value or UNSPECIFIED)


def _hardware_decoder(info: VideoInfo) -> str:
    name = f"{info.codec}_cuvid"
    if name not in av.codecs_available:
        raise PipelineConfigError(f"decode.decoder=nvdec: FFmpeg has no NVDEC decoder for {info.codec} "
                                  f"({name}); use decode.decoder=software")
    return name


def _decoder_gpu(device: torch.device) -> int | None:
    """The GPU NVDEC decodes on: the render's (FFmpeg's own pick is GPU 0); None for a CPU render (FFmpeg's pick)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _open_decoder(stream, name: str, path: Path, gpu: int | None = None) -> av.CodecContext:
    """A decoder `name` set up from the stream's own parameters (what libavformat would have given it); an NVDEC
    decoder on GPU `gpu` (FFmpeg's h264_cuvid option; None: its default, GPU 0)."""
    context = av.CodecContext.create(name, "r")
    if gpu is not None:
        context.options = {"gpu": str(gpu)}
    source = stream.codec_context
    context.extradata = source.extradata
    context.width, context.height = source.width, source.height
    try:
        context.open()
    except av.FFmpegError as e:
        hint = " - NVDEC needs an NVIDIA GPU and driver" if name.endswith("_cuvid") else ""
        raise PipelineConfigError(f"decoder {name} cannot start for {path.name} ({ffmpeg_reason(e)}){hint}") from e
    return context


def _decode_frames(container, stream, path: Path, decoder_name: str | None = None,
                   gpu: int | None = None) -> Iterator[av.VideoFrame]:
    """Decoded frames of `stream` (by the decoder `decoder_name` instead of the stream's own, when given, on GPU
    `gpu`); a decoder failure mid-stream becomes TruncatedVideoError."""
    decoded = 0
    context = None if decoder_name is None else _open_decoder(stream, decoder_name, path, gpu)
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


def _declared_end(container, stream) -> float | None:
    """Where the container says the video stream ends, in seconds (its start time included), from what the file
    itself states; None where it states nothing for this stream."""
    if container.format.flags & _NO_DECLARED_END:
        return None
    # A stream without a start time of its own got its duration copied from the container's: that may be the
    # audio's, longer than the video.
    if stream.duration and stream.time_base and stream.start_time is not None:
        return float((stream.start_time + stream.duration) * stream.time_base)
    tagged = _tagged_end(stream.metadata)
    if tagged is not None:
        return tagged
    if len(container.streams) == 1 and container.duration:
        return ((container.start_time or 0) + container.duration) / av.time_base
    return None


def _tagged_end(metadata: dict) -> float | None:
    """Matroska's per-stream DURATION tag ("HH:MM:SS.nnnnnnnnn"; mkvmerge's carries a language: "DURATION-eng"),
    which FFmpeg's muxer writes as the stream's end time. Taken as the end either way: were it a length counted
    from a later start, the real end would lie later still."""
    for key, value in metadata.items():
        if key.upper() == "DURATION" or key.upper().startswith("DURATION-"):
            try:
                hours, minutes, seconds = str(value).split(":")
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            except ValueError:
                return None
    return None


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

