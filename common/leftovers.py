"""Temp files and folders that tell a killed run's leftovers from a live run's.

A killed run (SIGKILL, the OOM killer, a power loss) cannot clean up after itself: its hidden temp file beside an
output (a render's can be gigabytes), or the debug dump's hidden folder, stays. Each is therefore `flock`-ed by its
maker for its whole life (`new_held`); a later run that writes the same target removes those whose lock it can take
without waiting (`remove_dead`): their maker is gone, and its lock went with it.

Only on a local file system: over NFS an exclusive flock needs a descriptor open for writing, and since Linux 5.5 a
CIFS / SMB flock is a mandatory lock there, which would fail the writer's own writes through another descriptor
(flock(2), "NFS details", "CIFS details"). Elsewhere temps are made unlocked and nothing is removed: leftovers stay,
as they did before this clean-up existed.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

# file systems whose flock is advisory and local to this machine (statfs names, as /proc/self/mountinfo gives them)
LOCAL_FILE_SYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs", "jfs",
                      "reiserfs", "bcachefs", "nilfs2"}
# flock's errors where a file system does not lock after all
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EBADF}
MAKE_ATTEMPTS = 100  # new_held's tries: a random name taken, or removed by a clean-up, that often is no race


def new_held(new_name: Callable[[], Path], make: Callable[[Path], int]) -> tuple[Path, int]:
    """A new temp file or folder, named by `new_name` and made by `make`, which returns a descriptor of it; on a local
    file system that descriptor holds an exclusive flock, which marks it as a live run's for as long as it stays open
    (close it only once the temp is gone or renamed into place). A name taken, or a temp that another run's
    `remove_dead` caught in the instant between its making and its lock, is made afresh, MAKE_ATTEMPTS times at
    most: a folder where nothing can be made (/proc) answers FileNotFoundError every time."""
    for attempt in range(1, MAKE_ATTEMPTS + 1):
        path = new_name()
        try:
            fd = make(path)
        except (FileExistsError, FileNotFoundError):  # the name taken; the folder made, then removed by a clean-up
            if attempt == MAKE_ATTEMPTS:
                raise
            continue
        try:
            if _locked_and_still_named(path, fd):
                return path, fd
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
            raise
        os.close(fd)


def _locked_and_still_named(path: Path, fd: int) -> bool:
    if not locks_are_local(fd):
        return True  # unlocked: no clean-up removes anything there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a clean-up that caught it before the lock, as it removes it
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        return True  # no lock after all: others cannot take one either, so they leave it
    return _names(path, fd)


def locks_are_local(fd: int) -> bool:
    """Whether the file system of what `fd` has open is one of LOCAL_FILE_SYSTEMS (False where that cannot be told)."""
    return _file_system(os.fstat(fd).st_dev) in LOCAL_FILE_SYSTEMS


def _file_system(device: int) -> str | None:
    """The type of the mounted file system whose device number is `device`, from /proc/self/mountinfo."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields, _, described = line.partition(" - ")
                if fields.split()[2:3] == [wanted] and described:
                    return described.split()[0]
    except OSError:  # no /proc: not Linux, or a sandbox without it
        pass
    return None


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is still the file or folder that `fd` has open (not removed, nor replaced, since it was
    opened)."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def remove_dead(leftovers: Iterable[Path], folders: bool = False) -> list[tuple[Path, int]]:
    """Removes each of `leftovers` (temp files held as `new_held` holds them; with `folders`, temp folders only) whose
    maker has died, and returns them with the bytes they held. A dead maker's lock went with it: the lock taken
    without waiting means that no live run writes there. One that a live run holds stays, and so, silently, does one
    of another kind, one on a file system that is not local, and one that cannot be locked or removed: a clean-up,
    not the user's job."""
    removed = []
    for path in leftovers:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, a link, unreadable
            continue
        try:
            opened = os.fstat(fd)
            if (stat.S_ISDIR if folders else stat.S_ISREG)(opened.st_mode) and locks_are_local(fd):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(path, fd):  # not removed by another clean-up since it was listed
                    size = _tree_size(path) if folders else opened.st_size
                    shutil.rmtree(path) if folders else path.unlink()
                    removed.append((path, size))
        except OSError:  # a live run's lock (EWOULDBLOCK), or what cannot be removed
            continue
        finally:
            # after the removal: a maker that this caught before its lock waits for it, then finds its temp gone
            os.close(fd)
    return removed


def _tree_size(folder: Path) -> int:
    return sum(os.lstat(os.path.join(parent, name)).st_size
               for parent, _, names in os.walk(folder) for name in names)


def note_removed_leftovers(removed: list[tuple[Path, int]]) -> None:
    """One `note:` line on stderr naming what `remove_dead` removed, only when it removed something: a render's temp
    file can be gigabytes, freed space the user may wonder about."""
    if removed:
        more = f" and {len(removed) - 1} more" if len(removed) > 1 else ""
        print(f"note: removed {removed[0][0]}{more} ({_size_text(sum(size for _, size in removed))}), "
              "left behind by a killed run", file=sys.stderr)


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
