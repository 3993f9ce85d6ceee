"""Live sources: one decode thread per stream, frames handed to the event loop.

A `FrameSource` opens its `SourceSpec` with PyAV in a dedicated thread, decodes
frames, and posts each one to the loop with `call_soon_threadsafe`. Given a
`SlotGate` it converts to RGB only the frames the sampler will choose (plus
thumbnails) and posts those, and ticks where the sampler needs time to move on,
and lets the decoder skip the non-reference frames (most B-frames) that no slot
can take; without one it converts and posts every frame. It never
waits for the consumer. When the connection breaks (open error, decode error,
end of a live stream, or a stall seen by the watchdog on the loop) it
reconnects with capped exponential backoff, keeping `Frame.seq` and
`Frame.pts` increasing, so that consumers never see a reconnect in the
timeline. A slow or dead source only ever blocks its own thread.

Why not `decode.iter_frames`: it ends a stream quietly on any FFmpeg error (right
for a truncated file), but live reading must tell PyAV's read-timeout tick (used
here so that `stop()` is prompt) from a broken connection, and carry on reading
after the tick. Opening and scaling are shared with decode.py.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import av
import av.container
import av.error
import numpy as np

from streamer.errors import VideoError
from streamer.ingest.audio import AudioChunk, AudioClock, AudioDecoder, AudioQueue
from streamer.ingest.base import OnState, StateReporter
from streamer.ingest.state import Backoff, SourceState
from streamer.media.decode import check_hwaccel, open_input, to_rgb
from streamer.pipeline.sampler import Act, SlotGate, is_tick, tick
from streamer.security.redact import redact_text, redact_url
from streamer.types import Frame

__all__ = [
    "SourceSpec",
    "SourceSpecError",
    "SourceStats",
    "FrameSource",
    "SourceKind",
    "detect_kind",
    "redact_url",
]

log = logging.getLogger(__name__)

SourceKind = Literal["rtsp", "file", "webcam", "lavfi", "url"]
OnFrame = Callable[[Frame], None]

# Network schemes handed to FFmpeg as they are ("url" sources).
NETWORK_SCHEMES = frozenset(
    {"http", "https", "hls", "udp", "rtp", "srt", "tcp", "tls", "rtmp", "rtmps", "rtmpt", "mmsh", "mmst", "ftp"}
)
RTSP_TRANSPORTS = frozenset({"tcp", "udp", "udp_multicast", "http", "https"})
_WEBCAM = re.compile(r"/dev/video\d+")

# A blocked network read gives up after this long, so that stop() is prompt.
# RTSP and devices resume reading after it; see FrameSource._decoded.
READ_TICK = 0.5
# stop() waits this long for the decode thread. One stuck in an FFmpeg call
# with no tick (opening a connection) is left to end at its own timeout.
JOIN_TIMEOUT = 1.5
# Frames posted to the loop but not yet delivered; past this a live source
# drops frames rather than fall behind real time (the loop is overloaded).
MAX_PENDING = 64
# A raw timestamp this far (seconds) behind the previous one is a restarted clock, not reordering.
DISCONTINUITY = 1.0


class SourceSpecError(VideoError, ValueError):
    """A source description that can never work (bad URL, unknown scheme, bad option)."""


def detect_kind(url: str) -> tuple[SourceKind, str, str | None]:
    """(kind, what to pass to av.open, FFmpeg input format) for a source URL.

    Raises SourceSpecError for anything that cannot be opened as a source.
    """
    if not url or not url.strip():
        raise SourceSpecError("empty source URL")
    if url.startswith("lavfi:"):
        graph = url[len("lavfi:") :]
        if not graph:
            raise SourceSpecError("lavfi: needs a filter graph, e.g. lavfi:testsrc2=size=320x240:rate=30")
        return "lavfi", graph, "lavfi"
    if _WEBCAM.fullmatch(url):
        return "webcam", url, "v4l2"  # checked at open: a camera may be plugged in later
    for device_format in ("avfoundation", "dshow"):  # macOS / Windows cameras: "avfoundation:0", "dshow:video=Cam"
        if url.startswith(device_format + ":"):
            import av

            if device_format not in av.formats_available:
                raise SourceSpecError(f"{url}: this FFmpeg build has no {device_format} input (not this platform?)")
            return "webcam", url[len(device_format) + 1 :], device_format
    if os.path.exists(url):
        return "file", _existing_file(url), None
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise SourceSpecError(f"{redact_url(url)}: malformed URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme in ("rtsp", "rtsps"):
        if not parts.hostname:
            raise SourceSpecError(f"{redact_url(url)}: RTSP URL without a host")
        return "rtsp", url, None
    if scheme == "file":
        path = unquote(parts.path)
        if not os.path.exists(path):
            raise SourceSpecError(f"{path}: no such file")
        return "file", _existing_file(path), None
    if scheme in NETWORK_SCHEMES:
        return "url", url, None
    if not scheme or "://" not in url:
        raise SourceSpecError(f"{url}: no such file")
    raise SourceSpecError(
        f"unsupported URL scheme {scheme!r} in {redact_url(url)} (expected rtsp://, rtsps://, "
        "http(s)://, udp://, srt://, tcp://, a file path or file://, /dev/videoN, or lavfi:<graph>)"
    )


def _existing_file(path: str) -> str:
    if os.path.isdir(path):
        raise SourceSpecError(f"{path}: is a directory, not a video file")
    return path


@dataclass(frozen=True, repr=False)
class SourceSpec:
    """What to ingest and how. `kind` is detected from `url`.

    Files play "as live" (paced to wall clock by pts) unless `realtime` is
    False; `loop` restarts them at the end with pts continuing.
    """

    stream_id: str
    url: str  # may hold credentials: log `redacted_url`, never this
    realtime: bool = True
    loop: bool = False
    rtsp_transport: str = "tcp"
    stall_timeout: float = 5.0  # no frame for this long: drop the connection, reconnect
    open_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_factor: float = 2.0
    backoff_cap: float = 30.0
    backoff_jitter: float = 0.2
    max_retries: int | None = None  # consecutive failed attempts before FAILED; None: forever
    short_side: int | None = None  # downscale so the shorter side is at most this
    hwaccel: str | None = None  # FFmpeg hardware decoder device ("cuda": NVDEC); software where unavailable
    # Decode the first audio stream too (16 kHz mono, on the video's clock) into `FrameSource.audio`:
    # for streams with speech. Off: no audio is decoded (nor, over RTSP, even received).
    audio: bool = False
    # Media time the first frame must come after (a stream taken over from another replica goes on
    # from its timeline); None: the source's own pts.
    start_after: float | None = None
    ffmpeg_options: Mapping[str, str] = field(default_factory=dict, hash=False)  # override FFmpeg input options
    # Called in the decode thread before every connect (sources added over HTTP): raises
    # ValueError when the destination is no longer allowed (a name now resolving to loopback).
    check_destination: Callable[[], None] | None = field(default=None, compare=False)
    # Called in the decode thread for every connect (rtsp:// added over HTTP): connects through the
    # redirect-refusing relay and returns it; FFmpeg opens its `url` instead of `target`. Raises
    # ValueError for a refused destination, OSError when unreachable. See security/rtsp_relay.py.
    relay: Callable[[], Any] | None = field(default=None, compare=False)
    kind: SourceKind = field(init=False)
    target: str = field(init=False)  # what av.open gets
    input_format: str | None = field(init=False)

    def __post_init__(self) -> None:
        if not self.stream_id:
            raise SourceSpecError("stream_id must not be empty")
        kind, target, input_format = detect_kind(self.url)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "input_format", input_format)
        if self.rtsp_transport not in RTSP_TRANSPORTS:
            raise SourceSpecError(
                f"rtsp_transport must be one of {sorted(RTSP_TRANSPORTS)}, got {self.rtsp_transport!r}"
            )
        for name in ("stall_timeout", "open_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise SourceSpecError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.short_side is not None and self.short_side < 1:
            raise SourceSpecError(f"short_side must be >= 1 or None, got {self.short_side}")
        if self.hwaccel is not None:
            try:
                check_hwaccel(self.hwaccel)
            except ValueError as exc:
                raise SourceSpecError(str(exc)) from None
        if self.max_retries is not None and self.max_retries < 0:
            raise SourceSpecError(f"max_retries must be >= 0 or None, got {self.max_retries}")
        try:
            self.new_backoff()
        except ValueError as exc:
            raise SourceSpecError(str(exc)) from exc

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    @property
    def is_live(self) -> bool:
        """True when the end of the input means the connection broke, not that it finished."""
        return self.kind != "file"

    @property
    def paced(self) -> bool:
        """Frames are released at the pace of their pts (files and synthetic graphs)."""
        return self.realtime and self.kind in ("file", "lavfi")

    @property
    def resumable_reads(self) -> bool:
        """Reads end every READ_TICK while idle and carry on where they were (RTSP, devices)."""
        return self.kind in ("rtsp", "webcam")

    def new_backoff(self) -> Backoff:
        return Backoff(self.backoff_initial, self.backoff_factor, self.backoff_cap, self.backoff_jitter)

    def av_options(self) -> dict[str, str]:
        options: dict[str, str] = {}
        if self.kind == "rtsp":
            options = {
                "rtsp_transport": self.rtsp_transport,
                # Socket I/O timeout in microseconds (FFmpeg 8 dropped `stimeout`);
                # a backstop only, the watchdog acts at stall_timeout.
                "timeout": str(int(max(self.open_timeout, self.stall_timeout) * 1_000_000)),
                "allowed_media_types": "video+audio" if self.audio else "video",
                # Hand frames out as they arrive: the first pts is otherwise often missing.
                "fflags": "nobuffer",
                "flags": "low_delay",
            }
        elif self.kind == "url":
            options = {"fflags": "nobuffer", "flags": "low_delay"}
        options.update(self.ffmpeg_options)
        return options

    def av_timeout(self) -> tuple[float, float] | None:
        """PyAV's (open, read) timeouts; None where reads cannot block (files, lavfi)."""
        if self.resumable_reads:
            return (self.open_timeout, READ_TICK)
        if self.kind == "url":
            # Segment-based protocols (HLS) wait for seconds inside one read and
            # cannot resume after an interrupt: only a real stall may end a read.
            return (self.open_timeout, self.stall_timeout)
        return None

    def __repr__(self) -> str:
        return f"SourceSpec(stream_id={self.stream_id!r}, url={self.redacted_url!r}, kind={self.kind!r})"


