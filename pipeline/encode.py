"""Streaming video encode with PyAV: input timestamps kept frame by frame, audio carried over, odd sizes handled.

Every audio track of the input comes along, in order, with its language: copied packet by packet where the output
container holds its codec, re-encoded to AAC (from its own start time) where it does not, and PCM too in the mp4
family (.mp4, .m4v, .mov), where few players play it. Where the output's clock is coarser than the input's
(Matroska keeps milliseconds), frames that would share a tick are moved one tick apart.

Default is libx264 CRF 18 yuv420p (conf/encode/x264.yaml); h264_nvenc (conf/encode/nvenc.yaml) when the machine
has it. 4:2:0 / 4:2:2 encoders need even sizes, so odd frames are padded by one edge-replicated pixel (with a
note); 4:4:4 and RGB formats keep the exact size. The output carries the input's colour primaries and transfer
(the RGB values pass through as the input coded them: an HDR input's stay PQ- or HLG-coded, with a note), BT.709
where the input names none; its YUV matrix is the one the RGB was converted with: BT.2020 for BT.2020 primaries,
else BT.709.

RGB becomes YUV in swscale, except for yuv420p frames that are on a GPU (`colour=auto`, the default): those are
converted there (pipeline/colour.py, which follows swscale's filter and rounding to within a level), so only the
planes, half the bytes of RGB, cross to the host and the encode thread, the render's bottleneck at 1080p, no
longer runs swscale.
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation
from tqdm import tqdm

from common.outputs import temp_target
from common.settings import check_settings
from pipeline.colour import rgb_to_packed_yuv420
from pipeline.decode import COLOUR, VideoInfo
from pipeline.errors import EncoderError, PipelineConfigError, ffmpeg_reason
from pipeline.record import FrameRecord

# Encoder settings passed through as codec options when the config sets them.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")  # the containers an output may be
_CODEC_OPTIONS = ("crf", "cq", "qp", "preset", "tune", "rc", "profile")
ENCODE_KEYS = ("codec", "pix_fmt", "audio", "options", "colour", *_CODEC_OPTIONS)  # conf/encode
# x264 clamps its quality settings without a word (crf=100 encoded byte for byte as crf=51), so they are checked
# here. crf: 0 (lossless at 8 bits) to 51 at any bit depth: x264 would go down to -12 at 10 bits, but FFmpeg refuses
# a crf below -1 and takes -1 to 0 as unset (its default, 23). qp: 0 (lossless) to x264's QP_MAX, 69 at 8 bits and 6
# more per extra bit (81 at 10 bits); measured on this FFmpeg build: each value past these encoded as the end.
X264_CODECS = ("libx264", "libx264rgb")
X264_CRF_MAX = 51
X264_QP_MAX_8BIT = 69
_X264_LOG_PREFIX = re.compile(r"^x264 \[\w+\]: ")  # a line libx264 prints itself: "x264 [error]: ..."
_AUDIO_LEAD_S = 0.5  # mux audio this far ahead of the video so the muxer interleaves without buffering much
_PCM_SHY_FORMATS = ("mp4", "ipod", "mov")  # they hold PCM (mp4 as "ipcm"), which browsers and many players skip
# FFmpeg's mov muxer lists them among its codecs but writes them only in MP4 mode: its header failed with EINVAL
_MP4_ONLY_AUDIO = ("opus", "flac", "truehd")
_AAC_RATES = av.Codec("aac", "w").audio_rates
_AAC_FALLBACK_RATE = 48000  # for sample rates AAC has no table for (e.g. 192 kHz)
# swscale's default rgb24 -> yuv420p truncates its chroma: flat colours came out 0.17 of a code low in U and V
# (R and B 0.3 of a level dark after decoding). Accurate rounding costs ~3 ms more per 1080p frame.
SWSCALE_ROUNDING = Interpolation.BILINEAR | Interpolation.ACCURATE_RND
TORCH_YUV_FORMATS = ("yuv420p",)  # what `rgb_to_packed_yuv420` writes; every other format goes through swscale
# AVColorPrimaries / AVColorTransferCharacteristic values an output may carry: FFmpeg's named ones, not the
# unspecified and reserved codes
_PRIMARIES = {1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 22}
_TRANSFERS = set(range(4, 19)) | {1}
BT709, BT2020 = 1, 9            # AVCOL_PRI_* / AVCOL_TRC_*: BT.709; AVCOL_PRI_BT2020
MATRIX_BT709, MATRIX_BT2020 = 1, 9  # AVCOL_SPC_BT709, AVCOL_SPC_BT2020_NCL (= swscale's SWS_CS_* of the same)


class VideoWriter:
    """`VideoWriter(path, info, cfg)`, `.write(batch)` per batch of records, `.close()` once at the end.

    Writes `record.output` (or `record.image` when a frame was never composited) at the record's own pts.
    `cfg` keys: codec, pix_fmt, crf / cq / qp, preset, tune, rc, profile, options (dict), audio ("copy" / "none":
    every audio track, copied or re-encoded as the container needs / no audio).
    `colour` (else cfg's): where RGB → yuv420p happens: "auto" (in torch for frames on a CUDA device, swscale
    otherwise), "device" (in torch on whatever device the frame is on, CPU included), "cpu" (always swscale).
    """

    def __init__(self, path: str | Path, info: VideoInfo, cfg: Mapping, colour: str | None = None):
        check_settings(cfg, ENCODE_KEYS, "encode")
        colour = cfg.get("colour", "auto") if colour is None else colour
        if colour not in COLOUR:
            raise PipelineConfigError(f"encode.colour must be one of {', '.join(COLOUR)}, got {colour!r}")
        self.path = Path(path)
        self.info = info
        self.colour = colour
        self.codec = str(cfg.get("codec", "libx264"))
        self.pix_fmt = str(cfg.get("pix_fmt", "yuv420p"))
        self._settings = _codec_settings(cfg)
        self.width, self.height = _encodable_size(info.width, info.height, self.pix_fmt)
        self.primaries, self.transfer, self.matrix = output_colour(info)
        self.frames_written = 0
        self._fitted_size: tuple[int, int] | None = None  # the last other frame size noted
        self._last_tick: int | None = None  # the last frame's pts on the output stream's clock
        self._ticks_moved = 0
        self._audio: _AudioCarrier | None = None
        audio = cfg.get("audio", "copy")
        if audio not in ("copy", "none"):
            raise PipelineConfigError(f"encode.audio must be copy or none, got {audio!r}")
        _check_codec(self.codec)
        if self.codec in X264_CODECS:
            _check_x264_quality(self.codec, self._settings, self.pix_fmt)
        if colour == "device" and self.pix_fmt not in TORCH_YUV_FORMATS:
            print(f"note: encode.colour=device converts to {', '.join(TORCH_YUV_FORMATS)} only: {self.pix_fmt} "
                  "goes through swscale", file=sys.stderr)
        if (self.width, self.height) != (info.width, info.height):
            print(f"note: {self.codec} with {self.pix_fmt} needs even sizes: padding {info.width}x{info.height} "
                  f"to {self.width}x{self.height} by repeating the edge pixels", file=sys.stderr)
        if info.hdr:
            print(f"note: {hdr_note(info, self.pix_fmt)}", file=sys.stderr)
        self.container = av.open(str(self.path), mode="w")
        try:  # every encoder opens now, each failure named, so a bad setting fails before any work
            self.stream = self._add_video_stream()
            self._open_video_encoder()
            if info.has_audio and audio == "copy":
                self._audio = _AudioCarrier(info.path, self.container, self.path.suffix)
            self._start()
        except BaseException:
            self.abort()
            raise

    def _open_video_encoder(self) -> None:
        said: list[str] = []
        try:
            with _stderr_held(said):
                self.stream.codec_context.open()
        except av.FFmpegError as e:
            # e.g. "unsupported device" on an H100 or A100: data-centre chips without the NVENC unit
            if "nvenc" in self.codec:
                hint = (" - it needs an NVIDIA GPU with an NVENC unit (H100, H200 and A100 have none) and its driver: "
                        "try encode=x264")
            else:  # the codec is there (_check_codec): what it refused is among what it was given
                settings = [f"encode.pix_fmt={self.pix_fmt}", *(f"{name}={value}"
                                                                for name, value in self._settings.values())]
                hint = f": check its settings ({', '.join(settings)})"
            reason = "; ".join(_X264_LOG_PREFIX.sub("", line) for line in said if line) or ffmpeg_reason(e)
            raise EncoderError(f"cannot open encoder {self.codec} ({reason}){hint}") from e
        sys.stderr.write("".join(f"{line}\n" for line in said))  # what the library says of an encoder it opens
        # FFmpeg hands back the options that neither the codec nor the generic encoder settings know, and encodes
        # without them: x264 given nvenc's cq or rc, or a typo in encode.options, made the same file as without
        unused = self.stream.codec_context.options
        if unused:
            names = [name for option, (name, _) in self._settings.items() if option in unused] or sorted(unused)
            raise EncoderError(f"{self.codec} does not take {', '.join(names)}: it would encode as without "
                               f"{'them' if len(names) > 1 else 'it'}; leave {'them' if len(names) > 1 else 'it'} out")

    def _start(self) -> None:
        """Writes the header; the muxer may then put the video on a clock of its own (Matroska: milliseconds)."""
        try:
            self.container.start_encoding()
        except av.FFmpegError as e:
            raise EncoderError(f"cannot start writing {self.path.suffix} output ({ffmpeg_reason(e)})") from e
        self._output_clock = Fraction(self.stream.time_base)
        self._input_per_tick = self._output_clock / self.info.time_base

    def _add_video_stream(self) -> av.video.stream.VideoStream:
        rate = self.info.average_rate or 25
        stream = self.container.add_stream(self.codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.pix_fmt
        stream.time_base = self.info.time_base
        stream.codec_context.time_base = self.info.time_base  # frames keep the input's own pts
        stream.thread_type = "AUTO"
        stream.codec_context.options = {option: str(value) for option, (_, value) in self._settings.items()}
        ctx = stream.codec_context
        ctx.color_primaries, ctx.color_trc = self.primaries, self.transfer
        if not av.VideoFormat(self.pix_fmt).is_rgb:
            ctx.colorspace = self.matrix  # what `_torch_frame` and `_swscale_frame` convert with
            ctx.color_range = 1           # limited ("tv") range
        return stream

    def write(self, batch: list[FrameRecord]) -> None:
        for record in batch:
            started = time.perf_counter()
            frame = self._to_frame(record)
            with self._writing():
                for packet in self.stream.encode(frame):
                    self.container.mux(packet)
                if self._audio is not None and frame.time is not None:
                    self._audio.copy_until(frame.time + _AUDIO_LEAD_S)
            self.frames_written += 1
            record.timings["encode"] = record.timings.get("encode", 0.0) + time.perf_counter() - started

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turns a failure to encode or write (a full disk, a muxer that refuses a packet) into one line naming
        the output."""
        try:
            yield
        except av.FFmpegError as e:
            raise EncoderError(f"cannot write {temp_target(self.path) or self.path}: {ffmpeg_reason(e)}") from e

    def _to_frame(self, record: FrameRecord) -> av.VideoFrame:
        image = record.output if record.output is not None else record.image
        h, w = image.shape[-2:]
        if (h, w) != (self.info.height, self.info.width):
            if (h, w) != self._fitted_size:  # once per change, not per frame
                self._fitted_size = (h, w)
                tqdm.write(f"note: frame {record.index} is {w}x{h}, the video {self.info.width}x{self.info.height}: "
                           "fitted inside it from there, aspect kept, on black", file=sys.stderr)  # above the bar
            image = _fitted(image, self.info.height, self.info.width)
        image = _edge_padded(image, self.height, self.width)
        frame = self._torch_frame(image) if self.converts_in_torch(image) else self._swscale_frame(image)
        frame.pts = self._increasing(record.pts)
        frame.time_base = self.info.time_base
        return frame

    def converts_in_torch(self, image: torch.Tensor) -> bool:
        """Whether `image` becomes yuv420p in torch on its own device rather than in swscale."""
        if self.pix_fmt not in TORCH_YUV_FORMATS or self.colour == "cpu":
            return False
        return self.colour == "device" or image.device.type == "cuda"

    def _torch_frame(self, image: torch.Tensor) -> av.VideoFrame:
        planes = rgb_to_packed_yuv420(image, colorspace=self.matrix, full_range=False).cpu().numpy()
        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        # the tags swscale's reformat below puts on its frames, so both paths hand the encoder the same thing
        frame.colorspace, frame.color_range = self.matrix, 1   # limited range
        return frame

    def _swscale_frame(self, image: torch.Tensor) -> av.VideoFrame:
        frame = av.VideoFrame.from_ndarray(to_numpy_hwc(image), format="rgb24")
        if frame.format.name != self.pix_fmt:
            if av.VideoFormat(self.pix_fmt).is_rgb:
                frame = frame.reformat(format=self.pix_fmt)
            else:
                frame = frame.reformat(format=self.pix_fmt, dst_colorspace=self.matrix, dst_color_range="MPEG",
                                       interpolation=SWSCALE_ROUNDING)
        return frame

    def _increasing(self, pts: int | None) -> int:
        """`pts` (on the input's clock), moved where needed so that it is later than the last frame's on the output
        stream's clock too: encoders and players need strictly increasing timestamps, and damaged inputs sometimes
        repeat one, or frames lie closer together than the output's clock tells apart (Matroska: 1 ms). A frame is
        moved to the next tick of the output's clock."""
        if pts is None:
            return self._after_last()
        tick = _nearest(pts / self._input_per_tick)  # what the muxer's rescaling makes of it
        if self._last_tick is not None and tick <= self._last_tick:
            self._ticks_moved += 1
            return self._after_last()
        self._last_tick = tick
        return pts

    def _after_last(self) -> int:
        """The first input pts that the muxer puts on a later tick than the last frame's (0 for the first frame)."""
        if self._last_tick is None:
            pts = 0
        else:
            pts = math.ceil((self._last_tick + Fraction(1, 2)) * self._input_per_tick)
        self._last_tick = _nearest(pts / self._input_per_tick)
        return pts

    def close(self) -> None:
        """Flushes the encoder and the remaining audio, then finishes the file (a failure: EncoderError, the
        file left for the caller to delete)."""
        try:
            with self._writing():
                # packet by packet: an encoder holds up to its lookahead's worth of frames (x264's medium preset
                # at 1080p: 4 s of work), which `stream.encode(None)` would drain in one C call that Ctrl-C
                # cannot interrupt
                for packet in self.stream.codec_context.encode_lazy(None):
                    packet.stream = self.stream  # what `stream.encode` sets
                    self.container.mux(packet)
                if self._audio is not None:
                    self._audio.copy_until(float("inf"))
                self._audio_close()
                container, self.container = self.container, None
                container.close()  # writes the trailer (the mp4 index): a full disk shows here
        except BaseException:
            self.abort()  # quietly: the error that stopped the writing is the one to report
            raise
        if self._ticks_moved:
            count = f"{self._ticks_moved} frame{'s' if self._ticks_moved > 1 else ''}"
            print(f"note: {count} would have shared a timestamp with the frame before on the {self.path.suffix} "
                  f"output's clock ({self._output_clock} s): moved one tick later", file=sys.stderr)

    def _audio_close(self) -> None:
        if self._audio is not None:
            audio, self._audio = self._audio, None
            audio.close()

    def abort(self) -> None:
        """Closes everything without flushing (the temp file is deleted by the caller); its own errors are
        dropped: the half-written file is discarded anyway, and the error that led here is the one to report."""
        try:
            self._audio_close()
        except av.FFmpegError:
            pass
        container, self.container = self.container, None
        if container is not None:
            try:
                container.close()
            except av.FFmpegError:
                pass


