"""Which input the render reads, and whether it read all of it: edit lists, dropped frames and truncated files
against PyAV's own decode, the real video behind a cover picture, and file names Hydra cannot read unquoted."""
from __future__ import annotations

from fractions import Fraction

import av
import pytest

from common.hydra_cli import hydra_readable
from pipeline.decode import VideoReader, probe
from pipeline.errors import AudioOnlyError, TruncatedVideoError
from pipeline import render
from tests.helpers_video import (
    Tone, cover_clip, edit_list_clip, pattern_frames, read_frames, truncated_clip, write_clip,
)
from tests.render_cli import run_render, temp_leftovers, tiny_model_overrides


def decode_all(path) -> tuple[VideoReader, list]:
    reader = VideoReader(path, batch_size=4)
    return reader, [record for batch in reader for record in batch]


def times(records) -> list[Fraction]:
    return [record.pts * record.time_base for record in records]


# -- complete files that the container's frame count said were short --------------------------------------------

def test_a_cut_with_an_edit_list_decodes_what_the_edit_list_shows(tmp_path):
    """`ffmpeg -ss ... -c copy`: the container counts 40 samples, the edit list shows 15; refused as truncated."""
    source = edit_list_clip(tmp_path / "cut.mp4", pattern_frames(40, 64, 48), skip=25)
    with av.open(str(source)) as container:
        assert container.streams.video[0].frames == 40  # what the old check trusted
    oracle, oracle_times = read_frames(source)
    assert len(oracle) == 15
    _, records = decode_all(source)
    assert times(records) == oracle_times


def test_dropped_frames_in_an_avi_are_no_truncation(tmp_path):
    """0-byte chunks for dropped frames: the AVI declares 14 frames, 8 decode."""
    source = write_clip(tmp_path / "gaps.avi", pattern_frames(8, 64, 48), codec="mpeg4",
                        pts=[0, 1, 2, 5, 6, 9, 12, 13], time_base=Fraction(1, 24))
    _, oracle_times = read_frames(source)
    _, records = decode_all(source)
    assert times(records) == oracle_times and len(records) == 8


def test_a_complete_mkv_whose_audio_outlasts_its_video_is_not_truncated(tmp_path):
    """The container's duration is the audio's here: only the video stream's own duration may judge it."""
    source = write_clip(tmp_path / "long_audio.mkv", pattern_frames(12, 64, 48), audio=[Tone(seconds=2.0)])
    _, records = decode_all(source)
    assert len(records) == 12


# -- files that really end early ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_a_truncated_mkv_is_refused_after_the_last_frame(tmp_path, suffix):
    """Matroska counts no frames, but states the stream's duration: 5 of 20 frames rendered with exit 0."""
    codec = {".webm": "libvpx-vp9"}.get(suffix, "libx264")
    source = truncated_clip(tmp_path / f"trunc{suffix}", pattern_frames(20, 64, 48), codec=codec)
    decodable, _ = read_frames(source)
    assert 0 < len(decodable) < 16
    reader = VideoReader(source, batch_size=4)
    with pytest.raises(TruncatedVideoError, match=f"trunc{suffix} is truncated: its video stops at"):
        list(reader)
    assert reader.frames_read == len(decodable)


# -- the real video behind a cover picture -------------------------------------------------------------------------

def test_a_still_picture_before_the_video_is_skipped(tmp_path):
    """Stream 0 a one-frame mjpeg still, stream 1 the H.264 video: the render drew the still only."""
    frames = pattern_frames(8, 64, 48)
    source = cover_clip(tmp_path / "cover.mkv", frames, attached=False, audio=True)
    oracle, oracle_times = read_frames(source, stream_index=1)
    info = probe(source)
    assert (info.width, info.height, info.codec, info.has_audio) == (64, 48, "h264", True)
    _, records = decode_all(source)
    assert len(records) == len(oracle) == 8 and times(records) == oracle_times


def test_cover_art_alone_is_no_video(tmp_path):
    """An audio file with cover art (an attached picture) rendered its one picture as a one-frame video."""
    source = cover_clip(tmp_path / "song.mp4", [], attached=True, audio=[Tone(seconds=0.5)])
    with av.open(str(source)) as container:
        assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
    with pytest.raises(AudioOnlyError, match="song.mp4 holds only audio"):
        probe(source)


# -- file names Hydra's override grammar cannot read unquoted --------------------------------------------------

@pytest.mark.parametrize("name", [
    "ünï cødé ñame 🎬.mp4", "日本語.mp4", "it's (1) [final].mp4", "a\\'b.mp4", "end\\", "x\\${y}.mp4", "~tilde;#&!.mp4",
    "with=equals,comma.mp4",
])
def test_paths_hydra_cannot_read_are_quoted_and_arrive_unchanged(name):
    path = f"/tmp/dir é/{name}"
    args = hydra_readable([f"input={path}", f"output={path}.mkv", f"debug.dir={path}_dump", "batch_size=2"],
                          render.PATH_KEYS)
    cfg = render.compose_config(args)
    assert (cfg.input, cfg.output, cfg.debug.dir, cfg.batch_size) == (path, f"{path}.mkv", f"{path}_dump", 2)


def test_readable_values_and_sweeps_are_left_alone():
    args = ["-m", "input=/tmp/plain.mp4", "output='/tmp/quoted é.mp4'", "input=a.mp4,b.mp4", "debug.dir=${output}_x"]
    assert hydra_readable(args, render.PATH_KEYS) == args


def test_render_reads_and_writes_non_ascii_paths(tmp_path):
    """LexerNoViableAltException for input=/tmp/ünï.mp4: quoting by hand was the only way."""
    folder = tmp_path / "vidéos 日本"
    folder.mkdir()
    source = write_clip(folder / "ünï cødé ñame 🎬 (1).mp4", pattern_frames(4, 64, 48))
    output = folder / "sortie ✓.mkv"
    dump = folder / "débogage 🐞"
    models = tiny_model_overrides(tmp_path / "models")
    result = run_render([f"input={source}", f"output={output}", "debug.dump=true", f"debug.dir={dump}", *models],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"output: {output}" in result.stdout
    written, _ = read_frames(output)
    assert len(written) == 4 and (dump / "frames.jsonl").is_file()
    assert not temp_leftovers(folder)
