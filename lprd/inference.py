"""The one plate pipeline (detect -> read -> filter) and the daemon's inference worker process."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cv2
import numpy as np

from lprd.clock import CLOCK_STEP, ClockWatch
from lprd.config import Config
from lprd.notify import loud_repeat
from lprd.ring import FrameHeader, FrameRing, Lapped
from lprd.track import Tracker
from lprd.types import Box, Detection, Observation, PlateEvent, Read

log = logging.getLogger(__name__)

CROP_MARGIN = 0.15  # share of the box added on each side of a crop_jpeg
CROP_JPEG_QUALITY = 85


class Detector(Protocol):
    version: str

    def detect(self, frame_bgr: np.ndarray, enlarge: bool = True) -> list[Detection]: ...


class Reader(Protocol):
    version: str

    def read_box(self, frame_bgr: np.ndarray, box: Box) -> Read: ...


@dataclass(slots=True)
class StageTimes:
    """Seconds spent in each stage of the last `process` call."""

    detect: float = 0.0
    read: float = 0.0
    plates: int = 0  # boxes read (before the confidence filter)


def crop_jpeg(frame_bgr: np.ndarray, box: Box, margin: float = CROP_MARGIN) -> bytes | None:
    """The plate with a margin, as JPEG bytes (None if the box lies outside the frame)."""
    x, y, w, h = box
    mx, my = int(w * margin), int(h * margin)
    fh, fw = frame_bgr.shape[:2]
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(fw, x + w + mx), min(fh, y + h + my)
    if x1 <= x0 or y1 <= y0:
        return None
    ok, buf = cv2.imencode(".jpg", frame_bgr[y0:y1, x0:x1],
                           [cv2.IMWRITE_JPEG_QUALITY, CROP_JPEG_QUALITY])
    return buf.tobytes() if ok else None


class PlatePipeline:
    """detect -> read -> filter for one frame; shared by the daemon, recognize, eval and bench."""

    def __init__(self, detector: Detector, reader: Reader, cfg: Config):
        self.detector = detector
        self.reader = reader
        self.cfg = cfg
        self.last = StageTimes()

    @property
    def models(self) -> dict[str, str]:
        """Model versions, as events carry them."""
        return {"detector": self.detector.version, "reader": self.reader.version}

    def process(
        self, frame_bgr: np.ndarray, camera: str, seq: int, ts: float, roi: Box | None = None
    ) -> list[Observation]:
        """Plates read in `frame_bgr`; boxes are in the frame's pixels even with a `roi`."""
        times = StageTimes()
        fh, fw = frame_bgr.shape[:2]
        t0 = time.perf_counter()
        dets = self._detect(frame_bgr, roi)
        t1 = time.perf_counter()
        times.detect = t1 - t0
        rcfg = self.cfg.reader
        out: list[Observation] = []
        for det in dets:
            if det.box[2] < self.cfg.detector.min_width:
                continue
            times.plates += 1
            read = self.reader.read_box(frame_bgr, det.box)
            if not rcfg.keeps(read.text, read.confidence):
                continue
            out.append(Observation(
                camera=camera, seq=seq, ts=ts, box=det.box, frame_size=(fw, fh),
                det_score=det.score, read=read,
                crop_jpeg=crop_jpeg(frame_bgr, det.box) if self.cfg.mqtt.crops else None,
                cut=det.cut,
            ))
        times.read = time.perf_counter() - t1
        self.last = times
        return out

    def _detect(self, frame_bgr: np.ndarray, roi: Box | None) -> list[Detection]:
        if roi is None:
            return self.detector.detect(frame_bgr)
        fh, fw = frame_bgr.shape[:2]
        x, y, w, h = roi
        x0, y0, x1, y1 = max(0, x), max(0, y), min(fw, x + w), min(fh, y + h)
        if x1 - x0 < 2 or y1 - y0 < 2:  # an ROI outside this frame: search the whole frame
            return self.detector.detect(frame_bgr)
        return self.detector.detect_region(frame_bgr, (x0, y0, x1, y1))


# -- the inference worker process ---------------------------------------------------------------
# Messages between the supervisor and the worker: small frozen dataclasses (pickled by the queues).