@dataclass(frozen=True, slots=True)
class SourceStats:
    frames: int = 0  # delivered to on_frame with an image
    dropped: int = 0  # decoded, but dropped because the loop fell behind
    unconverted: int = 0  # decoded, never converted to RGB: no sampler slot (or thumbnail) needed it
    skipped: int = 0  # never decoded: non-reference frames no slot or thumbnail could take
    decode_errors: int = 0  # packets the decoder rejected (skipped)
    reconnects: int = 0  # connection attempts after the first
    last_frame_wall_time: float | None = None  # time.time() of the newest delivered frame
    # Audio (streams with speech only; ingest/audio.py): seconds decoded, seconds dropped (the
    # segmenter fell behind, or unplaceable), undecodable packets and undecodable audio streams.
    audio_seconds: float = 0.0
    audio_dropped: float = 0.0
    audio_errors: int = 0


class _Timeline:
    """Maps each connection's raw pts onto one strictly increasing media timeline.

    The first connection keeps its pts. A later one (reconnect, file loop), or a
    jump back in time within one, starts one frame interval after the last
    frame: new = last + interval + (raw - first raw). Small steps back
    (reordering) are dropped.
    """

    def __init__(self, start_after: float | None = None) -> None:
        self.last: float | None = start_after  # set: the first connection is spliced after it too
        self.interval = 1 / 30
        self._shift: float | None = None
        self._prev_raw: float | None = None
        self.segment = 0  # counts splices: a raw pts means something else in each segment

    @property
    def shift(self) -> float | None:
        """Media time minus raw time in the current segment (None before its first frame): audio
        of the same connection takes the same (ingest/audio.py AudioClock)."""
        return self._shift

    def new_segment(self, interval: float | None) -> None:
        if interval and 1e-4 < interval < 10:
            self.interval = interval
        self._shift = None
        self._prev_raw = None
        self.segment += 1

    def predict(self, raw: float) -> float | None:
        """The media time a frame at `raw` will get in this segment; None before the segment's
        first frame fixes its offset, or for a time that would start a new segment."""
        if self._shift is None or self._prev_raw is None or raw < self._prev_raw - DISCONTINUITY:
            return None
        return raw + self._shift

    def place(self, raw: float | None) -> float | None:
        """Media time for a frame, or None to drop it (its time goes backwards)."""
        if raw is None and self._prev_raw is not None:
            raw = self._prev_raw + self.interval  # live demuxers omit a few timestamps
        elif raw is not None and self._prev_raw is not None and raw < self._prev_raw - DISCONTINUITY:
            self._shift = None  # the source restarted its clock (looping server, camera reboot): splice
            self.segment += 1
        if raw is None:
            pts = self.last + self.interval if self.last is not None else 0.0
        else:
            if self._shift is None:
                self._shift = 0.0 if self.last is None else self.last + self.interval - raw
            self._prev_raw = raw
            pts = raw + self._shift
        if self.last is not None and pts <= self.last:
            return None
        self.last = pts
        return pts


