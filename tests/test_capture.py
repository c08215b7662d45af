"""Capture with real sources: video files, an HTTP MJPEG server, a GStreamer RTSP server."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streams import (
    DigestRtspCamera,
    MjpegServer,
    RtspServer,
    below_index_strip,
    frame_index,
    free_port,
    indexed_video,
    make_frame,
    rtsp_available,
    write_video,
)

from lprd.capture import (
    Alive,
    Backoff,
    Capture,
    CaptureStatus,
    LagWatch,
    MotionGate,
    capture_main,
    redact_source,
    ring_shape,
    source_kind,
    v4l2_size,
)
from lprd.config import CameraConfig, MotionConfig
from lprd.ring import FrameRing, Lapped
from lprd.types import FilePosition, FrameRef

FAST_RETRY = {"initial": 0.1, "max": 0.4}


@dataclass
class Seen:
    ref: FrameRef
    index: int | None  # the index drawn in the frame; None when lapped before we looked
    motion: bool | None
    shape: tuple[int, ...] | None
    at: float  # monotonic time the test took it


class Cam:
    """Runs capture for one camera (in a spawned process, or a thread for caplog) and consumes
    its ring like the inference stage: reads each FrameRef's frame, then acks it."""

    def __init__(self, cfg: CameraConfig, in_thread: bool = False, ack: bool = True,
                 work: float = 0.0, resume: FilePosition | None = None):
        self.cfg = cfg
        self.ack = ack
        self.work = work  # seconds "spent" on each frame before acking it: a slow consumer
        self.ring = FrameRing.create(f"lprd-test-{uuid.uuid4().hex[:10]}", cfg.ring_slots,
                                     *ring_shape(cfg))
        self.seen: list[Seen] = []
        self.statuses: list[CaptureStatus] = []
        self.in_thread = in_thread
        self.runner: Any
        if in_thread:
            self.q: Any = queue.Queue()
            self.stop: Any = threading.Event()
            self.runner = threading.Thread(
                target=Capture("cam", cfg, self.ring, self.q, self.stop, resume=resume).run,
                daemon=True)
        else:
            ctx = mp.get_context("spawn")
            self.q = ctx.Queue()
            self.stop = ctx.Event()
            self.runner = ctx.Process(target=capture_main,
                                      args=("cam", cfg, self.ring.name, self.q, self.stop),
                                      kwargs={"resume": resume})

    def start(self) -> Cam:
        self.runner.start()
        return self

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not until():
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                rec = self.q.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            if isinstance(rec, CaptureStatus):
                self.statuses.append(rec)
                continue
            if isinstance(rec, Alive):
                continue
            assert isinstance(rec, FrameRef) and rec.camera == "cam"
            try:
                header, view = self.ring.get(rec.seq)
                index, shape = frame_index(view), view.shape
                self.ring.check(rec.seq)
                seen = Seen(rec, index, header.motion, shape, time.monotonic())
            except Lapped:
                seen = Seen(rec, None, None, None, time.monotonic())
            self.seen.append(seen)
            if self.work:
                time.sleep(self.work)
            if self.ack:
                self.ring.ack(rec.seq)
        return True

    def errors(self) -> list[str]:
        return [s.error for s in self.statuses if s.error]

    def eof(self) -> bool:
        return any(s.eof for s in self.statuses)

    def alive(self) -> bool:
        return self.runner.is_alive()

    def close(self) -> None:
        self.stop.set()
        self.runner.join(10)
        if not self.in_thread and self.runner.is_alive():
            self.runner.kill()
            self.runner.join(5)
        self.ring.close()
        self.ring.unlink()


@pytest.fixture
def cams() -> Iterator[Callable[..., Cam]]:
    made: list[Cam] = []

    def make(cfg: CameraConfig, **kw: Any) -> Cam:
        cam = Cam(cfg, **kw)
        made.append(cam)
        return cam.start()

    yield make
    for cam in made:
        cam.close()


@pytest.fixture
def mjpeg() -> Iterator[MjpegServer]:
    server = MjpegServer(fps=25).start()
    yield server
    server.stop()


# -- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fourcc,suffix", [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_file_every_frame_reaches_the_ring_in_order_then_eof(
        tmp_path: Path, cams: Callable[..., Cam], fourcc: str, suffix: str) -> None:
    video = indexed_video(tmp_path / f"clip{suffix}", 90, fps=30, fourcc=fourcc)
    # 3 slots and a consumer slower than decoding: only flow control keeps every frame.
    cam = cams(CameraConfig(source=str(video), ring_slots=3), work=0.005)
    assert cam.pump(cam.eof, timeout=30)
    assert [s.index for s in cam.seen] == list(range(90))
    assert [s.ref.seq for s in cam.seen] == list(range(1, 91))
    gaps = np.diff([s.ref.ts for s in cam.seen])
    assert np.allclose(gaps, 1 / 30, atol=1e-6)  # clip time, not decode time
    last = cam.statuses[-1]
    assert last.eof and last.seq == 90 and not last.connected
    cam.runner.join(10)
    assert cam.runner.exitcode == 0  # a file without `loop` ends the capture by itself


