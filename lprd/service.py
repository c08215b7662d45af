"""`lprd run`: the supervisor that starts, watches, restarts, reloads and stops the daemon's processes.

One capture process per camera writes its camera's shared-memory ring; one inference process reads
the rings, detects, reads and tracks plates, and sends events back here to be published.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.context
import os
import queue
import secrets
import signal
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lprd.capture import (
    Alive,
    CaptureStatus,
    SourceKind,
    longest_silence,
    ring_shape,
    source_kind,
)
from lprd.cli import add_config_option, early_sighups
from lprd.config import (
    DEFAULT_CONFIG_PATH,
    CameraConfig,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    model_file_problems,
)
from lprd.inference import (
    CameraSpec,
    Drained,
    EndOfStream,
    HandOver,
    Heartbeat,
    OpenTracks,
    PastPass,
    ReloadWatchlist,
    SetCameras,
    WorkerFailed,
    WorkerReady,
    child_signals,
    close_handed,
    inference_main,
)
from lprd.notify import (
    Notifier,
    WatchdogGate,
    WatchdogPinger,
    loud_repeat,
    print_error,
    setup_logging,
)
from lprd.ring import FrameRing, remove_stale_rings, ring_name
from lprd.storage import StorageInUse, lock_storage, other_owner
from lprd.types import CameraState, FilePosition, FrameRef, PlateEvent

log = logging.getLogger(__name__)

_MP = multiprocessing.get_context("spawn")  # no fork: the supervisor runs threads (MQTT, sync)

POLL = 0.05  # seconds between supervisor loop turns
STATE_EVERY = 10.0  # seconds between retained camera state refreshes
RESTART_MIN, RESTART_MAX = 1.0, 30.0  # child restart backoff
STABLE_AFTER = 60.0  # a child that ran this long restarts with the shortest delay again
READY_GRACE = 15.0  # READY=1 at the latest this long after start, even if a camera stays silent
MODEL_LOAD_GRACE = 60.0  # the worker may be silent this long while it loads the models
CAPTURE_START_GRACE = 10.0  # a capture process's imports, before its first heartbeat
OPENING_GRACE = 0.5  # s: at a stop, a capture in its source's open may be just through it
EXIT_FILES_FAILED = 1
# A bad config or a model that cannot be loaded: restarting cannot fix it, and the systemd unit
# does not restart on this status (RestartPreventExitStatus=2). Other failures exit 1.
EXIT_CONFIG = 2
EXIT_IN_USE = 3  # another lprd runs on this storage.dir
ONCE_DRAIN = 15.0  # --once: seconds to wait for the broker to acknowledge the last events
RECENT_PASSES = 1000  # passes kept for a new inference process's dedupe memory
ONCE_MAX_DEATHS = 5  # --once gives a file up when its capture dies this many times in a row
# An inference process that dies this many times in a row, each within STABLE_AFTER of its
# start, makes lprd exit 1: without it no camera is read, and systemd restarting the whole
# service says so (restarting it alone went on for good, with the watchdog pinged throughout).
WORKER_MAX_DEATHS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run the daemon: capture -> detect -> read -> track -> MQTT events",
        description="Start one capture process per camera and the inference process; publish "
        "one event per vehicle pass. SIGTERM stops, SIGHUP reloads the config and the watchlist.",
    )
    p.add_argument("--events-jsonl", metavar="FILE", type=_non_empty_path,
                   help="also append every event as one JSON line to FILE ('-' = stdout; its "
                   "missing folders are made)")
    p.add_argument("--once", action="store_true",
                   help="process the file sources to their end, send the last events and exit "
                   "(0: every file was read, 1: some could not be, or a signal stopped it first, "
                   "2: a bad config, storage.dir or a model "
                   "that cannot be loaded, 3: another lprd runs on storage.dir); live cameras "
                   "are skipped")
    add_config_option(p, help=f"YAML config; default: {DEFAULT_CONFIG_PATH}")
    p.set_defaults(func=_run)


def _non_empty_path(text: str) -> str:
    if not text.strip():  # it was taken as not given, events going nowhere
        raise argparse.ArgumentTypeError("is empty: give a file, or '-' for stdout")
    return text


# the outbox deletes with RETURNING: on an older SQLite every ack failed and the outbox was
# sent again in full at each start
SQLITE_MIN = (3, 35, 0)


def _run(args: argparse.Namespace) -> int:
    if sqlite3.sqlite_version_info < SQLITE_MIN:
        print_error(f"lprd needs SQLite {'.'.join(map(str, SQLITE_MIN))} or newer; this Python's "
                    f"sqlite3 module has {sqlite3.sqlite_version} (use a Python built with a "
                    "newer SQLite: Debian 12, Ubuntu 24.04 and Raspberry Pi OS bookworm have one)")
        return EXIT_CONFIG
    path = Path(args.config or DEFAULT_CONFIG_PATH)
    try:
        cfg = load_config(path)
        problems = model_file_problems(cfg)
        if problems:
            raise ConfigError(str(path), problems)
    except ConfigError as e:
        print_error(str(e))
        return EXIT_CONFIG
    user = other_owner(cfg.storage.dir)
    if user is not None:  # its outbox and watchlist would become root's, stranding events
        print_error(f"storage.dir {cfg.storage.dir} belongs to {user}: run lprd as {user} "
                    f"(sudo -u {user} lprd run ...), not as root")
        return EXIT_CONFIG
    verbose = bool(getattr(args, "verbose", False))
    level = "debug" if verbose else cfg.service.log_level
    setup_logging(level)
    sup = Supervisor(cfg, path, events_jsonl=args.events_jsonl, once=args.once,
                     log_level=level, verbose=verbose)
    return sup.run()


# -- children ------------------------------------------------------------------------------------


def _capture_entry(camera: str, cfg: CameraConfig, ring: str, events: Any, stop: Any,
                   log_level: str, resume: FilePosition | None = None) -> None:
    """Capture process target: our signals and logging, then lprd.capture's loop."""
    child_signals()
    setup_logging(log_level)
    from lprd.capture import capture_main

    capture_main(camera, cfg, ring, events, stop, resume=resume)


