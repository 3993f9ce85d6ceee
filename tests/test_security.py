"""Attacks on a real daemon (real HTTP and WebSocket clients, real files): each refused with a 4xx
and no side effect; every route needs the role docs/SECURITY.md says."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os
import threading

import aiohttp
import pytest
import websockets

from streamer.cli.serve import load_config
from streamer.errors import StreamerError
from streamer.http.app import build_app
from streamer.http.common import ServerConfig
from streamer.http.guard import access_of
from streamer.security.auth import TokenEntry
from streamer.security.network import NetworkPolicy
from streamer.security.policy import SourcePolicy
from tests.support.daemon import add_stream, captions_of, read_messages, running_daemon

TOKENS = {
    "admin": "admin-token-0123456789",
    "operator": "operator-token-0123456789",
    "viewer": "viewer-token-0123456789",
    "viewer_a": "viewer-a-token-0123456789",
    "publisher_w": "publisher-w-token-0123456789",
}


def _entries():
    return (
        TokenEntry.make("admin", token=TOKENS["admin"]),
        TokenEntry.make("operator", token=TOKENS["operator"]),
        TokenEntry.make("viewer", token=TOKENS["viewer"]),
        TokenEntry.make("viewer", token=TOKENS["viewer_a"], streams=["a"]),
        TokenEntry.make("publisher", token=TOKENS["publisher_w"], streams=["w"]),
    )


def _bearer(name):
    return {"Authorization": f"Bearer {TOKENS[name]}"} if name else {}


@pytest.fixture
def clip2(tmp_path_factory):
    from tests.support.media import moving_square, write_video

    return write_video(tmp_path_factory.mktemp("sec") / "clip.mp4", moving_square(60, 96, 64), fps=30)


def _secured(**changes) -> ServerConfig:
    base = ServerConfig(port=0, tokens=_entries(), sources=SourcePolicy(network=NetworkPolicy()))
    return dataclasses.replace(base, **changes)


# route -> the weakest role that may call it (None: public); the table of docs/SECURITY.md
ROUTE_ROLES = {
    ("GET", "/healthz"): None, ("GET", "/readyz"): None, ("GET", "/metrics"): "viewer",
    ("GET", "/"): None, ("GET", "/overlay/{stream}"): None, ("GET", "/web"): None,
    ("GET", "/ws"): "viewer", ("GET", "/streams"): "viewer", ("GET", "/streams/{id}"): "viewer",
    ("GET", "/streams/{id}/thumbnail.jpg"): "viewer", ("GET", "/streams/{id}/chapters"): "viewer",
    ("POST", "/whip/{id}"): "publisher", ("DELETE", "/whip/{id}"): "publisher",
    ("DELETE", "/whip/{id}/{session}"): "publisher",
    ("POST", "/streams"): "operator", ("DELETE", "/streams/{id}"): "operator",
    ("POST", "/v1/caption/video"): "operator", ("POST", "/v1/caption/videos"): "operator",
    ("POST", "/v1/caption/frames"): "operator", ("GET", "/auth"): "admin",
    ("POST", "/streams/{id}/ask"): "viewer", ("GET", "/streams/{id}/watches"): "viewer",
    ("POST", "/streams/{id}/watches"): "operator", ("DELETE", "/streams/{id}/watches/{watch_id}"): "operator",
}


def test_every_route_declares_the_role_the_security_doc_gives_it():
    from aiohttp.test_utils import make_mocked_request

    from streamer.http.common import Service

    app = build_app(Service(), ServerConfig())
    seen = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        key = (route.method, path.rstrip("/") or "/")
        assert key in ROUTE_ROLES, f"route {key} is not in the roles table: add it here and to docs/SECURITY.md"
        seen.add(key)
        request = make_mocked_request(route.method, "/", app=app)
        request._match_info = type("M", (), {"route": route})()  # what the router would attach
        assert access_of(request, ServerConfig()).role == ROUTE_ROLES[key], key
    assert seen == set(ROUTE_ROLES)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "SECURITY.md"), encoding="utf-8") as doc:
        text = doc.read()
    for method, path in ROUTE_ROLES:
        assert path.replace("{stream}", "{id}") in text.replace("{stream}", "{id}"), f"{method} {path} missing from SECURITY.md"


async def test_roles_table_over_a_real_daemon(tiny_model, clip2):
    policy = SourcePolicy(media_dirs=(str(clip2.parent),), network=NetworkPolicy())
    async with running_daemon(tiny_model, server_config=_secured(sources=policy)) as d, aiohttp.ClientSession() as http:
        async with http.post(f"{d.http}/streams", json={"id": "a", "url": str(clip2), "loop": True, "window": 1, "hop": 0.5},
                             headers=_bearer("operator")) as resp:
            assert resp.status == 201, await resp.text()
        # (method, path, kwargs, {caller: status}); callers: None = no token
        ops = [
            ("GET", "/healthz", {}, {None: 200}),
            ("GET", "/metrics", {}, {None: 401, "viewer": 200, "publisher_w": 403}),
            ("GET", "/streams", {}, {None: 401, "viewer": 200, "publisher_w": 403, "operator": 200}),
            ("GET", "/streams/a", {}, {None: 401, "viewer": 200, "viewer_a": 200}),
            ("GET", "/auth", {}, {None: 401, "operator": 403, "admin": 200}),
            ("POST", "/streams", {"json": {"id": "b", "url": str(clip2)}}, {None: 401, "viewer": 403, "publisher_w": 403}),
            ("DELETE", "/streams/a", {}, {None: 401, "viewer": 403, "viewer_a": 403, "publisher_w": 403}),
            ("POST", "/v1/caption/video", {"json": {"video": "QUJD"}}, {None: 401, "viewer": 403, "operator": 400}),
            ("POST", "/whip/other", {"data": "v=0", "headers": {"Content-Type": "application/sdp"}},
             {None: 401, "viewer": 403, "publisher_w": 403, "operator": 403}),
            ("POST", "/whip/w", {"data": "v=0 x", "headers": {"Content-Type": "application/sdp"}}, {"publisher_w": 400}),
            ("DELETE", "/whip/a", {}, {"publisher_w": 403, "admin": 404}),  # a pulled stream is no WHIP session
            ("DELETE", "/whip/a/any-session", {}, {"publisher_w": 403, "admin": 404}),
            ("GET", "/streams/a", {"params": {"token": TOKENS["operator"]}}, {None: 200}),  # query token: viewer rights
            ("DELETE", "/streams/a", {"params": {"token": TOKENS["admin"]}}, {None: 403}),  # ... and no more
            ("GET", "/streams", {"headers": {"Authorization": "Bearer wrong-token-0123456789"}}, {None: 401}),
        ]
        for method, path, kwargs, expected in ops:
            for caller, status in expected.items():
                headers = {**kwargs.get("headers", {}), **_bearer(caller)}
                args = {k: v for k, v in kwargs.items() if k != "headers"}
                async with http.request(method, d.http + path, headers=headers, **args) as resp:
                    body = await resp.text()
                    assert resp.status == status, (method, path, caller, resp.status, body)
                    if status >= 400:
                        assert '"error"' in body
        async with http.get(f"{d.http}/streams", headers=_bearer("viewer_a")) as resp:
            assert [s["id"] for s in (await resp.json())["streams"]] == ["a"]
        assert "a" in d.daemon.streams  # no refused DELETE removed it
        # WebSocket: no token -> refused; a query token works (browsers cannot set headers)
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(d.ws):
                pass
        assert refused.value.response.status_code == 401
        async with websockets.connect(f"{d.ws}?streams=a&token={TOKENS['viewer_a']}") as ws:
            messages = await read_messages(ws, lambda m: captions_of(m, "a"), timeout=60)
            assert captions_of(messages, "a")


async def test_file_read_and_write_attacks_have_no_side_effect(tiny_model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    created = tmp_path / "created.txt"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(64 * 48 * 3))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    media = tmp_path / "media"
    media.mkdir()
    (media / "escape.mp4").symlink_to(secret)
    policy = SourcePolicy(media_dirs=(str(media),), network=NetworkPolicy())
    async with running_daemon(tiny_model, server_config=_secured(sources=policy)) as d, aiohttp.ClientSession() as http:
        attacks = [
            f"lavfi:testsrc=size=64x48,metadata=mode=print:file={victim}",
            f"lavfi:testsrc=size=64x48,metadata=mode=print:file={created}",
            f"lavfi:movie={secret}:f=rawvideo",
            "/etc/passwd", str(secret), f"file://{secret}", str(fifo), "/dev/video0",
            str(media / ".." / "secret.bin"), str(media / "escape.mp4"),
            "tcp://127.0.0.1:9?listen=1", "ftp://127.0.0.1/x", "udp://127.0.0.1:5004",
            "srt://127.0.0.1:9000?mode=listener", "concat:/etc/passwd|/etc/hosts",
        ]
        for i, url in enumerate(attacks):
            async with http.post(f"{d.http}/streams", json={"id": f"x{i}", "url": url}, headers=_bearer("admin")) as resp:
                body = await resp.json()
                assert resp.status == 403, (url, resp.status, body)
                assert body["error"]["code"] == "source_not_allowed"
        assert d.daemon.streams == {}
        assert not [t.name for t in threading.enumerate() if t.name.startswith("ingest:")]  # no decode thread started
    assert victim.read_text() == "precious" and not created.exists()


async def test_ssrf_destinations_are_refused_before_any_connection(tiny_model):
    hits = []

    async def seen(request):
        hits.append(request.path)
        return aiohttp.web.Response(text="hello")

    from aiohttp import web

    victim = web.Application()
    victim.router.add_get("/{tail:.*}", seen)
    runner = web.AppRunner(victim)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_daemon(tiny_model, server_config=_secured()) as d, aiohttp.ClientSession() as http:
            for url in [f"http://127.0.0.1:{port}/x", f"http://localhost:{port}/x", f"http://0.0.0.0:{port}/x",
                        f"http://[::ffff:127.0.0.1]:{port}/x", f"rtsp://127.0.0.1:{port}/x", f"http://2130706433:{port}/x",
                        "http://169.254.169.254/latest/meta-data/", f"rtsp://[::1]:{port}/x"]:
                async with http.post(f"{d.http}/streams", json={"id": "s", "url": url}, headers=_bearer("operator")) as resp:
                    assert resp.status == 403, (url, await resp.text())
            assert d.daemon.streams == {}
    finally:
        await runner.cleanup()
    assert hits == []


async def test_cross_site_requests_and_hosts_are_refused(tiny_model, clip2):
    config = ServerConfig(port=0, sources=SourcePolicy(media_dirs=(str(clip2.parent),), network=NetworkPolicy()),
                          allowed_origins=("http://good.example",))
    async with running_daemon(tiny_model, server_config=config) as d, aiohttp.ClientSession() as http:
        body = {"id": "a", "url": str(clip2)}
        # open mode (no tokens, loopback): a page on another origin still cannot add a stream
        for headers, data in [({"Origin": "http://evil.example", "Content-Type": "text/plain"}, str(body)),
                              ({"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}, "id=a"),
                              ({"Content-Type": "text/plain"}, '{"id": "a", "url": "x"}')]:
            async with http.post(f"{d.http}/streams", data=data, headers=headers) as resp:
                assert resp.status in (403, 415), await resp.text()
        # DNS rebinding: a foreign Host name
        async with http.get(f"{d.http}/streams", headers={"Host": "attacker.example"}) as resp:
            assert resp.status == 403
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(d.ws, origin="http://evil.example"):
                pass
        async with websockets.connect(d.ws, origin="http://good.example") as ws:
            assert "hello" in await ws.recv()
        # CORS preflight: only for allowed origins; Location exposed for WHIP
        preflight = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST"}
        async with http.options(f"{d.http}/whip/cam", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "http://good.example"
        async with http.options(f"{d.http}/whip/cam", headers={**preflight, "Origin": "http://evil.example"}) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        async with http.post(f"{d.http}/whip/cam", data="v=0 x", headers={"Origin": "http://good.example",
                                                                       "Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400 and resp.headers["Access-Control-Allow-Origin"] == "http://good.example"
        assert d.daemon.streams == {}


def _png(width, height) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_limits_give_json_errors_while_a_live_stream_keeps_captioning(tiny_model, clip2):
    from streamer.pipeline.daemon import DaemonConfig

    config = _secured(sources=SourcePolicy(media_dirs=(str(clip2.parent),), network=NetworkPolicy()),
                      max_ws_clients=3, max_ws_clients_per_address=2, max_image_pixels=640 * 480, header_timeout=1.0)
    async with running_daemon(tiny_model, server_config=config, daemon_config=DaemonConfig(max_streams=2)) as d, \
            aiohttp.ClientSession(headers=_bearer("admin")) as http:
        await add_stream(http, d, id="live", url=str(clip2), loop=True)
        await add_stream(http, d, id="second", url=str(clip2), loop=True)
        async with http.post(f"{d.http}/streams", json={"id": "third", "url": str(clip2)}) as resp:
            assert resp.status == 429 and (await resp.json())["error"]["code"] == "max_streams"
        for frames, status in [([_png(1, 20000)], 413), ([_png(10000, 10000)], 413)]:
            async with http.post(f"{d.http}/v1/caption/frames", json={"frames": frames}) as resp:
                assert resp.status == status, await resp.text()
                assert (await resp.json())["error"]["code"] == "too_many_pixels"
        token = TOKENS["viewer"]
        async with websockets.connect(f"{d.ws}?streams=live&token={token}") as first, \
                websockets.connect(f"{d.ws}?streams=live&token={token}"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{d.ws}?token={token}"):
                    pass
            assert refused.value.response.status_code == 429
            # half-open requests: a head that never completes is cut at header_timeout
            reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
            writer.write(b"GET /streams HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the daemon
            writer.close()
            before = d.daemon.streams["live"].captions
            await read_messages(first, lambda m: any(c["index"] >= before + 2 for c in captions_of(m, "live")), timeout=60)
        async with http.get(f"{d.http}/metrics") as resp:
            text = await resp.text()
        for reason in ("max_streams", "too_many_pixels", "max_ws_clients_per_address", "header_timeout"):
            assert f'streamer_requests_refused_total{{reason="{reason}"}}' in text, reason


def test_startup_refused_on_a_public_address_without_tokens(monkeypatch):
    import argparse

    monkeypatch.delenv("STREAMER_TOKENS", raising=False)
    args = argparse.Namespace(host="0.0.0.0", port=None, stream=None, token=None, insecure_no_auth=False,
                              model=None, device=None, dtype=None, max_new_tokens=None, threads=None,
                              tls_cert=None, tls_key=None)
    with pytest.raises(StreamerError, match="--token"):
        load_config(None, args)
    args.token = [f"admin={TOKENS['admin']}"]
    config = load_config(None, args)
    assert config.server.tokens and TOKENS["admin"] not in repr(config.server.tokens)
    args.token, args.insecure_no_auth = None, True
    assert load_config(None, args).server.insecure_no_auth
    monkeypatch.setenv("STREAMER_TOKENS", f"viewer:a,b={TOKENS['viewer']};operator={TOKENS['operator']}")
    args.insecure_no_auth = False
    roles = sorted(e.role for e in load_config(None, args).server.tokens)
    assert roles == ["operator", "viewer"]
    args.token = ["viewer=short"]
    with pytest.raises(StreamerError, match="shorter than") as short:
        load_config(None, args)
    assert "short" not in str(short.value).replace("shorter", "")


async def test_stream_id_with_a_newline_is_refused_before_anything_is_registered(tiny_model, tmp_path, clip2):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with http.post(f"{d.http}/streams", json={"id": "abc\n", "url": str(clip2)}) as resp:
            assert resp.status == 400
        assert d.daemon.streams == {}


def test_the_default_source_policy_fails_closed():
    # build_app without serve(): still no loopback, and no http(s) without the egress proxy
    from streamer.security.policy import SourceRefused

    for url in ("rtsp://127.0.0.1/x", "rtsp://[::1]/x", "http://example.org/x.m3u8", "lavfi:testsrc"):
        with pytest.raises(SourceRefused):
            SourcePolicy().check(url)


def _fds_on(path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass  # closed while listing
    return count


async def test_a_fifo_named_by_the_operator_cannot_pin_a_decode_thread(tiny_model, tmp_path, monkeypatch):
    """A FIFO is a trusted source only from the config (HTTP refuses it): it gets an open timeout with a clear
    reason, removing it while it waits for a writer leaves no thread behind, and with a writer it captions."""
    import time

    from streamer.config import StreamConfig
    from streamer.media import decode
    from tests.support.media import moving_square, write_video

    clip = write_video(tmp_path / "clip.ts", moving_square(60, 96, 64), fps=30)
    fifo = tmp_path / "cam.fifo"
    os.mkfifo(fifo)

    def state_of(stream_id, state):
        return lambda ms: [m for m in ms if m["type"] == "state" and m["stream_id"] == stream_id and m["state"] == state]

    def ingest_threads():
        return [t.name for t in threading.enumerate() if t.name.startswith("ingest:")]

    async with running_daemon(tiny_model) as d, websockets.connect(d.ws) as ws:
        # as serve() adds [[streams]] from streamer.toml: no source policy
        config = {"url": str(fifo), "window": 1, "hop": 0.5}
        writer = await asyncio.create_subprocess_exec("sh", "-c", 'cat "$0" > "$1"', str(clip), str(fifo))
        try:
            await d.daemon.add_stream(StreamConfig.from_dict({"id": "fed", **config}))
            await read_messages(ws, lambda ms: captions_of(ms, "fed"), timeout=30)  # a FIFO with a writer works
            await d.daemon.remove_stream("fed")
        finally:
            if writer.returncode is None:
                writer.kill()
            await writer.wait()
        baseline = threading.active_count()  # the engine's thread exists by now

        await d.daemon.add_stream(StreamConfig.from_dict({"id": "waiting", **config}))
        deadline = time.monotonic() + 10
        while not _fds_on(fifo):  # the decode thread is now waiting for a writer
            assert time.monotonic() < deadline, "the decode thread never started waiting on the FIFO"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        await d.daemon.remove_stream("waiting")
        assert time.monotonic() - started < 1.5  # stop() did not give up on the thread
        assert ingest_threads() == [] and _fds_on(fifo) == 0

        monkeypatch.setattr(decode, "PIPE_OPEN_TIMEOUT", 1.0)
        await d.daemon.add_stream(StreamConfig.from_dict({"id": "silent", **config}))
        failed = state_of("silent", "failed")
        detail = failed(await read_messages(ws, failed, timeout=10))[0]["detail"]
        assert "no data within 1 s" in detail and "writing to it" in detail
        await d.daemon.remove_stream("silent")
        assert ingest_threads() == [] and _fds_on(fifo) == 0
        assert threading.active_count() == baseline, [t.name for t in threading.enumerate()]
