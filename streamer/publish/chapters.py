"""Chapters: a stream's caption timeline cut at meaningful, lasting changes.

`Chapterer` is sans-I/O, like the stabilizer: fed one stream's captions in
order, it returns the chapters that closed. `ChapterSink` runs one per daemon
on the hub: it publishes a `chapter` event when one closes, keeps each
stream's recent chapters for `GET /streams/{id}/chapters`, and hands them to
the subtitle writer (`{id}.chapters.vtt`) when `[outputs]` is configured.

The rule
--------
A captioning model rarely says the same sentence twice about one scene: the
bundled model names the object right and flips its direction on about one
window in three at slow speeds, a real model rewords. So a window is compared
with the open chapter by its words, not its exact text:

- `label`: a caption *belongs* to the open chapter when the Jaccard
  similarity of its content words (lower case, without articles and the
  like) with the chapter's reference text (its most frequent caption so far)
  is at least `similarity`; else it belongs to the challenger (a new text,
  and then the texts like it), else it starts a new challenger.
- `Hysteresis` (publish/stabilizer.py, the hold rule watches share) runs
  over the majority label of the last `smooth` (3) windows, not each
  window's own: a challenger replaces the open chapter once it has had the
  majority `hold` (3) windows in a row. So an odd window (a flicker), or
  two, never cuts a chapter, and one odd window inside a new scene does not
  stop that scene from winning.
- Where the cut goes: between the window centres of the last window that
  belonged to the old chapter and the first window of the winning challenger,
  halfway. A window is captioned by what most of its frames show, so its
  centre says on which side of a cut it lies; halfway between the two
  centres puts the boundary within half a hop of the cut when the model
  follows the majority of frames.
- A chapter whose own texts came fewer than `hold` times (the first windows
  of a stream that begin in the middle of a cut, a challenger that won
  only by `patience`) is no chapter: it is merged into the next one.
- Title: the chapter's most frequent caption (ties: the earliest).

Two captions that differ in one content word of five are "the same scene"
(that is how direction flicker is absorbed): a cut between two scenes that
differ only in colour is then missed. Chapters are of the caption timeline:
they can only be as good as the captions. Measured on the demo's scenes
(24 runs of 5 scenes, 6-10 s each, the bundled model at 3 s windows every
second; tests/test_chapters.py has the 6 s case): 79 of 96 cuts found within
one hop, 13 chapters that are no scene, titles right on colour and shape in
106 of 116 chapters; a one-window flicker placed in each in-scene window in
turn added a chapter in 4 of 720 placements and hid a scene the model had
named in only 3 or 4 windows in 63.

Chapters are contiguous: one ends where the next starts; the first starts at
the first caption's `start`, the last (closed by `flush()` at the end of a
stream) ends at the last caption's `end`. A caption whose index or start does
not move forward (the stream was removed and added again) flushes the open
chapter and starts afresh; indices go on.

A stream taken over by another replica (cluster/ownership.py) goes on with its
chapters there: the new owner reads back what the old one published on the bus
(`ChapterRecovery`: the `chapter` messages of the stream's current run, the last
`keep`, and the captions since the last of them began), restores the rule from
them (`Chapterer.restore`: the open chapter keeps the old owner's start and
title; a chapter the old owner closed but never got onto the bus is published
now), then chapters its own captions. Nothing is published twice; within the
bus's retention nothing is lost. Where the bus cannot say (Redis unreachable,
the open chapter's start trimmed away) the stream's chapters start afresh,
said once in the log and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from streamer.publish.consumer import HubConsumer, Spawn
from streamer.publish.formats import CaptionWriter
from streamer.publish.hub import CaptionHub, HubMessage
from streamer.publish.stabilizer import Hysteresis
from streamer.types import Caption, Chapter, StateChange

__all__ = ["ChapterFiles", "ChapterHistory", "ChapterRecovery", "ChapterSink", "Chapterer", "Continuation", "chapter_cue",
           "chapter_dict", "chapters_json", "chapters_vtt", "similarity"]

log = logging.getLogger(__name__)

DEFAULT_HOLD = 3  # windows in a row: a chapter is a lasting change (the overlay's stabilizer holds 2)
DEFAULT_SIMILARITY = 0.6  # content-word Jaccard: one word of five differs -> 0.67, two -> 0.43
DEFAULT_SMOOTH = 3  # the rule follows the majority label of the last 3 windows: one odd window never counts
KEEP_PER_STREAM = 1000  # chapters kept per stream for GET /streams/{id}/chapters
MAX_STREAMS = 256  # streams whose chapters are kept (the least recently updated go first)

# Words that say nothing about what is on screen ("a man is riding a bike" ~ "man riding bike").
_STOP = frozenset({"a", "an", "the", "to", "is", "are", "was", "were", "be", "of", "in", "on", "at", "and", "or", "with",
                   "by", "for", "it", "its", "this", "that", "there"})
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the content words of two captions (1.0: the same words)."""
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 1.0 if a.strip().lower() == b.strip().lower() else 0.0
    return len(wa & wb) / len(wa | wb)


