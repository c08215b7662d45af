"""sd_notify, the watchdog gate and journald logging, against real AF_UNIX sockets and threads."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lprd import notify
from lprd.notify import Notifier, WatchdogGate, WatchdogPinger

REPO = Path(__file__).resolve().parent.parent

BACKENDS = ["systemd-python", "fallback"]


@dataclass
class Datagram:
    received: float  # monotonic
    pid: int  # the sender, from SCM_CREDENTIALS (what NotifyAccess=main checks)
    fields: dict[str, str]


class NotifySocket:
    """What systemd's manager side does: a bound AF_UNIX datagram socket with SO_PASSCRED."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float) -> Datagram | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        return Datagram(time.monotonic(), pid, fields)

    def collect(self, seconds: float) -> list[Datagram]:
        end = time.monotonic() + seconds
        out = []
        while (left := end - time.monotonic()) > 0:
            d = self.receive(left)
            if d is not None:
                out.append(d)
        return out

    def wait_for(self, key: str, timeout: float) -> Datagram:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            d = self.receive(left)
            if d is not None and key in d.fields:
                return d
        raise AssertionError(f"no {key} within {timeout} s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 108 bytes and tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="lprd-n-", dir="/tmp")
    s = NotifySocket(os.path.join(d, "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", s.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield s
    s.close()
    shutil.rmtree(d, ignore_errors=True)


def _notifier(backend: str) -> Notifier:
    if backend == "systemd-python" and notify._sd_daemon is None:
        pytest.skip("systemd-python is not installed")
    n = Notifier(use_library=backend == "systemd-python")
    assert n.backend == backend
    return n


@pytest.mark.parametrize("backend", BACKENDS)
def test_ready_status_stopping_arrive_in_order_from_our_pid(
    notify_socket: NotifySocket, backend: str
) -> None:
    n = _notifier(backend)
    assert n.ready(status="2 cameras")
    assert n.status("gate 5.0 fps, outbox 0")
    assert n.stopping()
    got = [notify_socket.receive(2.0) for _ in range(3)]
    assert [d.fields for d in got if d] == [
        {"READY": "1", "STATUS": "2 cameras"},
        {"STATUS": "gate 5.0 fps, outbox 0"},
        {"STOPPING": "1"},
    ]
    assert {d.pid for d in got if d} == {os.getpid()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_abstract_namespace_socket_is_reached(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    s = NotifySocket(f"@lprd-test-{uuid.uuid4().hex}")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", s.address)
        assert _notifier(backend).ready()
        d = s.receive(2.0)
        assert d is not None and d.fields == {"READY": "1"}
    finally:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reload_sends_reloading_with_monotonic_time_then_ready(
    notify_socket: NotifySocket, backend: str
) -> None:
    n = _notifier(backend)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    n.ready()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = notify_socket.receive(2.0), notify_socket.receive(2.0)
    assert first is not None and second is not None
    assert first.fields["RELOADING"] == "1"
    assert before <= int(first.fields["MONOTONIC_USEC"]) <= after
    assert second.fields == {"READY": "1"}


def test_status_text_cannot_inject_other_assignments(notify_socket: NotifySocket) -> None:
    Notifier(use_library=False).status("gate ok\nREADY=1")
    d = notify_socket.receive(2.0)
    assert d is not None and d.fields == {"STATUS": "gate ok READY=1"}


def test_without_notify_socket_every_call_is_a_quiet_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.backend == "off"
    assert not any([n.ready(), n.watchdog(), n.status("x"), n.reloading(), n.stopping()])


def test_a_vanished_socket_is_reported_not_raised(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(use_library=False)
    notify_socket.close()
    os.unlink(notify_socket.address)
    assert not n.ready()
    assert not n.watchdog()
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_watchdog_interval_follows_watchdog_usec_and_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = Notifier()
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert n.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert n.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert n.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert n.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert n.watchdog_interval() is None


def test_gate_names_only_workers_silent_past_the_hang_timeout() -> None:
    gate = WatchdogGate(hang_timeout=10.0)
    beats = {"capture:gate": 95.0, "inference": 89.0, "capture:lot": 90.0}
    assert gate.hung(beats, now=100.0) == ["inference"]
    assert not gate.should_ping(beats, now=100.0)
    assert gate.should_ping(beats, now=99.0)  # 10 s exactly is not yet hung
    assert gate.should_ping({}, now=100.0)  # no workers: the supervisor loop itself is alive
    with pytest.raises(ValueError, match="hang_timeout"):
        WatchdogGate(hang_timeout=0)


def _intervals(ds: list[Datagram]) -> list[float]:
    return [b.received - a.received for a, b in itertools.pairwise(ds)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_watchdog_pings_at_half_the_configured_interval(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # 0.4 s: pings every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    beats = {"worker": time.monotonic()}
    stop = threading.Event()

    def worker() -> None:  # a real thread making progress
        while not stop.wait(0.05):
            beats["worker"] = time.monotonic()

    t = threading.Thread(target=worker)
    t.start()
    pinger = WatchdogPinger(_notifier(backend), WatchdogGate(1.0), lambda: dict(beats))
    assert pinger.period == pytest.approx(0.2)
    try:
        assert pinger.start()
        got = notify_socket.collect(1.5)
    finally:
        pinger.stop()
        stop.set()
        t.join()
    assert all(d.fields == {"WATCHDOG": "1"} for d in got)
    assert 6 <= len(got) <= 9, len(got)
    gaps = _intervals(got)
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.2, abs=0.06)
    assert max(gaps) < 0.4  # never as late as the timeout itself


def test_no_watchdog_configured_means_no_pinger_thread(
    notify_socket: NotifySocket,
) -> None:
    pinger = WatchdogPinger(Notifier(), WatchdogGate(1.0), dict)
    assert pinger.period is None and not pinger.start()
    assert notify_socket.collect(0.3) == []


def test_a_hung_worker_thread_stops_the_pings_until_it_recovers(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    beats = {"inference": time.monotonic()}
    stop, hang, resume = threading.Event(), threading.Event(), threading.Event()

    def worker() -> None:
        while not stop.is_set():
            if hang.is_set():
                resume.wait()  # stuck, as in a wedged inference call
                hang.clear()
            beats["inference"] = time.monotonic()
            time.sleep(0.02)

    t = threading.Thread(target=worker)
    t.start()
    pinger = WatchdogPinger(Notifier(use_library=False), WatchdogGate(0.4), lambda: dict(beats),
                            interval=0.2)
    try:
        pinger.start()
        healthy = notify_socket.collect(0.6)
        hang.set()
        hang_started = time.monotonic()
        during = notify_socket.collect(1.4)
        resume.set()
        after = notify_socket.collect(0.6)
    finally:
        pinger.stop()
        stop.set()
        resume.set()
        t.join()
    assert len(healthy) >= 4
    # Pings may go on for up to hang_timeout (+ one period); after that, none at all.
    late = [d for d in during if d.received - hang_started > 0.4 + 0.15]
    assert late == [] and len(during) <= 6, [d.received - hang_started for d in during]
    assert len(after) >= 3
    msgs = [r.getMessage() for r in caplog.records]
    assert any("no progress from inference" in m for m in msgs)
    assert any("pings resume" in m for m in msgs)


def test_a_new_gate_judges_from_the_next_tick(notify_socket: NotifySocket) -> None:
    # a reload that raises service.hang_timeout: a worker silent for 2 s is hung no longer
    beats = {"inference": 100.0}
    pinger = WatchdogPinger(Notifier(use_library=False), WatchdogGate(1.0), lambda: beats,
                            interval=0.2, clock=lambda: 102.0)
    assert not pinger.tick()
    pinger.set_gate(WatchdogGate(3.0))
    assert pinger.tick() and pinger.pings == 1


def _beating_process(beat: mp.sharedctypes.Synchronized) -> None:  # type: ignore[name-defined]
    while True:
        beat.value = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable across pids
        time.sleep(0.02)


def test_a_stopped_worker_process_stops_the_pings(notify_socket: NotifySocket) -> None:
    ctx = mp.get_context("spawn")
    beat = ctx.Value("d", time.monotonic())
    proc = ctx.Process(target=_beating_process, args=(beat,), daemon=True)
    proc.start()
    pinger = WatchdogPinger(Notifier(), WatchdogGate(0.5), lambda: {"capture:gate": beat.value},
                            interval=0.2)
    try:
        deadline = time.monotonic() + 20  # a spawned interpreter takes a moment on a busy CI box
        while beat.value < time.monotonic() - 0.1 and time.monotonic() < deadline:
            time.sleep(0.05)
        pinger.start()
        healthy = notify_socket.collect(0.5)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)  # the process exists but makes no progress
        stopped_at = time.monotonic()
        during = notify_socket.collect(1.2)
        os.kill(proc.pid, signal.SIGCONT)
        after = notify_socket.collect(0.6)
        deadline = time.monotonic() + 5  # a loaded box may take a while to run it again
        while len(after) < 2 and time.monotonic() < deadline:
            after += notify_socket.collect(0.2)
    finally:
        pinger.stop()
        proc.kill()
        proc.join()
    assert len(healthy) >= 3
    assert [d for d in during if d.received - stopped_at > 0.5 + 0.15] == []
    assert len(after) >= 2


_LOG_SNIPPET = """
import logging, sys
from lprd.notify import setup_logging
print(setup_logging(sys.argv[1]), flush=True)
log = logging.getLogger("lprd.capture")
log.debug("hidden at info")
log.warning("stream lost", extra={"camera": "gate", "event_id": "ev-1"})
"""


def _env_without_systemd() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_outside_systemd_logs_are_plain_lines_on_stderr() -> None:
    r = subprocess.run([sys.executable, "-c", _LOG_SNIPPET, "info"], env=_env_without_systemd(),
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stderr"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING lprd.capture: stream lost")
    assert lines[0][:4].isdigit()  # starts with a time stamp


def test_under_systemd_without_systemd_python_stderr_carries_syslog_priority() -> None:
    env = _env_without_systemd() | {"INVOCATION_ID": uuid.uuid4().hex}
    code = "import sys; sys.modules['systemd'] = None  # as installed without the extra\n" + \
        _LOG_SNIPPET
    r = subprocess.run([sys.executable, "-c", code, "info"], env=env, check=False, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "<4>WARNING lprd.capture: stream lost"
    # every line of a record: journald reads a priority per line (a refused reload's keys, a
    # traceback's body were at info priority, hidden by `journalctl -p warning`)
    code += "log.error('reload refused:\\nc.yaml: fps: bad')\n"
    r = subprocess.run([sys.executable, "-c", code, "info"], env=env, check=False,
                       capture_output=True, text=True, timeout=30)
    assert r.stderr.strip().splitlines()[1:] == ["<3>ERROR lprd.capture: reload refused:",
                                                 "<3>c.yaml: fps: bad"]


def test_unknown_log_level_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        notify.setup_logging("loud")


# journald's native protocol receiver, run inside a private mount namespace so that it can sit at
# the fixed path libsystemd writes to (/run/systemd/journal/socket) without touching the host.
_JOURNAL_SNIPPET = """
import json, os, socket, sys
os.makedirs("/run/systemd/journal", exist_ok=True)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind("/run/systemd/journal/socket")
os.environ["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"
import logging
from lprd.notify import setup_logging
where = setup_logging("info")
logging.getLogger("lprd.publish").info("event sent", extra={"camera": "gate", "event_id": "e-7"})
logging.getLogger("lprd.publish").debug("not at info")
import multiprocessing
multiprocessing.current_process().name = "lprd-capture-lot"  # as lprd.service names them
logging.getLogger("lprd.capture").warning("stream lost")

def parse(data):
    fields = {}
    i = 0
    while i < len(data):  # KEY=value lines, or KEY, 64-bit length, value for binary-safe values
        nl = data.index(b"\\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1); i = nl + 1
        else:
            k = line; n = int.from_bytes(data[nl + 1:nl + 9], "little")
            v = data[nl + 9:nl + 9 + n]; i = nl + 9 + n + 1
        fields[k.decode()] = v.decode()
    return fields

srv.settimeout(5)
records = [parse(srv.recv(65536)), parse(srv.recv(65536))]
srv.settimeout(0.3)
try:
    srv.recv(65536); extra = True
except TimeoutError:
    extra = False
print(json.dumps({"where": where, "records": records, "extra": extra}))
"""


def test_under_systemd_records_reach_journald_with_camera_and_event_id_fields() -> None:
    if notify._sd_journal is None:
        pytest.skip("systemd-python is not installed")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    # Root: a mount namespace; otherwise a user namespace maps us to root first.
    ns = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    script = f"mount -t tmpfs tmpfs /run && exec {sys.executable} -c \"$0\""
    r = subprocess.run([unshare, *ns, "sh", "-c", script, _JOURNAL_SNIPPET],
                       env=_env_without_systemd(), check=False, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "mount" in r.stderr and "Traceback" not in r.stderr:
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["where"] == "journald"
    f, g = out["records"]
    assert f["MESSAGE"] == "lprd.publish: event sent"
    assert f["CAMERA"] == "gate" and f["EVENT_ID"] == "e-7"
    assert f["PRIORITY"] == "6" and f["SYSLOG_IDENTIFIER"] == "lprd"
    assert f["LOGGER"] == "lprd.publish"
    assert not [k for k in f if not k.isupper()]  # record internals are not sent
    # A capture process's lines carry its camera without the caller saying so.
    assert g["MESSAGE"] == "lprd.capture: stream lost" and g["PRIORITY"] == "4"
    assert g["CAMERA"] == "lot" and "EVENT_ID" not in g
    assert out["extra"] is False  # the debug record was filtered by level


# -- the real daemon ------------------------------------------------------------------------------



def test_lprd_run_notifies_ready_watchdog_and_stopping_from_its_main_pid(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "cameras:\n"
        f"  demo: {{source: {REPO / 'config' / 'demo.mp4'}, realtime: true, loop: true}}\n"
        "mqtt: {enabled: false}\n"
        f"storage: {{dir: {tmp_path / 'state'}}}\n"
    )
    env = _env_without_systemd() | {"NOTIFY_SOCKET": notify_socket.address,
                                    "WATCHDOG_USEC": "1000000"}
    log = (tmp_path / "lprd.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lprd", "--config", str(config), "run"],
                            env=env, stdout=log, stderr=log, cwd=str(tmp_path))
    try:
        ready = notify_socket.wait_for("READY", timeout=120)
        assert ready.received - t0 < 90  # TimeoutStartSec=120 leaves room for slow boards
        # NotifyAccess=main: systemd drops what children send, so it must come from lprd itself.
        assert ready.pid == proc.pid
        assert ready.fields["STATUS"].startswith("demo: ")
        after = notify_socket.collect(2.2)
        pings = [d for d in after if "WATCHDOG" in d.fields]
        assert len(pings) >= 3 and {d.pid for d in pings} == {proc.pid}
        assert max(_intervals(pings)) < 1.0  # within WATCHDOG_USEC, every time
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING", timeout=10)
        assert stopping.pid == proc.pid
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
