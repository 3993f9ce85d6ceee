"""Source lifecycle states and the retry schedule between connection attempts."""

from __future__ import annotations

import enum
import random

__all__ = ["SourceState", "Backoff"]


class SourceState(str, enum.Enum):
    """Where a live source stands. The str value is what logs and APIs show."""

    CONNECTING = "connecting"  # first attempt to open, nothing received yet
    LIVE = "live"  # frames are flowing
    STALLED = "stalled"  # connected, but no frame for stall_timeout seconds
    RECONNECTING = "reconnecting"  # lost or never got a connection; waiting to retry
    FAILED = "failed"  # gave up (max_retries spent, or an error retrying cannot fix)
    STOPPED = "stopped"  # stopped by its owner, or a file played to its end

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        return self in (SourceState.FAILED, SourceState.STOPPED)


class Backoff:
    """Capped exponential backoff with jitter.

    Delays grow initial, initial*factor, ... up to `cap`; each is spread by
    +-`jitter` (a fraction) so that many sources cut off by the same outage do
    not all reconnect in the same instant. Pure: pass `rng` for repeatable tests.
    """

    def __init__(
        self,
        initial: float = 0.5,
        factor: float = 2.0,
        cap: float = 30.0,
        jitter: float = 0.2,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0:
            raise ValueError(f"backoff initial delay must be > 0, got {initial}")
        if factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {factor}")
        if cap < initial:
            raise ValueError(f"backoff cap ({cap}) must be >= initial delay ({initial})")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._base = initial
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempts

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; never above `cap`."""
        base = self._base
        # Grow the base instead of computing factor**n: no overflow after days of retries.
        self._base = min(self.cap, self._base * self.factor)
        self._attempts += 1
        spread = self._rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return min(self.cap, base * (1.0 + spread))

    def reset(self) -> None:
        """Start again from `initial` (call once a connection works again)."""
        self._base = self.initial
        self._attempts = 0

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, factor={self.factor}, cap={self.cap}, "
            f"jitter={self.jitter}, attempts={self._attempts})"
        )
