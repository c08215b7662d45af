"""Typed records that cross stage and process boundaries (never plain dicts)."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

EVENT_SCHEMA = 1

Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the frame


def iso_utc(ts: float) -> str:
    """Epoch seconds as the event's ISO 8601 form, milliseconds and a Z."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, slots=True)
class FilePosition:
    """Where a file camera's capture stands after a frame: a restarted capture goes on from here."""

    t0: float  # wall time given to the clip's frame 0: frame times go on where they were
    index: int  # frames decoded so far, across loops
    pos: int  # frames into the current pass of the file
    base: float = 0.0  # clip seconds at the start of the current pass (the loops before it)
    last: float = -1.0  # clip seconds of the last frame (-1: none yet)


@dataclass(frozen=True, slots=True)
class FrameRef:
    """Announces a frame written to a camera's ring; the pixels stay in shared memory."""

    camera: str
    seq: int
    ts: float  # capture time, epoch seconds
    width: int
    height: int
    file: FilePosition | None = None  # files only: the position after this frame


@dataclass(frozen=True, slots=True)
class Detection:
    box: Box
    score: float
    cut: bool = False  # its raw box reaches the edge of the part searched (frame or ROI)


@dataclass(frozen=True, slots=True)
class CharProb:
    c: str
    p: float


@dataclass(frozen=True, slots=True)
class Candidate:
    plate: str
    confidence: float


@dataclass(frozen=True, slots=True)
class Read:
    """What the reader made of one crop."""

    text: str
    confidence: float
    chars: tuple[CharProb, ...]
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True, slots=True)
class Observation:
    """One plate read in one frame."""

    camera: str
    seq: int
    ts: float
    box: Box
    frame_size: tuple[int, int]
    det_score: float
    read: Read
    crop_jpeg: bytes | None = None
    cut: bool = False  # the plate runs out of the part searched (the detector's raw box says)


@dataclass(frozen=True, slots=True)
class WatchlistMatch:
    match: str  # "exact" | "fuzzy" | "none"
    plate: str | None = None
    distance: float = 0.0
    list: str | None = None
    action: str | None = None
    info: dict = field(default_factory=dict)
    via: str = "read"  # "read" or "candidate": which string matched

    @staticmethod
    def none() -> WatchlistMatch:
        return WatchlistMatch(match="none")


@dataclass(frozen=True, slots=True)
class PlateEvent:
    """One event per vehicle pass (an early one and a final one share the id)."""

    id: str
    camera: str
    plate: str
    confidence: float
    chars: tuple[CharProb, ...]
    candidates: tuple[Candidate, ...]
    first_seen: float
    last_seen: float
    frames: int
    final: bool
    box: Box
    frame_size: tuple[int, int]
    watchlist: WatchlistMatch = field(default_factory=WatchlistMatch.none)
    crop_jpeg: bytes | None = None
    models: dict = field(default_factory=dict)
    early_plate: str | None = None  # a final event's: its early event said this other plate
    schema: int = EVENT_SCHEMA

    def to_dict(self) -> dict:
        d = {
            "schema": self.schema,
            "id": self.id,
            "camera": self.camera,
            "plate": self.plate,
            "confidence": round(self.confidence, 4),
            "chars": [{"c": c.c, "p": round(c.p, 4)} for c in self.chars],
            "candidates": [
                {"plate": c.plate, "confidence": round(c.confidence, 4)} for c in self.candidates
            ],
            "first_seen": iso_utc(self.first_seen),
            "last_seen": iso_utc(self.last_seen),
            "frames": self.frames,
            "final": self.final,
            "box": list(self.box),
            "frame_size": list(self.frame_size),
            "watchlist": asdict(self.watchlist),
            "models": dict(self.models),
        }
        if self.early_plate is not None:
            d["early_plate"] = self.early_plate
        if self.crop_jpeg is not None:
            d["crop_jpeg"] = base64.b64encode(self.crop_jpeg).decode("ascii")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class CameraState:
    """What `<prefix>/<camera>/state` says (retained)."""

    camera: str
    connected: bool
    fps: float = 0.0
    last_frame: float | None = None  # epoch seconds
    error: str | None = None
    outbox_depth: int = 0

    def to_dict(self) -> dict:
        return {
            "connected": self.connected,
            "fps": round(self.fps, 2),
            "last_frame": iso_utc(self.last_frame) if self.last_frame else None,
            "error": self.error,
            "outbox_depth": self.outbox_depth,
        }
