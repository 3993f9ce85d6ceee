"""Routes: questions about a stream and watches on it (issue #13).

  POST   /streams/{id}/ask                   {"question", "max_new_tokens"?, "at"?}  (viewer of the stream)
  GET    /streams/{id}/watches               the stream's watches                 (viewer of the stream)
  POST   /streams/{id}/watches               {"question", "every", "on", "hold", "id"?}  (operator)
  DELETE /streams/{id}/watches/{watch_id}                                          (operator)

An answer is about the stream's newest captioned window, or the window of its history (the
stream's `history`, 30 s by default) that holds media time `at`. Errors, as JSON: 400 bad
question (empty, over 512 characters, too many tokens for the model), 404 no such stream, 409
`out_of_history` (nothing captioned yet, or `at` outside the history: the message says the span
it holds; a later ask may succeed, hence a conflict with the stream's state rather than 422),
503 `busy` with Retry-After (the engine's one-off work is at its limit), 500 `engine_failed`.
Each answer is also published as an `answer` event (WebSocket clients and webhooks that opted in).

With a cluster (cluster/ownership.py) a stream runs on one replica: a question or watch call for
a stream that does not run here goes to its owner over Redis (a bounded JSON payload), which
answers as it would over HTTP; watches live on the owner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from streamer.config import AskRequest, ConfigError, WatchRequest, validate
from streamer.http.common import SERVICE_KEY, error_response, json_body
from streamer.http.guard import refuse, requires
from streamer.pipeline.daemon import OutOfHistory, StreamNotFound
from streamer.pipeline.scheduler import EngineFailed, SchedulerBusy
from streamer.pipeline.watches import WatchRefused, watches_of
from streamer.publish.protocol import event_message
from streamer.types import Answer

__all__ = ["ANSWER_FIELDS", "AskFailed", "add_routes", "ask_stream", "owner_handlers"]

log = logging.getLogger("streamer.http")

ANSWER_FIELDS = ("stream_id", "index", "start", "end", "question", "answer", "confidence", "model")
_BUS_DOWN = (RedisError, OSError)


class AskFailed(Exception):
    """A question or watch call that cannot be answered: the HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _failure(exc: Exception) -> AskFailed:
    if isinstance(exc, AskFailed):
        return exc
    if isinstance(exc, StreamNotFound):
        return AskFailed(404, "not_found", f"no stream {exc.args[0] if exc.args else ''!r}")
    if isinstance(exc, OutOfHistory):
        return AskFailed(409, "out_of_history", str(exc))
    if isinstance(exc, WatchRefused):
        return AskFailed(exc.status, exc.code, exc.message)
    if isinstance(exc, ValueError):  # the request's fields (ConfigError) or the engine's question check
        return AskFailed(400, "bad_request", str(exc))
    if isinstance(exc, SchedulerBusy):
        return AskFailed(503, "busy", str(exc))
    if isinstance(exc, EngineFailed):
        return AskFailed(500, "engine_failed", str(exc))
    raise exc


