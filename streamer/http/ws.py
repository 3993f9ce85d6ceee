"""Route: GET /ws, captions over WebSocket (docs/protocol.md): hub subscription -> socket.

Each connection runs three tasks, and the handler closes the socket once, for
the first of them that ends:

- read: client frames (subscribe, unsubscribe, ping, ask; WebSocket pings and pongs); an `ask` is
  answered by a task of its own (at most MAX_ASKS_IN_FLIGHT per connection), so reading goes on;
- forward: hub -> socket; a subscription whose queue fills (`client_queue`
  messages) is closed by the hub as a slow consumer;
- watch: the heartbeat. `heartbeat` seconds after the client's last pong the
  server pings; if no pong comes back within `heartbeat / 2`, the client has
  stopped reading: 1008 `slow consumer` when messages to it are waiting (queued,
  in the server's buffer, or unsent in the kernel because its TCP receive window
  is full), 1011 `ping timeout` when nothing is (a dead or hung peer).

With a bus (`[bus]`, publish/bus.py), `?since={"cam1": 41}` resumes: the
forward task first sends the bus's messages after those seqs (a `gap` for
any that are gone), then the subscription's, skipping what it already sent.

Only a pong that echoes the server's own ping counts: TCP delivers in order,
so it proves the client read everything sent before that ping. A client that
sends (its own pings, subscriptions) but does not read is not kept alive by it.
aiohttp's own heartbeat is off: it cuts a connection without a close frame, a
log line or a metric, and any frame from the client resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from streamer.http.common import CONFIG_KEY, SOCKETS_KEY, ServerConfig, daemon_of
from streamer.http.guard import principal_of, refuse, requires
from streamer.ops.metrics import DaemonMetrics
from streamer.publish import protocol
from streamer.publish.hub import REASON_SHUTDOWN, REASON_SLOW, Subscription, SubscriptionClosed

log = logging.getLogger("streamer.http")


@dataclass(frozen=True, slots=True)
class _Close:
    """Why the server closes a connection: the close frame, and the metric label when it is the client's fault."""

    code: int
    reason: str
    metric: str | None  # streamer_ws_clients_dropped_total{reason=...}


SLOW = _Close(1008, REASON_SLOW, "slow")
PING_TIMEOUT = _Close(1011, "ping timeout", "ping_timeout")
SHUTDOWN = _Close(1001, REASON_SHUTDOWN, None)
BUS_DOWN = _Close(1011, "bus unreachable", None)  # a `since` replay failed half-way: resume again later
_GONE = _Close(1000, "", None)  # the client closed or vanished: nothing to report

class _BusDown(Exception):
    """A `since` replay could not read the bus."""


try:
    from redis.exceptions import RedisError as _RedisError
except ImportError:  # redis is a dependency; without it there is no bus, and nothing to catch
    _RedisError = OSError  # type: ignore[misc,assignment]
_BUS_ERRORS = (_RedisError, OSError)

MAX_ASKS_IN_FLIGHT = 4  # questions one connection may have waiting for the engine
_ASK_CODES = frozenset({"not_found", "out_of_history", "bad_request", "busy", "engine_failed"})  # else "unavailable"

# Linux: bytes in a socket's send queue not sent yet, i.e. held back by the peer's closed window.
_SIOCOUTQNSD = 0x894B


def _limit(streams: frozenset[str] | None, allowed: frozenset[str] | None) -> frozenset[str] | None:
    """A viewer limited to some streams follows at most those ("every stream" means all of its own)."""
    if allowed is None:
        return streams
    return allowed if streams is None else streams & allowed


