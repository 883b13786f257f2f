"""common/outputs.py on its own: what check_output refuses and what it leaves on disk before anything is written."""
from __future__ import annotations

import os
import re
import signal

import pytest

from common.errors import OutputError
from common.leftovers import MAKE_ATTEMPTS, new_held
from common import outputs
from common.outputs import AtomicOutput, check_output, leftover_temp_files
from tests.helpers_process import as_unprivileged, stop_after, then_signal, unprivileged_folder


def test_a_refused_run_leaves_no_empty_folders(tmp_path):
    """check_output made the output's folders up front, so a run refused after it (a missing style image, an input
    that is not a video) left them behind; AtomicOutput makes them when it writes."""
    target = check_output(tmp_path / "new" / "deeper" / "out.mp4")
    assert target == tmp_path / "new" / "deeper" / "out.mp4" and not (tmp_path / "new").exists()
    with AtomicOutput(target) as temp:
        assert leftover_temp_files(target) == [temp]
        temp.write_bytes(b"frames")
    assert target.read_bytes() == b"frames" and not leftover_temp_files(target)


def test_a_file_in_the_way_of_the_folder_is_named(tmp_path):
    (tmp_path / "flat.mp4").write_text("")
    with pytest.raises(OutputError, match=f"cannot create output folder .*: {tmp_path / 'flat.mp4'} is a file"):
        check_output(tmp_path / "flat.mp4" / "sub" / "x.mp4")


def test_a_folder_that_is_a_link_to_nowhere_is_named(tmp_path):
    """It was passed over for the folder above it, and making the temp file in it then looped for ever, deaf to
    Ctrl-C (the stop signals are held while the temp file is made)."""
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for output in (tmp_path / "dangling" / "x.mp4", tmp_path / "dangling" / "sub" / "x.mp4"):
        with pytest.raises(OutputError, match=re.escape(f"cannot create output folder {output.parent}: "
                                                        f"{tmp_path / 'dangling'} is a link to {tmp_path / 'gone'}, "
                                                        "which does not exist")):
            check_output(output)


def test_a_folder_where_no_file_can_be_made_is_an_error_not_a_loop(tmp_path):
    """/proc is a folder root may write to by its permissions, where every new name is ENOENT: the temp file's
    making retried for ever."""
    with pytest.raises(OutputError, match=re.escape("cannot write to output folder /proc (No such file or directory)")):
        with AtomicOutput(check_output("/proc/out.mp4")):
            pass
    tries = []
    def always_missing(path):
        tries.append(path)
        raise FileNotFoundError(path)
    with pytest.raises(FileNotFoundError):
        new_held(lambda: tmp_path / f"t{len(tries)}", always_missing)
    assert len(tries) == MAKE_ATTEMPTS


def test_a_read_only_folder_is_refused_up_front():
    with unprivileged_folder() as folder:
        locked = folder / "locked"
        locked.mkdir(mode=0o555)
        # the same user may write beside it: only the folder's permissions refuse it
        assert as_unprivileged(lambda: check_output(folder / "new" / "out.mp4")) == folder / "new" / "out.mp4"
        refusal = re.escape(f"cannot write to output folder {locked} (permission denied)")
        with pytest.raises(OutputError, match=refusal):
            as_unprivileged(lambda: check_output(locked / "new" / "out.mp4"))


def test_a_dangling_link_at_the_output_is_an_existing_output(tmp_path):
    """A link to nowhere passed as no output at all: the whole render ran, then failed on it ("appeared while it was
    being written"). It is refused up front; with overwrite the link itself is replaced, nothing written through it."""
    link = tmp_path / "out.mp4"
    link.symlink_to(tmp_path / "elsewhere" / "target.mp4")
    with pytest.raises(OutputError, match=f"output {link} already exists: pass overwrite=true"):
        check_output(link)
    with AtomicOutput(check_output(link, overwrite=True), overwrite=True) as temp:
        temp.write_bytes(b"frames")
    assert not link.is_symlink() and link.read_bytes() == b"frames" and not (tmp_path / "elsewhere").exists()


def test_a_failed_write_takes_away_the_folders_it_made(tmp_path):
    """Only the empty ones it made: an existing folder stays, and so does one that something else wrote into."""
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(target) as temp:
            temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list((tmp_path / "kept").iterdir()) == []
    with pytest.raises(RuntimeError):
        with AtomicOutput(target):
            (tmp_path / "kept" / "new" / "notes.txt").write_text("someone else's")
            raise RuntimeError("encoder failed")
    assert sorted(p.name for p in (tmp_path / "kept" / "new").iterdir()) == ["notes.txt"]


