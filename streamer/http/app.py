"""HTTP + WebSocket front of the daemon, on one port (aiohttp).

Routes:
  GET  /ws                      captions over WebSocket (docs/protocol.md); ?streams=a,b or ?streams=*
  GET  /streams                 list streams      POST /streams {id, url, ...}   add one
  GET  /streams/{id}            one stream        DELETE /streams/{id}           remove it
  GET  /streams/{id}/chapters   its chapters (JSON; ?format=vtt: a WebVTT chapters track)
  POST /whip/{id}               WHIP: SDP offer in, 201 + SDP answer + Location /whip/{id}/{session}
  DELETE /whip/{id}/{session}   end that WHIP session     DELETE /whip/{id}   end whichever it is
  GET  /healthz  /readyz  /metrics  /auth (admin: who holds which role)
  POST /v1/caption/video        {"video": base64, "max_length": N}       one caption for a clip
  POST /v1/caption/videos       {"videos": [base64...], "max_length": N} one per clip, batched
  POST /v1/caption/frames       {"frames": [base64 image...], "max_length": N}
  POST /streams/{id}/ask        a question about the stream; GET/POST /streams/{id}/watches, DELETE .../{watch_id}

Who may call which route: guard.py and docs/SECURITY.md. Every error is JSON `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx
status; a bad request never disturbs other streams or clients.

aiohttp rather than the websockets server: websockets' server speaks only
GET, and the control API, the JSON APIs and WHIP need POST and DELETE on
the same port. Clients (`streamer tail`, tests) use the websockets library.
"""

from __future__ import annotations

from aiohttp import web

from streamer.http import ask, chapters, oneshot, streams, whip, ws
from streamer.http.common import (
    CONFIG_KEY,
    SERVICE_KEY,
    SOCKETS_KEY,
    ServerConfig,
    Service,
    error_response,
)
from streamer.http.guard import SECURITY_KEY, Security, guard_middleware, public, requires
from streamer.http.pages import add_web_routes
from streamer.ops.metrics import CONTENT_TYPE
from streamer.pipeline.daemon import Daemon

__all__ = ["ServerConfig", "Service", "build_app"]


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG_KEY].max_body_bytes
        return error_response(413, "too_large", f"request body is over the limit of {limit} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


def build_app(service: Daemon | Service, config: ServerConfig | None = None) -> web.Application:
    """The app for a running daemon, or for a `Service` whose daemon comes once the model is loaded."""
    config = config or ServerConfig()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[errors_middleware, guard_middleware])
    app[SECURITY_KEY] = Security(config)
    app[SERVICE_KEY] = service if isinstance(service, Service) else Service(service)
    app[CONFIG_KEY] = config
    app[SOCKETS_KEY] = set()
    app[oneshot.INFLIGHT_KEY] = [0]
    app.add_routes(
        [
            web.get("/ws", ws.ws_handler),
            web.get("/streams", streams.list_streams),
            web.post("/streams", streams.add_stream),
            web.get("/streams/{id}", streams.get_stream),
            web.get("/streams/{id}/chapters", chapters.get_chapters),
            web.delete("/streams/{id}", streams.remove_stream),
            web.post("/whip/{id}", whip.whip_offer),
            web.delete("/whip/{id}", whip.whip_delete),
            web.delete("/whip/{id}/{session}", whip.whip_delete),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/auth", auth_info),
            web.post("/v1/caption/video", oneshot.caption_video),
            web.post("/v1/caption/videos", oneshot.caption_videos),
            web.post("/v1/caption/frames", oneshot.caption_frames),
        ]
    )
    ask.add_routes(app)  # /streams/{id}/ask and /streams/{id}/watches (ask.py)
    app.on_shutdown.append(ws.close_sockets)
    add_web_routes(app)
    return app


@public
async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process can still recover (also while the model loads);
    503 once a supervised task spent its restart budget."""
    daemon = request.app[SERVICE_KEY].daemon
    alive, reason = daemon.health() if daemon is not None else (True, "ok")
    if alive:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "failed", "reason": reason}, status=503)


@public
async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while captions can flow; otherwise 503 with the reason."""
    service = request.app[SERVICE_KEY]
    daemon = service.daemon
    if daemon is None:
        return web.json_response({"status": "starting", "reason": service.phase}, status=503)
    ready, reason = daemon.readiness()
    if ready:
        qa_models = {"qa_models": sorted(daemon.qa_engines)} if daemon.qa_engines else {}
        return web.json_response({"status": "ready", "model": daemon.engine.model_name, **qa_models,
                                  "streams": len(daemon.streams)})
    status = reason if reason in ("draining", "starting") else "not_ready"
    return web.json_response({"status": status, "reason": reason}, status=503)


@requires("metrics")  # viewer, or public with [auth] metrics_public = true
async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    registry = service.daemon.metrics if service.daemon is not None else service.metrics
    if registry is None:
        return error_response(503, "starting", f"not ready yet: {service.phase}")
    body = registry.render()  # while the model loads: process metrics and zeroed daemon ones
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})



@requires("admin")
async def auth_info(request: web.Request) -> web.Response:
    """The configured tokens as roles and stream ids (never the tokens or their digests)."""
    security = request.app[SECURITY_KEY]
    entries = [{"role": e.role, "streams": sorted(e.streams) if e.streams is not None else "*"}
               for e in security.auth.entries]
    return web.json_response({"open": security.auth.open, "tokens": entries,
                              "allowed_origins": sorted(security.allowed_origins),
                              "allowed_hosts": sorted(security.allowed_hosts) or "*"})
