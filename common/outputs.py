"""Safe output files: refuse dangerous targets up front, write to a temp file beside the target, rename on success.

A failed or interrupted run leaves neither a partial output, nor a stray temp file, nor the folders made for them,
and never touches the input. A killed one (SIGKILL, the OOM killer, a power loss) cannot clean up: a later write of
the same target removes its temp file, never a live run's (common/leftovers.py).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import OutputError
from common.leftovers import new_held, note_removed_leftovers, remove_dead
from common.signals import STOP_SIGNALS


def check_output(output: str | Path, input: str | Path | None = None, overwrite: bool = False,
                 suffixes: tuple[str, ...] = (), kind: str = "file type") -> Path:
    """The absolute target path, after refusing: the input itself, an existing file without `overwrite`,
    a folder, a suffix not in `suffixes` (a `kind` of file; none: any), and a folder that cannot be made or
    written to."""
    target = Path(output).expanduser().absolute()
    if input is not None and same_file(input, target):
        raise OutputError(f"output {target} is the input file: choose another output path")
    if target.is_dir():
        example = target / ("out" + (suffixes or (".mp4",))[0])
        raise OutputError(f"output {target} is a folder: give a file name such as {example}")
    if suffixes and target.suffix.lower() not in suffixes:
        raise OutputError(f"output {target.name}: unknown {kind} '{target.suffix}', use one of {', '.join(suffixes)}")
    if os.path.lexists(target) and not overwrite:  # a dangling link too: the final link would fail on it
        raise OutputError(f"output {target} already exists: pass overwrite=true to replace it")
    _check_folder_can_be_made(target.parent)
    return target


def _check_folder_can_be_made(folder: Path) -> None:
    """Without making it (AtomicOutput does, when it writes): a run refused later leaves no empty folders."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():  # was passed over, and making the temp file looped for ever
        raise OutputError(f"cannot create output folder {folder}: {existing} is a link to {os.readlink(existing)}, "
                          "which does not exist")
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output folder {existing} (permission denied)")


class AtomicOutput:
    """`with AtomicOutput(target) as tmp:` write to `tmp`; on a clean exit it is renamed to `target`,
    on any exception (Ctrl-C included) it is deleted, with the folders it made for it.

    `committed` turns true with the rename, with no interrupt between them (on the main thread): a program that
    is stopped right after the rename can tell that its output is in place. The stop signals are held back across
    the set-up and the clean-up too: one that came between a temp file's creation and its record, or a second
    Ctrl-C during the clean-up, left the temp file behind.

    `clean_leftovers`: first remove the temp files of `target` that dead runs left (`remove_dead`); off where the
    folder is this run's own and new (the debug dump's images: a listing per image would grow with the dump)."""

    def __init__(self, target: str | Path, overwrite: bool = False, clean_leftovers: bool = True):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.clean_leftovers = clean_leftovers
        self.temp: Path | None = None
        self.committed = False
        self._made: list[Path] = []  # the folders __enter__ made, deepest first
        self._hold: int | None = None  # the temp file's flock-ed descriptor, open until the rename or the clean-up

    def __enter__(self) -> Path:
        try:
            with HeldStopSignals():  # one that came meanwhile is raised here, with the temp file known to _discard
                make_folders(self.target.parent, self._made)
                if self.clean_leftovers:
                    note_removed_leftovers(remove_dead(leftover_temp_files(self.target)))
                self.temp, self._hold = _new_file_beside(self.target)
        except BaseException as e:  # Ctrl-C too: no __exit__ follows a failed __enter__
            self._discard()
            if isinstance(e, OSError):
                raise OutputError(f"cannot write to output folder {self.target.parent} ({e.strerror or e})") from e
            raise
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> None:
        # held from the start, not only inside _discard: a second signal as the clean-up begins skipped all of it
        with HeldStopSignals():
            if exc_type is not None:
                self._discard()
                return
            try:
                self._place()
            except BaseException:
                self._discard()
                raise
            self.committed = True
            self._release()  # only now: before the rename, a clean-up of another run could take the temp file
            self._made = []
            record_output(self.target)

    def _place(self) -> None:
        if self.overwrite:  # a link at the target is replaced itself, never written through
            os.replace(self.temp, self.target)
            return
        appeared = f"output {self.target} appeared while it was being written: pass overwrite=true to replace it"
        try:  # link-then-unlink refuses, atomically, a target that appeared while we were writing
            os.link(self.temp, self.target)
        except FileExistsError as e:
            raise OutputError(appeared) from e
        except OSError:  # file systems without hard links
            if os.path.lexists(self.target):
                raise OutputError(appeared)
            os.replace(self.temp, self.target)
            return
        self.temp.unlink()

    def _discard(self) -> None:
        with HeldStopSignals():  # all of it: a second Ctrl-C half-way left the folders, or the temp file
            if self.temp is not None:
                self.temp.unlink(missing_ok=True)
            self._release()
            remove_made_folders(self._made)

    def _release(self) -> None:
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None