@dataclass(slots=True)
class _Seen:
    centre: float  # media time of the window's centre
    text: str
    label: str


_CURRENT = "\0chapter"  # the Hysteresis value of "belongs to the open chapter" (no caption is this text)
_GONE = "\0closed"  # a vote for a chapter that has closed


class Chapterer:
    """One stream's chapters (see the module docstring). `feed(caption)` returns the chapters it
    closed (usually none); `flush()` closes what is open at the end of the stream."""

    def __init__(self, stream_id: str, *, hold: int = DEFAULT_HOLD, similarity: float = DEFAULT_SIMILARITY,
                 patience: int | None = None, first_index: int = 0, smooth: int = DEFAULT_SMOOTH) -> None:
        if not 0.0 < similarity <= 1.0:
            raise ValueError(f"similarity must be in (0, 1], got {similarity!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
            raise ValueError(f"smooth must be an integer >= 1, got {smooth!r}")
        self.stream_id = stream_id
        self.hold = hold
        self.min_similarity = similarity
        self.patience = patience
        self.next_index = first_index
        self.smooth = smooth
        self._votes: deque[str] = deque(maxlen=smooth)
        self._rule: Hysteresis[str] = Hysteresis(hold, None, patience)  # validates hold and patience
        self._start: float | None = None  # the open chapter's start (media time)
        self._tally: Counter[str] = Counter()  # texts of the windows in the open chapter
        self._own = 0  # windows that belonged to it by the rule (not merged in)
        self._pending: list[_Seen] = []  # windows since the last one that belonged to it
        self._last_centre: float | None = None  # centre of the last window that belonged to it
        self._challenger: str | None = None  # the reference text of the challenger
        self._last: Caption | None = None  # the last caption fed

    @property
    def open_chapter(self) -> Chapter | None:
        """The open chapter as it stands (its end: the last caption's end); None before a caption."""
        if self._start is None or self._last is None:
            return None
        tally = self._tally + Counter(s.text for s in self._pending)
        return Chapter(self.stream_id, self.next_index, self._start, max(self._start, self._last.end), _title(tally) or "")

    def feed(self, caption: Caption) -> list[Chapter]:
        closed: list[Chapter] = []
        last = self._last
        if last is not None and (caption.index <= last.index or caption.start <= last.start):
            closed += self.flush()  # the stream started again: a new timeline
        if not (math.isfinite(caption.start) and math.isfinite(caption.end)):
            return closed  # no place on a timeline
        self._last = caption
        text = " ".join(caption.text.split())
        centre = (caption.start + caption.end) / 2
        if self._start is None:
            self._start = caption.start
        if not text:
            return closed  # the model said nothing: neither for nor against
        label = self._label(text)
        self._pending.append(_Seen(centre, text, label))
        self._votes.append(label)
        vote = _majority(self._votes) if self.smooth > 1 else label
        if vote is not None:
            self._rule.update(vote)
        if vote is not None and vote != _CURRENT and self._rule.changed:
            won = [s for s in self._pending if s.label == vote]
            run = 0  # won by `hold` in a row, or by `patience`
            for seen in reversed(self._pending):
                if seen.label != vote:
                    break
                run += 1
            first = won[0] if won and (run >= self.hold or self.smooth > 1) else self._pending[0]
            chapter = self._cut(vote, first)
            if chapter is not None:
                closed.append(chapter)
        elif label == _CURRENT:
            self._belongs(centre)
        return closed

    def restore(self, closed: Sequence[Chapter], captions: Sequence[Caption]) -> list[Chapter]:
        """Continue another Chapterer's timeline (a stream taken over from another replica): `closed`,
        its closed chapters, oldest first; `captions`, in order, those whose window centre is at or
        after the last closed chapter's start (all of them when nothing closed yet). Only on a
        Chapterer nothing was fed to yet. Returns the chapters the replay closed after `closed[-1]`:
        chapters whose event was never published (usually none).

        The rule is replayed over the captions, so the open chapter gets the old one's start and
        title. Replayed from the last closed chapter's start, the cut that closed it is made again
        and leaves the state it left (the windows after it, and how each was labelled); when the
        replay does not close that chapter as it was (it began mid-way through the old one's
        state), it is replayed from the chapter's end instead: exact when the windows after the cut
        agree with one another. tests/test_chapters_takeover.py checks both at every caption of the
        demo's scenes, flickers included."""
        if self._last is not None or self._start is not None:
            raise RuntimeError("restore() is for a Chapterer that has not been fed")
        captions = [c for c in captions if math.isfinite(c.start) and math.isfinite(c.end)]
        if not closed:
            return [c for caption in captions for c in self.feed(caption)]
        last = closed[-1]
        after = [c for c in captions if (c.start + c.end) / 2 >= last.end]
        if not after:  # the last chapter was closed by the end of its run: the next caption starts afresh
            self.next_index = last.index + 1
            return []
        replayed = self._replay(last.index, last.start, [c for c in captions if (c.start + c.end) / 2 >= last.start])
        again = replayed[0] if replayed else None
        if again is not None and (again.index, again.end, again.title) == (last.index, last.end, last.title):
            return replayed[1:]
        self._reset()
        return self._replay(last.index + 1, last.end, after)

    def _replay(self, index: int, start: float, captions: list[Caption]) -> list[Chapter]:
        self.next_index, self._start = index, start
        return [c for caption in captions for c in self.feed(caption)]

    def flush(self, end: float | None = None) -> list[Chapter]:
        """Close what is open at `end` (default: the last caption's end); afterwards the next caption
        starts afresh. A challenger that came `hold` times among the last windows (in a row or not:
        the end of a file cuts its last scene short) closes the chapter before it first."""
        if self._start is None or self._last is None:
            self._reset()
            return []
        out: list[Chapter] = []
        challengers = Counter(s.label for s in self._pending if s.label != _CURRENT)
        if challengers:
            label, count = challengers.most_common(1)[0]
            if count >= self.hold:
                chapter = self._cut(label, next(s for s in self._pending if s.label == label))
                out += [chapter] if chapter is not None else []
        assert self._start is not None
        tally = self._tally + Counter(s.text for s in self._pending)
        stop = self._last.end if end is None else end
        out.append(self._chapter(self._start, max(stop, self._start), tally))
        self._reset()
        return out

    # -- internals ------------------------------------------------------------------
    def _label(self, text: str) -> str:
        reference = _title(self._tally)
        if reference is None or similarity(text, reference) >= self.min_similarity:
            return _CURRENT
        challenger = self._challenger
        if challenger is not None and similarity(text, challenger) >= self.min_similarity:
            return challenger
        self._challenger = text
        return text

    def _belongs(self, centre: float) -> None:
        for seen in self._pending:
            self._tally[seen.text] += 1
        self._pending = []
        self._own += 1
        self._last_centre = centre
        self._challenger = None

    def _cut(self, label: str, first: _Seen) -> Chapter | None:
        """The challenger `label` won from `first` on: close the open chapter halfway between the last
        window that belonged to it and `first`; the new chapter starts there."""
        assert self._start is not None
        last_centre = self._last_centre if self._last_centre is not None else self._start
        boundary = max(self._start, (last_centre + first.centre) / 2)
        old = self._tally + Counter(s.text for s in self._pending if s.centre < boundary)
        after = [s for s in self._pending if s.centre >= boundary]
        new = Counter(s.text for s in after)
        earned = self._own >= self.hold
        self._own = sum(1 for s in after if s.label == label)
        self._last_centre = max((s.centre for s in after if s.label == label), default=None)
        self._pending, self._challenger = [], None
        self._rule.reset()
        self._rule.update(_CURRENT)
        self._votes = deque((_CURRENT if v == label else _GONE for v in self._votes), maxlen=self.smooth)
        if not earned:  # not a lasting stretch: it is the start of the next chapter
            self._tally = old + new
            return None
        chapter = self._chapter(self._start, boundary, old)
        self._start, self._tally = boundary, new
        return chapter

    def _chapter(self, start: float, end: float, tally: Counter[str]) -> Chapter:
        chapter = Chapter(self.stream_id, self.next_index, start, end, _title(tally) or "")
        self.next_index += 1
        return chapter

    def _reset(self) -> None:
        self._rule.reset()
        self._start, self._tally, self._own, self._pending = None, Counter(), 0, []
        self._last_centre, self._challenger, self._last = None, None, None
        self._votes = deque(maxlen=self.smooth)


def _majority(votes: deque[str]) -> str | None:
    """The label most of the last windows have; before there are enough, the most common so far."""
    label, count = Counter(votes).most_common(1)[0]
    full = len(votes) >= (votes.maxlen or 0)
    return label if count * 2 > len(votes) or not full else None


def _title(tally: Counter[str]) -> str | None:
    if not tally:
        return None
    best = max(tally.values())
    return next(text for text, n in tally.items() if n == best)  # insertion order: the earliest of the tied


# -- a stream taken over: what the old owner published --------------------------------------------------------


def _centre(caption: Caption) -> float:
    return (caption.start + caption.end) / 2


_SLACK = 1e-6  # seconds: times read back from JSON are the floats written, give or take nothing


@dataclass(frozen=True, slots=True)
class Continuation:
    """What a new owner continues a stream's chapters from (`Chapterer.restore`)."""

    closed: tuple[Chapter, ...]  # the run's closed chapters, oldest first (the last `keep`)
    captions: tuple[Caption, ...]  # oldest first: those of the last closed chapter and the open one
    upto: int | None  # the newest bus seq read: the new owner's later messages are new to the rule
    skipped: int  # chapter messages that did not fit the stream's chapters (left out)


class ChapterRecovery:
    """Sans-I/O: fed one stream's bus messages newest first (`feed` says whether it wants more), it
    finds the chapters of the stream's current run that its owner published, and the captions the
    rule needs to continue: those at or after the last closed chapter's start.

    Everything is read back from Redis, so each message was checked by the bus (types, finite
    chapter times); here each must also fit the stream's timeline. Captions go back in index and
    media time: one that does not is of an earlier run, and the scan stops there. A chapter is
    published after the caption that closed it, so it must end no later than the caption before it
    on the bus; older chapters are numbered down and end where the next one starts or before. One
    that does not fit is skipped and counted (`skipped`). A message older than `since` (the stream's
    registration: an earlier stream of the same id) ends the scan too. A message the bus appended
    twice (it delivers at least once) counts once."""

    def __init__(self, stream_id: str, *, keep: int = KEEP_PER_STREAM, since: float | None = None) -> None:
        self.stream_id, self.keep, self.since = stream_id, keep, since
        self._chapters: list[Chapter] = []  # newest first
        self._unchecked: list[Chapter] = []  # read since the last caption, newest first: checked against the next one
        self._captions: list[Caption] = []  # newest first
        self._seen: set[tuple[int, float]] = set()  # (index, emit_time) of the captions read
        self._newer: Caption | None = None  # the caption read last (the next one in time)
        self._captions_done = False
        self.bounded = False  # the run's (or the registration's) start was read: the history is whole
        self.upto: int | None = None
        self.oldest_seq: int | None = None
        self.skipped = 0

    def feed(self, message: HubMessage) -> bool:
        """One message, newer ones first. False: it has what it needs (read no more)."""
        if self.bounded:
            return False
        if message.bus_seq is not None:
            self.upto = message.bus_seq if self.upto is None else self.upto
            self.oldest_seq = message.bus_seq
        payload = message.payload
        if isinstance(payload, (Caption, Chapter)) and payload.stream_id == self.stream_id:
            if self.since is not None and payload.emit_time < self.since:
                self._bound()  # an earlier stream of this id, since removed
            elif isinstance(payload, Caption):
                self._caption(payload)
            else:
                self._unchecked.append(payload)
        return not self.bounded and not (self._captions_done and len(self._chapters) >= self.keep)

    def result(self, *, read_all: bool) -> Continuation | None:
        """What to continue from; None when the history does not say where the open chapter began
        (trimmed past retention with no chapter closed since), or holds nothing of the stream.
        `read_all`: the scan reached the oldest entry kept."""
        if not self._chapters and not self._captions:
            return None
        whole = self.bounded or bool(self._chapters) or (read_all and self.oldest_seq in (None, 1))
        if not whole:
            return None
        chapters = self._chapters[:self.keep]
        return Continuation(tuple(reversed(chapters)), tuple(reversed(self._captions)), self.upto, self.skipped)

    @property
    def found(self) -> tuple[int, int]:
        """(closed chapters, captions) found so far."""
        return len(self._chapters), len(self._captions)

    def _bound(self) -> None:
        self.bounded = True
        self._unchecked = []  # published after an earlier run's last caption: that run's

    def _caption(self, caption: Caption) -> None:
        if not (math.isfinite(caption.start) and math.isfinite(caption.end)):
            return  # no place on a timeline: the rule skips it too
        key = (caption.index, caption.emit_time)
        if key in self._seen:
            return  # appended twice
        newer = self._newer
        if newer is not None and (newer.index <= caption.index or newer.start <= caption.start):
            self._bound()  # the timeline started again after this one (as `Chapterer.feed` sees it)
            return
        self._seen.add(key)
        self._newer = caption
        for chapter in self._unchecked:
            self._chapter(chapter, caption)
        self._unchecked = []
        if self._captions_done:
            return
        if self._chapters and _centre(caption) < self._chapters[0].start:
            self._captions_done = True  # older ones are before the last closed chapter: not needed
            return
        self._captions.append(caption)

    def _chapter(self, chapter: Chapter, before: Caption) -> None:
        """A chapter published after the caption `before` (the trigger that closed it, or a later one)."""
        if chapter.end > before.end + _SLACK:
            self.skipped += 1  # ends after the captions it was closed by: not one of this stream's chapters
            return
        if not self._chapters:
            self._chapters.append(chapter)
            return
        newer = self._chapters[-1]
        if (chapter.index, chapter.start, chapter.end) == (newer.index, newer.start, newer.end):
            return  # appended twice
        if chapter.index < newer.index and chapter.end <= newer.start + _SLACK:
            self._chapters.append(chapter)
        else:
            self.skipped += 1


class ChapterHistory(Protocol):
    """Where a stream's published messages are read back from (publish/bus.py's CaptionBus)."""

    def newest_first(self, stream_id: str) -> AsyncGenerator[HubMessage, None]: ...


# -- output forms ------------------------------------------------------------------------------------------


def chapter_dict(chapter: Chapter, open_: bool = False) -> dict[str, Any]:
    """A chapter as JSON (GET /streams/{id}/chapters, `streamer caption --chapters`): the `chapter`
    message's fields, and `open`: the chapter still going on (its end is the latest caption's)."""
    data = chapter.to_dict()
    for key in ("start", "end"):
        data[key] = round(data[key], 3)
    data["open"] = open_
    return data


def chapters_json(chapters: list[Chapter], open_chapter: Chapter | None = None) -> list[dict[str, Any]]:
    return [chapter_dict(c) for c in chapters] + ([chapter_dict(open_chapter, True)] if open_chapter else [])


def chapter_cue(chapter: Chapter, out: Any, offset: float = 0.0) -> float | None:
    """One WebVTT cue for `chapter` (times + `offset`) written to `out`, formatted as subtitle cues are
    (publish/formats.py: millisecond times, escaped one-line text). Returns where it ends (None: an empty
    title writes no cue)."""
    writer = CaptionWriter("vtt", out, min_duration=0.0, header=False)
    writer.write(Caption(chapter.stream_id, chapter.index, chapter.start + offset, chapter.end + offset,
                         chapter.title, 0.0, ""))
    writer.close()
    return writer.last_end


def chapters_vtt(chapters: list[Chapter]) -> str:
    """A WebVTT chapters track (`<track kind="chapters">`): one cue per chapter, its title as text."""
    out = io.StringIO()
    out.write("WEBVTT\n\n")
    for chapter in chapters:
        chapter_cue(chapter, out)
    return out.getvalue()


# -- the live sink -------------------------------------------------------------------------------------------


class ChapterFiles(Protocol):
    """Where closed chapters are written (publish/subtitles.py: `{id}.chapters.vtt`)."""

    def submit_chapter(self, chapter: Chapter) -> None: ...


class _Restoring:
    """A stream taken over whose chapters are being read back from the bus."""

    __slots__ = ("done", "task", "waiting")

    def __init__(self) -> None:
        self.waiting: list[HubMessage] = []  # its messages meanwhile, in order
        self.done = asyncio.Event()
        self.task: asyncio.Task | None = None


_MAX_WAITING = 4096  # a stream's messages held while its chapters are read back (a minute's worth or more)
_READING_AT_ONCE = 2  # streams whose chapters are read back at once


class ChapterSink(HubConsumer):
    """Chapters of every stream this daemon captions (one per daemon; with a bus, of the streams it owns).

    Reads captions and states from the hub; when a chapter closes it is kept (the last `keep` per
    stream), handed to `files` (the subtitle writer, when [outputs] is configured) and published as a
    `chapter` event. A stream's open chapter is closed `end_grace` seconds after its state became
    stopped or failed and its captions stopped coming (the windows still waiting when a file ends are
    captioned after its `stopped`), and at `close()`. Never blocks: the rule is a few set operations
    per caption.

    A stream taken over from another replica (`take_over`, called by cluster/ownership.py before the
    stream starts here) goes on with the chapters its old owner published: they are read back from
    the bus (`ChapterRecovery`) while the stream's first messages wait, then the rule is restored
    (`Chapterer.restore`) and the waiting messages are fed to it. When the bus cannot say (Redis
    unreachable, the history trimmed past the open chapter's start, `restore_timeout` spent) the
    stream's chapters start afresh here, said once in the log and counted
    (`streamer_bus_errors_total{op="chapters_afresh"}` with `metrics`)."""

    consumer_name = "chapters"

    def __init__(self, *, hold: int = DEFAULT_HOLD, similarity: float = DEFAULT_SIMILARITY, keep: int = KEEP_PER_STREAM,
                 max_streams: int = MAX_STREAMS, files: ChapterFiles | None = None,
                 clock: Callable[[], float] = time.time, end_grace: float = 5.0, metrics: Any = None,
                 restore_timeout: float = 10.0) -> None:
        Chapterer("check", hold=hold, similarity=similarity)  # validates the rule's settings here
        if keep < 1 or max_streams < 1:
            raise ValueError("keep and max_streams must be >= 1")
        self.hold, self.similarity, self.keep, self.max_streams = hold, similarity, keep, max_streams
        self.files = files
        self.end_grace = end_grace
        self.restore_timeout = restore_timeout
        self.metrics = metrics  # DaemonMetrics, or None
        if metrics is not None:
            metrics.bus_errors.labels(op="chapters_afresh")  # the series exists from the start, at 0
        self._clock = clock
        self._ending: dict[str, asyncio.TimerHandle] = {}  # stopped streams: when their open chapter closes
        self._rules: dict[str, Chapterer] = {}
        self._next_index: dict[str, int] = {}  # streams whose rule was flushed: where indices go on
        self._kept: OrderedDict[str, deque[Chapter]] = OrderedDict()  # least recently updated first
        self._restoring: dict[str, _Restoring] = {}  # streams taken over, their chapters being read back
        self._read_upto: dict[str, int] = {}  # stream -> newest bus seq its restore read (not to be fed again)
        # Reading a history back is mostly the event loop's CPU (~0.4 s for 10,000 entries, docs/scale.md):
        # a replica taking over many streams reads two at a time, the others' captions wait their turn.
        self._reading = asyncio.Semaphore(_READING_AT_ONCE)
        self._tasks: set[asyncio.Task] = set()  # the restores running
        self.chapters_closed = 0
        self.restores = {"continued": 0, "afresh": 0, "skipped": 0}  # takeovers, and chapter entries left out
        self._init_consumer()
        self._closed = False

    async def start(self, hub: CaptionHub, spawn: Spawn | None = None) -> None:
        if self._closed:
            raise RuntimeError("ChapterSink is closed")
        if self._consumer is None:
            self._start_consuming(hub, spawn)

    async def close(self, force: bool = False) -> None:
        """Handle what the hub still holds for it, then close every open chapter (idempotent)."""
        if self._closed:
            return
        await self._stop_consuming()
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream_id, state in list(self._restoring.items()):  # its messages here would start wrong chapters
            del self._restoring[stream_id]
            state.done.set()
            log.warning("chapters of a stream taken over not restored: the server shut down first",
                        extra={"stream": stream_id, "captions_dropped": len(state.waiting)})
        for handle in self._ending.values():
            handle.cancel()
        self._ending.clear()
        for stream_id in list(self._rules):
            self._flush(stream_id)

    def take_over(self, stream_id: str, history: ChapterHistory, since: float | None = None) -> None:
        """This replica takes `stream_id` over (before it starts here): its chapters go on from what
        its old owner published to `history` (the bus) since `since` (its registration, wall clock),
        read in the background; its messages wait meanwhile, so that the first one captioned here is
        chaptered after the old owner's. Whatever this replica still held of the stream (an earlier
        ownership) is dropped unflushed: the bus says what was published."""
        if self._closed:
            return
        self._cancel_restore(stream_id)
        earlier = self._restoring.pop(stream_id, None)
        if earlier is not None:  # taken, lost and taken again before its chapters were read back
            earlier.done.set()
        handle = self._ending.pop(stream_id, None)
        if handle is not None:
            handle.cancel()
        self._rules.pop(stream_id, None)
        self._kept.pop(stream_id, None)
        self._read_upto.pop(stream_id, None)
        if since is not None and not (math.isfinite(since) and since > 0):
            since = None  # read from Redis: a registration time that is no time does not bound anything
        state = self._restoring[stream_id] = _Restoring()
        state.task = task = asyncio.get_running_loop().create_task(self._restore(stream_id, history, since),
                                                                   name=f"chapters-restore:{stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._restore_done)

    def _restore_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors += 1
            log.error("reading a stream's chapters back failed", exc_info=task.exception())

    async def settled(self, stream_id: str, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the stream's chapters are not being read back; False: still are."""
        state = self._restoring.get(stream_id)
        if state is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await state.done.wait()
        except TimeoutError:
            return False
        return True

    def chapters(self, stream_id: str) -> list[Chapter]:
        """The closed chapters of the stream's current (or last) run kept here, oldest first: its media
        times start again when it is added again, so an earlier run's are not mixed in (indices go on)."""
        return list(self._kept.get(stream_id, ()))

    def open_chapter(self, stream_id: str) -> Chapter | None:
        rule = self._rules.get(stream_id)
        return rule.open_chapter if rule is not None else None

    def knows(self, stream_id: str) -> bool:
        return stream_id in self._kept or stream_id in self._rules or stream_id in self._restoring

    # -- loop side ----------------------------------------------------------------------
    def _on_message(self, message: HubMessage) -> None:
        payload = message.payload
        sid = payload.stream_id
        state = self._restoring.get(sid)
        if state is not None:  # taken over: its chapters are being read back; after them
            state.waiting.append(message)
            if len(state.waiting) > _MAX_WAITING:
                self._cancel_restore(sid)
                self._restored(sid, None, f"more than {_MAX_WAITING} of its messages waited for them")
            return
        upto = self._read_upto.get(sid)
        if upto is not None and message.bus_seq is not None:
            if message.bus_seq > upto:
                del self._read_upto[sid]
            elif isinstance(payload, Caption):
                return  # the restore read it already (and fed it to the rule)
        if isinstance(payload, Caption):
            if payload.stream_id in self._ending:  # its last windows are still being captioned: wait on
                self._end_later(payload.stream_id)
            rule = self._rules.get(payload.stream_id)
            if rule is None:  # a new run of the stream (added, or back after it stopped): its chapters start here
                rule = self._rules[payload.stream_id] = Chapterer(
                    payload.stream_id, hold=self.hold, similarity=self.similarity,
                    first_index=self._next_index.pop(payload.stream_id, 0))
                self._kept.pop(payload.stream_id, None)
            for chapter in rule.feed(payload):
                self._closed_one(chapter)
        elif isinstance(payload, StateChange):
            if payload.state in ("stopped", "failed"):
                self._end_later(payload.stream_id)
            else:  # going again (a new source, a reconnect): its chapter goes on
                handle = self._ending.pop(payload.stream_id, None)
                if handle is not None:
                    handle.cancel()

    async def _restore(self, stream_id: str, history: ChapterHistory, since: float | None) -> None:
        recovery = ChapterRecovery(stream_id, keep=self.keep, since=since)
        found, why = None, None
        limit: asyncio.Timeout | None = None
        try:
            async with self._reading:  # the time limit starts with the reading, not with the wait for a turn
                limit = asyncio.timeout(self.restore_timeout)
                async with limit, contextlib.aclosing(history.newest_first(stream_id)) as messages:
                    read_all = True
                    async for message in messages:
                        if not recovery.feed(message):
                            read_all = False
                            break
            found = recovery.result(read_all=read_all)
            if found is None and recovery.found != (0, 0):
                why = "the bus no longer holds where the open chapter began (history trimmed past its retention)"
        except Exception as exc:  # noqa: BLE001 - Redis unreachable (or a call timed out), anything else: afresh, said
            why = (f"reading them back took more than {self.restore_timeout:g} s" if limit and limit.expired()
                   else f"the bus could not be read ({type(exc).__name__}: {str(exc)[:200]})")
        if recovery.skipped:
            self.restores["skipped"] += recovery.skipped
            if self.metrics is not None:
                self.metrics.bus_errors.labels(op="bad_entry").inc(recovery.skipped)
            log.warning("chapter messages on the bus that do not fit the stream's chapters were left out",
                        extra={"stream": stream_id, "skipped": recovery.skipped})
        self._restored(stream_id, found, why)

    def _restored(self, stream_id: str, found: Continuation | None, why: str | None) -> None:
        """The restore of a stream taken over ended: continue from `found`, or start afresh (`why`:
        what went wrong; None: there was nothing to continue); then the messages that waited."""
        state = self._restoring.pop(stream_id, None)
        if state is None:
            return
        if found is not None:
            rule = Chapterer(stream_id, hold=self.hold, similarity=self.similarity)
            missed = rule.restore(found.closed, found.captions)
            if rule.open_chapter is not None or missed:
                self._rules[stream_id] = rule
            else:  # its last run ended (its last chapter closed at its end): the next caption starts a new one
                self._next_index[stream_id] = rule.next_index
            self._kept.pop(stream_id, None)
            self._kept[stream_id] = deque(found.closed, maxlen=self.keep)
            while len(self._kept) > self.max_streams:
                self._kept.popitem(last=False)
            if found.upto is not None:
                self._read_upto[stream_id] = found.upto
            for chapter in missed:  # closed by the old owner's captions, but its event never reached the bus
                self._closed_one(chapter)
            self.restores["continued"] += 1
            log.info("chapters of a stream taken over continue from the bus",
                     extra={"stream": stream_id, "closed": len(found.closed), "captions": len(found.captions),
                            "published_now": len(missed)})
        elif why is not None:
            self.restores["afresh"] += 1
            if self.metrics is not None:
                self.metrics.bus_errors.labels(op="chapters_afresh").inc()
            log.warning("chapters of a stream taken over start afresh", extra={"stream": stream_id, "error": why})
        state.done.set()
        for message in state.waiting:
            self._on_message(message)

    def _cancel_restore(self, stream_id: str) -> None:
        state = self._restoring.get(stream_id)
        if state is not None and state.task is not None:
            state.task.cancel()
            state.task = None

    def _end_later(self, stream_id: str) -> None:
        handle = self._ending.pop(stream_id, None)
        if handle is not None:
            handle.cancel()
        self._ending[stream_id] = asyncio.get_running_loop().call_later(self.end_grace, self._flush, stream_id)

    def _flush(self, stream_id: str) -> None:
        handle = self._ending.pop(stream_id, None)
        if handle is not None:
            handle.cancel()
        rule = self._rules.pop(stream_id, None)
        if rule is None:
            return
        for chapter in rule.flush():
            self._closed_one(chapter)
        self._next_index[stream_id] = rule.next_index
        while len(self._next_index) > self.max_streams:
            self._next_index.pop(next(iter(self._next_index)))

    def _closed_one(self, chapter: Chapter) -> None:
        chapter = replace(chapter, emit_time=self._clock())
        self.chapters_closed += 1
        kept = self._kept.pop(chapter.stream_id, None)
        if kept is None:
            kept = deque(maxlen=self.keep)
        kept.append(chapter)
        self._kept[chapter.stream_id] = kept  # most recently updated last
        while len(self._kept) > self.max_streams:
            self._kept.popitem(last=False)
        if self.files is not None:
            try:
                self.files.submit_chapter(chapter)
            except Exception:  # the file writer's trouble must not cost the event or the others
                log.exception("chapter not written to its file", extra={"stream": chapter.stream_id})
        if self._hub is not None:
            self._hub.publish_event(chapter)  # ignored once the hub is closed (shutdown) or the stream removed
