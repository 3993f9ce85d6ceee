"""SSRF checks and the egress proxy, against real FFmpeg (PyAV), real aiohttp servers and real files.

Linux routes all of 127.0.0.0/8 to loopback. The "camera" servers listen on
127.0.0.2, which the policy allows as an explicit exception; the "victim"
listens on 127.0.0.1 and serves the same clip at every path, so any request
that slipped through would succeed there and show up in its log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import pytest
import websockets
from aiohttp import web

from streamer.security.egress import PROXY_PROTOCOLS, EgressProxy, ffmpeg_options
from streamer.security.network import DEFAULT_DENY, DestinationRefused, NetworkPolicy
from tests.support.media import moving_square, write_video

pytestmark = pytest.mark.timeout(30)

CAMERA = "127.0.0.2"
POLICY = NetworkPolicy(allow=(f"{CAMERA}/32",))


# -- fixtures: media, servers, proxy --


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("egress-media")
    frames = moving_square(30, 160, 120)
    write_video(root / "clip.mp4", frames)
    write_video(root / "seg0.ts", frames)  # an HLS segment: MPEG-TS
    return root


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("egress-tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={CAMERA}", "-addext", f"subjectAltName=IP:{CAMERA}"],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass
class Server:
    base: str
    port: int
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of every request that arrived
    headers: list[dict[str, str]] = field(default_factory=list)


async def _serve(app: web.Application, host: str, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, 0, ssl_context=ssl_context).start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def victim(media) -> AsyncIterator[Server]:
    """127.0.0.1: answers every path with the clip, and logs it. Must see nothing."""
    server = Server("", 0)

    async def anything(request: web.Request) -> web.StreamResponse:
        server.seen.append(f"{request.method} {request.path_qs}")
        return web.FileResponse(media / "clip.mp4")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner, port = await _serve(app, "127.0.0.1")
    server.base, server.port = f"http://127.0.0.1:{port}", port
    yield server
    await runner.cleanup()


def _camera_app(server: Server, media: Path, victim: Server) -> web.Application:
    async def log(request: web.Request, handler):
        server.seen.append(f"{request.method} {request.path_qs}")
        server.headers.append(dict(request.headers))
        return await handler(request)

    def playlist(segment: str) -> str:
        return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:1.0,\n{segment}\n#EXT-X-ENDLIST\n"

    async def clip(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(media / "clip.mp4")

    async def segment(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(media / "seg0.ts", headers={"Content-Type": "video/mp2t"})

    async def good(request: web.Request) -> web.Response:
        return _m3u8(playlist("seg0.ts"))

    async def evil(request: web.Request) -> web.Response:
        return _m3u8(playlist(f"{victim.base}/seg0.ts"))

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers), headers={"Connection": "close"})

    async def to_clip(request: web.Request) -> web.Response:
        raise web.HTTPFound("/clip.mp4")

    async def to_victim(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{victim.base}/secret")

    app = web.Application(middlewares=[web.middleware(log)])
    app.router.add_get("/clip.mp4", clip)
    app.router.add_get("/seg0.ts", segment)
    app.router.add_get("/headers", headers)
    app.router.add_get("/good.m3u8", good)
    app.router.add_get("/evil.m3u8", evil)
    app.router.add_get("/to-clip", to_clip)
    app.router.add_get("/to-victim", to_victim)
    return app


def _m3u8(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/vnd.apple.mpegurl")


@pytest.fixture
async def camera(media, victim) -> AsyncIterator[Server]:
    """127.0.0.2 (allowed): the clip, an HLS playlist and segment, redirects."""
    server = Server("", 0)
    runner, port = await _serve(_camera_app(server, media, victim), CAMERA)
    server.base, server.port = f"http://{CAMERA}:{port}", port
    yield server
    await runner.cleanup()


@pytest.fixture
async def tls_camera(media, victim, tls_files) -> AsyncIterator[Server]:
    server = Server("", 0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    runner, port = await _serve(_camera_app(server, media, victim), CAMERA, context)
    server.base, server.port = f"https://{CAMERA}:{port}", port
    yield server
    await runner.cleanup()


@pytest.fixture
def reasons() -> list[str]:
    """What the proxy's on_refused callback was given."""
    return []


