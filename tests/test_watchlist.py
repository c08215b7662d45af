"""The watchlist store (a real SQLite file), list parsing, and `lprd watchlist` end to end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lprd.config import SyncConfig, WatchlistConfig
from lprd.plate_match import WatchlistEntry, match_entries
from lprd.types import Candidate
from lprd.watchlist import (
    DB_NAME,
    Watchlist,
    WatchlistError,
    WatchlistSync,
    benchmark,
    detect_format,
    dump_csv,
    dump_json,
    iso_time,
    main,
    make_entry,
    parse_document,
    parse_time,
)

REPO = Path(__file__).resolve().parent.parent
# The seed project's plates.csv: its columns, as its users have them.
SEED_CSV = (
    "tag,make,model,permit,lot,valid\n"
    "ABC1234,Honda,Civic,R-102,North,2026-12-31\n"
    "7XYZ 889,Toyota,Prius,,South,yes\n"
    "KLM-5O5,Ford,Focus,V-7,North,no\n"
)


@pytest.fixture
def wl(tmp_path: Path) -> Watchlist:
    w = Watchlist(tmp_path / DB_NAME, WatchlistConfig())
    yield w
    w.close()


def test_seed_plates_csv_imports_as_it_is(wl: Watchlist) -> None:
    entries = parse_document(SEED_CSV.encode(), "csv", default_list="residents",
                             default_action="allow")
    wl.import_entries(entries)
    assert [e.plate for e in wl.entries()] == ["7XYZ889", "ABC1234", "KLM5O5"]
    m = wl.match("ABC1234")
    assert (m.match, m.list, m.action) == ("exact", "residents", "allow")
    assert m.info == {"make": "Honda", "model": "Civic", "permit": "R-102", "lot": "North",
                      "valid": "2026-12-31"}
    # An empty cell is no value, not an empty string.
    assert wl.match("7XYZ889").info == {"make": "Toyota", "model": "Prius", "lot": "South",
                                        "valid": "yes"}


def test_ocr_confused_read_matches_fuzzily_with_its_distance(wl: Watchlist) -> None:
    wl.import_entries(parse_document(SEED_CSV.encode(), "csv"))
    m = wl.match("A8C1Z34")
    assert (m.match, m.plate, m.distance, m.via) == ("fuzzy", "ABC1234", 0.5, "read")
    assert wl.match("KLM505").plate == "KLM5O5"  # O read as 0
    assert wl.match("ZZZ0000").match == "none"


def test_a_candidate_matches_when_the_read_does_not(wl: Watchlist) -> None:
    wl.add(WatchlistEntry("ABC1234", list="hot", action="alert"))
    m = wl.match("QRS9999", [Candidate("XYZ1111", 0.2), Candidate("ABC1234", 0.01)])
    assert (m.match, m.plate, m.via, m.action) == ("exact", "ABC1234", "candidate", "alert")


def _variant(rng: random.Random, plate: str) -> str:
    letters_digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    s = list(plate)
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(s))
        op = rng.random()
        if op < 0.6:
            s[i] = rng.choice("0OD18B5S2Z6G" + letters_digits)
        elif op < 0.8:
            s.insert(i, rng.choice(letters_digits))
        elif len(s) > 3:
            del s[i]
    return "".join(s)


def test_index_lookup_finds_what_a_scan_of_every_entry_finds(tmp_path: Path) -> None:
    # The SQL index must miss nothing: compare with the pure matcher over all entries. The
    # entries crowd around a few base plates, so most reads have several near entries.
    rng = random.Random(7)
    bases = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                     for _ in range(rng.randint(4, 8))) for _ in range(40)]
    plates = sorted({_variant(rng, b) for b in bases for _ in range(12)})  # no hash order
    entries = [WatchlistEntry(p, list=rng.choice(("a", "b")),
                              action=rng.choice((None, "allow", "deny"))) for p in plates]
    reads = [_variant(rng, rng.choice(bases)) for _ in range(60)]
    for max_distance in (1.0, 2.0):
        cfg = WatchlistConfig(max_distance=max_distance)
        with Watchlist(tmp_path / f"w{max_distance}.sqlite", cfg) as w:
            w.import_entries(entries)
            stored = w.entries()
            found = 0
            for r in reads:
                cand = [Candidate(r[::-1], 0.1)]
                want = match_entries(r, cand, stored, max_distance, 0.0, fuzzy_min_chars=4,
                                     allow_max_distance=cfg.allow_max_distance)
                assert w.match(r, cand, now=0.0) == want, r
                found += want.match != "none"
            assert found > 25  # 29 and 49 reads match something: the check is not empty


def test_the_store_matches_short_entries_only_exactly_as_the_pure_matcher_does(
        tmp_path: Path) -> None:
    # An entry MA1 (deny) was matched by MA12, MA17, XMA1; the index query and the pure
    # matcher must agree on short plates as on long ones.
    rng = random.Random(11)
    plates = sorted({"".join(rng.choice("AM1IB8") for _ in range(rng.randint(2, 5)))
                     for _ in range(60)} | {"MA1"})
    cfg = WatchlistConfig()
    with Watchlist(tmp_path / DB_NAME, cfg) as w:
        w.import_entries([WatchlistEntry(p, action="deny") for p in plates])
        stored = w.entries()
        reads = ["MA12", "MA17", "XMA1", "MA1"] + [_variant(rng, rng.choice(plates))
                                                   for _ in range(80)]
        for r in reads:
            want = match_entries(r, (), stored, cfg.max_distance, 0.0,
                                 fuzzy_min_chars=cfg.fuzzy_min_chars,
                                 allow_max_distance=cfg.allow_max_distance)
            assert w.match(r, now=0.0) == want, r
        assert [w.match(r).match for r in ("MA12", "MA17", "XMA1", "MA1")] == [
            "none", "none", "none", "exact"]


def test_raising_max_distance_rebuilds_the_index_deeper(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    with Watchlist(path, WatchlistConfig(max_distance=1.0)) as w:
        w.add(WatchlistEntry("ABC1234"))
        assert w.match("XBC12345").match == "none"  # two full edits away
    with Watchlist(path, WatchlistConfig(max_distance=2.0)) as w:
        m = w.match("XBC12345")
        assert (m.match, m.distance) == ("fuzzy", 2.0)
    # Back at 1.0 the deeper index stays (another process may use it) and still answers right.
    with Watchlist(path, WatchlistConfig(max_distance=1.0)) as w:
        assert w.match("XBC12345").match == "none"
        assert w.match("XBC1234").distance == 1.0


def test_only_the_matching_process_builds_a_deeper_index_and_says_it_is_busy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The daemon's sync opened the store on the supervisor's main loop and built the index
    # there (minutes for a long list: the start and its signals held up); the inference
    # process built it with no sign of life and was killed as hung, again and again.
    path = tmp_path / DB_NAME
    with Watchlist(path, WatchlistConfig(max_distance=1.0)) as w:
        w.import_entries([WatchlistEntry(f"AB{i:05d}") for i in range(12_000)])

    def depth() -> str:
        with contextlib.closing(sqlite3.connect(path)) as c:
            return c.execute("SELECT value FROM meta WHERE key = 'index_depth'").fetchone()[0]

    deeper = WatchlistConfig(max_distance=2.0)
    with Watchlist(path, deeper, index=False) as w:  # the sync's
        assert depth() == "1"
        m = w.match("XB00012")  # two edits: found by a scan, the index not deep enough
        assert (m.match, m.plate) == ("fuzzy", "AB00012")
    beats: list[int] = []
    caplog.set_level(logging.INFO, logger="lprd.watchlist")
    with Watchlist(path, deeper, progress=lambda: beats.append(1)) as w:  # inference's
        assert depth() == "2" and w.match("XB00012").plate == "AB00012"
    assert len(beats) >= 3
    assert "building the fuzzy index (depth 2) for 12000 entries" in caplog.text


def test_reopening_with_a_current_index_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    import sqlite3
    import time

    path = tmp_path / DB_NAME
    with Watchlist(path) as w:
        w.add(WatchlistEntry("ABC1234"))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a sync swapping the whole list in
    try:
        t0 = time.monotonic()
        with Watchlist(path) as w:  # the inference worker reopening it on reload
            assert w.match("ABC1234").match == "exact"
        assert time.monotonic() - t0 < 5  # no wait for the write lock (busy timeout 30 s)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_add_replaces_the_same_plate_on_the_same_list_only(wl: Watchlist) -> None:
    wl.add(WatchlistEntry("ABC1234", list="a", info={"v": 1}))
    wl.add(WatchlistEntry("ABC1234", list="b", info={"v": 2}))
    wl.add(WatchlistEntry("ABC1234", list="a", info={"v": 3}))
    assert sorted((e.list, e.info["v"]) for e in wl.entries()) == [("a", 3), ("b", 2)]
    assert [e.list for e in wl.remove("abc-1234", "a")] == ["a"]
    assert wl.remove("ABC1234", "a") == []
    assert wl.match("A8C1234").list == "b"  # the removed entry's index keys went too


def test_validity_window_is_kept_and_enforced(wl: Watchlist) -> None:
    until = parse_time("2030-01-31", end=True)
    wl.add(WatchlistEntry("ABC1234", valid_from=parse_time("2030-01-01"), valid_until=until))
    assert wl.match("ABC1234", now=parse_time("2030-01-31T23:59")).match == "exact"
    assert wl.match("ABC1234", now=parse_time("2030-02-01T00:00")).match == "none"
    assert wl.match("ABC1234", now=parse_time("2029-12-31T12:00")).match == "none"


def test_a_date_means_the_whole_local_day() -> None:
    start = parse_time("2030-05-01")
    assert start == datetime(2030, 5, 1).timestamp()
    assert parse_time("2030-05-01", end=True) == datetime(2030, 5, 2).timestamp()
    assert parse_time("2030-05-01T10:00:00Z") == datetime(2030, 5, 1, 10, tzinfo=UTC).timestamp()
    assert parse_time("2030-05-01T12:00:00+02:00") == parse_time("2030-05-01T10:00:00Z")
    assert parse_time("1900000000") == 1.9e9  # epoch seconds in a CSV cell
    # ISO 8601's basic form, not 20 million seconds after 1970
    assert parse_time("20300501") == start
    assert parse_time("20300501", end=True) == datetime(2030, 5, 2).timestamp()
    with pytest.raises(WatchlistError, match="not a date"):
        parse_time("next tuesday", what="valid_until")
    # JSON numbers: 20300501 is the date the string is, not 1970-08-23 (expired on import)
    assert parse_time(20300501) == start and parse_time(1.9e9) == 1.9e9
    # "never expires" (adding a day to it overflowed and crashed a sync)
    assert parse_time("9999-12-31", end=True) == datetime(9999, 12, 31, 23, 59, 59,
                                                         tzinfo=UTC).timestamp()
    # JavaScript's milliseconds were taken for seconds of year 57968: never valid, and
    # `watchlist list` and `export` could not print them
    for ms in (1767139200000, "1767139200000"):
        with pytest.raises(WatchlistError, match="milliseconds"):
            parse_time(ms, what="valid_from")
    assert iso_time(1767139200000.0) == "1767139200000"  # one stored before: printed as is


@pytest.mark.parametrize("doc,fmt,expect", [
    ("tag,make\nABC123,Ford\n!!,Kia\n", "csv", "line 3: plate '!!' has no letters"),
    ("plate,make\nABC123,Ford\nXYZ9,Kia,extra\n", "csv", "line 3: 3 fields where the header"),
    ("plate,make\nABC123,Ford\nXYZ9", "csv", "line 3: 1 fields"),
    ("make,model\nFord,Focus\n", "csv", "needs a 'plate' or 'tag' column"),
    ("", "csv", "empty document"),
    ("plate\nABC123\nabc-123\n", "csv", r"line 3: ABC123 is already on list"),
    ("plate,action\nABC123,open gate\n", "csv", "must be 1-64 letters"),
    ("plate,valid_until\nABC123,someday\n", "csv", "valid_until: 'someday' is not a date"),
    ('plate,valid_from,valid_until\nABC1,2030-02-01,2030-01-01\n', "csv", "not after"),
    ('[{"plate": "ABC123"}, {"plate": "XY1"', "json", "not valid JSON"),
    ('{"rows": []}', "json", "must be a list of entries"),
    ('[{"plate": "ABC123"}, "XYZ"]', "json", "entry 2: not an object"),
    ('[{"plate": ["A"]}]', "json", "entry 1: plate .* is not text"),
    ('[{"plate": "ABC123", "info": 5}]', "json", "info must be an object"),
    # Python's json.dump writes NaN: an event carrying it in its info is not JSON
    ('[{"plate": "ABC123", "info": {"score": NaN}}]', "json", "NaN is not a JSON value"),
    ("[" * 100_000 + "]" * 100_000, "json", "nested too deep"),
    ('[{"plate": "ABC123", "info": {"score": 1e400}}]', "json", "1e400 is too large"),
    ("plate,valid_until\nABC123,9999-12-31T23:59:59-05:00\n", "csv", "after the year 9999"),
    ("plate,valid_until\nABC123,1767139200000\n", "csv", "milliseconds"),
    # Cyrillic look-alikes would be dropped and the plate stored as '12377': refused instead
    ("plate\nABC123\nА123ВС 77\n", "csv", "line 3: plate .* characters other than A-Z"),
])
def test_a_bad_row_rejects_the_whole_list_and_names_the_row(doc: str, fmt: str,
                                                           expect: str) -> None:
    with pytest.raises(WatchlistError, match=expect):
        parse_document(doc.encode(), fmt)


def test_a_plain_list_and_a_semicolon_csv_import() -> None:
    # The commonest lists a user has: one plate a line (no header), and a spreadsheet saved
    # in a European locale (semicolons). Both were refused, the first plate taken for a header.
    plain = parse_document(b"ABC1234\nxyz-999\n\n", "csv")
    assert [e.plate for e in plain] == ["ABC1234", "XYZ999"]
    semi = parse_document(b"plate;list;action\nABC1234;stolen;alert\n", "csv")
    assert [(e.plate, e.list, e.action) for e in semi] == [("ABC1234", "stolen", "alert")]
    # quoted cells after ", " (written by hand): the list was named '"stolen"', quotes and all
    spaced = parse_document(b'plate, list, owner\nABC1234, "stolen", "Ann"\n', "csv")
    assert [(e.plate, e.list, e.info) for e in spaced] == [("ABC1234", "stolen", {"owner": "Ann"})]
    # a quote inside such a cell stays as it was (not a CSV error that refuses the list)
    towing = parse_document(b'plate, list, notes\nABC1234, stolen, "Ace" Towing\n', "csv")
    assert towing[0].info == {"notes": '"Ace" Towing'}
    # a comma inside a cell quoted after ', ', and quotes that are part of a value (as
    # dump_csv writes them) survive
    for doc, owner in ((b'plate, owner\nABC1, "Smith, John"\n', "Smith, John"),
                       (b'plate;owner\nABC1; "Smith; John"\n', "Smith; John"),
                       (dump_csv([WatchlistEntry("ABC1", info={"owner": '"VIP"'})]).encode(),
                        '"VIP"')):
        assert parse_document(doc, "csv")[0].info == {"owner": owner}, doc
    # a header word has no digits: a one-column file headed by an unknown word is still refused
    with pytest.raises(WatchlistError, match="needs a 'plate' or 'tag' column"):
        parse_document(b"kenteken\nAB123C\n", "csv")
    # a row with more than a plate is refused, not read as the plate XYZ999DENY
    with pytest.raises(WatchlistError, match="line 2: more than a plate"):
        parse_document(b"ABC1234\nXYZ999;deny\n", "csv")


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    # A deferred constraint makes COMMIT itself fail, as a full disk can.
    conn = sqlite3.connect(tmp_path / "t.sqlite", isolation_level=None)
    conn.executescript("PRAGMA foreign_keys = ON; CREATE TABLE p (id INTEGER PRIMARY KEY);"
                       "CREATE TABLE c (p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);")
    with pytest.raises(sqlite3.IntegrityError), Watchlist._Txn(conn, "BEGIN IMMEDIATE"):
        conn.execute("INSERT INTO c VALUES (42)")
    assert not conn.in_transaction
    with Watchlist._Txn(conn, "BEGIN IMMEDIATE"):  # the next write can begin
        conn.execute("INSERT INTO p VALUES (1)")
    conn.close()


def test_binary_or_non_utf8_data_is_rejected() -> None:
    with pytest.raises(WatchlistError, match="not UTF-8"):
        parse_document(b"plate\n\xff\xfe\n", "csv")
    with pytest.raises(WatchlistError, match="binary"):
        parse_document(b"plate\nABC\x00\n", "csv")


def test_json_lists_carry_metadata_in_info_or_beside_it() -> None:
    doc = {"entries": [
        {"plate": "abc 123", "list": "Hot", "action": "ALERT", "owner": "X",
         "info": {"case": 42, "tags": ["a"]}, "valid_until": 1900000000},
        {"tag": 123456},
    ]}
    a, b = parse_document(json.dumps(doc).encode(), "json", default_list="lot")
    assert (a.plate, a.list, a.action, a.valid_until) == ("ABC123", "Hot", "alert", 1.9e9)
    assert a.info == {"owner": "X", "case": 42, "tags": ["a"]}
    assert (b.plate, b.list, b.action) == ("123456", "lot", None)


def test_format_is_told_by_content_type_then_name_then_content() -> None:
    assert detect_format("x", "application/json; charset=utf-8") == "json"
    assert detect_format("list.json", "text/plain") == "json"
    assert detect_format("https://h/p.csv?sig=1", None) == "csv"
    assert detect_format("https://h/list", None, b"  [{}]") == "json"
    assert detect_format("https://h/list", None, b"plate\n") == "csv"
    with pytest.raises(WatchlistError, match="text/html"):
        detect_format("https://h/list.csv", "text/html")


def test_export_then_import_gives_the_same_entries(wl: Watchlist, tmp_path: Path) -> None:
    wl.import_entries([
        WatchlistEntry("ABC1234", list="r", action="allow", info={"make": "Kia", "n": 3},
                       valid_from=1.9e9, valid_until=1.95e9),
        WatchlistEntry("XYZ9", list="h", action="deny", info={"notes": "a, \"quoted\" note"}),
    ])
    before = wl.entries()
    for text, fmt in ((dump_csv(before), "csv"), (dump_json(before), "json")):
        back = parse_document(text.encode(), fmt)
        with Watchlist(tmp_path / f"again-{fmt}.sqlite") as w2:
            w2.import_entries(back)
            got = w2.entries()
        if fmt == "csv":  # CSV cells are text
            assert got[0].info == {"make": "Kia", "n": "3"}
            got = [got[0].__class__(**{**got[0].__dict__, "info": before[0].info}), got[1]]
        assert got == before


def test_a_failed_import_changes_nothing(wl: Watchlist) -> None:
    wl.add(WatchlistEntry("KEEP1"))
    with pytest.raises(WatchlistError):
        wl.import_entries([WatchlistEntry("NEW1"), WatchlistEntry("NEW1")])
    assert [e.plate for e in wl.entries()] == ["KEEP1"]


def test_lookups_on_a_missing_directory_create_it(tmp_path: Path) -> None:
    with Watchlist(tmp_path / "a" / "b" / DB_NAME) as w:
        assert w.match("ABC123").match == "none"
        assert w.count() == 0


# ---------------------------------------------------------------- CLI


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_add_list_match_remove_export(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    rc, out, _ = _run(["add", "abc-1234", "--list", "residents", "--action", "allow",
                       "--info", "owner=Ann", "--info", "make=Honda", "--valid-until",
                       "2099-01-01", *db], capsys)
    assert rc == 0 and "added ABC1234" in out
    rc, out, _ = _run(["list", "--json", *db], capsys)
    [entry] = json.loads(out)
    assert entry["info"] == {"owner": "Ann", "make": "Honda"} and entry["origin"] == "local"
    rc, out, _ = _run(["match", "A8C1234", "--json", *db], capsys)
    assert rc == 0
    assert json.loads(out) == {"match": "fuzzy", "plate": "ABC1234", "distance": 0.25,
                               "list": "residents", "action": "allow",
                               "info": {"owner": "Ann", "make": "Honda"}, "via": "read"}
    rc, out, _ = _run(["match", "ZZZ999", *db], capsys)
    assert (rc, out.strip()) == (1, "none")
    # An allow entry (a gate opens) matches neither a reader's alternative nor another car's
    # plate one character away; an alert entry does.
    rc, out, _ = _run(["match", "ZZZ999", "--candidate", "ABC1234", *db], capsys)
    assert (rc, out.strip()) == (1, "none")
    rc, out, _ = _run(["match", "ABC1235", *db], capsys)
    assert (rc, out.strip()) == (1, "none")
    rc, out, _ = _run(["add", "XYZ987", "--list", "stolen", "--action", "alert", *db], capsys)
    rc, out, _ = _run(["match", "ZZZ999", "--candidate", "XYZ987", *db], capsys)
    assert rc == 0 and out.startswith("exact XYZ987") and "via candidate" in out
    rc, out, _ = _run(["match", "XYZ981", *db], capsys)
    assert rc == 0 and out.startswith("fuzzy XYZ987")
    rc, out, _ = _run(["remove", "XYZ987", *db], capsys)
    rc, out, _ = _run(["export", *db], capsys)
    assert out.splitlines()[0] == "plate,list,action,valid_from,valid_until,make,owner"
    # a backup holds what was added here: synced entries re-imported from one became local
    # ones that no later sync removes
    src = tmp_path / "source.csv"
    src.write_text("plate,list,action\nOLD999,residents,allow\nABC1234,residents,allow\n")
    with Watchlist(tmp_path / "w.sqlite") as w:
        assert WatchlistSync(w, SyncConfig(source=str(src))).sync_once().entries == 2
    rc, out, err = _run(["export", *db], capsys)
    assert rc == 0 and "OLD999" not in out and "the 2 synced entries are not in it" in err
    backup = tmp_path / "backup.csv"
    backup.write_text(out)
    rc, out, err = _run(["export", "--list", "stolen", *db], capsys)
    assert rc == 0 and "synced" not in err  # none of them on that list
    assert _run(["import", "--replace", str(backup), *db], capsys)[0] == 0
    rc, out, _ = _run(["export", "--origin", "sync", *db], capsys)
    assert [r.split(",")[0] for r in out.splitlines()[1:]] == ["ABC1234", "OLD999"]
    rc, out, _ = _run(["export", "--origin", "all", *db], capsys)
    assert len(out.splitlines()) == 1 + 3
    rc, out, _ = _run(["remove", "ABC1234", *db], capsys)
    assert rc == 0 and "removed ABC1234" in out
    rc, _, err = _run(["remove", "ABC1234", *db], capsys)
    assert rc == 1 and "not on the watchlist" in err


def test_cli_file_errors_name_the_file_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    assert _run(["add", "ABC1234", *db], capsys)[0] == 0
    out = tmp_path / "missing" / "x.csv"
    rc, _, err = _run(["export", "-o", str(out), *db], capsys)
    assert rc == 2 and str(out) in err and "Traceback" not in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, _, err = _run(["list", "--db", str(blocker / "w.sqlite")], capsys)
    assert rc == 2 and str(blocker) in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_cli_as_root_refuses_a_folder_of_the_service_user(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "state"
    d.mkdir()
    os.chown(d, 65534, 65534)  # like /var/lib/lprd, owned by lprd
    rc, _, err = _run(["add", "ABC1234", "--db", str(d / "w.sqlite")], capsys)
    assert rc == 2 and "not as root" in err and "sudo -u " in err
    assert list(d.iterdir()) == []  # nothing created that the service could not write


def test_cli_import_reports_the_bad_row_and_imports_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    bad = tmp_path / "bad.csv"
    bad.write_text(SEED_CSV + "??,x,y,z,w,v\n")
    rc, _, err = _run(["import", str(bad), *db], capsys)
    assert rc == 2 and "line 5" in err and "nothing imported" in err
    assert not (tmp_path / "w.sqlite").exists()  # not even an empty list was made
    rc, _, err = _run(["add", "!!", *db], capsys)
    assert rc == 2 and "no letters or digits" in err


def test_cli_read_commands_refuse_a_missing_watchlist_and_create_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "typo" / "w.sqlite"
    for cmd in (["list"], ["status"], ["export"], ["match", "ABC1234"], ["remove", "ABC1234"]):
        rc, out, err = _run([*cmd, "--db", str(db)], capsys)
        assert (rc, out) == (2, ""), cmd
        assert err.startswith(f"lprd watchlist: no watchlist at {db} "), cmd
    assert not (tmp_path / "typo").exists()
    rc, out, err = _run(["add", "ABC1234", "--db", str(db)], capsys)  # nor does add: a typo
    assert (rc, out) == (2, "") and f"the folder {db.parent} does not exist" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "typo").mkdir()
    rc, _, _ = _run(["add", "ABC1234", "--db", str(db)], capsys)  # add makes the file
    assert rc == 0 and db.is_file()
    assert _run(["list", "--db", str(db)], capsys)[:2] == (0, "ABC1234  list=default  action=-\n")


def test_cli_refuses_text_that_is_not_utf8_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    owner = "owner=" + os.fsdecode(b"b\xffb")  # as the shell hands over such bytes
    rc, _, err = _run(["add", "QQQ111", "--info", owner, *db], capsys)
    assert rc == 2 and err == "lprd watchlist: add: info: owner: 'b\\xffb' is not valid UTF-8 text\n"
    rc, _, err = _run(["add", os.fsdecode(b"QQ\xffQ111"), *db], capsys)  # not dropped silently
    assert rc == 2 and "add: plate: 'QQ\\xffQ111' is not valid UTF-8" in err
    doc = tmp_path / "list.json"  # JSON escapes can spell a lone surrogate too
    doc.write_text('[{"plate": "ABC123", "notes": ["ok", "\\udcff"]}]')
    rc, _, err = _run(["import", str(doc), *db], capsys)
    assert rc == 2 and "entry 1: notes:" in err and "nothing imported" in err
    assert not (tmp_path / "w.sqlite").exists()


def test_cli_max_distance_keeps_the_configs_bounds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    _run(["add", "ABC1234", *db], capsys)
    for bad, why in (("10", "less than or equal to 2"), ("nan", "finite"), ("inf", "finite"),
                     ("-1", "greater than or equal to 0"), ("two", "not a number")):
        err = _run_err(["match", "ABC1234", "--max-distance", bad, *db], capsys)
        assert "argument --max-distance: " in err and why in err, bad
    rc, out, _ = _run(["match", "A8C1234", "--max-distance", "2", *db], capsys)
    assert rc == 0 and out.startswith("fuzzy ABC1234")
    rc, out, _ = _run(["match", "XBC1239", "--max-distance", "2", *db], capsys)  # 2 edits
    assert rc == 0 and out.startswith("fuzzy ABC1234 (distance 2")
    with Watchlist(tmp_path / "w.sqlite", WatchlistConfig(enabled=False)) as w:
        assert w.match("XBC1239", max_distance=2).match == "none"  # off is off
    # a one-off check leaves the stored index as the daemon's max_distance (1) needs it:
    # deepened, it stayed so for good (a 20,000-entry list: 3.5 -> 8.7 MB, syncs 3x slower)
    with contextlib.closing(sqlite3.connect(tmp_path / "w.sqlite")) as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'index_depth'").fetchone() == ("1",)


def _run_err(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of a command that argparse refuses (exit 2, with its usage)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_bench_refuses_counts_it_cannot_run_and_takes_no_db(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in ((["--lookups", "1"], "--lookups: 1 is outside 2.."),
                        (["--entries", "0"], "--entries: 0 is outside 1.."),
                        (["--max-distance", "5"], "--max-distance: 5 is not a valid"),
                        (["--db", str(tmp_path / "w.sqlite")], "unrecognized arguments: --db")):
        assert words in _run_err(["bench", *args], capsys), args
    rc, _, err = _run(["bench", "--entries", "10", "--lookups", "20"], capsys)
    assert rc == 2 and err == "lprd watchlist: --lookups 20 is more than --entries 10\n"
    rc, out, _ = _run(["bench", "--entries", "3", "--lookups", "3", "--json"], capsys)
    res = json.loads(out)
    assert rc == 0 and res["lookups_each"] == 3 and res["exact_ms"]["matched"] == 3


def test_cli_takes_config_after_the_action(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from lprd.cli import main as lprd_main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  dir: {tmp_path / 'var'}\n")
    assert lprd_main(["watchlist", "add", "ABC1234", "-c", str(cfg)]) == 0
    assert (tmp_path / "var" / DB_NAME).is_file()
    capsys.readouterr()
    assert lprd_main(["watchlist", "list", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("ABC1234  ")
    # and before it, as after other commands' names ("invalid choice" before)
    assert lprd_main(["watchlist", "-c", str(cfg), "list"]) == 0
    assert capsys.readouterr().out.startswith("ABC1234  ")
    # --db too, as the help puts it ("invalid choice: 'FILE'")
    db = tmp_path / "var" / DB_NAME
    assert lprd_main(["watchlist", "--db", str(db), "list"]) == 0
    assert capsys.readouterr().out.startswith("ABC1234  ")
    assert lprd_main(["watchlist", "--db", str(db), "bench", "--entries", "10",
                      "--lookups", "2"]) != 0  # taken and ignored would mislead
    assert "bench generates a list of its own" in capsys.readouterr().err


def test_cli_refuses_an_empty_list_name(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # `--list ""` put the plate on "default" without a word
    err = _run_err(["add", "X2", "--list", "", "--db", str(tmp_path / "w.sqlite")], capsys)
    assert "argument --list: '': a list name is 1-64 printable characters" in err
    assert not (tmp_path / "w.sqlite").exists()


def test_cli_without_the_default_config_says_how_to_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import lprd.watchlist as wlmod

    default = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(wlmod, "DEFAULT_CONFIG_PATH", default)
    rc, _, err = _run(["list"], capsys)
    assert rc == 2 and "file not found: give the daemon's config with -c FILE, or the " \
        "watchlist file with --db FILE" in err
    rc, _, _ = _run(["add", "ABC1234", "--db", str(tmp_path / "w.sqlite")], capsys)
    assert rc == 0
    # a file named with -c must exist, even where it is the default path (it ran on defaults)
    rc, _, err = _run(["list", "-c", str(default), "--db", str(tmp_path / "w.sqlite")], capsys)
    assert rc == 2 and f"{default}: file not found" in err


def test_cli_ends_quietly_into_a_closed_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    assert main(["add", "ABC1234", *db]) == 0
    r, w = os.pipe()
    os.close(r)  # the reader went away, as `| head` does after its lines
    with open(w, "w", buffering=1) as pipe:  # line-buffered: each line goes out at once
        monkeypatch.setattr(sys, "stdout", pipe)
        try:
            # as a command killed by SIGPIPE; not "lprd watchlist: : Broken pipe", exit 2
            assert main(["list", "--json", *db]) == 141
        finally:
            monkeypatch.undo()
            with contextlib.suppress(BrokenPipeError):  # the unread rest goes with the pipe
                pipe.close()
    assert capsys.readouterr().err == ""


def test_cli_uses_storage_dir_from_the_config_end_to_end(tmp_path: Path) -> None:
    # The real command in a subprocess, the way an installer or a cron job runs it.
    storage = tmp_path / "var"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  dir: {storage}\nwatchlist:\n  max_distance: 0.5\n")
    plates = tmp_path / "plates.csv"
    plates.write_text(SEED_CSV)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def lprd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lprd.watchlist", "-c", str(cfg), *args],
                              check=False, capture_output=True, text=True, env=env,
                              timeout=60)

    r = lprd("import", str(plates), "--list", "permits", "--action", "allow", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"imported": 3, "entries": 3}
    assert (storage / DB_NAME).is_file()
    r = lprd("match", "7XYZ8B9", "--json")  # one cheap confusion: within 0.5
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["info"]["make"] == "Toyota"
    r = lprd("match", "7XYZ88", "--json")  # a deletion costs 1.0 > max_distance 0.5
    assert r.returncode == 1 and json.loads(r.stdout)["match"] == "none"
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("watchlist:\n  max_distanse: 1\n")
    r = subprocess.run([sys.executable, "-m", "lprd.watchlist", "-c", str(bad_cfg), "list"],
                       check=False, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "max_distanse: unknown key" in r.stderr


def test_benchmark_finds_every_listed_and_every_confused_plate(tmp_path: Path) -> None:
    res = benchmark(entries=400, lookups=50, workdir=tmp_path)
    assert res["exact_ms"]["matched"] == 50 and res["fuzzy_ms"]["matched"] == 50
    assert res["sync_replace_s"]["wall"] > 0 and res["db_bytes"] > 0


# -- a damaged store ------------------------------------------------------------------------------

def _damage_a_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096 * (len(data) // 4096 // 2)
    data[page:page + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not a database", "a bad page"])
def test_the_daemon_moves_a_damaged_store_aside_and_starts_an_empty_one(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    # An SD card fault: without this every event carried no match (no allow, no deny) and
    # every sync failed, until someone removed the file by hand.
    path = tmp_path / DB_NAME
    if damage == "not a database":
        path.write_bytes(b"this is not a database" * 200)
    else:
        with Watchlist(path) as wl:
            wl.import_entries([WatchlistEntry(f"AB{i:05d}", info={"owner": "x" * 40})
                               for i in range(3000)])
        _damage_a_page(path)
    with pytest.raises(WatchlistError, match="unreadable"):  # the CLI says so, moves nothing
        Watchlist(path)
    assert not list(tmp_path.glob("*.corrupt-*"))
    with Watchlist(path, recover=True) as wl:
        assert wl.count() == 0
        wl.add(WatchlistEntry("ABC1234", action="allow"))
        assert wl.match("ABC1234").action == "allow"
    assert "is unreadable" in caplog.text and "moved it to" in caplog.text
    assert len(list(tmp_path.glob(f"{DB_NAME}.corrupt-*[0-9]"))) == 1


def test_a_small_number_for_a_time_is_refused_not_read_as_1970(tmp_path: Path) -> None:
    # An Excel date serial (46387, 2027-01-01) was read as epoch seconds of 1970-01-01: the
    # entry was expired from the start and never matched, without a word.
    for value in (46387, "46387", 46387.5):
        with pytest.raises(WatchlistError, match="before the year 2000"):
            parse_time(value, what="valid_until")
    assert parse_time(0) is None  # "always" stays allowed: no limit
    assert parse_time(1_900_000_000) == 1_900_000_000.0


def test_a_valid_until_of_0_means_no_end_not_1970(tmp_path: Path) -> None:
    # exports write 0 for "always": the entry was stored, never matched, and the sync said OK
    for body, fmt in (("plate,action,valid_until\nABC1234,deny,0\n", "csv"),
                      ('[{"plate": "ABC1234", "action": "deny", "valid_until": 0}]', "json")):
        entry, = parse_document(body.encode(), fmt)
        assert entry.valid_until is None and entry.active(time.time())
    # and those an older lprd stored so match from the first open on
    path = tmp_path / "w.sqlite"
    with Watchlist(path, WatchlistConfig()) as wl:
        wl.add(WatchlistEntry("ABC1234", action="deny"))
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE entries_local SET valid_until = 0")
        db.execute("DELETE FROM meta WHERE key = 'rows_read'")
    db.close()
    with Watchlist(path, WatchlistConfig()) as wl:
        assert wl.match("ABC1234").action == "deny"


def test_a_csv_export_with_keys_in_two_cases_imports_back() -> None:
    # "Owner" from a CSV header and "owner" from `add --info` were two columns, and the
    # import refused the export ("repeated header column").
    entries = [WatchlistEntry("ABC1234", info={"Owner": "Ann", "Make": "Kia"}),
               WatchlistEntry("XYZ999", info={"owner": "Bob"})]
    back = parse_document(dump_csv(entries).encode(), "csv")
    assert [(e.plate, e.info) for e in back] == [
        ("ABC1234", {"Make": "Kia", "Owner": "Ann"}), ("XYZ999", {"Owner": "Bob"})]


@pytest.mark.parametrize("fields,key", [
    ({"plate": "ABC1234", "info": {"list": "hot"}}, "list"),
    ({"plate": "ABC1234", "info": {"Valid_Until": "soon"}}, "Valid_Until"),
    ({"plate": "ABC1234", "info": {"info": "x"}}, "info"),
    ({"plate": "ABC1234", "info": {" plate ": "x"}}, " plate "),
])
def test_an_info_key_named_like_a_column_is_refused_naming_it(fields: dict, key: str) -> None:
    # The CSV export dropped such a key ('list' is the list's column) or wrote a column the
    # import refused ('info'): a backup that does not import back.
    with pytest.raises(WatchlistError, match=f"entry: info key '{key}' is the name of a column"):
        make_entry(fields)


def test_info_keys_in_two_cases_or_blank_are_refused() -> None:
    with pytest.raises(WatchlistError, match="info keys 'Owner' and 'owner' differ only"):
        parse_document(b'[{"plate": "ABC1", "Owner": "a", "info": {"owner": "b"}}]', "json")
    with pytest.raises(WatchlistError, match="entry 1: an info key is blank"):
        parse_document(b'[{"plate": "ABC1", "info": {" ": "b"}}]', "json")


def test_a_csv_export_of_any_entry_imports_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(tmp_path / "w.sqlite")]
    rc, _, err = _run(["add", "ABC1234", "--info", "valid_until=2030-01-01", *db], capsys)
    assert rc == 2 and "add: info key 'valid_until' is the name of a column" in err
    doc = tmp_path / "in.json"
    doc.write_text('[{"plate": "XYZ999", "info": {"info": "x", "owner": "Ann"}}]')
    rc, _, err = _run(["import", str(doc), *db], capsys)
    assert rc == 2 and "entry 1: info key 'info'" in err and "nothing imported" in err
    assert _run(["add", "ABC1234", "--info", "Tag=blue", "--info", "notes=a, b", *db],
                capsys)[0] == 0
    assert _run(["export", "-o", str(tmp_path / "out.csv"), *db], capsys)[0] == 0
    back = parse_document((tmp_path / "out.csv").read_bytes(), "csv")
    assert [(e.plate, e.info) for e in back] == [("ABC1234", {"Tag": "blue", "notes": "a, b"})]


def test_a_json_key_that_is_not_unicode_is_refused_naming_the_row(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A lone surrogate in a key: the CLI's import crashed (UnicodeEncodeError) and the
    # daemon's sync error named no row.
    data = b'[{"plate": "ABC123"}, {"plate": "XYZ999", "\\ud800x": "y"}]'
    with pytest.raises(WatchlistError, match=r"entry 2: key: '\\ud800x' is not valid UTF-8"):
        parse_document(data, "json")
    doc = tmp_path / "list.json"
    doc.write_bytes(data)
    rc, _, err = _run(["import", str(doc), "--db", str(tmp_path / "w.sqlite")], capsys)
    assert rc == 2 and "entry 2: key:" in err and "nothing imported" in err


def _daemon_store(tmp_path: Path, monkeypatch) -> Watchlist:
    """The daemon's store holding OLD111, looking at its file at every event."""
    import lprd.watchlist as watchlist_module

    monkeypatch.setattr(watchlist_module, "FOLLOW_EVERY", 0.0)
    daemon = Watchlist(tmp_path / "watchlist.sqlite")
    daemon.add(WatchlistEntry("OLD111", action="allow"))
    return daemon


