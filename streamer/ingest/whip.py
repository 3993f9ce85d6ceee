"""WebRTC ingest (WHIP) with aiortc: one session per publishing peer.

The HTTP side (POST /whip/{stream} -> 201 + answer + Location, DELETE of that
Location to end) lives in the server; this module only turns an SDP offer into
an answer and the received video track into Frames.

DTLS role: when the offer leaves it open (`a=setup:actpass`) the session
answers `a=setup:passive` and is the DTLS server, which accepts publishers
with ECDSA (browsers) and RSA (GStreamer's webrtcbin) certificates alike. An
offer that says `passive` makes us the DTLS client. aiortc's client offers
only ECDHE-ECDSA suites, which a server with an RSA certificate cannot accept
("no shared cipher"); importing this module therefore wraps aiortc's DTLS
context creation so that it also offers the ECDHE-RSA twin of each suite
(`_offer_rsa_suites_as_client`), and refuses to import when aiortc's shape
changed. A handshake that still fails is reported in one line, with
OpenSSL's reason, in the state detail and the log.

Receive path: aiortc decodes RTP in its own thread into an unbounded queue.
One task drains that queue as fast as frames come, keeping only the newest
`keep` decoded frames (older ones give way, counted in `stats.dropped`);
another converts to RGB, in a one-thread executor per session, only the
frames it takes. A slow CPU therefore costs frames, not latency, and a
1080p publisher never stalls the loop that every other stream shares.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiortc
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import RTCCertificate
from OpenSSL import SSL

from streamer.errors import VideoError
from streamer.ingest.audio import HOLD_SECONDS, ArrivalClock, AudioChunk, AudioQueue, Resampler
from streamer.ingest.base import OnState, StateReporter
from streamer.ingest.source import OnFrame, SourceStats
from streamer.ingest.state import SourceState
from streamer.media.decode import to_rgb
from streamer.speech.vad import SAMPLE_RATE
from streamer.types import Frame

__all__ = ["WhipError", "WhipSession", "check_offer"]

log = logging.getLogger(__name__)

KEEP_FRAMES = 2  # decoded frames waiting for conversion; older ones give way (newest wins)
THUMBNAIL_EVERY = 1.0  # seconds of media between frames converted when no caption needs them (speech only)


class WhipError(VideoError, ValueError):
    """An offer this session cannot answer (malformed SDP, no video, no common codec)."""


def check_offer(offer_sdp: str) -> None:
    """Raise WhipError unless `offer_sdp` is an SDP offer that sends video."""
    _parse_offer(offer_sdp)


def _parse_offer(offer_sdp: str) -> aiortc_sdp.SessionDescription:
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
    return description


# -- DTLS suites: meet an RSA server when we are the client ------------------------------

_ECDSA_SUITE = "ECDHE-ECDSA-"
_RSA_SUITE = "ECDHE-RSA-"


def _with_rsa_twins(suites: list[str]) -> list[str]:
    """The (D)TLS 1.2 suites in `suites`, each ECDHE-ECDSA one followed by its ECDHE-RSA twin
    (TLS 1.3 names are left out: they belong to set_ciphersuites, and DTLS 1.2 has none)."""
    out: list[str] = []
    for suite in suites:
        if suite.startswith("TLS_") or suite in out:
            continue
        out.append(suite)
        if suite.startswith(_ECDSA_SUITE):
            twin = _RSA_SUITE + suite[len(_ECDSA_SUITE):]
            if twin not in suites:
                out.append(twin)
    return out


def _offer_rsa_suites_as_client() -> None:
    """Make every DTLS context aiortc creates offer ECDHE-RSA suites besides its ECDHE-ECDSA ones.

    Why: aiortc (checked with 1.16) builds each context in the private
    `RTCCertificate._create_ssl_context(self, srtp_profiles)` with an ECDHE-ECDSA-only
    cipher list. As the DTLS server that is all its own ECDSA key can use; but as the
    client (the offer said setup:passive) the suite must suit the *server's* certificate,
    and an RSA one (GStreamer's webrtcbin) finds no shared cipher. Our client certificate
    stays ECDSA, which an RSA server accepts. As a server OpenSSL never picks an RSA suite
    for an ECDSA key, so that side is unchanged. aiortc has no public way to set the list.

    Idempotent. Raises RuntimeError, at import and so at daemon startup, when aiortc's shape
    changed (no such method, another signature, or a context that still offers no RSA suite):
    loudly, rather than RSA publishers failing one by one later.
    """
    create = getattr(RTCCertificate, "_create_ssl_context", None)
    if getattr(create, "offers_rsa_suites", False):
        return
    version = getattr(aiortc, "__version__", "?")
    try:
        parameters = list(inspect.signature(create).parameters) if callable(create) else None
    except (TypeError, ValueError):
        parameters = None
    if parameters != ["self", "srtp_profiles"]:
        raise RuntimeError(
            f"aiortc {version}: RTCCertificate._create_ssl_context(self, srtp_profiles) not found "
            f"(got {parameters}); streamer.ingest.whip wraps it so that WHIP publishers with RSA "
            "certificates can connect when the daemon is the DTLS client: install a tested aiortc (1.16)"
        )
    assert create is not None
    from aiortc.rtcdtlstransport import SRTP_PROFILES

    def offered(context: SSL.Context) -> list[str]:  # a context cannot change once a Connection used it
        return SSL.Connection(context).get_cipher_list()

    try:
        certificate = RTCCertificate.generateCertificate()
        suites = ":".join(_with_rsa_twins(offered(create(certificate, SRTP_PROFILES)))).encode()
    except Exception as exc:
        raise RuntimeError(f"aiortc {version}: cannot build its DTLS context to read its suites ({exc})") from exc

    @functools.wraps(create)
    def create_with_rsa_suites(self: RTCCertificate, srtp_profiles: list) -> SSL.Context:
        context = create(self, srtp_profiles)
        context.set_cipher_list(suites)
        return context

    create_with_rsa_suites.offers_rsa_suites = True  # type: ignore[attr-defined]
    # Check that it takes: a context made as aiortc makes one offers RSA suites (and ECDSA ones still).
    try:
        now = offered(create_with_rsa_suites(certificate, SRTP_PROFILES))
    except Exception as exc:
        raise RuntimeError(f"aiortc {version}: cannot offer the suites {suites.decode()!r} ({exc})") from exc
    if not any(s.startswith(_RSA_SUITE) for s in now) or not any(s.startswith(_ECDSA_SUITE) for s in now):
        raise RuntimeError(f"aiortc {version}: its DTLS context would offer {now}, not ECDHE-ECDSA and ECDHE-RSA suites")
    RTCCertificate._create_ssl_context = create_with_rsa_suites  # type: ignore[method-assign]


_offer_rsa_suites_as_client()


_ACTIVE = re.compile(r"^a=setup:active(?=\r?$)", re.MULTILINE)


def _as_dtls_server(answer_sdp: str, offer: aiortc_sdp.SessionDescription) -> str:
    """The answer with `a=setup:passive` where the offer allowed either role (actpass).

    aiortc answers `active` (DTLS client) to actpass; setLocalDescription takes
    the role from the answer it is given, so rewriting the answer makes aiortc
    act as the server it says it is."""
    roles = {m.dtls.role for m in offer.media if m.dtls is not None}
    if roles != {"auto"}:  # the offer chose a role (or mixes them): aiortc already answers its opposite
        return answer_sdp
    return _ACTIVE.sub("a=setup:passive", answer_sdp)


# aiortc says why a DTLS handshake failed only in a debug line of its own logger
# ("x DTLS handshake failed (error ...)"), logged in the connection task that
# accept() starts. That task inherits accept()'s context, so a context variable
# names the session the line belongs to.
_DTLS_FAILURE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "whip_dtls_failure", default=None
)


class _DtlsFailureTap(logging.Filter):
    """Hands aiortc's DTLS failure lines to their session; passes records on only at the level
    the aiortc logger would have allowed without the tap."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__()
        self._logger = logger
        self._level = level  # NOTSET: whatever the parents say

    def filter(self, record: logging.LogRecord) -> bool:
        if "handshake failed" in str(record.msg):
            sink = _DTLS_FAILURE.get()
            if sink is not None:
                sink(record.getMessage())
        level = self._level or (self._logger.parent.getEffectiveLevel() if self._logger.parent else logging.WARNING)
        return record.levelno >= level


def _tap_dtls_failures() -> None:
    logger = logging.getLogger("aiortc.rtcdtlstransport")
    if any(isinstance(f, _DtlsFailureTap) for f in logger.filters):
        return
    logger.addFilter(_DtlsFailureTap(logger, logger.level))
    logger.setLevel(logging.DEBUG)  # the debug lines must be made to be seen; the tap filters them


@dataclass(frozen=True, slots=True)
class _Received:
    """A decoded frame waiting for conversion (only the reference: converting is the cost)."""

    av_frame: av.VideoFrame
    pts: float
    arrival: float  # time.time() when the track handed it over


class WhipSession(StateReporter):
    """One WHIP publisher: `accept()` the offer, frames go to `on_frame` on the loop.

    `configuration` defaults to no ICE servers: the server answers with its host
    candidates, and the publisher (who knows its NAT) brings STUN/TURN. Pass
    RTCConfiguration(iceServers=[...]) when the server itself sits behind NAT.

    `stall_timeout`: seconds without a frame from a live publisher before the
    state turns `stalled` (ICE notices a vanished peer only after ~30 s).
    `keep`: decoded frames waiting for conversion (newest win). `first_seq`:
    where `Frame.seq` starts (a session replacing another on the same stream
    goes on from there). `convert`: av.VideoFrame -> RGB array, run in the
    session's executor. `audio`: the publisher's audio track (Opus from OBS and
    browsers) goes, 16 kHz mono on the video's clock, into `self.audio` (speech);
    otherwise it is drained unread. `visual` False (speech only): no caption needs
    frames, so one per THUMBNAIL_EVERY is converted (thumbnails, liveness).
    """

    def __init__(
        self,
        stream_id: str,
        on_frame: OnFrame,
        on_state: OnState | None = None,
        *,
        short_side: int | None = None,
        configuration: RTCConfiguration | None = None,
        stall_timeout: float = 5.0,
        keep: int = KEEP_FRAMES,
        first_seq: int = 0,
        convert: Callable[[av.VideoFrame, int | None], np.ndarray] = to_rgb,
        audio: bool = False,
        visual: bool = True,
    ) -> None:
        self.stream_id = stream_id
        self.visual = visual
        self.audio: AudioQueue | None = AudioQueue(stream_id) if audio else None
        self._audio_clock = ArrivalClock()
        self.id = secrets.token_urlsafe(16)  # names the session in its Location URL: unguessable
        self.short_side = short_side
        self.stall_timeout = stall_timeout
        self._on_frame = on_frame
        self._on_state = on_state
        self._convert = convert
        self._configuration = configuration or RTCConfiguration(iceServers=[])
        self._pc: RTCPeerConnection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._state = SourceState.STOPPED
        self._detail: str | None = None
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._dtls_role: str | None = None  # "server" or "client", once answered
        self._dtls_error: str | None = None
        self._connected = False
        self._received: collections.deque[_Received] = collections.deque(maxlen=keep)
        self._waiting = asyncio.Event()  # a frame is waiting for conversion, or the track ended
        self._arrived = asyncio.Event()  # a frame came in (wakes the stall watchdog)
        self._track_ended = False
        self._last_recv = 0.0  # loop time of the newest frame from the track
        self._seq = first_seq
        self._last_pts: float | None = None
        self._frames = 0
        self._dropped = 0
        self._convert_failed = False
        self._last_wall: float | None = None

    @property
    def stats(self) -> SourceStats:
        audio = self.audio.stats if self.audio is not None else None
        return SourceStats(frames=self._frames, dropped=self._dropped, last_frame_wall_time=self._last_wall,
                           audio_seconds=audio.seconds if audio else 0.0, audio_dropped=audio.dropped if audio else 0.0,
                           audio_errors=audio.errors if audio else 0)

    @property
    def next_seq(self) -> int:
        """The seq the next frame gets (a replacing session starts there)."""
        return self._seq

    @property
    def dtls_role(self) -> str | None:
        """"server" (we answered setup:passive) or "client" (the offer said passive); None before accept()."""
        return self._dtls_role

    async def accept(self, offer_sdp: str) -> str:
        """Answer a publisher's SDP offer; returns the answer SDP (ICE candidates included)."""
        if self._closing:
            raise WhipError("session is closed")
        if self._pc is not None:
            raise WhipError("session already has an offer; start a new session to publish again")
        offer = _parse_offer(offer_sdp)
        if self.audio is not None and not any(m.kind == "audio" for m in offer.media):
            # Not an error (a camera without a microphone): said once, the stream goes live on its video.
            self.audio.problem("none", "publisher sends no audio: no speech cues for this stream", error=False,
                               level=logging.INFO)
        _tap_dtls_failures()
        # Seen by the connection tasks aiortc starts below (a task copies the context it is made in).
        context_token = _DTLS_FAILURE.set(self._on_dtls_failure)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"whip:{self.stream_id}")
        pc = self._pc = RTCPeerConnection(self._configuration)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", lambda: self._on_connection_state(pc.connectionState))
        self._set_state(SourceState.CONNECTING, None)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            answer = await pc.createAnswer()
            answer_sdp = _as_dtls_server(answer.sdp, offer)
            await pc.setLocalDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))  # gathers: no trickle
        except Exception as exc:
            await self.close()
            raise WhipError(f"cannot answer the offer ({type(exc).__name__}: {exc})") from exc
        finally:
            _DTLS_FAILURE.reset(context_token)
        answered = aiortc_sdp.SessionDescription.parse(pc.localDescription.sdp)
        self._dtls_role = next((m.dtls.role for m in answered.media if m.dtls is not None), None)
        log.info("whip offer accepted", extra={"stream": self.stream_id, "session": self.id, "dtls": self._dtls_role})
        return pc.localDescription.sdp

    async def close(self) -> None:
        """End the session (publisher's DELETE, a replacing session, shutdown). Idempotent."""
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
            self._received.clear()
            if not self._state.final:  # a failure stays visible
                self._emit(SourceState.STOPPED, "closed")
            self._closed.set()

    async def __aenter__(self) -> WhipSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}:{self.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.audio is not None:
            self._spawn(self._drain_audio(track), "whip-audio")
            return
        if track.kind != "video":
            self._spawn(self._discard(track), f"whip-{track.kind}")
            return
        self._last_recv = asyncio.get_running_loop().time()
        self._spawn(self._drain_video(track), "whip-drain")
        self._spawn(self._convert_frames(), "whip-convert")
        self._spawn(self._watch_stall(), "whip-stall")

    def _on_dtls_failure(self, message: str) -> None:
        # "RTCDtlsTransport(server) x DTLS handshake failed (error [...])": keep the reason part
        reason = message.partition(" x ")[2] or message
        self._dtls_error = reason.replace("(error [])", "(OpenSSL gave no reason)")

    def _on_connection_state(self, state: str) -> None:
        log.debug("whip connection %s", state, extra={"stream": self.stream_id, "session": self.id})
        if state == "connected":
            self._connected = True
        elif state == "failed":
            self._set_state(SourceState.FAILED, self._failure_reason())
            task = asyncio.ensure_future(self.close())  # free ports and threads; the peer must publish anew
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif state == "disconnected":
            self._set_state(SourceState.STALLED, "WebRTC connection interrupted")

    def _failure_reason(self) -> str:
        """One line on why the connection failed: which layer, and what it said."""
        pc = self._pc
        transports = [t.receiver.transport for t in pc.getTransceivers()] if pc is not None else []
        for dtls in transports:
            ice = dtls.transport
            if ice.state == "failed":
                if self._connected:
                    return "ICE failed: the publisher stopped answering connectivity checks (gone)"
                local = len(ice.iceGatherer.getLocalCandidates())
                remote = len(ice.getRemoteCandidates())
                return f"ICE failed: no candidate pair answered ({local} local, {remote} remote candidates)"
            if dtls.state == "failed":
                why = self._dtls_error or "DTLS handshake failed"
                return f"DTLS failed as {self._dtls_role or 'unknown role'}: {why}"
        return "WebRTC connection failed"

    @property
    def connected(self) -> bool:
        """ICE and DTLS came up at least once."""
        return self._connected

    def progress(self) -> str:
        """How far the connection got, in one line: for a session removed before its first frame
        ("ICE checking (2 remote candidates), DTLS not started"; the DTLS error once one was seen)."""
        pc = self._pc
        transceivers = pc.getTransceivers() if pc is not None else []
        if not transceivers:
            return "no offer answered"
        dtls = transceivers[0].receiver.transport  # one bundled transport carries every m-line
        ice = dtls.transport
        role = self._dtls_role or "unknown role"
        remote = len(ice.getRemoteCandidates())
        ice_part = {
            "new": "ICE not started",
            "checking": f"ICE checking ({remote} remote candidate{'' if remote == 1 else 's'})",
            "completed": "ICE connected",
        }.get(ice.state, f"ICE {ice.state}")
        if self._dtls_error:
            return f"{ice_part}, DTLS failed as {role}: {self._dtls_error}"
        dtls_part = {
            "new": "DTLS not started",
            "connecting": f"DTLS handshake as {role} not finished",
            "connected": "DTLS connected, no video frame yet",
        }.get(dtls.state, f"DTLS {dtls.state}")
        return f"{ice_part}, {dtls_part}"

    async def _drain_video(self, track: MediaStreamTrack) -> None:
        """Take every frame aiortc decoded as soon as it comes; keep only the newest `keep`."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                av_frame = await track.recv()
            except MediaStreamError:
                break
            self._last_recv = loop.time()
            self._arrived.set()
            pts = av_frame.time
            if pts is None or (self._last_pts is not None and pts <= self._last_pts):
                self._dropped += 1
                continue
            self._last_pts = pts
            self._audio_clock.video(pts, time.time())
            if len(self._received) == self._received.maxlen:
                self._dropped += 1  # conversion fell behind: the oldest waiting frame gives way
            self._received.append(_Received(av_frame, pts, time.time()))
            self._waiting.set()
        self._track_ended = True
        self._waiting.set()

    async def _convert_frames(self) -> None:
        loop = asyncio.get_running_loop()
        thumbnail_at: float | None = None  # media time of the last frame converted (visual off)
        while True:
            if not self._received:
                if self._track_ended:
                    break
                self._waiting.clear()
                await self._waiting.wait()
                continue
            item = self._received.popleft()
            if not self.visual:
                if thumbnail_at is not None and item.pts - thumbnail_at < THUMBNAIL_EVERY:
                    if self._state is not SourceState.LIVE:
                        self._set_state(SourceState.LIVE, None)
                    continue  # no caption wants it: not converted (nor counted as dropped)
                thumbnail_at = item.pts
            try:
                image = await loop.run_in_executor(self._executor, self._convert, item.av_frame, self.short_side)
            except RuntimeError as exc:
                if self._closing:  # executor shut down
                    return
                self._conversion_failed(exc)
                continue
            except Exception as exc:
                self._conversion_failed(exc)
                continue
            frame = Frame(self.stream_id, self._seq, item.pts, image, item.arrival)
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

    def _conversion_failed(self, exc: Exception) -> None:
        self._dropped += 1
        if not self._convert_failed:  # once per session: a broken stream would repeat it every frame
            self._convert_failed = True
            log.error("whip frame conversion failed (%s: %s); such frames are dropped and counted",
                      type(exc).__name__, exc, extra={"stream": self.stream_id, "session": self.id})

    async def _watch_stall(self) -> None:
        """`stalled` once a live publisher sent nothing for stall_timeout; live again on its next frame."""
        loop = asyncio.get_running_loop()
        while True:
            silent = loop.time() - self._last_recv
            if silent < self.stall_timeout:
                await asyncio.sleep(self.stall_timeout - silent)  # a deadline, not a synchronisation
                continue
            if self._state is SourceState.LIVE:
                self._set_state(SourceState.STALLED, f"no video from the publisher for {self.stall_timeout:g} s")
            self._arrived.clear()
            await self._arrived.wait()

    async def _drain_audio(self, track: MediaStreamTrack) -> None:
        """The publisher's audio, resampled, on the video's clock (ArrivalClock), into `self.audio`.
        Audio before the first video frame waits for it (HOLD_SECONDS at most, oldest given up)."""
        assert self.audio is not None
        queue = self.audio
        resampler = Resampler(lambda was, now: queue.problem(
            "format", "audio format changed mid-stream: resampling anew (counted; logged once)", error=False,
            was=list(was), now=list(now)))
        held: collections.deque[tuple[np.ndarray, float, float]] = collections.deque()
        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    break
                arrival = time.time()
                if not isinstance(frame, av.AudioFrame) or frame.time is None:
                    continue
                try:
                    pieces = resampler.push(frame)
                except (av.error.FFmpegError, ValueError) as exc:
                    queue.problem("resample", "audio cannot be resampled: no speech from this publisher (video goes on)",
                                  reason=str(exc)[:200])
                    break
                held.extend((samples, raw, arrival) for samples, raw in pieces)
                while held:
                    samples, raw, at = held[0]
                    seconds = len(samples) / SAMPLE_RATE
                    pts = self._audio_clock.place(raw, at, seconds)
                    if pts is None and self._audio_clock.video_origin is None:
                        break  # no video yet: its clock is not known
                    held.popleft()
                    if pts is None:
                        queue.dropped(seconds)  # behind what was placed already
                    else:
                        queue.put(AudioChunk(samples, pts, at))
                while len(held) * 0.1 > HOLD_SECONDS:  # pieces of ~0.1 s: the oldest gives way
                    queue.dropped(len(held.popleft()[0]) / SAMPLE_RATE)
        finally:
            queue.end()

    async def _discard(self, track: MediaStreamTrack) -> None:
        # Unread tracks queue frames without bound: drain audio we do not use.
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _log_fields(self) -> dict[str, object]:
        return {"session": self.id}
