"""Requests that need a stream's owner, over Redis (a thumbnail, the live details of a stream).

Each replica reads its own request stream `{p}rq:{replica}` (in the ownership loop's XREAD). A
request is one entry: `id` (random), `kind`, `stream`, and for kinds that take one a `payload` (a
small JSON body: a question, at most `MAX_PAYLOAD` bytes). The owner answers by RPUSH to `{p}rp:{id}`
(one element: a status line, a newline, the body) with a short expiry; the asker waits on that key
with BLPOP, so the answer reaches the asker only, never the stream's bus. No answer within
`request_timeout`: 504 with a clear message.

Entries are hostile until checked (anyone with write access to Redis could add one): the kind must
be one this replica answers, the stream id valid, the request id 32 hex digits; payloads and bodies
are bounded, and a payload reaches only a handler registered to take one; at most `_MAX_SERVING` requests are served at once, more are answered "busy".
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from streamer.config import STREAM_ID

__all__ = ["MAX_PAYLOAD", "Handler", "OwnerRequests", "RequestFailed"]

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[bytes]]  # (stream id[, payload]) -> body; raises RequestFailed
MAX_PAYLOAD = 16 * 1024  # a request's payload: a question and its options are far smaller
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_MAX_BODY = 4 * 1024 * 1024  # a thumbnail is far smaller
_MAX_SERVING = 16
_REPLY_TTL_MS = 30_000


class RequestFailed(Exception):
    """A request the owner could not answer: `status` is the HTTP status to give the asker."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class OwnerRequests:
    def __init__(self, redis: Any, key_prefix: str, replica_id: str, timeout: float,
                 op: Callable[..., Any]) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self.key = self.key_of(replica_id)
        self.timeout = timeout
        self._op = op  # a call's time limit (Ownership._op)
        self.handlers: dict[str, Handler] = {}
        self.payload_kinds: set[str] = set()  # kinds whose handler takes (stream id, payload)
        self._serving = 0

    def key_of(self, replica_id: str) -> str:
        return f"{self._prefix}rq:{replica_id}"

    async def ask(self, replica_id: str, kind: str, stream_id: str, payload: bytes | None = None) -> bytes:
        """Send a request to `replica_id` and wait for its answer. Raises RequestFailed."""
        if payload is not None and len(payload) > MAX_PAYLOAD:
            raise RequestFailed(413, "too_large", f"the request is over the limit of {MAX_PAYLOAD} bytes")
        request_id = secrets.token_hex(16)
        reply_key = f"{self._prefix}rp:{request_id}"
        fields: dict[str, Any] = {"id": request_id, "kind": kind, "stream": stream_id}
        if payload is not None:
            fields["payload"] = payload
        try:
            async with self._op():
                await self._redis.xadd(self.key_of(replica_id), fields, maxlen=1000, approximate=True)
            async with self._op(self.timeout):
                answer = await self._redis.blpop([reply_key], timeout=max(0.01, self.timeout))
        except Exception as exc:  # noqa: BLE001 -- redis errors and our own time limit: one clear answer
            raise RequestFailed(503, "bus_unreachable", f"cannot reach the stream's owner: {type(exc).__name__}") from None
        if answer is None:
            raise RequestFailed(504, "owner_timeout",
                                f"the owner of stream {stream_id!r} (replica {replica_id}) did not answer within "
                                f"{self.timeout:g} s")
        status, _, body = answer[1].partition(b"\n")
        if status == b"ok":
            return body
        code, _, message = body.decode("utf-8", "replace").partition(":")
        raise RequestFailed(int(status) if status.isdigit() and 400 <= int(status) < 600 else 502, code or "failed",
                            message[:500] or "the owner could not answer")

    async def answer_locally(self, kind: str, stream_id: str, payload: bytes | None = None) -> bytes:
        handler = self.handlers.get(kind)
        if handler is None:
            raise RequestFailed(400, "bad_request", f"unknown request {kind!r}")
        if kind in self.payload_kinds:
            return await handler(stream_id, payload or b"")
        if payload is not None:
            raise RequestFailed(400, "bad_request", f"request {kind!r} takes no payload")
        return await handler(stream_id)

    async def serve(self, fields: dict) -> None:
        """Answer one request entry (called for each entry of our request stream)."""
        request_id = _text(fields.get(b"id"))
        kind, stream_id = _text(fields.get(b"kind")), _text(fields.get(b"stream"))
        payload = fields.get(b"payload")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            log.warning("owner request ignored: bad request id")
            return
        reply_key = f"{self._prefix}rp:{request_id}"
        if self._serving >= _MAX_SERVING:
            await self._reply(reply_key, b"503\nbusy:the stream's owner is busy, try again")
            return
        self._serving += 1
        try:
            if kind is None or stream_id is None or not STREAM_ID.match(stream_id):
                raise RequestFailed(400, "bad_request", "bad request")
            if payload is not None and (not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD):
                raise RequestFailed(413, "too_large", f"the request is over the limit of {MAX_PAYLOAD} bytes")
            body = await self.answer_locally(kind, stream_id, payload)
            if len(body) > _MAX_BODY:
                raise RequestFailed(502, "too_large", "answer too large")
            reply = b"ok\n" + body
        except RequestFailed as exc:
            reply = f"{exc.status}\n{exc.code}:{exc.message}".encode()
        except Exception:
            log.exception("owner request failed", extra={"kind": kind, "stream": stream_id})
            reply = b"500\nfailed:the owner failed to answer"
        finally:
            self._serving -= 1
        await self._reply(reply_key, reply)

    async def _reply(self, reply_key: str, reply: bytes) -> None:
        try:
            async with self._op(), self._redis.pipeline(transaction=False) as pipe:
                pipe.rpush(reply_key, reply)
                pipe.pexpire(reply_key, _REPLY_TTL_MS)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 -- the asker times out and says so
            log.warning("owner request: reply not sent", extra={"error": type(exc).__name__})


def _text(raw: Any) -> str | None:
    if not isinstance(raw, bytes) or len(raw) > 128:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None