class _NonrefSkips:
    """Where the decoder may skip a frame (`skip_frame = NONREF`, set packet by packet): frames
    the gate will certainly not convert (`SlotGate.needless`) need not be decoded at all when
    no other frame refers to them. The decoder alone knows which those are (H.264/HEVC
    non-reference pictures: most B-frames) and skips only them, so every frame it does decode
    is bit-identical to a full decode.

    `needless` wants a frame on each side of the packet's that is certain to be offered:
    packets decoded without leave to skip serve as those. In decode order a B-frame comes after
    both frames it sits between, so B-frames find both; in a stream without them every packet
    is the newest, and nothing is skipped (nor could be: every frame is a reference).
    """

    KEEP = 64  # certain frames remembered (raw pts, this segment); B-frame runs are far shorter

    def __init__(self, gate: SlotGate, timeline: _Timeline) -> None:
        self._gate = gate
        self._timeline = timeline
        self._segment = timeline.segment
        self._certain: list[float] = []  # sorted raw pts of frames the decoder will hand out
        self._allowed: set[int] = set()  # packet pts (stream ticks) given leave to skip, fate unknown
        self.skipped = 0

    def allow(self, packet: av.Packet) -> bool:
        """Whether the decoder may skip this packet's frame (it does if it is a non-reference one)."""
        if packet.pts is None or packet.time_base is None:
            return False
        raw = float(packet.pts * packet.time_base)
        timeline = self._timeline
        if timeline.segment != self._segment:  # new connection or spliced clock: raw pts start over
            self._segment = timeline.segment
            self._certain.clear()
        certain = self._certain
        i = bisect.bisect_left(certain, raw)
        placed = timeline.predict(raw)
        if placed is not None and 0 < i < len(certain) and certain[i] != raw:
            shift = placed - raw
            if self._gate.needless(placed, certain[i - 1] + shift, certain[i] + shift):
                self._allowed.add(packet.pts)
                if len(self._allowed) > self.KEEP:  # fates lost across a splice: count them now
                    self._allowed.discard(min(self._allowed))
                    self.skipped += 1
                return True
        certain.insert(i, raw)
        if len(certain) > self.KEEP:
            del certain[0]
        return False

    def decoded(self, pts: int | None) -> None:
        """A frame came out (presentation order): if it had leave to skip, it was a reference frame;
        those with leave before it that never came out were skipped."""
        if not self._allowed or pts is None:
            return
        self._allowed.discard(pts)
        gone = [p for p in self._allowed if p < pts]
        self._allowed.difference_update(gone)
        self.skipped += len(gone)

    def end(self) -> None:
        """End of a connection: the decoder has handed out all it will (a file's last, empty packet
        drained it; a broken connection's frames with leave to skip are lost either way)."""
        self.skipped += len(self._allowed)
        self._allowed.clear()


