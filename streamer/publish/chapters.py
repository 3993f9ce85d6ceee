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
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from streamer.publish.consumer import HubConsumer, Spawn
from streamer.publish.formats import CaptionWriter
from streamer.publish.hub import CaptionHub, HubMessage
from streamer.publish.stabilizer import Hysteresis
from streamer.types import Caption, Chapter, StateChange

__all__ = ["ChapterFiles", "ChapterSink", "Chapterer", "chapter_cue", "chapter_dict", "chapters_json", "chapters_vtt",
           "similarity"]

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


class ChapterSink(HubConsumer):
    """Chapters of every stream this daemon captions (one per daemon; with a bus, of the streams it owns).

    Reads captions and states from the hub; when a chapter closes it is kept (the last `keep` per
    stream), handed to `files` (the subtitle writer, when [outputs] is configured) and published as a
    `chapter` event. A stream's open chapter is closed `end_grace` seconds after its state became
    stopped or failed and its captions stopped coming (the windows still waiting when a file ends are
    captioned after its `stopped`), and at `close()`. Never blocks: the rule is a few set operations
    per caption."""

    consumer_name = "chapters"

    def __init__(self, *, hold: int = DEFAULT_HOLD, similarity: float = DEFAULT_SIMILARITY, keep: int = KEEP_PER_STREAM,
                 max_streams: int = MAX_STREAMS, files: ChapterFiles | None = None,
                 clock: Callable[[], float] = time.time, end_grace: float = 5.0) -> None:
        Chapterer("check", hold=hold, similarity=similarity)  # validates the rule's settings here
        if keep < 1 or max_streams < 1:
            raise ValueError("keep and max_streams must be >= 1")
        self.hold, self.similarity, self.keep, self.max_streams = hold, similarity, keep, max_streams
        self.files = files
        self.end_grace = end_grace
        self._clock = clock
        self._ending: dict[str, asyncio.TimerHandle] = {}  # stopped streams: when their open chapter closes
        self._rules: dict[str, Chapterer] = {}
        self._next_index: dict[str, int] = {}  # streams whose rule was flushed: where indices go on
        self._kept: OrderedDict[str, deque[Chapter]] = OrderedDict()  # least recently updated first
        self.chapters_closed = 0
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
        for handle in self._ending.values():
            handle.cancel()
        self._ending.clear()
        for stream_id in list(self._rules):
            self._flush(stream_id)

    def chapters(self, stream_id: str) -> list[Chapter]:
        """The closed chapters of the stream's current (or last) run kept here, oldest first: its media
        times start again when it is added again, so an earlier run's are not mixed in (indices go on)."""
        return list(self._kept.get(stream_id, ()))

    def open_chapter(self, stream_id: str) -> Chapter | None:
        rule = self._rules.get(stream_id)
        return rule.open_chapter if rule is not None else None

    def knows(self, stream_id: str) -> bool:
        return stream_id in self._kept or stream_id in self._rules

    # -- loop side ----------------------------------------------------------------------
    def _on_message(self, message: HubMessage) -> None:
        payload = message.payload
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
