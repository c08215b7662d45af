"""The watchlist: a SQLite store of plates, its sync from a remote list, and `lprd watchlist`.

Lookups and the swap of a synced list are SQLite transactions (WAL), so a lookup sees the old
list or the new one, never a mix. Matching itself lives in lprd.plate_match (pure).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import fcntl
import gc
import hashlib
import heapq
import http.client
import io
import itertools
import json
import logging
import math
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from lprd import __version__
from lprd.cli import add_config_option, int_range, shown_path
from lprd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    SyncConfig,
    WatchlistConfig,
    file_url_path,
    is_list_name,
    load_config,
    redact_source,
    token_problem,
)
from lprd.plate_match import (
    CONFUSABLE_PAIRS,
    INDEL_COST,
    MAX_PLATE_CHARS,
    SUBSTITUTION_COST,
    WatchlistEntry,
    action_rank,
    index_depth,
    index_keys,
    match_entries,
    normalize_plate,
    query_strings,
)
from lprd.storage import move_aside, other_owner
from lprd.types import Candidate, PlateEvent, WatchlistMatch

log = logging.getLogger(__name__)

DB_NAME = "watchlist.sqlite"
SCHEMA_VERSION = 1
_ACTION = re.compile(r"^[a-z0-9_-]{1,64}$")
_MAX_PROBLEMS_SHOWN = 5
_COLUMNS = ("plate", "list", "action", "valid_from", "valid_until")
_READ_CHUNK = 64 * 1024
# s: how long a sync waits for another process's to end (a `lprd watchlist sync` stopped
# with ^Z must not hold the daemon's off for good)
SYNC_LOCK_WAIT = 300.0
# s: a CSV file source without a final line break this recent is read once it stays the same
# this long (it may be being written)
FILE_SETTLE = 2.0
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# One table pair per origin: a sync empties its own tables whole, which SQLite does in one
# step, instead of deleting 100,000 rows one by one among the local ones.
ORIGINS = ("local", "sync")
_SCHEMA = [stmt for o in ORIGINS for stmt in (
    f"""CREATE TABLE IF NOT EXISTS entries_{o} (
        id INTEGER PRIMARY KEY,
        plate TEXT NOT NULL,
        list TEXT NOT NULL,
        action TEXT,
        info TEXT NOT NULL DEFAULT '{{}}',
        valid_from REAL,
        valid_until REAL,
        UNIQUE (plate, list))""",
    # canonical form of each plate with up to `index_depth` characters deleted (plate_match)
    f"""CREATE TABLE IF NOT EXISTS keys_{o} (
        key TEXT NOT NULL,
        entry_id INTEGER NOT NULL,
        PRIMARY KEY (key, entry_id)) WITHOUT ROWID""",
)] + ["CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]
_TABLES = {f"{t}_{o}" for o in ORIGINS for t in ("entries", "keys")} | {"meta"}
_COLS = "e.plate, e.list, e.action, e.info, e.valid_from, e.valid_until"
INDEX_CHUNK = 5000  # plates between two calls of an index build's progress
# Changes whenever the confusion table does: the stored keys then need rebuilding.
_INDEX_HASH = hashlib.sha256(
    repr((sorted(CONFUSABLE_PAIRS.items()), INDEL_COST, SUBSTITUTION_COST)).encode()
).hexdigest()[:16]


class WatchlistError(Exception):
    """Bad input (a list, a plate, a date), phrased for the user; names the row."""


class SyncError(Exception):
    """A sync that could not get a usable document; the last good list stays."""


# ---------------------------------------------------------------- documents (pure parsing)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Bulk work on 100,000 entries builds millions of small objects, and the cyclic GC would
    rescan them over and over (measured: half the parse time); refcounting still frees them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()



def parse_time(value: Any, *, end: bool = False, what: str = "time") -> float | None:
    """Epoch seconds from a date ('2026-12-31' or '20261231'), an ISO 8601 time or a number
    (epoch seconds); None if blank.

    A bare date means the start of that local day, or with end=True the start of the next
    (valid_until is exclusive, so '2026-12-31' stays valid all that day). Times without an
    offset are local, like the box's clock.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise WatchlistError(f"{what}: {value!r} is not a date or time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise WatchlistError(f"{what}: {value!r} is not a date or time")
        if not (isinstance(value, int) and 10_000_000 <= value <= 99_999_999):
            return _epoch_number(float(value), what)
        value = str(value)  # a JSON 20261231 is the date the string '20261231' is
    if not isinstance(value, str):
        raise WatchlistError(f"{what}: {value!r} is not a date or time")
    text = value.strip()
    # '20261231' is a date (ISO 8601 basic form), not epoch seconds of 1970
    day_only = (len(text) == 8 and text.isdigit()) or (len(text) == 10 and text[4:5] == "-")
    try:
        if not day_only and text.replace(".", "", 1).isdigit():  # epoch seconds, as a CSV cell
            return _epoch_number(float(text), what)
        if day_only:
            day = date.fromisoformat(text)
            if end and day == date.max:  # 9999-12-31, "never": the last second there is
                return datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
            if end:
                day += timedelta(days=1)
            return datetime.combine(day, dtime()).timestamp()
        return _epoch(datetime.fromisoformat(text).timestamp(), what, text)
    except (ValueError, OverflowError):
        raise WatchlistError(
            f"{what}: {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time"
        ) from None


# how stored and synced rows are read: a new value makes the next sync read an unchanged list
# again, and the store's first open put its stored rows right (valid_until 0: no end)
_ROWS_READ = 2
FOLLOW_EVERY = 5.0  # s: how often match_event checks that the path still names its file
EPOCH_FLOOR = 946_684_800  # 2000-01-01: a smaller number is no time a list means


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, but never from https to http (a man in the middle could hand in
    allow entries that open a gate), and with the credentials kept on one host and port, over
    the same scheme or up to https (urllib dropped them on every redirect: a same-host 301
    answered 401)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if old.scheme == "https" and new.scheme != "https":
            raise urllib.error.URLError(f"redirected from https to {redact_url(newurl)}: "
                                        "refused, the list would travel unprotected")
        out = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if out is not None and auth and new.netloc == old.netloc and (
                new.scheme == old.scheme or new.scheme == "https"):  # or an upgrade to TLS
            out.add_unredirected_header("Authorization", auth)
        return out


_OPENER = urllib.request.build_opener(_Redirects)


def _epoch_number(seconds: float, what: str) -> float | None:
    """A number given as a time: epoch seconds, not before 2000 (0: no limit, as exports write
    "always"; a valid_until of 1970 made the entry never match, unseen). An Excel date serial
    (46387 for 2027-01-01) would be 1970's first day, expired unseen."""
    if seconds == 0:
        return None
    if 0 < seconds < EPOCH_FLOOR:
        raise WatchlistError(f"{what}: {seconds:.16g} as epoch seconds is before the year 2000 "
                             "(a spreadsheet's day number?): give a date (YYYY-MM-DD) or "
                             "epoch seconds")
    return _epoch(seconds, what)


def _epoch(seconds: float, what: str, given: str | None = None) -> float:
    """Epoch seconds of a time `iso_time` can print (UTC years 1-9999): a JavaScript time in
    milliseconds would be year 57000, never valid, and no command could print it. `given`:
    the ISO time they came from, for the message."""
    try:
        datetime.fromtimestamp(seconds, tz=UTC)
        return seconds
    except (ValueError, OverflowError, OSError):
        if given is not None:
            raise WatchlistError(f"{what}: {given!r} is after the year 9999 in UTC") from None
        raise WatchlistError(f"{what}: {seconds:.16g} is not a time up to the year 9999 (UTC; "
                             "epoch milliseconds?): give epoch seconds or a date (YYYY-MM-DD)"
                             ) from None


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace(
            "+00:00", "Z")
    except (ValueError, OverflowError, OSError):  # stored by an lprd that let it in
        return f"{ts:.16g}"


def check_action(action: str | None, what: str = "action") -> str | None:
    """Lower-case; None if blank. It becomes an MQTT topic level, hence the character set."""
    if action is None:
        return None
    text = str(action).strip().lower()
    if not text:
        return None
    if not _ACTION.match(text):
        raise WatchlistError(
            f"{what}: {action!r} must be 1-64 letters, digits, '_' or '-' (a topic level)")
    return text


def make_entry(
    fields: dict[str, Any],
    where: str = "entry",
    default_list: str = "default",
    default_action: str | None = None,
    origin: str = "local",
) -> WatchlistEntry:
    """One validated entry from a row: reserved keys (plate or tag, list, action, valid_from,
    valid_until, info) plus free metadata; keys are matched case-insensitively."""
    for key, value in fields.items():
        _check_utf8(key, f"{where}: key")  # a JSON key, "\udc80": SQLite cannot store it
        _check_utf8(value, f"{where}: {shown_path(str(key))}")
    lower = {str(k).strip().lower(): k for k in fields}
    raw = fields[lower["plate"]] if "plate" in lower else fields.get(lower.get("tag", ""), None)
    if raw is None or raw == "":
        raise WatchlistError(f"{where}: no plate (a 'plate' or 'tag' column)")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise WatchlistError(f"{where}: plate {raw!r} is not text")
    plate = normalize_plate(str(raw))
    foreign = "".join(ch for ch in unicodedata.normalize("NFKD", str(raw)).upper()
                      if ch.isalnum() and not ("A" <= ch <= "Z" or "0" <= ch <= "9"))
    if foreign:  # Cyrillic or Greek letters would be dropped, not matched: say so
        raise WatchlistError(f"{where}: plate {raw!r} has characters other than A-Z and 0-9 "
                             f"({foreign}); write it in Latin letters, as the reader reads it")
    if not plate:
        raise WatchlistError(f"{where}: plate {raw!r} has no letters or digits")
    if len(plate) > MAX_PLATE_CHARS:
        raise WatchlistError(f"{where}: plate {raw!r} is longer than {MAX_PLATE_CHARS} characters")
    list_raw = fields.get(lower.get("list", ""), None)
    list_name = str(list_raw).strip() if list_raw not in (None, "") else default_list
    if not is_list_name(list_name):
        raise WatchlistError(f"{where}: list name {list_raw!r} must be 1-64 printable characters")
    action_raw = fields.get(lower.get("action", ""), None)
    action = check_action(action_raw, f"{where}: action") if action_raw not in (None, "") \
        else default_action
    valid_from = parse_time(fields.get(lower.get("valid_from", ""), None),
                            what=f"{where}: valid_from")
    valid_until = parse_time(fields.get(lower.get("valid_until", ""), None), end=True,
                             what=f"{where}: valid_until")
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise WatchlistError(f"{where}: valid_until is not after valid_from")
    info: dict[str, Any] = {}
    reserved = {"list", "action", "valid_from", "valid_until", "info",
                "plate" if "plate" in lower else "tag"}
    for low, key in lower.items():
        if low in reserved:
            continue
        value = fields[key]
        if value == "" or value is None:  # an empty CSV cell means no value
            continue
        info[str(key).strip()] = value
    extra = fields.get(lower.get("info", ""), None)
    if extra not in (None, ""):
        if not isinstance(extra, dict):
            raise WatchlistError(f"{where}: info must be an object of metadata")
        info.update(extra)
    _check_info_keys(info, where)
    return WatchlistEntry(plate=plate, list=list_name, action=action, info=info,
                          valid_from=valid_from, valid_until=valid_until, origin=origin)


