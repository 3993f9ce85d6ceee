"""Caption output formats: WebVTT, SubRip, JSON Lines and plain text.

One streaming writer serves both offline runs (a whole file at the end) and
live subtitle files (cues appended as captions arrive): `CaptionWriter.write()`
holds back at most one cue, `close()` flushes it. `render()` wraps it for a
list of captions.

Cue timing policy (vtt, srt, text)
----------------------------------
Captions arrive in media-time order for one stream (one writer per stream).

- A cue starts at `caption.start`.
- It ends where the next caption starts, so cues never overlap and times are
  monotonic. This is why the writer holds one cue back: its end is only known
  when the next caption arrives.
- The last cue ends at `max(caption.end, caption.start + min_duration)`
  (`min_duration` defaults to 1.0 s), so a final caption is not a flash.
- Consecutive captions with identical text are merged into one cue: the cue
  keeps the first caption's start and takes the end the last one would get.
- A caption with empty text (after whitespace is collapsed) writes no cue but
  still ends the previous one: the model had nothing to say about that window.
- A caption that starts at or before the previous caption (out of order, or a
  duplicate timestamp) is dropped, the policy the sampler applies to frames.
- Times are rounded to the millisecond; negative times clamp to 0.

Layouts: vtt is `WEBVTT` then `start --> end` cues; srt numbers its cues from 1;
text is one `[HH:MM:SS.mmm --> HH:MM:SS.mmm] caption` line per cue. A
vtt/srt/text writer takes one stream and rejects captions of another.

`jsonl` applies none of this: it writes every caption as-is, one
`json.dumps(caption.to_dict())` per line, and may mix streams.

Cue text has all whitespace (newlines included) collapsed to single spaces, so
a caption can never end a cue early. WebVTT text escapes `&`, `<` and `>`,
which also means `-->` never appears in it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from streamer.types import Caption

__all__ = ["FORMATS", "CaptionWriter", "render", "format_timestamp"]

FORMATS = ("vtt", "srt", "jsonl", "text")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown caption format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def format_timestamp(seconds: float, fmt: str = "vtt") -> str:
    """`HH:MM:SS,mmm` for srt, `HH:MM:SS.mmm` otherwise; hours may exceed 99.

    Rounded to the millisecond; negative times clamp to 0.
    """
    _check_format(fmt)
    if not math.isfinite(seconds):
        raise ValueError(f"timestamp must be a finite number of seconds, got {seconds!r}")
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    sep = "," if fmt == "srt" else "."
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def _cue_text(text: str, fmt: str) -> str:
    text = " ".join(text.split())
    if fmt == "vtt":
        # Escaping '>' also rules out '-->' (it would end the cue timing line).
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


@dataclass(slots=True)
class _Cue:
    start: float  # start of the first caption merged into this cue
    last: Caption  # the latest caption merged into it
    text: str  # already collapsed/escaped for the output format


class CaptionWriter:
    """Writes captions to `out` as they arrive; one cue is held back until its end is known.

    `close()` flushes the held cue (and, for vtt, writes the header if nothing
    was written yet). It is idempotent and leaves `out` open. `out` is flushed
    after each write that produced output, so live subtitle files stay current.
    """

    def __init__(
        self, fmt: str, out: TextIO, *, min_duration: float = 1.0, header: bool = True, first_cue_number: int = 1
    ) -> None:
        """`header=False` and `first_cue_number` continue a file that already holds cues
        (live subtitle files appended across segments and restarts)."""
        _check_format(fmt)
        if first_cue_number < 1:
            raise ValueError(f"first_cue_number must be at least 1, got {first_cue_number!r}")
        if not (math.isfinite(min_duration) and min_duration >= 0):
            raise ValueError(f"min_duration must be a non-negative number of seconds, got {min_duration!r}")
        self.fmt = fmt
        self.min_duration = min_duration
        self._out = out
        self._started = False  # header written (vtt)
        self._closed = False
        self._pending: _Cue | None = None
        self._stream_id: str | None = None
        self._cues_written = 0
        self._header = header
        self._first_cue_number = first_cue_number
        self.last_end: float | None = None  # end time of the last cue written (vtt, srt, text)

    @property
    def cues_written(self) -> int:
        """Cues (or jsonl lines) written to `out` so far."""
        return self._cues_written

    @property
    def last_cue_number(self) -> int:
        """srt: the number of the last cue written (first_cue_number - 1 before any)."""
        return self._first_cue_number - 1 + self._cues_written

    def write(self, caption: Caption) -> None:
        if self._closed:
            raise ValueError("CaptionWriter is closed")
        if self.fmt == "jsonl":
            self._out.write(json.dumps(caption.to_dict(), ensure_ascii=False) + "\n")
            self._cues_written += 1
            self._out.flush()
            return
        if self._stream_id is None:
            self._stream_id = caption.stream_id
        elif caption.stream_id != self._stream_id:
            raise ValueError(
                f"a {self.fmt} writer holds one stream ({self._stream_id!r}); "
                f"got a caption for {caption.stream_id!r}"
            )
        wrote = self._start()
        text = _cue_text(caption.text, self.fmt)
        pending = self._pending
        if pending is not None:
            if caption.start <= pending.last.start:
                return  # out of order or duplicate timestamp: keep time monotonic
            if text == pending.text:
                pending.last = caption  # same text: extend the cue
                self._flush_if(wrote)
                return
            self._emit(pending, caption.start)
            wrote = True
        self._pending = _Cue(caption.start, caption, text)
        self._flush_if(wrote)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._start()
        if self._pending is not None:
            last = self._pending.last
            self._emit(self._pending, max(last.end, last.start + self.min_duration))
            self._pending = None
        self._out.flush()

    def __enter__(self) -> CaptionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> bool:
        if self._started:
            return False
        self._started = True
        if self.fmt == "vtt" and self._header:
            self._out.write("WEBVTT\n\n")
            return True
        return False

    def _flush_if(self, wrote: bool) -> None:
        if wrote:
            self._out.flush()

    def _emit(self, cue: _Cue, end: float) -> None:
        if not cue.text:
            return  # empty caption: it only ends the previous cue
        fmt = self.fmt
        start_ts = format_timestamp(cue.start, fmt)
        end_ts = format_timestamp(end, fmt)
        self._cues_written += 1
        self.last_end = end
        if fmt == "srt":
            self._out.write(f"{self.last_cue_number}\n{start_ts} --> {end_ts}\n{cue.text}\n\n")
        elif fmt == "vtt":
            self._out.write(f"{start_ts} --> {end_ts}\n{cue.text}\n\n")
        else:  # text
            self._out.write(f"[{start_ts} --> {end_ts}] {cue.text}\n")


def render(captions: Iterable[Caption], fmt: str, **kw: float) -> str:
    """The whole output for `captions` as one string (keyword arguments go to CaptionWriter)."""
    buf = io.StringIO()
    with CaptionWriter(fmt, buf, **kw) as writer:
        for caption in captions:
            writer.write(caption)
    return buf.getvalue()
