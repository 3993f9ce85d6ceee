"""Webhooks: POST captions (all, or those whose text matches a regex) to a URL.

With `types` a webhook also gets those opt-in messages (speech, answer,
watch, chapter: docs/protocol.md), `match` tried on their text (a cue's
words, an answer, a chapter's title).

`WebhookSink` is a hub subscriber (`only_changes=False` by default,
`replay=False`) with two tasks of its own, so a dead or slow endpoint never
holds up captioning, WebSocket clients or other sinks:

- the consumer drains the hub subscription at once, keeps the captions whose
  stream and text match, and appends their message to a bounded queue
  (`queue_size`); when it is full the **oldest** waiting caption is dropped
  and counted (`dropped`): after an outage, the newest captions matter most;
- the sender POSTs them one at a time, in order, with one aiohttp
  `ClientSession`.

The body is the caption message of the WebSocket protocol (`protocol.
encode_caption`, `docs/protocol.md`), `Content-Type: application/json`,
with an `Idempotency-Key` header that is the same for every attempt of one
delivery (a receiver can drop the duplicate a lost response may cause).

A delivery succeeds on a 2xx answer. Connection errors, timeouts (`timeout`
seconds per attempt) and 5xx answers are retried up to `retries` times,
waiting `backoff * 2**k` seconds before retry k+1; any other answer (4xx,
3xx: redirects are not followed) fails it at once. A failed delivery is
counted (`failed`) and the sender goes on to the next caption. The first
failure of an outage is logged as a warning (the URL shown without its path
and query, which often hold a secret), the recovery once as info.

`close()` gives the queue up to `timeout` seconds to be delivered, then
drops (and counts) what is left, so shutdown is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

import aiohttp
from yarl import URL

from streamer.publish.consumer import HubConsumer, Spawn
from streamer.publish.hub import (
    CaptionHub,
    HubMessage,
)
from streamer.publish.protocol import SERVER_NAME, ProtocolError, parse_types
from streamer.types import Answer, Caption, Chapter, SpeechCue, WatchEvent

__all__ = ["WebhookSink"]

log = logging.getLogger(__name__)


class WebhookSink(HubConsumer):
    """POSTs each (matching) caption to `url`; see the module docstring for the policies."""

    def __init__(
        self,
        url: str,
        *,
        match: str | None = None,
        streams: Iterable[str] | None = None,
        only_changes: bool = False,
        queue_size: int = 100,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 5.0,
        types: Iterable[str] = (),
    ) -> None:
        if not isinstance(url, str):
            raise ValueError(f"webhook url must be a string, got {url!r}")
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise ValueError(f"webhook url {url!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"webhook url must be http(s)://host/...; got {_redact(url)!r}")
        try:
            self.pattern = None if match is None else re.compile(match, re.IGNORECASE)
        except (re.error, TypeError) as exc:
            raise ValueError(f"webhook match {match!r} is not a valid regular expression: {exc}") from None
        if isinstance(streams, str):
            raise TypeError(f"streams must be a collection of stream ids or None, got the string {streams!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"webhook queue_size must be an integer >= 1, got {queue_size!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"webhook retries must be an integer >= 0, got {retries!r}")
        if not _number(backoff) or backoff < 0:
            raise ValueError(f"webhook backoff must be a number of seconds >= 0, got {backoff!r}")
        if not _number(timeout) or timeout <= 0:
            raise ValueError(f"webhook timeout must be a number of seconds > 0, got {timeout!r}")
        self.url = url
        self.match = match
        self.streams = None if streams is None else frozenset(streams)
        self.only_changes = only_changes
        self.queue_size = queue_size
        self.retries = retries
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        if isinstance(types, str):
            raise TypeError(f"webhook types must be a list of message types, got the string {types!r}")
        try:
            self.types = parse_types(types)  # opt-in events (speech, answer, watch, chapter) besides captions
        except ProtocolError as exc:
            raise ValueError(f"webhook {exc.message}") from None
        self.delivered = 0  # captions the endpoint accepted (2xx)
        self.failed = 0  # deliveries given up: retries spent, or a 4xx/3xx answer
        self.dropped = 0  # captions dropped from a full queue (oldest first), or left at close
        self.retried = 0  # attempts after the first
        self._queue: deque[tuple[str, str]] = deque()  # (delivery key, message)
        self._wake = asyncio.Event()
        self._init_consumer()
        self.consumer_name = "webhook"
        self._sender: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._closed = False
        self._inflight = False  # a caption is being delivered
        self._down = False  # an outage was logged and nothing was delivered since
        self._run_id = uuid.uuid4().hex[:12]
        self._seq = 0

    @property
    def pending(self) -> int:
        """Captions waiting to be sent (not counting the one in flight)."""
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        return {"delivered": self.delivered, "failed": self.failed, "dropped": self.dropped,
                "retried": self.retried, "pending": self.pending}

    async def start(self, hub: CaptionHub, spawn: Spawn | None = None) -> None:
        """Subscribe to `hub` and start sending (once); `spawn` supervises the consume loop."""
        if self._closed:
            raise RuntimeError("WebhookSink is closed")
        if self._sender is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": SERVER_NAME},
        )
        self._start_consuming(hub, spawn)
        self._sender = asyncio.create_task(self._send_loop(), name="webhook-send")  # catches per delivery
        log.info("webhook started", extra={"url": _redact(self.url), "match": self.match})

    async def close(self, force: bool = False) -> None:
        """Stop taking captions, give the queue `timeout` seconds to go out (none with `force`),
        then stop (idempotent). What could not be sent is dropped, counted and logged."""
        if self._closed:
            return
        self._closed = True
        await self._stop_consuming()
        self._closing = True
        self._wake.set()
        if self._sender is not None:
            # asyncio.wait, not wait_for: abort() may cancel the sender meanwhile
            await asyncio.wait({self._sender}, timeout=0 if force else self.timeout)
            left = len(self._queue) + self._inflight
            if not self._sender.done() or self._sender.cancelled():
                self._sender.cancel()
                await asyncio.gather(self._sender, return_exceptions=True)
                self.dropped += self._inflight
                if left:
                    log.warning("webhook: shutdown before every caption was sent; dropped",
                                extra={"url": _redact(self.url), "dropped": left})
        if self._queue:
            self.dropped += len(self._queue)
            self._queue.clear()
        if self._session is not None:
            await self._session.close()

    def abort(self) -> None:
        """Stop sending now (a second signal during close): what is left is dropped, counted and logged."""
        if self._sender is not None:
            self._sender.cancel()

    # -- consumer ------------------------------------------------------------------
    def _on_message(self, message: HubMessage) -> None:
        text = _matched_text(message.payload)
        if text is None:
            return  # states, and events of types this webhook did not ask for (the hub filters those too)
        if self.pattern is not None and not self.pattern.search(text):
            return
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("webhook queue full: oldest captions dropped",
                            extra={"url": _redact(self.url), "dropped": self.dropped})
        self._seq += 1
        self._queue.append((f"{self._run_id}-{self._seq}", message.encoded))
        self._wake.set()

    # -- sender ---------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            key, body = self._queue.popleft()
            self._inflight = True
            try:
                await self._deliver(key, body)
            except Exception:  # a bug must not end the sender: count it and go on
                self.failed += 1
                log.exception("webhook delivery error", extra={"url": _redact(self.url)})
            self._inflight = False

    async def _deliver(self, key: str, body: str) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with self._session.post(self.url, data=body.encode(), headers=headers,
                                              allow_redirects=False) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue  # connection refused or reset, timeout: retry
            if 200 <= status < 300:
                self.delivered += 1
                if self._down:
                    self._down = False
                    log.info("webhook deliveries resumed", extra={"url": _redact(self.url)})
                return
            error = f"HTTP {status}"
            if status < 500:
                break  # the endpoint refused this caption: trying again will not help
        self.failed += 1
        if not self._down:
            self._down = True
            log.warning("webhook delivery failed", extra={"url": _redact(self.url), "error": error, "failed": self.failed})



def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value != float("inf")


def _redact(url: str) -> str:
    """scheme://host:port only: webhook paths and queries often carry a secret token."""
    try:
        u = URL(url)
        return str(u.origin()) + "/..." if u.host else "<url>"
    except ValueError:
        return "<url>"


def _matched_text(payload: Any) -> str | None:
    """The text a webhook's `match` is tried on: a caption's or a speech cue's text, an answer, a watch's
    answer, a chapter's title; None for what a webhook never posts (states)."""
    if isinstance(payload, (Caption, SpeechCue)):
        return payload.text
    if isinstance(payload, (Answer, WatchEvent)):
        return payload.answer
    if isinstance(payload, Chapter):
        return payload.title
    return None
