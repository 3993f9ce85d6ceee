"""A stream's recent captioned windows, for questions about "now" or a recent media time.

The ring hands frames over and keeps none, so a question about a past moment
needs the window itself: its frames (references: overlapping windows share
Frame objects) and its caption. `WindowHistory` keeps the windows captioned
over the stream's `history` horizon (media seconds), at most
ceil(history / hop) + 1 of them, and says which ones it lets go, so that the
engine's image keys/values of those windows are freed with them. Pure: no
torch, no engine, no clock but media time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from streamer.types import Caption, Window

__all__ = ["HistoryEntry", "OutOfHistory", "WindowHistory"]


class OutOfHistory(ValueError):
    """A question asked about a media time the stream's history does not hold (or before any window
    was captioned)."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    window: Window
    caption: Caption


class WindowHistory:
    def __init__(self, stream_id: str, horizon: float, hop: float) -> None:
        if horizon < 0 or hop <= 0:
            raise ValueError("history horizon must be >= 0 and hop > 0")
        self.stream_id = stream_id
        self.horizon = horizon
        self.hop = hop
        self.capacity = math.ceil(horizon / hop) + 1
        self._entries: deque[HistoryEntry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[HistoryEntry]:
        """Oldest first."""
        return list(self._entries)

    def add(self, window: Window, caption: Caption) -> list[Window]:
        """Remember a captioned window; returns the windows that left the history (freed by the caller)."""
        self._entries.append(HistoryEntry(window, caption))
        gone: list[Window] = []
        newest_end = window.end
        while len(self._entries) > self.capacity or (
            len(self._entries) > 1 and self._entries[0].window.end < newest_end - self.horizon
        ):
            gone.append(self._entries.popleft().window)
        return gone

    def clear(self) -> list[Window]:
        gone = [e.window for e in self._entries]
        self._entries.clear()
        return gone

    def newest(self) -> HistoryEntry:
        if not self._entries:
            raise OutOfHistory(f"stream {self.stream_id!r} has no captioned window yet; ask again shortly")
        return self._entries[-1]

    def span(self) -> tuple[float, float] | None:
        """(start of the oldest window, end of the newest), media seconds; None when empty."""
        if not self._entries:
            return None
        return self._entries[0].window.start, self._entries[-1].window.end

    def at(self, media_time: float) -> HistoryEntry:
        """The window about `media_time`: of those whose [start, end] holds it, the one whose middle
        is nearest (the newer on a tie); else the closest one within a hop of it."""
        if not math.isfinite(media_time):
            raise OutOfHistory(f"at must be a finite media time, got {media_time!r}")
        entries = list(self._entries)
        if not entries:
            self.newest()  # raises: nothing captioned yet
        holding = [e for e in entries if e.window.start <= media_time <= e.window.end]
        if holding:
            return min(reversed(holding), key=lambda e: abs((e.window.start + e.window.end) / 2 - media_time))
        gap, closest = min(((_gap(e.window, media_time), e) for e in reversed(entries)), key=lambda g: g[0])
        if gap <= self.hop:
            return closest
        start, end = self.span() or (0.0, 0.0)
        raise OutOfHistory(f"at={media_time:g} s is outside stream {self.stream_id!r}'s history, which holds "
                           f"media {start:.3f}-{end:.3f} s")


def _gap(window: Window, media_time: float) -> float:
    return window.start - media_time if media_time < window.start else media_time - window.end