class _AudioCarrier:
    """Carries every audio track of the input into the output, in order (`_AudioTrack`), reading the input on a
    demuxer of its own so the decode thread never has to hand audio over."""

    def __init__(self, source: Path, output: av.container.OutputContainer, suffix: str):
        self.input = av.open(str(source), mode="r")
        try:
            streams = list(self.input.streams.audio)
            self.tracks = {stream.index: _AudioTrack(number, stream, output, suffix)
                           for number, stream in enumerate(streams, 1)}
        except BaseException:
            self.input.close()
            raise
        self._packets: Iterator[av.Packet] = self.input.demux(streams)
        self._pending: av.Packet | None = None
        self._finished = False

    def copy_until(self, seconds: float) -> None:
        """Carries the packets up to `seconds` (of every track: the demuxer hands them over in file order)."""
        while not self._finished:
            packet = self._pending or next(self._packets, None)
            self._pending = None
            if packet is None:
                self._finished = True  # the encoders take one flush each
                for track in self.tracks.values():
                    track.finish()
                return
            if packet.dts is None or packet.size == 0:
                continue
            if packet.pts is not None and float(packet.pts * packet.time_base) > seconds:
                self._pending = packet
                return
            self.tracks[packet.stream.index].carry(packet)

    def close(self) -> None:
        self.input.close()


