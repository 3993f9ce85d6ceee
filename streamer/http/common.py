"""What every route module shares: the server config, the app keys, JSON errors and bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from streamer.ops.metrics import DaemonMetrics
from streamer.pipeline.daemon import Daemon

__all__ = ["ServerConfig", "SERVICE_KEY", "Service", "daemon_of", "CONFIG_KEY", "SOCKETS_KEY", "error_response", "json_body"]



class Service:
    """What the routes serve: the daemon once its model is loaded, and why not before that.

    The port is bound before the model loads (a download can take minutes), so
    /healthz answers and /readyz says "loading model" instead of refusing connections."""

    def __init__(self, daemon: Daemon | None = None, phase: str = "loading model",
                 metrics: DaemonMetrics | None = None) -> None:
        self.daemon = daemon
        self.phase = "ready" if daemon is not None else phase
        self.metrics = metrics if metrics is not None else (daemon.metrics if daemon is not None else None)
        self.cluster: Any = None  # cluster.Ownership with [bus] ownership: streams live in Redis


SERVICE_KEY = web.AppKey("service", Service)
CONFIG_KEY: web.AppKey["ServerConfig"] = web.AppKey("server_config")
SOCKETS_KEY: web.AppKey[set] = web.AppKey("sockets", set)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_body_bytes: int = 32 * 1024 * 1024  # JSON APIs carry base64 video
    max_clips: int = 16  # per /v1/caption/videos request
    max_frames: int = 64  # per /v1/caption/frames request
    heartbeat: float = 20.0  # ping a WebSocket client this long after its last pong; no pong in half of it: closed
    close_timeout: float = 2.0  # give a slow client this long to take the close frame
    # Bytes a client may have in flight (kernel send buffer + transport buffer)
    # before its messages back up into its bounded queue: bounds memory per
    # client and makes a stalled client show up as slow within seconds.
    client_send_buffer: int = 256 * 1024
    # -- security (docs/SECURITY.md) --
    tokens: tuple = ()  # TokenEntry, ...; none: open, and then only on loopback
    metrics_public: bool = False
    insecure_no_auth: bool = False
    allowed_origins: tuple[str, ...] = ()  # CORS and WebSocket Origin, beyond the daemon's own
    allowed_hosts: tuple[str, ...] = ()  # Host header; empty: any with tokens, loopback names without
    sources: Any = None  # SourcePolicy for URLs from HTTP; None: the default policy
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    max_ws_clients: int = 256
    max_ws_clients_per_address: int = 32
    max_inflight_requests: int = 8
    max_image_pixels: int = 3840 * 2160



def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)



async def json_body(request: web.Request) -> Any:
    """The JSON body of a state-changing request. Only `application/json`: a foreign page can send
    forms and text/plain without a CORS preflight, so those are refused (415)."""
    from streamer.http.guard import read_body

    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": {"code": "unsupported_media_type", "message": "send Content-Type: application/json"}}),
            content_type="application/json",
        )
    raw = await read_body(request)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"code": "bad_json", "message": f"body is not valid JSON: {exc}"}}),
            content_type="application/json",
        ) from None
    except RecursionError:  # json.loads recurses per nesting level
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"code": "bad_json", "message": "body is nested too deeply"}}),
            content_type="application/json",
        ) from None



def cluster_of(request: web.Request) -> Any:
    """The replica's cluster.Ownership, or None when it runs alone (no [bus], or ownership off)."""
    return request.app[SERVICE_KEY].cluster


def daemon_of(request: web.Request) -> Daemon:
    """The running daemon; 503 while the model is still loading."""
    service = request.app[SERVICE_KEY]
    if service.daemon is None:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": {"code": "starting", "message": f"not ready yet: {service.phase}"}}),
            content_type="application/json",
            headers={"Retry-After": "1"},
        )
    return service.daemon
