"""The SQLite outbox: order, acknowledgement, bounds, durability across reopen, corruption."""

from __future__ import annotations

import logging
import secrets
import sqlite3
from pathlib import Path

import pytest

import lprd.outbox
from lprd.outbox import Outbox, OutboxMessage


def _event(i: int, camera: str = "gate", action: str | None = None,
           crop: bytes | None = None) -> list[OutboxMessage]:
    eid = f"ev{i:05d}"
    msgs = [OutboxMessage(eid, camera, "event", "plate", f'{{"id":"{eid}"}}'.encode())]
    if action:
        msgs.append(OutboxMessage(eid, camera, "action", action, b"{}"))
    if crop is not None:
        msgs.append(OutboxMessage(eid, camera, "crop", "crop", crop, retain=True))
    return msgs


def _filled(path: Path, n: int) -> Outbox:
    """An outbox at `path` with events 0 .. n-1."""
    ob = Outbox(path)
    for i in range(n):
        ob.put(_event(i))
    return ob


class Clock:
    def __init__(self, t: float = 1_795_000_000.0) -> None:  # November 2026
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_outbox_uses_wal_and_full_sync(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.sqlite")
    ob.put(_event(1))
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: per connection
    ob.close()
    db = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_the_wal_shrinks_again_after_a_large_adoption(tmp_path: Path) -> None:
    # The messages that waited in memory while the disk was full come back in one transaction:
    # its WAL, as large as they are, stayed that large until the daemon stopped, on the card
    # that had just run full.
    mem = Outbox(":memory:")
    for i in range(40):  # events with crops inline, as base64 in the payload
        mem.put([OutboxMessage(f"ev{i:05d}", "gate", "event", "plate", bytes([i]) * 500_000)])
    ob = Outbox(tmp_path / "o.sqlite")
    ob.adopt(mem.pending(0, 10**9))
    wal = tmp_path / "o.sqlite-wal"
    assert wal.stat().st_size > 15_000_000
    for i in range(40, 44):
        ob.put(_event(i))
    assert wal.stat().st_size <= lprd.outbox.WAL_LIMIT


def test_pending_messages_come_back_in_write_order_across_cameras(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(10):
        ob.put(_event(i, camera="gate" if i % 3 else "back", action="allow" if i == 4 else None))
    pending = ob.pending(0, 100)
    ids = [p.message.event_id for p in pending if p.message.kind == "event"]
    assert ids == [f"ev{i:05d}" for i in range(10)]
    seqs = [p.seq for p in pending]
    assert seqs == sorted(seqs)
    # The action message follows its event directly.
    kinds = [(p.message.event_id, p.message.kind) for p in pending]
    assert kinds[kinds.index(("ev00004", "event")) + 1] == ("ev00004", "action")
    assert ob.depth() == 10 and ob.depth("back") == 4 and ob.depth("gate") == 6
    # Paging with a cursor continues where the last page ended.
    first = ob.pending(0, 4)
    rest = ob.pending(first[-1].seq, 100)
    assert [p.seq for p in first + rest] == seqs


def test_acknowledged_messages_are_gone_and_the_rest_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    ob = _filled(path, 6)
    pending = ob.pending()
    assert ob.ack([pending[0].seq, pending[2].seq, 999_999]) == 2
    assert ob.depth() == 4
    ob.close()
    ob = Outbox(path)
    assert [p.message.event_id for p in ob.pending()] == ["ev00001", "ev00003", "ev00004",
                                                          "ev00005"]
    assert ob.depth() == 4
    # Sequence numbers are never reused, even after the table emptied.
    last = ob.pending()[-1].seq
    ob.ack(p.seq for p in ob.pending())
    assert ob.depth() == 0 and ob.size() == 0
    ob.put(_event(99))
    assert ob.pending()[0].seq > last


def test_size_bound_drops_oldest_whole_events_and_reports_them(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_events=5)
    reports = []
    for i in range(8):
        r = ob.put(_event(i, camera="gate" if i < 2 else "back", action="deny"))
        if r:
            reports.append(r)
    assert ob.depth() == 5
    assert [p.message.event_id for p in ob.pending() if p.message.kind == "event"] == [
        f"ev{i:05d}" for i in range(3, 8)]
    # No orphaned action message of a dropped event stays behind.
    assert {p.message.event_id for p in ob.pending()} == {f"ev{i:05d}" for i in range(3, 8)}
    assert len(reports) == 3
    assert all(r.reason == "max_events" and r.events == 1 and r.messages == 2 for r in reports)
    assert [r.first_id for r in reports] == ["ev00000", "ev00001", "ev00002"]
    assert reports[0].per_camera == {"gate": 1} and reports[2].per_camera == {"back": 1}
    assert "max_events" in reports[0].describe() and "ev00000" in reports[0].describe()


def test_byte_bound_drops_oldest_whole_events_and_survives_a_reopen(tmp_path: Path) -> None:
    # Events with crops are 10-20 times larger: a count alone does not bound the disk.
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000)
    for i in range(1, 6):
        ob.put(_event(i, crop=b"c" * 100) + [
            OutboxMessage(f"ev{i:05d}", "gate", "action", "allow", b"a" * 2900)])
    # each event: ~15 + 2900 bytes, plus one crop that only the newest keeps
    ids = [p.message.event_id for p in ob.pending() if p.message.kind == "event"]
    assert ids == ["ev00003", "ev00004", "ev00005"]
    report = ob.put([OutboxMessage("big", "gate", "event", "plate", b"x" * 12_000)])
    assert report is not None and report.reason == "max_bytes" and report.events == 3
    assert [p.message.event_id for p in ob.pending()] == ["big"]  # the newest always stays
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000)
    report = ob.put(_event(9))
    assert report is not None and report.first_id == "big"  # the byte count was reread
    ob.ack([p.seq for p in ob.pending()])
    ob.put([OutboxMessage("a", "gate", "event", "plate", b"x" * 9000)])
    assert ob.put([OutboxMessage("b", "gate", "event", "plate", b"x" * 900)]) is None


