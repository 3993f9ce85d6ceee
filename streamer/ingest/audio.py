"""Live audio for speech: decoded, resampled to 16 kHz mono float32, on the video's media clock.

Only sources of streams with speech decode audio (`SourceSpec.audio`, `WhipSession(audio=True)`);
with speech off nothing here runs. The pieces, in the order audio goes through them:

- `AudioDecoder` (a FrameSource's decode thread): one connection's first audio stream, packet by
  packet. An undecodable packet costs that packet; an audio codec FFmpeg cannot decode, or no audio
  stream at all, costs the audio, never the video. Each kind of problem is logged once per source.
- `Resampler`: to 16 kHz mono float32 (`av.AudioResampler`), set up anew when the input's rate,
  layout or sample format changes mid-stream (PyAV's resampler would otherwise go on converting at
  the first frame's rate: wrong speed, wrong times).
- `AudioClock` (FrameSource): puts each connection's raw audio times on the video's timeline with
  the video's own shift (source.py `_Timeline`), so a speech cue and a caption of the same moment
  carry the same media time across reconnects and file loops. Audio that comes before the video
  has fixed its shift (a new connection, a restarted clock) waits for it.
- `AudioQueue`: the bounded hand-over between the thread that decodes and the loop side that runs
  the voice-activity segmenter: drop-oldest, counted, with an end-of-input marker (`None`) where a
  connection or the source ended, so the segmenter closes the utterance it holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import av
import av.error
import numpy as np

from streamer.speech.vad import SAMPLE_RATE

__all__ = ["ArrivalClock", "AudioChunk", "AudioClock", "AudioDecoder", "AudioQueue", "AudioStats", "Resampler"]

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.1  # decoded audio is handed on in pieces about this long (fewer hand-overs, little delay)
QUEUE_SECONDS = 10.0  # audio waiting for the segmenter, per stream; past it the oldest gives way
HOLD_SECONDS = 3.0  # audio waiting for the video to fix its clock; past it, aligned to the video's latest time
DISCONTINUITY = 1.0  # seconds back in raw time that mean a restarted clock (as for video, source.py)
_GAP = 0.05  # seconds between two pieces' times that mean they do not follow each other


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """16 kHz mono float32 samples whose first one is at media time `pts` (the video's clock)."""

    samples: np.ndarray
    pts: float
    arrival: float  # wall clock (time.time()) it was decoded, or released for a file played as live

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.pts + self.duration


@dataclass(frozen=True, slots=True)
class AudioStats:
    seconds: float = 0.0  # audio decoded and queued
    dropped: float = 0.0  # seconds of it dropped: the queue was full (the segmenter fell behind) or it could not be placed
    errors: int = 0  # audio packets that did not decode, and audio streams that could not be decoded at all


class AudioQueue:
    """Bounded hand-over of `AudioChunk`s from a decode thread (or the loop) to the loop.

    `put()` and `end()` never wait, from any thread: past `max_seconds` the oldest chunks are
    dropped and counted (live audio, like live video: what is new matters). `get()` is the one
    consumer, on the event loop that called it first. `problem()` logs a kind of trouble once
    (the first time) and counts it."""

    def __init__(self, stream_id: str, max_seconds: float = QUEUE_SECONDS) -> None:
        self.stream_id = stream_id
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._items: deque[AudioChunk | None] = deque()
        self._queued = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._waiting = False
        self._seconds = 0.0
        self._dropped = 0.0
        self._errors = 0
        self._logged: set[str] = set()

    @property
    def stats(self) -> AudioStats:
        return AudioStats(seconds=round(self._seconds, 3), dropped=round(self._dropped, 3), errors=self._errors)

    @property
    def queued_seconds(self) -> float:
        return self._queued

    @property
    def empty(self) -> bool:
        return not self._items

    def put(self, chunk: AudioChunk) -> None:
        with self._lock:
            self._items.append(chunk)
            self._queued += chunk.duration
            self._seconds += chunk.duration
            while self._queued > self.max_seconds and len(self._items) > 1:
                old = self._items.popleft()
                if old is not None:
                    self._queued -= old.duration
                    self._dropped += old.duration
            self._wake()

    def end(self) -> None:
        """End of a connection or of the source: the segmenter closes its open utterance here."""
        with self._lock:
            if self._items and self._items[-1] is None:
                return
            self._items.append(None)
            self._wake()

    def dropped(self, seconds: float) -> None:
        """Audio lost before it could be queued (it could not be placed on the timeline)."""
        with self._lock:
            self._dropped += seconds

    def problem(self, kind: str, message: str, *, error: bool = True, level: int = logging.WARNING, **fields: Any) -> None:
        """Count a problem (`error`: it cost audio) and log its kind once for this source."""
        with self._lock:
            if error:
                self._errors += 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.log(level, message, extra={"stream": self.stream_id, "audio_problem": kind, **fields})

    def take(self) -> list[AudioChunk | None]:
        """Everything queued now, without waiting."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._queued = 0.0
            return items

    async def get(self) -> list[AudioChunk | None]:
        """Everything queued, oldest first (waits for something); None marks an end of input."""
        if self._ready is None:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    self._queued = 0.0
                    self._waiting = False
                    return items
                self._waiting = True
                self._ready.clear()
            await self._ready.wait()

    def _wake(self) -> None:  # under the lock
        if not self._waiting or self._loop is None or self._ready is None:
            return
        self._waiting = False
        try:
            self._loop.call_soon_threadsafe(self._ready.set)  # from the decode thread, or the loop itself
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


class Resampler:
    """av.AudioFrame -> (16 kHz mono float32 samples, raw time of the first one), pieces of about
    CHUNK_SECONDS. Set up anew when the input's rate, layout or format changes (said once)."""

    def __init__(self, on_change: Callable[[tuple, tuple], None] | None = None) -> None:
        self._on_change = on_change
        self._resampler = self._new()
        self._shape: tuple[int, str, str] | None = None
        self._next: float | None = None  # raw time right after the last sample out of the resampler
        self._pending: list[np.ndarray] = []
        self._pending_start: float | None = None
        self._pending_len = 0

    @staticmethod
    def _new() -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def push(self, frame: av.AudioFrame) -> list[tuple[np.ndarray, float]]:
        shape = (frame.sample_rate, frame.layout.name, frame.format.name)
        out: list[tuple[np.ndarray, float]] = []
        if self._shape is not None and shape != self._shape:
            out += self._emit(self._resampler.resample(None))
            self._resampler = self._new()
            if self._on_change is not None:
                self._on_change(self._shape, shape)
        self._shape = shape
        out += self._emit(self._resampler.resample(frame))
        return out

    def flush(self) -> list[tuple[np.ndarray, float]]:
        """End of input: what the resampler still holds, and the last short piece."""
        out = self._emit(self._resampler.resample(None)) if self._shape is not None else []
        self._resampler = self._new()
        self._shape = None
        self._next = None
        return out + self._take()

    def _emit(self, frames: list[av.AudioFrame]) -> list[tuple[np.ndarray, float]]:
        out: list[tuple[np.ndarray, float]] = []
        for frame in frames:
            samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if not len(samples):
                continue
            start = float(frame.time) if frame.time is not None else (self._next or 0.0)
            self._next = start + len(samples) / SAMPLE_RATE
            if self._pending and self._pending_start is not None:
                expected = self._pending_start + self._pending_len / SAMPLE_RATE
                if abs(start - expected) > _GAP:  # not a continuation: hand on what is pending first
                    out += self._take()
            if not self._pending:
                self._pending_start = start
            self._pending.append(samples)
            self._pending_len += len(samples)
            if self._pending_len >= CHUNK_SECONDS * SAMPLE_RATE:
                out += self._take()
        return out

    def _take(self) -> list[tuple[np.ndarray, float]]:
        if not self._pending or self._pending_start is None:
            return []
        piece = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        start = self._pending_start
        self._pending, self._pending_start, self._pending_len = [], None, 0
        return [(piece, start)]


class AudioDecoder:
    """One connection's first audio stream, decoded in the decode thread. `decode(packet)` returns
    (samples, raw time) pieces; it never raises for bad audio: problems go to `queue.problem`."""

    def __init__(self, stream: av.AudioStream, queue: AudioQueue) -> None:
        self.stream = stream
        self.queue = queue
        self.index = stream.index
        self.codec = stream.codec_context
        self.usable = self.codec is not None
        if not self.usable:
            queue.problem("codec", "audio codec cannot be decoded: no speech from this stream (video goes on)",
                          codec_tag=str(getattr(stream, "codec_tag", "") or "unknown"))
        self._resampler = Resampler(self._format_changed)

    def decode(self, packet: av.Packet) -> list[tuple[np.ndarray, float]]:
        if not self.usable:
            return []
        try:
            frames = self.codec.decode(packet)
        except av.error.FFmpegError as exc:
            # A damaged packet (lost datagram, corrupt file) costs its 20-60 ms of sound, not the stream.
            self.queue.problem("packet", "audio packet undecodable, skipped (counted; logged once)",
                               reason=str(exc)[:200])
            return []
        out: list[tuple[np.ndarray, float]] = []
        try:
            for frame in frames:
                out += self._resampler.push(frame)
        except (av.error.FFmpegError, ValueError) as exc:  # a layout or format the resampler refuses
            self.usable = False
            self.queue.problem("resample", "audio cannot be resampled: no speech from this stream (video goes on)",
                               reason=str(exc)[:200])
        return out

    def flush(self) -> list[tuple[np.ndarray, float]]:
        if not self.usable:
            return []
        try:
            return self._resampler.flush()
        except (av.error.FFmpegError, ValueError):
            return []

    def _format_changed(self, was: tuple, now: tuple) -> None:
        self.queue.problem("format", "audio format changed mid-stream: resampling anew (counted; logged once)",
                           error=False, was=list(was), now=list(now))


class VideoClock(Protocol):
    """What AudioClock reads of the video timeline (source.py `_Timeline`)."""

    segment: int  # counts splices
    last: float | None  # media time of the newest video frame

    @property
    def shift(self) -> float | None: ...  # media time - raw time in the current segment; None before its first frame


class AudioClock:
    """Raw audio times of one source onto its video's timeline, in the decode thread.

    Audio follows the video's shift, taken when the video fixes it: at the first video frame of
    each connection, and when the audio's own clock restarts (a looping server, a rebooted camera),
    at the video's next splice. Audio that arrives before that waits (`HOLD_SECONDS` at most; past
    it, the audio is aligned to the video's newest frame, said once). Chunks never overlap or go back."""

    def __init__(self, video: VideoClock, queue: AudioQueue) -> None:
        self._video = video
        self._queue = queue
        self._shift: float | None = None
        self._need_segment = 0  # the video segment whose shift the audio may take
        self._prev_raw: float | None = None
        self._held: deque[tuple[np.ndarray, float, float]] = deque()  # (samples, raw, arrival)
        self._held_seconds = 0.0
        self._end: float | None = None  # media time right after the last chunk placed

    def new_connection(self) -> None:
        """Call after the video timeline started its segment for a new connection."""
        self._shift = None
        self._need_segment = self._video.segment
        self._prev_raw = None
        self._drop_held()

    def place(self, samples: np.ndarray, raw: float, arrival: float) -> list[AudioChunk]:
        """The chunks ready now (this one and any held), on the video's timeline."""
        if self._prev_raw is not None and raw < self._prev_raw - DISCONTINUITY:
            # The audio clock restarted: the video's will too; wait for its new shift.
            self._shift = None
            self._need_segment = self._video.segment + 1
        self._prev_raw = raw
        self._held.append((samples, raw, arrival))
        self._held_seconds += len(samples) / SAMPLE_RATE
        return self.release()

    def release(self) -> list[AudioChunk]:
        """Held audio that can be placed now (call after each video frame was placed)."""
        if not self._held:
            return []
        if self._shift is None:
            video_shift = self._video.shift
            if video_shift is not None and self._video.segment >= self._need_segment:
                self._shift = video_shift
            elif self._held_seconds > HOLD_SECONDS and self._video.last is not None:
                # No splice came (the video's clock did not restart with the audio's): align the
                # newest audio with the newest video frame rather than lose it all.
                self._queue.problem("clock", "audio clock jumped without the video's: realigned to the video",
                                    error=False)
                _, raw, _ = self._held[-1]
                self._shift = self._video.last - raw
            else:
                while self._held_seconds > HOLD_SECONDS:  # no video to align with (yet): the oldest gives way
                    samples, _, _ = self._held.popleft()
                    self._held_seconds -= len(samples) / SAMPLE_RATE
                    self._queue.dropped(len(samples) / SAMPLE_RATE)
                return []
        out = []
        while self._held:
            samples, raw, arrival = self._held.popleft()
            chunk = self._trimmed(AudioChunk(samples, raw + self._shift, arrival))
            if chunk is not None:
                out.append(chunk)
        self._held_seconds = 0.0
        return out

    def _trimmed(self, chunk: AudioChunk) -> AudioChunk | None:
        """The part of `chunk` after what was already placed (a new connection's first audio can
        overlap the last one's)."""
        if self._end is not None and chunk.pts < self._end:
            cut = round((self._end - chunk.pts) * SAMPLE_RATE)
            if cut >= len(chunk.samples):
                self._queue.dropped(chunk.duration)
                return None
            self._queue.dropped(cut / SAMPLE_RATE)
            chunk = AudioChunk(chunk.samples[cut:], self._end, chunk.arrival)
        self._end = chunk.end
        return chunk

    def _drop_held(self) -> None:
        if self._held:
            self._queue.dropped(self._held_seconds)
        self._held.clear()
        self._held_seconds = 0.0


class ArrivalClock:
    """Raw audio times onto a video clock known only by arrival (WHIP: aiortc starts each track's
    RTP time at 0 at its first frame and keeps no sender-report mapping). The audio's offset is
    fixed once, from the earliest-arriving frames of both tracks: media = raw + (A - V), where A and
    V are the smallest (arrival - raw) seen of audio and video (the frames that waited least)."""

    def __init__(self) -> None:
        self.video_origin: float | None = None  # min(arrival - raw) over video frames so far
        self._audio_origin: float | None = None
        self._offset: float | None = None
        self._end: float | None = None

    def video(self, raw: float, arrival: float) -> None:
        origin = arrival - raw
        if self.video_origin is None or origin < self.video_origin:
            self.video_origin = origin

    def place(self, raw: float, arrival: float, seconds: float) -> float | None:
        """Media time for audio at `raw`; None while no video frame has come (the caller holds it)."""
        origin = arrival - raw
        if self._audio_origin is None or origin < self._audio_origin:
            self._audio_origin = origin
        if self._offset is None:
            if self.video_origin is None:
                return None
            self._offset = self._audio_origin - self.video_origin
        pts = raw + self._offset
        if self._end is not None and pts < self._end - _GAP:
            return None  # behind what was placed (a reordered or repeated frame)
        pts = max(pts, self._end) if self._end is not None else pts
        self._end = pts + seconds
        return pts
