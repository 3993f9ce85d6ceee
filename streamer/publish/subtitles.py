"""Live subtitle files: one `.vtt`, `.srt` and/or `.jsonl` per stream, appended as captions arrive.

`SubtitleOutputs` is a hub subscriber (`only_changes=False, replay=False`):
every caption of every stream it follows, no history replay. It does no file
I/O on the event loop:

- a consumer task drains its hub subscription eagerly (each `get()` of a
  non-empty queue returns without yielding) and hands each `Caption` to
  `submit()`, which never blocks;
- one writer thread owns every file: small writes, each followed by
  `flush()`, so a player tailing the file sees a cue as soon as it is known.

Why a hub subscriber and not a callback in the daemon: the hub is already
the one place captions fan out, with a bounded queue per consumer; a sink
needs nothing from the daemon but `hub`, so it can be started and closed
around a running daemon and tested against a bare `CaptionHub`. The hub
closes a subscriber that lets its queue fill; this one never does, since
draining costs a queue put per caption. (If it ever
happens, for example when the loop was blocked elsewhere, it subscribes again
and logs how it happened.) Anything can also call `submit(caption)` directly.

Cue timing (vtt, srt) is `formats.CaptionWriter`'s policy: a cue starts at
its caption's start and ends where the next one starts, identical
consecutive texts merge, one cue is held back until its end is known (so a
tailing player is one caption behind), and `close()` flushes it.

vtt and srt follow the *shown* captions (the stream's stabilizer, the
message's `shown`): a caption held back by it writes no cue, so the shown
text's cue runs on until the next shown caption starts, as an overlay shows
it. jsonl keeps every caption, with its `shown` flag.

One timeline per stream, across restarts
----------------------------------------
Files are opened for appending, never truncated. Each file's *floor* is the
latest time it already holds: the end of its last cue (vtt, srt) or the `end`
of its last line (jsonl), read from the file's tail when it is opened.

A *segment* is a run of captions whose media time goes forward. The first
caption of a segment fixes the stream's `offset`:

    base   = max(floor of every file of the stream, end of the previous segment)
    offset = max(0, base - first_caption.start)

and every caption of the segment is written at `time + offset`. So a new
run whose media time restarts at 0 (a file played again, a camera after a
daemon restart) is shifted to begin exactly where the files ended: cues never
overlap and never go back. A run whose times already lie after the files is
not shifted. A new segment also starts inside one run when a stream's media
time goes back (its `index` or `start` is not past the previous caption's:
the stream was removed and added again); the held cue is flushed first.

- vtt: `WEBVTT` is written once, when the file is created.
- srt: cue numbers continue from the last number in the file.
- jsonl: one caption per line, `Caption.to_dict()` with `start`/`end`
  shifted, non-finite numbers as `null`, plus `"offset"`: the shift applied
  (so `start - offset` is the source's media time), and `"shown"`. Every
  caption is written, repeats and captions the stabilizer held back included.
- A file whose last line was cut off (a crash mid-write) gets the newline(s)
  it needs before the first new cue.

Speech in the same files (`[outputs] speech = "cues"`, the default)
----------------------------------------------------------------
Speech cues (streams with `speech = "on"`; the sink opts in to `speech`
events) go into the same `.vtt` and `.srt` as the scene captions, not into a
separate track: most players show one subtitle track at a time (a browser's
`<track>`, VLC, the caption file a video site takes), and SubRip has no
second track at all. So the two timelines are merged into one, as
subtitles for the deaf and hard of hearing do it:

- The file's timeline is cut wherever either changes: at each shown caption
  (the scene policy above) and at each utterance's start and end. Cues never
  overlap.
- A cue with speech says what was said, one line per utterance, then the
  scene description on its own line in brackets:
  `two red circles move up` / `[two big red circles move up]`. A cue without
  speech is the scene caption as before (files of streams without speech do
  not change at all).
- Timing: a speech cue is only known after its utterance ended (the
  voice-activity segmenter waits for silence, then the model transcribes),
  while the file is append-only. Once a stream has had speech, its vtt/srt
  cues are held back until `speech_lag` media seconds (default 8: the longest
  utterance, 5 s, + the silence that ends it + transcription) have passed, so
  that a late utterance still lands in order (and a stream whose captions
  have not come for `speech_lag` seconds, one with `speech = "only"`, is not
  waited for either). Before a stream's first speech cue nothing is held back; if that first cue starts before what the file
  already holds, it is cut to start there (counted in `speech_late`). A cue
  that ends before it is dropped and counted too.
- jsonl gets one line per speech cue, `SpeechCue.to_dict()` (`"type":
  "speech"`) shifted like the captions, with `"offset"`.

`speech = "off"` leaves speech out of the files (the sink does not subscribe).

Chapters
--------
`submit_chapter(chapter)` (publish/chapters.py's ChapterSink calls it)
appends the chapter to `{stream}.chapters.vtt` (when "vtt" is among the
formats): a WebVTT chapters track for `<track kind="chapters">`, one cue per
closed chapter, on the stream's timeline (the same `offset` as its
subtitles). The rules above hold for it too: appended, never truncated,
`WEBVTT` once, a cut-off last line repaired, a chapter that would start
before what the file holds is cut to start there (or dropped if it ends
before), errors logged once per stream and retried.

Errors
------
An error writing a stream's file (full disk, unwritable directory, ...) is
logged once per stream, with its traceback, until that stream writes again;
the file is retried at most every `retry_after` seconds (re-read, re-appended,
a new segment); other files and captioning go on. Captions beyond
`queue_size` waiting for the writer thread are dropped (the newest) and
counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from streamer.config import OUTPUT_FORMATS, SPEECH_OUTPUTS
from streamer.publish.chapters import chapter_cue
from streamer.publish.consumer import HubConsumer, Spawn
from streamer.publish.formats import CaptionWriter, format_timestamp
from streamer.publish.hub import (
    CaptionHub,
    HubMessage,
)
from streamer.types import Caption, Chapter, SpeechCue

__all__ = ["OUTPUT_FORMATS", "SubtitleOutputs", "caption_from_message"]

log = logging.getLogger(__name__)

_TAIL_BYTES = 64 * 1024
_TS = r"(?:\d+:)?\d{2}:\d{2}[.,]\d{3}"
_TIMING = re.compile(rf"(?m)^({_TS})[ \t]+-->[ \t]+({_TS})")
_SRT_CUE = re.compile(rf"(?m)^(\d+)[ \t]*\r?\n({_TS})[ \t]+-->[ \t]+({_TS})")


def caption_from_message(message: dict[str, Any]) -> Caption | None:
    """The Caption a hub/WebSocket `caption` message carries (None for other messages)."""
    if message.get("type") != "caption":
        return None
    start, end = message.get("start"), message.get("end")
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return None  # non-finite media times were sent as null: nothing to place
    confidence = message.get("confidence")
    return Caption(
        stream_id=str(message["stream_id"]),
        index=int(message["index"]),
        start=float(start),
        end=float(end),
        text=str(message.get("text", "")),
        confidence=float("nan") if confidence is None else float(confidence),
        model=str(message.get("model", "")),
        capture_time=float(message.get("capture_time") or 0.0),
        emit_time=float(message.get("emit_time") or 0.0),
    )


class SubtitleOutputs(HubConsumer):
    """Per-stream live subtitle files in `directory`; see the module docstring.

    `formats`: any of "vtt", "srt", "jsonl". `streams`: stream ids to write
    (None: every stream, including streams added later). `speech`: "cues"
    (speech cues in the same files) or "off". `speech_lag`: media seconds a
    speech stream's vtt/srt cues wait for late utterances.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        formats: Iterable[str] = ("vtt", "srt", "jsonl"),
        streams: Iterable[str] | None = None,
        *,
        min_duration: float = 1.0,
        queue_size: int = 10_000,
        retry_after: float = 30.0,
        speech: str = "cues",
        speech_lag: float = 8.0,
    ) -> None:
        if isinstance(formats, str):
            formats = (formats,)
        fmts = tuple(dict.fromkeys(formats))
        bad = [f for f in fmts if f not in OUTPUT_FORMATS]
        if bad or not fmts:
            raise ValueError(f"output formats must be some of {', '.join(OUTPUT_FORMATS)}; got {list(formats)!r}")
        if isinstance(streams, str):
            raise TypeError(f"streams must be a collection of stream ids or None, got the string {streams!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        CaptionWriter("vtt", io.StringIO(), min_duration=min_duration)  # validates min_duration
        if speech not in SPEECH_OUTPUTS:
            raise ValueError(f"speech must be one of {', '.join(SPEECH_OUTPUTS)}; got {speech!r}")
        if not (math.isfinite(speech_lag) and speech_lag >= 0):
            raise ValueError(f"speech_lag must be a non-negative number of seconds, got {speech_lag!r}")
        self.consumer_name = "subtitles"
        self.speech = speech
        self.speech_lag = speech_lag
        self.types = frozenset({"speech"}) if speech == "cues" else frozenset()  # opt-in hub events it takes
        self.directory = Path(directory)
        self.formats = fmts
        self.streams = None if streams is None else frozenset(streams)
        self.min_duration = min_duration
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.captions_written = 0  # captions the writer thread handled
        self.speech_written = 0  # speech cues the writer thread handled
        self.chapters_written = 0  # chapters the writer thread handled
        self.speech_late = 0  # speech cues cut (or dropped) because the files were past their start
        self.dropped = 0  # captions, cues and chapters dropped because the writer thread was too far behind
        self.errors = 0  # file errors (each logged once per stream until it writes again)
        self._queue: queue.Queue[tuple[Caption, bool] | SpeechCue | Chapter | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._init_consumer()
        self._closed = False
        self._files: dict[str, _StreamFiles] = {}  # writer thread only

    # -- public ------------------------------------------------------------
    async def start(self, hub: CaptionHub, spawn: Spawn | None = None) -> None:
        """Subscribe to `hub` and start the writer thread (once); `spawn` supervises the consume loop."""
        if self._closed:
            raise RuntimeError("SubtitleOutputs is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="subtitle-files", daemon=True)
        self._thread.start()
        self._start_consuming(hub, spawn)
        log.info("subtitle outputs started", extra={"dir": str(self.directory), "formats": list(self.formats)})

    def submit(self, caption: Caption, shown: bool = True) -> None:
        """Queue one caption for the writer thread. Never blocks; call it from one thread (the loop).
        `shown`: the stream's stabilizer shows it (vtt and srt write only shown captions)."""
        self._put(caption.stream_id, (caption, shown))

    def submit_speech(self, cue: SpeechCue) -> None:
        """Queue one speech cue (with `speech = "cues"`; ignored with "off"). Never blocks."""
        if self.speech == "cues" and math.isfinite(cue.start) and math.isfinite(cue.end):
            self._put(cue.stream_id, cue)

    def submit_chapter(self, chapter: Chapter) -> None:
        """Queue one closed chapter for `{stream}.chapters.vtt` (with "vtt" among the formats). Never blocks."""
        if "vtt" in self.formats and math.isfinite(chapter.start) and math.isfinite(chapter.end):
            self._put(chapter.stream_id, chapter)

    def _put(self, stream_id: str, item: tuple[Caption, bool] | SpeechCue | Chapter) -> None:
        if self._closed or self._thread is None:
            return
        if self.streams is not None and stream_id not in self.streams:
            return
        if self._queue.qsize() >= self.queue_size:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("subtitle writer behind: captions dropped", extra={"dropped": self.dropped})
            return
        self._queue.put_nowait(item)

    async def close(self, timeout: float = 10.0, force: bool = False) -> None:
        """Write what is queued, flush every held cue, close the files (idempotent).

        Waits at most `timeout` seconds for the writer thread (a hung disk is
        logged and left to the daemon thread). `force` changes nothing: the files
        are local, so even a hurried shutdown writes every held cue."""
        if self._closed:
            return
        await self._stop_consuming()
        self._closed = True
        if self._thread is not None:
            self._queue.put_nowait(None)
            done = asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            try:
                await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                log.error("subtitle writer did not finish; files may miss their last cue", extra={"timeout": timeout})

    # -- loop side -----------------------------------------------------------
    def _on_message(self, message: HubMessage) -> None:
        payload = message.payload
        if isinstance(payload, Caption) and math.isfinite(payload.start) and math.isfinite(payload.end):
            self.submit(payload, message.shown)  # a caption without finite media times has no place on a timeline
        elif isinstance(payload, SpeechCue):
            self.submit_speech(payload)

    # -- writer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            record = item[0] if isinstance(item, tuple) else item
            files = self._files.get(record.stream_id)
            if files is None:
                files = self._files[record.stream_id] = _StreamFiles(self, record.stream_id)
            try:
                if isinstance(item, tuple):
                    files.write(*item)
                elif isinstance(item, SpeechCue):
                    files.speak(item)
                elif isinstance(item, Chapter):
                    files.chapter(item)
            except Exception:  # a bug must not end the thread: the other streams go on
                log.exception("subtitle writer failed on a caption", extra={"stream": record.stream_id})
            if isinstance(item, tuple):
                self.captions_written += 1
            elif isinstance(item, SpeechCue):
                self.speech_written += 1
            else:
                self.chapters_written += 1
        for files in self._files.values():
            files.close()


@dataclasses.dataclass
class _File:
    """One open subtitle file of one stream (writer thread only)."""

    path: Path
    fmt: str
    handle: Any = None  # text file, opened for appending
    floor: float = 0.0  # latest time the file holds
    number: int = 0  # srt: last cue number
    has_content: bool = False  # vtt: the header is there already
    writer: CaptionWriter | _CueTimeline | None = None  # vtt/srt, per segment
    staging: io.StringIO = dataclasses.field(default_factory=io.StringIO)
    retry_at: float = 0.0  # monotonic; while failed, when to try again
    skip_before: float = 0.0  # reopened inside a segment: captions starting before this are skipped


class _StreamFiles:
    """Every file of one stream, and its timeline (writer thread only)."""

    def __init__(self, owner: SubtitleOutputs, stream_id: str) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.files = {fmt: _File(owner.directory / f"{stream_id}.{fmt}", fmt) for fmt in owner.formats}
        # chapters.vtt: not a caption format (the caption loops skip it), on the same timeline
        self.chapters = _File(owner.directory / f"{stream_id}.chapters.vtt", "chapters") if "vtt" in owner.formats else None
        self.offset = 0.0
        self.end = 0.0  # latest time written by any file of this stream in this run
        self.in_segment = False
        self.last: Caption | None = None  # last caption of the segment, unshifted
        self.last_cue: SpeechCue | None = None  # last speech cue of the segment, unshifted
        self.late_logged = False
        self.failing: set[str] = set()  # formats whose last operation failed (logged once per stream)
        self.valid = _safe_name(stream_id)
        if not self.valid:
            log.error("stream id cannot name a file; no subtitle files for it", extra={"stream": stream_id})

    def write(self, caption: Caption, shown: bool = True) -> None:
        if not self.valid:
            return
        last = self.last
        if not self.in_segment or (last is not None and (caption.index <= last.index or caption.start <= last.start)):
            if self.in_segment:
                self._end_segment()
            self._start_segment(caption.start)
        self.last = caption
        shifted = dataclasses.replace(caption, start=caption.start + self.offset, end=caption.end + self.offset)
        for f in self.files.values():
            if f.handle is None and not self._open(f, now=True):
                continue
            if shifted.start < f.skip_before:
                continue  # reopened after an error, and this caption is older than what it holds
            if not shown and f.fmt != "jsonl":
                continue  # held back by the stabilizer: the shown cue runs on
            self._guard(f, self._write_one, f, shifted, shown)

    def speak(self, cue: SpeechCue) -> None:
        """A speech cue: a jsonl line; vtt/srt merge it into their cues (_CueTimeline)."""
        if not self.valid:
            return
        if not self.in_segment or (self.last_cue is not None and cue.start < self.last_cue.start):
            if self.in_segment:
                self._end_segment()
            self._start_segment(cue.start)
        self.last_cue = cue
        shifted = dataclasses.replace(cue, start=cue.start + self.offset, end=cue.end + self.offset)
        for f in self.files.values():
            if f.handle is None and not self._open(f, now=True):
                continue
            if shifted.end <= f.skip_before:
                continue
            self._guard(f, self._speak_one, f, shifted)

    def chapter(self, chapter: Chapter) -> None:
        """One closed chapter, appended to chapters.vtt on the segment's timeline."""
        f = self.chapters
        if not self.valid or f is None:
            return
        if f.handle is None and not self._open(f, now=False):
            return
        start, end = chapter.start + self.offset, chapter.end + self.offset
        if end <= f.floor:
            return  # the file is past it already (a restart's timeline): nothing to add
        shifted = dataclasses.replace(chapter, start=max(start, f.floor), end=end)

        def write() -> None:
            f.staging.seek(0)
            f.staging.truncate()
            if not f.has_content:
                f.staging.write("WEBVTT\n\n")
            cue_end = chapter_cue(shifted, f.staging)
            chunk = f.staging.getvalue()
            f.staging.seek(0)
            f.staging.truncate()
            if chunk:
                f.handle.write(chunk)
                f.handle.flush()
                f.has_content = True
                self._wrote(f)
            if cue_end is not None:
                self._advance(f, cue_end)

        self._guard(f, write)

    def close(self) -> None:
        self._end_segment()
        for f in self._all_files():
            if f.handle is not None:
                self._guard(f, f.handle.close)
                f.handle = None

    def _all_files(self) -> list[_File]:
        return [*self.files.values(), *([self.chapters] if self.chapters is not None else [])]

    # -- segments ---------------------------------------------------------------
    def _start_segment(self, first_start: float) -> None:
        for f in self._all_files():
            if f.handle is None:
                self._open(f, now=False)
        base = max([self.end, *(f.floor for f in self._all_files())])
        self.offset = max(0.0, base - first_start)
        if self.offset:
            log.info("subtitle timeline continues", extra={"stream": self.stream_id, "offset": round(self.offset, 3)})
        for f in self.files.values():
            f.writer = self._new_writer(f)
        self.in_segment = True

    def _end_segment(self) -> None:
        for f in self.files.values():
            writer, f.writer = f.writer, None
            if writer is not None and f.handle is not None:
                self._guard(f, self._drain, f, writer, writer.close)
            if isinstance(writer, _CueTimeline):
                self._count_late(writer)
        self.last = None
        self.last_cue = None
        self.in_segment = False

    # -- one file ------------------------------------------------------------------
    def _open(self, f: _File, now: bool) -> bool:
        """Open for appending, reading the floor from the file's tail. False if it failed (logged)."""
        if f.retry_at and time.monotonic() < f.retry_at:
            return False

        def do_open() -> None:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            tail, size = _read_tail(f.path)
            f.floor, f.number = _tail_position(tail, f.fmt)
            f.has_content = size > 0
            f.handle = open(f.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed in close())
            need = "\n" if f.fmt == "jsonl" else "\n\n"
            if size and not tail.endswith(need):  # cut off mid-line: keep the next cue apart
                f.handle.write("\n" if tail.endswith("\n") else need)
                f.handle.flush()

        if not self._guard(f, do_open):
            return False
        f.retry_at = 0.0
        f.skip_before = f.floor if now else 0.0
        if now:  # reopened inside a segment: a fresh cue writer, after what the file holds
            f.writer = self._new_writer(f)
        return True

    def _write_one(self, f: _File, caption: Caption, shown: bool = True) -> None:
        if f.fmt == "jsonl":
            data = caption.to_dict()
            for key in ("start", "end", "confidence", "capture_time", "emit_time", "latency"):
                if not math.isfinite(data[key]):
                    data[key] = None
            data["offset"] = round(self.offset, 6)
            data["shown"] = shown
            f.handle.write(json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n")
            f.handle.flush()
            self._wrote(f)
            self._advance(f, caption.end)
            return
        writer = f.writer
        assert writer is not None
        self._drain(f, writer, lambda: writer.write(caption))

    def _speak_one(self, f: _File, cue: SpeechCue) -> None:
        if f.fmt == "jsonl":
            data = cue.to_dict()
            for key in ("start", "end", "confidence", "capture_time", "emit_time", "latency"):
                if not math.isfinite(data[key]):
                    data[key] = None
            data["offset"] = round(self.offset, 6)
            f.handle.write(json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n")
            f.handle.flush()
            self._wrote(f)
            self._advance(f, cue.end)
            return
        writer = f.writer
        if isinstance(writer, _CueTimeline):
            self._drain(f, writer, lambda: writer.speak(cue))
            self._count_late(writer)

    def _count_late(self, writer: _CueTimeline) -> None:
        late, writer.late = writer.late, 0
        if not late:
            return
        self.owner.speech_late += late
        if not self.late_logged:  # once per stream: a first utterance that began before the file's last cue
            self.late_logged = True
            log.warning("speech cue came after the subtitle file had passed its start: cut to fit",
                        extra={"stream": self.stream_id, "speech_lag": self.owner.speech_lag})

    def _drain(self, f: _File, writer: CaptionWriter | _CueTimeline, step) -> None:
        """Run a CaptionWriter step, then move what it wrote to the file. The writer was made
        for this file (no second header, cue numbers after the file's), so the chunk is
        appended as it is and the writer says where its last cue ends."""
        try:
            step()
        finally:
            chunk = f.staging.getvalue()
            f.staging.seek(0)
            f.staging.truncate()
        if not chunk:
            return
        f.handle.write(chunk)
        f.handle.flush()
        self._wrote(f)
        f.has_content = True
        f.number = writer.last_cue_number
        if writer.last_end is not None:
            self._advance(f, writer.last_end)

    def _new_writer(self, f: _File) -> CaptionWriter | _CueTimeline | None:
        if f.fmt == "jsonl":
            return None
        if self.owner.speech == "cues":
            return _CueTimeline(f.fmt, f.staging, min_duration=self.owner.min_duration, header=not f.has_content,
                                first_cue_number=f.number + 1, speech_lag=self.owner.speech_lag)
        return CaptionWriter(f.fmt, f.staging, min_duration=self.owner.min_duration,
                             header=not f.has_content, first_cue_number=f.number + 1)

    def _advance(self, f: _File, end: float) -> None:
        f.floor = max(f.floor, end)
        self.end = max(self.end, end)

    def _guard(self, f: _File, fn, *args) -> bool:
        """Run one file operation; on an error, log (once per stream), close the file, retry later."""
        try:
            fn(*args)
        except Exception as exc:
            self.owner.errors += 1
            if not self.failing:
                log.error("cannot write subtitle file; captioning goes on", exc_info=True,
                          extra={"stream": self.stream_id, "path": str(f.path), "error": str(exc)})
            else:
                log.debug("subtitle file error", extra={"stream": self.stream_id, "path": str(f.path), "error": str(exc)})
            if f.handle is not None:
                try:
                    f.handle.close()
                except OSError:
                    pass
            if isinstance(f.writer, _CueTimeline):
                self._count_late(f.writer)
            f.handle, f.writer = None, None
            f.staging.seek(0)
            f.staging.truncate()
            self.failing.add(f.fmt)
            f.retry_at = time.monotonic() + self.owner.retry_after
            return False
        return True

    def _wrote(self, f: _File) -> None:
        if f.fmt in self.failing:
            self.failing.discard(f.fmt)
            log.warning("subtitle file writable again", extra={"stream": self.stream_id, "path": str(f.path)})


class _CueTimeline:
    """The vtt/srt cues of one file of one stream, for one segment: the shown captions' timeline
    (formats.CaptionWriter's policy, which it reproduces exactly while there is no speech) merged
    with speech cues (module docstring). Same interface as CaptionWriter for `_StreamFiles`:
    `write(caption)`, `close()`, `last_end`, `last_cue_number`; plus `speak(cue)`.

    A sweep over change points: scene changes (a shown caption whose text differs from the one
    before), utterance starts and ends. A cue is written once the change that ends it is known
    final, i.e. no earlier change can still come: scene changes are final up to the newest caption's
    start (or, once no caption has come for `speech_lag` wall-clock seconds, a stream without
    captions, `speech_lag` before the newest media time); speech, once a stream has had some, up to
    its newest cue's end or `speech_lag` before the newest media time seen, whichever is later."""

    def __init__(self, fmt: str, out: io.StringIO, *, min_duration: float, header: bool, first_cue_number: int,
                 speech_lag: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fmt = fmt
        self.min_duration = min_duration
        self.speech_lag = speech_lag
        self._out = out
        self._header = header
        self._started = False
        self._closed = False
        self._number = first_cue_number - 1
        self.last_end: float | None = None  # end of the last cue written
        self.late = 0  # speech cues cut or dropped because the sweep was past their start
        self._last: Caption | None = None  # the last caption taken (out-of-order ones are dropped)
        self._scene: deque[tuple[float, str]] = deque()  # scene changes not swept yet: (time, line)
        self._scene_line = ""  # the scene line after the last change queued
        self._scene_now = ""  # the scene line at the sweep position
        self._starts: list[tuple[float, float, str]] = []  # utterances not begun yet: (start, end, line), by start
        self._active: list[tuple[float, float, str]] = []  # utterances going on at the sweep position
        self._pos = -math.inf  # the sweep position: every change up to it is applied
        self._open_start = -math.inf  # where the text now on screen began
        self._open_text = ""
        self._had_speech = False
        self._speech_end = -math.inf  # end of the newest utterance
        self._latest = -math.inf  # the newest media time seen (caption or cue end)
        self._clock = clock
        self._caption_wall = clock()  # when the newest caption came (or the segment began)

    @property
    def last_cue_number(self) -> int:
        return self._number

    def write(self, caption: Caption) -> None:
        self._start()
        last = self._last
        if last is not None and caption.start <= last.start:
            return  # out of order or duplicate timestamp: keep time monotonic (CaptionWriter's rule)
        self._last = caption
        self._caption_wall = self._clock()
        self._latest = max(self._latest, caption.end)
        line = _line(caption.text, self.fmt)
        if line != self._scene_line or last is None:
            self._scene.append((max(caption.start, self._pos), line))
            self._scene_line = line
        self._sweep(self._known())

    def speak(self, cue: SpeechCue) -> None:
        self._start()
        self._had_speech = True
        line = _line(cue.text, self.fmt)
        start, end = cue.start, cue.end
        self._latest = max(self._latest, end)
        self._speech_end = max(self._speech_end, end)
        if line and end > start:
            if start < self._pos:  # the file is past its start already
                self.late += 1
                start = self._pos
            if end > start:
                self._starts.append((start, end, line))
                self._starts.sort()
        self._sweep(self._known())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._start()
        if self._last is not None:  # the last caption's cue: at least min_duration
            last = self._last
            self._scene.append((max(last.end, last.start + self.min_duration, self._pos), ""))
        self._sweep(math.inf)

    # -- the sweep ----------------------------------------------------------------------
    def _known(self) -> float:
        """Up to where every change is known."""
        scene = self._scene[-1][0] if self._scene else self._pos
        if self._last is not None:
            scene = max(scene, self._last.start)
        if not self._had_speech:
            return scene
        lagged = self._latest - self.speech_lag
        if self._clock() - self._caption_wall >= self.speech_lag:  # no captions to wait for (speech only)
            scene = max(scene, lagged)
        return min(scene, max(self._speech_end, lagged))

    def _sweep(self, until: float) -> None:
        while True:
            times = []
            if self._scene:
                times.append(self._scene[0][0])
            if self._starts:
                times.append(self._starts[0][0])
            if self._active:
                times.append(min(end for _, end, _ in self._active))
            if not times or min(times) > until:
                return
            t = min(times)
            self._pos = t
            while self._scene and self._scene[0][0] <= t:
                self._scene_now = self._scene.popleft()[1]
            self._active = [u for u in self._active if u[1] > t]
            while self._starts and self._starts[0][0] <= t:
                self._active.append(self._starts.pop(0))
            text = self._text()
            if text != self._open_text:
                if self._open_text and t > self._open_start:
                    self._emit(self._open_start, t, self._open_text)
                self._open_start, self._open_text = t, text

    def _text(self) -> str:
        if not self._active:
            return self._scene_now
        lines = [line for _, _, line in sorted(self._active)]
        if self._scene_now:
            lines.append(f"[{self._scene_now}]")
        return "\n".join(lines)

    def _emit(self, start: float, end: float, text: str) -> None:
        self._number += 1
        start_ts, end_ts = format_timestamp(start, self.fmt), format_timestamp(end, self.fmt)
        number = f"{self._number}\n" if self.fmt == "srt" else ""
        self._out.write(f"{number}{start_ts} --> {end_ts}\n{text}\n\n")
        self.last_end = end

    def _start(self) -> None:
        if not self._started:
            self._started = True
            if self.fmt == "vtt" and self._header:
                self._out.write("WEBVTT\n\n")


def _line(text: str, fmt: str) -> str:
    """One line of cue text (formats.py's rule): whitespace collapsed; vtt escapes &, < and >."""
    text = " ".join(text.split())
    if fmt == "vtt":
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def _safe_name(stream_id: str) -> bool:
    return bool(stream_id) and stream_id not in (".", "..") and "/" not in stream_id and "\\" not in stream_id \
        and "\0" not in stream_id


def _read_tail(path: Path) -> tuple[str, int]:
    """The last 64 KiB of a file as text ('' and 0 if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            return fh.read(_TAIL_BYTES).decode("utf-8", "replace"), size
    except FileNotFoundError:
        return "", 0


def _parse_ts(ts: str) -> float:
    parts = ts.replace(",", ".").split(":")
    seconds = float(parts[-1])
    minutes = int(parts[-2]) if len(parts) >= 2 else 0
    hours = int(parts[-3]) if len(parts) >= 3 else 0
    return hours * 3600 + minutes * 60 + seconds


def _tail_position(text: str, fmt: str) -> tuple[float, int]:
    """(latest end time, last srt cue number) found in the text of a file or chunk."""
    if fmt == "jsonl":
        for line in reversed(text.splitlines()):
            try:
                end = json.loads(line).get("end")
            except (ValueError, AttributeError):
                continue
            if isinstance(end, (int, float)) and math.isfinite(end):
                return float(end), 0
        return 0.0, 0
    if fmt == "srt":
        cues = list(_SRT_CUE.finditer(text))
        if not cues:
            return 0.0, 0
        return max(_parse_ts(m.group(3)) for m in cues), int(cues[-1].group(1))
    ends = [_parse_ts(m.group(2)) for m in _TIMING.finditer(text)]
    return (max(ends) if ends else 0.0), 0
