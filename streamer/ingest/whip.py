"""WebRTC ingest (WHIP) with aiortc: one session per publishing peer.

The HTTP side (POST /whip/{stream} -> 201 + answer + Location, DELETE to end)
lives in the server; this module only turns an SDP offer into an answer and
the received video track into Frames.

aiortc decodes RTP in its own thread; the RGB conversion and downscale run in
a one-thread executor per session, so a 1080p publisher never stalls the loop
that every other stream shares.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import time

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streamer.errors import VideoError
from streamer.ingest.base import OnState, StateReporter
from streamer.ingest.source import OnFrame, SourceStats
from streamer.ingest.state import SourceState
from streamer.media.decode import to_rgb
from streamer.types import Frame

__all__ = ["WhipError", "WhipSession", "check_offer"]

log = logging.getLogger(__name__)


class WhipError(VideoError, ValueError):
    """An offer this session cannot answer (malformed SDP, no video, no common codec)."""


def check_offer(offer_sdp: str) -> None:
    """Raise WhipError unless `offer_sdp` is an SDP offer that sends video."""
    if not isinstance(offer_sdp, str) or not offer_sdp.lstrip().startswith("v=0"):
        raise WhipError("not an SDP offer (expected application/sdp text starting with 'v=0')")
    try:
        description = aiortc_sdp.SessionDescription.parse(offer_sdp)
    except Exception as exc:  # the parser raises whatever the bad line provokes
        raise WhipError(f"malformed SDP offer ({type(exc).__name__}: {exc})") from exc
    video = [m for m in description.media if m.kind == "video"]
    if not video:
        kinds = ", ".join(sorted({m.kind for m in description.media})) or "no media"
        raise WhipError(f"offer has no video section (it has {kinds})")
    if not any(m.direction in (None, "sendrecv", "sendonly") for m in video):
        raise WhipError("offer does not send video (its video sections are recvonly or inactive)")


class WhipSession(StateReporter):
    """One WHIP publisher: `accept()` the offer, frames go to `on_frame` on the loop.

    `configuration` defaults to no ICE servers: the server answers with its host
    candidates, and the publisher (who knows its NAT) brings STUN/TURN. Pass
    RTCConfiguration(iceServers=[...]) when the server itself sits behind NAT.
    """

    def __init__(
        self,
        stream_id: str,
        on_frame: OnFrame,
        on_state: OnState | None = None,
        *,
        short_side: int | None = None,
        configuration: RTCConfiguration | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.id = secrets.token_urlsafe(12)  # names the session in the Location URL
        self.short_side = short_side
        self._on_frame = on_frame
        self._on_state = on_state
        self._configuration = configuration or RTCConfiguration(iceServers=[])
        self._pc: RTCPeerConnection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._state = SourceState.STOPPED
        self._detail: str | None = None
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._seq = 0
        self._last_pts: float | None = None
        self._frames = 0
        self._dropped = 0
        self._last_wall: float | None = None

    @property
    def stats(self) -> SourceStats:
        return SourceStats(frames=self._frames, dropped=self._dropped, last_frame_wall_time=self._last_wall)

    async def accept(self, offer_sdp: str) -> str:
        """Answer a publisher's SDP offer; returns the answer SDP (ICE candidates included)."""
        if self._closing:
            raise WhipError("session is closed")
        if self._pc is not None:
            raise WhipError("session already has an offer; start a new session to publish again")
        check_offer(offer_sdp)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"whip:{self.stream_id}")
        pc = self._pc = RTCPeerConnection(self._configuration)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", lambda: self._on_connection_state(pc.connectionState))
        self._set_state(SourceState.CONNECTING, None)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())  # gathers candidates: no trickle
        except Exception as exc:
            await self.close()
            raise WhipError(f"cannot answer the offer ({type(exc).__name__}: {exc})") from exc
        log.info("whip offer accepted", extra={"stream": self.stream_id, "session": self.id})
        return pc.localDescription.sdp

    async def close(self) -> None:
        """End the session (publisher's DELETE, shutdown). Idempotent."""
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        self._closing = True
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._pc is not None:
                await self._pc.close()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            if not self._state.final:  # a failure stays visible
                self._emit(SourceState.STOPPED, "closed")
            self._closed.set()

    async def __aenter__(self) -> WhipSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        consume = self._consume_video if track.kind == "video" else self._discard
        task = asyncio.create_task(consume(track), name=f"whip-{track.kind}:{self.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection_state(self, state: str) -> None:
        log.debug("whip connection %s", state, extra={"stream": self.stream_id, "session": self.id})
        if state == "failed":
            self._set_state(SourceState.FAILED, "WebRTC connection failed (ICE or DTLS)")
            task = asyncio.ensure_future(self.close())  # free ports and threads; the peer must publish anew
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif state == "disconnected":
            self._set_state(SourceState.STALLED, "WebRTC connection interrupted")

    async def _consume_video(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                av_frame = await track.recv()
            except MediaStreamError:
                break
            pts = av_frame.time
            if pts is None or (self._last_pts is not None and pts <= self._last_pts):
                self._dropped += 1
                continue
            self._last_pts = pts
            try:
                image = await loop.run_in_executor(self._executor, to_rgb, av_frame, self.short_side)
            except RuntimeError:  # executor shut down: closing
                break
            frame = Frame(self.stream_id, self._seq, pts, image, time.time())
            self._seq += 1
            self._frames += 1
            self._last_wall = frame.arrival
            if self._state is not SourceState.LIVE:
                self._set_state(SourceState.LIVE, None)
            try:
                self._on_frame(frame)
            except Exception:
                log.exception("on_frame callback failed", extra={"stream": self.stream_id})
        if not self._closing:
            self._set_state(SourceState.STOPPED, "publisher ended the video track")

    async def _discard(self, track: MediaStreamTrack) -> None:
        # Unread tracks queue frames without bound: drain audio we do not use.
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _log_fields(self) -> dict[str, object]:
        return {"session": self.id}