def test_age_bound_drops_events_older_than_max_age(tmp_path: Path) -> None:
    clock = Clock()
    ob = Outbox(tmp_path / "o.sqlite", max_age=60.0, clock=clock)
    ob.put(_event(1, camera="a"))
    ob.put(_event(2, camera="b"))
    clock.t += 45
    ob.put(_event(3, camera="a"))
    assert ob.expire() is None
    clock.t += 30  # events 1 and 2 are 75 s old, event 3 is 30 s old
    report = ob.expire()
    assert report is not None
    assert report.reason == "max_age" and report.events == 2
    assert report.per_camera == {"a": 1, "b": 1}
    assert (report.first_id, report.last_id) == ("ev00001", "ev00002")
    assert [p.message.event_id for p in ob.pending()] == ["ev00003"]
    assert ob.depth("a") == 1 and ob.depth("b") == 0


def test_events_stamped_while_the_clock_was_unset_are_not_expired_by_age(tmp_path: Path) -> None:
    clock = Clock(t=86_400.0)  # 1970: a box without a real-time clock, booted offline
    ob = Outbox(tmp_path / "o.sqlite", max_age=60.0, clock=clock)
    ob.put(_event(1))
    clock.t = 1_795_000_000.0  # NTP sets the clock: the event is not "56 years old"
    ob.put(_event(2))
    assert ob.expire() is None
    assert [p.message.event_id for p in ob.pending()] == ["ev00001", "ev00002"]


def test_events_stamped_by_a_clock_that_ran_fast_still_expire(tmp_path: Path) -> None:
    clock = Clock(t=1_795_000_000.0 + 86_400)  # a day fast
    ob = Outbox(tmp_path / "o.sqlite", max_age=60.0, clock=clock)
    ob.put(_event(1))
    clock.t = 1_795_000_000.0  # NTP sets it back a day
    assert ob.expire() is None  # restamped to now: not expired at once, not kept forever
    clock.t += 61
    report = ob.expire()
    assert report is not None and report.events == 1 and ob.depth() == 0


def test_a_forward_clock_step_does_not_age_waiting_events(tmp_path: Path) -> None:
    # a box without RTC boots at its last shutdown time, queues events, then NTP steps the
    # clock 60 days on: shifted by the step, they keep their age and wait for the broker
    clock = Clock()
    ob = Outbox(tmp_path / "o.sqlite", max_age=3600.0, clock=clock)
    ob.put(_event(1))
    clock.t += 60 * 86_400 + 5
    ob.shift_clock(60 * 86_400)
    assert ob.expire() is None and ob.depth() == 1
    clock.t += 3600
    report = ob.expire()  # it still expires by its own age
    assert report is not None and report.events == 1 and ob.depth() == 0


def test_an_event_put_after_a_backward_step_keeps_its_stamp(tmp_path: Path) -> None:
    # The clock ran 8 days fast and NTP set it back; the next car's event, put (by the
    # caller's thread) before the worker saw the step, is stamped by the right clock already.
    clock = Clock()
    ob = Outbox(tmp_path / "o.sqlite", max_age=86_400.0, clock=clock)
    ob.put(_event(1))  # stamped 8 days ahead
    clock.t -= 8 * 86_400
    ob.put(_event(2))
    ob.shift_clock(-8 * 86_400, since=0.5)
    ages = {p.message.event_id: clock.t - p.created for p in ob.pending()}
    assert ages == {"ev00001": pytest.approx(0.0), "ev00002": pytest.approx(0.0)}
    assert ob.expire() is None and ob.depth() == 2