@requires("viewer")
async def ws_handler(request: web.Request) -> web.StreamResponse:
    daemon = daemon_of(request)
    config = request.app[CONFIG_KEY]
    sockets = request.app[SOCKETS_KEY]
    if len(sockets) >= config.max_ws_clients:
        return refuse(request, 429, "max_ws_clients", f"at the limit of {config.max_ws_clients} WebSocket clients")
    peer = request.remote
    if sum(1 for s in sockets if getattr(s, "peer", None) == peer) >= config.max_ws_clients_per_address:
        return refuse(request, 429, "max_ws_clients_per_address",
                      f"at the limit of {config.max_ws_clients_per_address} WebSocket clients from one address")
    allowed = principal_of(request).streams
    bus: Any = daemon.hub.bus  # CaptionBus (publish/bus.py), with [bus]
    since: dict[str, int] = {}
    if "since" in request.query:
        if bus is None:
            return refuse(request, 400, "bad_request", "'since' needs a daemon with a bus ([bus]); this one has none")
        try:
            since = protocol.parse_since(request.query["since"])
        except protocol.ProtocolError as exc:
            return refuse(request, 400, exc.code, exc.message)
        if not bus.connected:
            return refuse(request, 503, "bus_unreachable", "the bus is unreachable: retry with the same 'since'",
                          headers={"Retry-After": "1"})
    try:  # opt-in event types (answer, watch, chapter, speech), checked before the upgrade
        types = protocol.parse_types(request.query.get("types", "").split(","))
    except protocol.ProtocolError as exc:
        return refuse(request, 400, "bad_request", exc.message)
    ws = web.WebSocketResponse(
        autoping=False,  # pongs are the heartbeat's evidence: _Client.read sees them (and answers pings)
        timeout=config.close_timeout,  # for the client's close frame after ours
        # Read a message up to MAX_FRAME_BYTES to the end, so one over MAX_MESSAGE_BYTES gets a
        # `too_large` error frame; past that aiohttp closes with 1009 rather than buffer it.
        max_msg_size=protocol.MAX_FRAME_BYTES,
        writer_limit=max(config.client_send_buffer // 4, 1024),  # how often send waits for the socket to drain
    )
    await ws.prepare(request)
    _bound_send_buffer(request, config.client_send_buffer)
    ws.peer = peer
    sockets.add(ws)
    streams = _limit(_initial_streams(request.query.get("streams")), allowed)
    only_changes = request.query.get("all", "0") not in ("1", "true")
    sub = daemon.hub.subscribe(streams, only_changes=only_changes, types=types)
    client = _Client(ws, sub, request, config, daemon.metrics, streams, allowed)
    client.resume = {sid: seq for sid, seq in since.items() if streams is None or sid in streams}
    client.bus = bus
    verdict = _GONE
    try:
        known = set(daemon.streams) | set(bus.streams if bus is not None else ())  # with a bus: every replica's
        visible = sorted(s for s in known if allowed is None or s in allowed)
        await ws.send_str(protocol.encode_hello(visible, daemon.hub.history))
        verdict = await client.run()
    except ConnectionError:
        pass  # gone before its hello went out
    finally:
        sub.close(verdict.reason or "closed")  # a slow verdict is counted by the hub too
        sockets.discard(ws)
    await client.close(verdict)
    return ws


class _Client:
    """One connection: its subscription, its three tasks, and the one close at the end."""

    def __init__(self, ws: web.WebSocketResponse, sub: Subscription, request: web.Request, config: ServerConfig,
                 metrics: DaemonMetrics, streams: frozenset[str] | None, allowed: frozenset[str] | None) -> None:
        self.ws, self.sub, self.request, self.config, self.metrics = ws, sub, request, config, metrics
        self.streams, self.allowed = streams, allowed
        self.loop = asyncio.get_running_loop()
        self.last_pong = self.loop.time()  # the handshake counts as the first sign of life
        self._pings = itertools.count(1)
        self._expected = b""
        self._ponged = asyncio.Event()
        self._evidence: dict[str, Any] = {}  # what a verdict was based on, for its log line
        self.resume: dict[str, int] = {}  # `since`: stream -> the last seq the client has
        self.bus: Any = None  # CaptionBus, with `since`
        self.asks: set[asyncio.Task] = set()  # questions waiting for their answers

    async def run(self) -> _Close:
        """Run until the client leaves or must be closed; return why (its close frame)."""
        tasks = [
            asyncio.create_task(self.read(), name="ws-read"),
            asyncio.create_task(self.forward(), name="ws-forward"),
            asyncio.create_task(self.watch(), name="ws-watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks + list(self.asks):  # the client is gone: no engine time for its questions
                task.cancel()
            await asyncio.gather(*tasks, *self.asks, return_exceptions=True)
        verdicts = [t.result() for t in tasks if t in done and not t.cancelled() and t.exception() is None]
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, ConnectionError):
                raise exc
        return next((v for v in verdicts if v is not _GONE), _GONE)

    # -- the three tasks ---------------------------------------------------------
    async def read(self) -> _Close:
        async for msg in self.ws:
            if msg.type is WSMsgType.PONG:
                if msg.data == self._expected:
                    self.last_pong = self.loop.time()
                    self._ponged.set()
            elif msg.type is WSMsgType.PING:
                await self.ws.pong(msg.data)
            elif msg.type is WSMsgType.ERROR:
                # aiohttp already sent the close frame (1009 over MAX_FRAME_BYTES, 1002/1007 bad framing)
                self.metrics.clients_dropped.labels(reason="protocol_error").inc()
                log.warning("websocket client closed: bad frame", extra={
                    "peer": self.request.remote, "code": getattr(msg.data, "code", None), "error": str(msg.data)})
                return _GONE
            else:
                await self._on_message(msg.type, msg.data)
        return _GONE

    async def forward(self) -> _Close:
        """Hub -> socket. A client too slow for its bounded queue is closed by the hub (1008)."""
        try:
            sent = await self.replay() if self.resume else {}
            while True:
                message = await self.sub.get()
                if sent and message.bus_seq is not None and message.bus_seq <= sent.get(message.stream_id, -1):
                    continue  # the replay sent it (or the client had it)
                await self.ws.send_str(message.encoded)
        except _BusDown:
            return BUS_DOWN
        except SubscriptionClosed as closed:
            if closed.reason == REASON_SLOW:
                self._evidence = {"queued": self.sub.capacity, "rule": "queue full"}
                return SLOW
            return SHUTDOWN if closed.reason == REASON_SHUTDOWN else _GONE
        except ConnectionError:
            return _GONE

    async def watch(self) -> _Close:
        heartbeat = self.config.heartbeat
        while True:
            due = self.last_pong + heartbeat - self.loop.time()
            if due > 0:
                await asyncio.sleep(due)  # a timer: the next ping is due then (a pong moves it on)
                continue
            self._expected = next(self._pings).to_bytes(8, "big")
            self._ponged.clear()
            try:
                async with asyncio.timeout(heartbeat / 2):
                    await self.ws.ping(self._expected)  # may wait for the socket to drain: that counts too
                    await self._ponged.wait()
            except TimeoutError:
                backlog = self.backlog()
                self._evidence = {**backlog, "rule": "no pong", "since_pong_s": round(self.loop.time() - self.last_pong, 1)}
                return SLOW if any(backlog.values()) else PING_TIMEOUT
            except ConnectionError:
                return _GONE

    async def replay(self) -> dict[str, int]:
        """`since`: send each stream's messages after the client's seq from the bus (with `gap` first
        when some are gone); return stream -> the last seq sent, for forward() to skip."""
        from streamer.publish.bus import Gap

        sent = dict(self.resume)
        last_text: dict[str, str] = {}
        try:
            for sid, after in sorted(self.resume.items()):
                async for item in self.bus.since(sid, after):
                    if isinstance(item, Gap):
                        await self.ws.send_str(protocol.encode_gap(sid, item.from_seq, item.to_seq))
                        continue
                    sent[sid] = item.bus_seq
                    if item.kind not in ("caption", "state") and item.kind not in self.sub.types:
                        continue  # an event type the client did not opt in to
                    if item.text is not None:
                        # as the subscription would: a repeat is skipped when the client has its text
                        if self.sub.only_changes and item.stable and last_text.get(sid) == item.text:
                            continue
                        last_text[sid] = item.text
                        self.sub.note_sent(item)
                    await self.ws.send_str(item.encoded)
        except _BUS_ERRORS as exc:
            self.metrics.bus_errors.labels(op="replay").inc()
            log.warning("websocket resume failed: bus unreachable", extra={"peer": self.request.remote, "error": str(exc)})
            raise _BusDown from exc
        return sent

    # -- helpers -----------------------------------------------------------------
    async def _on_message(self, kind: WSMsgType, data: Any) -> None:
        try:
            if kind is not WSMsgType.TEXT:
                if len(data) > protocol.MAX_MESSAGE_BYTES:
                    raise protocol.ProtocolError("too_large", f"message is over the limit of {protocol.MAX_MESSAGE_BYTES} bytes")
                raise protocol.ProtocolError("bad_message", "send text frames")
            message = protocol.parse_client_message(data)
            if isinstance(message, protocol.Ping):
                await self.ws.send_str(protocol.encode_pong())
            elif isinstance(message, protocol.Ask):
                self._ask(message)
            else:
                self.streams = _limit(protocol.apply_subscription(self.streams, message), self.allowed)
                self.sub.update(self.streams)
                if message.types is not None:
                    add = isinstance(message, protocol.Subscribe)
                    self.sub.update_types(self.sub.types | message.types if add else self.sub.types - message.types)
        except protocol.ProtocolError as exc:
            await self.ws.send_str(protocol.encode_error(exc.code, exc.message, exc.request_id))

    def _ask(self, message: protocol.Ask) -> None:
        """Start answering a question (the reply comes later); ProtocolError when it cannot be asked here."""
        if self.allowed is not None and message.stream_id not in self.allowed:
            raise protocol.ProtocolError("not_found", f"no stream {message.stream_id!r} for this token",
                                         message.request_id)
        if len(self.asks) >= MAX_ASKS_IN_FLIGHT:
            self.metrics.refused.labels(reason="max_ws_asks").inc()
            raise protocol.ProtocolError("busy", f"{MAX_ASKS_IN_FLIGHT} questions of this connection are waiting "
                                         "for their answers; ask again once one came", message.request_id)
        task = asyncio.create_task(self._answer(message), name="ws-ask")
        self.asks.add(task)
        task.add_done_callback(self.asks.discard)

    async def _answer(self, message: protocol.Ask) -> None:
        from streamer.config import AskRequest
        from streamer.http.ask import AskFailed, ask_stream

        try:
            request = AskRequest(question=message.question, at=message.at, max_new_tokens=message.max_new_tokens)
            fields = await ask_stream(self.request.app, message.stream_id, request, message.request_id)
            reply = protocol.encode({"v": protocol.PROTOCOL_VERSION, "type": "answer", **fields,
                                     "request_id": message.request_id})
        except AskFailed as exc:
            code = exc.code if exc.code in _ASK_CODES else "unavailable"
            reply = protocol.encode_error(code, exc.message, message.request_id)
        except Exception as exc:  # the asker gets an error, the log the reason
            log.exception("websocket ask failed", extra={"peer": self.request.remote, "stream": message.stream_id})
            reply = protocol.encode_error("unavailable", f"the question could not be answered ({type(exc).__name__})",
                                          message.request_id)
        with contextlib.suppress(ConnectionError):
            await self.ws.send_str(reply)

    def backlog(self) -> dict[str, int]:
        """What is waiting to reach the client: messages in its queue, bytes in the server's
        buffer, bytes the kernel cannot send (its receive window is closed)."""
        transport = self.request.transport
        return {
            "queued": self.sub.pending,
            "buffered": transport.get_write_buffer_size() if transport is not None else 0,
            "unsent": _unsent_bytes(transport.get_extra_info("socket") if transport is not None else None),
        }

    async def close(self, verdict: _Close) -> None:
        if verdict.metric is not None:
            self.metrics.clients_dropped.labels(reason=verdict.metric).inc()
            log.warning("websocket client closed", extra={
                "reason": verdict.reason, "code": verdict.code, "peer": self.request.remote, **self._evidence})
        if self.ws.closed:
            return
        try:
            await asyncio.wait_for(self.ws.close(code=verdict.code, message=verdict.reason.encode()),
                                   self.config.close_timeout)
        except (TimeoutError, ConnectionError):
            # it cannot even take the close frame (or never answers it): cut the connection
            if self.request.transport is not None:
                self.request.transport.abort()


def _unsent_bytes(sock: Any) -> int:
    if sock is None or not sys.platform.startswith("linux"):
        return 0  # elsewhere the queue and the server's buffer are the evidence
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def _bound_send_buffer(request: web.Request, limit: int) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(limit // 2, 1024))  # the kernel doubles it
    transport.set_write_buffer_limits(high=max(limit // 2, 1024))


def _initial_streams(value: str | None) -> frozenset[str] | None:
    if value is None or value.strip() in ("", "*"):
        return None  # a bare /ws follows every stream
    return frozenset(s for s in (p.strip() for p in value.split(",")) if s)


async def close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS_KEY]):
        try:
            await asyncio.wait_for(ws.close(code=1001, message=b"server shutdown"), 2.0)
        except (TimeoutError, ConnectionError):
            pass