class _AudioTrack:
    """One input audio stream in the output, as the `number`th audio track, with its language tag: its packets
    copied where the container holds the codec and players play it there, else decoded and re-encoded to AAC."""

    def __init__(self, number: int, source: av.audio.stream.AudioStream, output: av.container.OutputContainer,
                 suffix: str):
        self.source, self.output = source, output
        context = source.codec_context
        name = context.codec.canonical_name  # "mp3", where the decoder's name is "mp3float"
        pcm_shy = name.startswith("pcm_") and output.format.name in _PCM_SHY_FORMATS
        mp4_only = name in _MP4_ONLY_AUDIO and output.format.name == "mov"
        self.copy = context.name in output.supported_codecs and not pcm_shy and not mp4_only
        if self.copy:
            self.stream = output.add_stream_from_template(source)
        else:
            why = f"would go into {suffix} as PCM, which few players play" if pcm_shy else f"cannot go into {suffix}"
            print(f"note: audio track {number} ({name}) {why}: re-encoding it as AAC", file=sys.stderr)
            self.stream = output.add_stream(
                "aac", rate=context.sample_rate if context.sample_rate in _AAC_RATES else _AAC_FALLBACK_RATE)
            # the standard layout of its channel count: AVI, WAV and Matroska PCM often name none ("2 channels"),
            # which the AAC encoder refuses
            self.stream.layout = av.AudioLayout(f"{context.channels}c")
            self._open_encoder(number, name)
        language = source.metadata.get("language")
        if language:
            self.stream.metadata["language"] = language
        self._next_pts: int | None = None  # of the next frame to encode, in samples at its own rate
        self._finished = False

    def _open_encoder(self, number: int, name: str) -> None:
        context = self.source.codec_context
        try:
            self.stream.codec_context.open()
        except av.FFmpegError as e:
            raise EncoderError(
                f"cannot open the AAC encoder for audio track {number} ({name}, {context.channels} channels, "
                f"{context.sample_rate} Hz): {ffmpeg_reason(e)} - encode.audio=none leaves the audio out") from e

    def carry(self, packet: av.Packet) -> None:
        if self.copy:
            packet.stream = self.stream
            self.output.mux(packet)
        else:
            for frame in packet.decode():
                self._encode(frame)

    def _encode(self, frame: av.AudioFrame) -> None:
        """The first frame keeps its own time, the rest follow it sample by sample: decoded timestamps carry the
        container's rounding (Matroska's milliseconds are ±22 samples at 44.1 kHz), which the encoder's
        regrouping into 1024-sample frames cannot take."""
        rate = frame.sample_rate
        if self._next_pts is None:
            self._next_pts = 0 if frame.pts is None else _nearest(frame.pts * frame.time_base * rate)
        frame.pts, frame.time_base = self._next_pts, Fraction(1, rate)
        self._next_pts += frame.samples
        for packet in self.stream.encode(frame):
            self.output.mux(packet)

    def finish(self) -> None:
        """Drains the decoder and the encoder, once."""
        if self.copy or self._finished:
            return
        self._finished = True
        for frame in self.source.codec_context.decode(None):
            self._encode(frame)
        for packet in self.stream.encode(None):
            self.output.mux(packet)