@dataclass
class _Child:
    """A supervised process; a fresh queue and stop event for each start (a killed child may
    leave its queue's lock held)."""

    name: str
    target: Callable[..., None]
    proc: multiprocessing.process.BaseProcess | None = None
    q: Any = None  # child -> supervisor
    stop: Any = None
    started: float = 0.0
    beat: float = 0.0  # monotonic time of the last sign of life
    heard: float = 0.0  # the last message's (beat may lie ahead: a start's grace)
    failures: int = 0
    restart_at: float | None = None
    done: bool = False  # ended on purpose (a file at its end, or given up in --once)
    killed: bool = False  # killed as hung; its death is awaited, not repeated
    # its last word was Alive: a capture in OpenCV's open of its source, which no stop flag
    # interrupts (up to open_timeout, 10 s: past the stop's deadline)
    opening: bool = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()


@dataclass
class _Camera:
    name: str
    cfg: CameraConfig
    ring: FrameRing
    child: _Child
    status: CaptureStatus | None = None
    published: tuple | None = None  # (connected, error) last sent as state
    published_at: float = 0.0
    frames: int = 0  # FrameRefs seen
    file: FilePosition | None = None  # files: where a restarted capture goes on (no replay)
    died_at: FilePosition | None = None  # files: where its capture last died
    eof: bool = False
    failed: str | None = None  # --once: why this file was given up
    drained: bool = False

    @property
    def every_frame(self) -> bool:
        return source_kind(self.cfg.source) is SourceKind.FILE and not self.cfg.realtime

    def spec(self) -> CameraSpec:
        return CameraSpec(ring=self.ring.name, every_frame=self.every_frame, roi=self.cfg.roi,
                          live=source_kind(self.cfg.source) is not SourceKind.FILE)


@dataclass
class _Flags:
    """Set by signal handlers, acted on by the loop (handlers must do next to nothing)."""

    stop: bool = False
    reload: bool = False
    signals: list[str] = field(default_factory=list)


def disabled_state(camera: str) -> CameraState:
    return CameraState(camera, connected=False, error="disabled in the config")


class Supervisor:
    """Runs the daemon until SIGTERM/SIGINT (or, with `once`, until every file is done)."""

    def __init__(self, cfg: Config, config_path: Path, events_jsonl: str | None = None,
                 once: bool = False, log_level: str = "info", verbose: bool = False):
        self.cfg = cfg
        self.config_path = config_path
        self.once = once
        self.log_level = log_level
        self.verbose = verbose  # -v: debug logging whatever the config says
        self.events_jsonl = events_jsonl
        self.sink: Any = None
        self.flags = _Flags()
        self.notifier = Notifier()
        self.cameras: dict[str, _Camera] = {}
        self.worker = _Child("inference", inference_main)
        self.worker_ctl: Any = None
        self.worker_ready = False
        self.worker_failed: str | None = None
        self.worker_exit = EXIT_CONFIG  # the exit status that worker_failed ends the run with
        self.models: dict[str, str] = {}
        # open tracks a reload's stopped worker handed on, until the next worker is ready
        self._handover: dict[str, OpenTracks] = {}
        self.publisher: Any = None
        self.sync: Any = None
        self._sync_status: dict[str, Any] | None = None  # the last sync's, for state topics
        # reload commands (publish.Command) the next reload answers; the MQTT thread adds
        self._reload_requests: list[Any] = []
        self._requests_lock = threading.Lock()
        self._commands: Any = None  # publish.CommandState of the last publisher stopped
        self._carried: Any = None  # publish.InMemory: its messages only in memory, at a reload
        self.ready_sent = False
        self.started = time.monotonic()
        self.loop_beat = time.monotonic()
        self.events = 0
        self._unpublished = 0  # events with MQTT enabled and no publisher (a failed reload)
        self._actions_sent: OrderedDict[tuple[str, str], None] = OrderedDict()  # per pass, once
        # Passes with an early event and no final yet: if the inference process dies, their
        # tracks die with it, and the supervisor sends the final event in their stead.
        self._early: dict[str, PlateEvent] = {}
        # Recent passes, handed to a new inference process: a car still in view after a
        # restart or reload stays the pass it was (no second event).
        self._recent: dict[str, PastPass] = {}
        # The running config, kept while a reload's new inference process loads its models.
        self._fallback: Config | None = None
        self._loaded_cfg: Config | None = None  # the config whose models a worker last loaded
        self._reload_refused = False  # the worker ends because a reload's models would not load
        self._loaded_once = False  # an inference process of this run has loaded its models
        self._gen = 0
        self._ring_token = secrets.token_hex(3)  # two lprd of one pid share no ring name
        self._analysed: dict[str, int] = {}
        self._status_at = 0.0
        self._pinger: WatchdogPinger | None = None
        self._storage_lock: int | None = None
        self._skipped: list[str] = []  # --once: file cameras that could not start

    # -- the main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            self.cfg.storage.dir.mkdir(parents=True, exist_ok=True)
            _check_writable(self.cfg.storage.dir)
            self._storage_lock = lock_storage(self.cfg.storage.dir)
        except StorageInUse as e:
            log.error("%s", e)
            return EXIT_IN_USE
        except OSError as e:
            # not a folder, no permission, a read-only place (ProtectSystem=strict outside
            # /var/lib/lprd): the config's or the install's to fix, which a restart cannot
            fixed_by_hand = e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                                        errno.EROFS)
            log.error("storage.dir %s cannot be used: %s%s", self.cfg.storage.dir,
                      e.strerror or e, " (fix storage.dir or the folder's owner, then restart)"
                      if fixed_by_hand else "")
            return EXIT_CONFIG if fixed_by_hand else 1
        for path in remove_stale_rings():
            log.info("removed the stale frame ring %s", path)
        failed = self._start_outputs()
        if failed is not None:
            self._unlock_storage()
            return failed
        code = 0
        try:
            self._start_sync()
            for name, ccfg in self.cfg.cameras.items():
                self._add_camera(name, ccfg)
            for w in config_warnings(self.cfg, bool(self.events_jsonl)):
                log.warning("%s: %s", self.config_path, w)
            if self.once and not self.cameras and any(
                    c.enabled for c in self.cfg.cameras.values()):
                log.warning("--once: no enabled file camera in %s; nothing to do",
                            self.config_path)
            self._start_worker()
            self._pinger = WatchdogPinger(self.notifier, _watchdog_gate(self.cfg),
                                          self._heartbeats)
            self._pinger.start()
            while True:
                self.loop_beat = time.monotonic()
                if self.flags.stop:
                    log.info("received %s: stopping", ", ".join(self.flags.signals) or "stop")
                    if self.once:  # 0 would say every file was read
                        log.warning("--once: stopped before every file was read")
                        code = EXIT_FILES_FAILED
                    break
                if self.flags.reload:
                    self.flags.reload = False
                    with self._requests_lock:  # before the config is read: it answers them
                        requests, self._reload_requests = self._reload_requests, []
                    ok, detail = self._reload()
                    for command in requests:
                        self._answer(command, "done" if ok else "failed", detail)
                self._pump(POLL)
                self._check_children()
                self._maybe_ready()
                self._periodic()
                if self.worker_failed:  # a model that cannot be loaded: never transient
                    log.error("cannot run: %s", self.worker_failed)
                    code = self.worker_exit
                    break
                if self.once and all(c.drained for c in self.cameras.values()):
                    failed = [c.name for c in self.cameras.values() if c.failed] + self._skipped
                    code = EXIT_FILES_FAILED if failed else 0
                    log.info("--once: every file done (%d events%s)", self.events,
                             f"; {len(failed)} file(s) could not be read" if failed else "")
                    break
        finally:
            self._shutdown()
        return code

    def _start_outputs(self) -> int | None:
        """The JSON-lines sink and the MQTT publisher; the exit status when they cannot start."""
        from lprd.publish import JsonlSink, PublisherConfigError

        try:
            if self.events_jsonl:
                try:
                    self.sink = JsonlSink(self.events_jsonl)
                except (IsADirectoryError, NotADirectoryError, FileNotFoundError,
                        FileExistsError, PermissionError) as e:  # the command line's mistake: no restart mends it
                    why = e.strerror or e
                    if isinstance(e, FileExistsError):  # mkdir of its folder
                        where = Path(e.filename)
                        why = (f"{where} is a link to {os.readlink(where)}, which does not "
                               "exist" if where.is_symlink() else f"{where} is a file, not a "
                               "folder")
                    print_error(f"--events-jsonl {self.events_jsonl}: {why}")
                    return EXIT_CONFIG
            self._start_publisher()
        except PublisherConfigError as e:
            print_error(f"{self.config_path}: {e}")
            return EXIT_CONFIG
        except OSError as e:  # a full or read-only disk: worth a restart (2 would stop systemd's)
            log.error("cannot start the event outputs: %s", e)
            return 1
        except sqlite3.OperationalError as e:  # worth a restart, not a fix (an outbox that
            # cannot be opened waits in memory; this is what else SQLite may raise at start)
            log.error("the MQTT outbox in %s cannot be opened: %s", self.cfg.storage.dir, e)
            return 1
        return None

    def _unlock_storage(self) -> None:
        if self._storage_lock is not None:
            os.close(self._storage_lock)  # the lock goes with it
            self._storage_lock = None

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.flags.stop = True
            self.flags.signals.append(signal.Signals(signum).name)

        def reload(_signum: int, _frame: object) -> None:
            self.flags.reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
        if early_sighups():  # sent while lprd started: the config may be older than the file
            self.flags.reload = True

    def _heartbeats(self) -> dict[str, float]:
        """For the watchdog gate: the loop itself, the worker, and every running capture.

        A child waiting for its restart is left out: the loop is restarting it (a camera that
        keeps failing must not stop the pings and get every camera killed)."""
        beats = {"supervisor": self.loop_beat}
        if not self.worker.done and self.worker.proc is not None:
            beats["inference"] = self.worker.beat
        for cam in list(self.cameras.values()):  # list(): the loop may change the dict
            if not cam.child.done and cam.child.proc is not None:
                beats[f"capture:{cam.name}"] = cam.child.beat + self._grace(cam)
        return beats

    def _grace(self, cam: _Camera) -> float:
        """What a capture may be silent past hang_timeout: a stall_timeout just under it,
        rounded up by V4L2, plus the heartbeat's interval (a frozen camera was killed as hung
        instead of reconnected)."""
        return max(0.0, longest_silence(cam.cfg) - self.cfg.service.hang_timeout)

    # -- cameras -----------------------------------------------------------------------------

    def _add_camera(self, name: str, ccfg: CameraConfig) -> None:
        if not ccfg.enabled:
            log.info("camera %s: disabled in the config", name)
            return
        if self.once:
            if source_kind(ccfg.source) is not SourceKind.FILE:
                log.warning("camera %s: --once only processes files; %s skipped", name,
                            source_kind(ccfg.source).value)
                return
            if ccfg.loop:
                ccfg = ccfg.model_copy(update={"loop": False})  # --once must reach an end
        self._gen += 1
        h, w = ring_shape(ccfg)
        name_in_shm = ring_name(f"{name}-{self._gen}", self._ring_token)
        try:
            ring = FrameRing.create(name_in_shm, ccfg.ring_slots, h, w)
        except FileExistsError as e:  # another's: never unlinked here
            log.error("camera %s: cannot create its frame ring: %s", name, e)
            self._ring_failed(name, f"cannot create its frame ring: {e}")
            return
        except (OSError, ValueError, OverflowError) as e:
            # /dev/shm full or too small, or a ring too large to map (a large max_width and
            # ring_slots on a 32-bit system): the other cameras still run
            log.error("camera %s: cannot create its %d-slot frame ring of %dx%d (lower "
                      "max_width or ring_slots): %s", name, ccfg.ring_slots, w, h, e)
            # SharedMemory removes the segment it made only on OSError
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name_in_shm}")
            self._ring_failed(name, f"cannot create its frame ring (lower max_width or "
                                    f"ring_slots): {e}")
            return
        cam = _Camera(name, ccfg, ring, _Child(f"capture:{name}", _capture_entry))
        self.cameras[name] = cam
        self._start_capture(cam)

    def _ring_failed(self, name: str, error: str) -> None:
        if self.once:
            self._skipped.append(name)  # a file not read: exit status 1
        self._publish_lone_state(CameraState(name, connected=False, error=error))

    def _publish_lone_state(self, state: CameraState) -> None:
        """The state of a camera no capture process runs for (disabled, or its ring not
        made): its retained state said what it was last (connected: true) for good."""
        if self.publisher is not None:
            with contextlib.suppress(Exception):  # state is informative
                self.publisher.publish_state(state)

    def _start_capture(self, cam: _Camera) -> None:
        child = cam.child
        child.q = _MP.Queue()
        child.stop = StopFlag()
        child.proc = _MP.Process(
            target=_capture_entry, name=f"lprd-capture-{cam.name}", daemon=True,
            args=(cam.name, cam.cfg, cam.ring.name, child.q, child.stop, self.log_level,
                  cam.file))
        start_child(child.proc, child.q)
        child.done = child.killed = False
        child.started = child.heard = time.monotonic()
        child.opening = False
        # its imports come before its first sign of life (seconds on a small board): the
        # open's own time (open_timeout) must not be eaten into by them
        child.beat = child.started + CAPTURE_START_GRACE
        child.restart_at = None
        log.info("camera %s: capture process %d started", cam.name, child.proc.pid)

    def _remove_camera(self, name: str, deadline: float) -> None:
        cam = self.cameras.pop(name)
        _stop_child(cam.child, deadline, self._pump_child_queue)
        cam.ring.close()
        cam.ring.unlink()

    def _specs(self) -> dict[str, CameraSpec]:
        return {n: c.spec() for n, c in self.cameras.items() if not c.drained}

    # -- the inference worker ------------------------------------------------------------------

    def _start_worker(self) -> None:
        w = self.worker
        w.q = _MP.Queue()
        w.stop = StopFlag()
        self.worker_ctl = _MP.Queue()
        self.worker_ready = False
        w.proc = _MP.Process(
            target=inference_main, name="lprd-inference", daemon=True,
            args=(self.cfg, self._specs(), self.worker_ctl, w.q, w.stop, self.log_level,
                  tuple(self._recent.values()), tuple(self._handover.values())))
        start_child(w.proc, w.q)
        w.done = w.killed = False
        w.started = w.heard = time.monotonic()
        w.beat = w.started + MODEL_LOAD_GRACE  # loading the models is not hanging
        w.restart_at = None
        for cam in self.cameras.values():  # a new worker must hear again which files ended
            if cam.eof and not cam.drained:
                self.worker_ctl.put(EndOfStream(cam.name, cam.ring.name))
        log.info("inference process %d started", w.proc.pid)

    def _send_worker(self, msg: object) -> None:
        if self.worker_ctl is not None and self.worker.alive():
            self.worker_ctl.put(msg)

    # -- messages from children ------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """Handle what the children sent; waits up to `timeout` when nothing is there."""
        got = self._pump_child_queue(self.worker)
        for cam in list(self.cameras.values()):
            got += self._pump_child_queue(cam.child)
        if not got and timeout > 0:
            time.sleep(timeout)

    def _pump_child_queue(self, child: _Child) -> int:
        n = 0
        q = child.q
        while q is not None and n < 10_000:
            try:
                msg = q.get_nowait()
            except queue.Empty:
                break
            except EOFError:  # the child has exited and everything it sent is read
                break
            except (OSError, ValueError) as e:  # a child killed mid-message
                log.warning("%s: lost a message from a dead process: %s", child.name, e)
                break
            n += 1
            child.beat = max(child.beat, time.monotonic())
            child.heard = time.monotonic()
            child.opening = isinstance(msg, Alive)
            self._handle(child, msg)
        return n

    def _handle(self, child: _Child, msg: object) -> None:
        if isinstance(msg, PlateEvent):
            self._on_event(msg)
        elif isinstance(msg, FrameRef):
            cam = self.cameras.get(msg.camera)
            if cam is not None:
                cam.frames += 1
                if msg.file is not None:
                    cam.file = msg.file
        elif isinstance(msg, CaptureStatus):
            self._on_capture_status(msg)
        elif isinstance(msg, Alive):
            pass  # its arrival is the heartbeat
        elif isinstance(msg, Heartbeat):
            self._analysed = dict(msg.frames)
        elif isinstance(msg, Drained):
            cam = self.cameras.get(msg.camera)
            # one of the camera's ring before a reload: the new one's frames are not all in
            if cam is not None and cam.ring.name == msg.ring:
                cam.drained = True
                log.info("camera %s: all frames analysed (%d with motion)", msg.camera,
                         msg.frames)
        elif isinstance(msg, WorkerReady | WorkerFailed) and child.done:
            # a process being stopped (a second reload before its models loaded): what it
            # loaded, or could not, is no longer the config's
            log.info("the stopped inference process %s", "had loaded its models"
                     if isinstance(msg, WorkerReady) else f"could not load its models: "
                     f"{msg.reason}")
            if isinstance(msg, WorkerReady):
                self._handover = {}  # it took them, and closes or hands on what is open
        elif isinstance(msg, WorkerReady):
            self.worker.beat = time.monotonic()  # the load's grace ends: a hang counts from now
            self.worker_ready = self._loaded_once = True
            self._fallback = None
            self._loaded_cfg = self.cfg
            self._handover = {}  # it took them
            self.models = dict(msg.models)
            log.info("models loaded: %s", ", ".join(f"{k} {v}" for k, v in msg.models.items()))
        elif isinstance(msg, WorkerFailed):
            if self._fallback is not None:
                # a reload's models would not load: go back to the running ones, not down
                log.error("reload refused, the running models stay: %s", msg.reason)
                self.cfg = self.cfg.model_copy(update={"detector": self._fallback.detector,
                                                       "reader": self._fallback.reader})
                self._fallback = None
                self._reload_refused = True  # its end is no death of a failing process
            elif self._loaded_once:
                # the files loaded before: a restart caught them being replaced, or short of
                # memory. Its end is counted as a death (retried, status 1 in the end).
                log.error("inference could not load its models: %s", msg.reason)
            else:
                self.worker_failed = msg.reason
        elif isinstance(msg, PastPass):
            self._remember(msg)
        elif isinstance(msg, OpenTracks):
            self._handover[msg.camera] = msg
            log.info("camera %s: %d open track(s) go on in the next inference process",
                     msg.camera, len(msg.tracks))
        else:
            log.warning("%s sent an unknown record %r", child.name, type(msg).__name__)

    def _remember(self, p: PastPass) -> None:
        old = self._recent.pop(p.id, None)  # newest last
        self._recent[p.id] = p if old is None or p.last_seen >= old.last_seen else old
        while len(self._recent) > RECENT_PASSES:
            del self._recent[next(iter(self._recent))]

    def _on_event(self, ev: PlateEvent) -> None:
        self.events += 1
        if ev.final:
            self._early.pop(ev.id, None)
            self._remember(PastPass(ev.camera, ev.id, ev.plate, ev.last_seen))
        else:
            self._early[ev.id] = ev
        if self.sink is not None:
            self.sink.submit(ev)  # never raises: it logs and stops on a closed pipe
        if self.publisher is not None:
            try:
                self.publisher.submit(ev)
            except Exception:  # the next events must still go out
                log.exception("event %s could not be queued for MQTT", ev.id)
        elif self.cfg.mqtt.enabled:
            self._unpublished += 1
            if loud_repeat(self._unpublished):
                log.error("event %s not published (%d so far): the MQTT publisher is not "
                          "running since a failed reload (see above); fix it and reload",
                          ev.id, self._unpublished)

    def _on_capture_status(self, st: CaptureStatus) -> None:
        cam = self.cameras.get(st.camera)
        if cam is None:
            return
        cam.status = st
        if st.eof and not cam.eof:
            cam.eof = True
            self._send_worker(EndOfStream(cam.name, cam.ring.name))
        if self.once and st.error and not cam.eof and not cam.failed:
            # A file that cannot be read will not get better by retrying: give it up.
            self._give_up_file(cam, st.error)
        self._publish_state(cam)

    def _give_up_file(self, cam: _Camera, why: str) -> None:
        cam.failed = why
        log.error("camera %s: %s; --once gives this file up", cam.name, why)
        if cam.child.stop is not None:
            cam.child.stop.set()
        cam.eof = True
        self._send_worker(EndOfStream(cam.name, cam.ring.name))

    # -- health ---------------------------------------------------------------------------------

    def _check_children(self) -> None:
        now = time.monotonic()
        for cam in self.cameras.values():
            child = cam.child
            if child.done:
                continue
            if child.proc is not None and not child.proc.is_alive():
                self._pump_child_queue(child)  # its last records (eof) may still be queued
                code = child.proc.exitcode
                child.proc = None
                if cam.eof or (code == 0 and child.stop.is_set()):
                    child.done = True
                    log.debug("camera %s: capture process ended", cam.name)
                    continue
                # --once: a file whose decoder crashes, a ring /dev/shm cannot hold; retrying
                # from the same frame will not help, and --once must end
                why = _exit_reason(code)
                if source_kind(cam.cfg.source) is SourceKind.FILE:
                    cam.file, cam.died_at, skipped = resume_after_death(cam.file, cam.died_at)
                    if skipped:
                        log.warning("camera %s: its capture died twice at frame %d of the "
                                    "file; going on after it (a frame the decoder cannot "
                                    "take)", cam.name, skipped - 1)
                if not self._schedule_restart(child, why,
                                              ONCE_MAX_DEATHS if self.once else None):
                    self._give_up_file(cam, f"its capture process died {child.failures} times "
                                       "in a row")
                    continue
                # its last state (connected, 15 fps) was republished through a crash loop
                last = cam.status or CaptureStatus(camera=cam.name, connected=False)
                cam.status = replace(last, connected=False, fps=0.0, eof=False,
                                     error=f"capture process died ({why}); restarting")
                self._publish_state(cam)
            elif (child.proc is not None and not child.killed
                  and now - child.beat > self.cfg.service.hang_timeout + self._grace(cam)):
                log.error("%s: no sign of life for %.0f s; killing it", child.name,
                          now - child.heard)
                child.proc.kill()
                child.killed = True  # once: a process stuck in the kernel dies when it can
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                log.info("%s: restarting", child.name)
                self._start_capture(cam)
        w = self.worker
        if w.proc is not None and not w.proc.is_alive():
            self._pump_child_queue(w)
            code = w.proc.exitcode
            w.proc = None
            self._close_orphans()
            if self.worker_failed:
                return
            if self._reload_refused:  # it ended on purpose: no death, no backoff
                self._reload_refused = False
                w.failures = 0
                w.q = w.stop = None
                w.restart_at = time.monotonic()
                log.info("inference: starting again with the running models")
            elif not self._schedule_restart(w, _exit_reason(code), WORKER_MAX_DEATHS):
                self.worker_failed = (f"the inference process died {w.failures} times in a "
                                      "row, each within a minute of its start")
                self.worker_exit = 1
                return
        elif (w.proc is not None and not w.killed
              and now - w.beat > self.cfg.service.hang_timeout):
            log.error("inference: no heartbeat for %.0f s; killing it", now - w.heard)
            w.proc.kill()
            w.killed = True
        if w.proc is None and w.restart_at is not None and now >= w.restart_at:
            log.info("inference: restarting")
            self._start_worker()

    def _matched(self, events: list[PlateEvent]) -> list[PlateEvent]:
        """`events` with their watchlist matches, as the worker would have sent them."""
        if not events or not self.cfg.watchlist.enabled:
            return events
        try:
            from lprd.watchlist import Watchlist

            with Watchlist.from_config(self.cfg, busy_timeout=5.0) as wl:
                return [wl.match_event(ev) for ev in events]
        except Exception as e:  # noqa: BLE001 - the events go out unmatched, not lost
            log.warning("%d event(s) go without their watchlist match: %s", len(events), e)
            return events

    def _close_orphans(self, stopping: bool = False) -> None:
        """Final events for passes whose early event went out and whose track the inference
        process took with it (a crash, a kill): a subscriber waiting for `final` gets one.
        Tracks handed to the next worker are closed there, or here at the stop."""
        if stopping and self._handover:  # no worker took them: they end now
            closed = [ev for ot in self._handover.values()
                      for ev in close_handed(self.cfg, ot, self.models)]
            for ev in self._matched(closed):  # one opening of the store for them all
                self._on_event(ev)
            self._handover = {}
        handed = {t.id for ot in self._handover.values() for t in ot.tracks}
        for ev in [ev for ev in self._early.values() if ev.id not in handed]:
            log.warning("event %s (%s): the inference process ended before its final event; "
                        "sending the early event as final", ev.id, ev.plate)
            self._on_event(replace(ev, final=True))
        # a handed pass's early event stays: if the next worker dies too, its final is this
        self._early = {k: ev for k, ev in self._early.items() if k in handed}

    def _schedule_restart(self, child: _Child, why: str, limit: int | None = None) -> bool:
        """Restart a dead child after a backoff; False (and no restart) at `limit` deaths in
        a row."""
        now = time.monotonic()
        if now - child.started > STABLE_AFTER:
            child.failures = 0
        delay = min(RESTART_MAX, RESTART_MIN * 2 ** child.failures)
        child.failures += 1
        # A killed child may hold its queue's lock: touching it could wait forever. Each start
        # makes a fresh queue and stop flag.
        child.q = None
        child.stop = None
        if limit is not None and child.failures >= limit:
            child.restart_at = None
            child.done = True
            log.error("%s died (%s), %d times in a row", child.name, why, child.failures)
            return False
        child.restart_at = now + delay
        log.error("%s died (%s); restarting in %.0f s", child.name, why, delay)
        return True

    def _maybe_ready(self) -> None:
        if self.ready_sent or not self.worker_ready:
            return
        tried = all(c.status is not None or c.child.done for c in self.cameras.values())
        if tried or time.monotonic() - self.started > READY_GRACE:
            self.ready_sent = True
            self.notifier.ready(self._status_line())
            log.info("running: %s", self._status_line())

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._status_at >= 5.0:
            self._status_at = now
            self.notifier.status(self._status_line())
        for cam in self.cameras.values():
            if now - cam.published_at >= STATE_EVERY:
                self._publish_state(cam, force=True)

    def _status_line(self) -> str:
        parts = []
        for cam in self.cameras.values():
            st = cam.status
            if cam.drained or (st is not None and st.eof):
                parts.append(f"{cam.name}: ended")
            elif st is None:
                parts.append(f"{cam.name}: starting")
            elif st.connected:
                parts.append(f"{cam.name}: {st.fps:.1f} fps")
            else:
                parts.append(f"{cam.name}: {st.error or 'disconnected'}")
        parts.append(f"{self.events} events")
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                parts.append(f"outbox {self.publisher.outbox_depth()}")
        return "; ".join(parts)

    def _publish_state(self, cam: _Camera, force: bool = False) -> None:
        st = cam.status
        if st is None:
            return
        key = (st.connected, st.error)
        if not force and key == cam.published:
            return
        cam.published, cam.published_at = key, time.monotonic()
        if self.publisher is None:
            return
        depth = 0
        with contextlib.suppress(Exception):
            depth = self.publisher.outbox_depth()
        state = CameraState(camera=cam.name, connected=st.connected, fps=st.fps,
                            last_frame=st.last_frame, error=st.error, outbox_depth=depth)
        try:
            self.publisher.publish_state(state)
        except Exception:  # state is informative; events matter more
            log.exception("camera %s: state could not be published", cam.name)

    # -- MQTT and the watchlist sync -------------------------------------------------------------

    def _start_publisher(self) -> None:
        if not self.cfg.mqtt.enabled:  # config_warnings says so when nothing else takes them
            if self.events_jsonl:
                log.info("mqtt.enabled is false: events go only to --events-jsonl %s",
                         self.events_jsonl)
            return
        from lprd.publish import Publisher

        self.publisher = Publisher(self.cfg.mqtt, list(self.cfg.cameras), self.cfg.storage.dir,
                                   on_command=self._on_command,
                                   actions_sent=self._actions_sent,
                                   commands=self._commands, carried=self._carried)
        self._carried = None
        self.publisher.start()
        for name, ccfg in self.cfg.cameras.items():
            if not ccfg.enabled:  # else its retained state says what it was when last on
                self.publisher.publish_state(disabled_state(name))
        if self._sync_status is not None:
            self.publisher.publish_watchlist_sync(self._sync_status)

    def _stop_publisher(self, timeout: float, drain: float = 0.0,
                        hand_over: bool = False) -> None:
        """Stop MQTT; with `drain`, first wait up to that long for the outbox to empty; with
        `hand_over` (a reload), what waits in memory only goes to the next publisher."""
        if self.publisher is not None:
            try:
                if (drain > 0 and not self.publisher.wait_idle(drain)
                        and not self.publisher.outbox.in_memory):  # else stop() says they are lost
                    log.warning("MQTT: %d event(s) not yet acknowledged; they stay in the "
                                "outbox for the next start", self.publisher.outbox_depth())
                self.publisher.stop(timeout=timeout, hand_over=hand_over)
            except Exception:
                log.exception("MQTT publisher did not stop cleanly")
            self._commands = self.publisher.command_state()  # for a reload's next publisher
            self._carried = self.publisher.left_in_memory()
            self.publisher = None

    def _on_command(self, command: Any) -> None:
        """(The MQTT command thread: publish.Command.) The loop or the sync runs it and
        answers it."""
        if command.verb == "reload":
            with self._requests_lock:
                self._reload_requests.append(command)
            self.flags.reload = True
        elif command.verb == "watchlist_sync":
            with self._requests_lock:  # not while a reload swaps the sync
                self._request_sync(command)
        else:  # parse_command knows the same verbs: a new one not handled here yet
            log.warning("unknown MQTT command %r ignored", command.verb)
            self._answer(command, "refused", f"unknown command {command.verb!r}")

    def _restart_sync(self) -> None:
        """The sync stopped and started again with the running config; the commands it had
        not begun go to the new one. A sync command meanwhile waits for the new sync (or its
        absence)."""
        with self._requests_lock:
            stopped = self.sync
            self._stop_sync()
            # those the stopped sync had not begun (taken once it ran its last)
            carried = stopped.take_requests() if stopped is not None else []
            self._start_sync()
            for command in carried:
                self._request_sync(command)

    def _request_sync(self, command: Any) -> None:
        if self.sync is not None:
            self.sync.request(command)
            return
        log.warning("MQTT command watchlist_sync ignored: no watchlist sync runs (no "
                    "watchlist.sync.source, the watchlist disabled, or it could not start)")
        self._answer(command, "failed", "no watchlist sync runs: no watchlist.sync.source is "
                     "configured, the watchlist is disabled, or the sync could not start (see "
                     "the journal)")

    def _answer(self, command: Any, status: str, detail: str) -> None:
        publisher = self.publisher
        if publisher is not None:
            try:
                publisher.publish_command_result(command, status, detail)
            except Exception:  # the command ran; its answer is informative
                log.exception("the answer to command %s could not be published", command.verb)

    def _start_sync(self) -> None:
        wl = self.cfg.watchlist
        if not wl.enabled or not wl.sync.source:
            if self._sync_status is not None:  # no sync any more: the states stop showing one
                self._sync_status = None
                if self.publisher is not None:
                    self.publisher.publish_watchlist_sync(None)
            return
        try:
            from lprd.watchlist import Watchlist, WatchlistSync

            # its index is the inference process's to build (beating meanwhile): built here,
            # on the main loop, it held up the start, signals included, for minutes
            sync = WatchlistSync(Watchlist.from_config(self.cfg, index=False), wl.sync)
            sync.on_result = lambda result, status: self._on_sync(sync, result, status)
            self.sync = sync
            sync.start()
        except Exception:
            log.exception("watchlist sync could not start; the last synced list stays in use")
            self.sync = None

    def _on_sync(self, sync: Any, result: Any, status: Any) -> None:
        """(The sync's thread.) Its outcome answers the commands it ran for and goes on the
        cameras' state topics; not that of a sync a reload stopped, which may end after its
        successor's first."""
        for command in result.requests:
            self._answer(command, "done" if result.ok else "failed", result.error or (
                f"{result.entries} entries, " + ("a new list swapped in" if result.changed
                                                  else "the list unchanged")))
        if sync is not self.sync:
            return
        self._sync_status = status.to_dict()
        publisher = self.publisher
        if publisher is not None:
            try:
                publisher.publish_watchlist_sync(self._sync_status)
            except Exception:  # informative; the sync itself went as the journal says
                log.exception("the watchlist sync's outcome could not be published")

    def _stop_sync(self, timeout: float = 5.0) -> None:
        if self.sync is not None:
            with contextlib.suppress(Exception):
                self.sync.stop(timeout)
                self.sync.watchlist.close()  # its connections (3 descriptors each reload)
            self.sync = None

    # -- SIGHUP ---------------------------------------------------------------------------------

    def _reload(self) -> tuple[bool, str]:
        """Load the config again and apply it; whether it was, and what came of it (why not,
        the parts kept as they were)."""
        kept: list[str] = []
        try:
            new = load_config(self.config_path)
            problems = model_file_problems(new)
            if problems:  # the new inference process would fail to start and stop the daemon
                raise ConfigError(str(self.config_path), problems)
        except ConfigError as e:
            log.error("reload refused, the running config stays:\n%s", e)
            return False, f"reload refused, the running config stays: {e}"
        if self.ready_sent:  # during start-up, READY=1 comes once the models are loaded
            self.notifier.reloading()
        old = self.cfg
        self.cfg = new
        log.info("reloading %s", self.config_path)
        if new.service.log_level != old.service.log_level and not self.verbose:
            self.log_level = new.service.log_level  # for the processes started from now on
            setup_logging(self.log_level)
        if new.storage != old.storage:
            # the outbox (with undelivered events) and the watchlist live there
            log.warning("storage.dir: a change needs a restart (systemctl restart lprd); %s "
                        "stays in use until then", old.storage.dir)
            new = self.cfg = new.model_copy(update={"storage": old.storage})
            kept.append(f"storage.dir waits for a restart ({old.storage.dir} stays in use)")
        if self._pinger is not None:
            self._pinger.set_gate(_watchdog_gate(new))
        deadline = time.monotonic() + new.service.stop_timeout
        changed = False
        for name in set(old.cameras) | set(new.cameras):
            if old.cameras.get(name) == new.cameras.get(name) and (
                    name in self.cameras or name not in new.cameras
                    or not new.cameras[name].enabled):
                continue
            changed = True
            if name in self.cameras:
                log.info("camera %s: config changed, restarting its capture", name)
                self._remove_camera(name, deadline)
                if name in new.cameras and not new.cameras[name].enabled:
                    self._publish_lone_state(disabled_state(name))
            if name in new.cameras and not self.flags.stop:
                self._add_camera(name, new.cameras[name])
        from lprd.publish import PublisherConfigError, check_files, files_stamp

        # the same settings, but a renewed certificate or a new password at the same path
        # (paho keeps what it loaded), or a publisher that a failed reload left stopped
        refresh = new.mqtt.enabled and new.mqtt == old.mqtt and (
            self.publisher is None or files_stamp(new.mqtt) != self.publisher.files_stamp)
        if refresh:
            log.info("mqtt: %s: restarting the publisher", "its password or TLS files changed"
                     if self.publisher is not None else "not running")
        if new.mqtt != old.mqtt or set(new.cameras) != set(old.cameras) or refresh:
            try:  # before the running publisher stops: it needs its files only to start
                if new.mqtt.enabled:
                    check_files(new.mqtt)
            except (PublisherConfigError, OSError, ValueError) as e:
                # an unreadable password or TLS file: the running publisher goes on as it is
                log.error("reload: the new mqtt settings are refused (%s); keeping the running "
                          "ones%s", e, "" if set(new.cameras) == set(old.cameras) else
                          " (Home Assistant's entities follow the new cameras at the next "
                          "reload that takes them)")
                self.cfg = self.cfg.model_copy(update={"mqtt": old.mqtt})
                new = self.cfg
                kept.append(f"the new mqtt settings are refused ({e}); the running ones stay")
            else:
                # none to hand them to when MQTT is turned off: stop() says they are lost
                self._stop_publisher(2.0, hand_over=new.mqtt.enabled)
                try:
                    self._start_publisher()
                except Exception:  # a reload must not end the daemon
                    log.exception("MQTT publisher could not be restarted; events are not "
                                  "published until a reload or restart starts it")
                    self.publisher = None  # and none to answer: the journal says it
        if (new.watchlist.sync != old.watchlist.sync
                or new.watchlist.enabled != old.watchlist.enabled):
            self._restart_sync()
        elif self.sync is None:
            self._start_sync()
        else:
            self.sync.request()  # fetch the list again now, in the sync thread
        # the sync settings are the sync thread's: the worker only matches against the list
        matching = new.watchlist.model_copy(update={"sync": old.watchlist.sync})
        if (any(getattr(new, k) != getattr(old, k) for k in ("detector", "reader", "tracker"))
                or matching != old.watchlist or new.mqtt.crops != old.mqtt.crops):
            log.info("models, tracker or watchlist settings changed: restarting inference")
            # the models a worker last loaded, also while this one still loads (a reload just
            # before, a restart): without them a bad model took the daemon down
            loaded = self._fallback or self._loaded_cfg
            if loaded is not None and (new.detector, new.reader) != (loaded.detector,
                                                                     loaded.reader):
                self._fallback = loaded
            # its own stop_timeout: slow camera or sync stops above must not cut the time the
            # worker has to close its tracks and send their final events; live cameras' open
            # tracks go on in the next worker (a car in view stays one pass)
            self._send_worker(HandOver())
            _stop_child(self.worker, time.monotonic() + new.service.stop_timeout,
                        self._pump_child_queue)
            self._close_orphans()
            self.worker.failures = 0  # stopped on purpose: earlier deaths say nothing of it
            if self.flags.stop:  # a stop came meanwhile: no model load for it to wait for
                log.info("a stop came during the reload: the new inference process is not "
                         "started")
                return True, "reloaded; lprd is stopping"
            self._start_worker()
        else:
            if changed:
                self._send_worker(SetCameras(self._specs()))
            self._send_worker(ReloadWatchlist())
        if self.ready_sent:
            self.notifier.ready(self._status_line())
        log.info("reload done: %s", self._status_line())
        return True, "; ".join(["reloaded: " + self._status_line(), *kept])

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop everything within service.stop_timeout (+ MQTT flush), sending the last events."""
        self.notifier.stopping()
        t0 = time.monotonic()
        budget = self.cfg.service.stop_timeout
        # a stop_timeout longer than the unit's TimeoutStopSec is granted, not cut by SIGKILL
        self.notifier.extend_timeout(budget + 3.0)
        deadline = t0 + budget * 0.75  # the rest is for MQTT to flush
        for cam in self.cameras.values():
            if cam.child.stop is not None:
                cam.child.stop.set()
        if self.worker.stop is not None:
            self.worker.stop.set()  # the worker closes every track: final events follow
        _stop_child(self.worker, deadline, self._pump_child_queue)
        for cam in self.cameras.values():
            _stop_child(cam.child, deadline, self._pump_child_queue)
        self._pump(0)
        self._close_orphans(stopping=True)  # a killed worker closed none of its tracks
        if self._pinger is not None:
            self._pinger.stop()
        self._stop_sync(max(0.5, min(5.0, t0 + budget - 1.0 - time.monotonic())))
        # --once has no systemd stop deadline: give the broker time to take every event.
        left = max(1.0, t0 + budget - time.monotonic())
        drain = ONCE_DRAIN if self.once else max(0.0, left - 1.0)
        self._stop_publisher(1.0, drain=drain)
        for cam in self.cameras.values():
            cam.ring.close()
            cam.ring.unlink()
        if self.sink is not None:
            self.sink.close()
        self._unlock_storage()
        log.info("stopped after %.1f s (%d events in all)", time.monotonic() - t0, self.events)


def _check_writable(folder: Path) -> None:
    """PermissionError where this user may not write `folder` (another user's folder): the
    outbox would wait in memory for good. A read-only or full file system passes: a disk
    remounted read-only after a fault is run on, its events waiting in memory (README)."""
    try:  # a file made and gone: os.access would ignore capabilities such as CAP_DAC_OVERRIDE
        with tempfile.TemporaryFile(dir=folder):
            pass
    except PermissionError:
        raise
    except OSError as e:
        if e.errno == errno.EROFS:
            log.warning("storage.dir %s is read-only (a disk remounted after a fault, or a "
                        "folder outside the service's ReadWritePaths=): events wait in memory",
                        folder)


def resume_after_death(at: FilePosition | None, died_at: FilePosition | None
                       ) -> tuple[FilePosition | None, FilePosition | None, int]:
    """Where a file capture that died at `at` (None: before its first frame) goes on, where
    it last died, and the frame it skips + 1 (0: none). A second death with no frame between
    (a decoder that crashes on one frame) skips that frame: resumed at it, it died there
    forever."""
    here = at or FilePosition(t0=time.time(), index=0, pos=0)
    if died_at is None or (died_at.index, died_at.pos) != (here.index, here.pos):
        return at, here, 0
    # the next frame's death is a first again: two there before it is skipped too
    return replace(here, index=here.index + 1, pos=here.pos + 1), None, here.pos + 1


def _exit_reason(code: int | None) -> str:
    """A child's exit status in words; a signal named, with what SIGBUS usually means here."""
    if code is None or code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"exit status {code}"
    if name == "SIGBUS":
        return "killed by SIGBUS: is /dev/shm too small for its frame ring?"
    return f"killed by {name}"


def _watchdog_gate(cfg: Config) -> WatchdogGate:
    # The loop kills a child silent for hang_timeout and starts it again; the pings stop only
    # when that did not help (the loop itself hung, a child that cannot be killed). A gate at
    # hang_timeout itself could skip a ping just before the kill and let systemd restart all.
    return WatchdogGate(cfg.service.hang_timeout * 1.5)


def start_child(proc: multiprocessing.process.BaseProcess, q: Any) -> None:
    """Start `proc`, which sends on `q`, and close the supervisor's copy of `q`'s write end.

    The supervisor only reads; with its write end open, a child killed in the middle of a
    message would leave the read of the rest waiting forever, since no end of file could come.
    Closed, that read fails and the rest of the queue's messages are lost, not the supervisor.
    """
    proc.start()
    q._writer.close()  # private: Queue has no public way to drop one end


def _stop_child(child: _Child, deadline: float, pump: Callable[[_Child], int]) -> None:
    """Ask a child to stop, keep reading its queue until it exits, kill it at `deadline`."""
    proc = child.proc
    child.done = True
    child.restart_at = None
    if proc is None:
        return
    if child.stop is not None:
        child.stop.set()
    grace = time.monotonic() + OPENING_GRACE
    while proc.is_alive() and time.monotonic() < deadline:
        pump(child)
        if child.opening and time.monotonic() >= grace:
            break  # it would see the flag only once its open gives up: a stop took 6 s
        proc.join(0.05)
    if proc.is_alive():
        if child.opening:
            log.info("%s was opening its source; stopped it there", child.name)
        else:
            log.warning("%s did not stop in time; killing it", child.name)
        proc.kill()
        proc.join(1.0)
    pump(child)
    child.proc = None


class StopFlag:
    """A child's stop request. multiprocessing.Event.set() waits, without a timeout, for every
    process sleeping in its wait() to wake up: a child frozen or killed in that wait would hang
    the supervisor's stop for good. Setting this flag never blocks; a child polls it."""

    POLL = 0.05  # s: how soon a waiting child sees the flag

    def __init__(self) -> None:
        self._flag = _MP.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._flag.value:
            left = self.POLL if end is None else min(self.POLL, end - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True
