"""A real WebRTC publisher's video track for WHIP tests."""

from __future__ import annotations

import av
import numpy as np
from aiortc import VideoStreamTrack


class NumberedTrack(VideoStreamTrack):
    """Sends frame n as a flat grey of level 20 + 10 * (n % 20): countable after VP8."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        level = 20 + 10 * (self.sent % 20)
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), level, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame
