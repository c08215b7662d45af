"""Durable outbox: MQTT messages wait in SQLite (WAL) until the broker has acknowledged them.

One row per message; an event's messages (plate, watchlist action, crop) are written in one
transaction, in order, so that delivery in `seq` order keeps every camera's events in order.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lprd.storage import move_aside

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MEMORY = ":memory:"  # an Outbox at this path keeps its messages in memory only
# A message stamped before this (2025-01-01) was written while the clock was unset (a box with no
# real-time clock that booted offline): its age is unknown, so only the size bound may drop it.
CLOCK_FLOOR = 1_735_689_600.0
# bytes the WAL is cut back to after a checkpoint: one large transaction (the messages that
# waited in memory while the disk was full) left it that large until the daemon stopped
WAL_LIMIT = 4 * 1024 * 1024
FUTURE_SLACK = 60.0  # s: a message stamped later than now by more was stamped by a wrong clock
KINDS = ("event", "action", "crop")
# This process's run: an outbox whose `meta` names another run was last opened by an earlier
# one (a restart, or a boot), whose stamps a step of this run's clock says nothing of.
_RUN_ID = secrets.token_hex(8)
_INSERT = ("INSERT INTO messages (event_id, camera, kind, subtopic, payload, retain, created) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a seq is never reused
    event_id TEXT NOT NULL,
    camera TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('event', 'action', 'crop')),
    subtopic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages(created);
CREATE INDEX IF NOT EXISTS messages_events ON messages(seq) WHERE kind = 'event';
-- a camera's older crop goes at each put: without it, a scan of every waiting message
CREATE INDEX IF NOT EXISTS messages_crops ON messages(camera) WHERE kind = 'crop';
-- the fresh actions sent ahead of a backlog: a few rows, however long the backlog
CREATE INDEX IF NOT EXISTS messages_actions ON messages(created) WHERE kind = 'action';
-- run: the last run that opened it; run_seq: the highest seq before that run; boot: its boot
-- id; boot_seq: the highest seq before that boot's first run
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to deliver; the topic is `<prefix>/<camera>/<subtopic>`, built at publish time
    so that a changed prefix applies to what is still waiting."""

    event_id: str
    camera: str
    kind: str  # "event" | "action" | "crop"
    subtopic: str
    payload: bytes
    retain: bool = False


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class PendingMessage:
    seq: int
    created: float  # epoch seconds when it was written
    message: OutboxMessage


@dataclass(frozen=True, slots=True)
class DropReport:
    """What a bound threw away (oldest first): counts are events, not messages."""

    reason: str  # "max_events" | "max_bytes" | "max_age" | a loss outside the bounds
    events: int
    messages: int
    per_camera: dict[str, int] = field(default_factory=dict)
    first_id: str | None = None
    last_id: str | None = None

    def describe(self) -> str:
        cams = ", ".join(f"{c}: {n}" for c, n in sorted(self.per_camera.items())) or "-"
        ids = f"{self.first_id} .. {self.last_id}" if self.first_id else "-"
        return (f"dropped {self.events} undelivered event(s) ({self.messages} message(s)) "
                f"because of {self.reason}; per camera {cams}; ids {ids}")


