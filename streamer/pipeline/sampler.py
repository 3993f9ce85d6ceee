"""Sliding-window frame sampler: N frames over W seconds, a new window every H seconds.

A pure state machine (no I/O, no clocks): `feed(frame)` returns the windows that
frame completes, `flush()` the ones the end of the stream completes. Files and
live streams share it.

Sampling happens on a grid fixed at the first frame: slot j covers media time
[t0 + j*W/N, t0 + (j+1)*W/N) and is represented by the frame nearest its centre.
Window k uses slots ceil(k*H*N/W) .. +N-1. Because every window picks from the
same grid, overlapping windows pick the very same Frame objects (with W=3 s,
N=6, H=1 s, four of six frames are shared with the previous window) and the
engine encodes each of them once. Nearest-by-pts selection makes variable
frame rate, gaps and streams that do not start at 0 come out right.

Memory is bounded: only frames chosen for slots that a future window still
needs are kept, plus the latest frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamer.types import Frame, Window

__all__ = ["SamplerConfig", "WindowSampler"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    window: float = 3.0  # W, seconds of media per caption
    frames: int = 6  # N, frames the model sees per window
    hop: float = 1.0  # H, seconds between window starts

    def __post_init__(self) -> None:
        if not (self.window > 0 and math.isfinite(self.window)):
            raise ValueError(f"window must be a positive number of seconds, got {self.window!r}")
        if not (self.hop > 0 and math.isfinite(self.hop)):
            raise ValueError(f"hop must be a positive number of seconds, got {self.hop!r}")
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames!r}")

    @property
    def step(self) -> float:
        return self.window / self.frames


class WindowSampler:
    """Turns a stream of frames (increasing pts) into overlapping windows."""

    def __init__(self, config: SamplerConfig, stream_id: str = "") -> None:
        self.config = config
        self.stream_id = stream_id
        self._t0: float | None = None
        self._last: Frame | None = None
        self._slots: dict[int, Frame] = {}  # finalised slot -> chosen frame
        self._next_slot = 0  # first slot whose frame is not chosen yet
        self._next_window = 0
        self._emitted = 0

    # -- grid arithmetic -------------------------------------------------
    def _first_slot(self, window_index: int) -> int:
        c = self.config
        return math.ceil(window_index * c.hop / c.step - _EPS)

    def _slot_centre(self, slot: int) -> float:
        assert self._t0 is not None
        return self._t0 + (slot + 0.5) * self.config.step

    # -- state machine ---------------------------------------------------
    def feed(self, frame: Frame) -> list[Window]:
        """Add the next frame; return the windows it completes, oldest first."""
        if self._last is not None and frame.pts <= self._last.pts:
            # Out-of-order or duplicate timestamp: keep time monotonic, drop it.
            return []
        if self._t0 is None:
            self._t0 = frame.pts
        prev = self._last
        self._last = frame
        # Every slot whose centre this frame reaches is decided now: its nearest
        # frame is either the previous frame or this one (ties go to the earlier).
        while self._slot_centre(self._next_slot) <= frame.pts + _EPS:
            centre = self._slot_centre(self._next_slot)
            if prev is not None and centre - prev.pts <= frame.pts - centre:
                chosen = prev
            else:
                chosen = frame
            self._slots[self._next_slot] = chosen
            self._next_slot += 1
        return self._complete_windows()

    def flush(self) -> list[Window]:
        """End of stream. Windows that still lack frames are dropped, except
        that a stream too short for even one window yields a single window made
        of what it has (its last frame fills the remaining slots)."""
        if self._emitted or self._last is None:
            return []
        n = self.config.frames
        first = self._first_slot(self._next_window)
        frames = [self._slots.get(j, self._last) for j in range(first, first + n)]
        self._emitted += 1
        return [Window(self.stream_id, self._next_window, tuple(frames))]

    def _complete_windows(self) -> list[Window]:
        n = self.config.frames
        out: list[Window] = []
        while True:
            first = self._first_slot(self._next_window)
            if first + n > self._next_slot:
                break
            frames = tuple(self._slots[j] for j in range(first, first + n))
            out.append(Window(self.stream_id, self._next_window, frames))
            self._next_window += 1
            self._emitted += 1
        # Forget slots that no future window can use.
        keep_from = self._first_slot(self._next_window)
        for j in [j for j in self._slots if j < keep_from]:
            del self._slots[j]
        return out

    @property
    def retained_frames(self) -> int:
        """Distinct frames held (for tests and metrics: this stays bounded)."""
        held = {id(f) for f in self._slots.values()}
        if self._last is not None:
            held.add(id(self._last))
        return len(held)
