"""Capture stage: one process per camera reads its source and writes frames into the camera's ring.

Lost, stalled or unreadable sources are reopened with exponential backoff; nothing here is fatal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from lprd.camera_probe import refusal
from lprd.config import OPEN_TIMEOUT, CameraConfig, MotionConfig, redact_source
from lprd.notify import loud_repeat
from lprd.ring import FrameRing
from lprd.types import CameraState, FilePosition, FrameRef

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between heartbeat status records
MAX_BAD_FRAMES = 50  # consecutive undecodable frames that count as a lost stream
PROBE_TIMEOUT = 3.0  # s: the request that asks a camera why it refused its stream
STABLE_SESSION = 60.0  # s: a session this long resets the reconnect backoff,
STABLE_PER_DELAY = 10.0  # ... as does one this many times the delay before it
MAX_LAG = 3.0  # s: a live stream's decoding this far behind ...
LAG_HOLD = 5.0  # s: ... for this long is reopened (its backlog dropped)
DEFAULT_FILE_FPS = 25.0  # when a file does not say its frame rate
MOTION_WIDTH = 160  # px: the motion gate works on a frame this wide
MOTION_PIXEL_DELTA = 25  # grey levels a pixel must change by to count as changed


class SourceKind(str, Enum):
    FILE = "file"
    RTSP = "rtsp"
    HTTP = "http"
    STREAM = "stream"  # another network URL FFmpeg opens: udp://, rtmp://, srt://, tcp:// ...
    V4L2 = "v4l2"


@dataclass(frozen=True, slots=True)
class Alive:
    """A sign of life and nothing else: not a state of the camera to publish or wait for."""

    camera: str


@dataclass(frozen=True, slots=True)
class CaptureStatus:
    """A capture process's state, sent on every change and every STATUS_INTERVAL as a heartbeat."""

    camera: str
    connected: bool  # frames are arriving
    fps: float = 0.0  # source frames decoded per second over the last interval
    seq: int = 0  # newest sequence number written to the ring
    last_frame: float | None = None  # ts of the newest frame written
    error: str | None = None  # why the source is not connected (None when it is)
    eof: bool = False  # a file ended without `loop`: this is the last record; the process exits

    def camera_state(self, outbox_depth: int = 0) -> CameraState:
        return CameraState(camera=self.camera, connected=self.connected, fps=self.fps,
                           last_frame=self.last_frame, error=self.error,
                           outbox_depth=outbox_depth)


class _Stop(Protocol):
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


def source_kind(source: str) -> SourceKind:
    low = source.lower()
    if low.startswith(("rtsp://", "rtsps://")):
        return SourceKind.RTSP
    if low.startswith(("http://", "https://")):
        return SourceKind.HTTP
    if re.match(r"[a-z][a-z0-9+.-]*://", low) and not low.startswith("file://"):
        return SourceKind.STREAM
    # /dev/v4l/by-id/... and by-path/... name a camera stably across reboots and USB ports
    if source.startswith("/dev/"):
        return SourceKind.V4L2
    return SourceKind.FILE


def ring_shape(cfg: CameraConfig) -> tuple[int, int]:
    """(height, width) to create a camera's ring with: room for a 4:3 frame cfg.max_width wide.

    Capacity is in bytes, so a portrait frame of the same area fits too; larger frames are
    scaled down by capture. Untouched pages of a slot cost no memory.
    """
    return cfg.max_width * 3 // 4, cfg.max_width


class Backoff:
    """Exponential reconnect delays: initial, 2*initial, ... capped at maximum; reset on success."""

    def __init__(self, initial: float, maximum: float):
        self.initial = initial
        self.maximum = maximum
        self._next = initial
        self.last = 0.0  # the delay next() returned last (0: none since a reset)

    def next(self) -> float:
        delay = self.last = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial
        self.last = 0.0


