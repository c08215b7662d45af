"""Watchlist sync against a real HTTP server on 127.0.0.1 and a real SQLite file."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lprd.config import SyncConfig, WatchlistConfig
from lprd.plate_match import WatchlistEntry
from lprd.types import Candidate
from lprd.watchlist import (
    DB_NAME,
    SyncResult,
    SyncStatus,
    Watchlist,
    WatchlistSync,
    parse_document,
    retry_delay,
)

GOOD_CSV = "plate,list,action,owner\nABC1234,residents,allow,Ann\nXYZ9876,hotlist,deny,\n"
TOKEN = "s3cr3t-token-value"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/csv"
    etag: str | None = None
    last_modified: str | None = None
    mode: str = "normal"  # normal | truncate | slow | stream (no Content-Length) | chunked
    need_token: bool = False
    hits: int = 0
    location: str | None = None  # answered with a 301 to this


@dataclass
class ListServer:
    """A real HTTP server whose routes the test sets; it records each request's headers."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(srv: ListServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            srv.requests.append((self.path, dict(self.headers.items())))
            route = srv.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route.hits += 1
            if route.location:
                self.send_response(301)
                self.send_header("Location", route.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if route.need_token and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401)
                return
            if route.status != 200:
                self.send_error(route.status)
                return
            if route.etag and self.headers.get("If-None-Match") == route.etag or (
                    route.last_modified
                    and self.headers.get("If-Modified-Since") == route.last_modified):
                self.send_response(304)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            if route.content_type:
                self.send_header("Content-Type", route.content_type)
            if route.etag:
                self.send_header("ETag", route.etag)
            if route.last_modified:
                self.send_header("Last-Modified", route.last_modified)
            body = route.body
            if route.mode == "stream":
                self.send_header("Connection", "close")
            elif route.mode == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                # truncate: promise the whole body, send half, hang up
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if route.mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif route.mode == "slow":
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                elif route.mode == "chunked":
                    for i in range(0, len(body), 20):
                        part = body[i:i + 20]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    for i in range(0, len(body), 65536):
                        self.wfile.write(body[i:i + 65536])
                    if route.mode == "stream":
                        self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

    return Handler


@pytest.fixture
def server() -> Iterator[ListServer]:
    srv = ListServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(srv))
    httpd.daemon_threads = True
    srv.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def wl(tmp_path: Path) -> Iterator[Watchlist]:
    w = Watchlist(tmp_path / DB_NAME, WatchlistConfig())
    yield w
    w.close()


def _sync(wl: Watchlist, source: str, **kw: object) -> WatchlistSync:
    return WatchlistSync(wl, SyncConfig(source=source, **kw))  # type: ignore[arg-type]


def _good(server: ListServer, wl: Watchlist) -> None:
    server.routes["/good.csv"] = Route(GOOD_CSV.encode(), etag='"v1"')
    r = _sync(wl, server.url("/good.csv")).sync_once()
    assert r.ok and r.changed and r.entries == 2


def test_good_csv_list_is_swapped_in_and_status_says_so(server: ListServer,
                                                         wl: Watchlist) -> None:
    _good(server, wl)
    m = wl.match("A8C1234")
    assert (m.match, m.list, m.action, m.info) == ("fuzzy", "residents", "allow", {"owner": "Ann"})
    assert wl.match("XYZ9876").action == "deny"
    st = wl.sync_status()
    assert (st.last_sync_ok, st.last_error, st.entries, st.etag) == (True, None, 2, '"v1"')
    assert st.to_dict()["last_change"].endswith("Z")


def test_etag_is_sent_back_and_304_keeps_the_list(server: ListServer, wl: Watchlist) -> None:
    _good(server, wl)
    r = _sync(wl, server.url("/good.csv")).sync_once()
    assert r == SyncResult(True, False, 2, not_modified=True, seconds=r.seconds)
    assert server.requests[-1][1].get("If-None-Match") == '"v1"'
    assert wl.count() == 2 and wl.sync_status().last_sync_ok is True


def test_if_modified_since_is_sent_when_the_server_gives_no_etag(server: ListServer,
                                                                 wl: Watchlist) -> None:
    stamp = "Wed, 25 Nov 2026 10:00:00 GMT"
    server.routes["/lm.csv"] = Route(GOOD_CSV.encode(), last_modified=stamp)
    sync = _sync(wl, server.url("/lm.csv"))
    assert sync.sync_once().changed
    r = sync.sync_once()
    assert r.ok and r.not_modified and not r.changed
    assert server.requests[-1][1].get("If-Modified-Since") == stamp


def test_json_list_by_content_type_or_extension(server: ListServer, wl: Watchlist) -> None:
    doc = {"entries": [{"plate": "JSN001", "action": "alert", "info": {"case": 7}}]}
    server.routes["/api/list"] = Route(json.dumps(doc).encode(), content_type="application/json")
    server.routes["/list.json"] = Route(json.dumps(doc["entries"]).encode(),
                                        content_type="text/plain")
    for path in ("/api/list", "/list.json"):
        r = _sync(wl, server.url(path), list="hot").sync_once()
        assert r.ok and r.entries == 1, r.error
        m = wl.match("JSN001")
        assert (m.list, m.action, m.info) == ("hot", "alert", {"case": 7})


