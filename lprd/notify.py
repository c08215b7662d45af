"""systemd integration: sd_notify messages, a watchdog gate that needs real progress, and logging
to journald (structured fields) under systemd or to stderr elsewhere."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Both paths on purpose: systemd-python is libsystemd's own sd_notify (the reference client,
# kept in step with new socket kinds and fields), but it is a C extension that only builds with
# libsystemd-dev and a compiler; a pip install without it (dev machines, containers, non-systemd
# distros) still speaks the same one-datagram protocol through the fallback below.
try:
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the install
    _sd_daemon = None

try:
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the install
    _sd_journal = None

log = logging.getLogger(__name__)

# Attributes passed with `extra=` that become journal fields (journald only keeps upper-case names).
JOURNAL_FIELDS: dict[str, str] = {"camera": "CAMERA", "event_id": "EVENT_ID"}
# lprd.service names each capture process this + the camera name.
CAPTURE_PROCESS_PREFIX = "lprd-capture-"
_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")


def _send_datagram(address: str, message: str) -> None:
    """The sd_notify wire format: one AF_UNIX datagram of newline-separated assignments."""
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(message.encode("utf-8"))


class Notifier:
    """Tells systemd about our state; every method is a no-op when NOTIFY_SOCKET is unset.

    Sending never raises: a lost notification must not take the daemon down (systemd notices a
    missing READY or WATCHDOG on its own and acts on it).
    """

    def __init__(self, use_library: bool = True) -> None:
        self._socket = os.environ.get("NOTIFY_SOCKET") or None
        self._library = _sd_daemon if use_library else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def backend(self) -> str:
        """"systemd-python", "fallback" or "off": which path the messages take."""
        if not self.enabled:
            return "off"
        return "systemd-python" if self._library is not None else "fallback"

    def notify(self, message: str) -> bool:
        """Send raw assignments ("KEY=value" lines); True when the datagram went out."""
        if self._socket is None:
            return False
        try:
            if self._library is not None:
                ok = bool(self._library.notify(message))
            else:
                _send_datagram(self._socket, message)
                ok = True
        except OSError as e:
            ok = False
            err = str(e)
        else:
            err = "sd_notify returned false"
        if not ok and not self._warned:  # once: a dead socket would otherwise flood the log
            log.warning("cannot notify systemd at %s: %s", self._socket, err)
            self._warned = True
        return ok

    def ready(self, status: str | None = None) -> bool:
        """Start-up is done (models loaded, cameras started): systemctl start returns now."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def reloading(self) -> bool:
        """A reload (SIGHUP) began; call ready() when it is done.

        MONOTONIC_USEC lets systemd >= 253 match this to the reload it asked for
        (Type=notify-reload); older managers ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """One keep-alive ping; send it only when the pipeline really progressed."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """The free-form line `systemctl status lprd` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up/stop time (slow model loading on small boards)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (WATCHDOG_USEC) when it applies to this process.

        Ping at least twice per interval. None when there is no watchdog, when the value is
        malformed, or when WATCHDOG_PID names another process (we are a child).
        """
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None


def loud_repeat(n: int) -> bool:
    """Whether the n-th time in a row of one failure is logged at its own level: the 1st, 2nd,
    4th, 8th ... (no flood while a camera or a broker is down for the night)."""
    return n > 0 and n & (n - 1) == 0


def _one_line(text: str) -> str:
    # Each assignment is one line: a newline in STATUS would start a new (bogus) assignment.
    return " ".join(text.split("\n")).strip()


@dataclass(frozen=True)
class WatchdogGate:
    """Decides whether a watchdog ping is deserved: every worker reported progress recently.

    Heartbeats map a worker name to the monotonic time of its last progress. The caller seeds an
    entry when it starts a worker and removes it when the worker finishes on purpose (a file
    camera at its end), so "never reported" and "done" are not confused with "hung".
    """

    hang_timeout: float

    def __post_init__(self) -> None:
        if self.hang_timeout <= 0:
            raise ValueError("hang_timeout must be > 0")

    def hung(self, heartbeats: Mapping[str, float], now: float) -> list[str]:
        """Names of the workers silent for longer than hang_timeout, sorted."""
        return sorted(name for name, t in heartbeats.items() if now - t > self.hang_timeout)

    def should_ping(self, heartbeats: Mapping[str, float], now: float) -> bool:
        return not self.hung(heartbeats, now)


class WatchdogPinger:
    """A thread that pings the watchdog at half its interval while the gate allows it.

    `heartbeats` is called each tick and returns a snapshot of name -> last progress time on
    `clock`. When a worker hangs, the pings stop and systemd kills and restarts the service after
    WatchdogSec; if the worker recovers first, the pings resume.
    """

    def __init__(
        self,
        notifier: Notifier,
        gate: WatchdogGate,
        heartbeats: Callable[[], Mapping[str, float]],
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        timeout = interval if interval is not None else notifier.watchdog_interval()
        self.period = timeout / 2 if timeout else None
        self._notifier = notifier
        self._gate = gate
        self._heartbeats = heartbeats
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: tuple[str, ...] = ()
        self.pings = 0

    def start(self) -> bool:
        """Start pinging; False (and no thread) when systemd set no watchdog for us."""
        if self.period is None or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return True

    def set_gate(self, gate: WatchdogGate) -> None:
        """Judge by `gate` from the next tick on (a reload changed the hang timeout)."""
        self._gate = gate

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def tick(self) -> bool:
        """Check the gate once and ping if it allows; True when a ping went out."""
        hung = tuple(self._gate.hung(self._heartbeats(), self._clock()))
        if hung != self._reported:  # log changes only, not every tick
            if hung:
                log.error("no progress from %s for over %.0f s: stopping watchdog pings",
                          ", ".join(hung), self._gate.hang_timeout)
            else:
                log.warning("all workers progress again: watchdog pings resume")
            self._reported = hung
        if hung:
            return False
        if self._notifier.watchdog():
            self.pings += 1
        return True

    def _run(self) -> None:
        assert self.period is not None
        while True:
            try:
                self.tick()
            except Exception:  # a bad snapshot must not end the pinger silently
                log.exception("watchdog check failed")
            if self._stop.wait(self.period):
                return


def running_under_systemd() -> bool:
    """True when systemd started us: it sets INVOCATION_ID, and JOURNAL_STREAM for stderr."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def _journal_send(MESSAGE: str, **fields: Any) -> None:
    """journal.send with our structured fields named for journald and invalid names left out."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        key = JOURNAL_FIELDS.get(key, key)
        if _FIELD_NAME.match(key):
            out[key] = value
    # A capture process is named after its camera: every line it logs carries CAMERA.
    proc = str(out.get("PROCESS_NAME", ""))
    if "CAMERA" not in out and proc.startswith(CAPTURE_PROCESS_PREFIX):
        out["CAMERA"] = proc[len(CAPTURE_PROCESS_PREFIX):]
    _sd_journal.send(MESSAGE, **out)


class _SyslogPrefixFormatter(logging.Formatter):
    """Prefixes "<priority>", which journald reads from captured stderr (SyslogLevelPrefix=)."""

    def format(self, record: logging.LogRecord) -> str:
        # journald reads one per line: a refused reload's keys and a traceback's body were
        # shown at info priority (hidden by `journalctl -p warning`)
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def print_error(text: str) -> None:
    """An error line on stderr before logging is set up (a config error at start); under
    systemd each line carries journald's error priority, or `journalctl -p warning` hides it."""
    prefix = "<3>" if running_under_systemd() else ""
    print("\n".join(prefix + line for line in str(text).splitlines()), file=sys.stderr)