def output_colour(info: VideoInfo) -> tuple[int, int, int]:
    """(primaries, transfer, matrix) tags of the output: the input's primaries and transfer (the RGB values are
    still coded that way), BT.709 for what the input leaves unspecified; the YUV matrix BT.2020 (non-constant
    luminance) with BT.2020 primaries, as HDR10 and HLG players expect, else BT.709."""
    primaries = info.color_primaries if info.color_primaries in _PRIMARIES else BT709
    transfer = info.color_trc if info.color_trc in _TRANSFERS else BT709
    return primaries, transfer, MATRIX_BT2020 if primaries == BT2020 else MATRIX_BT709


def hdr_note(info: VideoInfo, pix_fmt: str) -> str:
    """What an HDR input means for its render, on one line."""
    bits = max((c.bits for c in av.VideoFormat(pix_fmt).components), default=8)
    if bits <= 8 < info.bit_depth:
        depth = (f"the {bits}-bit output ({pix_fmt}) of this {info.bit_depth}-bit input will band in smooth "
                 "gradients")
    else:
        depth = "the render works on 8-bit RGB, so smooth gradients may band"
    return (f"the input is HDR ({info.hdr}): the styles are applied to its {info.hdr}-coded values, and the output "
            f"keeps its colour tags; {depth}")


