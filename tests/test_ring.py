"""The shared-memory frame ring: zero-copy reads, lapping, flow control, other processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lprd.ring import FrameRing, Lapped, ring_name


def _name() -> str:
    return f"lprd-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ring() -> Iterator[FrameRing]:
    r = FrameRing.create(_name(), slots=4, height=48, width=64)
    yield r
    r.close()
    r.unlink()


def _frame(value: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), value % 256, np.uint8)


def test_read_is_a_view_into_shared_memory_not_a_copy(ring: FrameRing) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    seq = ring.write(frame, ts=123.5, motion=False)
    header, view = ring.get(seq)
    assert (header.seq, header.ts, header.width, header.height, header.motion) == (
        seq, 123.5, 60, 40, False)
    np.testing.assert_array_equal(view, frame)
    assert not view.flags.owndata and not view.flags.writeable
    # The same memory as the slot: a later write to that slot shows through the old view.
    for i in range(ring.slots):
        ring.write(_frame(i + 1, 40, 60), ts=0.0)
    assert not np.array_equal(view, frame)
    with pytest.raises(Lapped):
        ring.check(seq)


def test_copy_owns_its_pixels_and_skips_still_frames_when_asked(ring: FrameRing) -> None:
    still = ring.write(_frame(7), ts=1.0, motion=False)
    moving = ring.write(_frame(9), ts=2.0, motion=True)
    header, frame = ring.copy(still, motion_only=True)
    assert header.seq == still and not header.motion and frame is None
    header, frame = ring.copy(still)
    assert frame is not None and frame.flags.owndata and int(frame[0, 0, 0]) == 7
    header, frame = ring.copy(moving, motion_only=True)
    assert header.motion and frame is not None and int(frame[0, 0, 0]) == 9


def test_sequence_numbers_start_at_one_and_latest_is_newest(ring: FrameRing) -> None:
    assert ring.latest() is None
    seqs = [ring.write(_frame(i), ts=float(i)) for i in range(10)]
    assert seqs == list(range(1, 11))
    header, view = ring.latest()  # type: ignore[misc]
    assert header.seq == 10 and header.ts == 9.0 and int(view[0, 0, 0]) == 9


def test_reader_that_was_lapped_is_told_so(ring: FrameRing) -> None:
    first = ring.write(_frame(1), ts=1.0)
    header, _view = ring.get(first)
    for i in range(ring.slots):  # the writer goes round the ring without waiting
        ring.write(_frame(50 + i), ts=2.0 + i)
    assert not ring.valid(first)
    with pytest.raises(Lapped) as e:
        ring.check(header.seq)
    assert e.value.seq == first and e.value.found == first + ring.slots
    with pytest.raises(Lapped):
        ring.get(first)
    # Frames still in the ring are readable.
    newest = ring.last_seq
    assert int(ring.get(newest - ring.slots + 1)[1][0, 0, 0]) == 50


def test_frames_of_different_sizes_share_the_ring(ring: FrameRing) -> None:
    a = ring.write(_frame(7, 48, 64), ts=0.0)
    b = ring.write(_frame(9, 64, 48), ts=0.0)  # portrait, same bytes
    c = ring.write(_frame(11, 10, 10), ts=0.0)
    assert ring.get(a)[1].shape == (48, 64, 3)
    assert ring.get(b)[1].shape == (64, 48, 3)
    assert ring.get(c)[1].shape == (10, 10, 3)


def test_frame_larger_than_a_slot_is_refused_with_a_clear_error(ring: FrameRing) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ring.write(_frame(1, 49, 64), ts=0.0)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        ring.write(np.zeros((8, 8), np.uint8), ts=0.0)
    with pytest.raises(ValueError, match="not been written"):
        ring.get(1)


def test_flow_control_room_follows_the_consumers_acks(ring: FrameRing) -> None:
    for i in range(ring.slots):
        assert ring.has_room()
        ring.write(_frame(i), ts=0.0)
    assert not ring.has_room()  # the next write would overwrite seq 1, not yet acknowledged
    t = time.monotonic()
    assert not ring.wait_room(0.05)
    assert time.monotonic() - t >= 0.05
    ring.ack(1)
    assert ring.wait_room(0.0)
    ring.ack(1)  # acks never go backwards
    ring.ack(0)
    assert ring.acked == 1


def test_attaching_to_a_name_that_is_not_a_ring_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FrameRing.attach(_name())


def test_ring_names_are_per_daemon_and_camera() -> None:
    assert ring_name("gate-1", "a1b2c3", pid=42) == "lprd-42-a1b2c3-gate-1"


_LEAVE_A_RING = """
import os, sys, time
from multiprocessing import resource_tracker
from lprd.ring import FrameRing
ring = FrameRing.create(sys.argv[1], 2, 4, 4)
resource_tracker.unregister(ring._shm._name, "shared_memory")  # as after a SIGKILL
print("made", flush=True)
if sys.argv[2] == "live":
    time.sleep(60)