def _parse(model: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        raise AskFailed(400, "bad_request", "body must be a JSON object")
    try:
        return validate(model, body)
    except ConfigError as exc:
        raise AskFailed(400, "bad_request", str(exc)) from None


def answer_fields(answer: Answer) -> dict[str, Any]:
    """The answer as JSON-ready fields (non-finite numbers as null), with its request_id."""
    message = event_message(answer)
    return {k: message[k] for k in (*ANSWER_FIELDS, "request_id", "emit_time")}


# -- asking -----------------------------------------------------------------------------
async def _answer_here(daemon: Any, stream_id: str, req: AskRequest, request_id: str | None) -> dict[str, Any]:
    try:
        answer = await daemon.ask(stream_id, req.question, at=req.at, max_new_tokens=req.max_new_tokens,
                                  request_id=request_id)
    except (StreamNotFound, ValueError, SchedulerBusy, EngineFailed) as exc:
        raise _failure(exc) from None
    daemon.hub.publish_event(answer)  # everyone who opted in to `answer` sees every question answered
    return answer_fields(answer)


async def ask_stream(app: web.Application, stream_id: str, req: AskRequest,
                     request_id: str | None = None) -> dict[str, Any]:
    """Answer a question about a stream here, or on its owner (a cluster). Raises AskFailed."""
    service = app[SERVICE_KEY]
    daemon = service.daemon
    if daemon is None or daemon.draining:
        raise AskFailed(503, "unavailable", f"not answering now: {'draining' if daemon else service.phase}")
    if service.cluster is not None and stream_id not in daemon.streams:
        payload = req.model_dump(exclude_none=True)
        if request_id is not None:
            payload["request_id"] = request_id
        fields = await _on_owner(service.cluster, stream_id, "ask", payload)
        if not isinstance(fields, dict) or not all(k in fields for k in ANSWER_FIELDS):
            raise AskFailed(502, "bad_answer", "the stream's owner sent a malformed answer")
        return fields
    return await _answer_here(daemon, stream_id, req, request_id)


async def _on_owner(cluster: Any, stream_id: str, kind: str, payload: dict[str, Any]) -> Any:
    from streamer.cluster import RequestFailed

    try:
        body = await cluster.ask_owner(stream_id, kind, json.dumps(payload).encode())
    except RequestFailed as exc:
        code = "not_found" if exc.status == 404 else exc.code
        raise AskFailed(exc.status, code, exc.message) from None
    except _BUS_DOWN as exc:
        raise AskFailed(503, "unavailable", f"the stream's owner cannot be reached: the bus does not answer "
                                            f"({type(exc).__name__})") from None
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        raise AskFailed(502, "bad_answer", "the stream's owner sent a malformed answer") from None


def _error(request: web.Request, exc: AskFailed) -> web.Response:
    if exc.status in (429, 503):  # limits and load: counted; load passes, so say when to try again
        return refuse(request, exc.status, exc.code, exc.message,
                      headers={"Retry-After": "1"} if exc.status == 503 else None)
    return error_response(exc.status, exc.code, exc.message)


@requires("viewer", stream="id")
async def ask(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    try:
        req = _parse(AskRequest, await json_body(request))
        fields = await ask_stream(request.app, stream_id, req)
    except AskFailed as exc:
        return _error(request, exc)
    return web.json_response({k: fields[k] for k in ANSWER_FIELDS})


# -- watches ----------------------------------------------------------------------------
def _watch_here(daemon: Any, stream_id: str, op: str, data: dict[str, Any]) -> tuple[int, Any]:
    """One watch operation on this daemon: (HTTP status, JSON body). Raises AskFailed."""
    watches = watches_of(daemon)
    try:
        if op == "add":
            return 201, watches.add(stream_id, _parse(WatchRequest, data.get("watch"))).describe()
        if op == "delete":
            watch_id = str(data.get("watch_id", ""))
            if not watches.remove(stream_id, watch_id):
                raise AskFailed(404, "not_found", f"stream {stream_id!r} has no watch {watch_id[:64]!r}")
            return 204, None
        if op == "list":
            mine = watches.of_stream(stream_id)
            if not mine and stream_id not in daemon.streams:
                raise AskFailed(404, "not_found", f"no stream {stream_id!r}")
            return 200, {"watches": [w.describe() for w in mine]}
    except (WatchRefused, ValueError) as exc:
        raise _failure(exc) from None
    raise AskFailed(400, "bad_request", f"unknown watch operation {op[:32]!r}")


async def _watch_op(request: web.Request, op: str, data: dict[str, Any]) -> web.Response:
    stream_id = request.match_info["id"]
    service = request.app[SERVICE_KEY]
    daemon = service.daemon
    try:
        if daemon is None:
            raise AskFailed(503, "unavailable", f"not ready yet: {service.phase}")
        if service.cluster is not None and stream_id not in daemon.streams:
            reply = await _on_owner(service.cluster, stream_id, "watches", {"op": op, **data})
            status, body = (reply[0], reply[1]) if isinstance(reply, list) and len(reply) == 2 else (502, None)
        else:
            status, body = _watch_here(daemon, stream_id, op, data)
    except AskFailed as exc:
        return _error(request, exc)
    if status == 204:
        return web.Response(status=204)
    if not isinstance(status, int) or not 200 <= status < 300 or not isinstance(body, dict):
        return error_response(502, "bad_answer", "the stream's owner sent a malformed answer")
    headers = {"Location": f"/streams/{stream_id}/watches/{body.get('id')}"} if status == 201 else None
    return web.json_response(body, status=status, headers=headers)


@requires("viewer", stream="id")
async def list_watches(request: web.Request) -> web.Response:
    return await _watch_op(request, "list", {})


@requires("operator", stream="id")
async def add_watch(request: web.Request) -> web.Response:
    return await _watch_op(request, "add", {"watch": await json_body(request)})


@requires("operator", stream="id")
async def delete_watch(request: web.Request) -> web.Response:
    return await _watch_op(request, "delete", {"watch_id": request.match_info["watch_id"]})


# -- the owner's side (cluster/requests.py) ----------------------------------------------
def owner_handlers(daemon: Any) -> dict[str, Callable[[str, bytes], Awaitable[bytes]]]:
    """What a stream's owner answers for other replicas: questions and watch operations, each
    with a JSON payload (bounded by cluster/requests.py); errors as RequestFailed."""
    from streamer.cluster import RequestFailed

    def payload_of(raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise RequestFailed(400, "bad_request", "the request's payload is not a JSON object")
        return data

    async def ask_here(stream_id: str, raw: bytes) -> bytes:
        data = payload_of(raw)
        request_id = data.pop("request_id", None)
        try:
            if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
                raise AskFailed(400, "bad_request", "bad request_id")
            fields = await _answer_here(daemon, stream_id, _parse(AskRequest, data), request_id)
        except AskFailed as exc:
            raise RequestFailed(exc.status, exc.code, exc.message) from None
        return json.dumps(fields).encode()

    async def watch_here(stream_id: str, raw: bytes) -> bytes:
        data = payload_of(raw)
        try:
            status, body = _watch_here(daemon, stream_id, str(data.pop("op", "")), data)
        except AskFailed as exc:
            raise RequestFailed(exc.status, exc.code, exc.message) from None
        return json.dumps([status, body]).encode()

    return {"ask": ask_here, "watches": watch_here}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/streams/{id}/ask", ask)
    app.router.add_get("/streams/{id}/watches", list_watches)
    app.router.add_post("/streams/{id}/watches", add_watch)
    app.router.add_delete("/streams/{id}/watches/{watch_id}", delete_watch)
