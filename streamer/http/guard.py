"""Who may call what, from where: Host, Origin/CORS, tokens and roles, slow connections.

Every route declares the access it needs with `@requires(...)` or `@public`;
a route that declares nothing needs `admin` (fail closed). The table lives in
docs/SECURITY.md and is checked against the routes by a test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_urldispatcher import StaticResource

from streamer.http.common import CONFIG_KEY, SERVICE_KEY, ServerConfig
from streamer.security.auth import Authenticator, Principal

__all__ = ["requires", "public", "access_of", "guard_middleware", "Security", "SECURITY_KEY", "PRINCIPAL_KEY",
           "principal_of", "refuse", "GuardedSite", "LOOPBACK_HOSTS"]

log = logging.getLogger("streamer.http")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


@dataclass(frozen=True)
class Access:
    role: str | None  # None: public
    stream_param: str | None = None  # match_info key naming the stream the call is about


def requires(role: str, stream: str | None = None):
    """Declare the role a handler needs (and which path part names its stream)."""

    def mark(handler):
        handler.access = Access(role, stream)
        return handler

    return mark


def public(handler):
    handler.access = Access(None)
    return handler


_ADMIN = Access("admin")
_PUBLIC = Access(None)


def access_of(request: web.Request, config: ServerConfig) -> Access:
    route = request.match_info.route
    if isinstance(route.resource, StaticResource):
        return _PUBLIC  # the pages' scripts and styles: no data in them
    access = getattr(route.handler, "access", _ADMIN)
    if access.role == "metrics":
        return _PUBLIC if config.metrics_public else Access("viewer")
    return access


class Security:
    """What the middleware needs, made once per app."""

    def __init__(self, config: ServerConfig) -> None:
        self.auth = Authenticator(config.tokens)
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.allowed_origins)
        hosts = {h.lower().strip("[]") for h in config.allowed_hosts}
        if not hosts and self.auth.open:
            hosts = set(LOOPBACK_HOSTS)  # open mode: DNS rebinding must not reach us
        self.allowed_hosts = frozenset(hosts)
        self.seen: weakref.WeakSet = weakref.WeakSet()  # transports that got a whole request head

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            return False
        return name.lower() in self.allowed_hosts


SECURITY_KEY = web.AppKey("security", Security)
PRINCIPAL_KEY = web.RequestKey("streamer.principal", Principal)


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL_KEY]


def refuse(request: web.Request, status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    """A JSON error, counted in streamer_requests_refused{reason}."""
    metrics = request.app[SERVICE_KEY].metrics
    if metrics is not None:
        metrics.refused.labels(reason=code).inc()
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": "Location"}


@web.middleware
async def guard_middleware(request: web.Request, handler):
    config = request.app[CONFIG_KEY]
    security = request.app[SECURITY_KEY]
    if request.transport is not None:
        security.seen.add(request.transport)
    if not security.host_allowed(request.host):
        return refuse(request, 403, "host_not_allowed", "this Host is not served here (see [server] allowed_hosts)")
    origin = request.headers.get("Origin")
    cross = origin is not None and (urlsplit(origin).netloc or origin) != request.host
    cross_allowed = cross and origin.rstrip("/") in security.allowed_origins
    if request.method == "OPTIONS":  # CORS preflight
        if not cross_allowed:
            return refuse(request, 403, "origin_not_allowed", "cross-origin requests are allowed only from allowed_origins")
        return web.Response(status=204, headers={
            **_cors_headers(origin), "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": "600",
        })
    # A foreign page may make simple requests (forms, text/plain POSTs) and open WebSockets
    # without a preflight: refuse those outright rather than rely on the browser.
    if cross and not cross_allowed and (request.method not in ("GET", "HEAD") or request.path == "/ws"):
        return refuse(request, 403, "origin_not_allowed", f"requests from {origin!r} are not allowed (allowed_origins)")
    access = access_of(request, config)
    principal = security.auth.identify(_bearer(request))
    if principal is None and "token" in request.query:
        principal = security.auth.identify(request.query["token"], from_query=True)  # viewer rights at most
    if access.role is not None:
        if principal is None:
            return refuse(request, 401, "unauthorized", "a valid token is needed (Authorization: Bearer TOKEN)",
                          headers={"WWW-Authenticate": 'Bearer realm="streamer"'})
        if not principal.has(access.role):
            return refuse(request, 403, "forbidden", f"this needs the {access.role} role")
        stream_id = request.match_info.get(access.stream_param) if access.stream_param else None
        if stream_id is not None and not principal.covers(stream_id):
            return refuse(request, 403, "forbidden", f"this token does not cover stream {stream_id!r}")
    request[PRINCIPAL_KEY] = principal
    response = await handler(request)
    if cross_allowed and not response.prepared:
        response.headers.update(_cors_headers(origin))
    return response


async def read_body(request: web.Request) -> bytes:
    """The request body, within [server] body_timeout (a client dribbling bytes holds a slot)."""
    timeout = request.app[CONFIG_KEY].body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=json.dumps({"error": {"code": "body_timeout", "message": f"request body not received within {timeout:g} s"}}),
            content_type="application/json",
        ) from None


class GuardedSite(web.TCPSite):
    """TCPSite that closes connections whose first request head has not arrived within
    header_timeout (aiohttp has no such timeout; slowloris clients would hold sockets forever).
    Later requests on a kept-alive connection are bounded by keepalive_timeout."""

    def __init__(self, runner: web.AppRunner, app: web.Application, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(runner, *args, **kwargs)
        self._app = app
        self._header_timeout = header_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        security = self._app[SECURITY_KEY]
        timeout = self._header_timeout

        def protocol():
            proto = server()
            loop.call_later(timeout, _expire, proto)
            return proto

        def _expire(proto) -> None:
            transport = proto.transport
            if transport is not None and not transport.is_closing() and transport not in security.seen:
                metrics = self._app[SERVICE_KEY].metrics
                if metrics is not None:
                    metrics.refused.labels(reason="header_timeout").inc()
                transport.abort()

        self._server = await loop.create_server(protocol, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
