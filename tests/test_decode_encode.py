"""VideoReader / VideoWriter against plain PyAV as the oracle: exact pixels through lossless codecs, timestamps,
rotation, odd sizes, 10-bit input and audio."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.decode import VideoReader
from pipeline.encode import VideoWriter
from tests.helpers_video import (
    audio_summary, lossless_clip, pattern_frames, psnr, read_frames, ten_bit_clip, write_clip,
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
