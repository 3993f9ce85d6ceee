"""Real WebRTC publishers (aiortc) for WHIP tests."""

from __future__ import annotations

import asyncio

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack


class NumberedTrack(VideoStreamTrack):
    """Sends frame n as a flat grey of level 20 + 10 * (n % 20): countable after VP8.

    `pause()` stops sending without closing anything, as a publisher whose process froze
    or whose network vanished (the peer connection itself stays up); `resume()` goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._running = asyncio.Event()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def recv(self) -> av.VideoFrame:
        await self._running.wait()
        pts, time_base = await self.next_timestamp()
        level = 20 + 10 * (self.sent % 20)
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), level, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


class AiortcPublisher:
    """An aiortc peer that publishes a NumberedTrack over WHIP (POST offer, set answer)."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = NumberedTrack()
        self.pc.addTransceiver(self.track, direction="sendonly")

    async def offer(self) -> str:
        if self.pc.localDescription is None:
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def publish(self, http: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, str | None, str]:
        """POST the offer; on 201 set the answer. Returns (status, Location, body)."""
        async with http.post(url, data=await self.offer(), headers={"Content-Type": "application/sdp"}, **kwargs) as resp:
            body = await resp.text()
            location = resp.headers.get("Location")
        if resp.status == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        return resp.status, location, body

    async def close(self) -> None:
        await self.pc.close()
