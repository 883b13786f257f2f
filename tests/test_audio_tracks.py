"""Audio through VideoWriter, read back by plain PyAV: every track kept in order with its language, copied where the
output container holds the codec (and plays it), re-encoded to AAC where it does not, with its start time kept."""
from __future__ import annotations

import av
import pytest

from pipeline.decode import VideoReader
from pipeline.encode import VideoWriter
from pipeline.errors import EncoderError
from tests.helpers_video import Tone, audio_tracks, pattern_frames, read_frames, tone_frequency, write_clip

X264 = {"codec": "libx264", "crf": 18, "preset": "ultrafast", "pix_fmt": "yuv420p"}


def render_audio(source, output) -> None:
    """The input's frames as they are, through the writer (the audio comes from the input file)."""
    reader = VideoReader(source, batch_size=4)
    writer = VideoWriter(output, reader.info, X264)
    try:
        for batch in reader:
            writer.write(batch)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def assert_same_sound(source_track, output_track, *, start_s: float = 0.03, end_s: float = 0.06) -> None:
    """Channels, pitch, start and end survive (a re-encode adds up to an AAC frame of priming and padding)."""
    assert output_track.channels == source_track.channels
    assert tone_frequency(output_track.samples, output_track.rate) == pytest.approx(
        tone_frequency(source_track.samples, source_track.rate), abs=5)
    assert output_track.start == pytest.approx(source_track.start, abs=start_s)
    assert output_track.end == pytest.approx(source_track.end, abs=end_s)


def clip_with(tmp_path, name: str, *tones: Tone, frames: int = 24, **kw):
    return write_clip(tmp_path / name, pattern_frames(frames, 64, 48), audio=list(tones), **kw)


@pytest.mark.parametrize("name, tone, suffix", [
    ("mp3.mkv", Tone("libmp3lame", 44100, "stereo", seconds=0.3), ".m4v"),
    ("opus.mkv", Tone("libopus", 48000, "mono", seconds=0.3), ".m4v"),
    ("flac.mkv", Tone("flac", 44100, "stereo", seconds=0.3), ".m4v"),
    ("wavpack.mkv", Tone("wavpack", 44100, "stereo", seconds=0.3), ".mov"),
    # listed by the mov muxer, written only in MP4 mode: "cannot start writing .mov output (Invalid argument)"
    ("opus.mkv", Tone("libopus", 48000, "mono", seconds=0.3), ".mov"),
    ("flac.mkv", Tone("flac", 44100, "stereo", seconds=0.3), ".mov"),
], ids=["mp3-m4v", "opus-m4v", "flac-m4v", "wavpack-mov", "opus-mov", "flac-mov"])
def test_audio_ending_before_the_video_is_reencoded_once(tmp_path, capfd, name, tone, suffix):
    """The encoder was flushed when the audio ran out, then again for the next frame: av.error.EOFError."""
    source = clip_with(tmp_path, name, tone)
    output = tmp_path / f"out{suffix}"
    render_audio(source, output)
    (before,), (after,) = audio_tracks(source), audio_tracks(output)
    assert after.codec == "aac"
    assert_same_sound(before, after)
    assert len(read_frames(output)[0]) == 24
    err = capfd.readouterr().err
    assert f"audio track 1 ({before.codec}) cannot go into {suffix}: re-encoding it as AAC" in err
    assert "ipod" not in err


@pytest.mark.parametrize("name, tone, suffix", [
    ("u8.avi", Tone("pcm_u8", 22050, "stereo"), ".mp4"),
    ("mulaw.avi", Tone("pcm_mulaw", 8000, "mono"), ".mp4"),
    ("adpcm.avi", Tone("adpcm_ima_wav", 22050, "stereo"), ".mp4"),
    ("pcm.mkv", Tone("pcm_s16le", 22050, "mono"), ".m4v"),
], ids=["u8-avi", "mulaw-avi", "adpcm-avi", "pcm-mkv"])
def test_pcm_without_a_channel_mask_is_reencoded(tmp_path, name, tone, suffix):
    """AVI / Matroska PCM has "2 channels", no named layout: the AAC encoder refused it, blamed on libx264."""
    source = clip_with(tmp_path, name, tone, codec="mpeg4" if name.endswith(".avi") else "libx264")
    (before,) = audio_tracks(source)
    output = tmp_path / f"out{suffix}"
    render_audio(source, output)
    (after,) = audio_tracks(output)
    assert after.codec == "aac"
    assert_same_sound(before, after)


def test_reencoded_audio_keeps_its_start_time(tmp_path):
    """mp3 audio from 1.0 s on came out from 0.0 s on: frame.pts was dropped before the AAC encoder."""
    source = clip_with(tmp_path, "late.mkv", Tone("libmp3lame", 44100, "stereo", seconds=1.0, start=1.0), frames=48)
    (before,) = audio_tracks(source)
    assert before.start > 0.9
    render_audio(source, tmp_path / "out.m4v")
    (after,) = audio_tracks(tmp_path / "out.m4v")
    assert_same_sound(before, after)


