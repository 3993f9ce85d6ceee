"""Caption sinks from the config file: `[outputs]` (subtitle files) and `[[webhooks]]`.

```toml
[outputs]
dir = "/var/lib/streamer/subtitles"   # <dir>/<stream>.vtt, .srt, .jsonl (relative: to the working directory)
formats = ["vtt", "srt", "jsonl"]      # default: all three
streams = ["lobby"]                     # default: every stream
speech = "cues"                         # speech cues in the same vtt/srt cues and jsonl ("off": captions only)

[[webhooks]]
url = "https://example.com/hooks/captions"
match = "person|car"    # optional regex (case-insensitive) on the caption text; default: every caption
streams = ["lobby"]     # optional; default: every stream
only_changes = false    # true: skip a caption whose text repeats the stream's previous one
queue_size = 100        # captions waiting; when full, the oldest is dropped
retries = 3             # on connection errors, timeouts and 5xx; never on 4xx
backoff = 0.5           # seconds before the first retry, doubling (durations also take "500ms", "2s")
timeout = 5.0           # seconds per attempt
```

Both tables go through the one schema (streamer/config.py: OutputsSection,
WebhookSection); errors name the table, e.g. `[[webhooks]] #2 retries = -1: ...`.

`serve()` also runs one chapter sink (publish/chapters.py) in front of these
(`with_chapters`): it is not configured by a table.

A sink is anything with `async start(hub, spawn=None)` (subscribe, start its
own tasks, under a Supervisor's `spawn` when given; it must not block) and
`async close(force=False)` (flush, idempotent). `serve()` starts
the sinks right after the daemon and closes them after the daemon has
drained, so the last captions reach the files and the webhooks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from streamer.config import OutputsSection, WebhookSection, validate
from streamer.publish.chapters import ChapterSink
from streamer.publish.consumer import Spawn
from streamer.publish.hub import CaptionHub
from streamer.publish.subtitles import SubtitleOutputs
from streamer.publish.webhooks import WebhookSink

__all__ = ["Sink", "outputs_from_config", "close_sinks"]

log = logging.getLogger(__name__)



@runtime_checkable
class Sink(Protocol):
    async def start(self, hub: CaptionHub, spawn: Spawn | None = None) -> None: ...

    async def close(self, force: bool = False) -> None: ...


def outputs_from_config(data: Mapping[str, Any]) -> list[Sink]:
    """The sinks a parsed config asks for (`data["outputs"]`, `data["webhooks"]`; other keys are ignored).

    Nothing is opened or started. Raises ValueError naming the table and key for a bad value.
    """
    sinks: list[Sink] = []
    outputs = data.get("outputs")
    if outputs is not None:
        sinks.append(_outputs(outputs))
    webhooks = data.get("webhooks")
    if webhooks is not None:
        if isinstance(webhooks, Mapping):
            raise ValueError("[webhooks] must be an array of tables: write [[webhooks]]")
        if not isinstance(webhooks, list):
            raise ValueError("[[webhooks]] must be an array of tables")
        for i, table in enumerate(webhooks, 1):
            sinks.append(_webhook(table, f"[[webhooks]] #{i}"))
    return sinks


def with_chapters(sinks: list[Any], chapters: ChapterSink) -> list[Any]:
    """The daemon's sinks with its chapter sink first: it writes `{id}.chapters.vtt` through the
    subtitle outputs (when [outputs] is configured) and, closed first, hands them its last chapters
    before they close."""
    outputs = [s for s in sinks if isinstance(s, SubtitleOutputs)]
    chapters.files = outputs[0] if outputs else None
    return [chapters, *sinks]


async def close_sinks(sinks: Iterable[Sink], force: asyncio.Event | None = None) -> None:
    """Close every sink, in order; one that fails is logged and does not stop the others.

    Once `force` is set (a second signal), sinks skip their waits: webhook
    deliveries still queued are dropped and counted; subtitle files are still
    written and flushed (local and quick), so no held cue is lost."""
    for sink in sinks:
        try:
            closing = asyncio.ensure_future(sink.close(force=bool(force and force.is_set())))
            if force is not None and not force.is_set():
                forced = asyncio.ensure_future(force.wait())
                await asyncio.wait({closing, forced}, return_when=asyncio.FIRST_COMPLETED)
                forced.cancel()
                if not closing.done() and hasattr(sink, "abort"):
                    sink.abort()  # a second signal while this sink was still waiting
            await closing
        except Exception:
            log.exception("sink failed to close", extra={"sink": type(sink).__name__})


def _outputs(table: Any) -> SubtitleOutputs:
    section = _section(OutputsSection, table, "[outputs]")
    return SubtitleOutputs(section.dir, section.formats, section.streams, speech=section.speech)


def _webhook(table: Any, where: str) -> WebhookSink:
    section = _section(WebhookSection, table, where)
    try:
        return WebhookSink(**section.model_dump())
    except (ValueError, TypeError) as exc:  # the URL and the regular expression
        raise ValueError(f"{where}: {exc}") from None


def _section(model, table: Any, where: str):
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table")
    return validate(model, dict(table), table=where)