def remove_made_folders(made: list[Path]) -> None:
    """Removes the folders `make_folders` made (deepest first) while they are empty, and empties `made`."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: it stays, and so do the folders above it
            break
    made.clear()


def make_folders(folder: Path, made: list[Path]) -> None:
    """Makes `folder` and its missing parents, putting each one made here at the front of `made` as it is made (one
    that another process made at the same time is not ours to remove; those made before an error are listed)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        made.insert(0, folder)


# The lists that `recording_outputs` blocks fill; any thread records (the debug dump writes on workers)
_records: list[list[Path]] = []


@contextmanager
def recording_outputs() -> Iterator[list[Path]]:
    """The list of the targets put in place while the block runs, in order: every AtomicOutput's, and what
    `record_output` is told of. What a stopped command can truthfully say it wrote (common.arguments)."""
    record: list[Path] = []
    _records.append(record)
    try:
        yield record
    finally:
        _records[:] = [other for other in _records if other is not record]


def record_output(path: str | Path) -> None:
    """`path` is in place, written without AtomicOutput (appended to, a folder renamed into place)."""
    target = Path(path).absolute()
    for record in tuple(_records):
        record.append(target)


class HeldStopSignals:
    """Holds back the Python handlers of the stop signals for a block (on the main thread, the only one that runs
    them; elsewhere it does nothing), then runs them for the signals that came meanwhile. Swapping the handlers, not
    blocking the signals with pthread_sigmask: a signal blocked in the main thread is taken by any other thread
    (torch's, tqdm's), and the main thread still runs its handler at once. A signal whose handler is the
    operating system's (SIG_DFL, SIG_IGN) is left to it."""

    def __init__(self) -> None:
        self.held = False
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}
        self.handler = self._handle  # one bound method, so that `getsignal(...) is self.handler` can find it

    def _handle(self, signum: int, frame) -> None:
        if self.held:
            self.pending.append(signum)
        else:  # came while the handlers were being put back
            self.previous[signum](signum, frame)

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.held = True
        for signum in STOP_SIGNALS:
            if callable(signal.getsignal(signum)):
                self.previous[signum] = signal.signal(signum, self.handler)

    def __exit__(self, *_) -> None:
        self.held = False
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) is self.handler:
                signal.signal(signum, handler)
        for signum in dict.fromkeys(self.pending):
            self.previous[signum](signum, None)


def leftover_temp_files(target: str | Path) -> list[Path]:
    """The temp files of `target`'s AtomicOutputs: a killed process's leftovers (SIGKILL skips the clean-up), and
    those being written (`remove_dead` tells them apart). By name, not by glob: `.{stem}.*` matched the temp files
    of `{stem}.more.suffix` too, and a `[` in the stem matched nothing."""
    target = Path(target)
    try:
        names = os.listdir(target.parent)
    except OSError:  # no folder (yet), or one that cannot be read: no temp file can be found there
        return []
    return sorted(target.parent / name for name in names
                  if (written_for := temp_target(name)) is not None and written_for.name == target.name)


# `_new_file_beside`'s names: .{target's stem}.{hex}.partial{target's suffix}
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.[0-9a-f]{8}\.partial(?P<suffix>(\.[^.]*)?)$")


def temp_target(path: str | Path) -> Path | None:
    """The target that `path`, a temp file of AtomicOutput, is written for (what a user named, for messages; what
    a killed run's leftover belongs to); None where `path` is no such temp file."""
    path = Path(path)
    match = _TEMP_NAME.match(path.name)
    return path.with_name(match["stem"] + match["suffix"]) if match else None


def _new_file_beside(target: Path) -> tuple[Path, int]:
    """A new empty file in `target`'s folder, so that the final rename is atomic, with `target`'s suffix, so that
    muxers and image writers recognise the format, and its held descriptor (`new_held`). Mode 0666 lets the umask
    give it the permissions of any other new file (mkstemp's 0600 hid results from the rest of a team); O_EXCL never
    opens someone else's file."""
    return new_held(lambda: target.with_name(f".{target.stem}.{secrets.token_hex(4)}.partial{target.suffix}"),
                    lambda temp: os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def same_file(a: str | Path, b: str | Path) -> bool:
    """The same file by resolved path (symlinks) or by identity (hard links, bind mounts)."""
    a, b = Path(a).expanduser().absolute(), Path(b).expanduser().absolute()
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
