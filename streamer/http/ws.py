"""Route: GET /ws, captions over WebSocket (docs/protocol.md): hub subscription -> socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from aiohttp import WSMsgType, web

from streamer.http.common import CONFIG_KEY, SOCKETS_KEY, daemon_of
from streamer.http.guard import principal_of, refuse, requires
from streamer.pipeline.daemon import Daemon
from streamer.publish import protocol
from streamer.publish.hub import SubscriptionClosed

log = logging.getLogger("streamer.http")


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
    ws = web.WebSocketResponse(
        heartbeat=config.heartbeat,
        max_msg_size=protocol.MAX_MESSAGE_BYTES,
        writer_limit=max(config.client_send_buffer // 4, 1024),  # how often send waits for the socket to drain
    )
    await ws.prepare(request)
    _bound_send_buffer(request, config.client_send_buffer)
    ws.peer = peer
    sockets.add(ws)
    streams: frozenset[str] | None = _limit(_initial_streams(request.query.get("streams")), allowed)
    only_changes = request.query.get("all", "0") not in ("1", "true")
    sub = daemon.hub.subscribe(streams, only_changes=only_changes)
    visible = sorted(s for s in daemon.streams if allowed is None or s in allowed)
    await ws.send_str(protocol.encode_hello(visible, daemon.hub.history))
    sender = asyncio.create_task(_forward(sub, ws, config.close_timeout, daemon, request), name="ws-forward")
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                await ws.send_str(protocol.encode_error("bad_message", "send text frames"))
                continue
            try:
                message = protocol.parse_client_message(msg.data)
                if isinstance(message, protocol.Ping):
                    await ws.send_str(protocol.encode_pong())
                else:
                    streams = _limit(protocol.apply_subscription(streams, message), allowed)
                    sub.update(streams)
            except protocol.ProtocolError as exc:
                await ws.send_str(protocol.encode_error(exc.code, exc.message))
    finally:
        sub.close()
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            pass
        request.app[SOCKETS_KEY].discard(ws)
    return ws


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


async def _forward(sub, ws: web.WebSocketResponse, close_timeout: float, daemon: Daemon, request: web.Request) -> None:
    """Hub -> socket. A client too slow for its bounded queue is closed (1008)."""
    try:
        while True:
            message = await sub.get()
            await ws.send_str(message.encoded)
    except SubscriptionClosed as closed:
        code = 1001 if closed.reason == "server shutdown" else 1008
        if code == 1008:
            daemon.metrics.clients_dropped.inc()
            log.warning("websocket client dropped", extra={"reason": closed.reason, "peer": request.remote})
        try:
            await asyncio.wait_for(ws.close(code=code, message=closed.reason.encode()), close_timeout)
        except (asyncio.TimeoutError, ConnectionError):
            # it cannot even take the close frame: cut the connection
            if request.transport is not None:
                request.transport.abort()
    except ConnectionError:
        sub.close()


async def close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS_KEY]):
        try:
            await asyncio.wait_for(ws.close(code=1001, message=b"server shutdown"), 2.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass

