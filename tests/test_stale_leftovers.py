"""What a killed run leaves (SIGKILL, the OOM killer, a power loss skip every clean-up): AtomicOutput's temp files
and the debug dump's hidden folders. Each is flock-ed by its run for its whole life, so the next run that writes the
same target or debug.dir removes those of dead runs and leaves those of live ones."""
from __future__ import annotations

import contextlib
import errno
import io
import subprocess
import sys
from pathlib import Path

import pytest

from common import leftovers
from common.outputs import AtomicOutput, leftover_temp_files
from tests.debug_fixture import write_dump
from tests.helpers_process import as_unprivileged, interruptible_popen, unprivileged_folder

ROOT = Path(__file__).resolve().parents[1]

# The child: writes an AtomicOutput ("file") or a debug dump, prints the temp file or hidden folder it holds once
# it is there ("partial": the dump being written; "replaced": the earlier dump moved aside as the new one is put in
# place), and waits for a line on stdin before it finishes.
DRIVER = """
import shutil
import sys
from pathlib import Path

kind, where = sys.argv[1], Path(sys.argv[2])


def pause(held):
    print(held, flush=True)
    sys.stdin.readline()


if kind == "file":
    from common.outputs import AtomicOutput
    with AtomicOutput(where, overwrite=True) as temp:
        temp.write_bytes(b"half of the child's")
        pause(temp)
        temp.write_bytes(b"the child's")
else:
    from pipeline.debug import DebugDumper
    from tests.debug_fixture import CLASS_NAMES, synthetic_records
    remove_tree = shutil.rmtree

    def rmtree_after_pause(path, *args, **kwargs):
        if kind == "replaced" and path.name.endswith(".replaced"):
            pause(path)
        remove_tree(path, *args, **kwargs)

    shutil.rmtree = rmtree_after_pause
    with DebugDumper(where, CLASS_NAMES, max_side=32, overwrite=True) as dumper:
        dumper.write(synthetic_records(2, 18, 32))
        if kind == "partial":
            pause(dumper.temp_dir)
"""