def test_file_in_realtime_is_paced_at_the_clips_rate_and_capped_at_cfg_fps(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    video = indexed_video(tmp_path / "clip.avi", 30, fps=20)
    cam = cams(CameraConfig(source=str(video), realtime=True, fps=10), ack=False)
    assert cam.pump(cam.eof, timeout=30)
    took = cam.seen[-1].at - cam.seen[0].at
    assert 1.2 < took < 2.5  # 30 frames at 20 fps = 1.45 s
    indices = [s.index for s in cam.seen]
    assert 13 <= len(indices) <= 16  # every other frame at fps 10
    assert all(0 < d <= 3 for d in np.diff(indices))


def test_file_loops_when_asked_with_sequence_and_time_going_on(
        tmp_path: Path, cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lprd.capture")
    video = indexed_video(tmp_path / "clip.avi", 10, fps=25)
    cam = cams(CameraConfig(source=str(video), loop=True, ring_slots=4), in_thread=True)
    assert cam.pump(lambda: len(cam.seen) >= 45, timeout=30)
    assert [s.index for s in cam.seen[:25]] == list(range(10)) * 2 + list(range(5))
    assert np.all(np.diff([s.ref.ts for s in cam.seen]) > 0)
    assert not cam.eof()
    # a short clip loops thousands of times a day: the journal hears of the first loop only
    assert caplog.text.count("looping") == 1 and caplog.text.count("connected to") == 2


def test_a_looped_realtime_clip_replaced_by_one_of_another_rate_paces_by_its_own(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    # The pace kept across loops counted the first clip's frames at the new clip's rate: a
    # 2 fps clip after a while of a 25 fps one was due many seconds later (a silent stall).
    live = tmp_path / "looped.avi"
    shutil.copy(indexed_video(tmp_path / "fast.avi", 5, fps=25, width=160, height=120), live)
    slow = indexed_video(tmp_path / "slow.avi", 5, fps=2, width=320, height=240)
    cam = cams(CameraConfig(source=str(live), loop=True, realtime=True, fps=0), in_thread=True)
    assert cam.pump(lambda: len(cam.seen) >= 60, timeout=30)  # a dozen passes at 25 fps
    os.replace(slow, live)  # read from the next pass on
    assert cam.pump(lambda: sum(s.shape is not None and s.shape[1] == 320
                                for s in cam.seen) >= 3, timeout=10)


def test_an_roi_outside_the_frames_is_said_once(
        tmp_path: Path, cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture) -> None:
    # set for a 1080p camera, used on its 720p substream: the whole frame was searched, and
    # nothing said so
    caplog.set_level(logging.WARNING, logger="lprd.capture")
    video = indexed_video(tmp_path / "clip.avi", 10, fps=25, width=320, height=240)
    cam = cams(CameraConfig(source=str(video), loop=True, roi=[0, 500, 320, 100]),
               in_thread=True)
    assert cam.pump(lambda: len(cam.seen) >= 25, timeout=30)  # it looped: new sessions
    said = [r.getMessage() for r in caplog.records if "roi" in r.getMessage()]
    assert said == [("cam: roi [0, 500, 320, 100] lies outside the 320x240 frames (set for "
                    "another resolution?): the whole frame is searched")]


def test_a_looped_realtime_clip_keeps_its_clip_time_to_the_wall_clock(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    # Each pass started its pacing afresh: its first frame went out at once, a frame early a
    # loop (here a fifth of the time), and clip time ran ahead of the wall clock.
    video = indexed_video(tmp_path / "clip.avi", 5, fps=25)
    cam = cams(CameraConfig(source=str(video), loop=True, realtime=True, fps=0), in_thread=True)
    wall = time.time() - time.monotonic()
    assert cam.pump(lambda: len(cam.seen) >= 75, timeout=30)  # 15 passes
    ahead = max(s.ref.ts - (wall + s.at) for s in cam.seen)  # taken after it was written
    assert ahead < 0.05


def test_a_looped_file_that_played_a_while_fails_afresh_loudly_and_soon(
        tmp_path: Path, cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture) -> None:
    # Each loop is a session of its own: the failures before the clip played stayed counted
    # ("7 failures in a row", at debug level, after the longest delay) once it went missing.
    caplog.set_level(logging.INFO, logger="lprd.capture")
    live = tmp_path / "looped.avi"
    cam = cams(CameraConfig(source=str(live), loop=True, realtime=True, fps=0,
                            reconnect={"initial": 0.1, "max": 0.3}), in_thread=True)
    cam.pump(lambda: False, timeout=1.5)  # missing: 0.1, 0.2, 0.3, 0.3 ... s apart
    assert caplog.text.count("file not found") >= 3
    shutil.copy(indexed_video(tmp_path / "clip.avi", 10, fps=25), live)
    # it loops (a new session each time) for 3.5 s: ten times the longest delay
    assert cam.pump(lambda: len(cam.seen) > 10 and cam.seen[-1].at - cam.seen[0].at >= 3.5,
                    timeout=10)
    caplog.clear()
    live.unlink()
    assert cam.pump(lambda: "file not found" in caplog.text, timeout=5)
    line = next(r for r in caplog.records if "file not found" in r.getMessage())
    assert line.levelno == logging.WARNING and "in a row" not in line.getMessage()
    assert "retrying in 0.1 s" in line.getMessage()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("codec", ["libx264", "mpeg2video"])
def test_a_restarted_capture_resumes_an_mpeg_ts_file_at_its_frame(
        tmp_path: Path, cams: Callable[..., Cam], codec: str) -> None:
    # OpenCV's seek in MPEG-TS says it succeeded and lands on the next keyframe: up to a GOP
    # of frames (50 here) were lost, and the clip's times were off by as many.
    src = indexed_video(tmp_path / "clip.avi", 150, fps=25)
    ts = tmp_path / "clip.ts"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(src), "-c:v", codec, "-g", "50",
                    "-q:v", "2", str(ts)], check=True, timeout=120)
    cam = cams(CameraConfig(source=str(ts)), in_thread=True,
               resume=FilePosition(t0=1000.0, index=20, pos=20))
    assert cam.pump(cam.eof, timeout=60)
    assert [s.index for s in cam.seen] == list(range(20, 150))
    assert cam.seen[0].ref.ts == pytest.approx(1000.0 + 20 / 25)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_variable_frame_rate_file_s_frames_keep_their_own_times_across_loops(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    # Phones and NVRs write variable frame rates: frame times were index / the average rate,
    # a 2 s pause in the recording spread over every frame (events seconds off, and the
    # tracker's gaps and timeouts judged on times that never were).
    src = indexed_video(tmp_path / "clip.avi", 10, fps=10)
    vfr = tmp_path / "vfr.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(src), "-vf",
                    "setpts='(N*0.1+gte(N\\,5)*2.0)/TB'", "-fps_mode", "passthrough",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(vfr)], check=True, timeout=120)
    cam = cams(CameraConfig(source=str(vfr), loop=True), in_thread=True)
    assert cam.pump(lambda: len(cam.seen) >= 20, timeout=30)
    assert [s.index for s in cam.seen[:20]] == list(range(10)) * 2
    t = np.array([s.ref.ts for s in cam.seen[:20]]) - cam.seen[0].ref.ts
    assert t[:5] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=0.01)
    assert t[5] == pytest.approx(2.5, abs=0.01)  # the pause
    assert np.all(np.diff(t) > 0)
    assert 2.8 < t[10] < 3.5  # the next pass goes on after the first one's end
    assert t[15] - t[10] == pytest.approx(2.5, abs=0.01)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_file_whose_timestamps_start_again_goes_on_in_time(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    # Two recordings joined by `cat` (MPEG-TS allows it; an NVR's discontinuity looks alike):
    # every frame after the join was put a millisecond after the last, 3 s of video in 3 ms
    # (a realtime clip's pacing and the fps cap then dropped all of it but a frame).
    parts = []
    for i in range(2):
        src = indexed_video(tmp_path / f"{i}.avi", 30, fps=10)
        parts.append(tmp_path / f"{i}.ts")
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(src), "-c:v", "mpeg2video",
                        "-q:v", "2", str(parts[-1])], check=True, timeout=120)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    cam = cams(CameraConfig(source=str(joined)), in_thread=True)
    assert cam.pump(cam.eof, timeout=60)
    t = np.array([s.ref.ts for s in cam.seen]) - cam.seen[0].ref.ts
    assert len(t) == 60
    assert np.diff(t) == pytest.approx(np.full(59, 0.1), abs=0.02)