@pytest.fixture
async def proxy(reasons) -> AsyncIterator[EgressProxy]:
    p = EgressProxy(POLICY, on_refused=reasons.append)
    await p.start()
    yield p
    await p.close()


# -- helpers --


def _decode(url: str, options: dict[str, str], limit: int = 10) -> int:
    """Open `url` with PyAV and decode up to `limit` video frames (blocking)."""
    with av.open(url, options=options, timeout=10) as container:
        n = 0
        for _ in container.decode(video=0):
            n += 1
            if n >= limit:
                break
        return n


async def decode(url: str, proxy: EgressProxy, **extra: str) -> int:
    return await asyncio.to_thread(_decode, url, {**ffmpeg_options(proxy.url), **extra})


def _auth(proxy: EgressProxy) -> str:
    secret = proxy.url.split("//", 1)[1].rsplit("@", 1)[0]
    return "Basic " + base64.b64encode(secret.encode()).decode()


def _proxy_port(proxy: EgressProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


async def raw(proxy: EgressProxy, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the proxy, read until it closes: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _proxy_port(proxy))
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return _parse_response(answer)


def _parse_response(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# -- FFmpeg through the proxy --


async def test_allowed_camera_decodes_through_the_proxy(proxy, camera, victim):
    assert await decode(f"{camera.base}/clip.mp4", proxy) == 10
    assert camera.seen and all(s == "GET /clip.mp4" for s in camera.seen)
    # Every request went through the proxy (FFmpeg's first try has no credentials: 407, then again).
    assert proxy.requests == len(camera.seen) and proxy.refused == 0
    assert victim.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0", "2130706433"])
async def test_loopback_destinations_are_refused(proxy, reasons, victim, host):
    with pytest.raises(av.error.FFmpegError, match="403"):
        await decode(f"http://{host}:{victim.port}/clip.mp4", proxy)
    assert victim.seen == []
    assert proxy.refused == 1 and len(reasons) == 1
    assert re.search(r"(loopback|'this host' \(0\.0\.0\.0/8\)) address \(not allowed", reasons[0])  # localhost may answer ::1 first


async def test_direct_access_works_without_the_proxy(victim):
    # The control for the refusals above: FFmpeg does reach the victim when nothing stops it.
    assert await asyncio.to_thread(_decode, f"{victim.base}/clip.mp4", {}) == 10
    assert victim.seen


async def test_redirects_are_checked_again(proxy, reasons, camera, victim):
    assert await decode(f"{camera.base}/to-clip", proxy) == 10  # FFmpeg follows a redirect through the proxy
    with pytest.raises(av.error.FFmpegError):
        await decode(f"{camera.base}/to-victim", proxy)
    assert "GET /to-victim" in camera.seen
    assert victim.seen == []
    assert proxy.refused == 1 and reasons[0].startswith("127.0.0.1 is a loopback address")


async def test_hls_segments_are_checked(proxy, reasons, camera, victim):
    assert await decode(f"{camera.base}/good.m3u8", proxy) == 10
    assert "GET /seg0.ts" in camera.seen
    try:
        frames = await decode(f"{camera.base}/evil.m3u8", proxy)
    except av.error.FFmpegError:
        frames = 0
    assert frames == 0
    assert "GET /evil.m3u8" in camera.seen
    assert victim.seen == []
    assert proxy.refused >= 1 and all(r.startswith("127.0.0.1 is a loopback") for r in reasons)


async def test_https_goes_through_connect(proxy, tls_camera, victim):
    assert await decode(f"{tls_camera.base}/clip.mp4", proxy, tls_verify="0") == 10
    assert "GET /clip.mp4" in tls_camera.seen and proxy.refused == 0
    with pytest.raises(av.error.FFmpegError):
        await decode(f"https://127.0.0.1:{victim.port}/clip.mp4", proxy, tls_verify="0")
    assert victim.seen == []
    assert proxy.refused == 1


async def test_ffmpeg_options(monkeypatch):
    monkeypatch.delenv("no_proxy", raising=False)
    options = ffmpeg_options("http://u:s@127.0.0.1:1")
    assert options["http_proxy"] == "http://u:s@127.0.0.1:1"
    assert set(options["protocol_whitelist"].split(",")) == set(PROXY_PROTOCOLS.split(",")) >= {"http", "https", "tls", "tcp", "httpproxy"}
    assert "file" not in options["protocol_whitelist"]
    # FFmpeg connects directly to hosts named in no_proxy, whatever http_proxy says.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(RuntimeError, match="no_proxy"):
        ffmpeg_options("http://u:s@127.0.0.1:1")


async def test_no_proxy_in_the_daemons_environment_opens_no_way_around_the_proxy(monkeypatch, tiny_model, camera, victim):
    """With no_proxy=* FFmpeg would connect to every host directly, redirects included: the daemon
    removes it when it starts the proxy, so an allowed camera that redirects to loopback still gets nowhere."""
    import aiohttp

    from streamer.http.common import ServerConfig
    from streamer.security.policy import SourcePolicy
    from tests.support.daemon import read_messages, running_daemon

    monkeypatch.setenv("no_proxy", "*")

    def state(messages, stream_id, states):
        return [m for m in messages if m["type"] == "state" and m["stream_id"] == stream_id and m["state"] in states]

    config = ServerConfig(port=0, sources=SourcePolicy(network=POLICY))
    async with running_daemon(tiny_model, server_config=config) as d, aiohttp.ClientSession() as http:
        assert "no_proxy" not in os.environ
        async with websockets.connect(d.ws) as ws:
            for stream_id, path in [("cam", "/clip.mp4"), ("evil", "/to-victim")]:
                async with http.post(f"{d.http}/streams", json={"id": stream_id, "url": camera.base + path}) as resp:
                    assert resp.status == 201, await resp.text()  # http(s) sources stay available
            # cam: any state past "connecting" means FFmpeg reached it (its 1 s clip is used up while probing
            # with fflags=nobuffer, so it may never go live)
            messages = await read_messages(ws, lambda m: state(m, "cam", {"live", "reconnecting"})
                                           and state(m, "evil", {"reconnecting", "failed"}), timeout=20)
        assert "403" in state(messages, "evil", {"reconnecting", "failed"})[0]["detail"]  # the proxy's refusal
    assert "GET /to-victim" in camera.seen and "GET /clip.mp4" in camera.seen
    assert victim.seen == []


# -- the proxy's own rules, with a raw client --


async def test_requests_without_the_secret_get_407(proxy, camera):
    target = f"{camera.base}/headers"
    for extra in ("", "Proxy-Authorization: Basic " + base64.b64encode(b"streamer:wrong").decode() + "\r\n"):
        status, headers, _ = await raw(proxy, f"GET {target} HTTP/1.1\r\nHost: {CAMERA}\r\n{extra}\r\n".encode())
        assert status == 407
        assert headers["proxy-authenticate"].startswith("Basic ")  # FFmpeg only sends credentials after this
    status, _, _ = await raw(proxy, f"CONNECT {CAMERA}:{camera.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 407
    assert camera.seen == [] and proxy.requests == 0
    status, _, _ = await raw(proxy, f"GET {target} HTTP/1.1\r\nHost: {CAMERA}\r\nProxy-Authorization: {_auth(proxy)}\r\n\r\n".encode())
    assert status == 200 and camera.seen == ["GET /headers"]


async def test_forwarded_request_is_origin_form(proxy, camera):
    request = (f"GET {camera.base}/headers?a=1 HTTP/1.1\r\nHost: cam.example:{camera.port}\r\nProxy-Authorization: {_auth(proxy)}\r\n"
               "Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: dropped\r\nX-Custom: kept\r\n\r\n")
    status, _, body = await raw(proxy, request.encode())
    assert status == 200
    seen = json.loads(body)
    assert camera.seen == ["GET /headers?a=1"]
    assert seen["Host"] == f"cam.example:{camera.port}" and seen["X-Custom"] == "kept" and seen["Connection"] == "close"
    assert "Proxy-Authorization" not in seen and "Proxy-Connection" not in seen and "X-Hop" not in seen


async def test_one_request_per_connection_and_idle_timeout(victim):
    """A raw upstream that answers and keeps the connection open, recording every byte it gets."""
    received = bytearray()
    upstream_done = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        received.extend(await reader.read())  # until the proxy closes its side
        writer.close()
        upstream_done.set()

    server = await asyncio.start_server(upstream, CAMERA, 0)
    port = server.sockets[0].getsockname()[1]
    async with EgressProxy(POLICY, idle_timeout=0.3) as p:
        first = f"GET http://{CAMERA}:{port}/a HTTP/1.1\r\nHost: {CAMERA}\r\nProxy-Authorization: {_auth(p)}\r\n\r\n"
        second = f"GET {victim.base}/secret HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: {_auth(p)}\r\n\r\n"
        status, _, body = await raw(p, (first + second).encode())  # pipelined: the second must go nowhere
        assert status == 200 and body == b"ok"
        await asyncio.wait_for(upstream_done.wait(), 5)  # the proxy gave up on the silent upstream
        assert p.requests == 1
    server.close()
    await server.wait_closed()
    assert received.startswith(b"GET /a HTTP/1.1\r\n") and received.endswith(b"Connection: close\r\n\r\n")
    assert received.count(b"GET") == 1 and b"secret" not in received and b"Proxy-Authorization" not in received
    assert victim.seen == []


async def test_refused_connect_and_malformed_requests(proxy, reasons, victim):
    status, _, body = await raw(proxy, f"CONNECT 127.0.0.1:{victim.port} HTTP/1.1\r\nProxy-Authorization: {_auth(proxy)}\r\n\r\n".encode())
    assert status == 403 and b"127.0.0.1 is a loopback address" in body
    status, _, body = await raw(proxy, f"CONNECT [::1]:{victim.port} HTTP/1.1\r\nProxy-Authorization: {_auth(proxy)}\r\n\r\n".encode())
    assert status == 403 and b"::1 is a loopback address" in body
    assert proxy.refused == 2 and len(reasons) == 2 and victim.seen == []
    assert (await raw(proxy, b"NONSENSE\r\n\r\n"))[0] == 400
    assert (await raw(proxy, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"))[0] == 400
    assert (await raw(proxy, b"GET http://127.0.0.2/ HTTP/1.1\r\n folded\r\n\r\n"))[0] == 400


async def test_head_timeout_and_connection_limit(camera):
    async with EgressProxy(POLICY, head_timeout=0.3, max_connections=1) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", _proxy_port(p))
        writer.write(b"GET http://127.0.0.2/ HTTP/1.1\r\n")  # the head never ends
        await writer.drain()
        # A second connection while the first is held: over the limit.
        assert (await raw(p, b"GET / HTTP/1.1\r\n\r\n"))[0] == 503
        status, _, body = _parse_response(await asyncio.wait_for(reader.read(), 5))
        assert status == 400 and b"not complete" in body
        writer.close()
    assert camera.seen == []


async def test_close_ends_open_tunnels(camera):
    p = EgressProxy(POLICY)
    await p.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", _proxy_port(p))
    writer.write(f"CONNECT {CAMERA}:{camera.port} HTTP/1.1\r\nProxy-Authorization: {_auth(p)}\r\n\r\n".encode())
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    await p.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the tunnel was closed
    await p.close()  # idempotent
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", _proxy_port(p))


# -- NetworkPolicy: no network needed, except loopback names --


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "169.254.169.254", "169.254.1.1", "100.100.100.200",
    "224.0.0.1", "255.255.255.255", "240.0.0.1", "::", "::1", "[::1]", "fe80::1", "fe80::1%eth0", "ff02::1",
    "fd00:ec2::254", "::ffff:127.0.0.1", "[::ffff:169.254.169.254]", "::127.0.0.1", "64:ff9b::7f00:1",
    "2002:7f00:1::1", "2002:a9fe:a9fe::1",
])
def test_denied_addresses(ip):
    with pytest.raises(DestinationRefused) as info:
        NetworkPolicy().check_ip(ip)
    assert "\n" not in str(info.value) and "not allowed" in str(info.value)


@pytest.mark.parametrize("ip", ["10.1.2.3", "172.16.0.9", "192.168.1.10", "100.64.0.1", "fd12:3456::1", "8.8.8.8", "2001:4860:4860::8888"])
def test_allowed_addresses(ip):
    NetworkPolicy().check_ip(ip)


def test_messages_say_why():
    policy = NetworkPolicy()
    with pytest.raises(DestinationRefused, match=r"^127\.0\.0\.1 is a loopback address \(not allowed for sources added over HTTP\)$"):
        policy.check_ip("127.0.0.1")
    with pytest.raises(DestinationRefused, match=r"169\.254\.169\.254 is a cloud metadata"):
        policy.check_ip("169.254.169.254")
    with pytest.raises(DestinationRefused, match=r"::ffff:127\.0\.0\.1 embeds 127\.0\.0\.1, a loopback address"):
        policy.check_ip("::ffff:127.0.0.1")
    with pytest.raises(DestinationRefused, match="not an IP address"):
        policy.check_ip("example.com")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::1]", "::ffff:127.0.0.1", "0"])
async def test_resolve_refuses_loopback_spellings(host):
    policy = NetworkPolicy()
    with pytest.raises(DestinationRefused, match="loopback|this host"):
        policy.resolve(host, 80)
    with pytest.raises(DestinationRefused, match="loopback|this host"):
        await policy.aresolve(host, 80)


async def test_resolve_allows_and_names_failures():
    policy = NetworkPolicy(allow=("127.0.0.2/32",))
    assert policy.resolve("127.0.0.2", 80) == ["127.0.0.2"]
    assert await policy.aresolve("::ffff:127.0.0.2", 80) == ["::ffff:127.0.0.2"]  # judged as the IPv4 it maps
    assert policy.resolve("10.1.2.3", 80) == ["10.1.2.3"]
    with pytest.raises(DestinationRefused, match=r"^cannot resolve 'nohost\.invalid'"):
        policy.resolve("nohost.invalid", 80)
    with pytest.raises(DestinationRefused, match="not a valid host name"):
        policy.resolve("127.0.0.1 junk", 80)  # glibc's inet_aton would read this as 127.0.0.1
    with pytest.raises(DestinationRefused, match="no host"):
        await policy.aresolve("", 80)


def test_allow_wins_over_deny_and_bad_cidrs_are_named():
    policy = NetworkPolicy(allow=("127.0.0.2/32",), deny=(*DEFAULT_DENY, "10.0.0.0/8"))
    policy.check_ip("127.0.0.2")
    with pytest.raises(DestinationRefused, match="127.0.0.3 is a loopback"):
        policy.check_ip("127.0.0.3")
    with pytest.raises(DestinationRefused, match=r"in the denied range 10\.0\.0\.0/8"):
        policy.check_ip("10.1.2.3")
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        NetworkPolicy(deny=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="'camera'"):
        NetworkPolicy(allow=("camera",))


def test_one_bad_answer_refuses_the_name(monkeypatch):
    # The one faked resolver in this file: no real DNS name here resolves to a public and a
    # loopback address at once, which is what a rebinding attacker's name would return.
    def fake(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(DestinationRefused, match=r"'camera\.example' resolves to 127\.0\.0\.1, which is a loopback address"):
        NetworkPolicy().resolve("camera.example", 80)
