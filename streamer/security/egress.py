"""An in-process HTTP proxy that every HTTP(S) request FFmpeg makes for an untrusted source goes through.

FFmpeg's http protocol follows redirects by itself (no option turns that off),
and an HLS playlist names further URLs, so checking the URL a caller gave is
not enough. FFmpeg is pointed at this proxy instead (`ffmpeg_options`); the
proxy checks each destination with the NetworkPolicy and connects to the
checked IP itself, never to the name again, so DNS rebinding cannot swap the
address between the check and the connection.

What FFmpeg 8 sends through `http_proxy` (checked with PyAV 18 / FFmpeg 8.1):
- plain http: `GET http://host:port/path HTTP/1.1` with `Connection: close`,
  one request per connection; a redirect or the next HLS segment opens a new
  connection to the proxy, which checks it again;
- https: its tls protocol opens the `httpproxy` protocol, which sends
  `CONNECT host:port HTTP/1.1` and then runs TLS through the tunnel (with
  `tls_verify=1` the certificate is checked against the URL's host, as
  without a proxy; FFmpeg's default is not to verify);
- credentials from the proxy URL are sent in both cases, but only after a
  `407` that carries `Proxy-Authenticate: Basic`: the first attempt goes out
  without them and FFmpeg retries once on a new connection. So the 407 below
  must name Basic, and every FFmpeg request costs one extra round trip to
  this local proxy;
- FFmpeg skips the proxy for hosts listed in the `no_proxy` environment
  variable (lowercase only, `*` for all), whatever the options say, and reads
  it at every connection. No option overrides it, so `serve()` removes it from
  the process environment when it starts the proxy (`clear_ffmpeg_bypass`), and
  `ffmpeg_options` refuses to run should it be set again.

Plain asyncio streams, not aiohttp's server: the proxy splices raw bytes and
CONNECT tunnels, and must control exactly which bytes reach which peer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

from streamer.security.network import DestinationRefused, NetworkPolicy

__all__ = ["PROXY_PROTOCOLS", "EgressProxy", "clear_ffmpeg_bypass", "ffmpeg_options"]

log = logging.getLogger(__name__)

# What FFmpeg needs for http(s) and HLS through the proxy: `httpproxy` is the CONNECT
# client that tls uses; `crypto` is HLS AES-128. No `file`, `data`, `concat` or `udp`.
PROXY_PROTOCOLS = "http,https,tls,tcp,httpproxy,crypto"

MAX_HEAD = 16 * 1024  # request line and headers together
_CHUNK = 64 * 1024
_LINGER, _LINGER_READS = 1.0, 4  # after an error answer: at most 1 s and 256 KiB of client input dropped
_USER = "streamer"
_REALM = "streamer egress"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([^\s]+) HTTP/1\.([01])")
_HEADER_NAME = re.compile(_TOKEN)
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Hop-by-hop: about the client's connection to this proxy, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "te", "trailer", "upgrade"}
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def ffmpeg_options(proxy_url: str) -> dict[str, str]:
    """PyAV `av.open(url, options=...)` options for an http(s) or HLS source sent through `proxy_url`.

    Raises RuntimeError when the `no_proxy` environment variable is set:
    FFmpeg would connect directly to the hosts it names, unchecked.
    """
    bypass = os.environ.get("no_proxy", "").strip()
    if bypass:
        raise RuntimeError(
            f"the environment sets no_proxy={bypass[:80]!r}: FFmpeg would bypass the egress proxy for those hosts; "
            "unset it for the daemon"
        )
    return {
        # Read by http (plain requests) and handed by it to tls (CONNECT); the HLS demuxer
        # copies it to every playlist, key and segment request it opens.
        "http_proxy": proxy_url,
        "protocol_whitelist": PROXY_PROTOCOLS,
        # HLS may send the next segment's request on the previous connection when the server
        # did not say it will close; the proxy forwards one request per connection and would
        # never pass it on. So: a new (checked) connection for every playlist, key and segment.
        "http_persistent": "0",
    }


def clear_ffmpeg_bypass() -> str | None:
    """Remove `no_proxy` from this process's environment; what it held, or None.

    FFmpeg reads it with getenv() at every connection, in every decode thread,
    so it cannot be cleared for some opens only. Call once at startup, before
    decode threads run (os.environ also updates the C environment FFmpeg reads).
    `NO_PROXY` is left alone: FFmpeg does not read it (checked with FFmpeg 8.1).
    """
    value = os.environ.pop("no_proxy", None)
    return value if value is not None and value.strip() else None


class _BadRequest(Exception):
    """A request this proxy will not serve: answer `status` with the message and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


