"""VideoReader / VideoWriter against plain PyAV as the oracle: exact pixels through lossless codecs, timestamps,
rotation, odd sizes, 10-bit and HDR input, audio, write failures and an interrupted flush."""
from __future__ import annotations

import errno
import signal
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from pipeline.decode import VideoReader, probe
from pipeline.encode import VideoWriter
from pipeline.errors import EncoderError, PipelineConfigError
from pipeline.record import FrameRecord
from tests.helpers_video import (
    audio_summary, exact_rgb, hdr_clip, lossless_clip, pattern_frames, psnr, read_frames, ten_bit_clip, write_clip,
)

X264 = {"codec": "libx264", "crf": 18, "preset": "veryfast", "pix_fmt": "yuv420p"}
LOSSLESS_RGB = {"codec": "libx264rgb", "qp": 0, "preset": "ultrafast", "pix_fmt": "rgb24"}


def decode_all(path, batch_size=4):
    reader = VideoReader(path, batch_size=batch_size)
    batches = list(reader)
    return reader, batches, [r for b in batches for r in b]


def hwc(record) -> np.ndarray:
    return record.image.permute(1, 2, 0).numpy()


def reencode(path, reader, records, cfg):
    writer = VideoWriter(path, reader.info, cfg)
    writer.write(records)
    writer.close()
    return read_frames(path)


def test_reader_gives_back_exact_frames_in_batches(tmp_path):
    frames = pattern_frames(8, 64, 48)
    reader, batches, records = decode_all(lossless_clip(tmp_path / "in.mp4", frames), batch_size=3)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [r.index for r in records] == list(range(8))
    for record, frame in zip(records, frames):
        assert record.image.dtype == torch.uint8 and record.image.shape == (3, 48, 64)
        np.testing.assert_array_equal(hwc(record), frame)
        assert record.timings["decode"] >= 0
    _, oracle_times = read_frames(tmp_path / "in.mp4")
    assert [r.pts * r.time_base for r in records] == oracle_times
    info = reader.info
    assert (info.width, info.height, info.frame_count, info.has_audio, info.rotation) == (64, 48, 8, False, 0)
    assert info.average_rate == 24


def test_writer_lossless_is_bit_exact_and_x264_is_close(tmp_path):
    frames = pattern_frames(8, 64, 48, seed=1)
    reader, _, records = decode_all(lossless_clip(tmp_path / "in.mp4", frames))
    exact, _ = reencode(tmp_path / "lossless.mkv", reader, records, LOSSLESS_RGB)
    assert len(exact) == 8
    for out, frame in zip(exact, frames):
        np.testing.assert_array_equal(out, frame)
    lossy, _ = reencode(tmp_path / "x264.mp4", reader, records, X264)
    assert len(lossy) == 8
    assert min(psnr(out, frame) for out, frame in zip(lossy, frames)) > 33