def _nearest(value: Fraction) -> int:
    """`value` rounded to the nearest whole number, halves away from zero: av_rescale_q's rounding."""
    return math.floor(value + Fraction(1, 2)) if value >= 0 else -math.floor(Fraction(1, 2) - value)


def _encodable_size(width: int, height: int, pix_fmt: str) -> tuple[int, int]:
    """The smallest size >= (width, height) that `pix_fmt`'s chroma subsampling allows."""
    try:
        fmt = av.VideoFormat(pix_fmt)
    except (ValueError, av.FFmpegError) as e:
        raise EncoderError(f"unknown pixel format {pix_fmt!r} in the encode settings") from e
    even_w = fmt.chroma_width(2) < 2
    even_h = fmt.chroma_height(2) < 2
    return width + (width % 2 if even_w else 0), height + (height % 2 if even_h else 0)


def _fitted(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, h, w) uint8 → (3, height, width): scaled to fit inside, its aspect kept, centred on black. A stream whose
    frame size changes (an adaptive-bitrate recording) goes on in the video's size; the segment stage makes the
    change a new shot."""
    h, w = image.shape[-2:]
    scale = min(height / h, width / w)
    fit_h, fit_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    resized = torch.nn.functional.interpolate(image[None].float(), size=(fit_h, fit_w), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    out = torch.zeros((3, height, width), dtype=torch.uint8, device=image.device)
    top, left = (height - fit_h) // 2, (width - fit_w) // 2
    out[:, top:top + fit_h, left:left + fit_w] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _edge_padded(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, h, w) → (3, height, width) with the last column and row repeated: an odd-sized frame grown to the
    even size 4:2:0 needs, the same way for the torch and the swscale conversion."""
    h, w = image.shape[-2:]
    if w != width:
        image = torch.cat([image, image[:, :, -1:].expand(-1, -1, width - w)], dim=2)
    if h != height:
        image = torch.cat([image, image[:, -1:].expand(-1, height - h, -1)], dim=1)
    return image


