"""A per-camera frame ring in shared memory: one writer that never waits, zero-copy readers.

Each slot is a seqlock: the writer marks the slot busy, copies the pixels, then publishes the
sequence number; a reader checks the number before and after using the pixels to know it was lapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import TYPE_CHECKING

import numpy as np

from lprd.types import FrameRef

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

_MAGIC = 0x4C505252  # "LPRR"
_VERSION = 1
_CHANNELS = 3
_ALIGN = 64
_BUSY = -1  # slot seq while the writer is copying into it

# Ring header: int64 words.
_H_MAGIC, _H_VERSION, _H_SLOTS, _H_HEIGHT, _H_WIDTH, _H_STRIDE, _H_LAST, _H_ACKED, _H_WRITER = range(9)
_HEADER_BYTES = _ALIGN * 2
# Slot header: seq int64 @0, ts float64 @8, height int32 @16, width int32 @20, motion int32 @24.
_SLOT_HEADER_BYTES = _ALIGN

_attach_lock = threading.Lock()


class Lapped(Exception):
    """The writer has overwritten (or is overwriting) the slot of the frame asked for."""

    def __init__(self, seq: int, found: int):
        self.seq = seq
        self.found = found
        super().__init__(f"frame {seq} was lapped (slot now holds {found})")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """What the ring knows about one frame; the pixels stay in the slot."""

    seq: int
    ts: float  # capture time, epoch seconds (clip time for files)
    width: int
    height: int
    motion: bool  # False: the motion gate saw nothing; the inference stage may skip it

    def ref(self, camera: str) -> FrameRef:
        return FrameRef(camera=camera, seq=self.seq, ts=self.ts, width=self.width,
                        height=self.height)


def ring_name(camera: str, token: str, pid: int | None = None) -> str:
    """A shared-memory name unique to this daemon (`token`: random per run) and camera; it
    lives in /dev/shm on Linux. The pid leads, for `remove_stale_rings`."""
    return f"lprd-{os.getpid() if pid is None else pid}-{token}-{camera}"


def remove_stale_rings() -> list[str]:
    """Unlink the rings in /dev/shm that an lprd killed before it could left behind; returns
    their paths. A live ring's creator holds a lock on it (`FrameRing.create`), which a lock
    test sees across pid namespaces, where pids say nothing. An unlocked ring is stale when its
    pid is gone or is this process's (a container's lprd is pid 1 at every start); one of
    another live pid may be one just made, not yet locked, and stays."""
    removed = []
    for path in glob.glob("/dev/shm/lprd-*-*"):
        pid = os.path.basename(path).split("-")[1]
        if not pid.isdigit():
            continue
        if os.path.exists(f"/proc/{pid}") and int(pid) != os.getpid():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            # one just made is not locked yet (another pid namespace's pid looks gone)
            if time.time() - os.fstat(fd).st_mtime >= FRESH_RING:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(path)
                removed.append(path)
        except OSError:  # locked: its creator lives (or it is gone already)
            pass
        finally:
            os.close(fd)
    return removed


FRESH_RING = 10.0  # s: younger segments are left to their creator, which locks them at once


def _lock_segment(name: str) -> int | None:
    """A shared lock on the segment, held while its creator lives (`remove_stale_rings`)."""
    if not os.path.isdir("/dev/shm"):  # not Linux: no stale-ring cleanup either
        return None
    fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDONLY)  # OSError: gone already
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    # Before 3.13 every attach registers with the resource tracker, which then unlinks the
    # segment when the attaching process exits (or warns of a leak): only the creator owns it.
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


def _take_pages(name: str, ranges: list[tuple[int, int]]) -> None:
    """posix_fallocate each (offset, length) of the segment: OSError where /dev/shm has no
    room, instead of SIGBUS at the first write to a sparse page."""
    path = f"/dev/shm/{name.lstrip('/')}"
    if not os.path.exists(path):  # Linux has it; elsewhere the segment stays sparse
        return
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in ranges:
            os.posix_fallocate(fd, offset, length)
    finally:
        os.close(fd)


class FrameRing:
    """Fixed slots of up to height*width*3 bytes of BGR pixels each, addressed by sequence number.

    Sequence numbers start at 1 and grow forever (across writer restarts); seq n lives in slot
    n % slots. One writer process, any number of readers; one consumer acknowledges frames with
    `ack` when the writer runs flow-controlled (files analysed frame by frame).
    """

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm = shm
        self._owner = owner
        self.name = shm.name
        hdr = np.ndarray((_HEADER_BYTES // 8,), dtype=np.int64, buffer=shm.buf)
        if hdr[_H_MAGIC] != _MAGIC or hdr[_H_VERSION] != _VERSION:
            raise ValueError(f"shared memory {shm.name!r} is not an lprd frame ring")
        self._hdr = hdr
        self.slots = int(hdr[_H_SLOTS])
        self.height = int(hdr[_H_HEIGHT])
        self.width = int(hdr[_H_WIDTH])
        self.capacity = self.height * self.width * _CHANNELS  # pixel bytes per slot
        stride = self._stride = int(hdr[_H_STRIDE])
        self._reserved = 0  # pixel bytes of every slot taken in /dev/shm by this writer
        self._lock_fd: int | None = None  # the creator's (`create`)
        need = _HEADER_BYTES + stride * self.slots
        if shm.size < need:
            raise ValueError(f"shared memory {shm.name!r} is {shm.size} bytes, ring needs {need}")
        buf = shm.buf

        def field(offset: int, dtype: type) -> np.ndarray:
            # One element per slot, strided across slots: aligned loads and stores.
            return np.ndarray((self.slots,), dtype=dtype, buffer=buf,
                              offset=_HEADER_BYTES + offset, strides=(stride,))

        self._seq = field(0, np.int64)
        self._ts = field(8, np.float64)
        self._h = field(16, np.int32)
        self._w = field(20, np.int32)
        self._motion = field(24, np.int32)
        self._pixels = [
            np.ndarray((self.capacity,), dtype=np.uint8, buffer=buf,
                       offset=_HEADER_BYTES + i * stride + _SLOT_HEADER_BYTES)
            for i in range(self.slots)
        ]

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, slots: int, height: int, width: int) -> FrameRing:
        """Create the segment (fails if `name` exists). Slot capacity is height*width*3 bytes."""
        if slots < 2:
            raise ValueError("a ring needs at least 2 slots")
        if height < 1 or width < 1:
            raise ValueError("height and width must be positive")
        stride = _SLOT_HEADER_BYTES + _round_up(height * width * _CHANNELS)
        shm = shared_memory.SharedMemory(name=name, create=True,
                                         size=_HEADER_BYTES + stride * slots)
        try:  # the headers' pages, written below: SIGBUS, not an error, where /dev/shm is full
            _take_pages(shm.name, [(0, _HEADER_BYTES)] + [
                (_HEADER_BYTES + i * stride, _SLOT_HEADER_BYTES) for i in range(slots)])
        except OSError as e:
            shm.close()
            shm.unlink()
            raise OSError(e.errno, f"/dev/shm has no room for a frame ring ({e.strerror}): "
                          "give /dev/shm more room") from None
        hdr = np.ndarray((_HEADER_BYTES // 8,), dtype=np.int64, buffer=shm.buf)
        hdr[:] = 0
        hdr[_H_SLOTS], hdr[_H_HEIGHT], hdr[_H_WIDTH], hdr[_H_STRIDE] = slots, height, width, stride
        hdr[_H_VERSION] = _VERSION
        hdr[_H_MAGIC] = _MAGIC  # last: an attacher never sees a half-made header as valid
        for i in range(slots):  # only the headers: pixel pages stay untouched until written
            np.ndarray((2,), dtype=np.int64, buffer=shm.buf, offset=_HEADER_BYTES + i * stride)[:] = 0
        del hdr
        ring = cls(shm, owner=True)
        try:
            ring._lock_fd = _lock_segment(shm.name)
        except OSError:
            ring.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
            raise
        return ring

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        """Open an existing ring by name; this process will not unlink it on exit."""
        return cls(_attach_untracked(name), owner=False)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Drop this process's mapping. Views handed out must be released first."""
        self._unlock()
        for a in ("_hdr", "_seq", "_ts", "_h", "_w", "_motion", "_pixels"):
            self.__dict__.pop(a, None)
        try:
            self._shm.close()
        except BufferError:
            # A caller still holds a frame view; the mapping goes when that view is freed.
            log.debug("ring %s: views still alive at close", self.name)

    def unlink(self) -> None:
        """Remove the segment's name (creator only, at shutdown); mappings stay valid."""
        self._unlock()
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer ---------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The newest published sequence number (0: nothing written yet)."""
        return int(self._hdr[_H_LAST])

    def fits(self, height: int, width: int) -> bool:
        return height * width * _CHANNELS <= self.capacity

    def write(self, frame: np.ndarray, ts: float, motion: bool = True) -> int:
        """Copy a BGR uint8 frame into the next slot and publish it; never waits. Returns its seq."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != _CHANNELS:
            raise ValueError(f"expected an HxWx3 uint8 frame, got {frame.shape} {frame.dtype}")
        h, w = frame.shape[:2]
        if not self.fits(h, w):
            raise ValueError(f"frame {w}x{h} does not fit a slot of {self.capacity} bytes "
                             "(scale it down first)")
        if h * w * _CHANNELS > self._reserved:
            self._reserve(h * w * _CHANNELS)
        seq = self.last_seq + 1
        i = seq % self.slots
        # Seqlock order: busy mark, pixels, fields, seq. Each store is one aligned 8-byte write;
        # the interpreter's work between them is far longer than any store-buffer delay.
        self._seq[i] = _BUSY
        self._pixels[i][: h * w * _CHANNELS].reshape(h, w, _CHANNELS)[...] = frame
        self._ts[i] = ts
        self._h[i] = h
        self._w[i] = w
        self._motion[i] = 1 if motion else 0
        self._seq[i] = seq
        self._hdr[_H_LAST] = seq
        self._hdr[_H_WRITER] = os.getpid()
        return seq

    def _reserve(self, nbytes: int) -> None:
        """Take /dev/shm's pages for `nbytes` of every slot before they are written. The
        segment is sparse: written where /dev/shm has no room left, its pages kill the writer
        with SIGBUS (Docker's default /dev/shm is 64 MiB). Only what the camera's frames use is
        taken: a ring is sized for max_width, a substream fills a small part of it."""
        try:
            _take_pages(self._shm.name, [(_HEADER_BYTES + i * self._stride,
                                          _SLOT_HEADER_BYTES + nbytes) for i in range(self.slots)])
        except OSError as e:
            need = self.slots * (_SLOT_HEADER_BYTES + nbytes) / 2**20
            raise OSError(e.errno, f"/dev/shm has no room for this camera's frame ring "
                          f"({need:.0f} MiB for {self.slots} frames; {e.strerror}): "
                          "give /dev/shm more room, or lower max_width or ring_slots") from None
        self._reserved = nbytes

    def has_room(self) -> bool:
        """Whether the next write would overwrite only frames the consumer has acknowledged."""
        return self.last_seq + 1 - self.slots <= int(self._hdr[_H_ACKED])

    def wait_room(self, timeout: float) -> bool:
        """Flow control for files: wait up to `timeout` s for `has_room`. Live sources never wait."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not self.has_room():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.01)
        return True

    # -- readers --------------------------------------------------------------------------------

    @property
    def acked(self) -> int:
        return int(self._hdr[_H_ACKED])

    def ack(self, seq: int) -> None:
        """The consumer is done with every frame up to `seq`: a flow-controlled writer may reuse them."""
        if seq > int(self._hdr[_H_ACKED]):
            self._hdr[_H_ACKED] = seq

    def get(self, seq: int) -> tuple[FrameHeader, np.ndarray]:
        """The frame `seq` as (header, read-only view into the slot); raises Lapped if it is gone.

        The view is not a copy: call `check(seq)` after using it (or use `copy`) to know the
        writer did not overwrite it meanwhile.
        """
        if seq < 1 or seq > self.last_seq:
            raise ValueError(f"frame {seq} has not been written (newest is {self.last_seq})")
        i = seq % self.slots
        found = int(self._seq[i])
        if found != seq:
            raise Lapped(seq, found)
        h, w = int(self._h[i]), int(self._w[i])
        header = FrameHeader(seq=seq, ts=float(self._ts[i]), width=w, height=h,
                             motion=bool(self._motion[i]))
        found = int(self._seq[i])
        if found != seq:
            raise Lapped(seq, found)
        view = self._pixels[i][: h * w * _CHANNELS].reshape(h, w, _CHANNELS)
        view.flags.writeable = False
        return header, view

    def check(self, seq: int) -> None:
        """Raise Lapped if frame `seq`'s slot was overwritten since `get` (or is being written)."""
        found = int(self._seq[seq % self.slots])
        if found != seq:
            raise Lapped(seq, found)

    def valid(self, seq: int) -> bool:
        return int(self._seq[seq % self.slots]) == seq

    def latest(self) -> tuple[FrameHeader, np.ndarray] | None:
        """The newest frame as (header, view), or None before the first write."""
        for _ in range(8):
            seq = self.last_seq
            if seq == 0:
                return None
            try:
                return self.get(seq)
            except Lapped:
                continue  # the writer went round the whole ring meanwhile: take the new newest
        return None

    def copy(self, seq: int, motion_only: bool = False) -> tuple[FrameHeader, np.ndarray | None]:
        """An owned copy of frame `seq`, verified untorn; raises Lapped. With `motion_only`, a
        frame without motion is not copied (None): it will not be analysed."""
        header, view = self.get(seq)
        frame = view.copy() if header.motion or not motion_only else None
        self.check(seq)
        return header, frame