@contextlib.contextmanager
def holding_child(kind: str, where: Path):
    """The driver's process, and what it holds once it holds it; killed (SIGKILL) if the test leaves it running."""
    process = interruptible_popen([sys.executable, "-c", DRIVER, kind, str(where)], cwd=ROOT, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = process.stdout.readline()
        assert line, f"the child ended before it held anything: {process.communicate(timeout=60)[1]}"
        yield process, Path(line.strip())
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def killed_child_leftover(kind: str, where: Path) -> Path:
    with holding_child(kind, where) as (process, held):
        process.kill()
        process.wait(timeout=60)
    assert held.exists()
    return held


def dump_entries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def test_the_temp_file_of_a_killed_run_goes_with_the_next_write_of_its_target(tmp_path, capsys):
    """A render's temp file (gigabytes, for a long video) stayed beside its output forever after a SIGKILL."""
    target = tmp_path / "out.mp4"
    leftover = killed_child_leftover("file", target)
    with AtomicOutput(target, overwrite=True) as temp:
        temp.write_bytes(b"frames")
    assert not leftover.exists() and target.read_bytes() == b"frames" and not leftover_temp_files(target)
    size = len(b"half of the child's")
    assert capsys.readouterr().err == f"note: removed {leftover} ({size} bytes), left behind by a killed run\n"
    dead_again = tmp_path / ".out.0123abcd.partial.mp4"
    dead_again.write_bytes(b"x")
    with AtomicOutput(target, overwrite=True) as temp:
        temp.write_bytes(b"frames")
    # each write says what it removed: a render's note of its dump's small folder hid its video's gigabytes
    assert capsys.readouterr().err == f"note: removed {dead_again} (1 bytes), left behind by a killed run\n"


def test_a_live_runs_temp_file_stays_and_both_writes_complete(tmp_path, capsys):
    target = tmp_path / "out.mp4"
    with holding_child("file", target) as (process, live):
        dead = tmp_path / ".out.0123abcd.partial.mp4"  # what a killed run leaves: a temp file no one holds
        dead.write_bytes(b"half")
        with AtomicOutput(target, overwrite=True) as temp:
            temp.write_bytes(b"the parent's")
        assert live.exists() and not dead.exists() and target.read_bytes() == b"the parent's"
        _, child_errors = process.communicate("go on\n", timeout=60)
    assert process.returncode == 0 and child_errors == ""
    assert target.read_bytes() == b"the child's" and not leftover_temp_files(target)
    assert capsys.readouterr().err == f"note: removed {dead} (4 bytes), left behind by a killed run\n"


def test_a_temp_file_caught_before_its_lock_is_made_afresh(tmp_path, monkeypatch):
    """Two runs starting at once: one's clean-up can find the other's temp file in the instant between its creation
    and its lock, and remove it as a dead run's; its maker then writes a new one, not into the removed file."""
    target = tmp_path / "out.mp4"
    lock = leftovers._locked_and_still_named
    caught = []

    def another_run_cleans_first(path, fd):
        if not caught:
            caught.extend(leftovers.remove_dead([path]))
        return lock(path, fd)

    monkeypatch.setattr(leftovers, "_locked_and_still_named", another_run_cleans_first)
    with AtomicOutput(target, overwrite=True) as temp:
        temp.write_bytes(b"frames")
        assert len(caught) == 1 and caught[0][0] != temp and temp.exists()
    assert target.read_bytes() == b"frames" and not leftover_temp_files(target)


def test_leftovers_that_cannot_be_removed_stay_without_a_word():
    """A clean-up, not the user's job: a leftover it cannot open, lock or remove is no error and no note."""
    with unprivileged_folder() as folder:
        def write_beside_an_unreadable_leftover():
            stuck = folder / ".out.0123abcd.partial.mp4"
            stuck.write_bytes(b"half")
            stuck.chmod(0)
            errors = io.StringIO()
            with contextlib.redirect_stderr(errors), AtomicOutput(folder / "out.mp4") as temp:
                temp.write_bytes(b"frames")
            return stuck.exists(), (folder / "out.mp4").read_bytes(), errors.getvalue()

        assert as_unprivileged(write_beside_an_unreadable_leftover) == (True, b"frames", "")


@pytest.mark.parametrize("kind", ["partial", "replaced"])
def test_the_hidden_folder_of_a_killed_dump_goes_with_the_next_dump(kind, tmp_path, capsys):
    """A killed render's dump folder (`.{hex}.partial`, or `.{hex}.replaced` holding the dump it was replacing)
    stayed in debug.dir forever, hidden."""
    d = tmp_path / "d"
    if kind == "replaced":
        write_dump(d, n=1, max_side=32)
    leftover = killed_child_leftover(kind, d)
    write_dump(d, n=2, max_side=32, overwrite=kind == "replaced")
    assert dump_entries(d) == ["frames.jsonl", "images", "manifest.json"]
    assert capsys.readouterr().err.startswith(f"note: removed {leftover} (")


@pytest.mark.parametrize("kind", ["partial", "replaced"])
def test_a_live_dumps_hidden_folder_stays_and_both_dumps_complete(kind, tmp_path, capsys):
    d = tmp_path / "d"
    write_dump(d, n=1, max_side=32)
    with holding_child(kind, d) as (process, live):
        dead = d / ".0123abcd.partial"  # what a killed render leaves: a hidden folder no one holds
        (dead / "images").mkdir(parents=True)
        (dead / "frames.jsonl").write_text("{}\n")
        write_dump(d, n=3, max_side=32, overwrite=True)
        assert live.exists() and not dead.exists()
        _, child_errors = process.communicate("go on\n", timeout=60)
    assert process.returncode == 0 and child_errors == ""
    assert dump_entries(d) == ["frames.jsonl", "images", "manifest.json"]
    last = {"partial": 2, "replaced": 3}[kind]  # the child's dump is put in place after the parent's, or before
    assert len((d / "frames.jsonl").read_text().splitlines()) == last
    assert capsys.readouterr().err.startswith(f"note: removed {dead} (")


def test_only_what_atomic_output_makes_is_taken_for_its_leftover(tmp_path, capsys):
    """A folder of the user's named like a temp file, with a run of hex digits, went with the whole of its contents
    (shutil.rmtree), and so did a file with a hex part of another length: AtomicOutput makes files, 8 hex digits."""
    folder = tmp_path / ".out.2024.partial.mp4"
    (folder / "notes.txt").parent.mkdir()
    (folder / "notes.txt").write_text("precious")
    other = tmp_path / ".out.cafe.partial.mp4"
    other.write_bytes(b"not ours")
    with AtomicOutput(tmp_path / "out.mp4") as temp:
        temp.write_bytes(b"frames")
    assert (folder / "notes.txt").read_text() == "precious" and other.read_bytes() == b"not ours"
    assert capsys.readouterr().err == ""


def test_off_a_local_file_system_nothing_is_locked_or_removed(tmp_path, monkeypatch, capsys):
    """Over NFS an exclusive flock on a read-only descriptor fails (EBADF), and since Linux 5.5 a CIFS flock is
    mandatory, failing the writer's own writes through another descriptor: there temps are made unlocked, and no
    leftover is removed (it might be a live run's)."""
    monkeypatch.setattr(leftovers, "_file_system", lambda device: "nfs4")
    locked = []
    monkeypatch.setattr(leftovers.fcntl, "flock", lambda fd, how: locked.append(fd))
    dead = tmp_path / ".out.0123abcd.partial.mp4"
    dead.write_bytes(b"half")
    with AtomicOutput(tmp_path / "out.mp4") as temp:
        temp.write_bytes(b"frames")
    write_dump(tmp_path / "d", n=1, max_side=32)
    assert locked == [] and dead.exists() and (tmp_path / "out.mp4").read_bytes() == b"frames"
    assert capsys.readouterr().err == ""


def test_a_lock_refused_for_a_read_only_descriptor_leaves_the_dump_unlocked(tmp_path, monkeypatch):
    """NFS refuses an exclusive flock on a folder's read-only descriptor with EBADF: the dump failed ("cannot prepare
    debug dir ...: Bad file descriptor"); without a lock it is written, as on any file system without locks."""
    def refuse(fd, how):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(leftovers.fcntl, "flock", refuse)
    write_dump(tmp_path / "d", n=1, max_side=32)
    assert dump_entries(tmp_path / "d") == ["frames.jsonl", "images", "manifest.json"]


def test_the_note_gives_the_total_freed_by_every_leftover(tmp_path, capsys):
    # three killed runs' temp files: the note named the first and "2 more", with the space the three held
    target = tmp_path / "out.mp4"
    dead = [tmp_path / f".out.{hex_}.partial.mp4" for hex_ in ("0000aaaa", "1111bbbb", "2222cccc")]
    for path, size in zip(dead, (1500, 2700, 900)):
        path.write_bytes(b"x" * size)
    with AtomicOutput(target) as temp:
        temp.write_bytes(b"frames")
    # 1500 + 2700 + 900 = 5100 bytes
    assert capsys.readouterr().err == f"note: removed {dead[0]} and 2 more (5.1 kB), left behind by a killed run\n"
    assert not any(path.exists() for path in dead)