os._exit(0)
"""


def _other_process_ring(name: str, live: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _LEAVE_A_RING, name, "live" if live else ""],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "made\n"
    if not live:
        proc.wait(10)
    return proc


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux /dev/shm")
def test_stale_rings_go_and_live_ones_stay_whatever_their_pid() -> None:
    from lprd.ring import remove_stale_rings

    gone_pid = next(p for p in range(4_000_000, 3_000_000, -1) if not os.path.exists(f"/proc/{p}"))
    tag = uuid.uuid4().hex[:8]
    dead = f"lprd-{gone_pid}-{tag}-dead"
    mine = f"lprd-{os.getpid()}-{tag}-mine"  # a container's lprd: pid 1 again after a restart
    foreign = f"lprd-{gone_pid}-{tag}-foreign"  # a live lprd of another pid namespace
    fresh = f"lprd-1-{tag}-fresh"  # of a live pid, unlocked: just made, not yet locked
    for name in (dead, mine, fresh):
        _other_process_ring(name)
    live = _other_process_ring(foreign, live=True)
    own = FrameRing.create(f"lprd-{os.getpid()}-{tag}-own", 2, 4, 4)  # this process's, live
    young = f"lprd-{gone_pid}-{tag}-young"  # just made by another, its lock not yet taken
    _other_process_ring(young)
    old = time.time() - 60
    for name in (dead, mine, fresh, foreign, own.name):
        os.utime(f"/dev/shm/{name}", (old, old))
    try:
        removed = remove_stale_rings()
        assert f"/dev/shm/{dead}" in removed and f"/dev/shm/{mine}" in removed
        for name in (dead, mine):
            assert not os.path.exists(f"/dev/shm/{name}")
        for name in (foreign, fresh, own.name, young):
            assert os.path.exists(f"/dev/shm/{name}")
        live.kill()
        live.wait(10)
        assert f"/dev/shm/{foreign}" in remove_stale_rings()  # its lock went with it
    finally:
        live.kill()
        own.close()
        own.unlink()
        for name in (dead, mine, foreign, fresh, young):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")


# -- across processes ---------------------------------------------------------------------------

def _reader_child(name: str, results: mp.Queue) -> None:
    ring = FrameRing.attach(name)
    try:
        header, view = ring.get(ring.last_seq)
        results.put((header.seq, header.ts, int(view.sum()), view.shape))
    finally:
        ring.close()


def test_another_process_reads_frames_by_name_and_leaves_the_ring_in_place() -> None:
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(_name(), slots=3, height=48, width=64)
    try:
        frame = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        seq = ring.write(frame, ts=77.25)
        results = ctx.Queue()
        child = ctx.Process(target=_reader_child, args=(ring.name, results))
        child.start()
        got = results.get(timeout=30)
        child.join(10)
        assert child.exitcode == 0
        assert got == (seq, 77.25, int(frame.sum()), (30, 40, 3))
        # The child's exit did not unlink the segment: it can be attached again.
        again = FrameRing.attach(ring.name)
        assert again.last_seq == seq
        again.close()
    finally:
        ring.close()
        ring.unlink()


def _fast_writer(name: str, stop: mp.Event, started: mp.Event) -> None:
    ring = FrameRing.attach(name)
    try:
        frames = [np.full((120, 160, 3), v, np.uint8) for v in range(256)]
        started.set()
        # Bursts flat out, then short pauses: a loaded machine still gives the reader both
        # lapped reads (during bursts) and clean ones (during pauses).
        while not stop.is_set():
            burst_end = time.monotonic() + 0.005
            while time.monotonic() < burst_end:
                seq = ring.last_seq + 1
                ring.write(frames[seq % 256], ts=float(seq))
            time.sleep(0.003)
    finally:
        ring.close()


def test_reader_never_accepts_a_torn_frame_from_a_writer_lapping_it() -> None:
    """A writer process laps a 2-slot ring in bursts; every frame the reader accepts (copy, then
    check) holds one value throughout, the one its sequence number says."""
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(_name(), slots=2, height=120, width=160)
    stop, started = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_fast_writer, args=(ring.name, stop, started))
    writer.start()
    accepted = lapped = 0
    try:
        assert started.wait(30)
        end = time.monotonic() + 20
        while time.monotonic() < end and (accepted < 50 or lapped < 50):
            seq = ring.last_seq
            if seq == 0:
                continue
            try:
                _, view = ring.get(seq)
                top = view[:60].copy()
                time.sleep(0.0005)  # a slow consumer: the writer laps it often
                frame = np.concatenate([top, view[60:]])
                ring.check(seq)
            except Lapped:
                lapped += 1
                continue
            accepted += 1
            assert frame.min() == frame.max() == seq % 256, f"torn frame {seq}"
    finally:
        stop.set()
        writer.join(10)
        ring.close()
        ring.unlink()
    assert writer.exitcode == 0
    assert accepted > 0 and lapped > 0


def test_a_frame_dev_shm_cannot_hold_is_an_error_not_a_crash(
        ring: FrameRing, monkeypatch: pytest.MonkeyPatch) -> None:
    # The segment is sparse: written where /dev/shm has no room, its pages killed the writer
    # with SIGBUS (Docker's default /dev/shm is 64 MiB). The pages are taken before the write.
    taken: list[tuple[int, int]] = []
    real = os.posix_fallocate
    monkeypatch.setattr("lprd.ring.os.posix_fallocate",
                        lambda fd, off, n: (taken.append((off, n)), real(fd, off, n)))
    ring.write(_frame(1, 24, 32), ts=1.0)  # a small frame takes only its own size per slot
    assert len(taken) == ring.slots and {n for _, n in taken} == {64 + 24 * 32 * 3}
    ring.write(_frame(2, 24, 32), ts=2.0)
    assert len(taken) == ring.slots  # taken once

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lprd.ring.os.posix_fallocate", full)
    with pytest.raises(OSError, match=r"/dev/shm has no room for this camera's frame ring"):
        ring.write(_frame(3), ts=3.0)  # a larger frame needs more
    assert ring.last_seq == 2


def _can_mount_private_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(),
                    reason="needs root and unshare -m to give a process a tiny /dev/shm")
def test_a_full_dev_shm_is_an_error_at_creation_not_a_bus_error() -> None:
    # The segment is sparse: its header pages, written at creation, killed the creator (the
    # supervisor, so the daemon) with SIGBUS where /dev/shm had no room.
    code = ("from lprd.ring import FrameRing\n"
            "import os\n"
            "try:\n"
            "    FrameRing.create('lprd-test-full', slots=8, height=480, width=640)\n"
            "except OSError as e:\n"
            "    print(e)\n"
            "    print(os.listdir('/dev/shm'))\n")
    shell = f"mount -t tmpfs -o size=16k tmpfs /dev/shm && exec {sys.executable} -c \"{code}\""
    run = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert "/dev/shm has no room for a frame ring" in run.stdout
    assert run.stdout.strip().endswith("[]")  # the segment was removed again