def test_a_frame_without_a_timestamp_in_a_paused_recording_moves_no_later_time() -> None:
    # Its guess (index / rate) lay a minute behind the frames around it, was taken for
    # timestamps that start again, and put every later frame a minute late.
    from lprd.capture import file_frame_time

    step = 1 / 30
    msecs = [i * 1000 / 30 for i in range(100)] + [63333.3 + i * 1000 / 30 for i in range(100)]
    msecs[150] = 0.0
    base, last, out = 0.0, -1.0, []
    for pos, m in enumerate(msecs):
        last, base = file_frame_time(m, pos, step, base, last)
        out.append(last)
    assert out[151] == pytest.approx(msecs[151] / 1000)
    assert out[199] == pytest.approx(msecs[199] / 1000)
    assert out[150] > out[149]


def _bad_frames(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> list:
    """Capture opens the real decoder, but in its first opening the frames whose grab count
    `bad` picks do not decode; returns the openings."""
    import lprd.capture as capture_mod

    real_open, opened = capture_mod._open, []

    class BadFrames:
        def __init__(self, cap: Any) -> None:
            self.cap, self.grabbed, self.first = cap, 0, not opened
            opened.append(self)

        def grab(self) -> bool:
            self.grabbed += 1
            return self.cap.grab()

        def retrieve(self) -> tuple[bool, Any]:
            if self.first and bad(self.grabbed):
                return False, None
            return self.cap.retrieve()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cap, name)

    monkeypatch.setattr(capture_mod, "_open", lambda *a: BadFrames(real_open(*a)))
    return opened


def test_a_file_reopened_after_a_decode_failure_resumes_instead_of_replaying(
        tmp_path: Path, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch) -> None:
    video = indexed_video(tmp_path / "clip.avi", 120, fps=30)
    # the real decoder, but frames 40-99 of the first opening do not decode
    opened = _bad_frames(monkeypatch, lambda grabbed: 40 < grabbed <= 100)
    cam = cams(CameraConfig(source=str(video), reconnect=FAST_RETRY), in_thread=True)
    assert cam.pump(cam.eof, timeout=30)
    indices = [s.index for s in cam.seen]
    assert len(opened) == 2  # 50 bad frames in a row end the session; the file is reopened
    assert indices[:40] == list(range(40))
    assert indices[40] > 40 and indices == sorted(indices)  # resumed after the bad stretch
    assert indices[-1] == 119 and len(indices) == len(set(indices))  # nothing replayed
    assert np.all(np.diff([s.ref.ts for s in cam.seen]) > 0)


def test_one_bad_frame_under_a_low_fps_cap_is_no_stall(
        tmp_path: Path, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch) -> None:
    # The frames the cap skips are decoded fine; one undecodable frame after them, a second
    # and a half since the last frame analysed, ended the session as "none for 1 s".
    video = indexed_video(tmp_path / "clip.avi", 120, fps=30)
    opened = _bad_frames(monkeypatch, lambda grabbed: grabbed == 46)  # of the first opening
    cam = cams(CameraConfig(source=str(video), realtime=True, fps=0.67, stall_timeout=1.0,
                            reconnect=FAST_RETRY), in_thread=True)
    assert cam.pump(cam.eof, timeout=30)
    assert len(opened) == 1 and cam.errors() == []
    assert [s.index for s in cam.seen] == [0, 46, 90]  # the next frame takes its turn