def _check_info_keys(info: dict[str, Any], where: str) -> None:
    """Metadata keys a CSV export can write as its columns and the import take back: not a
    column of its own (the export dropped 'list', and 'info' came back refused), not blank,
    not twice in two cases (the import takes a header without case)."""
    seen: dict[str, str] = {}
    for key in info:
        low = str(key).strip().lower()
        if low in _COLUMNS or low == "info":
            raise WatchlistError(f"{where}: info key {shown_path(str(key))!r} is the name of a "
                                 f"column ({', '.join(_COLUMNS)}, info): call it something else")
        if not low:
            raise WatchlistError(f"{where}: an info key is blank")
        if low in seen:
            raise WatchlistError(f"{where}: info keys {shown_path(seen[low])!r} and "
                                 f"{shown_path(str(key))!r} differ only in case or spaces")
        seen[low] = str(key)


def _check_utf8(value: Any, what: str) -> None:
    """WatchlistError unless every text in `value` is valid Unicode: a command-line argument
    that is not UTF-8 holds surrogates, which SQLite and JSON cannot store."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise WatchlistError(f"{what}: '{shown_path(value)}' is not valid UTF-8 text") \
                from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_utf8(k, what)
            _check_utf8(v, f"{what}: {shown_path(str(k))}")
    elif isinstance(value, list):
        for v in value:
            _check_utf8(v, what)


# A line with its line break, split where the csv module splits (\r\n, \r or \n), one at a
# time: str.splitlines made a list of the whole text, and io.StringIO takes four bytes a
# character of it.
_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")


def _lines(text: str) -> Iterator[str]:
    return map(re.Match.group, _LINE.finditer(text))


class _OtherReading(Exception):
    """The skipinitialspace reading of a CSV fails: the plain one is taken, from the start."""


def _csv_table(text: str, delimiter: str, skip: bool) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each row, as it is read: a list far over max_entries is refused
    before its rows take memory. A list typed by hand puts a space after each comma: only
    skipinitialspace (`skip`) reads '"stolen"' and '"Smith, John"' there as quoted cells, and
    with it a quote inside a cell ('"Ace" Towing') is an error, which the plain reading (the
    csv module's default) takes as text: the first reading that parses wins (_OtherReading)."""
    reader = csv.reader(_lines(text), strict=True, delimiter=delimiter, skipinitialspace=skip)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        if skip:
            raise _OtherReading from None
        raise WatchlistError(f"line {reader.line_num}: not valid CSV ({e})") from None