@pytest.mark.parametrize("route,error", [
    (Route(b"plate,owner\nNEW001,A\nNEW002,B,C\n"), "line 3: 3 fields"),
    (Route(b'[{"plate": "NEW001"},', content_type="application/json"), "not valid JSON"),
    (Route(GOOD_CSV.replace("ABC", "NEW").encode() * 50, mode="truncate"), "truncated"),
    (Route(status=500), "HTTP 500"),
    (Route(status=404), "HTTP 404"),
    (Route(b"<html>please log in</html>", content_type="text/html"), "text/html"),
    (Route(b""), "empty document"),
])
def test_a_bad_download_keeps_the_last_good_list_and_reports_why(
        server: ListServer, wl: Watchlist, route: Route, error: str,
        caplog: pytest.LogCaptureFixture) -> None:
    _good(server, wl)
    server.routes["/bad"] = route
    with caplog.at_level(logging.WARNING, logger="lprd.watchlist"):
        r = _sync(wl, server.url("/bad")).sync_once()
    assert not r.ok and not r.changed and error in (r.error or "")
    assert r.entries == 2
    assert [e.plate for e in wl.entries()] == ["ABC1234", "XYZ9876"]  # the last good list
    st = wl.sync_status()
    assert st.last_sync_ok is False and error in (st.last_error or "")
    assert (st.entries, st.etag, st.source) == (2, '"v1"', server.url("/good.csv"))
    assert any("keeping the last good list" in rec.getMessage() and error in rec.getMessage()
               for rec in caplog.records)


def test_oversized_list_is_refused_by_its_length_before_download(server: ListServer,
                                                                 wl: Watchlist) -> None:
    _good(server, wl)
    server.routes["/big.csv"] = Route(b"plate\n" + b"ABC123\n" * 100_000)
    r = _sync(wl, server.url("/big.csv"), max_bytes=10_000).sync_once()
    assert not r.ok and "larger than max_bytes" in (r.error or "") and r.bytes == 0
    assert wl.count() == 2


def test_oversized_stream_without_length_is_aborted_at_max_bytes(server: ListServer,
                                                                 wl: Watchlist) -> None:
    _good(server, wl)
    body = b"plate\n" + b"".join(b"P%06d\n" % i for i in range(300_000))  # about 2.4 MB
    server.routes["/stream.csv"] = Route(body, mode="stream")
    r = _sync(wl, server.url("/stream.csv"), max_bytes=100_000).sync_once()
    assert not r.ok and "download aborted" in (r.error or "")
    assert wl.count() == 2
    # Under the limit the same kind of response (no length, closed at the end) is fine.
    server.routes["/small.csv"] = Route(b"plate\nOK0001\n", mode="stream")
    assert _sync(wl, server.url("/small.csv"), max_bytes=100_000).sync_once().entries == 1
    # Cut in its last row, such a body ends where the connection closed: only the missing
    # line break says so (it landed half the list and a partial plate, P00000, as good)
    server.routes["/cut.csv"] = Route(body[:60], mode="stream")
    r = _sync(wl, server.url("/cut.csv")).sync_once()
    assert not r.ok and "cut short" in (r.error or "") and wl.entries()[0].plate == "OK0001"
    server.routes["/whole.csv"] = Route(body[:62], mode="stream")  # up to a line break
    assert _sync(wl, server.url("/whole.csv")).sync_once().entries == 7
    # chunked encoding marks its own end: no line break needed there
    server.routes["/chunked.csv"] = Route(body[:60], mode="chunked")
    assert _sync(wl, server.url("/chunked.csv")).sync_once().entries == 7


def test_slow_server_times_out_and_keeps_the_list(server: ListServer, wl: Watchlist) -> None:
    _good(server, wl)
    server.routes["/slow.csv"] = Route(GOOD_CSV.encode() * 3, mode="slow")  # 0.2 s a byte
    t0 = time.monotonic()
    r = _sync(wl, server.url("/slow.csv"), timeout=1.0).sync_once()
    assert time.monotonic() - t0 < 4.0
    assert not r.ok and "longer than 1.0 s" in (r.error or "")
    assert wl.count() == 2


def test_unreachable_server_is_a_failed_sync(wl: Watchlist) -> None:
    wl.add(WatchlistEntry("LOCAL1"))
    r = _sync(wl, "http://127.0.0.1:9/list.csv", timeout=2.0).sync_once()
    assert not r.ok and "cannot fetch" in (r.error or "")
    assert wl.count() == 1


