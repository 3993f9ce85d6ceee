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

`SlotGate` answers, from pts alone, which decoded frames a sampler with the
same config can choose, so that a live source converts (swscale) only those.
A source that gates its frames hands the sampler a *tick* for some of the
others: an image-less Frame that carries time forward (it closes slots) and is
never put in a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from streamer.types import Frame, Window, tick

__all__ = ["SamplerConfig", "WindowSampler", "SlotGate", "GateDecision", "Act", "tick", "is_tick"]

_EPS = 1e-9
_MARGIN = 1e-6  # SlotGate.needless: wider than _EPS and float noise in pts, narrower than any frame interval


def is_tick(frame: Frame) -> bool:
    return frame.is_tick


# The grid and the nearest-frame rule, shared by WindowSampler and SlotGate so that
# the gate's answers are the sampler's choices by construction.
def _centre(t0: float, slot: int, step: float) -> float:
    return t0 + (slot + 0.5) * step


def _earlier_wins(centre: float, earlier: float, later: float) -> bool:
    """Which of two neighbouring frames a slot takes: the nearer one, ties to the earlier."""
    return centre - earlier <= later - centre


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

    def __init__(self, config: SamplerConfig, stream_id: str = "", first_index: int = 0) -> None:
        """`first_index`: the index of the first window (a stream taken over from another replica
        goes on from the last index it published)."""
        self.config = config
        self.stream_id = stream_id
        self.first_index = first_index
        self._t0: float | None = None
        self._last: Frame | None = None
        self._last_image: Frame | None = None  # newest frame that is not a tick
        self._slots: dict[int, Frame] = {}  # finalised slot -> chosen frame
        self._next_slot = 0  # first slot whose frame is not chosen yet
        self._next_window = 0
        self._emitted = 0
        self.skipped = 0  # windows not emitted because a slot held only a tick

    # -- grid arithmetic -------------------------------------------------
    def _first_slot(self, window_index: int) -> int:
        c = self.config
        return math.ceil(window_index * c.hop / c.step - _EPS)

    def _slot_centre(self, slot: int) -> float:
        assert self._t0 is not None
        return _centre(self._t0, slot, self.config.step)

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
        if not is_tick(frame):
            self._last_image = frame
        # Every slot whose centre this frame reaches is decided now: its nearest
        # frame is either the previous frame or this one (ties go to the earlier).
        other: Frame | None
        while self._slot_centre(self._next_slot) <= frame.pts + _EPS:
            centre = self._slot_centre(self._next_slot)
            if prev is not None and _earlier_wins(centre, prev.pts, frame.pts):
                chosen, other = prev, frame
            else:
                chosen, other = frame, prev
            if is_tick(chosen) and other is not None and not is_tick(other):
                # A gated source never lets a tick be nearest; after frames were lost
                # under overload one can be: take the real neighbour.
                chosen = other
            self._slots[self._next_slot] = chosen
            self._next_slot += 1
        return self._complete_windows()

    def flush(self) -> list[Window]:
        """End of stream. Windows that still lack frames are dropped, except
        that a stream too short for even one window yields a single window made
        of what it has (its last frame fills the remaining slots)."""
        last = self._last_image
        if self._emitted or last is None:
            return []
        n = self.config.frames
        first = self._first_slot(self._next_window)
        frames = [self._slots.get(j, last) for j in range(first, first + n)]
        if any(is_tick(f) for f in frames):
            return []
        self._emitted += 1
        return [Window(self.stream_id, self.first_index + self._next_window, tuple(frames))]

    def _complete_windows(self) -> list[Window]:
        n = self.config.frames
        out: list[Window] = []
        while True:
            first = self._first_slot(self._next_window)
            if first + n > self._next_slot:
                break
            frames = tuple(self._slots[j] for j in range(first, first + n))
            if any(is_tick(f) for f in frames):
                self.skipped += 1  # frames were lost and a tick is all a slot has: no image to caption
            else:
                out.append(Window(self.stream_id, self.first_index + self._next_window, frames))
                self._emitted += 1
            self._next_window += 1
        # Forget slots that no future window can use.
        keep_from = self._first_slot(self._next_window)
        for j in [j for j in self._slots if j < keep_from]:
            del self._slots[j]
        return out

    @property
    def retained_frames(self) -> int:
        """Distinct frames held (for tests and metrics: this stays bounded)."""
        held = {id(f) for f in self._slots.values()}
        for frame in (self._last, self._last_image):
            if frame is not None:
                held.add(id(frame))
        return len(held)


class Act(Enum):
    """What a source does with one decoded frame (see SlotGate)."""

    CONVERT = "convert"  # convert it and hand it on now
    TICK = "tick"  # hand on its pts only (`tick()`): no slot takes it, but it closes slots
    HOLD = "hold"  # keep it unconverted: the next offer decides
    DROP = "drop"  # no slot can take it: free it


@dataclass(frozen=True, slots=True)
class GateDecision:
    held: Act  # the frame held back by the previous offer, handed on first (DROP when none is held)
    frame: Act  # the frame just offered: CONVERT, HOLD, or DROP (its time goes backwards)