def test_a_restarted_file_capture_starts_where_the_last_frame_ref_left_it(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    video = indexed_video(tmp_path / "clip.avi", 90, fps=30)
    cam = cams(CameraConfig(source=str(video)), resume=FilePosition(t0=1000.0, index=40, pos=40))
    assert cam.pump(cam.eof, timeout=30)
    assert [s.index for s in cam.seen] == list(range(40, 90))
    assert cam.seen[0].ref.ts == pytest.approx(1000.0 + 40 / 30)  # clip time goes on
    last = cam.seen[-1].ref.file
    assert (last.t0, last.index, last.pos) == (1000.0, 90, 90)
    assert last.last == pytest.approx(89 / 30)


def test_recognize_eval_and_bench_scale_frames_as_the_daemon_does() -> None:
    # The daemon also shrinks a frame to its ring slot's room (a 4:3 frame's area at
    # max_width); the CLI tools did not: a portrait or square camera's boxes, frame_size and
    # crops differed from what `recognize` showed.
    from lprd.capture import fit_frame

    for h, w in ((2560, 1440), (1920, 1920), (1080, 1920), (100, 4000)):
        out = fit_frame(np.zeros((h, w, 3), np.uint8), 1920)
        oh, ow = out.shape[:2]
        assert ow <= 1920 and oh * ow <= 1440 * 1920
        assert abs(oh / ow - h / w) < 0.01 * h / w + 1 / ow  # the aspect kept
    assert fit_frame(np.zeros((1080, 1920, 3), np.uint8), 1920).shape == (1080, 1920, 3)
    assert fit_frame(np.zeros((1920, 1920, 3), np.uint8), 1920).shape[:2] == (1662, 1662)
    assert fit_frame(np.zeros((10, 10, 3), np.uint8), 1).shape[:2] == (1, 1)  # it hung


def test_frames_wider_than_max_width_are_scaled_down_before_the_ring(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    video = indexed_video(tmp_path / "big.avi", 12, width=640, height=480)
    cam = cams(CameraConfig(source=str(video), max_width=320))
    assert cam.pump(cam.eof, timeout=30)
    assert {s.shape for s in cam.seen} == {(240, 320, 3)}
    assert {(s.ref.width, s.ref.height) for s in cam.seen} == {(320, 240)}
    assert [s.index for s in cam.seen] == list(range(12))


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 50_000, dtype=np.uint8).tobytes())


def _truncated_mp4(path: Path) -> None:
    tmp = path.with_suffix(".full.mp4")
    indexed_video(tmp, 30, fourcc="mp4v")
    data = tmp.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: unopenable


@pytest.mark.parametrize("spoil,reason", [
    (lambda p: p.write_bytes(b""), "empty"),
    (_garbage, "cannot open .* \\(corrupt|no frame could be decoded"),
    (lambda p: None, "not found"),
    (_truncated_mp4, "cannot open .* \\(corrupt|no frame could be decoded"),
], ids=["zero_bytes", "garbage", "missing", "truncated_mp4"])
def test_unreadable_file_is_logged_and_retried_until_it_becomes_readable(
        tmp_path: Path, cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture,
        spoil: Callable[[Path], None], reason: str) -> None:
    caplog.set_level(logging.WARNING, logger="lprd.capture")
    video = tmp_path / "clip.mp4"
    spoil(video)
    cam = cams(CameraConfig(source=str(video), reconnect=FAST_RETRY), in_thread=True)
    assert cam.pump(lambda: len(cam.errors()) >= 1 and len(caplog.records) >= 3, timeout=20)
    assert cam.alive() and not cam.seen
    assert all(s.connected is False for s in cam.statuses)
    messages = [r.getMessage() for r in caplog.records]
    assert all(m.startswith("cam: ") and "retrying in" in m for m in messages)
    assert re.search(reason, cam.errors()[0]), cam.errors()[0]
    # The file gets fixed: capture, still retrying, picks it up.
    indexed_video(tmp_path / "good.mp4", 15, fourcc="mp4v")
    os.replace(tmp_path / "good.mp4", video)
    assert cam.pump(cam.eof, timeout=20)
    assert [s.index for s in cam.seen] == list(range(15))