def _salvage(path: Path) -> list[tuple]:
    """The messages still readable in a damaged outbox, oldest first; from a copy with its
    header fixed where the file was cut short (SQLite then refuses even its schema)."""
    rows = _scan(path)
    if rows:
        return rows
    copy = path.with_name(path.name + ".salvage")
    try:
        if _readable_copy(path, copy):
            rows = _scan(copy)
    except Exception as e:  # noqa: BLE001 - a salvage must never fail the outbox's open
        log.warning("outbox: no copy of %s to salvage from: %s", path, e)
    finally:
        for leftover in (copy, copy.with_name(copy.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return rows


def _readable_copy(path: Path, copy: Path) -> bool:
    """Copy `path` to `copy` cut to whole pages, its header's page count set to the pages there
    are and its journal mode to rollback (a torn file's header promises pages that are gone,
    and a WAL file that is not there). False where it is no SQLite file."""
    import shutil  # salvage only

    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return False
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):  # SQLite's page sizes: powers of two, 512-65536
        return False
    pages = path.stat().st_size // page
    if pages < 2:
        return False
    shutil.copyfile(path, copy)
    with open(copy, "r+b") as f:
        f.truncate(pages * page)
        f.seek(18)
        f.write(b"\x01\x01")  # rollback journal: read without a WAL
        f.seek(28)
        f.write(pages.to_bytes(4, "big"))
    return True


_SALVAGE_COLUMNS = "seq, event_id, camera, kind, subtopic, payload, retain, created"


def _scan(path: Path) -> list[tuple]:
    """A bad page ends a scan; the next one starts past it, further each time it fails again.
    Past it, the rows that the last jump leapt over are read back, down to the bad page."""
    found: dict[int, tuple] = {}
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    src.text_factory = _lenient_text

    def read(lo: int, hi: int, down: bool = False) -> tuple[int | None, int | None, bool]:
        """The rows between seqs lo and hi (both out), in order or down, into `found` until
        the end or a bad page: the first and last seq read, and whether a bad page stopped it.
        After a failure, row by row up to the bad page: a read fetches a row ahead, and its
        error came instead of the last good row."""
        sql = (f"SELECT {_SALVAGE_COLUMNS} FROM messages WHERE seq > ? AND seq < ? "
               f"ORDER BY seq{' DESC' if down else ''}")
        first = last = None

        def keep(row: tuple) -> None:
            nonlocal first, last
            first = row[0] if first is None else first
            last = row[0]
            if row[3] in KINDS and None not in row:  # the new file's NOT NULLs
                found[row[0]] = row[1:]

        try:
            for row in src.execute(sql, (lo, hi)):
                keep(row)
            return first, last, False
        except sqlite3.Error:
            pass
        while True:
            at = last if last is not None else (hi if down else lo)
            try:
                row = src.execute(sql + " LIMIT 1", (lo, at) if down else (at, hi)).fetchone()
            except sqlite3.Error:
                return first, last, True
            if row is None:
                return first, last, False
            keep(row)

    end = 2 ** 63 - 1
    after, skip = 0, 1
    good = 0  # the last seq read before a bad page, while past it none is read yet
    with contextlib.closing(src):
        while skip < 2 ** 40:
            first, last, failed = read(after, end)
            if good is not None and (first is not None or not failed):
                # past the bad page, or a jump past the end: back down to the bad page
                read(good, first if first is not None else after + 1, down=True)
                good = None
            if not failed:
                break  # read to the end
            if last is not None:
                good, after, skip = last, last + 1, 1
            else:
                skip *= 2
                after += skip
    return [found[k] for k in sorted(found)]


class Outbox:
    """Thread-safe; one connection guarded by a lock (SQLite serialises writers anyway)."""

    busy_timeout = 10.0  # seconds to wait for a lock held by another connection

    def __init__(self, path: Path | str, max_events: int = 100_000,
                 max_age: float = 7 * 86400.0, clock: Callable[[], float] = time.time,
                 max_bytes: int | None = None) -> None:
        if max_events < 1 or max_age <= 0 or (max_bytes is not None and max_bytes < 1):
            raise ValueError("max_events and max_bytes must be >= 1 and max_age > 0")
        self.path = Path(path)
        self.in_memory = str(path) == MEMORY  # not durable: while the disk cannot be used
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        if not self.in_memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._events: Counter[str] = Counter()  # pending events per camera
        self._bytes = 0  # payload bytes waiting: crops make events 10-20 times larger
        aside = None
        try:
            self._db = self._open()
        except sqlite3.OperationalError:
            # locked, disk full, read-only, I/O: not corruption, and its events are still there
            raise
        except sqlite3.DatabaseError as e:
            # A corrupt outbox must not stop the daemon: keep the file for inspection, start anew.
            try:
                aside = move_aside(self.path, int(self._clock()))
            except OSError as moving:  # a file system remounted read-only: the caller's
                # fallback (an outbox in memory) takes over, as for any outbox that cannot open
                raise sqlite3.OperationalError(
                    f"unreadable ({e}) and cannot be moved aside: {moving}") from None
            log.error("outbox %s is unreadable (%s); moved it to %s and started an empty one",
                      self.path, e, aside)
            self._db = self._open()
            rows = _salvage(aside)
            if rows:
                with self._transaction():  # one fsync, not one per row
                    self._db.executemany(_INSERT, rows)
                log.warning("outbox: %d message(s) of the unreadable one could still be read; "
                            "they wait in the new one", len(rows))
            self._count()
        try:
            self._run_seq, self._boot_seq = self._mark_run(salvaged=aside is not None)
        except sqlite3.Error:
            self.close()
            raise

    def _mark_run(self, salvaged: bool) -> tuple[int, int]:
        """The highest seq written before this run, and before this boot's first run, as
        at this run's first open of the file (`from_earlier_run`, `from_earlier_boot`)."""
        if self.in_memory:
            return 0, 0
        with self._lock, self._transaction():
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("run") == _RUN_ID and not salvaged:
                return int(meta["run_seq"]), int(meta["boot_seq"])
            top = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0]
            boot = _boot_id()
            # a file of an older lprd or a salvaged one: which boot wrote it is not known
            if salvaged or not boot or meta.get("boot") != boot or "boot_seq" not in meta:
                boot_seq = top
            else:  # a restart in the same boot: the rows of the boot before stay its
                boot_seq = int(meta["boot_seq"])
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
                ("run", _RUN_ID), ("run_seq", str(top)), ("boot", boot),
                ("boot_seq", str(boot_seq))])
        return top, boot_seq

    def from_earlier_run(self, seq: int) -> bool:
        """Written before this process first opened the file: stamped by another run's
        clock."""
        return seq <= self._run_seq

    def from_earlier_boot(self, seq: int) -> bool:
        """Written before this boot's first run: whatever its stamp, its age is not known
        (a box without RTC boots at its last saved time)."""
        return seq <= self._boot_seq

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back itself (disk full)
                self._db.execute("ROLLBACK")
            raise

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=self.busy_timeout)
        # SQLite pages carry no checksum: a byte a failing card flipped in a text passes
        # quick_check, and a strict decode raised at every read of the row (nothing behind it
        # was ever sent). Its message goes out with the byte replaced.
        db.text_factory = _lenient_text
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal" and not self.in_memory:
                raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode={mode})")
            # FULL: a commit survives a power cut, not only a crash of this process.
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown outbox schema version {version}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db = db
            # through both indexes: quick_check does not compare them with the table, and an
            # index entry whose row a torn write lost fails here, not at every start later
            self._count()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _count(self) -> None:
        """The pending events per camera and their bytes, read from the store."""
        self._events.clear()
        for camera, n in self._db.execute(
                "SELECT camera, COUNT(*) FROM messages WHERE kind = 'event' GROUP BY camera"):
            self._events[camera] = n
        self._bytes = self._db.execute(
            "SELECT COALESCE(SUM(length(payload)), 0) FROM messages").fetchone()[0]

    # -- writing -----------------------------------------------------------------------------

    def put(self, messages: Sequence[OutboxMessage]) -> DropReport | None:
        """Store one event's messages atomically; returns what the size bound dropped, if any."""
        if not messages:
            return None
        for m in messages:
            if m.kind not in KINDS:
                raise ValueError(f"unknown outbox message kind {m.kind!r}")
        now = self._clock()
        with self._lock:
            with self._transaction():
                size = self._bytes + sum(len(m.payload) for m in messages)
                for m in messages:
                    if m.kind == "crop":
                        # Only the newest crop of a camera matters (a retained "last crop").
                        size -= sum(r[0] for r in self._db.execute(
                            "DELETE FROM messages WHERE kind = 'crop' AND camera = ? "
                            "RETURNING length(payload)", (m.camera,)).fetchall())
                self._db.executemany(
                    _INSERT,
                    [(m.event_id, m.camera, m.kind, m.subtopic, m.payload, int(m.retain), now)
                     for m in messages])
                added = Counter(m.camera for m in messages if m.kind == "event")
                report, size = self._enforce_size(added, size)
            self._bytes = size  # once committed
            self._events.update(added)
            if report:
                self._events.subtract(report.per_camera)
                self._events = +self._events
            return report

    def _enforce_size(self, added: Counter[str], size: int) -> tuple[DropReport | None, int]:
        """Drop the oldest events over the bounds: (what was dropped, payload bytes left)."""
        # Rows of one event are contiguous, so cutting before the first kept event drops whole
        # events with their action and crop messages. The newest event always stays.
        cut, reason = 0, ""
        excess = sum(self._events.values()) + sum(added.values()) - self.max_events
        if excess > 0:
            row = self._db.execute(
                "SELECT seq FROM messages WHERE kind = 'event' ORDER BY seq LIMIT 1 OFFSET ?",
                (excess,)).fetchone()
            if row is not None:
                cut, reason = row[0], "max_events"
        if self.max_bytes is not None and size > self.max_bytes:
            # the first event whose older rows hold the excess bytes, else the newest event;
            # read from the oldest row on, so it costs what it drops, not the whole table
            excess, before, last_event = size - self.max_bytes, 0, 0
            rows = self._db.execute("SELECT seq, kind, length(payload) FROM messages ORDER BY seq")
            for seq, kind, n in rows:
                if kind == "event":
                    last_event = seq
                    if before >= excess:
                        break
                before += n
            rows.close()
            if last_event > cut:
                cut, reason = last_event, "max_bytes"
        if not cut:
            return None, size
        rows = self._db.execute(
            "DELETE FROM messages WHERE seq < ? RETURNING seq, event_id, camera, kind, "
            "length(payload)", (cut,)).fetchall()
        return _report(reason, rows), size - sum(r[4] for r in rows)

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete delivered messages; unknown seqs (already dropped) are ignored."""
        seqs = list(seqs)
        if not seqs:
            return 0
        deleted: list[tuple] = []
        with self._lock:
            with self._transaction():
                for i in range(0, len(seqs), 500):
                    chunk = seqs[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    deleted += self._db.execute(
                        f"DELETE FROM messages WHERE seq IN ({marks}) "
                        "RETURNING camera, kind, length(payload)", chunk).fetchall()
            self._bytes -= sum(n for _, _, n in deleted)
            self._events.subtract(Counter(cam for cam, kind, _ in deleted if kind == "event"))
            self._events = +self._events
        return len(deleted)

    def adopt(self, pending: Sequence[PendingMessage]) -> None:
        """Take over another outbox's waiting messages, in their order, with their stamps."""
        with self._lock:
            with self._transaction():
                self._db.executemany(
                    _INSERT,
                    [(p.message.event_id, p.message.camera, p.message.kind, p.message.subtopic,
                      p.message.payload, int(p.message.retain), p.created) for p in pending])
            self._bytes += sum(len(p.message.payload) for p in pending)
            self._events.update(p.message.camera for p in pending if p.message.kind == "event")

    def shift_clock(self, delta: float, since: float = 0.0) -> None:
        """Move the stamps made before a step of the wall clock by `delta` seconds. Without it
        a forward step (a box without RTC that boots at its last shutdown time, then syncs) ages
        the waiting messages by the step, and more than max_age drops them all before they are
        sent. Messages put in the last `since` seconds (the span in which the step was seen),
        stamped within it by the new clock, are already right, and those of earlier runs were
        stamped by another run's clock (shifted, a box's time off vanished from their age)."""
        now = self._clock()
        with self._lock:
            # an unset clock's stamps too: the clock that stepped made them
            self._db.execute("UPDATE messages SET created = created + ? WHERE seq > ? "
                             "AND NOT created BETWEEN ? AND ?",
                             (delta, self._run_seq, now - since - 1.0, now + 1.0))

    def expire(self) -> DropReport | None:
        """Drop messages older than max_age (not those stamped by an unset clock)."""
        now = self._clock()
        cutoff = now - self.max_age
        with self._lock:
            # Stamped by a clock that ran fast and was then set back: they age from now on
            # (they would never expire otherwise); an earlier run's action, of an age no one
            # can tell, is stamped as by an unset clock (restamped now, it looked fresh)
            self._db.execute("UPDATE messages SET created = CASE WHEN kind = 'action' AND "
                             "seq <= ? THEN 0 ELSE ? END WHERE created > ?",
                             (self._run_seq, now, now + FUTURE_SLACK))
            rows = self._db.execute(
                "DELETE FROM messages WHERE created < ? AND created >= ? "
                "RETURNING seq, event_id, camera, kind, length(payload)",
                (cutoff, CLOCK_FLOOR)).fetchall()
            self._bytes -= sum(r[4] for r in rows)
            report = _report("max_age", rows)
            if report:
                self._events.subtract(report.per_camera)
                self._events = +self._events
            return report

    # -- reading -----------------------------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[PendingMessage]:
        """Messages with seq > after_seq, oldest first."""
        return self._pending("seq > ?", (after_seq,), limit)

    def pending_actions(self, after_seq: int, since: float, limit: int = 256
                        ) -> list[PendingMessage]:
        """Action messages with seq > after_seq stamped at `since` or later, oldest first.
        Through their own index (the planner took the seq range: a scan of the whole backlog,
        35 ms at 100,000 rows, twice a second while it drained)."""
        return self._pending("kind = 'action' AND created >= ? AND seq > ?", (since, after_seq),
                             limit, index="messages_actions")

    def _pending(self, where: str, args: tuple, limit: int, index: str | None = None
                 ) -> list[PendingMessage]:
        by = f" INDEXED BY {index}" if index else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, created, event_id, camera, kind, subtopic, payload, retain "
                f"FROM messages{by} WHERE {where} ORDER BY seq LIMIT ?", (*args, limit)
            ).fetchall()
        out, bad = [], []
        for seq, created, eid, cam, kind, sub, pl, ret in rows:
            texts = (eid, cam, kind, sub)
            # a byte a failing card flipped (no checksum): a column of another type, or text
            # that does not decode, would go out on a garbage topic or stop every send
            if (not all(isinstance(t, str) and "\ufffd" not in t for t in texts)
                    or not isinstance(pl, bytes) or not isinstance(created, float | int)):
                bad.append(seq)
                continue
            out.append(PendingMessage(seq, created, OutboxMessage(eid, cam, kind, sub, pl,
                                                                  bool(ret))))
        if bad:
            log.error("outbox: %d damaged message(s) dropped (seq %s)", len(bad),
                      ", ".join(map(str, bad)))
            with contextlib.suppress(sqlite3.Error):  # skipped meanwhile; deleted next time
                self.ack(bad)
        return out

    def depth(self, camera: str | None = None) -> int:
        """Undelivered events (plate messages), for one camera or all."""
        with self._lock:
            return self._events[camera] if camera is not None else sum(self._events.values())

    def size(self) -> int:
        """Undelivered messages of every kind."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as e:  # closing twice or a failing disk: nothing left to save
                log.debug("closing outbox: %s", e)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: every earlier run counts as another boot
        return ""


def drop_report(reason: str, messages: Sequence[OutboxMessage]) -> DropReport:
    """A DropReport for messages lost outside the outbox's bounds, in their order."""
    rows = [(i, m.event_id, m.camera, m.kind) for i, m in enumerate(messages)]
    return _report(reason, rows) or DropReport(reason=reason, events=0, messages=0)


def _report(reason: str, rows: list[tuple]) -> DropReport | None:
    """rows: (seq, event_id, camera, kind, ...) of deleted messages."""
    if not rows:
        return None
    rows.sort()
    events = [(eid, cam) for _, eid, cam, kind, *_ in rows if kind == "event"]
    return DropReport(
        reason=reason,
        events=len(events),
        messages=len(rows),
        per_camera=dict(Counter(cam for _, cam in events)),
        first_id=events[0][0] if events else None,
        last_id=events[-1][0] if events else None,
    )