def _new_run(monkeypatch: pytest.MonkeyPatch, boot: str = "boot-1") -> None:
    """What a new process would see (in boot `boot`)."""
    monkeypatch.setattr(lprd.outbox, "_RUN_ID", secrets.token_hex(8))
    monkeypatch.setattr(lprd.outbox, "_boot_id", lambda: boot)


def test_an_outbox_tells_the_rows_of_earlier_runs_and_whether_of_another_boot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the publisher needs to keep an allow of unknown age from opening a gate hours late
    path = tmp_path / "o.sqlite"
    _new_run(monkeypatch)
    ob = Outbox(path)
    ob.put(_event(1, action="allow"))
    assert not any(ob.from_earlier_run(p.seq) or ob.from_earlier_boot(p.seq)
                   for p in ob.pending())
    ob.close()
    ob = Outbox(path)  # reopened in the same run (a publisher restarted by a reload)
    ob.put(_event(2))
    assert not any(ob.from_earlier_run(p.seq) for p in ob.pending())
    ob.close()
    _new_run(monkeypatch)  # a restart in the same boot
    ob = Outbox(path)
    ob.put(_event(3))
    assert [ob.from_earlier_run(p.seq) for p in ob.pending()] == [True, True, True, False]
    assert not any(ob.from_earlier_boot(p.seq) for p in ob.pending())
    ob.close()
    _new_run(monkeypatch, boot="boot-2")  # a power cut
    ob = Outbox(path)
    assert all(ob.from_earlier_boot(p.seq) for p in ob.pending())
    ob.put(_event(4))
    ob.close()
    _new_run(monkeypatch, boot="boot-2")  # and a restart after it: boot 1's rows stay boot 1's
    ob = Outbox(path)
    assert [ob.from_earlier_boot(p.seq) for p in ob.pending()] == [True] * 4 + [False]
    assert all(ob.from_earlier_run(p.seq) for p in ob.pending())
    ob.close()


def test_a_clock_step_moves_this_run_s_stamps_not_an_earlier_run_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the earlier run stamped by its own (right) clock: shifted by this run's step, the hours
    # the box was off vanished from their age, and max_age never counted them
    path = tmp_path / "o.sqlite"
    clock = Clock()
    ob = Outbox(path, clock=clock)
    ob.put(_event(1, action="allow"))  # 10 s before the power cut, stamped right
    ob.close()
    _new_run(monkeypatch, boot="boot-2")
    clock.t += 10  # boots at its last saved time (no RTC), 5 h late
    ob = Outbox(path, clock=clock)
    ob.put(_event(2))
    ob.close()
    ob = Outbox(path, clock=clock)  # a publisher restarted by a reload: the same run
    ob.put(_event(3))
    clock.t += 5 * 3600 + 5  # NTP
    ob.shift_clock(5 * 3600)
    ages = {(p.message.event_id, p.message.kind): round(clock.t - p.created)
            for p in ob.pending()}
    assert ages == {("ev00001", "event"): 5 * 3600 + 15, ("ev00001", "action"): 5 * 3600 + 15,
                    ("ev00002", "event"): 5, ("ev00003", "event"): 5}


def test_a_clock_step_gives_stamps_of_an_unset_clock_their_age(tmp_path: Path) -> None:
    # booted offline with no clock at all: an allow queued then kept its 1970 stamp after NTP
    # set the clock, so its age stayed unknown and it was sent however late
    clock = Clock(t=100.0)
    ob = Outbox(tmp_path / "o.sqlite", clock=clock)
    ob.put(_event(1, action="allow"))
    clock.t = 1_795_000_000.0
    ob.shift_clock(1_795_000_000.0 - 100.0 - 300)  # NTP 5 minutes after the car
    assert {round(clock.t - p.created) for p in ob.pending()} == {300}


