"""The files of storage.dir that more than one part of lprd cares about: the daemon's lock, a
durable replace of a small file, and moving a damaged SQLite file aside (the outbox's, the
watchlist's) with its WAL and shared-memory files."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PID_FILE = "lprd.pid"


class StorageInUse(Exception):
    pass


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a name (a container's)
        return str(uid)


def other_owner(path: Path) -> str | None:
    """Run as root, the user who owns `path` (or its folder, where it is not there yet) when
    that is another user: files root makes there, that user cannot write (events stranded in
    a root-owned outbox, a watchlist no sync can replace). None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        uid = (path if path.exists() else path.parent).stat().st_uid
    except OSError:
        return None
    return None if uid == 0 else user_name(uid)


def lock_storage(folder: Path) -> int | None:
    """Lock `folder` for this process; the returned descriptor holds the lock (None: not locked).

    Two daemons on one storage.dir would both send every waiting event (duplicates) and count
    the outbox wrong: `lprd run --once` with the service's config while the service runs. The
    folder itself is locked, not a file in it, so that a folder remounted read-only after a
    disk fault still works (its outbox then waits in memory)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            owner = (folder / PID_FILE).read_text().strip() or "?"
        except OSError:
            owner = "?"
        raise StorageInUse(f"storage.dir {folder} is in use by another lprd (pid {owner}): stop "
                           "it, or give this run a storage.dir of its own") from None
    except OSError as e:  # a file system without locks: run, as before there was a lock
        os.close(fd)
        log.warning("storage.dir %s cannot be locked (%s): a second lprd on it would not be "
                    "refused", folder, e.strerror)
        return None
    with contextlib.suppress(OSError):  # read-only or full: the lock holds all the same, and
        (folder / PID_FILE).write_text(f"{os.getpid()}\n")  # the pid is only for the message
    return fd


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text`: all of it or none, after a power cut as well (a rename
    without fsync may leave an empty file on some file systems)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside(path: Path, stamp: int) -> Path:
    """Rename a damaged SQLite file, with its -wal and -shm, to `<name>.corrupt-<stamp>`."""
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    return aside