def _csv_rows(text: str, skip: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    first = next((line for line in _lines(text) if line.strip()), "")
    # A spreadsheet saved in a European locale separates by semicolons
    delimiter = ";" if ";" in first and "," not in first else ","
    table = _csv_table(text, delimiter, skip)
    try:
        yield from _csv_records(table)
    except WatchlistError:
        # A reading that fails further on is not the one taken: the rest decides (no rows kept)
        for _ in table:
            pass
        raise


def _csv_records(table: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    header: list[str] | None = None
    for line, row in table:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None and len(row) == 1 and any(ch.isdigit() for ch in row[0]):
            header = ["plate"]  # a plain list, one plate a line: no header word has digits
        if header == ["plate"] and any(c in row[0] for c in ";,\t|"):
            raise WatchlistError(f"line {line}: more than a plate in a list of "
                                 "one plate a line (give a header: plate,list,action ...)")
        if header is None:
            header = [h.strip() for h in row]
            lowered = [h.lower() for h in header]
            if "" in header:
                raise WatchlistError(f"line {line}: a header column has no name")
            if len(set(lowered)) != len(lowered):
                raise WatchlistError(f"line {line}: repeated header column")
            if "plate" not in lowered and "tag" not in lowered:
                raise WatchlistError(
                    f"line {line}: the header needs a 'plate' or 'tag' column "
                    f"(got {', '.join(header)})")
            continue
        if len(row) != len(header):
            raise WatchlistError(
                f"line {line}: {len(row)} fields where the header has "
                f"{len(header)} (truncated, or an unquoted comma?)")
        yield f"line {line}", {h: cell.strip() for h, cell in zip(header, row)}
    if header is None:
        raise WatchlistError("empty document: no CSV header")


def _no_constant(name: str) -> None:
    # Python's json writes NaN and Infinity; JSON has neither, and an event carrying one in
    # its watchlist info is refused by strict parsers (JavaScript's)
    raise WatchlistError(f"not valid JSON: {name} is not a JSON value (use null)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, Infinity to Python (and to JavaScript)
        raise WatchlistError(f"JSON number {text} is too large (use null or text)")
    return value


def _json_rows(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        doc = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise WatchlistError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") \
            from None
    except RecursionError:
        raise WatchlistError("not valid JSON: nested too deep") from None
    if isinstance(doc, dict):
        for key in ("entries", "plates"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
        else:
            raise WatchlistError("JSON must be a list of entries or {\"entries\": [...]}")
    if not isinstance(doc, list):
        raise WatchlistError("JSON must be a list of entries or {\"entries\": [...]}")
    for i, item in enumerate(doc, 1):
        if not isinstance(item, dict):
            raise WatchlistError(f"entry {i}: not an object")
        yield f"entry {i}", item


def detect_format(name: str = "", content_type: str | None = None, data: bytes = b"") -> str:
    """'csv' or 'json': by content type, then by the name's extension, then by the first byte."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        return "json"
    if ctype in ("text/csv", "application/csv", "text/comma-separated-values"):
        return "csv"
    if ctype in ("text/html", "application/xhtml+xml"):
        # A captive portal or an error page answered instead of the list server.
        raise WatchlistError(f"got {ctype}, not a CSV or JSON list")
    suffix = Path(urllib.parse.urlparse(name).path if "://" in name else name).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return "json" if head in (b"[", b"{") else "csv"


def parse_document(
    data: bytes, fmt: str, default_list: str = "default", default_action: str | None = None,
    origin: str = "local", max_entries: int | None = None, merge_duplicates: bool = False,
    merge_times: list[float] | None = None,
) -> list[WatchlistEntry]:
    """A whole CSV or JSON list, validated: any bad row rejects the document (names the rows).
    More than `max_entries` rows reject it too, before they all take memory. A plate twice on
    one list is a bad row too, unless `merge_duplicates` (a sync: real exports repeat rows, and
    rejecting the list would keep every later change out): a row valid now before one that is
    not, then the safest action (deny, alert, ... allow), then the first; the merge is
    logged. `merge_times` gets the times to come at which a merged pair's rows start or stop
    being valid: the choice made now may be another then."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WatchlistError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    if "\x00" in text:
        raise WatchlistError("binary data, not a CSV or JSON list")
    now = time.time()

    def read(rows: Iterator[tuple[str, dict[str, Any]]]) -> list[WatchlistEntry]:
        return _entries(rows, default_list, default_action, origin, max_entries,
                        merge_duplicates, now, merge_times)

    if fmt == "json":
        return read(_json_rows(text))
    try:
        return read(_csv_rows(text, skip=True))
    except _OtherReading:
        return read(_csv_rows(text, skip=False))


def _entries(rows: Iterator[tuple[str, dict[str, Any]]], default_list: str,
             default_action: str | None, origin: str, max_entries: int | None,
             merge_duplicates: bool, now: float, merge_times: list[float] | None = None
             ) -> list[WatchlistEntry]:
    """parse_document's entries from one reading of the document, row by row."""
    entries: list[WatchlistEntry] = []
    seen: dict[tuple[str, str], str] = {}
    kept: dict[tuple[str, str], int] = {}  # with merge_duplicates: the entry's index
    repeats: dict[tuple[str, str], list[WatchlistEntry]] = {}  # a merged plate's rows, in order
    merged: list[str] = []
    problems: list[str] = []
    with _gc_paused():
        for n, (where, fields) in enumerate(rows, 1):
            if max_entries is not None and n > max_entries:
                raise WatchlistError(f"more than {max_entries} entries (watchlist.sync."
                                     "max_entries; about 1.5 kB of memory each while a sync runs)")
            try:
                entry = make_entry(fields, where, default_list, default_action, origin)
            except WatchlistError as e:
                problems.append(str(e))
                continue
            key = (entry.plate, entry.list)
            first = seen.setdefault(key, where)
            if first != where:
                if not merge_duplicates:
                    problems.append(
                        f"{where}: {entry.plate} is already on list {entry.list!r} ({first})")
                    continue
                merged.append(f"{where}: {entry.plate} ({first})")
                repeats.setdefault(key, [entries[kept[key]]]).append(entry)
                if _merge_rank(entry, now) < _merge_rank(entries[kept[key]], now):
                    entries[kept[key]] = entry
                continue
            kept[key] = len(entries)
            entries.append(entry)
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
        more = len(problems) - _MAX_PROBLEMS_SHOWN
        raise WatchlistError(f"{len(problems)} bad row(s): {shown}"
                             + (f"; and {more} more" if more > 0 else ""))
    if merge_times is not None:
        merge_times.extend(t for rows in repeats.values()
                           if (t := _next_choice(rows, now)) is not None)
    if merged:
        more = len(merged) - _MAX_PROBLEMS_SHOWN
        log.warning("watchlist list: %d row(s) repeat a plate of their list and were merged "
                    "(the safest action kept): %s%s", len(merged),
                    "; ".join(merged[:_MAX_PROBLEMS_SHOWN]),
                    f"; and {more} more" if more > 0 else "")
    return entries


def _merge_rank(entry: WatchlistEntry, now: float) -> tuple[bool, int]:
    return not entry.active(now), action_rank(entry.action)


def _chosen(rows: list[WatchlistEntry], now: float) -> WatchlistEntry:
    """The row a merge keeps at `now` (the first of the best: min is stable)."""
    return min(rows, key=lambda e: _merge_rank(e, now))


def _next_choice(rows: list[WatchlistEntry], now: float) -> float | None:
    """When a repeated plate's merge would keep another of its rows than now, if ever."""
    now_row = _chosen(rows, now)
    for t in sorted({t for e in rows for t in (e.valid_from, e.valid_until)
                     if t is not None and t > now}):
        if _chosen(rows, t) is not now_row:
            return t
    return None


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def dump_csv(entries: Iterable[WatchlistEntry]) -> str:
    """The import format: plate, list, action, valid_from, valid_until, then the info keys."""
    entries = list(entries)
    # One column per key whatever its case ("Owner" from a CSV header, "owner" from `add
    # --info`): the import takes header names without case, and refuses them twice.
    names: dict[str, str] = {}
    for k in sorted({k for e in entries for k in e.info}):
        if k.lower() not in _COLUMNS:
            names.setdefault(k.lower(), k)
    info_keys = sorted(names, key=lambda low: names[low])
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*_COLUMNS, *(names[low] for low in info_keys)])
    for e in entries:
        info = {k.lower(): v for k, v in e.info.items()}
        w.writerow([e.plate, e.list, e.action or "", iso_time(e.valid_from) or "",
                    iso_time(e.valid_until) or "", *(_cell(info.get(k, "")) for k in info_keys)])
    return out.getvalue()


def entry_dict(e: WatchlistEntry) -> dict[str, Any]:
    return {"plate": e.plate, "list": e.list, "action": e.action,
            "valid_from": iso_time(e.valid_from), "valid_until": iso_time(e.valid_until),
            "info": dict(e.info)}


def dump_json(entries: Iterable[WatchlistEntry]) -> str:
    return json.dumps([entry_dict(e) for e in entries], ensure_ascii=False, indent=1) + "\n"


# ---------------------------------------------------------------- sync records


@dataclass(frozen=True)
class SyncStatus:
    """What the last syncs did; kept in the store, so the service and the CLI both see it."""

    source: str | None = None
    last_attempt: float | None = None
    last_success: float | None = None  # the source answered with a usable list (or 304)
    last_change: float | None = None  # a new list was swapped in
    last_sync_ok: bool | None = None  # None: never tried
    last_error: str | None = None
    entries: int = 0  # synced entries now in the store
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    defaults: str | None = None  # sync.list and sync.action the list was read with
    # a repeated plate's rows were merged by what was valid then; from this time another of
    # them is (a permit renewed in a second row): the list is read again, unchanged or not
    remerge_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """For the state topic and `lprd watchlist status --json` (times as ISO 8601; the
        source without its password and query string, which the stored one keeps to compare)."""
        d = asdict(self)
        if self.source and "://" in self.source:
            d["source"] = redact_source(self.source, drop_query=True)
        for k in ("last_attempt", "last_success", "last_change"):
            d[k] = iso_time(d[k])
        for internal in ("sha256", "defaults", "remerge_at"):
            d.pop(internal)
        return d


@dataclass(frozen=True)
class SyncResult:
    ok: bool
    changed: bool  # a new list was swapped in
    entries: int  # synced entries in the store afterwards
    error: str | None = None
    not_modified: bool = False  # 304, or the same content again
    bytes: int = 0
    seconds: float = 0.0
    requests: tuple[Any, ...] = ()  # what request() was given for this sync (commands)


# ---------------------------------------------------------------- the store


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _opens(path: Path) -> bool:
    """Whether `path` is a SQLite file this process can read now."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=1.0)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return True
    except sqlite3.Error:
        return False


def _corrupt(path: Path) -> bool:
    """True when SQLite finds `path` damaged (not merely locked or missing)."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30.0)) as conn:
            return conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.OperationalError:
        return False
    except sqlite3.DatabaseError:
        return True


class Watchlist:
    """The SQLite store. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: Path, cfg: WatchlistConfig | None = None,
                 recover: bool = False, busy_timeout: float = 30.0, index: bool = True,
                 progress: Callable[[], None] | None = None) -> None:
        """`recover`: a corrupt file is moved aside and a new, empty store started (the
        daemon's choice: a sync fills it again; the CLI reports the error instead).
        `busy_timeout`: how long to wait for another connection's write lock (a swap, an
        index rebuild) before sqlite3.OperationalError. `index`: build the fuzzy index where
        max_distance needs a deeper one or its format changed (a minute or two for 500,000
        entries), calling `progress` now and then meanwhile; without it (the daemon's sync,
        which only writes: its rows take the depth stored) a stale index is left to the
        process that matches, and lookups here scan."""
        self.path = Path(path)
        self.cfg = cfg or WatchlistConfig()
        self._busy_timeout = busy_timeout
        self._followed = time.monotonic()  # match_event's last look at the file
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._recover = recover
        self._index, self._progress = index, progress
        self._gen = 0  # bumped when the path names a new file: connections reopen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except BaseException:  # its connection would stay open until a garbage collection
            self._drop_own()
            raise

    def _open(self) -> None:
        try:
            self._prepare()
        except sqlite3.OperationalError:  # locked, disk full, read-only: not corruption
            raise
        except sqlite3.DatabaseError as e:
            if not self._recover:
                raise WatchlistError(f"{self.path}: unreadable ({e})") from None
            self._drop_own()
            self._move_aside(e)
            self._gen += 1  # the others reopen at their next query (none closed under it)
            self._prepare()
        self._file = self._file_now()

    def _file_now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def follow_file(self) -> bool:
        """Reopen the store where its path now names another file, and say so: the inference
        process moved a corrupt file aside and started an empty one, and this process's
        connections still reach the moved file (a sync would fill that one)."""
        now = self._file_now()
        if now == self._file:
            return False
        if now is None or not _opens(self.path):
            # deleted (its -wal and -shm maybe left behind: a new file beside them is damaged
            # until every connection to the old one closes), or not a store yet: the old one
            # goes on answering, and the path is looked at again later
            return False
        log.warning("watchlist %s was replaced, moved or deleted (a damaged file moved aside, a "
                    "list started afresh); opening the file there now", self.path)
        # each thread reopens at its next query: one closing another's mid-query failed it
        self._gen += 1
        self._open()
        return True

    def _move_aside(self, error: Exception) -> None:
        # The inference process and the sync open the store at once: one moves it, the other
        # finds the new one (the lock, and the check under it).
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _corrupt(self.path):
                return
            aside = move_aside(self.path, int(time.time()))
            log.error("watchlist %s is unreadable (%s); moved it to %s and started an empty "
                      "one: a sync fills it again, entries added by hand are in the moved file",
                      self.path, error, aside)
        finally:
            os.close(fd)

    def _prepare(self) -> None:
        conn = self._conn()
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        # Read first: the write lock would wait behind a sync's swap of the whole list.
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = self._meta(conn, "schema") if "meta" in have else None
        if version is None or not _TABLES <= have:
            with self._write(conn):
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                version = self._meta(conn, "schema")
                if version is None:
                    self._set_meta(conn, "schema", str(SCHEMA_VERSION))
                    version = str(SCHEMA_VERSION)
        if int(version) != SCHEMA_VERSION:
            raise WatchlistError(f"{self.path}: schema {version}, this lprd knows "
                                 f"{SCHEMA_VERSION}")
        if self._meta(conn, "rows_read") != str(_ROWS_READ):
            # entries stored with valid_until 0 (epoch 1970: never matched) meant no end; a
            # store this user may only read is put right by the next that may write
            with contextlib.suppress(sqlite3.OperationalError), self._write(conn):
                for o in ORIGINS:
                    conn.execute(f"UPDATE entries_{o} SET valid_until = NULL "
                                 "WHERE valid_until = 0")
                self._set_meta(conn, "rows_read", str(_ROWS_READ))
        self.configure(self.cfg)

    @classmethod
    def from_config(cls, cfg: Config, busy_timeout: float = 30.0, index: bool = True,
                    progress: Callable[[], None] | None = None) -> Watchlist:
        """The daemon's store: <storage.dir>/watchlist.sqlite (a corrupt one moved aside)."""
        return cls(cfg.storage.dir / DB_NAME, cfg.watchlist, recover=True,
                   busy_timeout=busy_timeout, index=index, progress=progress)

    # -- connections and transactions

    def _conn(self) -> sqlite3.Connection:
        if getattr(self._local, "gen", self._gen) != self._gen:  # the file was replaced
            self._drop_own()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: every transaction below is explicit. check_same_thread is off
            # only so close() can close other threads' connections; each thread uses its own.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a sync's swap
                # FULL: `lprd watchlist remove` said "removed" and a power cut soon after
                # could bring the plate back (commits are few: a sync's swap, the CLI's edits)
                conn.execute("PRAGMA synchronous=FULL")
                # A swap of a big list grows the WAL to the list's size; give the disk back.
                conn.execute("PRAGMA journal_size_limit=4194304")
            except sqlite3.Error:  # not a database: the caller moves it aside or reports it
                conn.close()
                raise
            self._local.conn, self._local.gen = conn, self._gen
            with self._conns_lock:
                # Threads come and go (a sync on SIGHUP): close what finished threads left.
                for t, c in self._conns:
                    if not t.is_alive():
                        c.close()
                self._conns = [(t, c) for t, c in self._conns if t.is_alive()]
                self._conns.append((threading.current_thread(), conn))
        return conn

    def _drop_own(self) -> None:
        """Close this thread's connection (another thread's may be mid-query)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with self._conns_lock:
                self._conns = [(t, c) for t, c in self._conns if c is not conn]
            conn.close()
            self._local.conn = None

    class _Txn:
        def __init__(self, conn: sqlite3.Connection, begin: str) -> None:
            self.conn, self.begin = conn, begin

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute(self.begin)
            return self.conn

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                except BaseException:  # disk full or I/O error: never stay in a transaction
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            elif self.conn.in_transaction:  # SQLite may have rolled back already (disk full)
                self.conn.execute("ROLLBACK")

    def _write(self, conn: sqlite3.Connection) -> Watchlist._Txn:
        return Watchlist._Txn(conn, "BEGIN IMMEDIATE")

    def _read(self, conn: sqlite3.Connection) -> Watchlist._Txn:
        return Watchlist._Txn(conn, "BEGIN")

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        """Close this thread's connection and those finished threads left. A live thread's
        is its own to close (a sync's, when it ends): closing it under a running query crashes
        the process (SQLite frees what the query is using)."""
        me = threading.current_thread()
        with self._conns_lock:
            for t, conn in self._conns:
                if t is me or not t.is_alive():
                    conn.close()
            self._conns = [(t, c) for t, c in self._conns if t is not me and t.is_alive()]
        self._local.conn = None  # other live threads keep theirs (and their locals)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the fuzzy index

    def configure(self, cfg: WatchlistConfig) -> None:
        """Take a new config (SIGHUP); deepens the stored index if max_distance needs it."""
        self.cfg = cfg
        self._depth = index_depth(cfg.max_distance)
        conn = self._conn()

        def current() -> bool:
            stored = self._meta(conn, "index_depth")
            return (self._meta(conn, "index_hash") == _INDEX_HASH and stored is not None
                    and int(stored) >= self._depth)

        # Read first: the write lock would wait behind a sync's swap of the whole list, and the
        # index is nearly always current already.
        if current():
            return
        if not self._index:
            self._depth = -1  # lookups scan the list (match's path for a shallow index)
            return
        progress = self._progress or (lambda: None)
        with self._write(conn):
            if current():  # another process rebuilt it meanwhile
                return
            stored = self._meta(conn, "index_depth")
            # The stored depth never shrinks: another process may be matching with it.
            depth = max(self._depth, int(stored or 0))
            t0 = time.monotonic()
            n = 0
            total = sum(conn.execute(f"SELECT COUNT(*) FROM entries_{o}").fetchone()[0]
                        for o in ORIGINS)
            if total:  # minutes for a long list: the journal says why nothing else happens
                log.info("watchlist: building the fuzzy index (depth %d) for %d entries; "
                         "matching waits for it", depth, total)
            for o in ORIGINS:
                conn.execute(f"DELETE FROM keys_{o}")
                rows = conn.execute(f"SELECT id, plate FROM entries_{o}").fetchall()
                # sorted in runs and merged (one sort of millions of keys was 20 s without a
                # progress call), inserted in key order as one
                runs: list[list[tuple[str, int]]] = []
                for j in range(0, len(rows), INDEX_CHUNK):
                    runs.append(sorted((k, i) for i, p in rows[j:j + INDEX_CHUNK]
                                       for k in index_keys(p, depth)))
                    progress()
                merged = heapq.merge(*runs)
                while batch := list(itertools.islice(merged, INDEX_CHUNK * 20)):
                    conn.executemany(f"INSERT INTO keys_{o} (key, entry_id) VALUES (?, ?)",
                                     batch)
                    progress()
                n += len(rows)
            self._set_meta(conn, "index_depth", str(depth))
            self._set_meta(conn, "index_hash", _INDEX_HASH)
            if n:
                log.info("watchlist: rebuilt the fuzzy index (depth %d) for %d entries in %.1f s",
                         depth, n, time.monotonic() - t0)

    def _insert(self, conn: sqlite3.Connection, entries: Sequence[WatchlistEntry],
                origin: str) -> None:
        with _gc_paused():
            self._insert_rows(conn, entries, origin)

    def _insert_rows(self, conn: sqlite3.Connection, entries: Sequence[WatchlistEntry],
                     origin: str) -> None:
        depth = int(self._meta(conn, "index_depth") or 0)
        first = conn.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM entries_{origin}").fetchone()[0]
        # In plate order, so the rows and the plate index are appended, not inserted at random.
        rows = sorted(entries, key=lambda e: (e.plate, e.list))
        conn.executemany(
            f"INSERT INTO entries_{origin} (id, plate, list, action, info, valid_from, valid_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(i, e.plate, e.list, e.action, _to_json(e.info), e.valid_from, e.valid_until)
             for i, e in enumerate(rows, first)])
        # Sorted, the key index is appended to as well (about twice as fast as random order).
        conn.executemany(f"INSERT INTO keys_{origin} (key, entry_id) VALUES (?, ?)", sorted(
            (k, i) for i, e in enumerate(rows, first) for k in index_keys(e.plate, depth)))

    def _delete(self, conn: sqlite3.Connection, origin: str,
                rows: Sequence[tuple[int, str]]) -> None:
        depth = int(self._meta(conn, "index_depth") or 0)
        conn.executemany(f"DELETE FROM keys_{origin} WHERE key = ? AND entry_id = ?",
                         [(k, i) for i, p in rows for k in index_keys(p, depth)])
        conn.executemany(f"DELETE FROM entries_{origin} WHERE id = ?", [(i,) for i, _ in rows])

    # -- lookups

    @staticmethod
    def _entry(row: tuple) -> WatchlistEntry:
        return WatchlistEntry(plate=row[0], list=row[1], action=row[2], info=json.loads(row[3]),
                              valid_from=row[4], valid_until=row[5], origin=row[6])

    @staticmethod
    def _union(sql: str) -> str:
        """The same query over both origins' tables ({o} stands for the origin)."""
        return " UNION ALL ".join(sql.replace("{o}", o) for o in ORIGINS)

    def match_event(self, ev: PlateEvent) -> PlateEvent:
        """`ev` with its watchlist match; a failed lookup is logged and the event goes out
        unmatched (a broken store must not hold back the plate's event)."""
        try:
            # The file may have been replaced or deleted under the daemon (an admin starting
            # the list afresh): `lprd watchlist` edits the file the path names now.
            if time.monotonic() - self._followed >= FOLLOW_EVERY:
                self._followed = time.monotonic()
                self.follow_file()
            return replace(ev, watchlist=self.match(ev.plate, ev.candidates))
        except Exception as e:  # noqa: BLE001
            log.error("watchlist lookup of %s failed: %s", ev.plate, e)
            return ev

    def match(self, plate: str, candidates: Sequence[Candidate] = (),
              now: float | None = None, max_distance: float | None = None) -> WatchlistMatch:
        """What the daemon attaches to an event: exact first, then OCR-weighted fuzzy, over the
        read and (cfg.candidates) the reader's candidates. One read transaction: one snapshot,
        so a sync's swap shows the old list or the new one, never a mix. `max_distance`
        overrides the config's once (`watchlist match --max-distance`): deeper than the stored
        index, every entry is compared (deepened for it, the index stayed so for good)."""
        cfg = self.cfg
        if max_distance is not None:
            cfg = cfg.model_copy(update={"max_distance": max_distance})
        if not cfg.enabled:
            return WatchlistMatch.none()
        queries = query_strings(plate, candidates, cfg.candidates)
        if not queries:
            return WatchlistMatch.none()
        now = time.time() if now is None else now
        texts = [q[0] for q in queries]
        marks = ",".join("?" * len(texts))
        conn = self._conn()
        with self._read(conn):
            rows = conn.execute(self._union(
                f"SELECT {_COLS}, '{{o}}' FROM entries_{{o}} e WHERE e.plate IN ({marks})"),
                texts * len(ORIGINS)).fetchall()
            read_exact = queries[0][1] == "read" and any(
                r[0] == texts[0] and self._entry(r).active(now) for r in rows)
            if not read_exact and index_depth(cfg.max_distance) > self._depth:
                rows += conn.execute(self._union(
                    f"SELECT {_COLS}, '{{o}}' FROM entries_{{o}} e")).fetchall()
            elif not read_exact and cfg.max_distance > 0:
                keys = sorted({k for t in texts if len(t) >= cfg.fuzzy_min_chars
                               for k in index_keys(t, self._depth)})
                if keys:
                    marks = ",".join("?" * len(keys))
                    rows += conn.execute(self._union(
                        f"SELECT {_COLS}, '{{o}}' FROM keys_{{o}} k JOIN entries_{{o}} e "
                        f"ON e.id = k.entry_id WHERE k.key IN ({marks})"),
                        keys * len(ORIGINS)).fetchall()
        return match_entries(plate, candidates, (self._entry(r) for r in set(rows)),
                             cfg.max_distance, now, use_candidates=cfg.candidates,
                             fuzzy_min_chars=cfg.fuzzy_min_chars,
                             allow_max_distance=cfg.allow_max_distance)

    def entries(self, list_name: str | None = None, plate: str | None = None,
                origin: str | None = None) -> list[WatchlistEntry]:
        where, params = "", []
        for col, val in (("list", list_name), ("plate", plate)):
            if val is not None:
                where += f" AND e.{col} = ?"
                params.append(val)
        origins = ORIGINS if origin is None else (origin,)
        sql = " UNION ALL ".join(f"SELECT {_COLS}, '{o}' FROM entries_{o} e WHERE 1{where}"
                                 for o in origins)
        conn = self._conn()
        with self._read(conn):
            rows = conn.execute(sql + " ORDER BY 1, 2, 7", params * len(origins)).fetchall()
        return [self._entry(r) for r in rows]

    def count(self, origin: str | None = None, list_name: str | None = None) -> int:
        where, params = ("", ()) if list_name is None else (" WHERE list = ?", (list_name,))
        conn = self._conn()
        with self._read(conn):
            return sum(conn.execute(f"SELECT COUNT(*) FROM entries_{o}{where}", params)
                       .fetchone()[0] for o in (ORIGINS if origin is None else (origin,)))

    # -- local edits (CLI)

    def add(self, entry: WatchlistEntry) -> WatchlistEntry:
        """Insert or replace the local entry for (plate, list)."""
        return self.import_entries([entry])[0]

    def import_entries(self, entries: Sequence[WatchlistEntry],
                       replace_all: bool = False) -> list[WatchlistEntry]:
        """Add local entries in one transaction (replacing those with the same plate and list);
        replace_all drops every other local entry first. Synced entries are left alone."""
        seen: set[tuple[str, str]] = set()
        clean = []
        for e in entries:
            if (e.plate, e.list) in seen:
                raise WatchlistError(f"{e.plate} is twice on list {e.list!r}")
            seen.add((e.plate, e.list))
            clean.append(replace(e, origin="local"))
        conn = self._conn()
        with self._write(conn):
            if replace_all:
                conn.execute("DELETE FROM keys_local")
                conn.execute("DELETE FROM entries_local")
            else:
                old = []
                for e in clean:
                    old += conn.execute(
                        "SELECT id, plate FROM entries_local WHERE plate = ? AND list = ?",
                        (e.plate, e.list)).fetchall()
                self._delete(conn, "local", old)
            self._insert(conn, clean, "local")
        return clean

    def remove(self, plate: str, list_name: str | None = None) -> list[WatchlistEntry]:
        """Remove the plate (from one list or all). A removed synced entry comes back with the
        next changed list from the source."""
        norm = normalize_plate(plate)
        gone: list[WatchlistEntry] = []
        conn = self._conn()
        with self._write(conn):
            for o in ORIGINS:
                sql = f"SELECT e.id, {_COLS}, '{o}' FROM entries_{o} e WHERE e.plate = ?"
                params: list[Any] = [norm]
                if list_name is not None:
                    sql += " AND e.list = ?"
                    params.append(list_name)
                rows = conn.execute(sql, params).fetchall()
                self._delete(conn, o, [(r[0], r[1]) for r in rows])
                gone += [self._entry(r[1:]) for r in rows]
        return gone

    # -- sync support

    def sync_status(self) -> SyncStatus:
        return self._sync_status(self._conn())

    def _sync_status(self, conn: sqlite3.Connection) -> SyncStatus:
        raw = self._meta(conn, "sync")
        if not raw:
            return SyncStatus()
        known = SyncStatus.__dataclass_fields__
        return SyncStatus(**{k: v for k, v in json.loads(raw).items() if k in known})

    def write_sync_status(self, status: SyncStatus) -> None:
        conn = self._conn()
        with self._write(conn):
            self._set_meta(conn, "sync", json.dumps(asdict(status)))

    def update_sync_status(self, change: Callable[[SyncStatus], SyncStatus | None]
                           ) -> SyncStatus | None:
        """Write change(the stored status) in the transaction that read it, so another
        process's swap cannot fall in between and be described by an older status; `change`
        returning None writes nothing (and None is returned)."""
        conn = self._conn()
        with self._write(conn):
            status = change(self._sync_status(conn))
            if status is not None:
                self._set_meta(conn, "sync", json.dumps(asdict(status)))
        return status

    def replace_synced(self, entries: Sequence[WatchlistEntry], status: SyncStatus) -> SyncStatus:
        """Swap in a whole synced list and its status in ONE transaction (old or new, no mix)."""
        conn = self._conn()
        with self._write(conn):
            conn.execute("DELETE FROM keys_sync")  # whole tables: SQLite's fast truncate
            conn.execute("DELETE FROM entries_sync")
            self._insert(conn, entries, "sync")
            status = replace(status, entries=len(entries))
            self._set_meta(conn, "sync", json.dumps(asdict(status)))
        # The swap grew the WAL to the list's size: fold it back now, not at the next write.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return status


# ---------------------------------------------------------------- sync


@dataclass(frozen=True)
class _Fetched:
    data: bytes
    fmt: str
    etag: str | None = None
    last_modified: str | None = None


def redact_url(url: str) -> str:
    """For logs: no user:password@ and no query string (either may carry a secret)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL Python can take apart: nothing of it is shown
        return f"{url.split('://', 1)[0]}://***"
    host = p.netloc.rpartition("@")[2]  # as written: a port that is no number raises in p.port
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def _scrub(text: str, source: str) -> str:
    """`text` without the password or the query string of the source URL where they appear
    as in a URL (':password@', '?query'), as written or decoded: the last guard (messages
    name the source by redact_url, which drops both). Not every occurrence: a password 'e'
    made 'Conn***ction r***fus***d'."""
    if "://" not in source:  # a file path: '?' in it is no query
        return text
    try:
        p = urllib.parse.urlsplit(source)
    except ValueError:
        return text
    forms = []
    for pw in {p.password, urllib.parse.unquote(p.password or "")}:
        if pw:
            forms += [(f":{pw}@", ":***@"), (f":{repr(pw)[1:-1]}@", ":***@")]
    if p.query:
        forms += [(f"?{p.query}", "?***"), (f"?{repr(p.query)[1:-1]}", "?***")]
    for secret, shown in forms:
        text = text.replace(secret, shown)
    return text


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """The URL without its user:password@ (urllib takes the password for a port) and the
    HTTP Basic credentials it held (percent-decoded, as RFC 3986 writes them), or None."""
    p = urllib.parse.urlsplit(url)
    userinfo, at, host = p.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return (urllib.parse.urlunsplit(p._replace(netloc=host)),
            base64.b64encode(pair.encode("utf-8")).decode("ascii"))


class WatchlistSync:
    """Fetches cfg.source every cfg.interval seconds and swaps it into the store.

    urllib (standard library) rather than requests: one GET with two conditional headers
    needs no extra dependency on an edge box.
    """

    def __init__(self, watchlist: Watchlist, cfg: SyncConfig,
                 on_result: Callable[[SyncResult, SyncStatus], None] | None = None) -> None:
        self.watchlist = watchlist
        self.cfg = cfg
        self.on_result = on_result
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one sync at a time (thread and CLI/SIGHUP)
        self._requests: list[Any] = []  # request() tags for the next sync of the thread
        self._requests_lock = threading.Lock()

    def status(self) -> SyncStatus:
        return self.watchlist.sync_status()

    # -- fetching

    def _token(self) -> str | None:
        if self.cfg.token_file is None:
            return None
        try:
            data = self.cfg.token_file.read_bytes()
        except OSError as e:
            raise SyncError(f"cannot read token_file {self.cfg.token_file}: {e.strerror}") \
                from None
        why = token_problem(data)
        if why is not None:
            raise SyncError(f"token_file {self.cfg.token_file} {why}")
        return data.strip().decode("ascii")

    def _fetch_http(self, source: str, etag: str | None,
                    last_modified: str | None) -> _Fetched | None:
        deadline = time.monotonic() + self.cfg.timeout
        where = redact_url(source)
        url, basic = _split_userinfo(source)
        token = self._token()
        if token and basic:
            raise SyncError(f"{where}: the URL has a user and password and token_file is set: "
                            "give one of them")
        req = urllib.request.Request(url, headers={
            "Accept": "text/csv, application/json;q=0.9, */*;q=0.1",
            "User-Agent": f"lprd/{__version__}",
        })
        if etag:
            req.add_header("If-None-Match", etag)
        if last_modified:
            req.add_header("If-Modified-Since", last_modified)
        # Unredirected: a redirect to another host must not carry the credentials along
        # (_Redirects passes them on to the same host and port, same scheme or up to https).
        if token:
            req.add_unredirected_header("Authorization", f"Bearer {token}")
        elif basic:
            req.add_unredirected_header("Authorization", f"Basic {basic}")
        try:
            resp = _OPENER.open(req, timeout=self.cfg.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 304:
                return None
            raise SyncError(f"{where}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise SyncError(f"{where}: cannot fetch ({e.reason})") from None
        except http.client.InvalidURL:  # its text quotes the URL, query string and all
            raise SyncError(f"{where}: not a URL that HTTP can request (a space or a control "
                            "character in it, or a port that is no number?)") from None
        except ValueError:  # a header http.client refuses; its text quotes the header
            raise SyncError(f"{where}: cannot fetch (a character HTTP cannot send in the URL "
                            "or in a header)") from None
        except (OSError, http.client.HTTPException) as e:
            raise SyncError(f"{where}: cannot fetch ({e})") from None
        with resp:
            length_hdr = resp.headers.get("Content-Length")
            length = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
            if length is not None and length > self.cfg.max_bytes:
                raise SyncError(f"{where}: list of {length} bytes is larger than max_bytes "
                                f"({self.cfg.max_bytes})")
            chunks: list[bytes] = []
            total = 0
            try:
                while True:
                    if self._stopping:
                        raise SyncError(f"{where}: download abandoned, lprd is stopping")
                    if time.monotonic() > deadline:
                        raise SyncError(f"{where}: download took longer than {self.cfg.timeout} s "
                                        f"({total} bytes so far)")
                    chunk = resp.read1(_READ_CHUNK)  # read1: a slow server cannot stall us
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.cfg.max_bytes:
                        raise SyncError(f"{where}: list is larger than max_bytes "
                                        f"({self.cfg.max_bytes}); download aborted")
                    chunks.append(chunk)
            except http.client.IncompleteRead as e:
                raise SyncError(f"{where}: truncated download ({total + len(e.partial)} bytes, "
                                "connection closed early)") from None
            except (OSError, http.client.HTTPException) as e:
                raise SyncError(f"{where}: download failed after {total} bytes ({e})") from None
            if length is not None and total != length:
                raise SyncError(f"{where}: truncated download ({total} of {length} bytes)")
            data = b"".join(chunks)
            charset = resp.headers.get_content_charset()
            if charset and not _is_utf8(data):
                # A spreadsheet's export (windows-1252, latin-1): the parser reads UTF-8. Text
                # that is UTF-8 stays so whatever the header says (servers default to latin-1).
                try:
                    data = data.decode(charset).encode("utf-8")
                except (LookupError, UnicodeDecodeError) as e:
                    raise SyncError(f"{where}: not UTF-8, and not its declared charset "
                                    f"{charset!r} either ({e})") from None
            try:
                fmt = detect_format(url, resp.headers.get("Content-Type"), data)
            except WatchlistError as e:
                raise SyncError(f"{where}: {e}") from None
            if length is None and not resp.chunked and fmt == "csv" \
                    and not data.endswith((b"\n", b"\r")):
                # The body ends where the connection closed: nothing tells a list cut in its
                # last rows (with a partial plate) from a whole one but the last line break.
                raise SyncError(f"{where}: the server sent no length and the list does not end "
                                "with a line break: it may be cut short (send Content-Length, "
                                "or end the list with a newline)")
            return _Fetched(data, fmt, resp.headers.get("ETag"), resp.headers.get("Last-Modified"))

    def _fetch_file(self, path: Path, etag: str | None) -> _Fetched | None:
        try:
            st = path.stat()
            if st.st_size > self.cfg.max_bytes:
                raise SyncError(f"{path}: {st.st_size} bytes is larger than max_bytes "
                                f"({self.cfg.max_bytes})")
            stamp = f"file:{st.st_mtime_ns}:{st.st_size}"
            if stamp == etag:
                return None
            with path.open("rb") as f:
                data = f.read(st.st_size + 1)  # not max_bytes: read() allocates that first
                after = os.fstat(f.fileno())
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) \
                    or len(data) != st.st_size:
                # Written to while we read: a cut at a row boundary would still parse.
                raise SyncError(f"{path}: changed while it was read; the next sync tries again")
        except OSError as e:
            raise SyncError(f"{path}: cannot read ({e.strerror})") from None
        if len(data) > self.cfg.max_bytes:
            raise SyncError(f"{path}: larger than max_bytes ({self.cfg.max_bytes})")
        try:
            fmt = detect_format(str(path), None, data)
        except WatchlistError as e:
            raise SyncError(f"{path}: {e}") from None
        if fmt == "csv" and data and not data.endswith((b"\n", b"\r")):
            self._settle(path, st)
        return _Fetched(data, fmt, stamp)

    def _settle(self, path: Path, st: os.stat_result) -> None:
        """A CSV without a final line break may be a file rewritten in place (a cron job's
        curl -o, scp) read half written: its last row, a partial plate, would parse. One
        written in the last FILE_SETTLE seconds is taken once it stayed the same until then
        (a list that ends without a line break, as some editors leave it, is not refused)."""
        now = time.time()
        if now - st.st_mtime >= FILE_SETTLE:
            return
        # a date in the future (a share whose server's clock runs ahead): FILE_SETTLE from now
        end = min(st.st_mtime, now) + FILE_SETTLE
        while time.time() < end and not self._stopping:
            time.sleep(0.05)
        try:
            after = path.stat()
        except OSError as e:
            raise SyncError(f"{path}: cannot read ({e.strerror})") from None
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise SyncError(f"{path}: changed while it was read (being written?); the next "
                            "sync tries again")

    def _defaults(self) -> str:
        # with how the rows are read: an upgrade that reads them otherwise (valid_until 0
        # as no end, merged rows' next choice) reads the unchanged list again
        return json.dumps([self.cfg.list, self.cfg.action, _ROWS_READ])

    def _fetch(self, source: str, status: SyncStatus) -> _Fetched | None:
        # Validators of another source, or of the same read with other defaults, mean nothing.
        same = status.source == source and status.defaults == self._defaults()
        etag = status.etag if same else None
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(source, etag, status.last_modified if same else None)
        if scheme == "file":
            return self._fetch_file(Path(file_url_path(source)), etag)
        if "://" in source:
            raise SyncError(f"unsupported source scheme {scheme!r} (use https, http or a path)")
        return self._fetch_file(Path(source), etag)

    # -- one sync

    def sync_once(self, requests: tuple[Any, ...] = ()) -> SyncResult:
        """Fetch, validate the whole list and swap it in; any failure keeps the last good list.
        `requests` come back in the result (and on_result's)."""
        with self._lock:
            try:
                with self._file_lock():
                    return self._sync_once(requests)
            except SyncError as e:  # the lock not had (all else _sync_once answers itself)
                return self._not_run(requests, str(e))

    def _answerable(self, requests: tuple[Any, ...], ok: bool) -> tuple[Any, ...]:
        """The requests a sync's result answers: not those of one that failed as it was
        stopped, which go back to be taken again (a reload's next sync runs them)."""
        if ok or not self._stopping or not requests:
            return requests
        with self._requests_lock:
            self._requests[:0] = requests
        return ()

    def _not_run(self, requests: tuple[Any, ...], why: str) -> SyncResult:
        """A sync that did not run: nothing recorded (the list and its status are another
        sync's), its requests answered all the same."""
        log.warning("watchlist sync: %s", why)
        try:
            status = self.watchlist.sync_status()
        except (sqlite3.Error, WatchlistError):
            status = SyncStatus()
        result = SyncResult(False, False, status.entries, error=why,
                            requests=self._answerable(requests, False))
        if self.on_result is not None:
            self.on_result(result, status)
        return result

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """One sync at a time across processes too (the daemon's and `lprd watchlist sync`):
        one that found its list unchanged would write back its status over the other's new
        list, and later syncs, going by that status, keep the wrong list. Not the store's own
        .lock: a damaged store is moved aside under that one, during a sync too (this process
        would wait for itself). A file system without locks: the status update, checked in its
        transaction, is the guard left."""
        fd = None
        with contextlib.suppress(OSError):
            fd = os.open(f"{self.watchlist.path}.sync-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            give_up = time.monotonic() + SYNC_LOCK_WAIT
            while fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another process's sync: wait for it to end
                    if self._stopping:
                        raise SyncError("not synced: the sync is stopping") from None
                    if time.monotonic() > give_up:
                        raise SyncError(f"{self._where()}: not synced, another sync (`lprd "
                                        "watchlist sync`?) is still running") from None
                    time.sleep(0.05)
                except OSError:  # no locks here (ENOLCK, EOPNOTSUPP): go on without
                    break
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def _sync_once(self, requests: tuple[Any, ...], retried: bool = False) -> SyncResult:
        t0 = time.monotonic()
        now = time.time()
        status = SyncStatus()
        source = self.cfg.source
        size = 0
        try:
            self.watchlist.follow_file()  # before its status: a new file has no ETag to send
            status = self.watchlist.sync_status()
            if not source:
                raise SyncError("no watchlist.sync.source is configured")
            remerge = status.remerge_at is not None and now >= status.remerge_at
            # no validators where merged rows are due to be chosen again: a 304 has no rows
            fetched = self._fetch(source, replace(status, etag=None, last_modified=None)
                                  if remerge else status)
            if fetched is not None:
                size = len(fetched.data)
                digest = hashlib.sha256(fetched.data).hexdigest()
            if fetched is None or (status.source == source and status.defaults == self._defaults()
                                   and digest == status.sha256 and not remerge):
                # 304, an unchanged file, or the same bytes again: keep the list, no rewrite.
                kept = replace(status, last_attempt=now, last_success=now, last_sync_ok=True,
                               last_error=None)
                if fetched is not None:
                    kept = replace(kept, etag=fetched.etag, last_modified=fetched.last_modified)

                def keep(stored: SyncStatus) -> SyncStatus | None:
                    # the list this status describes, unless another sync swapped in its own
                    same = (stored.source, stored.sha256, stored.etag, stored.defaults) == (
                        status.source, status.sha256, status.etag, status.defaults)
                    return kept if same else None

                if self.watchlist.update_sync_status(keep) is None:
                    if retried:
                        raise SyncError(f"{self._where()}: another sync changed the list "
                                        "meanwhile; the next sync tries again")
                    # fetched in full: its validators
                    return self._sync_once(requests, retried=True)
                status = kept
                result = SyncResult(True, False, status.entries, not_modified=True, bytes=size,
                                    seconds=time.monotonic() - t0)
                log.debug("watchlist sync: %s unchanged (%d entries)", self._where(),
                          status.entries)
            else:
                merge_times: list[float] = []
                try:
                    entries = parse_document(fetched.data, fetched.fmt, self.cfg.list,
                                             check_action(self.cfg.action), origin="sync",
                                             max_entries=self.cfg.max_entries,
                                             merge_duplicates=True, merge_times=merge_times)
                except WatchlistError as e:
                    raise SyncError(f"{self._where()}: rejected list: {e}") from None
                if not entries and status.entries and not self.cfg.allow_empty:
                    # A header-only export from a broken upstream job would empty an allow list
                    # and lock every car out; emptying the list on purpose is rare: say so.
                    raise SyncError(f"{self._where()}: the list has no entries; keeping the "
                                    f"{status.entries} synced ones (set "
                                    f"watchlist.sync.allow_empty: true to accept an empty list)")
                if self._stopping:
                    # a reload replaced this sync (maybe its source): its list must not land
                    # over the new one's
                    raise SyncError(f"{self._where()}: list not swapped in, the sync is stopping")
                status = self.watchlist.replace_synced(entries, SyncStatus(
                    source=source, last_attempt=now, last_success=now, last_change=now,
                    last_sync_ok=True, last_error=None, etag=fetched.etag,
                    last_modified=fetched.last_modified, sha256=digest,
                    defaults=self._defaults(), remerge_at=min(merge_times, default=None)))
                result = SyncResult(True, True, status.entries, bytes=size,
                                    seconds=time.monotonic() - t0)
                log.info("watchlist sync: %d entries from %s swapped in (%d bytes, %.2f s)",
                         status.entries, self._where(), size, result.seconds)
        except Exception as e:  # recorded: the status must not go on saying the last one's
            if not isinstance(e, (SyncError, sqlite3.Error)):
                log.exception("watchlist sync: unexpected error")
            msg = _scrub(str(e) if isinstance(e, SyncError) else
                         f"storing the list failed: {e}" if isinstance(e, sqlite3.Error) else
                         f"unexpected error: {e!r}", source or "")
            try:
                status = self.watchlist.update_sync_status(lambda stored: replace(
                    stored, last_attempt=now, last_sync_ok=False, last_error=msg)) or status
            except (sqlite3.Error, WatchlistError) as e2:
                log.error("watchlist sync: cannot record the failure: %s", e2)
            result = SyncResult(False, False, status.entries, error=msg, bytes=size,
                                seconds=time.monotonic() - t0)
            log.warning("watchlist sync failed, keeping the last good list (%d entries): %s",
                        status.entries, msg)
        result = replace(result, requests=self._answerable(requests, result.ok))
        if self.on_result is not None:
            self.on_result(result, status)
        return result

    def _where(self) -> str:
        src = self.cfg.source or ""
        return redact_url(src) if "://" in src else src

    # -- the thread

    def start(self) -> None:
        """Sync now, then every cfg.interval seconds (sooner after a failure) in a thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="watchlist-sync", daemon=True)
        self._thread.start()

    def request(self, tag: Any = None) -> None:
        """Sync as soon as possible (SIGHUP, a command); `tag` (not None) comes back in the
        result of a sync that starts after this call."""
        if tag is not None:
            with self._requests_lock:
                self._requests.append(tag)
        self._wake.set()

    def take_requests(self) -> list[Any]:
        """The tags of requests not yet taken by a sync (to hand to another sync)."""
        with self._requests_lock:
            taken, self._requests = self._requests, []
        return taken

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping:
                # cleared before the sync, not after the wait: a request() in between is kept
                self._wake.clear()
                requests = tuple(self.take_requests())
                try:
                    ok = self.sync_once(requests).ok
                except Exception:  # never let the thread die: the next interval tries again
                    log.exception("watchlist sync crashed")
                    ok = False
                failures = 0 if ok else failures + 1
                wait = retry_delay(failures, self.cfg.interval)
                with contextlib.suppress(sqlite3.Error, WatchlistError):
                    # a merged plate's other row takes over then, not an interval later (one
                    # due already: a failed sync's backoff stands)
                    remerge = self.watchlist.sync_status().remerge_at
                    if remerge is not None and remerge > time.time():
                        wait = min(wait, max(remerge - time.time(), 1.0))
                self._wake.wait(wait)
        finally:
            self.watchlist._drop_own()  # close() leaves a live thread's connection to it


def retry_delay(failures: int, interval: float) -> float:
    """Seconds to the next sync after `failures` failed ones in a row: sooner after a failure
    (30 s, 60 s, ...), never later than the interval."""
    if not failures:
        return interval
    # the exponent capped: 2.0 ** 1024 overflows, after weeks of failures at interval 1 h
    return min(interval, 30.0 * 2.0 ** min(failures - 1, 20))


# ---------------------------------------------------------------- benchmark

_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
_DIGITS = "0123456789"


def _cheap_swaps() -> dict[str, list[str]]:
    swaps: dict[str, list[str]] = {}
    for (a, b), cost in CONFUSABLE_PAIRS.items():
        if cost <= 0.5:
            swaps.setdefault(a, []).append(b)
            swaps.setdefault(b, []).append(a)
    return swaps


_CHEAP = _cheap_swaps()


def _random_plate(rng: random.Random) -> str:
    layout = rng.choice(("LLLDDDD", "DLLLDDD", "LLDDLLL", "LLDDDD", "DDDLLL", "LLLDDL"))
    return "".join(rng.choice(_LETTERS if c == "L" else _DIGITS) for c in layout)


def _confuse(plate: str, rng: random.Random) -> str:
    """The plate with one cheap (OCR-like) substitution."""
    spots = [i for i, c in enumerate(plate) if c in _CHEAP]
    i = rng.choice(spots) if spots else 0
    return plate[:i] + rng.choice(_CHEAP.get(plate[i], ["X"])) + plate[i + 1:]


def benchmark(entries: int = 100_000, lookups: int = 2000, seed: int = 0,
              max_distance: float = 1.0, workdir: Path | None = None) -> dict[str, Any]:
    """Sync time for a list of `entries` and lookup latency (exact, fuzzy, miss) over it.

    Wall and CPU (this thread's) times: on a busy box the wall p99 is mostly waiting for a core.
    `matched` for random plates not on the list is the false alarm rate at this max_distance.
    """
    rng = random.Random(seed)
    plates: set[str] = set()
    while len(plates) < entries:
        plates.add(_random_plate(rng))
    ordered = sorted(plates)
    rng.shuffle(ordered)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = Path(tmp) / "plates.csv"
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["tag", "make", "model", "permit", "lot", "valid"])
        for i, p in enumerate(ordered):
            w.writerow([p, rng.choice(("Honda", "Ford", "Toyota")), "Model", f"P{i}",
                        f"L{i % 40}", "yes"])
        src.write_text(out.getvalue())
        wl = Watchlist(Path(tmp) / DB_NAME, WatchlistConfig(max_distance=max_distance))
        sync = WatchlistSync(wl, SyncConfig(source=str(src), list="bench"))
        cpu = time.process_time()
        first = sync.sync_once()
        first_cpu = time.process_time() - cpu
        src.write_text(out.getvalue().replace(",yes\n", ",no\n"))  # a changed list: full swap
        cpu = time.process_time()
        second = sync.sync_once()
        second_cpu = time.process_time() - cpu
        if not (first.ok and second.ok and second.changed):
            raise RuntimeError(f"benchmark sync failed: {first} {second}")

        def timed(reads: list[str], cands: bool = False) -> tuple[list[float], list[float], int]:
            wall, cpu, hits = [], [], 0
            for r in reads:
                c = (Candidate(_confuse(r, rng), 0.1), Candidate(_confuse(r, rng), 0.05)) \
                    if cands else ()
                t, tc = time.perf_counter(), time.thread_time()
                m = wl.match(r, c)
                cpu.append((time.thread_time() - tc) * 1000)
                wall.append((time.perf_counter() - t) * 1000)
                hits += m.match != "none"
            return wall, cpu, hits

        sample = rng.sample(ordered, lookups)
        misses = []
        while len(misses) < lookups:
            p = _random_plate(rng)
            if p not in plates:
                misses.append(p)
        runs = {
            "exact": timed(sample),
            "fuzzy": timed([_confuse(p, rng) for p in sample]),
            "miss": timed(misses),
            "miss_with_2_candidates": timed(misses, cands=True),
        }
        db_bytes = sum(f.stat().st_size for f in Path(tmp).glob(DB_NAME + "*"))
        wl.close()

    def pct(xs: list[float], q: float) -> float:
        return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 3)

    return {
        "entries": entries, "max_distance": max_distance, "lookups_each": lookups,
        "csv_bytes": first.bytes, "db_bytes": db_bytes,
        "sync_first_s": {"wall": round(first.seconds, 2), "cpu": round(first_cpu, 2)},
        "sync_replace_s": {"wall": round(second.seconds, 2), "cpu": round(second_cpu, 2)},
        **{f"{k}_ms": {"p50": pct(w, 50), "p99": pct(w, 99), "cpu_p50": pct(c, 50),
                       "cpu_p99": pct(c, 99), "matched": h}
           for k, (w, c, h) in runs.items()},
    }


# ---------------------------------------------------------------- CLI


def _open(args: argparse.Namespace, create: bool = False) -> tuple[Watchlist, Config]:
    """The CLI's store; without `create`, a missing file is an error (a mistyped --db)."""
    cfg_path = getattr(args, "config", None)
    db: Path | None = getattr(args, "db", None)  # SUPPRESS: before or after ACTION
    if cfg_path is None and not DEFAULT_CONFIG_PATH.exists():
        if db is None:
            raise WatchlistError(f"{DEFAULT_CONFIG_PATH}: file not found: give the daemon's "
                                 "config with -c FILE, or the watchlist file with --db FILE")
        cfg = Config()  # --db alone works on a machine without /etc/lprd/config.yaml
    else:
        cfg = load_config(cfg_path or DEFAULT_CONFIG_PATH)
    wcfg = cfg.watchlist
    path = db if db is not None else cfg.storage.dir / DB_NAME
    if not create and not path.is_file():
        raise WatchlistError(f"no watchlist at {shown_path(str(path))} (add or import entries "
                             "first, or check --db and storage.dir)")
    if db is not None and not path.parent.is_dir():
        # a mistyped folder would be made, and the entries kept where the daemon never looks
        raise WatchlistError(f"--db {shown_path(str(path))}: the folder "
                             f"{shown_path(str(path.parent))} does not exist (check the path, "
                             "or create the folder first)")
    _refuse_root_in_foreign_folder(path)
    try:
        return Watchlist(path, wcfg), cfg
    except sqlite3.Error as e:
        raise WatchlistError(f"{path}: cannot open the watchlist ({e})") from None


def _refuse_root_in_foreign_folder(path: Path) -> None:
    # root would create the list (or its journal) owned by root, which the service's own user
    # then cannot write: every sync would fail while the old list goes on being served
    user = other_owner(path)
    if user is not None:
        raise WatchlistError(f"{path}: belongs to {user}; run this as {user} "
                             f"(sudo -u {user} lprd watchlist ...), not as root")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=1))


def _describe(e: WatchlistEntry) -> str:
    parts = [e.plate, f"list={e.list}", f"action={e.action or '-'}"]
    if e.valid_from is not None:
        parts.append(f"valid_from={iso_time(e.valid_from)}")
    if e.valid_until is not None:
        parts.append(f"valid_until={iso_time(e.valid_until)}")
    parts += [f"{k}={_cell(v)}" for k, v in e.info.items()]
    if e.origin != "local":
        parts.append(f"({e.origin})")
    return "  ".join(parts)


def _list_arg(v: str) -> str:
    if not is_list_name(v):  # "" would quietly mean the default list
        raise argparse.ArgumentTypeError(f"{v!r}: a list name is 1-64 printable characters")
    return v


def _cmd_add(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"plate": args.plate, "list": args.list, "action": args.action,
                              "valid_from": args.valid_from, "valid_until": args.valid_until}
    info: dict[str, Any] = {}
    for item in args.info or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WatchlistError(f"--info {item!r}: expected KEY=VALUE")
        info[key.strip()] = value
    fields["info"] = info
    if not args.plate.strip():  # make_entry's words are a file's ("a 'plate' column")
        raise WatchlistError("add: the plate is empty")
    entry = make_entry(fields, "add")
    wl, _ = _open(args, create=True)
    with wl:
        wl.add(entry)
    if args.json:
        _print_json(entry_dict(entry))
    else:
        print(f"added {_describe(entry)}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    wl, _ = _open(args)
    with wl:
        gone = wl.remove(args.plate, args.list)
    if args.json:
        _print_json([entry_dict(e) | {"origin": e.origin} for e in gone])
    else:
        for e in gone:
            print(f"removed {_describe(e)}")
        if any(e.origin == "sync" for e in gone):
            print("note: synced entries return when the source's list changes", file=sys.stderr)
    if not gone:
        print(f"{normalize_plate(args.plate) or args.plate!r}: not on the watchlist",
              file=sys.stderr)
        return 1
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    wl, _ = _open(args)
    with wl:
        entries = wl.entries(list_name=args.list,
                             plate=normalize_plate(args.plate) if args.plate else None)
    if args.json:
        _print_json([entry_dict(e) | {"origin": e.origin} for e in entries])
    else:
        for e in entries:
            print(_describe(e))
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        data, name = sys.stdin.buffer.read(), "-"
    else:
        try:
            data, name = Path(args.file).read_bytes(), args.file
        except OSError as e:
            raise WatchlistError(f"{args.file}: cannot read ({e.strerror})") from None
    fmt = args.format or detect_format(name, None, data)
    try:
        entries = parse_document(data, fmt, args.list, check_action(args.action))
    except WatchlistError as e:
        raise WatchlistError(f"{name}: {e}; nothing imported") from None
    wl, _ = _open(args, create=True)
    with wl:
        wl.import_entries(entries, replace_all=args.replace)
        total = wl.count()
    if args.json:
        _print_json({"imported": len(entries), "entries": total})
    else:
        print(f"imported {len(entries)} entries from {name} ({total} in the watchlist)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    wl, _ = _open(args)
    with wl:
        entries = wl.entries(list_name=args.list,
                             origin=None if args.origin == "all" else args.origin)
        left = wl.count("sync", args.list) if args.origin == "local" else 0
    text = dump_json(entries) if args.json else dump_csv(entries)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"exported {len(entries)} entries to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if left:
        print(f"the {left} synced entries are not in it (the sync source's: --origin sync or "
              "all)", file=sys.stderr)
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    cands = [Candidate(c, 0.0) for c in args.candidate or ()]
    wl, _ = _open(args)
    with wl:
        m = wl.match(args.plate, cands, max_distance=args.max_distance)
    if args.json:
        _print_json(asdict(m))
    elif m.match == "none":
        print("none")
    else:
        info = "  ".join(f"{k}={_cell(v)}" for k, v in m.info.items())
        print(f"{m.match} {m.plate} (distance {m.distance:g}, via {m.via})  list={m.list}  "
              f"action={m.action or '-'}  {info}".rstrip())
    return 0 if m.match != "none" else 1


def _cmd_sync(args: argparse.Namespace) -> int:
    wl, cfg = _open(args, create=True)
    scfg = cfg.watchlist.sync
    if args.source:
        scfg = scfg.model_copy(update={"source": args.source})
    with wl:
        result = WatchlistSync(wl, scfg).sync_once()
        status = wl.sync_status()
    if args.json:
        _print_json({"result": {k: v for k, v in asdict(result).items() if k != "requests"},
                     "status": status.to_dict()})
    elif result.ok:
        print(("new list: " if result.changed else "unchanged: ") + f"{result.entries} entries")
    else:
        print(f"sync failed (the last good list stays): {result.error}", file=sys.stderr)
    return 0 if result.ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    wl, _ = _open(args)
    with wl:
        d = {"path": str(wl.path), "entries": wl.count(), "local": wl.count("local"),
             "synced": wl.count("sync"), "sync": wl.sync_status().to_dict()}
    if args.json:
        _print_json(d)
    else:
        print(f"{d['path']}: {d['entries']} entries ({d['local']} local, {d['synced']} synced)")
        if d["sync"]["last_attempt"] is None and not d["synced"]:
            print("  never synced (watchlist.sync.source)")
            d["sync"] = {}
        for k, v in d["sync"].items():
            if v is not None:  # "sync.source: None" says nothing
                print(f"  sync.{k}: {v}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "db", None) is not None:  # given before ACTION
        raise WatchlistError("--db: bench generates a list of its own and opens no watchlist")
    if args.lookups > args.entries:  # the exact and fuzzy lookups sample the listed plates
        raise WatchlistError(f"--lookups {args.lookups} is more than --entries {args.entries}")
    res = benchmark(args.entries, args.lookups, max_distance=args.max_distance)
    if args.json:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:  # `... | head`: lprd's main ends quietly, as other commands do
            raise
        except (WatchlistError, ConfigError) as e:
            print(f"lprd watchlist: {e}", file=sys.stderr)
            return 2
        except sqlite3.Error as e:
            print(f"lprd watchlist: database error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a folder that cannot be made, an export to a missing folder
            print(f"lprd watchlist: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return 2
    return run


def register(subparsers: Any) -> None:
    """`lprd watchlist add|remove|list|import|export|match|sync|status|bench`."""
    p = subparsers.add_parser(
        "watchlist", help="the local watchlist: add, remove, list, import, export, match, sync, "
        "status, bench",
        description="Manage the watchlist in <storage.dir>/watchlist.sqlite (or --db FILE).")
    # `lprd watchlist -c FILE list` as `lprd watchlist list -c FILE` (it was "invalid choice")
    add_config_option(p, help="YAML config (storage.dir, watchlist.*); also after ACTION")
    # `lprd watchlist --db FILE list`, as the description puts it (it was "invalid choice")
    db_help = "watchlist file (default: <storage.dir>/watchlist.sqlite)"
    p.add_argument("--db", type=Path, default=argparse.SUPPRESS, help=db_help + "; also after ACTION")
    sub = p.add_subparsers(dest="watchlist_command", metavar="ACTION")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    store = argparse.ArgumentParser(add_help=False)  # the options of commands that open the store
    store.add_argument("--db", type=Path, default=argparse.SUPPRESS, help=db_help)
    add_config_option(store, help="YAML config (storage.dir, watchlist.*); default: "
                      f"{DEFAULT_CONFIG_PATH}, or built-in defaults with --db when it is absent")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            opens_store: bool = True) -> argparse.ArgumentParser:
        parents = [common, store] if opens_store else [common]
        sp = sub.add_parser(name, parents=parents, help=help_, description=help_)
        sp.set_defaults(func=_guard(func))
        return sp

    a = add("add", _cmd_add, "add a plate (replaces the same plate on the same list)")
    a.add_argument("plate")
    a.add_argument("--list", type=_list_arg, default="default", help="list name (default: default)")
    a.add_argument("--action", help="allow, deny, alert or another topic word")
    a.add_argument("--info", action="append", metavar="KEY=VALUE",
                   help="metadata (owner, make, model, permit, lot, valid, notes ...); repeatable")
    a.add_argument("--valid-from", help="date or ISO 8601 time")
    a.add_argument("--valid-until", help="date (valid all that day) or ISO 8601 time")

    r = add("remove", _cmd_remove, "remove a plate (exit 1 if it was not there)")
    r.add_argument("plate")
    r.add_argument("--list", type=_list_arg, help="only from this list")

    ls = add("list", _cmd_list, "print the entries")
    ls.add_argument("--list", type=_list_arg, help="only this list")
    ls.add_argument("--plate", help="only this plate")

    im = add("import", _cmd_import, "import a CSV or JSON list (all rows or none)")
    im.add_argument("file", help="CSV (plate or tag column; the seed's plates.csv works) or "
                                 "JSON; - for stdin")
    im.add_argument("--format", choices=("csv", "json"), help="default: by extension/content")
    im.add_argument("--list", type=_list_arg, default="default", help="list name for rows that name none")
    im.add_argument("--action", help="action for rows that name none")
    im.add_argument("--replace", action="store_true", help="drop all other local entries")

    ex = add("export", _cmd_export, "write the entries added and imported here (--origin: "
             "or the synced ones) as CSV (or JSON with --json)")
    ex.add_argument("--list", type=_list_arg, help="only this list")
    ex.add_argument("-o", "--output", help="file (default: stdout)")
    # a backup of both, imported again, turned the synced entries into local ones that no
    # later sync removes (and a plate on both was twice in the file: the import refused it)
    ex.add_argument("--origin", choices=("local", "sync", "all"), default="local",
                    help="local (default): the entries added and imported here, what a backup "
                         "needs; sync: the list as the sync source last sent it; all: both")

    m = add("match", _cmd_match,
            "print what the daemon would attach to an event for this read (exit 1: no match)")
    m.add_argument("plate")
    m.add_argument("--candidate", action="append", metavar="PLATE",
                   help="an alternative reading, as the reader gives; repeatable")
    m.add_argument("--max-distance", type=_max_distance,
                   help="override watchlist.max_distance (0..2)")

    s = add("sync", _cmd_sync, "sync once from watchlist.sync.source now (exit 1: failed)")
    s.add_argument("--source", help="override watchlist.sync.source")

    add("status", _cmd_status, "entry counts and the last sync's outcome")

    # No --db or --config: the bench builds its generated list in a temporary folder and never
    # opens the watchlist, so either would be taken and silently ignored.
    b = add("bench", _cmd_bench, "measure sync time and lookup latency on a generated list",
            opens_store=False)
    b.add_argument("--entries", type=int_range(1, 10**7), default=100_000,
                   help="plates on the generated list (default 100000)")
    b.add_argument("--lookups", type=int_range(2, 10**7), default=2000,
                   help="lookups of each kind, at most --entries (default 2000)")
    b.add_argument("--max-distance", type=_max_distance, default=1.0,
                   help="watchlist.max_distance to match with (0..2, default 1)")


def _max_distance(text: str) -> float:
    """--max-distance, checked by the config's own model: the same bounds as in the YAML."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        WatchlistConfig(max_distance=v)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(
            f"{text} is not a valid watchlist.max_distance: {e.errors()[0]['msg'].lower()}"
        ) from None
    return v


def main(argv: list[str] | None = None) -> int:
    """`python -m lprd.watchlist ARGS` is `lprd watchlist ARGS` (lprd's own entry point: its
    logging, a closed pipe ending quietly)."""
    from lprd.cli import main as lprd_main

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, rest = pre.parse_known_args(argv)
    config = ["--config", known.config] if known.config is not None else []
    return lprd_main([*config, "watchlist", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