def test_only_the_newest_crop_of_a_camera_waits(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put(_event(1, crop=b"jpeg1"))
    ob.put(_event(2, camera="back", crop=b"jpegB"))
    ob.put(_event(3, crop=b"jpeg3"))
    crops = [(p.message.camera, p.message.payload) for p in ob.pending()
             if p.message.kind == "crop"]
    assert crops == [("back", b"jpegB"), ("gate", b"jpeg3")]
    assert ob.depth() == 3  # crops are not events


def test_a_corrupt_outbox_is_moved_aside_and_a_new_one_started(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="lprd.outbox"):
        ob = Outbox(path)
    assert "unreadable" in caplog.text
    aside = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    ob.put(_event(1))
    assert ob.depth() == 1


def test_a_corrupt_outbox_that_cannot_be_moved_is_an_operational_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    # A file system remounted read-only after a fault: the publisher falls back to an outbox
    # in memory on OperationalError, and nothing claims the file was moved.
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)

    def read_only(self, target):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "rename", read_only)
    with caplog.at_level(logging.ERROR, logger="lprd.outbox"), \
            pytest.raises(sqlite3.OperationalError, match="cannot be moved aside: .*Read-only"):
        Outbox(path)
    assert "moved it to" not in caplog.text


def test_the_readable_messages_of_a_damaged_outbox_are_kept(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    for i in range(300):  # about 25 table pages of 4 kB
        ob.put([OutboxMessage(f"ev{i:05d}", "gate", "event", "plate", b"p" * 300)])
    ob.close()
    data = bytearray(path.read_bytes())
    page = 4096 * (len(data) // 4096 // 2)  # one page in the middle: a few rows lost
    data[page:page + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lprd.outbox"):
        ob = Outbox(path)
    assert "unreadable" in caplog.text and "could still be read" in caplog.text
    ids = [p.message.event_id for p in ob.pending(limit=1000)]
    assert ids == sorted(ids)  # oldest first, past the bad page too
    assert ids[0] == "ev00000" and ids[-1] == "ev00299"
    # only the bad page's rows are lost (a page holds at most 4096 // 300 of them): the jump
    # past it skipped readable rows of the next page too
    missing = sorted(set(range(300)) - {int(i[2:]) for i in ids})
    assert 0 < len(missing) <= 4096 // 300 and missing == list(range(missing[0], missing[-1] + 1))


def test_whichever_page_is_bad_only_its_rows_are_lost(tmp_path: Path) -> None:
    # a jump past the bad page that overshot the last row lost the readable last page too
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    for i in range(300):
        ob.put([OutboxMessage(f"ev{i:05d}", "gate", "event", "plate", b"p" * 300)])
    ob.close()
    good = path.read_bytes()
    for page in range(2, len(good) // 4096):
        data = bytearray(good)
        data[page * 4096:(page + 1) * 4096] = b"\xa5" * 4096
        damaged = tmp_path / f"page{page}.sqlite"
        damaged.write_bytes(bytes(data))
        ob = Outbox(damaged)
        kept = {int(p.message.event_id[2:]) for p in ob.pending(limit=1000)}
        ob.close()
        missing = sorted(set(range(300)) - kept)
        assert len(missing) <= 4096 // 300, (page, missing)
        # and each of them lies on the bad page: a read of it alone fails too (a read fetches
        # a row ahead: the rows beside the bad page were lost with it)
        (aside,) = (f for f in tmp_path.glob(f"{damaged.name}.corrupt-*")  # moved aside
                    if not f.name.endswith(("-wal", "-shm", "-journal")))
        db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
        for i in missing:
            with pytest.raises(sqlite3.DatabaseError):
                db.execute("SELECT payload FROM messages WHERE seq = ?", (i + 1,)).fetchone()
        db.close()


def test_an_outbox_whose_index_lost_rows_quick_check_misses_is_moved_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A torn write can leave index entries whose rows are gone; quick_check does not compare
    # indexes with the table, and the first count at start failed: the daemon exited at
    # every start, forever.
    path = tmp_path / "outbox.sqlite"
    ob = _filled(path, 50)
    ob.close()

    def bump(db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA schema_version={db.execute('PRAGMA schema_version').fetchone()[0] + 1}")

    db = sqlite3.connect(path, isolation_level=None)  # hide the indexes, delete rows, restore
    idx = db.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_schema "
                     "WHERE type = 'index' AND name LIKE 'messages_%'").fetchall()
    db.execute("PRAGMA writable_schema=ON")
    db.execute("DELETE FROM sqlite_schema WHERE type = 'index' AND name LIKE 'messages_%'")
    bump(db)
    db.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM messages WHERE seq IN (10, 11)")
    db.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA writable_schema=ON")
    db.executemany("INSERT INTO sqlite_schema VALUES (?, ?, ?, ?, ?)", idx)
    bump(db)
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    db.close()
    with caplog.at_level(logging.WARNING, logger="lprd.outbox"):
        ob = Outbox(path)
    assert "unreadable" in caplog.text and "48 message(s)" in caplog.text
    assert ob.depth() == 48 and len(ob.pending(limit=100)) == 48
    ob.close()


def test_a_locked_outbox_is_an_error_not_corruption_and_keeps_its_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "outbox.sqlite"
    Outbox(path).put(_event(1))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process writing, a full disk, an I/O error ...
    monkeypatch.setattr(Outbox, "busy_timeout", 0.2)
    with pytest.raises(sqlite3.OperationalError):
        Outbox(path)
    assert not list(tmp_path.glob("*.corrupt-*"))  # nothing moved aside
    other.execute("ROLLBACK")
    other.close()
    assert Outbox(path).depth() == 1


def test_unknown_message_kind_is_refused(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(ValueError, match="kind"):
        ob.put([OutboxMessage("x", "gate", "bogus", "plate", b"")])
    assert ob.size() == 0


def test_the_first_messages_of_an_outbox_cut_short_are_kept(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    # A file cut short (a copy or a file system that lost its tail): its header promises pages
    # that are gone, SQLite refused even the schema, and nothing was salvaged.
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    for i in range(200):
        ob.put([OutboxMessage(f"ev{i:05d}", "gate", "event", "plate", b"p" * 3000)])
    ob.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="lprd.outbox"):
        ob = Outbox(path)
    ids = [p.message.event_id for p in ob.pending(limit=1000)]
    assert 80 <= len(ids) < 200 and ids == sorted(ids) and ids[0] == "ev00000"
    assert "could still be read" in caplog.text
    assert not list(tmp_path.glob("*.salvage*"))  # the fixed copy is gone
    ob.close()


def test_a_header_with_an_impossible_page_size_salvages_nothing_and_opens(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    ob.put([OutboxMessage("ev1", "gate", "event", "plate", b"p")])
    ob.close()
    data = bytearray(path.read_bytes())
    data[16:18] = b"\x00\x00"  # page size 0: a division by zero in the salvage
    data[100:4096] = b"\xa5" * 3996  # and the schema unreadable
    path.write_bytes(bytes(data))
    ob = Outbox(path)
    assert ob.depth() == 0
    ob.close()


def test_a_put_with_a_crop_finds_the_camera_s_old_crop_by_index(tmp_path: Path) -> None:
    # Each put with a crop deletes the camera's older crop: without an index a scan of every
    # waiting message, under the lock, at every event (44 ms at 30,000 waiting).
    ob = Outbox(tmp_path / "o.db")
    plan = " ".join(r[3] for r in ob._db.execute(
        "EXPLAIN QUERY PLAN DELETE FROM messages WHERE kind = 'crop' AND camera = ?",
        ("gate",)))
    ob.close()
    assert "USING INDEX messages_crops" in plan, plan


@pytest.mark.parametrize("where", [b"ev00001", b"gate"])
def test_a_byte_flipped_inside_a_stored_row_stops_nothing(tmp_path: Path, where: bytes) -> None:
    # SQLite pages carry no checksum: a failing card's flipped byte in a text passes
    # quick_check, and reading the row raised "Could not decode to UTF-8" at every batch that
    # held it (no later event was ever sent), or at open (taken for a locked disk: the events
    # waited in memory, at every start).
    path = tmp_path / "o.sqlite"
    ob = _filled(path, 3)
    ob._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ob.close()
    data = bytearray(path.read_bytes())
    at = data.find(where)
    data[at + 2] = 0xFF
    path.write_bytes(bytes(data))
    ob = Outbox(path)
    got = ob.pending()
    assert [pm.message.kind for pm in got] == ["event"] * 2  # the damaged one dropped
    ob.ack(pm.seq for pm in got)
    ob.put(_event(9))
    assert [pm.message.event_id for pm in ob.pending()] == ["ev00009"]
    ob.close()


def test_a_row_whose_column_type_was_flipped_is_dropped_not_sent_nor_blocking(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # one bit of a record header turns the payload's BLOB into TEXT: quick_check passes, and
    # every read of the batch raised (nothing behind it was sent); a subtopic's TEXT turned
    # BLOB went out on the topic "lprd/gate/b'plate'"
    path = tmp_path / "o.sqlite"
    ob = _filled(path, 3)
    ob._db.execute("UPDATE messages SET payload = CAST(payload AS TEXT) WHERE seq = 1")
    ob._db.execute("UPDATE messages SET subtopic = CAST(subtopic AS BLOB) WHERE seq = 2")
    got = ob.pending()
    assert [pm.message.event_id for pm in got] == ["ev00002"]
    assert "2 damaged message(s) dropped (seq 1, 2)" in caplog.text
    assert [pm.seq for pm in ob.pending()] == [3]
    ob.close()