def test_an_interrupt_at_the_rename_comes_after_it(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C right after the rename raised between it and the record of it, so the program could not tell that the
    output was in place ("no output written"). It is held back until the rename is recorded, then raised."""
    monkeypatch.setattr(outputs.os, "replace", then_signal(os.replace))
    output = AtomicOutput(tmp_path / "out.mp4", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        with output as temp:
            temp.write_bytes(b"frames")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert output.committed and (tmp_path / "out.mp4").read_bytes() == b"frames"
    assert not leftover_temp_files(tmp_path / "out.mp4")


def test_an_interrupt_as_the_temp_file_is_made_leaves_neither_it_nor_its_folder(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C between the temp file's creation and its record left new/.out.*.partial.mp4 (and new/) behind a render
    that said "no output written"."""
    monkeypatch.setattr(outputs, "_new_file_beside", then_signal(outputs._new_file_beside))
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(tmp_path / "new" / "out.mp4"):
            pytest.fail("the block ran after the interrupt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("when", ["as it begins", "half-way"])
def test_a_second_interrupt_during_the_clean_up_waits_for_it(when, tmp_path, monkeypatch, ctrl_c):
    """A second Ctrl-C as the clean-up began left the half-written temp file (2.5 KB for a render, a 91 MB
    .last.*.partial.pt for segment.train); one after the temp file's removal left the folders made for it."""
    if when == "as it begins":
        discard = AtomicOutput._discard

        def interrupted_discard(self):
            os.kill(os.getpid(), signal.SIGINT)
            discard(self)

        monkeypatch.setattr(AtomicOutput, "_discard", interrupted_discard)
    else:
        stop_after(monkeypatch, outputs.Path, "unlink", lambda path: path.name.endswith(".partial.mp4"))
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(tmp_path / "new" / "deeper" / "out.mp4") as temp:
            temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_stop_during_torch_save_is_a_stop_not_a_zip_error(tmp_path, monkeypatch):
    """A signal mid-write makes torch's zip writer fail as it closes ("unexpected pos"): that RuntimeError hid the
    KeyboardInterrupt, so a stopped export printed a traceback and exit 1. Other errors of torch.save stay as they
    are."""
    import torch

    from common import torch_save

    def interrupted_save(obj, file):
        file.write(b"PK\x03\x04 part of a zip")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 200640 vs 200592")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        torch_save.atomic_save({"w": 1}, tmp_path / "out" / "model.pt")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(torch, "save", lambda obj, file: (_ for _ in ()).throw(RuntimeError("disk quirk")))
    with pytest.raises(RuntimeError, match="disk quirk"):
        torch_save.atomic_save({"w": 1}, tmp_path / "model.pt")


def test_a_targets_temp_files_are_found_by_name(tmp_path):
    """The glob `.out.*.partial.mp4` took out.take2.mp4's temp files for out.mp4's (the trainings removed them with
    their own), and a `[` in a name made it match nothing."""
    own, another_targets, bracketed = (tmp_path / name for name in (
        ".out.0123abcd.partial.mp4", ".out.take2.0123abcd.partial.mp4", ".take[1].0123abcd.partial.mp4"))
    for temp in (own, another_targets, bracketed):
        temp.write_bytes(b"half")
    assert leftover_temp_files(tmp_path / "out.mp4") == [own]
    assert leftover_temp_files(tmp_path / "take[1].mp4") == [bracketed]
    assert leftover_temp_files(tmp_path / "missing" / "out.mp4") == []


def test_a_folder_at_the_output_is_refused_even_with_overwrite(tmp_path):
    # os.replace of a file over a folder fails only once the whole render has run (IsADirectoryError)
    folder = tmp_path / "clips.mp4"
    folder.mkdir()
    refusal = re.escape(f"output {folder} is a folder: give a file name such as {folder / 'out.mp4'}")
    with pytest.raises(OutputError, match=refusal):
        check_output(folder, overwrite=True, suffixes=(".mp4", ".mkv"))
    assert list(folder.iterdir()) == []


def test_a_suffix_is_known_in_capitals(tmp_path):
    # a camera's CLIP.MP4 is an .mp4: muxers and image writers take the suffix in any case
    assert check_output(tmp_path / "CLIP.MP4", suffixes=(".mp4", ".mkv")) == tmp_path / "CLIP.MP4"
    refusal = re.escape("output CLIP.AVI: unknown file type '.AVI', use one of .mp4, .mkv")
    with pytest.raises(OutputError, match=refusal):
        check_output(tmp_path / "CLIP.AVI", suffixes=(".mp4", ".mkv"))


def test_an_output_has_the_permissions_of_any_new_file(tmp_path):
    """mkstemp's 0600 stayed on the renamed output: results hidden from the rest of a team. 0666 less the umask, as
    open(..., "w") gives."""
    for umask, mode in ((0o002, 0o664), (0o027, 0o640)):
        before = os.umask(umask)
        try:
            with AtomicOutput(tmp_path / f"out{umask:o}.mp4") as temp:
                temp.write_bytes(b"frames")
        finally:
            os.umask(before)
        assert os.stat(tmp_path / f"out{umask:o}.mp4").st_mode & 0o777 == mode


@pytest.mark.parametrize("disposition", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
def test_held_stop_signals_leave_the_operating_systems_own_alone(disposition):
    """Under nohup SIGHUP is ignored: held and then run, that SIG_IGN was called as a handler (TypeError), and a
    SIG_DFL one would have been raised as Python code instead of ending the process as the OS does."""
    before = signal.signal(signal.SIGHUP, disposition)
    try:
        with outputs.HeldStopSignals():
            if disposition is signal.SIG_IGN:  # SIG_DFL would end the test run
                os.kill(os.getpid(), signal.SIGHUP)
            assert signal.getsignal(signal.SIGHUP) is disposition
        assert signal.getsignal(signal.SIGHUP) is disposition
    finally:
        signal.signal(signal.SIGHUP, before)