def test_bearer_token_comes_from_token_file_and_is_never_shown(
        server: ListServer, wl: Watchlist, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    server.routes["/auth.csv"] = Route(GOOD_CSV.encode(), need_token=True)
    caplog.set_level(logging.DEBUG, logger="lprd.watchlist")
    r = _sync(wl, server.url("/auth.csv")).sync_once()
    assert not r.ok and "HTTP 401" in (r.error or "")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = _sync(wl, server.url("/auth.csv"), token_file=token_file).sync_once()
    assert r.ok and r.entries == 2
    assert server.requests[-1][1]["Authorization"] == f"Bearer {TOKEN}"
    r = _sync(wl, server.url("/auth.csv"), token_file=tmp_path / "missing").sync_once()
    assert not r.ok and "cannot read token_file" in (r.error or "")
    shown = caplog.text + json.dumps(wl.sync_status().to_dict())
    assert TOKEN not in shown


def test_secrets_in_the_url_stay_out_of_errors(server: ListServer, wl: Watchlist) -> None:
    server.routes["/gone.csv?key=abc"] = Route(status=500)
    r = _sync(wl, f"http://user:pw@127.0.0.1:{server.port}/gone.csv?key=abc").sync_once()
    assert not r.ok and "/gone.csv" in (r.error or "")
    assert "pw" not in (r.error or "") and "key=abc" not in (r.error or "")


def test_a_password_in_the_url_is_sent_as_basic_auth_and_never_shown(
        server: ListServer, wl: Watchlist, caplog: pytest.LogCaptureFixture) -> None:
    # urllib took the password for a port ("nonnumeric port: 'S3cret@Pw@127.0.0.1'"): the
    # credentials never worked, and every failed sync showed them in the journal and on MQTT.
    caplog.set_level(logging.DEBUG, logger="lprd.watchlist")
    server.routes["/l.csv"] = Route(GOOD_CSV.encode())
    r = _sync(wl, f"http://alice:S3cret%40Pw@127.0.0.1:{server.port}/l.csv").sync_once()
    assert r.ok and r.entries == 2, r.error
    assert server.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(
        b"alice:S3cret@Pw").decode()
    for url in (f"http://alice:S3cret%40Pw@127.0.0.1:{server.port}/gone.csv",
                "http://alice:S3cret%40Pw@127.0.0.1:9/l.csv",
                "http://alice:S3cret@Pw@127.0.0.1:x9/l.csv"):
        r = _sync(wl, url, timeout=2.0).sync_once()
        assert not r.ok and "127.0.0.1" in (r.error or ""), url
        shown = caplog.text + json.dumps(wl.sync_status().to_dict()) + (r.error or "")
        assert "S3cret" not in shown, url


def test_a_short_password_is_scrubbed_only_where_it_stands_in_the_url() -> None:
    # every "e" of a message was starred for the password "e": "Conn***ction r***fus***d"
    from lprd.watchlist import _scrub

    src = "http://gate:e@127.0.0.1:9/list.csv?v=1"
    msg = "cannot fetch http://gate:e@127.0.0.1:9/list.csv?v=1 ([Errno 111] Connection refused)"
    assert _scrub(msg, src) == ("cannot fetch http://gate:***@127.0.0.1:9/list.csv?*** "
                                "([Errno 111] Connection refused)")


def test_a_url_http_cannot_send_is_refused_without_its_query(
        server: ListServer, wl: Watchlist, caplog: pytest.LogCaptureFixture) -> None:
    # A space in the query: http.client's error quoted the whole URL, its key included.
    caplog.set_level(logging.DEBUG, logger="lprd.watchlist")
    for query in ("key=S3CRET&lot=North Gate", "key=S3CRET&x=a\nb"):
        r = _sync(wl, f"http://127.0.0.1:{server.port}/l.csv?{query}").sync_once()
        assert not r.ok and "/l.csv: not a URL that HTTP can request" in (r.error or "")
        shown = caplog.text + json.dumps(wl.sync_status().to_dict())
        assert "S3CRET" not in shown and "unexpected error" not in shown


def test_a_token_file_that_is_not_one_line_is_refused_naming_the_file(
        server: ListServer, wl: Watchlist, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # http.client refused the header with a ValueError: a traceback, and the token in
    # last_error on the retained state topic.
    from lprd.config import Config, file_problems

    caplog.set_level(logging.DEBUG, logger="lprd.watchlist")
    server.routes["/auth.csv"] = Route(GOOD_CSV.encode(), need_token=True)
    token_file = tmp_path / "token"
    for text, why in ((f"{TOKEN}\nold-{TOKEN}\n", "holds more than one line"),
                      (f"Bearer {TOKEN}\n", "holds a space"),
                      (f"{TOKEN}\x7f\n", "a control character")):
        token_file.write_text(text)
        r = _sync(wl, server.url("/auth.csv"), token_file=token_file).sync_once()
        assert not r.ok and f"token_file {token_file} holds" in (r.error or "")
        assert why in (r.error or ""), text
        shown = caplog.text + json.dumps(wl.sync_status().to_dict())
        assert TOKEN not in shown and "unexpected error" not in shown
        cfg = Config.model_validate({"watchlist": {"sync": {
            "source": server.url("/auth.csv"), "token_file": str(token_file)}}})
        problems = [p for p in file_problems(cfg) if p.startswith("watchlist.sync.token_file")]
        assert len(problems) == 1 and problems[0].startswith(
            f"watchlist.sync.token_file: {token_file} holds") and why in problems[0]
        assert TOKEN not in problems[0]
    token_file.write_text(TOKEN + "\n")
    assert _sync(wl, server.url("/auth.csv"), token_file=token_file).sync_once().ok


def test_sync_replaces_only_synced_entries_and_keeps_local_ones(server: ListServer,
                                                                wl: Watchlist) -> None:
    wl.add(WatchlistEntry("LOCAL1", list="visitors", action="allow"))
    _good(server, wl)
    server.routes["/good.csv"] = Route(b"plate\nNEW0001\n", etag='"v2"')
    r = _sync(wl, server.url("/good.csv")).sync_once()
    assert r.ok and r.changed and r.entries == 1
    assert sorted((e.plate, e.origin) for e in wl.entries()) == [
        ("LOCAL1", "local"), ("NEW0001", "sync")]
    assert wl.match("ABC1234").match == "none"  # dropped from the source, gone here too
    assert wl.match("L0CAL1").plate == "LOCAL1"


def test_file_source_syncs_and_an_unchanged_file_is_not_reread(wl: Watchlist,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "plates.csv"
    src.write_text("tag,make,model,permit,lot,valid\nABC1234,Honda,Civic,R1,A,yes\n")
    sync = _sync(wl, str(src), list="permits")
    assert sync.sync_once().changed
    assert wl.match("ABC1234").info["permit"] == "R1"
    again = sync.sync_once()
    assert again.ok and again.not_modified
    src.write_text("tag,make\nXYZ1,Kia\n")
    assert sync.sync_once().changed and wl.match("XYZ1").list == "permits"
    src.unlink()
    r = sync.sync_once()
    assert not r.ok and "cannot read" in (r.error or "") and wl.count() == 1


def test_an_empty_list_keeps_a_synced_one_unless_allowed(wl: Watchlist, tmp_path: Path) -> None:
    src = tmp_path / "plates.csv"
    src.write_text("plate,list,action\nABC1234,residents,allow\n")
    assert _sync(wl, str(src)).sync_once().changed
    src.write_text("plate,list,action\n")  # a header-only export
    r = _sync(wl, str(src)).sync_once()
    assert not r.ok and "allow_empty" in (r.error or "") and r.entries == 1
    assert wl.match("ABC1234").action == "allow" and not wl.sync_status().last_sync_ok
    r = _sync(wl, str(src), allow_empty=True).sync_once()
    assert r.ok and r.changed and r.entries == 0 and wl.match("ABC1234").match == "none"


def test_a_list_longer_than_max_entries_is_refused_and_the_last_one_kept(
        wl: Watchlist, tmp_path: Path) -> None:
    # A sync holds the whole list in memory before the swap: 64 MB of short rows would take
    # gigabytes, and an out-of-memory kill at start becomes a restart loop.
    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\n")
    assert _sync(wl, str(src), max_entries=3).sync_once().changed
    src.write_text("plate\n" + "".join(f"AB{i:05d}\n" for i in range(4)))
    r = _sync(wl, str(src), max_entries=3).sync_once()
    assert not r.ok and "more than 3 entries (watchlist.sync.max_entries" in (r.error or "")
    assert wl.count() == 1 and wl.match("ABC1234").match == "exact"


def test_a_list_far_over_max_entries_is_refused_before_its_rows_take_memory(
        wl: Watchlist, tmp_path: Path) -> None:
    # Every row was read (and the text split into lines) before the count: an 8 MiB list
    # with max_entries 1000 took 740 MiB.
    src = tmp_path / "plates.csv"
    src.write_bytes(b"plate\n" + b"A1\n" * 700_000)  # 2 MiB
    tracemalloc.start()
    try:
        r = _sync(wl, str(src), max_entries=1000).sync_once()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not r.ok and "more than 1000 entries (watchlist.sync.max_entries" in (r.error or "")
    assert peak < 3 * src.stat().st_size  # the bytes and their text; no row kept


def test_a_csv_whose_spaced_reading_fails_late_is_read_the_plain_way() -> None:
    # Rows go one at a time now: a quote that only the plain reading takes as text, far down
    # the list, still makes the plain reading the one taken, as when the whole list was read.
    rows = "".join(f"AB{i:04d}, ok\n" for i in range(2000))
    doc = f"plate, notes\n{rows}ZZ9, \"Ace\" Towing\n".encode()
    entries = parse_document(doc, "csv", max_entries=5000)
    assert len(entries) == 2001 and entries[-1].info == {"notes": '"Ace" Towing'}
    # ... and a row the spaced reading cannot take before it does not refuse the list either
    doc = b'plate, owner, notes\nAB1, "Smith, John"\n' + rows.encode().replace(b", ok", b", a, b") \
        + b'ZZ9, "Ace" Towing, x\n'
    entries = parse_document(doc, "csv")
    assert entries[0].info == {"owner": '"Smith', "notes": 'John"'} and len(entries) == 2002


def test_a_list_in_its_declared_charset_is_read(server: ListServer, wl: Watchlist) -> None:
    # A spreadsheet's CSV export, served as windows-1252 (the owner's name has an e-acute).
    body = "plate,owner\nABC1234,Ren\u00e9e\n".encode("cp1252")
    server.routes["/l.csv"] = Route(body, content_type="text/csv; charset=windows-1252")
    r = _sync(wl, server.url("/l.csv")).sync_once()
    assert r.ok and r.changed, r.error
    assert wl.match("ABC1234").info == {"owner": "Ren\u00e9e"}
    # UTF-8 (with Excel's BOM) stays UTF-8 whatever a server's default header says
    body = "\ufeffplate,owner\nXYZ9876,Ren\u00e9e\n".encode()
    server.routes["/u.csv"] = Route(body, content_type="text/csv; charset=iso-8859-1")
    r = _sync(wl, server.url("/u.csv")).sync_once()
    assert r.ok and r.changed, r.error
    assert wl.match("XYZ9876").info == {"owner": "Ren\u00e9e"}
    server.routes["/bad.csv"] = Route(b"plate\nAB\xe91\n", content_type="text/csv; charset=nope-1")
    r = _sync(wl, server.url("/bad.csv")).sync_once()
    assert not r.ok and "not its declared charset 'nope-1'" in (r.error or "")


def test_a_file_written_while_it_is_read_is_not_swapped_in(wl: Watchlist, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import lprd.watchlist as watchlist_mod

    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\nXYZ9876\n")
    sync = _sync(wl, str(src))
    real_fstat = watchlist_mod.os.fstat

    def grows(fd: int) -> os.stat_result:  # the producer appends while we read
        st = real_fstat(fd)
        return os.stat_result((*st[:6], st.st_size + 9, *st[7:]))

    monkeypatch.setattr(watchlist_mod.os, "fstat", grows)
    r = sync.sync_once()
    assert not r.ok and "changed while it was read" in (r.error or "") and wl.count() == 0
    monkeypatch.setattr(watchlist_mod.os, "fstat", real_fstat)
    assert sync.sync_once().changed and wl.count() == 2


def test_a_file_rewritten_in_place_is_not_swapped_in_half_written(wl: Watchlist,
                                                                  tmp_path: Path) -> None:
    # A cron job's `curl -o list.csv` caught between two writes: a list cut in a row, its
    # last plate partial, replaced the whole one.
    src = tmp_path / "list.csv"
    whole = "plate,action\n" + "".join(f"AB{i:04d},allow\n" for i in range(1000))
    src.write_text(whole)
    sync = _sync(wl, str(src))
    assert sync.sync_once().entries == 1000
    src.write_text(whole[:5003])
    writer = threading.Timer(0.5, lambda: src.write_text(whole.replace("AB0999,allow",
                                                                       "AB0999,deny")))
    writer.start()
    r = sync.sync_once()  # waits for the file to stay the same: it does not
    writer.join()
    assert not r.ok and "changed while it was read" in (r.error or "")
    assert r.entries == 1000 and wl.match("AB0999").action == "allow"
    r = sync.sync_once()
    assert r.ok and r.changed and wl.match("AB0999").action == "deny"
    # a list without a final line break, just written (`printf ... > list.csv && lprd
    # watchlist sync`) or long ago (an editor that adds none), or dated in the future
    for age in (0.0, 60.0, -3600.0):
        src.write_text(whole.rstrip("\n").replace("AB0999,allow", f"AB0999,x{age:g}"))
        os.utime(src, (time.time() - age, time.time() - age))
        r = sync.sync_once()
        assert r.ok and r.changed and wl.match("AB0999").action == f"x{age:g}", r.error


def _cli_sync_during_the_daemon_s(tmp_path: Path, cli_meanwhile: Callable[[Path, Path], None]
                                  ) -> WatchlistSync:
    """The daemon syncs list a; during its second sync (a unchanged) `cli_meanwhile` runs
    `lprd watchlist sync --source b` on the same file."""
    a = tmp_path / "a.csv"
    a.write_text("plate,action\nAAA111,allow\nAAA222,allow\n")
    b = tmp_path / "b.csv"
    b.write_text("plate,action\nBBB999,deny\n")
    db = tmp_path / DB_NAME
    daemon = WatchlistSync(Watchlist(db, WatchlistConfig()), SyncConfig(source=str(a)))
    assert daemon.sync_once().changed
    fetch = daemon._fetch

    def fetch_while_the_cli_syncs(source: str, status: SyncStatus) -> object:
        got = fetch(source, status)
        cli_meanwhile(db, b)
        return got

    daemon._fetch = fetch_while_the_cli_syncs  # type: ignore[method-assign]
    assert daemon.sync_once().ok
    daemon._fetch = fetch  # type: ignore[method-assign]
    return daemon


def _synced_later(daemon: WatchlistSync) -> tuple[str | None, list[str]]:
    """The daemon's next two syncs (its list a unchanged), then what its store holds."""
    for _ in range(2):
        assert daemon.sync_once().ok
    w = daemon.watchlist
    name = Path(w.sync_status().source or "").name
    plates = [e.plate for e in w.entries(origin="sync")]
    w.close()
    return name, plates


def _cli_sync(db: Path, source: Path) -> None:
    with Watchlist(db, WatchlistConfig()) as w:
        assert WatchlistSync(w, SyncConfig(source=str(source))).sync_once().ok


def test_a_cli_sync_during_the_daemon_s_leaves_the_list_its_status_names(
        tmp_path: Path) -> None:
    # The daemon's sync, finding its list unchanged, wrote back the status it read at its
    # start over the CLI's new list: list b stayed, its status said a, and every later sync
    # (a unchanged) kept it so.
    threads: list[threading.Thread] = []

    def in_another_process(db: Path, b: Path) -> None:
        t = threading.Thread(target=_cli_sync, args=(db, b))
        t.start()
        t.join(1.0)  # it waits for the daemon's sync to end
        threads.append(t)

    daemon = _cli_sync_during_the_daemon_s(tmp_path, in_another_process)
    threads[0].join(10)
    assert _synced_later(daemon) == ("a.csv", ["AAA111", "AAA222"])


def test_without_file_locks_a_sync_never_writes_back_an_older_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lprd.watchlist as watchlist_mod

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(watchlist_mod.fcntl, "flock", no_locks)
    daemon = _cli_sync_during_the_daemon_s(tmp_path, _cli_sync)
    assert _synced_later(daemon) == ("a.csv", ["AAA111", "AAA222"])


def test_lookups_during_swaps_see_the_old_or_the_new_list_never_a_mix(
        server: ListServer, wl: Watchlist) -> None:
    # Two versions of a list that share plates with different metadata; the server hands out
    # the other version on each request, so every sync is a full swap.
    shared = [f"S{i:05d}" for i in range(2500)]

    def version(gen: int, extra: int) -> bytes:
        rows = [f"{p},v{gen},{gen}" for p in shared]
        rows += [f"G{gen}X{i:04d},v{gen},{gen}" for i in range(extra)]
        return ("plate,list,gen\n" + "\n".join(rows) + "\n").encode()

    bodies = {1: version(1, 300), 2: version(2, 100)}
    sizes = {1: 2800, 2: 2600}
    server.routes["/flip.csv"] = Route(bodies[1])
    sync = _sync(wl, server.url("/flip.csv"))
    assert sync.sync_once().entries == sizes[1]

    stop = threading.Event()
    problems: list[str] = []
    counts = {"match": 0, "snapshot": 0}

    def lookups(seed: int) -> None:
        i = seed
        try:
            while not stop.is_set():
                i += 7
                p = shared[i % len(shared)]
                # An OCR-confused read (S->5) with the other version's own plate as a
                # candidate: exact phase and fuzzy phase both run.
                m = wl.match("5" + p[1:], [Candidate(f"G2X{i % 100:04d}", 0.1)])
                if m.match == "none" or m.list != f"v{m.info.get('gen')}":
                    problems.append(f"match {p}: {m}")
                counts["match"] += 1
                if i % 10 == 0:
                    snap = wl.entries(origin="sync")
                    gens = {e.info["gen"] for e in snap}
                    if len(gens) != 1 or len(snap) != sizes[int(gens.pop())]:
                        problems.append(f"snapshot of {len(snap)} entries mixes versions")
                    counts["snapshot"] += 1
        except Exception as e:  # noqa: BLE001 - a crash in a thread must fail the test too
            problems.append(repr(e))

    threads = [threading.Thread(target=lookups, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    swaps = 0
    try:
        for n in range(8):
            gen = 2 if n % 2 == 0 else 1
            server.routes["/flip.csv"].body = bodies[gen]
            r = sync.sync_once()
            assert r.ok and r.changed and r.entries == sizes[gen], r
            swaps += 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert swaps == 8 and not problems, problems[:5]
    assert counts["match"] > 50 and counts["snapshot"] > 3, counts


def test_sync_thread_syncs_at_start_on_request_and_survives_failures(
        server: ListServer, tmp_path: Path) -> None:
    server.routes["/t.csv"] = Route(status=500)
    results: list[tuple[SyncResult, SyncStatus]] = []
    done = threading.Event()

    def on_result(r: SyncResult, st: SyncStatus) -> None:
        results.append((r, st))
        done.set()

    path = tmp_path / DB_NAME
    wl = Watchlist(path)
    sync = WatchlistSync(wl, SyncConfig(source=server.url("/t.csv"), interval=3600),
                         on_result=on_result)
    sync.start()
    try:
        assert done.wait(10)
        assert not results[-1][0].ok and results[-1][1].last_error
        done.clear()
        server.routes["/t.csv"] = Route(GOOD_CSV.encode())
        sync.request()  # SIGHUP or an MQTT command
        assert done.wait(10)
        assert results[-1][0].ok and results[-1][0].changed
        # Another connection (the CLI, the inference process) sees the list and the status.
        with Watchlist(path) as other:
            assert other.count() == 2 and other.sync_status().last_sync_ok is True
    finally:
        sync.stop()
        wl.close()
    assert sync._thread is None  # stopped within the timeout


def test_failed_syncs_retry_sooner_and_never_overflow() -> None:
    assert [retry_delay(n, 3600) for n in range(5)] == [3600, 30, 60, 120, 240]
    assert retry_delay(2000, 3600) == 3600  # after weeks of failures: no OverflowError
    assert retry_delay(3, 45) == 45


def test_the_daemon_s_sync_closes_its_store_when_it_stops(tmp_path: Path) -> None:
    # Each reload that changes watchlist.sync starts a new sync: the old one's SQLite
    # connections stayed open until a full garbage collection (3 descriptors each).
    import gc

    from lprd.config import Config
    from lprd.service import Supervisor

    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\n")
    cfg = Config.model_validate({"storage": {"dir": str(tmp_path / "st")},
                                 "watchlist": {"sync": {"source": str(src)}}})

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    sup = Supervisor(cfg, tmp_path / "c.yaml")
    gc.collect()
    gc.disable()
    try:
        before = fds()
        for _ in range(3):
            sup._start_sync()
            assert sup.sync is not None
            sup.sync.request()
            time.sleep(0.3)
            sup._stop_sync()
        assert fds() == before
    finally:
        gc.enable()


def test_a_store_moved_aside_by_the_inference_process_is_followed_and_filled_again(
        server: ListServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The inference process moves a damaged store aside and starts an empty one. The
    # supervisor's sync kept its connections to the moved file and went on filling that one
    # (reporting success, then sending its ETag for 304s) while events matched an empty list.
    path = tmp_path / DB_NAME
    syncing = Watchlist(path, WatchlistConfig(), recover=True)
    rows = "".join(f"AB{i:05d},stolen,deny\n" for i in range(3000))
    server.routes["/list.csv"] = Route(("plate,list,action\n" + rows).encode(), etag='"v1"')
    sync = _sync(syncing, server.url("/list.csv"))
    assert sync.sync_once().entries == 3000
    data = bytearray(path.read_bytes())  # an SD card fault in the middle of the file
    page = 4096 * (len(data) // 4096 // 2)
    data[page:page + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))
    with Watchlist(path, WatchlistConfig(), recover=True) as worker:  # moves it aside
        assert worker.count() == 0
        r = sync.sync_once()
        assert r.ok and r.changed and not r.not_modified
        assert "If-None-Match" not in server.requests[-1][1]  # the new file has no ETag yet
        assert worker.count() == 3000 and worker.match("AB00042").action == "deny"
    assert "was replaced" in caplog.text
    assert sync.sync_once().not_modified  # and from then on the new file's ETag
    syncing.close()


def test_a_replaced_store_is_reopened_without_failing_other_threads_queries(
        tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    shared = Watchlist(path, WatchlistConfig(), recover=True)
    shared.add(WatchlistEntry("ABC1234", action="deny"))
    errors: list[BaseException] = []
    stop = threading.Event()

    def query() -> None:
        while not stop.is_set():
            try:
                shared.match("ABC1234")
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)
                return

    reader = threading.Thread(target=query)
    reader.start()
    time.sleep(0.1)
    os.replace(path, tmp_path / "moved.sqlite")  # as the inference process's move aside
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Watchlist(path) as fresh:
        fresh.add(WatchlistEntry("NEW1", action="alert"))
    assert shared.follow_file()
    time.sleep(0.2)
    stop.set()
    reader.join()
    assert errors == []  # closing its connection under it raised "closed database"
    assert shared.match("NEW1").action == "alert"
    shared.close()


def test_a_store_replaced_by_one_that_cannot_be_opened_is_a_failed_sync(
        tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    syncing = Watchlist(path, WatchlistConfig(), recover=True)
    src = tmp_path / "list.csv"
    src.write_text("plate\nABC1234\n")
    sync = _sync(syncing, str(src))
    assert sync.sync_once().ok
    other = tmp_path / "other.sqlite"
    with Watchlist(other) as w:  # a store of a newer lprd
        w.write_sync_status(SyncStatus())
    with contextlib.closing(sqlite3.connect(other)) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        c.commit()
    os.replace(other, path)
    r = sync.sync_once()  # it raised out of the sync, which recorded nothing
    assert not r.ok and "schema 99" in (r.error or "")
    syncing.close()


def test_an_error_no_check_foresaw_is_a_failed_sync_in_the_status(
        server: ListServer, wl: Watchlist, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # It escaped to the thread's catch-all: the status went on saying the last sync was good.
    import lprd.watchlist

    _good(server, wl)
    server.routes["/new.csv"] = Route(b"plate\nNEW001\n")

    def broken(*a: object, **kw: object) -> None:
        raise OverflowError("a bug in a parser")  # fault injection: no input provokes one now

    monkeypatch.setattr(lprd.watchlist, "parse_document", broken)
    r = _sync(wl, server.url("/new.csv")).sync_once()
    assert not r.ok and "OverflowError" in (r.error or "")
    st = wl.sync_status()
    assert st.last_sync_ok is False and "a bug in a parser" in (st.last_error or "")
    assert wl.count() == 2 and "unexpected error" in caplog.text


def test_closing_the_store_while_a_sync_swaps_lets_the_swap_finish(tmp_path: Path) -> None:
    # A reload or a stop gave the sync 5 s, then closed the store's connections, the running
    # swap's among them: with a big list mid-query that crashed the daemon (SIGSEGV); between
    # queries the swap failed on a closed connection. A live thread's connection is its own.
    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\nXYZ9876\n")
    wl = Watchlist(tmp_path / DB_NAME, WatchlistConfig())
    wl.count()  # this thread's connection: close() closes it
    sync = _sync(wl, str(src))
    entered, go_on = threading.Event(), threading.Event()
    swap = wl.replace_synced

    def slow_swap(*a: object, **kw: object) -> object:
        entered.set()
        go_on.wait(10)
        return swap(*a, **kw)

    wl.replace_synced = slow_swap  # type: ignore[method-assign]
    results: list[SyncResult] = []
    sync.on_result = lambda r, _s: results.append(r)
    sync.start()
    assert entered.wait(10)
    thread = sync._thread
    sync.stop(0.1)  # what Supervisor._stop_sync does: the swap outlasts the wait
    wl.close()
    go_on.set()
    assert thread is not None
    thread.join(10)
    assert [r.ok for r in results] == [True]
    with Watchlist(tmp_path / DB_NAME, WatchlistConfig()) as fresh:
        assert fresh.count() == 2
    assert not any(t is thread for t, _ in wl._conns)  # it closed its own on the way out



def test_a_synced_list_repeating_a_plate_is_merged_not_rejected(wl: Watchlist, tmp_path: Path,
                                                                caplog) -> None:
    # Real exports repeat rows ("XYZ999" and "XYZ-999"): the whole list was rejected, so the
    # plates added upstream later (a car just reported stolen) never arrived.
    src = tmp_path / "plates.csv"
    src.write_text("plate,action\nXYZ999,allow\nABC1234,allow\nXYZ-999,deny\nKLM555,alert\n")
    with caplog.at_level(logging.WARNING, logger="lprd.watchlist"):
        r = _sync(wl, str(src)).sync_once()
    assert r.ok and r.entries == 3
    assert wl.match("XYZ999").action == "deny"  # the safest of the two
    assert wl.match("KLM555").action == "alert"
    assert "1 row(s) repeat a plate" in caplog.text and "line 4: XYZ999 (line 2)" in caplog.text
    # a row valid now before an expired one, however safe the expired one's action
    src.write_text("plate,action,valid_until\nKLM555,deny,2020-01-01\nKLM555,alert,\n")
    assert _sync(wl, str(src)).sync_once().ok
    assert wl.match("KLM555").action == "alert"


@pytest.mark.parametrize("http", [False, True])
def test_merged_rows_are_chosen_again_when_another_of_them_becomes_valid(
        wl: Watchlist, tmp_path: Path, server: ListServer, monkeypatch: pytest.MonkeyPatch,
        http: bool) -> None:
    # A permit renewed in a second row: the sync in June kept the row valid then, and as the
    # unchanged list was never read again (same bytes, a 304) the car matched nothing from July.
    import lprd.watchlist

    now = time.time()
    body = (f"plate,action,valid_from,valid_until\nPRM100,allow,,{now + 3600:.0f}\n"
            f"PRM100,allow,{now + 3600:.0f},{now + 90 * 86400:.0f}\n").encode()
    src = tmp_path / "permits.csv"
    src.write_bytes(body)
    server.routes["/permits.csv"] = Route(body, etag='"p1"')
    sync = _sync(wl, server.url("/permits.csv") if http else str(src))
    assert sync.sync_once().changed
    assert wl.match("PRM100").action == "allow"
    assert not sync.sync_once().changed  # the same list, before the first row ends
    monkeypatch.setattr(lprd.watchlist.time, "time", lambda: now + 7200)
    r = sync.sync_once()
    assert r.ok and r.changed
    assert wl.match("PRM100").action == "allow"  # the renewal's row, valid now
    # the next time a row of the pair starts or stops: the renewal's end
    assert wl.sync_status().remerge_at == pytest.approx(now + 90 * 86400, abs=1)
    assert not sync.sync_once().changed


def test_a_re_merge_due_leaves_a_failing_sync_s_backoff_alone(wl: Watchlist,
                                                              tmp_path: Path) -> None:
    # a sync failing after its merged rows' time came waited 1 s instead of its backoff:
    # a warning every second for as long as the source was away
    wl.write_sync_status(SyncStatus(remerge_at=time.time() - 60))
    sync = _sync(wl, str(tmp_path / "gone.csv"))
    results: list[SyncResult] = []
    sync.on_result = lambda result, status: results.append(result)
    sync.start()
    try:
        time.sleep(2.5)
    finally:
        sync.stop()
    assert [r.ok for r in results] == [False]  # then the 30 s backoff


def test_a_redirect_keeps_the_token_on_its_host_and_never_leaves_https(
        wl: Watchlist, server: ListServer, tmp_path: Path) -> None:
    # urllib dropped the credentials on every redirect: a server's own 301 (a list moved to a
    # new path) answered "HTTP 401" with no word of the redirect
    import urllib.error
    import urllib.request

    from lprd.watchlist import _Redirects

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    server.routes["/old.csv"] = Route(location="/new.csv")
    server.routes["/new.csv"] = Route(GOOD_CSV.encode(), need_token=True)
    r = _sync(wl, server.url("/old.csv"), token_file=token).sync_once()
    assert r.ok and r.entries == 2, r.error
    # to another host (or port) the token does not go
    other = urllib.request.Request("http://127.0.0.1:1/a.csv")
    other.add_unredirected_header("Authorization", "Bearer x")
    moved = _Redirects().redirect_request(other, None, 301, "Moved", {},
                                          "http://127.0.0.2:1/b.csv")
    assert moved is not None and not moved.has_header("Authorization")
    # up to https on the same host it does
    plain = urllib.request.Request("http://lists.example/a.csv")
    plain.add_unredirected_header("Authorization", "Bearer x")
    moved = _Redirects().redirect_request(plain, None, 301, "Moved", {},
                                          "https://lists.example/a.csv")
    assert moved is not None and moved.get_header("Authorization") == "Bearer x"
    # and https never goes on to http: a man in the middle could hand in allow entries
    secure = urllib.request.Request("https://lists.example/a.csv")
    with pytest.raises(urllib.error.URLError, match="redirected from https to http://"):
        _Redirects().redirect_request(secure, None, 302, "Found", {}, "http://lists.example/a")


def test_a_request_is_answered_by_the_sync_after_it_even_one_that_could_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a command's request came back in no result where the sync could not have its lock (a
    # `lprd watchlist sync` still running): the thread logged a crash and the command was
    # never answered
    import fcntl

    import lprd.watchlist as watchlist_mod

    monkeypatch.setattr(watchlist_mod, "SYNC_LOCK_WAIT", 0.3)
    src = tmp_path / "plates.csv"
    src.write_text(GOOD_CSV)
    results: list[SyncResult] = []
    done = threading.Event()

    def on_result(r: SyncResult, st: SyncStatus) -> None:
        results.append(r)
        done.set()

    wl = Watchlist(tmp_path / DB_NAME)
    sync = WatchlistSync(wl, SyncConfig(source=str(src), interval=3600), on_result=on_result)
    sync.start()
    try:
        assert done.wait(10) and results[-1].ok and results[-1].requests == ()
        done.clear()
        held = os.open(f"{wl.path}.sync-lock", os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's sync
        try:
            sync.request("first")
            assert done.wait(10)
        finally:
            os.close(held)
        assert results[-1].requests == ("first",) and not results[-1].ok
        assert "another sync" in (results[-1].error or "")
        assert wl.sync_status().last_sync_ok is True  # the other sync's status, not this one's
        n = len(results)
        sync.request("second")
        sync.request("third")  # in the same sync as "second" or the next
        deadline = time.monotonic() + 10
        while sum(len(r.requests) for r in results[n:]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [q for r in results[n:] for q in r.requests] == ["second", "third"]
        assert all(r.ok for r in results[n:])
    finally:
        sync.stop()
        wl.close()
    assert sync.take_requests() == []