@dataclass(frozen=True, slots=True)
class CameraSpec:
    """What the worker needs to read one camera's ring."""

    ring: str  # shared-memory name; a new name each time the capture process is (re)started
    every_frame: bool  # files analysed frame by frame: read every seq and ack it (flow control)
    live: bool = False  # a camera or stream: frames carry wall-clock time (files: clip time)
    roi: Box | None = None


@dataclass(frozen=True, slots=True)
class PastPass:
    """A pass reported on a camera: seeds a new worker's dedupe memory (supervisor -> worker),
    and an ending worker's passes back to the supervisor; `plate` may be its folded key."""

    camera: str
    id: str
    plate: str
    last_seen: float


@dataclass(frozen=True, slots=True)
class SetCameras:
    """Supervisor -> worker: the cameras to read now (rings may have changed)."""

    cameras: dict[str, CameraSpec]


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Supervisor -> worker: this camera's capture finished; drain its ring, close its tracks."""

    camera: str
    ring: str  # the ring it ended in: a reload may have given the camera a new one since


@dataclass(frozen=True, slots=True)
class ReloadWatchlist:
    """Supervisor -> worker: reopen the watchlist (SIGHUP)."""


@dataclass(frozen=True, slots=True)
class HandOver:
    """Supervisor -> worker, before it stops the worker for a reload: hand the live cameras'
    open tracks on (OpenTracks) instead of closing them."""


@dataclass(slots=True)
class OpenTracks:
    """Worker -> supervisor -> the next worker: a live camera's open tracks (track._Track), so
    that a car in view during a reload stays one pass, whatever its vote becomes."""

    camera: str
    tracks: list


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Worker -> supervisor: models loaded."""

    models: dict[str, str]


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """Worker -> supervisor: a problem restarting cannot fix (a missing or bad model)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Worker -> supervisor, about once a second: it is alive and how far it got."""

    frames: dict[str, int]  # frames analysed per camera since the worker started
    skipped: dict[str, int]  # frames skipped (no motion, or lapped)


@dataclass(frozen=True, slots=True)
class Drained:
    """Worker -> supervisor: an ended camera's frames are all analysed and its tracks closed."""

    camera: str
    frames: int
    ring: str  # of the EndOfStream: one a reload replaced says nothing of the new camera


HEARTBEAT_EVERY = 1.0
IDLE_TICK = 0.5  # live cameras with no new frame still age their tracks this often


class _Feed:
    """One camera's ring as the worker sees it: the next frame to analyse, and acks."""

    def __init__(self, camera: str, spec: CameraSpec):
        self.camera = camera
        self.spec = spec
        self.ring: FrameRing | None = None  # attached on first use
        self.next_seq = 0  # every_frame mode: the next seq to analyse
        self.done_seq = 0  # newest seq analysed or skipped
        self.frames = 0
        self.skipped = 0
        self.failed = 0  # frames in a row the pipeline raised on
        self.last_tick = time.monotonic()
        self.ending = False  # capture finished: drain, then flush
        self._attach_warned = False

    def attach(self) -> bool:
        if self.ring is not None:
            return True
        try:
            self.ring = FrameRing.attach(self.spec.ring)
        except FileNotFoundError:
            return False  # the supervisor creates rings before it says so; keep trying
        except ValueError as e:  # half-made header: try again next loop
            if not self._attach_warned:
                log.debug("camera %s: ring not ready: %s", self.camera, e)
                self._attach_warned = True
            return False
        self.next_seq = max(1, self.ring.acked + 1, self.ring.last_seq - self.ring.slots + 1)
        if self.spec.live and not self.spec.every_frame:
            # The frame already there may be minutes old (a camera offline since) or analysed
            # by the worker before this one (a reload): taken as new, it was an event now.
            self.done_seq = self.ring.last_seq
        log.debug("camera %s: attached ring %s at seq %d", self.camera, self.spec.ring,
                  self.next_seq)
        return True

    def next_frame(self) -> tuple[FrameHeader, np.ndarray | None] | None:
        """(header, owned frame copy) of the next frame to analyse, or None for now; the copy is
        None for a frame without motion (it is not analysed: 6 MB less to copy at 1080p)."""
        if not self.attach():
            return None
        ring = self.ring
        assert ring is not None
        if self.spec.every_frame:
            last = ring.last_seq
            while self.next_seq <= last:
                seq = self.next_seq
                self.next_seq += 1
                try:
                    header, frame = ring.copy(seq, motion_only=True)
                except Lapped:
                    self.done_seq = seq
                    self.skipped += 1  # flow control should prevent this; log and go on
                    log.warning("camera %s: frame %d was overwritten before it was analysed",
                                self.camera, seq)
                    continue
                ring.ack(seq)  # we own a copy: the capture may reuse the slot now
                self.done_seq = seq
                return header, frame
            return None
        for _ in range(3):
            last = ring.last_seq
            if last <= self.done_seq:
                return None
            try:
                header, frame = ring.copy(last, motion_only=True)
            except (Lapped, ValueError):
                continue
            if last > self.done_seq + 1:
                self.skipped += last - self.done_seq - 1  # live: older frames are dropped
            self.done_seq = last
            ring.ack(last)
            return header, frame
        return None

    def drained(self) -> bool:
        return self.ring is None or self.done_seq >= self.ring.last_seq

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