def _syslog_priority(levelno: int) -> int:
    # The same mapping as systemd.journal.JournalHandler.map_priority.
    for limit, prio in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                        (logging.ERROR, 3), (logging.CRITICAL, 2)):
        if levelno <= limit:
            return prio
    return 1


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def setup_logging(level: str, force_journal: bool | None = None) -> str:
    """Route the root logger to journald (under systemd) or stderr; returns which.

    Under journald, `extra={"camera": ..., "event_id": ...}` on a record becomes the CAMERA= and
    EVENT_ID= fields, so `journalctl -u lprd CAMERA=gate` filters by camera. Without
    systemd-python, or outside systemd, a plain line format goes to stderr.
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (use one of {', '.join(_LEVELS)})")
    use_journal = running_under_systemd() if force_journal is None else force_journal
    handler: logging.Handler
    if use_journal and _sd_journal is not None:
        handler = _sd_journal.JournalHandler(sender_function=_journal_send,
                                             SYSLOG_IDENTIFIER="lprd")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        where = "journald"
    else:
        handler = logging.StreamHandler(sys.stderr)
        if use_journal:  # stderr captured by journald: it stamps the time, "<N>" sets priority
            handler.setFormatter(_SyslogPrefixFormatter("%(levelname)s %(name)s: %(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        where = "stderr"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    return where
