"""Safe output files: refuse dangerous targets up front, write to a temp file beside the target, rename on success.

A failed or interrupted run leaves neither a partial output nor a stray temp file, and never touches the input.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from common.errors import OutputError


def check_output(output: str | Path, input: str | Path | None = None, overwrite: bool = False,
                 suffixes: tuple[str, ...] = (), kind: str = "file type") -> Path:
    """The absolute target path, after refusing: the input itself, an existing file without `overwrite`,
    a folder, a suffix not in `suffixes` (a `kind` of file; none: any), and a folder that cannot be made or
    written to."""
    target = Path(output).expanduser().absolute()
    if input is not None and _same_file(Path(input).expanduser().absolute(), target):
        raise OutputError(f"output {target} is the input file: choose another output path")
    if target.is_dir():
        example = target / ("out" + (suffixes or (".mp4",))[0])
        raise OutputError(f"output {target} is a folder: give a file name such as {example}")
    if suffixes and target.suffix.lower() not in suffixes:
        raise OutputError(f"output {target.name}: unknown {kind} '{target.suffix}', use one of {', '.join(suffixes)}")
    if target.exists() and not overwrite:
        raise OutputError(f"output {target} already exists: pass overwrite=true to replace it")
    _check_folder_can_be_made(target.parent)
    return target


def _check_folder_can_be_made(folder: Path) -> None:
    """Without making it (AtomicOutput does, when it writes): a run refused later leaves no empty folders."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output folder {existing} (permission denied)")


class AtomicOutput:
    """`with AtomicOutput(target) as tmp:` write to `tmp`; on a clean exit it is renamed to `target`,
    on any exception (Ctrl-C included) it is deleted."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.temp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.temp = _new_file_beside(self.target)
        except OSError as e:
            raise OutputError(f"cannot write to output folder {self.target.parent} ({e.strerror or e})") from e
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._commit()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _commit(self) -> None:
        if self.overwrite:
            os.replace(self.temp, self.target)
            return
        appeared = f"output {self.target} appeared while it was being written: pass overwrite=true to replace it"
        try:  # link-then-unlink refuses, atomically, a target that appeared while we were writing
            os.link(self.temp, self.target)
        except FileExistsError as e:
            raise OutputError(appeared) from e
        except OSError:  # file systems without hard links
            if self.target.exists():
                raise OutputError(appeared)
            os.replace(self.temp, self.target)
            return
        self.temp.unlink()

    def _discard(self) -> None:
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


def leftover_temp_files(target: str | Path) -> list[Path]:
    """The temp files of `target`'s AtomicOutput that a killed process left behind (SIGKILL skips the clean-up)."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.stem}.*.partial{target.suffix}"))


def _new_file_beside(target: Path) -> Path:
    """A new empty file in `target`'s folder, so that the final rename is atomic, with `target`'s suffix, so that
    muxers and image writers recognise the format. Mode 0666 lets the umask give it the permissions of any other
    new file (mkstemp's 0600 hid results from the rest of a team); O_EXCL never opens someone else's file."""
    while True:
        temp = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.partial{target.suffix}")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