def test_variable_frame_rate_timestamps_survive_decode_and_encode(tmp_path):
    frames = pattern_frames(8, 64, 48)
    pts = [0, 40, 90, 100, 180, 260, 270, 400]  # milliseconds, deliberately irregular
    src = write_clip(tmp_path / "vfr.mp4", frames, pts=pts, time_base=Fraction(1, 1000))
    _, src_times = read_frames(src)
    assert src_times == [Fraction(p, 1000) for p in pts]
    reader, _, records = decode_all(src)
    assert [r.pts * r.time_base for r in records] == src_times
    _, out_times = reencode(tmp_path / "out.mp4", reader, records, X264)
    assert out_times == src_times


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, rotation):
    frames = pattern_frames(4, 64, 48)
    reader, _, records = decode_all(lossless_clip(tmp_path / "rot.mp4", frames, rotation=rotation))
    upright = [np.rot90(f, rotation // 90) for f in frames]  # the display matrix turns counter-clockwise
    assert reader.info.rotation == rotation
    assert (reader.info.width, reader.info.height) == (upright[0].shape[1], upright[0].shape[0])
    for record, frame in zip(records, upright):
        np.testing.assert_array_equal(hwc(record), frame)
    written, _ = reencode(tmp_path / "out.mkv", reader, records, LOSSLESS_RGB)
    np.testing.assert_array_equal(written[0], upright[0])  # stored upright, no rotation left to apply


def test_odd_size_is_padded_for_420_and_kept_for_444(tmp_path, capfd):
    frames = pattern_frames(6, 65, 47)
    reader, _, records = decode_all(lossless_clip(tmp_path / "odd.mkv", frames))
    assert (reader.info.width, reader.info.height) == (65, 47)
    padded, _ = reencode(tmp_path / "pad.mp4", reader, records, X264)
    assert "padding 65x47 to 66x48" in capfd.readouterr().err
    assert padded[0].shape == (48, 66, 3)
    assert min(psnr(out[:47, :65], f) for out, f in zip(padded, frames)) > 33
    # the extra column/row repeat the edge pixels
    assert np.abs(padded[0][:47, 65].astype(int) - padded[0][:47, 64].astype(int)).mean() < 3
    assert np.abs(padded[0][47, :65].astype(int) - padded[0][46, :65].astype(int)).mean() < 3
    kept, _ = reencode(tmp_path / "keep.mp4", reader, records, {**X264, "pix_fmt": "yuv444p"})
    assert kept[0].shape == (47, 65, 3)
    assert min(psnr(out, f) for out, f in zip(kept, frames)) > 36
    # FFmpeg's descriptor of yuv422p: log2_chroma_w 1, log2_chroma_h 0, so only the width needs to be even
    capfd.readouterr()
    half, _ = reencode(tmp_path / "half.mp4", reader, records, {**X264, "pix_fmt": "yuv422p"})
    assert "padding 65x47 to 66x47" in capfd.readouterr().err
    assert half[0].shape == (47, 66, 3)
    assert min(psnr(out[:, :65], f) for out, f in zip(half, frames)) > 33


def test_a_raw_stream_without_timestamps_is_timed_by_its_frame_rate(tmp_path):
    path = write_clip(tmp_path / "raw.h264", pattern_frames(5, 32, 32))  # Annex B: no container, no pts
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate, time_base = stream.average_rate, stream.time_base
        assert all(frame.pts is None for frame in container.decode(stream))
    # FFmpeg's raw H.264 demuxer gives the stream a rate (its framerate option, 25) and a clock of far finer ticks
    assert rate and 1 / (rate * time_base) > 1000
    reader, _, records = decode_all(path)
    assert reader.info.average_rate == rate
    assert [r.pts * r.time_base for r in records] == [Fraction(i) / rate for i in range(5)]


def test_ten_bit_input_decodes_to_uint8_rgb(tmp_path):
    frames = pattern_frames(5, 64, 48)
    reader, _, records = decode_all(ten_bit_clip(tmp_path / "10bit.mp4", frames))
    assert reader.info.pix_fmt.startswith("yuv420p10")
    assert len(records) == 5
    assert all(r.image.dtype == torch.uint8 for r in records)
    assert min(psnr(hwc(r), f) for r, f in zip(records, frames)) > 33


def test_audio_is_copied_packet_for_packet(tmp_path):
    frames = pattern_frames(12, 64, 48)
    src = write_clip(tmp_path / "av.mp4", frames, audio=True)
    reader, _, records = decode_all(src)
    assert reader.info.has_audio
    reencode(tmp_path / "out.mp4", reader, records, X264)
    count, duration = audio_summary(tmp_path / "out.mp4")
    src_count, src_duration = audio_summary(src)
    assert count == src_count > 0
    assert duration == pytest.approx(src_duration, abs=1e-6)
    reencode(tmp_path / "mute.mp4", reader, records, {**X264, "audio": "none"})
    assert audio_summary(tmp_path / "mute.mp4") == (0, 0.0)


def test_writer_uses_composited_output_when_present(tmp_path):
    frames = pattern_frames(3, 64, 48)
    reader, _, records = decode_all(lossless_clip(tmp_path / "in.mp4", frames))
    for r in records:
        r.output = 255 - r.image
    written, _ = reencode(tmp_path / "out.mkv", reader, records, LOSSLESS_RGB)
    for out, frame in zip(written, frames):
        np.testing.assert_array_equal(out, 255 - frame)


def test_frames_closer_than_the_output_clock_still_get_distinct_timestamps(tmp_path, capfd):
    """Matroska keeps milliseconds: 3750 and 3760 at 1/90000 both became 42 ms, two frames at one time."""
    pts = [0, 3750, 3760, 7500, 11250]
    source = write_clip(tmp_path / "close.mp4", pattern_frames(5, 64, 48), pts=pts, time_base=Fraction(1, 90000))
    reader, _, records = decode_all(source)
    assert [r.pts for r in records] == pts
    capfd.readouterr()
    written, out_times = reencode(tmp_path / "out.mkv", reader, records, X264)
    assert len(written) == 5
    assert all(a < b for a, b in zip(out_times, out_times[1:])), out_times
    assert out_times == [Fraction(0), Fraction(42, 1000), Fraction(43, 1000), Fraction(83, 1000), Fraction(125, 1000)]
    err = capfd.readouterr().err
    assert err.count("note:") == 1 and "1 frame" in err and ".mkv" in err
    reencode(tmp_path / "out.mp4", reader, records, X264)  # the input's own clock: nothing to move, nothing to say
    assert "note:" not in capfd.readouterr().err


def _encode_config(*overrides: str):
    from pipeline.render import compose_config

    return compose_config(["input=x.mp4", "output=y.mp4", *overrides]).encode


def test_every_encode_setting_in_the_config_reaches_the_encoder(tmp_path):
    """tune, profile and qp were read but had no config entry (`encode.tune=...` was refused by Hydra), and
    encode.colour did not exist: the render never passed one. x264 records its settings in the stream."""
    frames = pattern_frames(4, 64, 48)
    reader, _, records = decode_all(lossless_clip(tmp_path / "in.mp4", frames))
    reencode(tmp_path / "plain.mp4", reader, records, _encode_config())
    reencode(tmp_path / "tuned.mp4", reader, records, _encode_config("encode.tune=zerolatency"))
    assert b"bframes=3" in (tmp_path / "plain.mp4").read_bytes()
    assert b"bframes=0" in (tmp_path / "tuned.mp4").read_bytes()  # what zerolatency sets
    assert VideoWriter(tmp_path / "c.mp4", reader.info, _encode_config("encode.colour=cpu")).colour == "cpu"


def test_an_unknown_encode_setting_is_refused(tmp_path):
    """`+encode.crff=30` rendered with crf 18, silently."""
    from common.errors import SettingError

    reader, _, _ = decode_all(lossless_clip(tmp_path / "in.mp4", pattern_frames(2, 64, 48)))
    with pytest.raises(SettingError, match="unknown encode setting.s. crff"):
        VideoWriter(tmp_path / "out.mp4", reader.info, _encode_config("+encode.crff=30"))
    assert not (tmp_path / "out.mp4").exists()


@pytest.fixture(scope="module")
def clip_info(tmp_path_factory):
    return probe(lossless_clip(tmp_path_factory.mktemp("clip") / "in.mp4", pattern_frames(2, 64, 48)))


@pytest.mark.parametrize("overrides, unused", [
    (["+encode.options.foo=1"], "encode.options.foo"),
    (["+encode.cq=19"], "encode.cq"),
    (["+encode.options.foo=1", "+encode.rc=vbr", "+encode.cq=19"], "encode.cq, encode.rc, encode.options.foo"),
], ids=["typo", "nvenc-cq", "three"])
def test_settings_the_encoder_does_not_take_are_refused_before_any_frame(tmp_path, clip_info, overrides, unused):
    """nvenc's cq and rc, or a typo in encode.options: libx264 opened without them and the render wrote the same
    file as without them, exit 0."""
    with pytest.raises(EncoderError) as error:
        VideoWriter(tmp_path / "out.mp4", clip_info, _encode_config(*overrides))
    assert str(error.value).startswith(f"libx264 does not take {unused}: it would encode as without ")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("setting, reason", [
    ("preset=foo", "invalid preset 'foo'"), ("tune=foo", "invalid tune 'foo'"), ("profile=foo", "invalid profile: foo"),
])
def test_a_value_libx264_refuses_is_said_once(tmp_path, clip_info, capfd, setting, reason):
    """libx264 printed its own "x264 [error]: invalid preset 'foo'" ahead of the render's error line: two lines, and
    ours gave FFmpeg's "Invalid argument" for the reason."""
    capfd.readouterr()
    with pytest.raises(EncoderError) as error:
        VideoWriter(tmp_path / "out.mp4", clip_info, _encode_config(f"encode.{setting}"))
    assert str(error.value).startswith(f"cannot open encoder libx264 ({reason}): check its settings (")
    assert f"encode.{setting}" in str(error.value) and capfd.readouterr().err == ""


@pytest.mark.parametrize("settings", [
    {"crf": 20.5, "tune": "film", "profile": "high", "options": {"x264-params": "keyint=12", "threads": 2, "g": 12}},
    {"crf": None, "qp": 0, "options": {"x264opts": "bframes=0", "bf": 0, "crf": None}},
    {"crf": 51, "pix_fmt": "yuv444p", "profile": "high444"},
    {"crf": None, "qp": 81, "pix_fmt": "yuv420p10le"},
], ids=["crf", "qp", "444", "10-bit"])
def test_every_setting_libx264_takes_opens_it(tmp_path, clip_info, settings):
    """x264's own options, FFmpeg's generic encoder ones (threads, g, bf) and x264-params are taken; a null one is
    none."""
    writer = VideoWriter(tmp_path / "out.mkv", clip_info, {**X264, **settings})
    writer.abort()


@pytest.mark.parametrize("settings, message", [
    ({"crf": 100}, "encode.crf=100: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"crf": 1000}, "encode.crf=1000: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"crf": -0.5}, "encode.crf=-0.5: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"crf": "abc"}, "encode.crf=abc: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"crf": True}, "encode.crf=True: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"crf": None, "qp": 70}, "encode.qp=70: libx264 takes a whole number from 0 to 69 with yuv420p"),
    ({"crf": None, "qp": 20.5}, "encode.qp=20.5: libx264 takes a whole number from 0 to 69 with yuv420p"),
    ({"crf": None, "qp": 82, "pix_fmt": "yuv420p10le"},
     "encode.qp=82: libx264 takes a whole number from 0 to 81 with yuv420p10le"),
    ({"options": {"crf": "60"}}, "encode.options.crf=60: libx264 takes a number from 0 to 51 with yuv420p"),
    ({"qp": 20}, "encode.crf=18 and encode.qp=20: libx264 steers by one, and given crf ignores qp; pass "
                 "encode.crf=null to steer by qp"),
], ids=["crf100", "crf1000", "crf-0.5", "crf-text", "crf-true", "qp70", "qp-fraction", "qp82-10bit", "options-crf",
        "crf-and-qp"])
def test_quality_that_x264_would_not_use_as_given_is_refused(tmp_path, clip_info, settings, message):
    """x264 clamps: crf=100 and crf=1000 wrote the file crf=51 writes, exit 0; FFmpeg takes a crf from -1 to 0 as
    unset (crf 23); and a qp beside the config's crf 18 was ignored."""
    with pytest.raises(PipelineConfigError) as error:
        VideoWriter(tmp_path / "out.mp4", clip_info, {**X264, **settings})
    assert str(error.value) == message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("pix_fmt, option, end", [("yuv420p", "crf", 51), ("yuv420p", "qp", 69),
                                                   ("yuv420p10le", "qp", 81), ("yuv420p10le", "crf", 51)])
def test_the_ranges_end_where_x264_starts_clamping(pix_fmt, option, end):
    """The ends checked above are this FFmpeg build's x264's: one past an end encodes as the end, one short of it
    does not."""
    def encoded(value) -> bytes:
        stream = av.CodecContext.create("libx264", "w")
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 64, 48, pix_fmt, Fraction(1, 25)
        stream.options = {option: str(value), "preset": "ultrafast"}
        frames = [av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
                  for image in pattern_frames(3, 64, 48)]
        for pts, frame in enumerate(frames):
            frame.pts = pts
        return b"".join(bytes(packet) for frame in [*frames, None] for packet in stream.encode(frame))

    assert encoded(end + 1) == encoded(end) != encoded(end - 1)


@pytest.mark.parametrize("options", ["abc", ["threads=2"]])
def test_options_that_are_no_map_are_one_line(tmp_path, clip_info, options):
    """encode.options=abc was AttributeError: 'str' object has no attribute 'items'."""
    with pytest.raises(PipelineConfigError, match=r"^encode\.options must be a map of codec options \(\+encode"):
        VideoWriter(tmp_path / "out.mp4", clip_info, {**X264, "options": options})
    assert not any(tmp_path.iterdir())


def output_tags(path) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(primaries, transfer, matrix) of the output's stream and of its first decoded frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream))
        context = stream.codec_context
        return ((context.color_primaries, context.color_trc, context.colorspace),
                (frame.color_primaries, frame.color_trc, frame.colorspace))


@pytest.mark.parametrize("transfer, name", [(18, "HLG"), (16, "PQ")])
@pytest.mark.parametrize("colour", ["cpu", "device"])   # swscale's RGB -> YUV, and the torch one the GPU uses
def test_hdr_input_keeps_its_colour_tags(tmp_path, capfd, transfer, name, colour):
    """An HLG phone clip came out tagged BT.709 with its HLG-coded values unchanged: players showed it washed out.
    The output names the input's primaries and transfer, and the matrix its YUV was converted with."""
    frames = pattern_frames(4, 64, 48)
    reader, _, records = decode_all(hdr_clip(tmp_path / "hdr.mp4", frames, transfer=transfer))
    info = reader.info
    tags = (info.color_primaries, info.color_trc, info.colorspace, info.bit_depth)
    assert info.hdr == name and tags == (9, transfer, 9, 10)
    assert f"HDR ({name})" in info.describe()
    capfd.readouterr()
    writer = VideoWriter(tmp_path / "out.mp4", info, {**X264, "crf": 0}, colour=colour)
    writer.write(records)
    writer.close()
    err = capfd.readouterr().err
    assert err.count("note:") == 1 and f"HDR ({name})" in err and "8-bit output (yuv420p) of this 10-bit" in err, err
    assert output_tags(tmp_path / "out.mp4") == ((9, transfer, 9), (9, transfer, 9))
    # the planes were converted with the matrix they are tagged with: read by their tags they are the decoded
    # input's values but for 4:2:0 (measured 49.4 dB; read with the other matrix, 38.2 dB)
    with av.open(str(tmp_path / "out.mp4")) as container:
        written = [exact_rgb(frame).round() for frame in container.decode(video=0)]
    assert min(psnr(out, hwc(record)) for out, record in zip(written, records)) > 45


def test_hdr_note_for_a_ten_bit_output(tmp_path, capfd):
    reader, _, records = decode_all(hdr_clip(tmp_path / "hdr.mp4", pattern_frames(2, 64, 48)))
    capfd.readouterr()
    writer = VideoWriter(tmp_path / "out.mkv", reader.info, {**X264, "pix_fmt": "yuv420p10le"})
    writer.write(records)
    writer.close()
    err = capfd.readouterr().err
    assert err.count("note:") == 1 and "HDR (HLG)" in err and "the render works on 8-bit RGB" in err, err
    assert output_tags(tmp_path / "out.mkv")[0] == (9, 18, 9)


@pytest.mark.parametrize("tags, expected", [
    (None, (1, 1, 1)),             # untagged: BT.709, as before
    ((6, 6, 6), (6, 6, 1)),        # SD (SMPTE 170M): its primaries and transfer; the YUV is converted as BT.709
])
def test_sdr_output_tags(tmp_path, capfd, tags, expected):
    frames = pattern_frames(2, 64, 48)
    source = write_clip(tmp_path / "in.mp4", frames)
    if tags is not None:
        with av.open(str(source)) as container, av.open(str(tmp_path / "tagged.mp4"), "w") as out:
            stream = out.add_stream_from_template(container.streams.video[0])
            stream.codec_context.color_primaries, stream.codec_context.color_trc = tags[:2]
            stream.codec_context.colorspace = tags[2]
            for packet in container.demux(container.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    out.mux(packet)
        source = tmp_path / "tagged.mp4"
    reader, _, records = decode_all(source)
    assert reader.info.hdr is None
    capfd.readouterr()
    reencode(tmp_path / "out.mp4", reader, records, X264)
    assert "note:" not in capfd.readouterr().err
    assert output_tags(tmp_path / "out.mp4")[0] == expected


def test_estimated_frame_counts_say_about(tmp_path):
    """Matroska states no frame count: the estimate is duration x nominal rate, 41 for a variable-rate clip of 10
    frames. It read "~41 frames"; now "about", and a counted clip states its count plainly."""
    pts = [0, 1, 3, 4, 10, 11, 12, 30, 31, 40]
    frames = pattern_frames(10, 64, 48)
    mkv = probe(write_clip(tmp_path / "vfr.mkv", frames, pts=pts, time_base=Fraction(1, 24)))
    mp4 = probe(write_clip(tmp_path / "vfr.mp4", frames, pts=pts, time_base=Fraction(1, 24)))
    assert mkv.declared_frames == 0 and f"about {mkv.frame_count} frames" in mkv.describe()
    assert mp4.declared_frames == 10 and ", 10 frames" in mp4.describe() and "about" not in mp4.describe()


class _FullDisk:
    """An output container whose muxer fails as on a full disk, and whose close fails again (writing the trailer)."""

    def __init__(self, container):
        self._container = container

    def mux(self, packet):
        raise av.error.OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._container.close()
        raise av.error.OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._container, name)


@pytest.mark.parametrize("frames", [3, 40])   # all held by x264 until the flush / muxed while writing
def test_a_full_disk_is_one_line_naming_the_output(tmp_path, frames):
    """A full disk gave a traceback: av.error.OSError from the muxer, chained with a second one from the clean-up's
    close. It is an EncoderError naming the output (the one the user gave, not the temp file beside it)."""
    reader, _, records = decode_all(lossless_clip(tmp_path / "in.mkv", pattern_frames(frames, 64, 48)))
    writer = VideoWriter(tmp_path / ".out.0123abcd.partial.mp4", reader.info, X264)  # as AtomicOutput names it
    writer.container = _FullDisk(writer.container)
    with pytest.raises(EncoderError) as caught:
        writer.write(records)
        writer.close()
    assert str(caught.value) == f"cannot write {tmp_path / 'out.mp4'}: No space left on device"
    assert isinstance(caught.value.__cause__, av.error.OSError)
    writer.abort()   # what the render does next (after a failed close: nothing left to close)
    assert writer.container is None


class _Interrupted(BaseException):
    pass


def test_ctrl_c_lands_between_the_flushed_packets(tmp_path):
    """The flush drained the encoder in one C call (3.9 s at 1080p, preset medium), which a signal cannot
    interrupt: Ctrl-C waited for it. Here x264 holds all 24 frames (lookahead 24, one thread, preset veryslow:
    1.6 s of flushing on a 2-core machine); an alarm 50 ms after the first flushed packet is muxed must stop
    the flush with packets still to come, and leave the writer closed."""
    count = 24
    info = probe(lossless_clip(tmp_path / "in.mkv", pattern_frames(1, 160, 120)))
    noise = np.random.default_rng(0).integers(0, 256, (count, 3, 120, 160), dtype=np.uint8)
    cfg = {**X264, "preset": "veryslow", "options": {"threads": "1", "x264-params": f"rc-lookahead={count}"}}
    writer = VideoWriter(tmp_path / "out.mp4", info, cfg)
    muxed = []

    class Counting:
        def __init__(self, container):
            self._container = container

        def mux(self, packet):
            if not muxed:
                signal.setitimer(signal.ITIMER_REAL, 0.05)
            muxed.append(packet.pts)
            self._container.mux(packet)

        def __getattr__(self, name):
            return getattr(self._container, name)

    writer.write([FrameRecord(index=i, pts=i, time_base=info.time_base, image=torch.from_numpy(image))
                  for i, image in enumerate(noise)])
    assert not muxed   # all held for the lookahead
    writer.container = Counting(writer.container)

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(_Interrupted):
            writer.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert 0 < len(muxed) < count and writer.container is None, len(muxed)


def test_nvdec_decodes_on_the_renders_gpu(tmp_path, monkeypatch):
    """decode.decoder=nvdec with device=cuda:1 decoded on GPU 0 (FFmpeg's h264_cuvid default), giving another job's
    GPU a CUDA context and the decoding work. The decoder is now told the render's GPU (its `gpu` option); a CPU
    render leaves FFmpeg's pick. Here a software h264 context stands in for h264_cuvid, which needs a GPU to open."""
    import pipeline.decode as decode

    from tests.helpers_video import write_clip

    path = write_clip(tmp_path / "clip.mp4", [np.full((48, 64, 3), 40 * i, dtype=np.uint8) for i in range(3)])
    opened = []
    create = av.CodecContext.create
    monkeypatch.setattr(decode.av.CodecContext, "create",
                        lambda name, mode: opened.append(create("h264", mode)) or opened[-1])
    with av.open(str(path)) as container:
        frames = list(decode._decode_frames(container, container.streams.video[0], path, "h264_cuvid",
                                            decode._decoder_gpu(torch.device("cuda:1"))))
    assert len(frames) == 3 and opened[0].options == {"gpu": "1"}
    assert decode._decoder_gpu(torch.device("cpu")) is None