def _codec_settings(cfg: Mapping) -> dict[str, tuple[str, object]]:
    """The codec options the settings give, each as (the setting that gives it, its value): the named settings
    (crf, preset...), then encode.options, which win over a named one of the same option; null ones are unset."""
    options = cfg.get("options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):  # encode.options=abc: text, which names no option
        raise PipelineConfigError("encode.options must be a map of codec options (+encode.options.NAME=VALUE), "
                                  f"got {options!r}")
    settings = {key: (f"encode.{key}", cfg[key]) for key in _CODEC_OPTIONS if cfg.get(key) is not None}
    settings.update({str(k): (f"encode.options.{k}", v) for k, v in options.items() if v is not None})
    return settings


def _check_x264_quality(codec: str, settings: dict[str, tuple[str, object]], pix_fmt: str) -> None:
    """crf and qp within x264's ranges (X264_CRF_MAX), and not both: given crf, x264 ignores qp."""
    bits = max((c.bits for c in av.VideoFormat(pix_fmt).components), default=8)
    for option, high in (("crf", X264_CRF_MAX), ("qp", X264_QP_MAX_8BIT + 6 * (bits - 8))):
        if option not in settings:
            continue
        name, value = settings[option]
        try:  # a number, or its text (codec options are text: encode.options.crf="20")
            quality = float(str(value))
        except ValueError:
            quality = math.nan
        whole = option == "qp"
        if not 0 <= quality <= high or (whole and not quality.is_integer()):
            kind = "a whole number" if whole else "a number"
            raise PipelineConfigError(f"{name}={value}: {codec} takes {kind} from 0 to {high} with {pix_fmt}")
    if "crf" in settings and "qp" in settings:
        (crf, crf_value), (qp, qp_value) = settings["crf"], settings["qp"]
        raise PipelineConfigError(f"{crf}={crf_value} and {qp}={qp_value}: {codec} steers by one, and given crf "
                                  f"ignores qp; pass {crf}=null to steer by qp")


def _check_codec(name: str) -> None:
    try:
        codec = av.codec.Codec(name, "w")
    except (ValueError, av.FFmpegError) as e:
        raise EncoderError(f"encoder {name!r} is not available in this FFmpeg build: try encode=x264") from e
    if codec.type != "video":
        raise EncoderError(f"{name!r} is a {codec.type} encoder, not a video encoder")


@contextmanager
def _stderr_held(said: list[str]) -> Iterator[None]:
    """What C libraries write straight to the process's stderr while the block runs, held back: its lines go into
    `said` when it ends. libx264 prints its refusals there itself ("x264 [error]: invalid preset 'foo'"), past
    FFmpeg's log, which av.logging governs, and PyAV keeps quiet: a second line ahead of ours, saying the same."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            said += held.read().decode(errors="replace").splitlines()


def to_numpy_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) tensor on any device → contiguous (H, W, 3) numpy array."""
    return np.ascontiguousarray(image.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