class MotionGate:
    """Cheap frame differencing on a small blurred grey copy of the frame (or of its ROI).

    A frame counts as moving when more than `threshold` of its pixels changed since the last
    frame that did (not the previous one: a car creeping up to the gate changes little from one
    frame to the next, the less the higher the frame rate); frames within `keep_alive` seconds
    of the last motion still count, so a car that stops at the gate keeps being read. The first
    frame counts as moving (nothing to compare with).
    """

    def __init__(self, cfg: MotionConfig, roi: tuple[int, int, int, int] | None = None):
        self.cfg = cfg
        self.roi = roi
        self._ref: np.ndarray | None = None  # the last frame that counted as moving
        self._last_motion: float | None = None
        self.changed = 0.0  # share of changed pixels in the last update, for logs and tests

    def _small_grey(self, frame: np.ndarray) -> np.ndarray:
        if self.roi is not None:
            x, y, w, h = self.roi
            part = frame[max(y, 0): y + h, max(x, 0): x + w]
            if part.size:  # an ROI outside the frame falls back to the whole frame
                frame = part
        fh, fw = frame.shape[:2]
        scale = min(1.0, MOTION_WIDTH / fw)
        size = (max(1, round(fw * scale)), max(1, round(fh * scale)))
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        return cv2.GaussianBlur(grey, (5, 5), 0)

    def update(self, frame: np.ndarray, ts: float) -> bool:
        if not self.cfg.enabled:
            return True
        grey = self._small_grey(frame)
        ref = self._ref
        if ref is None or ref.shape != grey.shape:
            self.changed = 1.0
        else:
            diff = cv2.absdiff(grey, ref)
            self.changed = float(np.count_nonzero(diff > MOTION_PIXEL_DELTA)) / diff.size
        if self.changed > self.cfg.threshold:
            self._last_motion = ts
            self._ref = grey
        return self._last_motion is not None and ts - self._last_motion <= self.cfg.keep_alive


def fit_frame(frame: np.ndarray, max_width: int) -> np.ndarray:
    """A BGR uint8 frame no wider than max_width and of at most a 4:3 frame's area at
    max_width (a camera ring slot's room, `ring_shape`), scaled down by INTER_AREA: what the
    daemon analyses, for recognize, eval and bench too."""
    if frame.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {frame.dtype}")
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    h, w = frame.shape[:2]
    nw, nh = fit_size(w, h, max_width)
    if (nw, nh) == (w, h):
        return frame
    return cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)


def fit_size(w: int, h: int, max_width: int) -> tuple[int, int]:
    """The (width, height) fit_frame gives a w x h frame."""
    room = max(1, max_width * (max_width * 3 // 4))  # pixels
    scale = min(1.0, max_width / w, math.sqrt(room / (h * w)))
    if scale >= 1.0:
        return w, h
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh > room:  # rounding can leave it a row too big
        nw, nh = max(1, nw - 1), max(1, nh - 1)
    return nw, nh


def file_frame_time(pos_msec: float, pos: int, step: float, base: float = 0.0,
                    last: float = -1.0) -> tuple[float, float]:
    """(seconds into a file plus `base`, the base from now on) of its frame `pos`, whose time
    the decoder gives as `pos_msec`: the file's own timestamps, not pos * step (phones and
    NVRs write variable frame rates, and a pause in the recording is a pause in time);
    pos * step where it has none (0 after the first frame). Never earlier than `last`: a
    decoder's reordering at the end of a file may repeat a time (a millisecond on), and
    timestamps that start again (files joined by `cat`, an NVR's discontinuity) go on a
    frame after the last one, the base moved with them."""
    t = pos_msec / 1000.0
    if not (math.isfinite(t) and t >= 0 and (t > 0 or pos == 0)):
        return max(base + pos * step, last + 0.001), base  # one frame's guess moves no base
    if base + t < last - step:  # back by more than a frame: timestamps that start again
        base = last + step - t
    return max(base + t, last + 0.001), base


def _seek(cap: cv2.VideoCapture, pos: int, fps: float) -> bool:
    """Move a reopened file to frame `pos`; False where the demuxer cannot land there.

    OpenCV's seek says it succeeded on MPEG-TS and lands on the next keyframe instead (up to
    a GOP of frames lost): the frame it lands on is checked by its timestamp."""
    if not cap.set(cv2.CAP_PROP_POS_FRAMES, pos) or not cap.grab():
        return False
    if round(cap.get(cv2.CAP_PROP_POS_MSEC) * fps / 1000.0) != pos:
        return False
    return bool(cap.set(cv2.CAP_PROP_POS_FRAMES, pos))  # the checked frame again, next


def v4l2_size(cfg: CameraConfig) -> tuple[int, int]:
    """The frame size to ask a V4L2 camera for: `resolution`, else max_width at 16:9."""
    return cfg.resolution or (cfg.max_width, cfg.max_width * 9 // 16)


def longest_silence(cfg: CameraConfig) -> float:
    """The longest a healthy capture process may go without a status record: one wait for a
    frame or an open (V4L2 rounds its wait up to whole seconds), plus the heartbeat's interval
    and a second for the queue. A supervisor that kills sooner kills a camera that was about to
    report a stall and reconnect."""
    wait = max(math.ceil(cfg.stall_timeout), cfg.open_timeout or OPEN_TIMEOUT)
    return wait + STATUS_INTERVAL + 1.0


def quiet_ffmpeg() -> None:
    """FFmpeg's and OpenCV's own messages off stderr, unless lprd logs at debug level.

    FFmpeg writes its errors there, one or two each reconnect of a flapping stream (50,000
    lines a day), nine for a truncated file given to `lprd recognize`; ours say what
    happened, in one line."""
    debug = log.isEnabledFor(logging.DEBUG)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "16" if debug else "-8")
    if not debug:
        with contextlib.suppress(AttributeError):  # builds without cv2.utils.logging
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _open(source: str, kind: SourceKind, open_timeout: float, read_timeout: float,
          size: tuple[int, int]) -> cv2.VideoCapture:
    """`size`: what a V4L2 camera is asked for (`v4l2_size`)."""
    if kind is SourceKind.V4L2:
        # OpenCV waits 10 s for a V4L2 frame unless told otherwise; it reads this once, at the
        # first wait, and a capture process has one camera
        os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT",
                              str(max(1, math.ceil(read_timeout))))
        cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
        if cap.isOpened():
            # OpenCV opens a camera at 640x480 YUYV: a 1080p camera's plates read from VGA.
            # MJPG first: uncompressed 1080p passes USB 2 at a few frames a second. The driver
            # takes the nearest size it has; one without MJPG keeps its own format.
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        return cap
    quiet_ffmpeg()
    if kind is SourceKind.RTSP and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
        # UDP loses packets (smeared frames) behind NAT and on busy Wi-Fi; TCP is what works.
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]
    return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)