def test_truncated_avi_yields_its_intact_frames_then_eof(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    full = indexed_video(tmp_path / "full.avi", 60)
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    cam = cams(CameraConfig(source=str(cut)))
    assert cam.pump(cam.eof, timeout=30)
    indices = [s.index for s in cam.seen]
    assert 20 <= len(indices) < 60 and indices == list(range(len(indices)))
    cam.runner.join(10)
    assert cam.runner.exitcode == 0


# -- motion gating --------------------------------------------------------------------------------

def test_motion_gate_marks_still_frames_and_keeps_alive_after_motion() -> None:
    gate = MotionGate(MotionConfig(enabled=True, threshold=0.002, keep_alive=1.0),
                      roi=below_index_strip(320, 240))
    still = make_frame(0, box_x=100)
    flags = []
    t = 0.0
    for i in range(45):  # still for 2 s, moving 2.0-2.9 s, then still where it stopped
        box = 100 + (min(i, 29) - 19) * 6 if i >= 20 else 100
        frame = make_frame(i, box_x=box)  # the index strip changes every frame, outside the ROI
        flags.append(gate.update(frame, t))
        t += 0.1
    assert flags[:11] == [True] * 11  # the first frame counts as motion, then 1 s keep-alive
    assert not any(flags[11:20])
    assert all(flags[20:30])  # moving
    assert all(flags[30:39]) and not any(flags[40:])  # keep-alive: 1 s after the last move
    off = MotionGate(MotionConfig(enabled=False))
    assert off.update(still, 0.0) and off.update(still, 10.0)


def test_motion_gate_follows_a_car_creeping_up_to_the_gate() -> None:
    # Each frame was compared with the one before: a car creeping forward a pixel a frame
    # changed too little between two frames, and once keep_alive ran out it was marked still.
    gate = MotionGate(MotionConfig(enabled=True, threshold=0.002, keep_alive=1.0),
                      roi=below_index_strip(320, 240))
    flags = []
    for i in range(60):  # 25 fps: a pixel a frame (half a pixel in the gate's small copy)
        flags.append(gate.update(make_frame(i, box_x=100 + i), i / 25))
    assert all(flags), [i for i, f in enumerate(flags) if not f]


def test_motion_flag_reaches_the_ring_for_each_file_frame(
        tmp_path: Path, cams: Callable[..., Cam]) -> None:
    frames = [make_frame(i, box_x=60 + (min(i, 39) - 29) * 8 if i >= 30 else 60)
              for i in range(70)]
    video = write_video(tmp_path / "gate.avi", frames, fps=20)
    motion = {"enabled": True, "keep_alive": 0.25}
    cam = cams(CameraConfig(source=str(video), motion=motion, roi=below_index_strip(320, 240)))
    assert cam.pump(cam.eof, timeout=30)
    flags = {s.index: s.motion for s in cam.seen}
    assert len(flags) == 70
    assert not any(flags[i] for i in range(10, 30))
    assert all(flags[i] for i in range(30, 44))  # moving, then 0.25 s of keep-alive
    assert not any(flags[i] for i in range(45, 70))


# -- live streams ---------------------------------------------------------------------------------

def test_http_mjpeg_stream_publishes_the_newest_frame_at_the_fps_cap(
        mjpeg: MjpegServer, cams: Callable[..., Cam]) -> None:
    cfg = CameraConfig(source=mjpeg.url, fps=5, ring_slots=3)
    cam = cams(cfg, ack=False)  # a consumer that never acks: a live writer must not care
    assert cam.pump(lambda: len(cam.seen) >= 1, timeout=20)
    t0, n0 = time.monotonic(), len(cam.seen)
    assert cam.pump(lambda: time.monotonic() - t0 > 2.0, timeout=10)
    rate = (len(cam.seen) - n0) / (time.monotonic() - t0)
    assert 3.5 <= rate <= 6.5, rate  # the server sends 25 fps; cfg.fps caps at 5
    assert cam.seen[-1].ref.seq > cfg.ring_slots  # went round the ring without acks
    fresh = [s for s in cam.seen[n0:] if s.index is not None]
    lag = [mjpeg.current_index() - s.index for s in fresh[-3:]]
    assert max(lag) <= 25, lag  # under a second behind the server: not a growing backlog
    assert any(s.connected and s.error is None for s in cam.statuses)


def test_http_stream_that_drops_and_returns_is_reconnected(
        mjpeg: MjpegServer, cams: Callable[..., Cam]) -> None:
    cam = cams(CameraConfig(source=mjpeg.url, fps=10, reconnect=FAST_RETRY))
    assert cam.pump(lambda: len(cam.seen) >= 3, timeout=20)
    mjpeg.stop()
    assert cam.pump(lambda: any(not s.connected and s.error for s in cam.statuses), timeout=20)
    gap_end = time.monotonic()
    before = cam.seen[-1].index
    time.sleep(0.5)
    mjpeg.start()
    assert cam.pump(lambda: cam.seen[-1].at > gap_end + 0.5, timeout=20)
    after = [s for s in cam.seen if s.at > gap_end + 0.5]
    assert after[-1].index is not None and before is not None and after[-1].index > before + 10
    assert cam.statuses[-1].connected or any(
        s.connected for s in cam.statuses[-3:])  # reported connected again


class _Grabs:
    """A real capture whose grab() follows `rule(n, cap)`, n this grab's number from 1: a
    stream that hangs up, freezes or stalls on cue."""

    def __init__(self, cap: Any, rule: Callable[[int, Any], bool]) -> None:
        self.cap, self.rule, self.grabbed = cap, rule, 0

    def grab(self) -> bool:
        self.grabbed += 1
        return bool(self.rule(self.grabbed, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cap, name)


def _grab_by(monkeypatch: pytest.MonkeyPatch,
             rule_for: Callable[[int], Callable[[int, Any], bool]]) -> list[_Grabs]:
    """Every source the capture opens grabs by `rule_for(k)`, k its open's number from 0;
    returns the captures opened so far."""
    import lprd.capture as capture_mod

    real_open = capture_mod._open
    opened: list[_Grabs] = []

    def fake_open(*a: Any) -> _Grabs:
        opened.append(_Grabs(real_open(*a), rule_for(len(opened))))
        return opened[-1]

    monkeypatch.setattr(capture_mod, "_open", fake_open)
    return opened


def _retry_delays(log_text: str) -> list[float]:
    return [float(x) for x in re.findall(r"retrying in ([\d.]+) s", log_text)]


def test_a_flapping_stream_backs_off_and_its_retries_stop_flooding_the_log(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A camera that sends a few frames and hangs up, again and again: a session with frames
    # reset the backoff, so it was reopened every `initial` seconds forever, each retry logged.
    _grab_by(monkeypatch, lambda k: lambda n, cap: n <= 3 and cap.grab())  # hangs up after 3
    caplog.set_level(logging.DEBUG, logger="lprd.capture")
    cam = cams(CameraConfig(source=mjpeg.url, fps=0, reconnect={"initial": 0.1, "max": 0.8}),
               in_thread=True)
    assert cam.pump(lambda: len(caplog.text.split("retrying in")) > 6, timeout=30)
    delays = _retry_delays(caplog.text)
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 0.8]
    retries = [r for r in caplog.records if "retrying" in r.message][:7]
    warned = [r for r in retries if r.levelno >= logging.WARNING]
    assert len(warned) == 3  # failures 1, 2 and 4 of the first 7 (then 8, 16 ...)
    assert "(4 failures in a row)" in warned[-1].message
    # the state's error text is the same each time: one retained message, not one per retry
    assert len(set(cam.errors())) == 1
    # and "connected" is said as loudly as the failure before it
    infos = [r for r in caplog.records if "connected to" in r.message][:6]
    assert [r.levelno for r in infos] == [logging.INFO, logging.INFO, logging.INFO,
                                          logging.DEBUG, logging.INFO, logging.DEBUG]


def test_a_camera_back_after_a_quiet_failure_says_so_loud(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Failures 1, 2 and 4 are logged, the 5th is quiet: a camera back after it was said
    # "connected" at debug level, and the journal's last word on it stayed "retrying"
    _grab_by(monkeypatch, lambda k: (lambda n, cap: cap.grab()) if k >= 5
             else (lambda n, cap: False))
    caplog.set_level(logging.INFO, logger="lprd.capture")
    cam = cams(CameraConfig(source=mjpeg.url, fps=0, reconnect={"initial": 0.05, "max": 0.1}),
               in_thread=True)
    assert cam.pump(lambda: "connected to" in caplog.text, timeout=30)
    said = [r.message for r in caplog.records if "retrying" in r.message or "connected" in
            r.message]
    assert "(4 failures in a row)" in said[-2]
    assert said[-1].endswith("after 5 failures in a row")


def test_an_mpeg_ts_stream_decoded_too_slowly_is_reopened_as_rtsp_is(
        cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # tcp:// (udp://, srt://) MPEG-TS carries its sender's timestamps: a box that decodes it
    # slower than it comes fell behind for good, every frame stamped late, while only RTSP was
    # watched for lag
    import lprd.capture as capture_mod

    port = free_port()
    ffmpeg = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
         "testsrc=size=160x120:rate=25", "-t", "60", "-c:v", "mpeg2video", "-f", "mpegts",
         f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL)
    try:
        monkeypatch.setattr(capture_mod.LagWatch.__init__, "__defaults__", (1.0, 1.0))
        _grab_by(monkeypatch, lambda k: lambda n, cap: time.sleep(0.15) is None and cap.grab())
        caplog.set_level(logging.INFO, logger="lprd.capture")
        # (ffmpeg takes one connection: no probe; opened before it listens, the camera retries)
        cam = cams(CameraConfig(source=f"tcp://127.0.0.1:{port}", fps=0,
                                reconnect=FAST_RETRY), in_thread=True)
        assert cam.pump(lambda: "decoding stayed" in caplog.text, timeout=30), caplog.text
    finally:
        ffmpeg.kill()
        ffmpeg.wait()


def test_a_camera_that_refuses_the_password_says_so_in_its_state(
        cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture) -> None:
    # a wrong password looked like a camera that is off: "unreachable, refused or not a video
    # stream", in the journal and on the state topic alike
    from lprd.notify import loud_repeat

    srv = DigestRtspCamera("admin", "right").start()
    caplog.set_level(logging.DEBUG, logger="lprd.capture")
    try:
        cam = cams(CameraConfig(source=f"rtsp://admin:wrong@127.0.0.1:{srv.port}/s1",
                                reconnect={"initial": 0.05, "max": 0.1}), in_thread=True)
        assert cam.pump(lambda: len(cam.errors()) >= 6, timeout=30)
        # the same text at every retry (one retained state)
        assert set(cam.errors()) == {
            f"cannot open rtsp://admin:***@127.0.0.1:{srv.port}/s1: the camera refused the "
            + "user name and password (401 Unauthorized)"}
        # asked at the failures the journal tells (1, 2, 4, 8 ...): two requests each, the
        # challenge and the answer
        cam.close()
        failures = caplog.text.count("retrying in")
        assert srv.probes in {2 * sum(loud_repeat(n) for n in range(1, k + 1))
                              for k in (failures, failures + 1)}, (srv.probes, failures)
    finally:
        srv.stop()


def test_ffmpeg_s_own_errors_stay_off_stderr_at_info_level(
        cams: Callable[..., Cam], capfd: pytest.CaptureFixture[str]) -> None:
    # A stream that breaks off: FFmpeg wrote a line to stderr (the journal) every retry,
    # beside lprd's own, throttled, line.
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                with c:
                    c.recv(1000)
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; "
                              b"boundary=frame\r\nContent-Length: 100000\r\n\r\n--frame\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        cam = cams(CameraConfig(source=f"http://127.0.0.1:{srv.getsockname()[1]}/s.mjpg",
                                reconnect=FAST_RETRY))
        assert cam.pump(lambda: len(cam.errors()) >= 1 and cam.runner.is_alive(), timeout=20)
        time.sleep(1.0)  # a few more retries
    finally:
        srv.close()
    assert "Stream ends prematurely" not in capfd.readouterr().err


def test_stalled_stream_is_detected_and_reopened(
        mjpeg: MjpegServer, cams: Callable[..., Cam]) -> None:
    cam = cams(CameraConfig(source=mjpeg.url, fps=10, stall_timeout=1.0, reconnect=FAST_RETRY))
    assert cam.pump(lambda: len(cam.seen) >= 3, timeout=20)
    mjpeg.freeze()  # the socket stays open, nothing arrives
    frozen_at = time.monotonic()
    assert cam.pump(lambda: any("stalled" in e for e in cam.errors()), timeout=10)
    assert time.monotonic() - frozen_at < 5
    mjpeg.unfreeze()
    n = len(cam.seen)
    assert cam.pump(lambda: len(cam.seen) >= n + 3, timeout=15)
    assert cam.alive()


def _udp_sockets(pid: int) -> int:
    """UDP sockets held by a process (RTP over UDP would open some; interleaved TCP none)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            udp.add(line.split()[9])
    return len(inodes & udp)


@pytest.mark.skipif(not rtsp_available(), reason="GStreamer RTSP server (Debian packages) missing")
def test_rtsp_stream_over_tcp_is_captured_and_reconnected_after_the_server_restarts(
        cams: Callable[..., Cam]) -> None:
    # The limits are upper bounds for a loaded machine (opening this stream takes about 2 s
    # idle, probing included), not expected times.
    server = RtspServer(fps=15).start(timeout=60)
    try:
        cam = cams(CameraConfig(source=server.url, fps=0, reconnect=FAST_RETRY,
                                stall_timeout=3.0, open_timeout=10.0))
        assert cam.pump(lambda: len(cam.seen) >= 10, timeout=60)
        assert {s.shape for s in cam.seen if s.shape} == {(240, 320, 3)}
        assert _udp_sockets(cam.runner.pid) == 0  # RTP interleaved in the TCP session
        n = len(cam.statuses)
        server.stop()  # a real stream loss
        assert cam.pump(lambda: any(not s.connected and s.error for s in cam.statuses[n:]),
                        timeout=30)
        lost = len(cam.statuses)
        restarted = time.time()
        server.start(timeout=60)
        # reconnected: a new session's status and its frames (not the old session's last ones;
        # a frame the ring lapped before this slow reader got to it has no shape)
        def new_frames() -> set:
            return {s.shape for s in cam.seen if s.ref.ts > restarted + 0.2 and s.shape}

        assert cam.pump(lambda: any(s.connected for s in cam.statuses[lost:])
                        and new_frames(), timeout=60)
        assert new_frames() == {(240, 320, 3)}
    finally:
        server.stop()


def test_credentials_in_a_source_url_never_reach_logs_or_status(
        cams: Callable[..., Cam], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lprd.capture")
    closed = MjpegServer()  # a port nothing listens on
    url = f"http://admin:s3cret@127.0.0.1:{closed.port}/stream.mjpg"
    cam = cams(CameraConfig(source=url, reconnect=FAST_RETRY), in_thread=True)
    assert cam.pump(lambda: len(caplog.records) >= 3, timeout=20)
    text = " ".join(r.getMessage() for r in caplog.records) + " ".join(cam.errors())
    assert "admin:***@127.0.0.1" in text and "s3cret" not in text
    assert redact_source("rtsp://u:p@h:554/x") == "rtsp://u:***@h:554/x"
    assert redact_source("/videos/a.mp4") == "/videos/a.mp4"


# -- pure helpers ---------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap_and_resets_after_success() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


def test_sources_are_told_apart_by_their_form() -> None:
    kinds = [source_kind(s).value for s in (
        "rtsp://cam/1", "http://cam/mjpg", "https://cam/mjpg", "/dev/video0",
        "/dev/v4l/by-id/usb-Cam_123-video-index0", "clip.mp4", "udp://0.0.0.0:1234",
        "RTMP://nvr/live", "srt://cam:9000", "file:///srv/clip.mp4", "my clip://x.mp4")]
    assert kinds == ["rtsp", "http", "http", "v4l2", "v4l2", "file", "stream", "stream",
                     "stream", "file", "file"]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_udp_mpeg_ts_stream_is_captured_as_a_live_stream(cams: Callable[..., Cam]) -> None:
    # udp:// passed check-config (FFmpeg's to open) but capture took it for a file name and
    # retried "file not found" forever.
    url = f"udp://127.0.0.1:{_free_udp_port()}"
    sender = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
         "testsrc=size=320x240:rate=10", "-t", "60", "-f", "mpegts", url],
        stdin=subprocess.DEVNULL)
    try:
        cam = cams(CameraConfig(source=url, reconnect=FAST_RETRY))
        assert cam.pump(lambda: len(cam.seen) >= 5, timeout=30), cam.errors()
        assert not any("file" in e for e in cam.errors())
        assert cam.seen[-1].shape == (240, 320, 3)
    finally:
        sender.kill()
        sender.wait()


def test_a_grab_that_waits_out_the_stall_timeout_is_a_stall_not_a_new_frame(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch) -> None:
    # FFmpeg after its read timeout on a frozen camera: after 5 grabs, each waits a timeout
    # and hands out a frame its decoder held (the first open only)
    def slow_after_5(n: int, cap: Any) -> bool:
        if n > 5:
            time.sleep(1.0)
        return bool(cap.grab())

    opened = _grab_by(monkeypatch, lambda k: slow_after_5 if k == 0 else lambda n, cap: cap.grab())
    cam = cams(CameraConfig(source=mjpeg.url, fps=0, stall_timeout=1.0, reconnect=FAST_RETRY),
               in_thread=True)
    assert cam.pump(lambda: any("stalled" in e for e in cam.errors()), timeout=10)
    # the first session published its 5 frames, none of the slow ones (stale, stamped now)
    first = [s for s in cam.seen if s.ref.seq <= 5]
    assert len(first) == 5 and opened[0].grabbed == 6
    assert cam.pump(lambda: len(opened) >= 2 and len(cam.seen) >= 8, timeout=10)  # reopened


def test_a_stream_that_drops_after_running_a_while_is_reopened_without_a_long_wait(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A proxy that cuts each session after a while: only a 60 s session reset the backoff, so
    # the camera climbed to the longest delay and stayed there, away a large part of the time.
    def hangs_up_after_1_5_s() -> Callable[[int, Any], bool]:  # counted from its first frame
        until: list[float] = []

        def rule(n: int, cap: Any) -> bool:
            ok = (not until or time.monotonic() < until[0]) and bool(cap.grab())
            if ok and not until:
                until.append(time.monotonic() + 1.5)
            return ok
        return rule

    _grab_by(monkeypatch, lambda k: hangs_up_after_1_5_s())
    caplog.set_level(logging.DEBUG, logger="lprd.capture")
    cam = cams(CameraConfig(source=mjpeg.url, fps=0, reconnect={"initial": 0.1, "max": 0.8}),
               in_thread=True)
    assert cam.pump(lambda: len(caplog.text.split("retrying in")) > 4, timeout=30)
    delays = _retry_delays(caplog.text)
    assert delays[:4] == [0.1, 0.1, 0.1, 0.1]


def test_a_stream_that_sends_a_frame_and_stalls_backs_off(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A session's length counted the wait for the stall: one frame and a stall_timeout made a
    # session that "ran" 10 times the delay, and the camera was retried every second for good.
    def freezes_after_2(n: int, cap: Any) -> bool:  # then a stall_timeout without a frame
        if n > 2:
            time.sleep(1.0)
            return False
        return bool(cap.grab())

    _grab_by(monkeypatch, lambda k: freezes_after_2)
    caplog.set_level(logging.DEBUG, logger="lprd.capture")
    cam = cams(CameraConfig(source=mjpeg.url, fps=0, stall_timeout=1.0,
                            reconnect={"initial": 0.1, "max": 0.8}), in_thread=True)
    assert cam.pump(lambda: len(caplog.text.split("retrying in")) > 4, timeout=40)
    delays = _retry_delays(caplog.text)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]


def test_an_unforeseen_capture_error_logs_its_traceback_only_when_loud(
        mjpeg: MjpegServer, cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import lprd.capture as capture_mod

    def broken(*a: Any) -> Any:
        raise RuntimeError("no decoder today")

    monkeypatch.setattr(capture_mod, "_open", broken)
    caplog.set_level(logging.DEBUG, logger="lprd.capture")
    cam = cams(CameraConfig(source=mjpeg.url, reconnect={"initial": 0.05, "max": 0.05}),
               in_thread=True)
    assert cam.pump(lambda: len(caplog.text.split("retrying in")) > 8, timeout=30)
    retries = [r for r in caplog.records if "retrying in" in r.message][:8]
    tracebacks = [r for r in caplog.records if r.exc_info and r.created <= retries[-1].created]
    assert len(tracebacks) == 4  # failures 1, 2, 4 and 8, not one a retry
    assert "capture failed: RuntimeError: no decoder today" in retries[0].message


def test_a_missing_v4l2_device_is_reported_as_missing(cams: Callable[..., Cam]) -> None:
    cam = cams(CameraConfig(source="/dev/video-lprd-test-none", reconnect=FAST_RETRY),
               in_thread=True)
    assert cam.pump(lambda: bool(cam.errors()), timeout=10)
    assert cam.errors()[0].startswith("no such device: /dev/video-lprd-test-none")


def test_ring_shape_fits_a_4_3_frame_at_max_width() -> None:
    assert ring_shape(CameraConfig(source="x", max_width=1920)) == (1440, 1920)


def test_a_v4l2_camera_is_asked_for_its_configured_size_or_max_width_at_16_9() -> None:
    # OpenCV opened every USB camera at 640x480: a 1080p camera's plates were read from VGA.
    # (What a real camera's driver makes of the request was not tried: no camera here.)
    assert v4l2_size(CameraConfig(source="/dev/video0")) == (1920, 1080)
    assert v4l2_size(CameraConfig(source="/dev/video0", max_width=1280)) == (1280, 720)
    assert v4l2_size(CameraConfig(source="/dev/video0", resolution=[1600, 1200])) == (1600, 1200)


def test_frame_refs_can_go_to_their_own_queue_and_eof_says_the_last_seq(
        tmp_path: Path) -> None:
    video = indexed_video(tmp_path / "clip.avi", 6)
    cfg = CameraConfig(source=str(video))
    ring = FrameRing.create(f"lprd-test-{uuid.uuid4().hex[:10]}", 4, *ring_shape(cfg))
    events: queue.Queue = queue.Queue()
    frames: queue.Queue = queue.Queue()
    stop = threading.Event()
    worker = threading.Thread(target=capture_main, args=("gate", cfg, ring.name, events, stop),
                              kwargs={"frames": frames})
    worker.start()
    try:
        refs = []
        while len(refs) < 6:
            ref = frames.get(timeout=20)
            refs.append(ref)
            ring.ack(ref.seq)
        worker.join(20)
        assert not worker.is_alive()
        assert all(isinstance(s, CaptureStatus | Alive) for s in events.queue)
        statuses = [s for s in events.queue if isinstance(s, CaptureStatus)]
        assert statuses[-1].eof and statuses[-1].seq == refs[-1].seq == 6
        assert all(isinstance(r, FrameRef) and r.camera == "gate" for r in refs)
        assert frames.empty()
    finally:
        stop.set()
        worker.join(10)
        ring.close()
        ring.unlink()


def test_lag_watch_reopens_only_a_stream_that_stays_behind() -> None:
    w = LagWatch(limit=3.0, hold=5.0)
    # a burst of buffered frames at the start, then frames as fast as the camera sends them
    assert not any(w.update(ms, t) for ms, t in ((40, 10.0), (80, 10.0), (120, 10.0),
                                                 (160, 10.04), (200, 10.08)))
    assert w.lag == pytest.approx(0.0, abs=1e-9)
    # a 3.5 s network hiccup, then the backlog drains (4 frames decoded per frame time): no
    # reopen
    assert not w.update(240, 13.6)
    assert not any(w.update(240 + 40 * i, 13.6 + 0.01 * i) for i in range(1, 130))
    assert w.lag < 0.1
    # a camera clock 0.4 % slower than ours, for an hour: no lag
    slow = LagWatch()
    assert not any(slow.update(1000 * i / 25, i / 25 * 1.004) for i in range(1, 90_000))
    # 20 frames a second decoded of a 25 fps stream: 0.2 s later each second, for good
    late = LagWatch(limit=3.0, hold=5.0)
    flags = [late.update(40 * i, 0.05 * i) for i in range(1, 1000)]
    first = flags.index(True)
    assert 0.05 * first == pytest.approx(3.0 / 0.195 + 5.0, abs=1.0)  # over 3 s, then 5 s more
    assert late.update(0, 60.0) is False  # no timestamps: no lag claimed


@pytest.mark.skipif(not rtsp_available(), reason="GStreamer RTSP server (Debian packages) missing")
def test_a_stream_decoded_slower_than_it_arrives_is_reopened_not_left_to_lag(
        cams: Callable[..., Cam], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A device that decodes 10 of the camera's 15 frames a second fell further behind for
    # good, every frame stamped later than it was taken.
    import lprd.capture as capture_mod

    real_open = capture_mod._open

    class SlowDecoder:
        def __init__(self, cap: Any) -> None:
            self.cap = cap

        def grab(self) -> bool:
            time.sleep(0.1)
            return self.cap.grab()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cap, name)

    monkeypatch.setattr(capture_mod, "_open", lambda *a: SlowDecoder(real_open(*a)))
    caplog.set_level(logging.INFO, logger="lprd.capture")
    server = RtspServer(fps=15).start(timeout=60)
    try:
        cam = cams(CameraConfig(source=server.url, fps=0, open_timeout=10.0), in_thread=True)
        assert cam.pump(lambda: "decoding stayed over 3 s behind the stream" in caplog.text,
                        timeout=90)
        n = len(cam.seen)
        assert cam.pump(lambda: len(cam.seen) > n + 5, timeout=30)  # reopened, frames again
        assert caplog.text.count("connected to") >= 2
    finally:
        server.stop()