# A store that would not open (locked by a long index rebuild or swap, a full disk) is tried
# again this often, at the next event; each try waits at most WATCHLIST_BUSY for a lock, so
# that the loop goes on (its heartbeats: a worker silent for service.hang_timeout is killed).
WATCHLIST_RETRY = 30.0
WATCHLIST_BUSY = 5.0


def close_handed(cfg: Config, handed: OpenTracks, models: dict[str, str]) -> list[PlateEvent]:
    """The final events of open tracks handed on that no worker goes on with."""
    now = time.time()
    tracker = Tracker(cfg.tracker, handed.camera, models=models, topn=cfg.reader.topn)
    tracker.adopt(handed.tracks, now)
    return tracker.flush(now)


def _open_watchlist(cfg: Config, progress: Callable[[], None]) -> Any:
    """The daemon's watchlist; `progress` is called while it builds its fuzzy index (a
    deeper max_distance, a new index format: minutes for a long list)."""
    if not cfg.watchlist.enabled:
        return None
    try:
        from lprd.watchlist import Watchlist

        return Watchlist.from_config(cfg, busy_timeout=WATCHLIST_BUSY, progress=progress)
    except Exception as e:  # noqa: BLE001 - a broken watchlist must not stop plates being read
        log.error("watchlist unavailable, events carry no match until it opens (tried again "
                  "every %.0f s): %s", WATCHLIST_RETRY, e)
        return None


