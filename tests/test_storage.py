"""storage.dir's lock and the moving aside of damaged SQLite files."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from lprd import storage
from lprd.storage import StorageInUse, lock_storage, move_aside


def test_a_second_lock_is_refused_naming_the_first_holder_and_freed_with_it(
        tmp_path: Path) -> None:
    fd = lock_storage(tmp_path)
    assert fd is not None
    with pytest.raises(StorageInUse, match=rf"in use by another lprd \(pid {os.getpid()}\)"):
        lock_storage(tmp_path)
    os.close(fd)
    again = lock_storage(tmp_path)
    assert again is not None
    os.close(again)


def test_a_read_only_folder_is_locked_all_the_same(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # An SD card remounted read-only after a fault: the daemon must still run (its outbox
    # waits in memory), so the lock may not need to write.
    def read_only(self: Path, *a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    fd = lock_storage(tmp_path)
    assert fd is not None
    with pytest.raises(StorageInUse, match=r"\(pid \?\)"):
        lock_storage(tmp_path)
    os.close(fd)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(storage.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="lprd.storage"):
        assert lock_storage(tmp_path) is None
    assert "cannot be locked (No locks available)" in caplog.text


def test_move_aside_takes_the_wal_and_shm_files_along(tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite"
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"x.sqlite{suffix}").write_text(suffix or "main")
    aside = move_aside(db, 1234)
    assert aside == tmp_path / "x.sqlite.corrupt-1234"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x.sqlite.corrupt-1234", "x.sqlite.corrupt-1234-shm", "x.sqlite.corrupt-1234-wal"]
