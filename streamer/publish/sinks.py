"""Caption sinks from the config file: `[outputs]` (subtitle files) and `[[webhooks]]`.

```toml
[outputs]
dir = "/var/lib/streamer/subtitles"   # <dir>/<stream>.vtt, .srt, .jsonl (relative: to the working directory)
formats = ["vtt", "srt", "jsonl"]      # default: all three
streams = ["lobby"]                     # default: every stream

[[webhooks]]
url = "https://example.com/hooks/captions"
match = "person|car"    # optional regex (case-insensitive) on the caption text; default: every caption
streams = ["lobby"]     # optional; default: every stream
only_changes = false    # true: skip a caption whose text repeats the stream's previous one
queue_size = 100        # captions waiting; when full, the oldest is dropped
retries = 3             # on connection errors, timeouts and 5xx; never on 4xx
backoff = 0.5           # seconds before the first retry, doubling
timeout = 5.0           # seconds per attempt
```

A sink is anything with `async start(hub, spawn=None)` (subscribe, start its
own tasks, under a Supervisor's `spawn` when given; it must not block) and
`async close(force=False)` (flush, idempotent). `serve()` starts
the sinks right after the daemon and closes them after the daemon has
drained, so the last captions reach the files and the webhooks.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from streamer.publish.consumer import Spawn
from streamer.publish.hub import CaptionHub
from streamer.publish.subtitles import OUTPUT_FORMATS, SubtitleOutputs
from streamer.publish.webhooks import WebhookSink

__all__ = ["Sink", "outputs_from_config", "close_sinks"]

log = logging.getLogger(__name__)

_OUTPUT_KEYS = {"dir", "formats", "streams"}
_WEBHOOK_KEYS = {"url", "match", "streams", "only_changes", "queue_size", "retries", "backoff", "timeout"}


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
    where = "[outputs]"
    _check_table(table, _OUTPUT_KEYS, where)
    directory = table.get("dir")
    if not isinstance(directory, str) or not directory.strip():
        raise ValueError(f"{where} dir must be a non-empty string (the directory for the subtitle files)")
    formats = table.get("formats", list(OUTPUT_FORMATS))
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise ValueError(f"{where} formats must be a non-empty list of strings, some of {', '.join(OUTPUT_FORMATS)}")
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown:
        raise ValueError(f"{where} formats: unknown format(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(OUTPUT_FORMATS)}")
    return SubtitleOutputs(directory, formats, _streams(table, where))


def _webhook(table: Any, where: str) -> WebhookSink:
    _check_table(table, _WEBHOOK_KEYS, where)
    if "url" not in table:
        raise ValueError(f"{where} needs a 'url'")
    kw: dict[str, Any] = {"streams": _streams(table, where)}
    if "match" in table:
        if not isinstance(table["match"], str) or not table["match"]:
            raise ValueError(f"{where} match must be a non-empty string (a regular expression)")
        kw["match"] = table["match"]
    if "only_changes" in table:
        if not isinstance(table["only_changes"], bool):
            raise ValueError(f"{where} only_changes must be true or false")
        kw["only_changes"] = table["only_changes"]
    for key in ("queue_size", "retries"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where} {key} must be an integer, got {value!r}")
            kw[key] = value
    for key in ("backoff", "timeout"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where} {key} must be a number of seconds, got {value!r}")
            kw[key] = float(value)
    try:
        return WebhookSink(table["url"], **kw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_table(table: Any, known: set[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table")
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")


def _streams(table: Mapping[str, Any], where: str) -> list[str] | None:
    streams = table.get("streams")
    if streams is None or streams == "*":
        return None
    if not isinstance(streams, list) or not all(isinstance(s, str) and s for s in streams):
        raise ValueError(f"{where} streams must be a list of stream ids (or \"*\" for every stream)")
    return streams
