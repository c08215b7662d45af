"""Steps of the wall clock (NTP correcting it, an RTC-less box syncing after boot).

Frames and outbox messages are stamped with wall-clock time; whoever ages things by those
stamps shifts them by each step, so that a step neither ends nor stretches what it measures.
"""

from __future__ import annotations

import time

CLOCK_STEP = 2.0  # s: the wall clock moved this much more or less than the monotonic clock


def since_boot() -> float:
    """A monotonic clock that goes on while the system is suspended (CLOCK_MONOTONIC stops:
    an hour asleep looked like a step of the wall clock, and an hour-old allow as fresh)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ClockWatch:
    """Notices steps of the wall clock against the monotonic one (since_boot)."""

    def __init__(self, wall: float | None = None, mono: float | None = None):
        self._wall = time.time() if wall is None else wall
        self._mono = since_boot() if mono is None else mono
        self.elapsed = 0.0

    def step(self, wall: float | None = None, mono: float | None = None) -> float:
        """Seconds the wall clock jumped since the last call (0.0 when it only ticked)."""
        wall = time.time() if wall is None else wall
        mono = since_boot() if mono is None else mono
        jump = (wall - self._wall) - (mono - self._mono)
        self.elapsed = mono - self._mono  # the span this call looked at
        self._wall, self._mono = wall, mono
        return jump if abs(jump) >= CLOCK_STEP else 0.0
