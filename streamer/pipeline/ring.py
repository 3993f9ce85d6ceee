"""Per-stream ring buffer of decoded frames: ingest never blocks, the oldest frame gives way."""

from __future__ import annotations

import asyncio
from collections import deque

from streamer.types import Frame

__all__ = ["FrameRing"]


class FrameRing:
    """Bounded FIFO of frames for one stream, used on the event loop.

    `push` never waits: when the consumer falls behind, the oldest frame is
    overwritten and counted in `dropped` (live video: new frames matter more).
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._ready = asyncio.Event()
        self.capacity = capacity
        self.pushed = 0
        self.dropped = 0
        self.latest: Frame | None = None  # newest frame with an image, for thumbnails (ticks have none)

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: Frame) -> None:
        if len(self._frames) == self.capacity:
            self.dropped += 1
        self._frames.append(frame)
        self.pushed += 1
        if not frame.is_tick:
            self.latest = frame
        self._ready.set()

    async def take(self) -> list[Frame]:
        """Wait until at least one frame is buffered; return all of them, oldest first."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frames = list(self._frames)
        self._frames.clear()
        return frames