def _matched(store: Watchlist, plate: str) -> str:
    from lprd.types import PlateEvent, WatchlistMatch

    ev = PlateEvent(id="e", camera="gate", plate=plate, confidence=0.9, chars=(),
                    candidates=(), first_seen=1.0, last_seen=2.0, frames=3, final=True,
                    box=(0, 0, 1, 1), frame_size=(2, 2), watchlist=WatchlistMatch.none())
    return store.match_event(ev).watchlist.match


def test_the_daemon_follows_a_store_deleted_and_started_afresh(tmp_path: Path,
                                                               monkeypatch) -> None:
    # An admin deleted watchlist.sqlite* to start the list afresh and added plates with the
    # CLI: the daemon kept matching the deleted file (its old plates, none of the new).
    daemon = _daemon_store(tmp_path, monkeypatch)
    assert _matched(daemon, "OLD111") == "exact"
    for f in tmp_path.glob("watchlist.sqlite*"):
        f.unlink()
    with Watchlist(tmp_path / "watchlist.sqlite") as cli:
        cli.add(WatchlistEntry("NEW222", action="allow"))
    assert _matched(daemon, "NEW222") == "exact"
    assert _matched(daemon, "OLD111") == "none"
    daemon.close()


def test_a_store_that_fails_to_open_leaves_no_connection_open(tmp_path: Path) -> None:
    # The inference worker tries a locked store again every 30 s: each failed open kept its
    # connection (two descriptors) until a garbage collection.
    import gc
    import os
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "watchlist.sqlite"
    path.touch()
    # another process holds the write lock (one of this process's would keep descriptors open
    # by SQLite's design: closing any would drop its POSIX locks)
    holder = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE x(a)'); "
              "c.execute('BEGIN IMMEDIATE'); c.execute('INSERT INTO x VALUES (1)'); "
              "print('locked', flush=True); sys.stdin.read()")
    lock = subprocess.Popen([sys.executable, "-c", holder, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert lock.stdout is not None and lock.stdout.readline().strip() == "locked"
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(sqlite3.OperationalError):
                Watchlist(path, busy_timeout=0.05)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()
        lock.communicate("")


def test_the_daemon_keeps_its_store_while_the_path_names_no_usable_file(tmp_path: Path,
                                                                       monkeypatch) -> None:
    # Only watchlist.sqlite deleted (its -wal and -shm left): following at once made a new file
    # beside the old WAL, and every lookup failed with "disk I/O error" (no allow at the gate).
    daemon = _daemon_store(tmp_path, monkeypatch)
    path = tmp_path / "watchlist.sqlite"
    path.unlink()
    assert _matched(daemon, "OLD111") == "exact"
    path.write_bytes(b"not a database at all" * 100)
    assert _matched(daemon, "OLD111") == "exact"
    daemon.close()


def test_status_of_a_store_never_synced_and_add_of_an_empty_plate_say_so(
        tmp_path: Path, capsys) -> None:
    # "sync.source: None" and "no plate (a 'plate' or 'tag' column)" on the command line.
    from lprd.cli import main

    db = str(tmp_path / "w.sqlite")
    assert main(["watchlist", "add", "ABC1234", "--db", db]) == 0
    assert main(["watchlist", "status", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "never synced" in out and "None" not in out
    assert main(["watchlist", "add", " ", "--db", db]) == 2
    assert "add: the plate is empty" in capsys.readouterr().err


def test_an_edit_is_on_disk_when_the_command_says_done(tmp_path: Path) -> None:
    # synchronous=NORMAL in WAL: a commit survives a crash of the process, not a power cut
    with Watchlist(tmp_path / "w.sqlite", WatchlistConfig()) as wl:
        wl.add(WatchlistEntry("ABC1234", action="deny"))
        assert wl._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