class _Ended(Exception):
    """A capture session ended: the source was lost, stalled, unreadable, or a file ran out."""

    def __init__(self, reason: str, eof: bool = False):
        self.reason = reason
        self.eof = eof
        super().__init__(reason)


class _Behind(Exception):
    """Decoding fell too far behind a live stream: reopen it at once, with fresh frames."""


class LagWatch:
    """Whether decoding has fallen behind a live stream for good.

    The lag is the wall time since a frame minus the stream time since it (RTSP carries the
    camera's own timestamps), from the frame where that difference was smallest: a session
    starts with a burst of buffered frames. That base creeps up by DRIFT a second, so that a
    camera clock a little slower than ours is no lag. The lag grows for good when the device
    decodes fewer frames a second than the camera sends; a network hiccup drains within a
    second or two. Only a lag over `limit` that lasts `hold` seconds counts."""

    DRIFT = 0.005  # s a second: camera clocks off by up to 0.5 %

    def __init__(self, limit: float = MAX_LAG, hold: float = LAG_HOLD) -> None:
        self.limit, self.hold = limit, hold
        self.lag = 0.0
        self._base: float | None = None
        self._at = 0.0
        self._last_ms = -1.0
        self._over_since: float | None = None

    def update(self, stream_ms: float, now: float) -> bool:
        """Take a frame's stream time (ms) and the monotonic time; True: reopen the stream."""
        if stream_ms <= 0 or stream_ms <= self._last_ms:  # no timestamps, or a repeat
            if stream_ms < self._last_ms:  # the stream's clock went back: start over
                self._base = None
                self._over_since = None
            self._last_ms = stream_ms
            return False
        self._last_ms = stream_ms
        d = now - stream_ms / 1000.0
        if self._base is None:
            self._base = d
        else:
            self._base = min(d, self._base + self.DRIFT * (now - self._at))
        self._at = now
        self.lag = d - self._base
        if self.lag <= self.limit:
            self._over_since = None
            return False
        if self._over_since is None:
            self._over_since = now
        return now - self._over_since >= self.hold


class _Stopped(Exception):
    pass


