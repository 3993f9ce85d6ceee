"""The records that flow between pipeline stages: Frame -> Window -> Caption (and StateChange).

Data only moves one way (ingest -> buffer -> sampler -> engine -> publish), and
every stage hands the next one of these immutable records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "EVENT_TYPES", "Answer", "Caption", "Chapter", "Frame", "FrameKey", "SpeechCue", "StateChange", "StreamEvent",
    "StreamResume", "WatchEvent", "Window", "tick",
]

FrameKey = tuple[str, int]


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One decoded video frame.

    `pts` is media time in seconds (what the container or RTP clock says, not
    wall time); `arrival` is the wall-clock time (time.time()) the frame was
    decoded, used for end-to-end latency.
    """

    stream_id: str
    seq: int  # per-stream, strictly increasing; with stream_id it names the frame
    pts: float
    image: np.ndarray = field(repr=False)  # H x W x 3, uint8, RGB
    arrival: float = 0.0

    @property
    def key(self) -> FrameKey:
        return (self.stream_id, self.seq)

    @property
    def is_tick(self) -> bool:
        """An image-less frame (`tick()`): carries time forward for the sampler, never shown or captioned."""
        return self.image.size == 0


_NO_IMAGE = np.empty((0, 0, 3), np.uint8)
_NO_IMAGE.flags.writeable = False


def tick(stream_id: str, seq: int, pts: float, arrival: float = 0.0) -> Frame:
    """A frame's timestamp without its image: a source that converts only the frames a sampler
    will choose (pipeline.sampler.SlotGate) hands these on for the others, so slots still close."""
    return Frame(stream_id, seq, pts, _NO_IMAGE, arrival)


@dataclass(frozen=True, slots=True, eq=False)
class Window:
    """The frames the model sees for one caption.

    `start`/`end` are the media timestamps of the first and last sampled frame.
    Overlapping windows share Frame objects, so the engine can encode each
    frame once.
    """

    stream_id: str
    index: int  # per-stream window counter
    frames: tuple[Frame, ...]

    @property
    def start(self) -> float:
        return self.frames[0].pts

    @property
    def end(self) -> float:
        return self.frames[-1].pts

    @property
    def capture_time(self) -> float:
        """Wall-clock arrival of the newest frame: when the caption could first be known."""
        return max(f.arrival for f in self.frames)


@dataclass(frozen=True, slots=True)
class Caption:
    """One caption for one window, with everything a client needs to place it."""

    stream_id: str
    index: int
    start: float  # media time of the window's first frame, seconds
    end: float  # media time of the window's last frame, seconds
    text: str
    confidence: float  # mean log-probability of the generated tokens (<= 0)
    model: str
    capture_time: float = 0.0  # wall clock: newest frame of the window arrived
    emit_time: float = 0.0  # wall clock: caption produced

    @property
    def latency(self) -> float:
        return max(0.0, self.emit_time - self.capture_time)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["latency"] = round(self.latency, 4)
        return data


@dataclass(frozen=True, slots=True)
class StateChange:
    """A stream's source changed state (connecting, live, stalled, ...; see ingest/state.py)."""

    stream_id: str
    state: str
    detail: str | None
    time: float  # wall clock of the change


@dataclass(frozen=True, slots=True)
class StreamResume:
    """Where a stream taken over from another replica goes on: the index of its next window and
    the media time its first frame must come after (cluster/ownership.py)."""

    next_index: int
    media_after: float

    @classmethod
    def after(cls, last: Caption, now: float) -> StreamResume:
        """After the last caption on the bus. A live source went on while nobody captioned it:
        the wall-clock time since that caption's newest frame is added to the timeline."""
        return cls(last.index + 1, last.end + max(0.0, now - last.capture_time))


class _Event:
    """What the opt-in message records share: their wire `type` and their replay time."""

    __slots__ = ()
    kind: ClassVar[str]
    emit_time: float

    @property
    def time(self) -> float:
        return self.emit_time

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class SpeechCue(_Event):
    """What was said in one utterance (speech/engine.py), on the same media clock as captions."""

    stream_id: str
    start: float  # media time the voice began, seconds
    end: float  # media time the voice ended, seconds
    text: str
    confidence: float  # mean log-probability of the generated tokens (<= 0)
    model: str
    capture_time: float = 0.0  # wall clock: the audio holding the utterance's end arrived
    emit_time: float = 0.0  # wall clock: cue produced

    @property
    def latency(self) -> float:
        """Utterance end -> cue (includes the VAD's wait for silence)."""
        return max(0.0, self.emit_time - self.capture_time)

    kind: ClassVar[str] = "speech"

    def to_dict(self) -> dict[str, Any]:
        data = _Event.to_dict(self)  # not super(): slots=True makes a new class, which breaks its cell
        data["latency"] = round(self.latency, 4)
        return data


# Messages beside captions and states. A WebSocket client or webhook gets them only when it
# asks for their type (`types`), so that v1 clients see no change (docs/protocol.md).


@dataclass(frozen=True, slots=True)
class Answer(_Event):
    """The answer to a question about one window of a stream (`POST /streams/{id}/ask`, `ask` over WS)."""

    stream_id: str
    index: int  # the window asked about
    start: float  # its media time span, seconds
    end: float
    question: str
    answer: str
    confidence: float  # mean log-probability of the answer's tokens (<= 0)
    model: str
    request_id: str | None = None  # the asker's, echoed (WebSocket)
    emit_time: float = 0.0  # wall clock: answer produced

    kind: ClassVar[str] = "answer"


@dataclass(frozen=True, slots=True)
class WatchEvent(_Event):
    """A watch's state changed (and held for its `hold` asks): its question's answer now matches
    (`on`) or no longer does (`off`)."""

    watch_id: str
    stream_id: str
    question: str
    state: str  # "on" | "off"
    answer: str
    start: float  # media time span of the window that settled the change
    end: float
    emit_time: float = 0.0

    kind: ClassVar[str] = "watch"


@dataclass(frozen=True, slots=True)
class Chapter(_Event):
    """A closed chapter of a stream's caption timeline: a lasting stretch of one scene."""

    stream_id: str
    index: int  # per stream, from 0
    start: float  # media time, seconds
    end: float
    title: str
    emit_time: float = 0.0

    kind: ClassVar[str] = "chapter"


StreamEvent = Answer | WatchEvent | Chapter | SpeechCue
EVENT_TYPES: tuple[str, ...] = ("answer", "watch", "chapter", "speech")  # opt-in message types