class InferenceWorker:
    """The loop of the inference process: rings -> pipeline -> trackers -> watchlist -> events."""

    def __init__(self, cfg: Config, pipeline: PlatePipeline, out: Any,
                 cameras: dict[str, CameraSpec], passes: tuple[PastPass, ...] = (),
                 tracks: tuple[OpenTracks, ...] = ()):
        self.cfg = cfg
        self.pipeline = pipeline
        self.out = out  # anything with put(): the queue to the supervisor
        self.models = pipeline.models
        self.feeds: dict[str, _Feed] = {}
        self.trackers: dict[str, Tracker] = {}
        self._busy_beat = 0.0
        self.watchlist = _open_watchlist(cfg, self._beat_while_busy)
        self._watchlist_tried = time.monotonic()
        self._last_ts: dict[str, float] = {}
        self._clock = ClockWatch()
        self._kept: dict[str, list[tuple[str, str, float]]] = {}  # per camera: id, key, seen
        for pp in passes:
            self._kept.setdefault(pp.camera, []).append((pp.id, pp.plate, pp.last_seen))
        self._adopt = {ot.camera: ot.tracks for ot in tracks}  # from the worker before a reload
        self.handover = False  # HandOver came: shutdown hands the open tracks on
        self.set_cameras(cameras)
        for name, handed in self._adopt.items():  # a camera the reload removed: they end here
            self._send(close_handed(cfg, OpenTracks(name, handed), self.models))
        self._adopt = {}

    def set_cameras(self, cameras: dict[str, CameraSpec]) -> None:
        for name in list(self.feeds):
            if name not in cameras or cameras[name] != self.feeds[name].spec:
                self._finish(name, send_drained=False)
        for name, spec in cameras.items():
            if name not in self.feeds:
                self.feeds[name] = _Feed(name, spec)
                tracker = Tracker(self.cfg.tracker, name, models=self.models,
                                  topn=self.cfg.reader.topn)
                for pass_id, plate, seen in self._kept.pop(name, []):
                    tracker.remember(pass_id, plate, seen)
                handed = self._adopt.pop(name, [])
                if handed and spec.live:
                    tracker.adopt(handed, time.time())
                elif handed:  # now a file, which starts from its own position: they end
                    self._send(close_handed(self.cfg, OpenTracks(name, handed), self.models))
                self.trackers[name] = tracker

    def _finish(self, name: str, send_drained: bool) -> None:
        feed = self.feeds.pop(name)
        tracker = self.trackers.pop(name)
        self._send(tracker.flush(self._now(feed)))
        if not send_drained:  # the camera comes back (a new ring): it keeps its passes
            self._kept[name] = tracker.passes()
        feed.close()
        if send_drained:
            self.out.put(Drained(name, feed.frames, feed.spec.ring))

    def _now(self, feed: _Feed) -> float:
        # Files run on clip time, which may be far from the wall clock.
        return time.time() if not feed.spec.every_frame else self._last_ts.get(feed.camera, 0.0)

    def handle(self, msg: object) -> None:
        if isinstance(msg, SetCameras):
            self.set_cameras(msg.cameras)
        elif isinstance(msg, EndOfStream):
            feed = self.feeds.get(msg.camera)
            if feed is not None and feed.spec.ring == msg.ring:
                feed.ending = True
            elif feed is None:
                self.out.put(Drained(msg.camera, 0, msg.ring))
            # else: the end of a ring a reload has replaced, already closed with it
        elif isinstance(msg, HandOver):
            self.handover = True
        elif isinstance(msg, ReloadWatchlist):
            if self.watchlist is not None:
                self.watchlist.close()
            self.watchlist = _open_watchlist(self.cfg, self._beat_while_busy)
            self._watchlist_tried = time.monotonic()
            if self.watchlist is not None:
                log.info("watchlist reopened")
        else:
            log.warning("inference worker: unknown message %r", msg)

    def step(self) -> bool:
        """Analyse at most one frame per camera; False when there was nothing to do."""
        busy = False
        for name, feed in list(self.feeds.items()):
            item = feed.next_frame()
            tracker = self.trackers[name]
            self._follow_clock()  # per camera: no tracker may see the new clock before it shifts
            if item is None:
                if feed.ending and feed.drained():
                    self._finish(name, send_drained=True)
                elif not feed.spec.every_frame and time.monotonic() - feed.last_tick > IDLE_TICK:
                    feed.last_tick = time.monotonic()
                    self._send(tracker.tick(time.time()))
                continue
            busy = True
            header, frame = item
            if feed.spec.live and abs(header.ts - time.time()) > CLOCK_STEP:
                # Stamped just before a clock step: its time belongs to the old clock.
                header = replace(header, ts=time.time())
            self._last_ts[name] = header.ts
            feed.last_tick = time.monotonic()
            if frame is None:  # no motion
                feed.skipped += 1
                tracker.hold(header.ts)
                self._send(tracker.tick(header.ts))
                continue
            try:
                obs = self.pipeline.process(frame, name, header.seq, header.ts, roi=feed.spec.roi)
            except Exception as e:  # one bad frame must not end the worker
                feed.failed += 1
                # the 1st, 2nd, 4th ... in a row with their traceback: a fault of every frame
                # (a model that cannot handle them) flooded the journal at the frame rate
                if loud_repeat(feed.failed):
                    log.error("camera %s: frame %d could not be analysed (%d in a row)", name,
                              header.seq, feed.failed, exc_info=e)
                continue
            feed.frames += 1
            feed.failed = 0
            self._send(tracker.update(obs, header.ts))
        return busy

    def _follow_clock(self) -> None:
        jump = self._clock.step()
        if jump:
            log.warning("the system clock stepped by %+.1f s; live cameras' tracks follow it", jump)
            for name, feed in self.feeds.items():
                if feed.spec.live:  # files run on clip time, which does not step
                    self.trackers[name].shift_clock(jump)

    def _send(self, events: list[PlateEvent]) -> None:
        if (events and self.watchlist is None and self.cfg.watchlist.enabled
                and time.monotonic() - self._watchlist_tried >= WATCHLIST_RETRY):
            self._watchlist_tried = time.monotonic()
            self.watchlist = _open_watchlist(self.cfg, self._beat_while_busy)
            if self.watchlist is not None:
                log.info("watchlist opened: events carry their match again")
        for ev in events:
            if self.watchlist is not None:
                ev = self.watchlist.match_event(ev)
            log.info("camera %s: %s event %s plate %s (%.2f, %d frames)", ev.camera,
                     "final" if ev.final else "early", ev.id, ev.plate, ev.confidence, ev.frames,
                     extra={"camera": ev.camera, "event_id": ev.id})
            self.out.put(ev)

    def _beat_while_busy(self) -> None:
        # a long index build is no hang: without these the supervisor killed the process
        # (and the next one, which built it again)
        now = time.monotonic()
        if now - self._busy_beat >= 1.0:
            self._busy_beat = now
            self.out.put(self.heartbeat())

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(frames={n: f.frames for n, f in self.feeds.items()},
                         skipped={n: f.skipped for n, f in self.feeds.items()})

    def shutdown(self) -> None:
        """Close every track (their final events go out), drop the ring mappings, and hand the
        passes still in their dedupe window to the supervisor: a car that stayed in view kept
        its pass alive past its final event, and the next worker must know until when."""
        for name in list(self.feeds):
            if self.handover and self.feeds[name].spec.live:
                tracks = self.trackers[name].take_open()
                if tracks:
                    self.out.put(OpenTracks(name, tracks))
            self._finish(name, send_drained=False)
        for name, passes in self._kept.items():
            for pass_id, key, seen in passes:
                self.out.put(PastPass(name, pass_id, key, seen))