class Capture:
    """The capture loop of one camera; `capture_main` runs it in its own process."""

    def __init__(self, camera: str, cfg: CameraConfig, ring: FrameRing, events: Any,
                 stop: _Stop, frames: Any = None, resume: FilePosition | None = None):
        self.camera = camera
        self.cfg = cfg
        self.ring = ring
        self.events = events
        self.frames = frames if frames is not None else events
        self.stop = stop
        self.kind = source_kind(cfg.source)
        # set by the config's check against service.hang_timeout; a bare CameraConfig has none
        self.open_timeout = cfg.open_timeout if cfg.open_timeout is not None else OPEN_TIMEOUT
        self.shown = redact_source(cfg.source, drop_query=True)  # a camera password may sit there
        self.is_file = self.kind is SourceKind.FILE
        # Files default to realtime=False: every frame is analysed, flow-controlled by acks.
        self.realtime = bool(cfg.realtime) if self.is_file else True
        self.flow_control = self.is_file and not self.realtime
        self.gate = MotionGate(cfg.motion, cfg.roi)
        self.connected = False
        self.error: str | None = None
        self.last_ts: float | None = None
        self._grabbed = 0  # source frames since the last heartbeat
        self._beat_at = time.monotonic()
        self._fps = 0.0
        self._file_t0: float | None = None  # wall time of the clip's frame 0
        self._file_index = 0  # clip frames decoded so far, across loops and reopens
        self._file_pos = 0  # frames grabbed in this pass of the file: where a reopen resumes
        # clip seconds, across loops: at the start of this pass, and of the last frame
        self._clip_base, self._clip_last = 0.0, -1.0
        self._clip_step = 1.0 / DEFAULT_FILE_FPS  # a frame's duration at the clip's rate
        self._got = 0  # frames written in the current session
        # monotonic times of the first frame since the last failure (None: none yet), and of
        # the last frame: a looped file or a reopened stream is new sessions, not failures
        self._frames_from: float | None = None
        self._frames_to = 0.0
        self._loud = True  # the last failure was logged at warning level (or there was none)
        # a failure was the last thing logged loud: the next connect is said loud too, or the
        # journal ended on "retrying" (a failure after the 4th, say, is quiet) for a camera
        # that streamed on all night
        self._said_down = False
        self._fails = 0  # failures in a row before this session
        self._refusal: str | None = None  # why the camera refused the stream, in its words
        self._roi_checked = False  # against the first frame's size (unknown before it)
        # a realtime file's (monotonic time, clip seconds) its frames are paced from; kept
        # across loops, so that clip time keeps to the wall clock's
        self._pace: tuple[float, float, float] | None = None  # (..., clip fps)
        if resume is not None and self.is_file:  # a restarted process: no replay of the clip
            self._file_t0, self._file_index, self._file_pos = resume.t0, resume.index, resume.pos
            self._clip_base, self._clip_last = resume.base, resume.last
            log.info("%s: resuming %s at frame %d", camera, self.shown, resume.pos)

    def _clip_time(self, pos_msec: float) -> float:
        """Clip seconds of the frame just grabbed, across loops."""
        self._clip_last, self._clip_base = file_frame_time(
            pos_msec, self._file_pos, self._clip_step, self._clip_base, self._clip_last)
        return self._clip_last

    # -- status ---------------------------------------------------------------------------------

    def _put(self, q: Any, item: object, must: bool) -> None:
        while True:
            try:
                if must:
                    q.put(item, timeout=0.5)
                else:
                    q.put_nowait(item)
                return
            except queue.Full:
                if not must or self.stop.is_set():
                    log.debug("%s: queue full, dropped %s", self.camera, type(item).__name__)
                    return

    def status(self, eof: bool = False) -> None:
        rec = CaptureStatus(camera=self.camera, connected=self.connected, fps=round(self._fps, 2),
                            seq=self.ring.last_seq, last_frame=self.last_ts,
                            error=self.error, eof=eof)
        self._put(self.events, rec, must=True)

    def _set(self, connected: bool, error: str | None) -> None:
        if (connected, error) != (self.connected, self.error):
            self.connected, self.error = connected, error
            self.status()

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._beat_at >= STATUS_INTERVAL:
            self._fps = self._grabbed / (now - self._beat_at)
            self._grabbed = 0
            self._beat_at = now
            self.status()

    def _sleep(self, seconds: float) -> None:
        """Wait, still sending heartbeats; raise _Stopped when asked to stop."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if self.stop.wait(max(0.0, min(left, STATUS_INTERVAL))):
                raise _Stopped
            self.heartbeat()
            if left <= STATUS_INTERVAL:
                return

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self.cfg.reconnect.initial, self.cfg.reconnect.max)
        fails = behind = loops = 0
        failure: Exception | None = None  # an unforeseen one, logged with its traceback
        log.info("%s: capturing %s (%s%s)", self.camera, self.shown, self.kind.value,
                 "" if not self.is_file else
                 ", realtime" if self.realtime else ", every frame")
        try:
            while not self.stop.is_set():
                try:
                    self._session()
                    continue
                except _Ended as e:
                    if e.eof and (self._got or self._file_pos):
                        if self.cfg.loop:
                            loops += 1  # said once; a short clip loops thousands of times a day
                            self._loud = loops == 1
                            log.log(logging.INFO if self._loud else logging.DEBUG,
                                    "%s: end of %s, looping", self.camera, self.shown)
                            self._file_pos = 0
                            self._clip_base = self._clip_last + self._clip_step
                            continue
                        log.info("%s: end of %s (%d frames)", self.camera, self.shown,
                                 self._file_pos)
                        self.connected, self.error = False, None
                        self.status(eof=True)
                        return
                    reason = e.reason
                except _Behind as e:
                    # not the source's fault: no backoff, and reopening drops the backlog
                    behind += 1
                    self._loud = loud_repeat(behind)
                    if self._loud:
                        log.warning("%s: %s (%d time(s) so far); reopening it", self.camera, e,
                                    behind)
                    continue
                except (_Stopped, KeyboardInterrupt):
                    raise
                # a decoder or OS surprise must not end the camera; logged below when loud
                except Exception as e:  # noqa: BLE001
                    failure = e
                    reason = f"capture failed: {type(e).__name__}: {e}"
                # Not after a session of a few frames (or one frame and a stall): a flapping
                # stream would be reopened every second, forever. One whose frames ran a while
                # between drops (a proxy that cuts each session after 45 s) is back at once.
                if self._frames_from is not None and self._frames_to - self._frames_from \
                        >= min(STABLE_SESSION, STABLE_PER_DELAY * backoff.last):
                    backoff.reset()
                    fails = 0
                    self._fails = 0
                self._frames_from = self._pace = None
                fails += 1
                delay = backoff.next()
                # the first failure and then 2, 4, 8 ... in a row: no log flood while a camera
                # is down for the night
                loud = self._loud = loud_repeat(fails)
                self._fails = fails
                self._said_down = self._said_down or loud
                if failure is not None:
                    if loud:
                        log.error("%s: capture failed", self.camera, exc_info=failure)
                    failure = None
                log.log(logging.WARNING if loud else logging.DEBUG, "%s: %s; retrying in %.1f s%s",
                        self.camera, reason, delay,
                        f" ({fails} failures in a row)" if fails > 1 else "")
                self._set(False, reason)
                self._sleep(delay)
        except _Stopped:
            pass
        self._set(False, None)

    def _session(self) -> None:
        """Open the source and pump frames until it ends (raises _Ended) or stop (_Stopped)."""
        cfg = self.cfg
        self._got = 0
        if self.is_file:
            p = Path(cfg.source)
            if not p.is_file():
                raise _Ended(f"file not found: {self.shown}")
            if p.stat().st_size == 0:
                raise _Ended(f"file is empty (0 bytes): {self.shown}")
            try:  # one lprd may not read (root's 0600 copy) was told corrupt, and re-encoded
                with p.open("rb") as f:
                    f.read(1)
            except OSError as e:
                raise _Ended(f"cannot read {self.shown}: {e.strerror or e}") from None
        elif self.kind is SourceKind.V4L2 and not os.path.exists(cfg.source):
            raise _Ended(f"no such device: {self.shown} (unplugged, or another /dev/video "
                         "number since the last boot? /dev/v4l/by-id/ names stay the same)")
        # a sign of life just before a call that may block for open_timeout
        self._put(self.events, Alive(self.camera), must=True)
        cap = _open(cfg.source, self.kind, self.open_timeout, cfg.stall_timeout, v4l2_size(cfg))
        try:
            if not cap.isOpened():
                if self.kind in (SourceKind.RTSP, SourceKind.HTTP) and loud_repeat(
                        self._fails + 1):  # asked at the failures logged, kept between
                    # a sign of life after the open's wait, before the probe's (its own)
                    self._put(self.events, Alive(self.camera), must=True)
                    self._refusal = refusal(cfg.source, min(self.open_timeout, PROBE_TIMEOUT))
                if self._refusal:
                    raise _Ended(f"cannot open {self.shown}: {self._refusal}")
                why = ("corrupt, truncated or not a video" if self.is_file
                       else "unreachable, refused or not a video stream")
                raise _Ended(f"cannot open {self.shown} ({why})")
            self._refusal = None
            clip_fps = DEFAULT_FILE_FPS
            if self.is_file:
                clip_fps = cap.get(cv2.CAP_PROP_FPS)
                if not (0 < clip_fps <= 1000):
                    log.warning("%s: %s has no usable frame rate; assuming %.0f fps",
                                self.camera, self.shown, DEFAULT_FILE_FPS)
                    clip_fps = DEFAULT_FILE_FPS
                self._clip_step = 1.0 / clip_fps
                if self._file_t0 is None:
                    self._file_t0 = time.time()
                if self._file_pos and not _seek(cap, self._file_pos, clip_fps):
                    # reopened after a failure: resume, do not replay; where a seek cannot
                    # land on the frame, read up to it from the start
                    cap.release()
                    cap = _open(cfg.source, self.kind, self.open_timeout, cfg.stall_timeout,
                                v4l2_size(cfg))
                    for i in range(self._file_pos):
                        if i % 25 == 0:
                            if self.stop.is_set():
                                raise _Stopped
                            self.heartbeat()
                        if not cap.grab():
                            raise _Ended("end of file", eof=True)
            if self._pace is None or self._pace[2] != clip_fps:
                # a loop keeps the pace: its first frame is due as the next (a clip replaced by
                # one of another rate starts its own)
                # (from the clip time of the next frame: the last one's and a frame)
                self._pace = (time.monotonic(),
                              max(self._clip_base, self._clip_last + self._clip_step), clip_fps)
            pace_t0, pace_clip, _ = self._pace
            interval = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
            next_due = 0.0
            last_good = time.monotonic()
            bad = 0
            # the streams whose frames carry their sender's timestamps (MPEG-TS, FLV ...);
            # LagWatch ignores a stream without them
            lag = LagWatch() if self.kind in (SourceKind.RTSP, SourceKind.STREAM) else None
            # the text stays the same per retry: it is the state topic's error, and a new one
            # is a new message
            stalled = f"stream stalled: no frame for {cfg.stall_timeout:g} s"
            while True:
                if self.stop.is_set():
                    raise _Stopped
                self.heartbeat()
                if self.flow_control:
                    while not self.ring.wait_room(0.25):
                        if self.stop.is_set():
                            raise _Stopped
                        self.heartbeat()
                        last_good = time.monotonic()  # waiting on the reader is no stall
                grab_at = time.monotonic()
                if not cap.grab():
                    if self.is_file:
                        if self._got or self._file_pos:
                            raise _Ended("end of file", eof=True)
                        raise _Ended(f"no frame could be decoded from {self.shown} "
                                     "(corrupt or unsupported file)")
                    if time.monotonic() - grab_at >= cfg.stall_timeout * 0.9:
                        raise _Ended(stalled)
                    raise _Ended("stream lost: the source closed the connection, or sent "
                                 "data that could not be read")
                if self.kind is not SourceKind.V4L2 and not self.is_file \
                        and time.monotonic() - grab_at >= cfg.stall_timeout * 0.9:
                    # FFmpeg's read timed out and it hands out the frames its decoder still
                    # held, one a timeout: a frozen camera's old frames, as if new
                    raise _Ended(stalled)
                self._grabbed += 1
                if lag is not None and lag.update(cap.get(cv2.CAP_PROP_POS_MSEC),
                                                  time.monotonic()):
                    raise _Behind(f"decoding stayed over {MAX_LAG:g} s behind the stream for "
                                  f"{LAG_HOLD:g} s: this device decodes fewer frames a second "
                                  "than the camera sends (use its substream, or a lower frame "
                                  "rate or resolution)")
                if self.is_file:
                    clip_t = self._clip_time(cap.get(cv2.CAP_PROP_POS_MSEC))
                    ts = self._file_t0 + clip_t  # type: ignore[operator]
                    self._file_index += 1
                    self._file_pos += 1
                    if self.realtime:  # a clip played like a camera
                        due = pace_t0 + clip_t - pace_clip
                        wait = due - time.monotonic()
                        if wait > 0:
                            self._sleep(wait)
                else:
                    ts = time.time()
                if not self.flow_control and interval:
                    # a stream's cadence on the monotonic clock: a wall-clock step back must
                    # not hold frames back
                    now = ts if self.is_file else time.monotonic()
                    if now < next_due:
                        if not bad:  # a skipped frame is no stall: only a bad streak is
                            last_good = time.monotonic()
                        continue  # analysis rate cap: the frame is decoded but not published
                    # Keep the average rate; after a gap, restart the cadence from now.
                    due, next_due = next_due, (next_due + interval if next_due + interval > now
                                               else now + interval)
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    if not self.flow_control and interval:
                        next_due = due  # the next frame takes the bad one's turn
                    bad += 1
                    if bad >= MAX_BAD_FRAMES or time.monotonic() - last_good > cfg.stall_timeout:
                        raise _Ended(f"frames could not be decoded ({MAX_BAD_FRAMES} in a "
                                     f"row, or none for {cfg.stall_timeout:g} s)")
                    continue
                try:
                    frame = fit_frame(frame, cfg.max_width)
                except ValueError as e:
                    raise _Ended(f"unusable frame: {e}") from None
                bad = 0
                last_good = time.monotonic()
                # a live frame's keep_alive on the monotonic clock: an NTP step cut it short
                motion = self.gate.update(frame, ts if self.is_file else time.monotonic())
                seq = self.ring.write(frame, ts, motion)
                self._got += 1
                self._frames_to = time.monotonic()
                self.last_ts = ts
                h, w = frame.shape[:2]
                if self._frames_from is None:
                    self._frames_from = self._frames_to
                if self._got == 1 and cfg.roi is not None and not self._roi_checked:
                    self._roi_checked = True
                    x, y, rw, rh = cfg.roi
                    if min(w, x + rw) - max(0, x) < 2 or min(h, y + rh) - max(0, y) < 2:
                        log.warning("%s: roi [%d, %d, %d, %d] lies outside the %dx%d frames "
                                    "(set for another resolution?): the whole frame is "
                                    "searched", self.camera, x, y, rw, rh, w, h)
                if self._got == 1:  # said as loudly as the last failure said
                    loud = self._loud or self._said_down
                    self._said_down = False
                    log.log(logging.INFO if loud else logging.DEBUG,
                            "%s: connected to %s (%dx%d)%s", self.camera, self.shown, w, h,
                            f" after {self._fails} failures in a row" if self._fails > 1 else "")
                    self._set(True, None)
                ref = FrameRef(camera=self.camera, seq=seq, ts=ts, width=w, height=h,
                               file=FilePosition(self._file_t0, self._file_index, self._file_pos,
                                                 self._clip_base, self._clip_last)
                               if self.is_file else None)
                # A file frame's ref must not be lost: its consumer acks it to let capture go on.
                self._put(self.frames, ref, must=self.flow_control)
        finally:
            cap.release()


def _child_setup() -> None:
    # Ctrl-C reaches the whole process group; the supervisor decides, via `stop`, when we end.
    if (multiprocessing.parent_process() is not None
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(AttributeError):  # builds without cv2.utils.logging
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def capture_main(camera: str, cfg: CameraConfig, ring_name: str, events: Any, stop: _Stop,
                 frames: Any = None, resume: FilePosition | None = None) -> None:
    """Process target: capture `cfg.source` into the ring `ring_name` until `stop` is set.

    Puts CaptureStatus records on `events` (on change, and every STATUS_INTERVAL s) and a FrameRef
    per frame written on `frames` (default: `events`). Returns after a CaptureStatus(eof=True) when
    a file ends without `loop`. A file starts at `resume` (the last FrameRef's `file`) when given.
    """
    _child_setup()
    ring = FrameRing.attach(ring_name)
    try:
        Capture(camera, cfg, ring, events, stop, frames, resume).run()
    finally:
        ring.close()
        if stop.is_set():
            # At shutdown nobody may drain the queues; do not hang on exit flushing them.
            for q in {id(events): events, id(frames): frames}.values():
                cancel = getattr(q, "cancel_join_thread", None)
                if cancel is not None:
                    cancel()