def test_every_audio_track_is_kept_in_order_with_its_language(tmp_path):
    """Only the first audio track came through; the others were dropped without a word."""
    source = clip_with(tmp_path, "two.mkv", Tone("aac", 48000, "stereo", language="eng"),
                       Tone("aac", 16000, "mono", freq=880, language="fre"), Tone("libopus", 48000, "mono", freq=660))
    before = audio_tracks(source)
    render_audio(source, tmp_path / "out.mkv")
    after = audio_tracks(tmp_path / "out.mkv")
    assert [(t.codec, t.channels, t.rate, t.language) for t in after] == [
        (t.codec, t.channels, t.rate, t.language) for t in before]
    for old, new in zip(before, after):
        assert new.samples.shape == old.samples.shape  # copied packet for packet
        assert_same_sound(old, new, start_s=1e-3, end_s=1e-3)


def test_several_tracks_are_each_reencoded_where_the_container_needs_it(tmp_path, capfd):
    source = clip_with(tmp_path, "mixed.mkv", Tone("aac", 48000, "stereo", language="eng"),
                       Tone("libmp3lame", 44100, "mono", freq=880, language="ger"))
    before = audio_tracks(source)
    render_audio(source, tmp_path / "out.m4v")
    after = audio_tracks(tmp_path / "out.m4v")
    assert [(t.codec, t.language) for t in after] == [("aac", "eng"), ("aac", "ger")]
    for old, new in zip(before, after):
        assert_same_sound(old, new)
    err = capfd.readouterr().err
    assert "audio track 2 (mp3) cannot go into .m4v" in err and "audio track 1" not in err


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_pcm_is_reencoded_for_the_mp4_family(tmp_path, capfd, suffix):
    """PCM was copied into .mp4 as "ipcm", which many players cannot play."""
    source = clip_with(tmp_path, "pcm.mkv", Tone("pcm_s16le", 48000, "stereo"))
    (before,) = audio_tracks(source)
    render_audio(source, tmp_path / f"out{suffix}")
    (after,) = audio_tracks(tmp_path / f"out{suffix}")
    assert after.codec == "aac"
    assert_same_sound(before, after)
    err = capfd.readouterr().err
    assert (f"audio track 1 (pcm_s16le) would go into {suffix} as PCM, which few players play: "
            "re-encoding it as AAC") in err


def test_pcm_is_copied_into_mkv(tmp_path):
    source = clip_with(tmp_path, "pcm.mkv", Tone("pcm_s16le", 48000, "stereo"))
    (before,) = audio_tracks(source)
    render_audio(source, tmp_path / "out.mkv")
    (after,) = audio_tracks(tmp_path / "out.mkv")
    assert after.codec == "pcm_s16le" and (after.samples == before.samples).all()


def test_an_audio_encoder_failure_names_the_audio(tmp_path):
    """AAC takes at most 8 channels: the error said "cannot open encoder libx264 ... check its settings"."""
    source = clip_with(tmp_path, "many.mkv", Tone("pcm_s16le", 48000, "7.1.4"), frames=4)
    with pytest.raises(EncoderError) as caught:
        render_audio(source, tmp_path / "out.m4v")
    message = str(caught.value)
    assert "audio track 1" in message and "aac" in message.lower() and "12 channels" in message
    assert "libx264" not in message and "crf" not in message


def test_a_rate_aac_has_no_table_for_is_resampled(tmp_path):
    """AAC stops at 96 kHz: 192 kHz PCM is re-encoded at 48 kHz rather than refused."""
    source = clip_with(tmp_path, "hires.mkv", Tone("pcm_s16le", 192000, "stereo"), frames=6)
    (before,) = audio_tracks(source)
    render_audio(source, tmp_path / "out.mp4")
    (after,) = audio_tracks(tmp_path / "out.mp4")
    assert (after.codec, after.rate) == ("aac", 48000)
    assert_same_sound(before, after)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_audio_is_interleaved_with_the_video_as_it_is_written(tmp_path, suffix):
    """Audio muxed only at the end sat behind every video packet the muxer had to let go of: with one stream
    silent it holds packets back for at most max_interleave_delta (10 s), so on a 12 s clip the video's first
    seconds were written before any sound. A player reading the file in order (a stream over the network) then
    has to seek or buffer the whole clip."""
    source = clip_with(tmp_path, "long.mkv", Tone(), frames=48, fps=4)  # 12 s of video and sound
    output = tmp_path / f"out{suffix}"
    render_audio(source, output)
    with av.open(str(output)) as container:
        packets = [(p.stream.type, float(p.pts * p.time_base), p.pos) for p in container.demux() if p.size]
    first_audio = min(pos for kind, _, pos in packets if kind == "audio")
    video_at_1s = next(pos for kind, time, pos in packets if kind == "video" and time >= 1.0)
    assert first_audio < video_at_1s
