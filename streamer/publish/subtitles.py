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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamer.config import OUTPUT_FORMATS
from streamer.publish.consumer import HubConsumer, Spawn
from streamer.publish.formats import CaptionWriter
from streamer.publish.hub import (
    CaptionHub,
    HubMessage,
)
from streamer.types import Caption

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
    (None: every stream, including streams added later).
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
        self.consumer_name = "subtitles"
        self.directory = Path(directory)
        self.formats = fmts
        self.streams = None if streams is None else frozenset(streams)
        self.min_duration = min_duration
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.captions_written = 0  # captions the writer thread handled
        self.dropped = 0  # captions dropped because the writer thread was too far behind
        self.errors = 0  # file errors (each logged once per stream until it writes again)
        self._queue: queue.Queue[tuple[Caption, bool] | None] = queue.Queue()
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
        if self._closed or self._thread is None:
            return
        if self.streams is not None and caption.stream_id not in self.streams:
            return
        if self._queue.qsize() >= self.queue_size:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("subtitle writer behind: captions dropped", extra={"dropped": self.dropped})
            return
        self._queue.put_nowait((caption, shown))

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
        caption = message.payload
        if isinstance(caption, Caption) and math.isfinite(caption.start) and math.isfinite(caption.end):
            self.submit(caption, message.shown)  # a caption without finite media times has no place on a timeline

    # -- writer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            caption, shown = item
            files = self._files.get(caption.stream_id)
            if files is None:
                files = self._files[caption.stream_id] = _StreamFiles(self, caption.stream_id)
            try:
                files.write(caption, shown)
            except Exception:  # a bug must not end the thread: the other streams go on
                log.exception("subtitle writer failed on a caption", extra={"stream": caption.stream_id})
            self.captions_written += 1
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
    writer: CaptionWriter | None = None  # vtt/srt, per segment
    staging: io.StringIO = dataclasses.field(default_factory=io.StringIO)
    retry_at: float = 0.0  # monotonic; while failed, when to try again
    skip_before: float = 0.0  # reopened inside a segment: captions starting before this are skipped


class _StreamFiles:
    """Every file of one stream, and its timeline (writer thread only)."""

    def __init__(self, owner: SubtitleOutputs, stream_id: str) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.files = {fmt: _File(owner.directory / f"{stream_id}.{fmt}", fmt) for fmt in owner.formats}
        self.offset = 0.0
        self.end = 0.0  # latest time written by any file of this stream in this run
        self.last: Caption | None = None  # last caption of the segment, unshifted
        self.failing: set[str] = set()  # formats whose last operation failed (logged once per stream)
        self.valid = _safe_name(stream_id)
        if not self.valid:
            log.error("stream id cannot name a file; no subtitle files for it", extra={"stream": stream_id})

    def write(self, caption: Caption, shown: bool = True) -> None:
        if not self.valid:
            return
        last = self.last
        if last is None or caption.index <= last.index or caption.start <= last.start:
            if last is not None:
                self._end_segment()
            self._start_segment(caption)
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

    def close(self) -> None:
        self._end_segment()
        for f in self.files.values():
            if f.handle is not None:
                self._guard(f, f.handle.close)
                f.handle = None

    # -- segments ---------------------------------------------------------------
    def _start_segment(self, caption: Caption) -> None:
        for f in self.files.values():
            if f.handle is None:
                self._open(f, now=False)
        base = max([self.end, *(f.floor for f in self.files.values())])
        self.offset = max(0.0, base - caption.start)
        if self.offset:
            log.info("subtitle timeline continues", extra={"stream": self.stream_id, "offset": round(self.offset, 3)})
        for f in self.files.values():
            f.writer = self._new_writer(f)

    def _end_segment(self) -> None:
        for f in self.files.values():
            writer, f.writer = f.writer, None
            if writer is not None and f.handle is not None:
                self._guard(f, self._drain, f, writer, writer.close)
        self.last = None

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

    def _drain(self, f: _File, writer: CaptionWriter, step) -> None:
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

    def _new_writer(self, f: _File) -> CaptionWriter | None:
        if f.fmt == "jsonl":
            return None
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