@dataclass(frozen=True, slots=True)
class _Held:
    """A decoded frame the gate has not decided on yet (one at most)."""

    av_frame: av.VideoFrame
    pts: float
    arrival: float


@dataclass(frozen=True, slots=True)
class _Ready:
    """A frame to hand on: its image, or None for a tick; arrival None: now."""

    pts: float
    image: np.ndarray | None
    arrival: float | None = None


@dataclass(slots=True)
class _Ended:
    """Why one connection (or one pass over a file) ended."""

    reason: str
    frames: int = 0
    fatal: bool = False  # retrying cannot help


def _relay_refused(relayed: Any) -> _Ended | None:
    """The relay cut the connection (an RTSP redirect): say so, not what FFmpeg made of the cut."""
    if relayed is not None and relayed.refused:
        return _Ended(f"refused: {relayed.refused}", fatal=True)
    return None


class FrameSource(StateReporter):
    """Runs one source: decode thread, stall watchdog, reconnects.

    `on_frame` and `on_state` are called on the event loop that ran `start()`;
    `on_frame` must not block (hand the frame to a buffer and return).

    `gate`: the `SlotGate` of the sampler these frames feed (used by the decode
    thread only); the source then converts only what it lets through and also
    hands on ticks (`sampler.is_tick`). None: every frame is converted.
    `skip_nonref` (with a gate): the decoder skips non-reference frames the gate
    would never convert (`_NonrefSkips`; B-frames, mostly), which saves decoding
    them and changes no frame that is handed on.
    """

    def __init__(
        self, spec: SourceSpec, on_frame: OnFrame, on_state: OnState | None = None, *, gate: SlotGate | None = None,
        skip_nonref: bool = True,
    ) -> None:
        self.spec = spec
        self.gate = gate
        self._on_frame = on_frame
        self._on_state = on_state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._state = SourceState.STOPPED
        self._detail: str | None = None
        self._closing = False
        self._stopped: asyncio.Event | None = None
        # Set from the loop, read by the thread.
        self._stop_event = threading.Event()
        self._abandon = threading.Event()  # the watchdog saw a stall: drop this connection
        # Written by the thread only.
        self._seq = 0
        self._timeline = _Timeline(spec.start_after)
        self._skips = _NonrefSkips(gate, self._timeline) if gate is not None and skip_nonref else None
        self._connected = False
        self._progress = 0.0  # monotonic time of the last frame (or of the connection)
        self._posted = 0
        self._dropped = 0
        self._decode_errors = 0
        self._reconnects = 0
        self._unconverted = 0
        self._held: _Held | None = None
        self._anchor: tuple[float, float] | None = None  # (monotonic, pts) for pacing
        # Audio for speech (spec.audio): decoded in this thread, read by the loop from `audio`.
        self.audio: AudioQueue | None = AudioQueue(spec.stream_id) if spec.audio else None
        self._audio_clock = AudioClock(self._timeline, self.audio) if self.audio is not None else None
        self._audio_decoder: AudioDecoder | None = None
        self._audio_paced: deque[AudioChunk] = deque()  # placed, waiting for the video's pace (files as live)
        # Written by the loop only.
        self._delivered = 0
        self._frames = 0
        self._last_wall: float | None = None
        self._callback_failures = 0

    # -- public -----------------------------------------------------------------

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    @property
    def stats(self) -> SourceStats:
        audio = self.audio.stats if self.audio is not None else None
        return SourceStats(
            audio_seconds=audio.seconds if audio else 0.0,
            audio_dropped=audio.dropped if audio else 0.0,
            audio_errors=audio.errors if audio else 0,
            frames=self._frames,
            dropped=self._dropped,
            decode_errors=self._decode_errors,
            reconnects=self._reconnects,
            unconverted=self._unconverted,
            skipped=self._skips.skipped if self._skips is not None else 0,
            last_frame_wall_time=self._last_wall,
        )

    @property
    def is_running(self) -> bool:
        """Whether the decode thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self._thread is not None or self._closing:
            raise RuntimeError(f"source {self.stream_id!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._set_state(SourceState.CONNECTING, self.spec.redacted_url)
        self._thread = threading.Thread(target=self._run, name=f"ingest:{self.stream_id}", daemon=True)
        self._thread.start()
        if self.spec.is_live:  # a file cannot stall, and pacing may wait out long gaps in its pts
            self._watchdog = asyncio.create_task(self._watch(), name=f"ingest-watchdog:{self.stream_id}")

    async def stop(self) -> None:
        """Stop reading and join the decode thread. Idempotent; safe to call concurrently."""
        if self._stopped is not None:
            await self._stopped.wait()
            return
        self._stopped = asyncio.Event()
        self._closing = True
        self._stop_event.set()
        try:
            if self._watchdog is not None:
                self._watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watchdog
            thread = self._thread
            if thread is not None:
                # Poll rather than join in an executor: nothing here can block the loop.
                deadline = time.monotonic() + JOIN_TIMEOUT
                while thread.is_alive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if thread.is_alive():
                    log.warning(
                        "decode thread still inside FFmpeg; it exits at its timeout and delivers nothing more",
                        extra={"stream": self.stream_id, "url": self.spec.redacted_url},
                    )
        finally:
            if not self._state.final:  # a failure (or a file's end) stays visible
                self._emit(SourceState.STOPPED, "stopped")
            self._stopped.set()

    async def close(self) -> None:
        """The `Source` interface's name for `stop()`."""
        await self.stop()

    async def __aenter__(self) -> FrameSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"FrameSource({self.spec!r}, state={self._state.value})"

    # -- event loop side ----------------------------------------------------------

    def _log_fields(self) -> dict[str, Any]:
        return {"url": self.spec.redacted_url}

    def _deliver(self, frame: Frame) -> None:
        self._delivered += 1
        if self._closing:
            return
        if not is_tick(frame):
            self._frames += 1
        self._last_wall = frame.arrival
        try:
            self._on_frame(frame)
        except Exception:
            self._callback_failures += 1
            if self._callback_failures == 1:  # a broken consumer would otherwise log 30 times a second
                log.exception("on_frame callback failed", extra={"stream": self.stream_id})

    async def _watch(self) -> None:
        """Stall watchdog: no frame for stall_timeout -> STALLED, and tell the thread to reconnect."""
        timeout = self.spec.stall_timeout
        period = min(0.25, timeout / 4)
        while self._thread is not None and self._thread.is_alive():
            await asyncio.sleep(period)
            if not self._connected or self._abandon.is_set():
                continue
            idle = time.monotonic() - self._progress
            if idle > timeout:
                self._abandon.set()  # the thread sees it at its next packet or read tick
                self._set_state(SourceState.STALLED, f"no frame for {idle:.1f} s")

    # -- decode thread side -------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop_event.set()

    def _post_state(self, state: SourceState, detail: str | None) -> None:
        self._post(self._set_state, state, detail)

    def _run(self) -> None:
        spec = self.spec
        backoff = spec.new_backoff()
        failures = 0
        try:
            while not self._stop_event.is_set():
                ended = self._connect_and_read()
                if ended is None or self._stop_event.is_set():
                    return
                if ended.frames:
                    backoff.reset()
                    failures = 0
                if not spec.is_live and not ended.fatal:
                    if spec.loop and ended.frames:
                        continue  # next pass right away; pts carry on
                    self._post_state(SourceState.STOPPED, ended.reason)
                    return
                if ended.fatal:
                    self._post_state(SourceState.FAILED, ended.reason)
                    return
                failures += 1
                if spec.max_retries is not None and failures > spec.max_retries:
                    self._post_state(SourceState.FAILED, f"{ended.reason}; gave up after {spec.max_retries} retries")
                    return
                delay = backoff.next_delay()
                self._post_state(SourceState.RECONNECTING, f"{ended.reason}; retry {failures} in {delay:.1f} s")
                if self._stop_event.wait(delay):
                    return
                self._reconnects += 1
                self._anchor = None  # a new connection sets its own pace
        except Exception as exc:  # a bug here must not die silently in a thread
            log.exception("decode thread crashed", extra={"stream": self.stream_id})
            self._post_state(SourceState.FAILED, f"internal error: {self._clean(str(exc))}")

    def _connect_and_read(self) -> _Ended | None:
        """One connection: open, read until it ends. None when asked to stop."""
        spec = self.spec
        self._abandon.clear()
        if spec.check_destination is not None:
            try:
                spec.check_destination()
            except ValueError as exc:
                return _Ended(f"refused: {exc}", fatal=True)
        relayed = None
        if spec.relay is not None:
            try:
                relayed = spec.relay()
            except ValueError as exc:
                return _Ended(f"refused: {exc}", fatal=True)
            except OSError as exc:
                return _Ended(self._clean(str(exc)))
        try:
            try:
                container = open_input(
                    relayed.url if relayed is not None else spec.target, format=spec.input_format,
                    options=spec.av_options(), timeout=spec.av_timeout(),
                    hwaccel=spec.hwaccel, cancelled=self._stop_event.is_set,  # a FIFO's waits end at stop()
                )
            except VideoError as exc:
                return _relay_refused(relayed) or self._open_failed(exc)
            try:
                log.debug("opened", extra={"stream": self.stream_id, "url": spec.redacted_url})
                ended = self._read(container)
                return ended if ended is None else (_relay_refused(relayed) or ended)
            finally:
                self._release_held()
                self._end_audio()
                if self._skips is not None:
                    self._skips.end()
                self._connected = False
                container.close()
        finally:
            if relayed is not None:
                relayed.close()

    def _open_failed(self, exc: VideoError) -> _Ended:
        cause = exc.__cause__
        if isinstance(cause, av.error.ExitError):
            reason = f"cannot open (no answer within {self.spec.open_timeout:g} s)"
        else:
            reason = self._clean(str(exc))
        # A missing protocol, a broken file or filter graph stays broken; a network peer may come back.
        fatal = self.spec.kind in ("file", "lavfi") or isinstance(cause, av.error.ProtocolNotFoundError)
        return _Ended(reason, fatal=fatal)

    def _read(self, container: av.container.InputContainer) -> _Ended | None:
        spec = self.spec
        stream = container.streams.video[0]
        # Frame threads hold frames back (latency); files as live can afford them.
        stream.thread_type = "AUTO" if spec.kind == "file" else "SLICE"
        rate = stream.average_rate or stream.guessed_rate
        self._timeline.new_segment(1 / float(rate) if rate else None)
        self._start_audio(container)
        self._progress = time.monotonic()
        self._connected = True
        frames = 0
        try:
            for av_frame in self._decoded(container, stream):
                pts = self._timeline.place(av_frame.time)
                if pts is None:
                    continue
                # Converted before pacing: for files as live the wait hides it.
                if self.gate is None:
                    ready, hold = [_Ready(pts, to_rgb(av_frame, spec.short_side))], False
                else:
                    ready, hold = self._gated(av_frame, pts)
                if spec.paced and self._pace(pts):
                    return None
                if self._audio_clock is not None:
                    self._audio_ready(self._audio_clock.release(), pts)
                arrival = time.time()
                frames += 1
                self._progress = time.monotonic()
                if frames == 1:
                    self._post_state(SourceState.LIVE, None)
                if hold:
                    self._held = _Held(av_frame, pts, arrival)
                for item in ready:
                    if not self._hand_over(self._frame(item, arrival)):
                        return None
        except av.error.ExitError:
            reason = f"no data for {spec.stall_timeout:g} s"
        except av.error.FFmpegError as exc:
            if not spec.is_live and frames:  # a truncated file: keep what decoded
                log.warning("video ended early", extra={"stream": self.stream_id, "reason": self._clean(str(exc))})
                return _Ended("end of file", frames)
            reason = f"read error ({self._clean(str(exc))})"
        else:
            if self._stop_event.is_set():
                return None
            if self._abandon.is_set():
                reason = f"stalled: no frame for {spec.stall_timeout:g} s"
            elif spec.is_live:
                reason = "stream ended"
            else:
                reason = "end of file"
        if not frames and not spec.is_live:
            return _Ended(f"{spec.target}: contains no decodable video frames", fatal=True)
        return _Ended(reason, frames)

    def _decoded(self, container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
        codec = stream.codec_context
        skips, skipping = self._skips, False
        audio = self._audio_decoder
        streams = (stream, audio.stream) if audio is not None else (stream,)
        while True:
            try:
                for packet in container.demux(*streams):
                    if self._stop_event.is_set() or self._abandon.is_set():
                        return
                    if audio is not None and packet.stream.index == audio.index:  # (a flush packet's stream_index is 0)
                        self._audio_packet(audio, packet)
                        continue
                    if skips is not None and (allow := skips.allow(packet)) is not skipping:
                        # Read per packet (frame threads copy it with each packet they take).
                        codec.skip_frame = "NONREF" if allow else "DEFAULT"
                        skipping = allow
                    try:
                        frames = codec.decode(packet)
                    except av.error.FFmpegError as exc:
                        # One damaged packet (lost UDP datagram, cut-off file) costs a frame, not the stream.
                        self._decode_errors += 1
                        log.debug("packet rejected", extra={"stream": self.stream_id, "reason": self._clean(str(exc))})
                        continue
                    if skips is not None:
                        for av_frame in frames:
                            skips.decoded(av_frame.pts)
                    yield from frames
                return
            except av.error.ExitError:
                # PyAV's read timeout fired: READ_TICK without a packet. RTSP and
                # devices can go on reading where they were; the flags decide.
                if self._stop_event.is_set() or self._abandon.is_set():
                    return
                if not self.spec.resumable_reads:
                    raise

    # -- audio (spec.audio), decode thread side ----------------------------------------

    def _start_audio(self, container: av.container.InputContainer) -> None:
        """A new connection: its first audio stream, if any, decoded beside the video."""
        self._audio_decoder = None
        if self.audio is None or self._audio_clock is None:
            return
        self._audio_clock.new_connection()
        if not container.streams.audio:
            # Not an error: many cameras have no microphone. Said once; the stream stays live.
            self.audio.problem("none", "no audio stream: no speech cues for this stream", error=False,
                               level=logging.INFO)
            return
        decoder = AudioDecoder(container.streams.audio[0], self.audio)
        if decoder.usable:
            self._audio_decoder = decoder

    def _audio_packet(self, decoder: AudioDecoder, packet: av.Packet) -> None:
        assert self._audio_clock is not None
        now = time.time()
        for samples, raw in decoder.decode(packet):
            self._audio_ready(self._audio_clock.place(samples, raw, now), self._timeline.last)

    def _audio_ready(self, chunks: list[AudioChunk], video_pts: float | None) -> None:
        """Hand placed audio on: at once, or for a file played as live once the video's pace
        reaches it (so that audio arrives when it is heard, as from a camera)."""
        assert self.audio is not None
        if not self.spec.paced:
            if not self.spec.is_live:  # a file read as fast as possible: wait for the loop, lose nothing
                while self.audio.queued_seconds > self.audio.max_seconds / 2:
                    if self._stop_event.wait(0.005):
                        return
            for chunk in chunks:
                self.audio.put(chunk)
            return
        self._audio_paced.extend(chunks)
        now = time.time()
        while self._audio_paced and (video_pts is None or self._audio_paced[0].pts <= video_pts):
            chunk = self._audio_paced.popleft()
            self.audio.put(AudioChunk(chunk.samples, chunk.pts, now))
        while self._audio_paced and self._audio_paced[-1].end - self._audio_paced[0].pts > self.audio.max_seconds:
            self.audio.put(self._audio_paced.popleft())  # far ahead of the video (a badly interleaved file)

    def _end_audio(self) -> None:
        """End of a connection: what the decoder and the pacing still hold goes on, then an end mark."""
        if self.audio is None or self._audio_clock is None:
            return
        decoder, self._audio_decoder = self._audio_decoder, None
        if decoder is not None and not self._stop_event.is_set():
            now = time.time()
            for samples, raw in decoder.flush():
                self._audio_ready(self._audio_clock.place(samples, raw, now), self._timeline.last)
        while self._audio_paced:
            self.audio.put(self._audio_paced.popleft())
        self.audio.end()

    def _gated(self, av_frame: av.VideoFrame, pts: float) -> tuple[list[_Ready], bool]:
        """What to hand on now (the held frame first), converting only what the gate asks
        for, and whether to hold this frame until the next one."""
        assert self.gate is not None
        decision = self.gate.offer(pts)
        if decision.frame is Act.DROP:  # time going backwards (the timeline drops it first)
            self._unconverted += 1
            return [], False
        ready: list[_Ready] = []
        held, self._held = self._held, None
        if held is not None:
            if decision.held is Act.CONVERT:
                ready.append(_Ready(held.pts, to_rgb(held.av_frame, self.spec.short_side), held.arrival))
            else:
                self._unconverted += 1
                if decision.held is Act.TICK:
                    ready.append(_Ready(held.pts, None, held.arrival))
        if decision.frame is Act.CONVERT:
            ready.append(_Ready(pts, to_rgb(av_frame, self.spec.short_side)))
        return ready, decision.frame is Act.HOLD

    def _release_held(self) -> None:
        """End of a connection: the held frame may still be chosen by a later one (pts go on),
        and a decoder frame should not outlive its container: convert it now."""
        held, self._held = self._held, None
        if held is None or self.gate is None or not self.gate.release() or self._stop_event.is_set():
            return
        image = to_rgb(held.av_frame, self.spec.short_side)
        self._hand_over(self._frame(_Ready(held.pts, image, held.arrival), held.arrival))

    def _frame(self, item: _Ready, now: float) -> Frame:
        arrival = item.arrival if item.arrival is not None else now
        if item.image is None:
            frame = tick(self.stream_id, self._seq, item.pts, arrival)
        else:
            frame = Frame(self.stream_id, self._seq, item.pts, item.image, arrival)
        self._seq += 1
        return frame

    def _pace(self, pts: float) -> bool:
        """Sleep until the frame's time comes (files "as live"). True if stop came first."""
        now = time.monotonic()
        if self._anchor is None:
            self._anchor = (now, pts)
            return False
        wall0, pts0 = self._anchor
        delay = wall0 + (pts - pts0) - now
        if delay > 0:
            return self._stop_event.wait(delay)
        if delay < -1.0:  # fell behind (slow machine): go on from here rather than burst
            self._anchor = (now, pts)
        return False

    def _hand_over(self, frame: Frame) -> bool:
        """Post a frame to the loop without waiting for the consumer. False if stopping."""
        if self.spec.paced or self.spec.is_live:
            if self._posted - self._delivered >= MAX_PENDING:
                self._dropped += 1  # the loop is behind: keep real time, lose this frame
                return True
        else:
            # A file read as fast as possible has no real time to keep: wait for the loop instead.
            while self._posted - self._delivered >= MAX_PENDING:
                if self._stop_event.wait(0.005):
                    return False
        self._posted += 1
        self._post(self._deliver, frame)
        return not self._stop_event.is_set()

    def _clean(self, text: str) -> str:
        """Error text safe to log: every secret of the URL redacted, and the `url: ` prefix open_input adds dropped."""
        spec = self.spec
        for prefix in (spec.target + ": ", spec.url + ": "):
            if text.startswith(prefix):
                text = text[len(prefix) :]
        return redact_text(redact_text(text, spec.url), spec.target)
