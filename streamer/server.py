"""HTTP + WebSocket front of the daemon, on one port (aiohttp).

Routes:
  GET  /ws                      captions over WebSocket (docs/protocol.md); ?streams=a,b or ?streams=*
  GET  /streams                 list streams      POST /streams {id, url, ...}   add one
  GET  /streams/{id}            one stream        DELETE /streams/{id}           remove it
  POST /whip/{id}               WHIP: SDP offer in, 201 + SDP answer + Location
  DELETE /whip/{id}             end a WHIP session
  GET  /healthz  /readyz  /metrics
  POST /v1/caption/video        {"video": base64, "max_length": N}       one caption for a clip
  POST /v1/caption/videos       {"videos": [base64...], "max_length": N} one per clip, batched
  POST /v1/caption/frames       {"frames": [base64 image...], "max_length": N}

Every error is JSON `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx
status; a bad request never disturbs other streams or clients.

aiohttp rather than the websockets server: websockets' server speaks only
GET, and the control API, the JSON APIs and WHIP need POST and DELETE on
the same port. Clients (`streamer tail`, tests) use the websockets library.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from . import protocol
from .daemon import Daemon, StreamConfig, StreamExists, StreamNotFound
from .decode import iter_frames
from .errors import VideoError
from .hub import SubscriptionClosed
from .ingest.source import SourceSpecError
from .metrics import CONTENT_TYPE
from .sampler import SamplerConfig, WindowSampler
from .types import Frame, Window

__all__ = ["ServerConfig", "build_app", "DAEMON_KEY"]

log = logging.getLogger(__name__)

DAEMON_KEY = web.AppKey("daemon", Daemon)
_REQUEST_IDS = itertools.count()  # one-off requests get stream ids of their own (feature-cache keys)
CONFIG_KEY: web.AppKey["ServerConfig"] = web.AppKey("server_config")
SOCKETS_KEY: web.AppKey[set] = web.AppKey("sockets", set)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_body_bytes: int = 32 * 1024 * 1024  # JSON APIs carry base64 video
    max_clips: int = 16  # per /v1/caption/videos request
    max_frames: int = 64  # per /v1/caption/frames request
    heartbeat: float = 20.0  # WebSocket ping interval, seconds
    close_timeout: float = 2.0  # give a slow client this long to take the close frame
    # Bytes a client may have in flight (kernel send buffer + transport buffer)
    # before its messages back up into its bounded queue: bounds memory per
    # client and makes a stalled client show up as slow within seconds.
    client_send_buffer: int = 256 * 1024


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG_KEY].max_body_bytes
        return _error(413, "too_large", f"request body is over the limit of {limit} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


def build_app(daemon: Daemon, config: ServerConfig | None = None) -> web.Application:
    config = config or ServerConfig()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[errors_middleware])
    app[DAEMON_KEY] = daemon
    app[CONFIG_KEY] = config
    app[SOCKETS_KEY] = set()
    app.add_routes(
        [
            web.get("/ws", ws_handler),
            web.get("/streams", list_streams),
            web.post("/streams", add_stream),
            web.get("/streams/{id}", get_stream),
            web.delete("/streams/{id}", remove_stream),
            web.post("/whip/{id}", whip_offer),
            web.delete("/whip/{id}", whip_delete),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.post("/v1/caption/video", caption_video),
            web.post("/v1/caption/videos", caption_videos),
            web.post("/v1/caption/frames", caption_frames),
        ]
    )
    app.on_shutdown.append(_close_sockets)
    from .web import add_web_routes

    add_web_routes(app)
    return app


# -- health, metrics ----------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    if daemon.ready and not daemon.draining:
        return web.json_response({"status": "ready", "model": daemon.engine.model_name, "streams": len(daemon.streams)})
    return web.json_response({"status": "draining" if daemon.draining else "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[DAEMON_KEY].metrics.render()
    return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})


# -- streams --------------------------------------------------------------------
async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"code": "bad_json", "message": f"body is not valid JSON: {exc}"}}),
            content_type="application/json",
        ) from None


async def list_streams(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    return web.json_response({"streams": [rt.describe() for rt in daemon.streams.values()]})


async def get_stream(request: web.Request) -> web.Response:
    try:
        rt = request.app[DAEMON_KEY].get(request.match_info["id"])
    except StreamNotFound:
        return _error(404, "not_found", f"no stream {request.match_info['id']!r}")
    return web.json_response(rt.describe())


async def add_stream(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    if daemon.draining:
        return _error(503, "draining", "the daemon is shutting down")
    body = await _json_body(request)
    try:
        config = StreamConfig.from_dict(body)
        rt = await daemon.add_stream(config)
    except StreamExists as exc:
        return _error(409, "exists", str(exc))
    except (SourceSpecError, VideoError, ValueError) as exc:
        return _error(400, "bad_stream", str(exc))
    return web.json_response(rt.describe(), status=201, headers={"Location": f"/streams/{config.id}"})


async def remove_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    try:
        await request.app[DAEMON_KEY].remove_stream(stream_id)
    except StreamNotFound:
        return _error(404, "not_found", f"no stream {stream_id!r}")
    return web.Response(status=204)


# -- WHIP -------------------------------------------------------------------------
async def whip_offer(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    stream_id = request.match_info["id"]
    if request.content_type != "application/sdp":
        return _error(415, "unsupported_media_type", "WHIP offers must be Content-Type: application/sdp")
    offer = await request.text()
    try:
        config = StreamConfig(id=stream_id, **_stream_params(request.query))
        _, answer = await daemon.add_whip_stream(config, offer)
    except StreamExists as exc:
        return _error(409, "exists", str(exc))
    except ValueError as exc:
        return _error(400, "bad_offer", str(exc))
    return web.Response(
        status=201, text=answer, content_type="application/sdp", headers={"Location": f"/whip/{stream_id}"}
    )


def _stream_params(query) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("window", "hop"):
        if name in query:
            params[name] = float(query[name])
    if "frames" in query:
        params["frames"] = int(query["frames"])
    return params


async def whip_delete(request: web.Request) -> web.Response:
    return await remove_stream(request)


# -- WebSocket --------------------------------------------------------------------
async def ws_handler(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON_KEY]
    config = request.app[CONFIG_KEY]
    ws = web.WebSocketResponse(
        heartbeat=config.heartbeat,
        max_msg_size=protocol.MAX_MESSAGE_BYTES,
        writer_limit=max(config.client_send_buffer // 4, 1024),  # how often send waits for the socket to drain
    )
    await ws.prepare(request)
    _bound_send_buffer(request, config.client_send_buffer)
    request.app[SOCKETS_KEY].add(ws)
    streams: frozenset[str] | None = _initial_streams(request.query.get("streams"))
    only_changes = request.query.get("all", "0") not in ("1", "true")
    sub = daemon.hub.subscribe(streams, only_changes=only_changes)
    await ws.send_str(protocol.encode_hello(sorted(daemon.streams), daemon.hub.history))
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
                    streams = protocol.apply_subscription(streams, message)
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
            await ws.send_str(message)
    except SubscriptionClosed as closed:
        code = 1001 if closed.reason == "server shutdown" else 1008
        if code == 1008:
            daemon.metrics_clients_dropped.labels().inc()
            log.warning("websocket client dropped", extra={"reason": closed.reason, "peer": request.remote})
        try:
            await asyncio.wait_for(ws.close(code=code, message=closed.reason.encode()), close_timeout)
        except (asyncio.TimeoutError, ConnectionError):
            # it cannot even take the close frame: cut the connection
            if request.transport is not None:
                request.transport.abort()
    except ConnectionError:
        sub.close()


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS_KEY]):
        try:
            await asyncio.wait_for(ws.close(code=1001, message=b"server shutdown"), 2.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass


# -- one-off JSON captioning ------------------------------------------------------
def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{what} must be a non-empty base64 string")
    if data.startswith("data:") and "," in data:  # data URLs from browsers
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _max_length(body: dict) -> int | None:
    value = body.get("max_length")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
        raise ValueError("max_length must be an integer from 1 to 256")
    return value


def _clip_window(data: bytes, clip_id: str, num_frames: int, short_side: int | None) -> Window:
    """One window over a whole clip: num_frames spread evenly over it."""
    try:
        container = open_input_bytes(data)
    except VideoError as exc:
        raise ValueError(f"{clip_id}: {str(exc).split(': ', 1)[-1]}") from None
    try:
        frames = list(iter_frames(container, clip_id, short_side=short_side))
    except VideoError as exc:
        raise ValueError(f"{clip_id}: {str(exc).split(': ', 1)[-1]}") from None
    finally:
        container.close()
    span = max(frames[-1].pts - frames[0].pts, 1e-3)
    sampler = WindowSampler(SamplerConfig(window=span, frames=num_frames, hop=span), clip_id)
    windows = [w for f in frames for w in sampler.feed(f)] + sampler.flush()
    return windows[0]


def open_input_bytes(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data))
    except av.error.FFmpegError as exc:
        raise VideoError(f"clip: not a readable video ({getattr(exc, 'strerror', None) or exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("clip: has no video stream")
    return container


async def _caption_clips(request: web.Request, clips: list[bytes], max_length: int | None) -> list[dict]:
    daemon = request.app[DAEMON_KEY]
    engine = daemon.engine
    loop = asyncio.get_running_loop()
    windows = []
    request_id = next(_REQUEST_IDS)
    for i, data in enumerate(clips):
        # decoding is blocking work: off the loop
        windows.append(
            await loop.run_in_executor(None, _clip_window, data, f"_clip{request_id}.{i}", engine.num_frames, engine.frame_short_side)
        )
    captions = await daemon.caption_windows(windows, max_length)
    return [_api_caption(c) for c in captions]


def _api_caption(c) -> dict:
    return {"caption": c.text, "confidence": c.confidence, "start": c.start, "end": c.end, "model": c.model}


async def caption_video(request: web.Request) -> web.Response:
    body = await _json_body(request)
    try:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        clip = _b64(body.get("video"), "video")
        (result,) = await _caption_clips(request, [clip], _max_length(body))
    except ValueError as exc:
        return _error(400, "bad_request", str(exc))
    return web.json_response(result)


async def caption_videos(request: web.Request) -> web.Response:
    body = await _json_body(request)
    limit = request.app[CONFIG_KEY].max_clips
    try:
        if not isinstance(body, dict) or not isinstance(body.get("videos"), list) or not body["videos"]:
            raise ValueError("body must be {\"videos\": [base64, ...]}")
        if len(body["videos"]) > limit:
            raise ValueError(f"at most {limit} videos per request")
        clips = [_b64(v, f"videos[{i}]") for i, v in enumerate(body["videos"])]
        results = await _caption_clips(request, clips, _max_length(body))
    except ValueError as exc:
        return _error(400, "bad_request", str(exc))
    return web.json_response({"results": results})


def _decode_image(data: bytes, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what} is not a readable image ({exc})") from None


async def caption_frames(request: web.Request) -> web.Response:
    body = await _json_body(request)
    daemon = request.app[DAEMON_KEY]
    limit = request.app[CONFIG_KEY].max_frames
    try:
        frames_in = body.get("frames") if isinstance(body, dict) else None
        if not isinstance(frames_in, list) or not frames_in:
            raise ValueError("body must be {\"frames\": [base64 image, ...]}")
        if len(frames_in) > limit:
            raise ValueError(f"at most {limit} frames per request")
        loop = asyncio.get_running_loop()
        images = [
            await loop.run_in_executor(None, _decode_image, _b64(f, f"frames[{i}]"), f"frames[{i}]")
            for i, f in enumerate(frames_in)
        ]
        now, stream_id = time.time(), f"_frames{next(_REQUEST_IDS)}"
        frames = tuple(Frame(stream_id, i, float(i), img, now) for i, img in enumerate(images))
        (caption,) = await daemon.caption_windows([Window(stream_id, 0, frames)], _max_length(body))
    except ValueError as exc:
        return _error(400, "bad_request", str(exc))
    return web.json_response(_api_caption(caption))