def default_threads() -> int:
    """TFLite threads for the worker: the cores it may run on, up to 4 (captures need some CPU
    too). The affinity, not os.cpu_count(): under `CPUAffinity=` or `taskset` more threads than
    cores only contend."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def child_signals() -> None:
    """In a child: leave Ctrl-C and hang-ups to the supervisor, which stops children itself,
    and die with the supervisor even when it is SIGKILLed (no orphans holding cameras)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A SIGTERM to the whole group (`timeout`, `kill -- -PGID`, a container's init) would end
    # us before our final events; the supervisor's stop flag does it in order.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The pid the parent had when it started us: getppid() after our imports may already be
    # init's if the supervisor died meanwhile.
    pp = multiprocessing.parent_process()
    parent = pp.pid if pp is not None and pp.pid is not None else os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's stop event still works
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def inference_main(cfg: Config, cameras: dict[str, CameraSpec], ctl: Any, out: Any,
                   stop: Any, log_level: str = "info", passes: tuple[PastPass, ...] = (),
                   tracks: tuple[OpenTracks, ...] = ()) -> None:
    """Process target: load the models, then analyse frames until `stop` is set.

    `ctl` (a queue) brings SetCameras / EndOfStream / ReloadWatchlist; `out` (a queue) takes
    WorkerReady, Heartbeat, PlateEvent, Drained and WorkerFailed records.
    """
    child_signals()
    _child_logging(log_level)
    from lprd.detect import PlateDetector
    from lprd.models import ModelError
    from lprd.read import PlateReader

    threads = default_threads()
    try:
        pipeline = PlatePipeline(PlateDetector(cfg.detector, threads),
                                 PlateReader(cfg.reader, threads), cfg)
    except ModelError as e:
        out.put(WorkerFailed(str(e)))
        return
    worker = InferenceWorker(cfg, pipeline, out, cameras, passes, tracks)
    out.put(WorkerReady(pipeline.models))
    log.info("inference worker ready (%s, %d threads)", pipeline.models, threads)
    next_beat = 0.0
    idle = 0.001
    while not stop.is_set():
        while True:
            try:
                msg = ctl.get_nowait()
            except queue.Empty:
                break
            worker.handle(msg)
        busy = worker.step()
        now = time.monotonic()
        if now >= next_beat:
            out.put(worker.heartbeat())
            next_beat = now + HEARTBEAT_EVERY
        if busy:
            idle = 0.001
        else:  # back off while nothing comes: an idle daemon should cost next to nothing
            stop.wait(idle)
            idle = min(idle * 2, 0.02)
    while True:  # a HandOver sent just before the stop
        try:
            msg = ctl.get(timeout=0.05)
        except queue.Empty:
            break
        worker.handle(msg)
    worker.shutdown()
    out.put(worker.heartbeat())


def _child_logging(level: str) -> None:
    try:
        from lprd.notify import setup_logging
    except ImportError:  # pragma: no cover - notify is part of the package
        logging.basicConfig(level=level.upper())
        return
    setup_logging(level)