class SlotGate:
    """Which decoded frames a `WindowSampler` with the same config will choose, from pts alone.

    A source calls `offer(pts)` for every decoded frame, in decode order, and
    does what the decision says (the held frame first). It converts a frame
    only when a slot takes it, plus the first frame (it fixes the sampler's
    grid) and one at least every `refresh` seconds of media time (thumbnails).
    Pure, no clock: owned by one thread (a decode thread), nothing shared.

    Why a frame is held: a slot takes the frame nearest its centre. A frame at
    or after the centre is known as soon as it arrives; one before it only
    once the next frame shows it is nearer, so the gate keeps it (unconverted,
    one at most) until that next offer. The sampler closes a slot when any
    frame at or past its centre reaches it; when that frame is not converted
    the gate ticks it at the next offer, once its own fate is known (a tick is
    never chosen). So every slot closes at the frame that closes it today or
    the one after: at most one frame interval later, and the frames the
    sampler sees, a subset holding every chosen frame, give it the very same
    choices (the same `_earlier_wins`).

    `release()` at the end of a connection: the held frame is converted now,
    since a later frame (pts go on across reconnects) may still choose it and
    a decoder frame should not outlive its container.
    """

    def __init__(self, config: SamplerConfig, refresh: float | None = 1.0) -> None:
        if refresh is not None and not (refresh > 0 and math.isfinite(refresh)):
            raise ValueError(f"refresh must be a positive number of seconds or None, got {refresh!r}")
        self.config = config
        self.refresh = refresh
        self._t0: float | None = None
        self._last: float | None = None  # pts of the last accepted offer
        self._holding = False  # that frame is held unconverted
        self._next_slot = 0  # first slot not decided yet
        self._decided_at_last = 0  # _next_slot right after the last accepted offer
        self._closed = 0  # slots the consumer's sampler can close with what it was handed
        self._last_converted: float | None = None

    @property
    def holding(self) -> bool:
        return self._holding

    def offer(self, pts: float) -> GateDecision:
        if self._last is not None and pts <= self._last:
            # The sampler drops time going backwards; the held frame still waits for a later one.
            return GateDecision(Act.HOLD if self._holding else Act.DROP, Act.DROP)
        if self._t0 is None:
            self._t0 = pts
        prev = self._last
        prev_chosen = this_chosen = False
        step = self.config.step
        while _centre(self._t0, self._next_slot, step) <= pts + _EPS:
            centre = _centre(self._t0, self._next_slot, step)
            if prev is not None and _earlier_wins(centre, prev, pts):
                prev_chosen = True
            else:
                this_chosen = True
            self._next_slot += 1

        held = Act.DROP
        if self._holding and prev_chosen:
            held = Act.CONVERT
            self._last_converted = prev
        convert = this_chosen or self._refresh_due(pts)
        if held is Act.CONVERT or (self._holding and not convert and self._closed < self._decided_at_last):
            # Handing on the held frame lets the sampler close what it decided; when this
            # frame is converted it closes those slots itself and a tick is not needed.
            if held is Act.DROP:
                held = Act.TICK
            self._closed = self._decided_at_last
        if convert:
            self._last_converted = pts
            self._closed = self._next_slot
        self._holding = not convert
        self._decided_at_last = self._next_slot
        self._last = pts
        return GateDecision(held, Act.CONVERT if convert else Act.HOLD)

    def needless(self, pts: float, before: float, after: float) -> bool:
        """True when a frame at `pts` will certainly not be converted, given that frames at
        `before` and `after` (before < pts < after) will be offered as well: its source may then
        let the decoder skip it, if no other frame needs it (a non-reference frame). False
        whenever that is not certain.

        A slot takes the frame nearest its centre, ties to the earlier, so with `before` and
        `after` offered, `pts` can be taken only by a centre in ((before + pts) / 2,
        (pts + after) / 2] (frames in between only narrow that). Removing a frame no slot takes
        changes no other choice. It must not be due as a thumbnail either: conversions only move
        the last converted time forward, so under `refresh` from it now means under it then.
        """
        if self._t0 is None or self._last_converted is None or not before < pts < after:
            return False
        if self._last is not None and pts <= self._last:
            return False  # not ahead of what was offered: leave such frames to the usual rules
        if self.refresh is not None and pts - self._last_converted >= self.refresh - _MARGIN:
            return False
        step = self.config.step
        low, high = (before + pts) / 2 - _MARGIN, (pts + after) / 2 + _MARGIN
        slot = math.floor((high - self._t0) / step - 0.5)  # the last slot whose centre is <= high
        if _centre(self._t0, slot + 1, step) <= high:  # float rounding in floor(): be sure
            return False
        return slot < 0 or _centre(self._t0, slot, step) <= low

    def release(self) -> bool:
        """End of a connection: True when the held frame must be converted and handed on now."""
        if not self._holding:
            return False
        self._holding = False
        self._last_converted = self._last
        self._closed = self._decided_at_last
        return True

    def _refresh_due(self, pts: float) -> bool:
        if self._last_converted is None:
            return True  # the first frame: the sampler's grid starts at it
        return self.refresh is not None and pts - self._last_converted >= self.refresh