def _parse_head(head: bytes) -> _Request:
    # latin-1 maps every byte to one character: nothing can fail to decode or change length.
    lines = head.decode("latin-1").split("\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _BadRequest(400, "malformed request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue  # the blank line that ends the head
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            # Also refuses obsolete line folding (a line starting with whitespace).
            raise _BadRequest(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise _BadRequest(400, f"control character in header {name}")
        headers.append((name, value))
    return _Request(match.group(1), match.group(2), tuple(headers))


def _split_authority(authority: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' from a CONNECT request."""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _BadRequest(400, "CONNECT needs host:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or ":" in host:
            raise _BadRequest(400, "CONNECT needs host:port")
    if not host or not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _BadRequest(400, "CONNECT needs host:port")
    return host, int(port_text)


class EgressProxy:
    """An HTTP proxy on loopback that lets FFmpeg reach only destinations the policy allows.

    `url` carries a random secret; requests without it get 407, so other local
    users cannot use the proxy to reach what the policy allows. Counters:
    `requests` (authenticated requests, one destination check each) and
    `refused` (destinations the policy refused); `on_refused(reason)` is called
    for each refusal.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_connections: int = 256,
        head_timeout: float = 10.0,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.on_refused = on_refused
        self.requests = 0
        self.refused = 0
        self._secret = secrets.token_urlsafe(24)  # URL-safe: goes into the proxy URL as it is
        self._credentials = f"{_USER}:{self._secret}".encode()
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._handlers: set[asyncio.Task] = set()
        self._closed = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None or self._closed:
            raise RuntimeError("EgressProxy.start() may be called once")
        if os.environ.get("no_proxy", "").strip():
            log.warning("no_proxy is set: FFmpeg would bypass the egress proxy for the hosts it names")
        # limit: readuntil() refuses a head larger than this instead of buffering it.
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD)
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])

    @property
    def url(self) -> str:
        """`http://streamer:SECRET@127.0.0.1:PORT`, for FFmpeg's `http_proxy` option."""
        if self._address is None:
            raise RuntimeError("the egress proxy is not started")
        host, port = self._address
        host = f"[{host}]" if ":" in host else host
        return f"http://{_USER}:{self._secret}@{host}:{port}"

    async def close(self) -> None:
        """Stop listening and close every open connection and tunnel. Idempotent."""
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one client connection --

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream: asyncio.StreamWriter | None = None
        head = b""
        try:
            if self._closed:
                return
            if len(self._handlers) > self.max_connections:
                await self._reply(reader, writer, 503, "too many proxy connections")
                return
            try:
                request = await self._read_request(reader)
                if not self._authorised(request):
                    await self._reply(reader, writer, 407, "proxy credentials required", (("Proxy-Authenticate", f'Basic realm="{_REALM}"'),))
                    return
                self.requests += 1
                if request.method == "CONNECT":
                    host, port = _split_authority(request.target)
                else:
                    host, port, head = self._origin_form(request)
                upstream_reader, upstream = await self._open(host, port)
            except _BadRequest as exc:
                await self._reply(reader, writer, exc.status, str(exc))
                return
            except DestinationRefused as exc:
                self._refuse(str(exc))
                await self._reply(reader, writer, 403, str(exc))
                return
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await self._splice(reader, writer, upstream_reader, upstream)
            else:
                upstream.write(head)
                await self._send_body(request, reader, upstream)
                # Nothing more from the client is forwarded: a second request on this
                # connection could name another host, and would not be checked.
                await self._pump(upstream_reader, writer, [asyncio.get_running_loop().time()])
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a peer went away or stayed silent: nothing to answer
        except asyncio.CancelledError:
            # close() cancels open connections. asyncio's done-callback for this task calls
            # task.exception(), which would raise (and be logged) for a cancelled task.
            if not self._closed:
                raise
        except Exception:
            log.exception("egress proxy: connection failed")
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._handlers.discard(task)

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request:
        try:
            async with asyncio.timeout(self.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise _BadRequest(400, f"request head not complete within {self.head_timeout:g} s") from None
        except asyncio.LimitOverrunError:
            raise _BadRequest(400, f"request head larger than {MAX_HEAD} bytes") from None
        return _parse_head(head)

    def _authorised(self, request: _Request) -> bool:
        values = request.values("proxy-authorization")
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, self._credentials)

    def _origin_form(self, request: _Request) -> tuple[str, int, bytes]:
        """Destination and the head to send upstream for an absolute-form request."""
        try:
            parts = urlsplit(request.target)
            port = parts.port or 80
        except ValueError:
            raise _BadRequest(400, "malformed request target") from None
        if parts.scheme.lower() != "http":
            # https goes through CONNECT: this proxy never speaks TLS to an origin itself.
            raise _BadRequest(400, "only http:// request targets (use CONNECT for https)")
        if not parts.hostname:
            raise _BadRequest(400, "request target has no host")
        if request.values("transfer-encoding"):
            raise _BadRequest(501, "request bodies with Transfer-Encoding are not supported")
        lengths = set(request.values("content-length"))
        if len(lengths) > 1 or any(not v.isascii() or not v.isdigit() for v in lengths):
            raise _BadRequest(400, "bad Content-Length")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # Headers the client named in Connection are hop-by-hop as well.
        named = {t.strip().lower() for v in request.values("connection") for t in v.split(",")}
        lines = [f"{request.method} {path} HTTP/1.1"]
        has_host = False
        for name, value in request.headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in named:
                continue
            has_host = has_host or lower == "host"
            lines.append(f"{name}: {value}")
        if not has_host:
            netloc = parts.netloc.rpartition("@")[2]  # never credentials in Host
            lines.append(f"Host: {netloc}")
        lines.append("Connection: close")  # one request: the upstream closes when it is done
        return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Check `host` and connect to one of its checked addresses (never to the name)."""
        addresses = await self.policy.aresolve(host, port, timeout=self.connect_timeout)
        errors: list[str] = []
        for address in addresses:
            if self._address is not None and (address, port) == self._address:
                raise DestinationRefused(f"{host} is the egress proxy itself")
            try:
                async with asyncio.timeout(self.connect_timeout):
                    return await asyncio.open_connection(address, port, limit=_CHUNK)
            except TimeoutError:
                errors.append(f"{address}: no answer within {self.connect_timeout:g} s")
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
        status = 504 if all("no answer" in e for e in errors) else 502
        raise _BadRequest(status, f"cannot connect to {host}:{port} ({'; '.join(errors)})")

    async def _send_body(self, request: _Request, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        lengths = request.values("content-length")
        remaining = int(lengths[0]) if lengths else 0
        while remaining:
            async with asyncio.timeout(self.idle_timeout):
                data = await reader.read(min(remaining, _CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            upstream.write(data)
            await upstream.drain()
        await upstream.drain()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, last: list[float]) -> None:
        """Copy src to dst until src ends. Gives up once neither direction moved for idle_timeout."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await src.read(_CHUNK)
            except TimeoutError:
                if loop.time() - last[0] < self.idle_timeout:
                    continue  # the other direction is busy: a tunnel may be quiet one way
                raise
            if not data:
                return
            last[0] = loop.time()
            dst.write(data)
            await dst.drain()  # bounded: never buffer more than the slower peer takes

    async def _splice(
        self,
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Relay a CONNECT tunnel both ways; it ends when the upstream closes or on an error."""
        last = [asyncio.get_running_loop().time()]

        async def client_to_upstream() -> None:
            await self._pump(client_reader, upstream, last)
            # The client finished sending; the answer may still be coming.
            if upstream.can_write_eof():
                upstream.write_eof()
            await asyncio.Future()  # wait here until the other direction ends the tunnel

        up = asyncio.ensure_future(client_to_upstream())
        down = asyncio.ensure_future(self._pump(upstream_reader, client, last))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            results = await asyncio.gather(up, down, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, (ConnectionError, TimeoutError)):
                raise result

    # -- answers --

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        log.info("egress proxy refused: %s", reason)
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                log.exception("egress proxy: on_refused callback failed")

    async def _reply(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        body = (message + "\n").encode("utf-8", "replace")
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        try:
            async with asyncio.timeout(self.head_timeout):
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            # Closing a socket with unread input sends a reset, which can destroy the answer
            # before the client reads it: read (and drop) a little of what it still sends first.
            async with asyncio.timeout(_LINGER):
                for _ in range(_LINGER_READS):
                    if not await reader.read(_CHUNK):
                        break
        except (ConnectionError, TimeoutError):
            pass
