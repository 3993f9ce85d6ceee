"""The RTSP relay for rtsp(s):// sources added over HTTP: real FFmpeg (PyAV), real daemon, real RTSP server.

The normal path uses the real GStreamer RTSP server (tests/support/rtsp.py), with digest
credentials, over TLS too (rtsps://, a self-signed certificate made here). The redirecting
peer is a tiny asyncio RTSP "camera" stub, with or without TLS: no Debian RTSP server
answers with a redirect. Linux routes all of 127.0.0.0/8 to loopback: the stub
listens on 127.0.0.2, which the policy allows as an explicit exception; the "victim"
listens on 127.0.0.1 (loopback, refused) and records every connection, so a redirect
that slipped through shows up there.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Self

import aiohttp
import av
import pytest
import websockets

from streamer.http.common import ServerConfig
from streamer.security.network import NetworkPolicy
from streamer.security.policy import SourcePolicy, SourceRefused
from streamer.security.rtsp_relay import RelayRefused, RtspRelay, ServerStream, TlsRefused, ffmpeg_options, relay_url
from tests.support.daemon import add_stream, count_for, read_messages, running_daemon
from tests.support.rtsp import RtspServer, require_rtsp_server

pytestmark = pytest.mark.timeout(60)

CAMERA = "127.0.0.2"
POLICY = NetworkPolicy(allow=(f"{CAMERA}/32",))


# -- peers: a redirecting camera stub and a victim on loopback --


class Victim:
    """127.0.0.1: accepts and records connections. Must see none."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class RedirectingCamera:
    """A stub RTSP server on 127.0.0.2 that answers `redirect_on` with `answer(cseq)`, other methods with 200.

    `tls`: a server context, and the camera speaks rtsps:// (`seen` then holds what came out of TLS)."""

    def __init__(self, redirect_on: str, answer: Callable[[int], bytes], tls: ssl.SSLContext | None = None) -> None:
        self.redirect_on, self.answer, self.tls = redirect_on, answer, tls
        self.seen: list[str] = []  # request lines, as they arrived
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'rtsps' if self.tls else 'rtsp'}://{CAMERA}:{self.port}/cam"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._on, CAMERA, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                self.seen.append(line)
                match = re.search(rb"(?i)cseq: *(\d+)", head)
                cseq = int(match.group(1)) if match else 0
                if line.startswith(self.redirect_on + " "):
                    writer.write(self.answer(cseq))
                else:
                    writer.write(f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


def redirect_to(port: int, status: str = "302 Found", newline: str = "\r\n") -> Callable[[int], bytes]:
    def answer(cseq: int) -> bytes:
        lines = [f"RTSP/1.0 {status}", f"CSeq: {cseq}", f"Location: rtsp://127.0.0.1:{port}/", "", ""]
        return newline.join(lines).encode()

    return answer


class Certificate:
    """A self-signed certificate for 127.0.0.1 and 127.0.0.2 (what a camera out of the box has)."""

    def __init__(self, directory) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test camera")])
        now = datetime.datetime.now(datetime.UTC)
        sans = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", CAMERA)]
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.cert = directory / "camera.crt"  # what an operator names in tls_ca_file
        self.cert.write_bytes(cert_pem)
        self.chain = directory / "camera.pem"  # certificate and key, for the servers
        self.chain.write_bytes(cert_pem + key_pem)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.chain)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Certificate:
    return Certificate(tmp_path_factory.mktemp("tls"))


def _open(url: str, options: dict[str, str]) -> None:
    """Open with FFmpeg as the daemon does (rtsp over TCP), read one packet; raises what FFmpeg raises."""
    with av.open(url, options={"timeout": "3000000", **options}, timeout=5) as container:
        next(container.demux(video=0))


@pytest.fixture
async def relay() -> AsyncIterator[tuple[RtspRelay, list[tuple[str, str]]]]:
    refusals: list[tuple[str, str]] = []
    r = RtspRelay(POLICY, accept_timeout=5, on_refused=lambda kind, reason: refusals.append((kind, reason)))
    async with r:
        yield r, refusals


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll an observable condition that has no event of its own, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# -- FFmpeg + relay, no daemon --


@pytest.mark.parametrize(
    ("method", "status", "newline"),
    [("DESCRIBE", "302 Found", "\r\n"), ("OPTIONS", "301 Moved Permanently", "\r\n"), ("DESCRIBE", "307 Temporary Redirect", "\n")],
)
async def test_ffmpeg_follows_a_redirect_the_relay_refuses_it(relay, method, status, newline):
    r, refusals = relay
    async with Victim() as victim, RedirectingCamera(method, redirect_to(victim.port, status, newline)) as camera:
        # Control: without the relay, FFmpeg goes where the camera sends it (the hole being closed).
        with pytest.raises(av.error.FFmpegError):
            await asyncio.to_thread(_open, camera.url, {"rtsp_transport": "tcp"})
        assert victim.connections >= 1, "FFmpeg no longer follows RTSP redirects: this test needs a new control"
        victim.connections = 0
        camera.seen.clear()

        session = await asyncio.to_thread(r.connect, camera.url, CAMERA, camera.port)
        assert session.url == f"rtsp://127.0.0.1:{session.port}/cam"
        with pytest.raises(av.error.FFmpegError):
            await asyncio.to_thread(_open, session.url, ffmpeg_options())
        session.close()
        assert any(line.startswith(method) for line in camera.seen), camera.seen  # FFmpeg got that far
        assert victim.connections == 0
        assert session.refused and "RTSP redirect refused" in session.refused
        assert f"127.0.0.1:{victim.port}" in session.refused  # the operator sees where it pointed
        assert r.refused == 1 and [k for k, _ in refusals] == ["redirect"]
        await _until(lambda: r.sessions == 0, 5, "the refused connection stays open")


async def test_relay_port_takes_one_client_from_127_0_0_1_only(relay):
    r, _ = relay
    async with Victim() as victim, RedirectingCamera("NONE", redirect_to(victim.port)) as camera:
        session = await r.open(camera.url, CAMERA, camera.port)
        # Another address on the host (127.0.0.3) is turned away, and the port stays for FFmpeg.
        reader, writer = await asyncio.open_connection("127.0.0.1", session.port, local_addr=("127.0.0.3", 0))
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
        assert session.stray_clients == 1 and r.sessions == 1
        # The first client from 127.0.0.1 is relayed to the camera...
        reader, writer = await asyncio.open_connection("127.0.0.1", session.port)
        writer.write(f"OPTIONS rtsp://127.0.0.1:{session.port}/cam RTSP/1.0\r\nCSeq: 1\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"RTSP/1.0 200 OK") and camera.seen == [f"OPTIONS rtsp://127.0.0.1:{session.port}/cam RTSP/1.0"]
        # ...and the port is gone: nobody else on the host can use it as a proxy.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", session.port)
        session.close()
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closing the session cuts the client
        writer.close()
        await _until(lambda: r.sessions == 0, 5, "a closed session is still counted")


async def test_relay_refuses_a_destination_the_policy_refuses(relay):
    r, _ = relay
    async with Victim() as victim:
        with pytest.raises(ValueError, match="loopback"):
            await asyncio.to_thread(r.connect, f"rtsp://127.0.0.1:{victim.port}/x", "127.0.0.1", victim.port)
        assert victim.connections == 0 and r.connections == 0


def test_policy_sends_rtsp_through_the_relay_only():
    policy = SourcePolicy(network=POLICY)
    with pytest.raises(SourceRefused, match="relay is not running"):
        policy.check(f"rtsp://{CAMERA}:554/x")
    policy.attach_relay(RtspRelay(POLICY))
    checked = policy.check(f"rtsp://u:p%40ss@{CAMERA}:554/x?channel=1")
    assert checked.relay is not None and checked.check_destination is None
    assert checked.ffmpeg_options["rtsp_transport"] == "tcp" and "udp" not in checked.ffmpeg_options["protocol_whitelist"]
    for word in ("udp", "http", "multicast"):
        with pytest.raises(SourceRefused, match="transport option"):
            policy.check(f"rtsp://{CAMERA}/x?{word}")
    with pytest.raises(SourceRefused, match="loopback"):
        policy.check("rtsp://127.0.0.1/x")
    assert relay_url("rtsp://u:p%40ss@cam.example:8554/a/b?c=1&d", 4242) == "rtsp://u:p%40ss@127.0.0.1:4242/a/b?c=1&d"
    # rtsps:// as well: the relay speaks TLS, FFmpeg plain RTSP to it, with the same whitelist.
    checked = policy.check(f"rtsps://{CAMERA}/x")
    assert checked.relay is not None and checked.ffmpeg_options["protocol_whitelist"] == "rtsp,tcp"
    with pytest.raises(SourceRefused, match="transport option"):
        policy.check(f"rtsps://{CAMERA}/x?udp")
    assert relay_url("rtsps://u:p@cam.example/a?b", 4242) == "rtsp://u:p@127.0.0.1:4242/a?b"
    with pytest.raises(ValueError, match="tls_verify"):
        SourcePolicy(network=POLICY, tls_ca_file="/etc/ssl/certs/ca-certificates.crt")


def test_config_tls_settings_are_checked_at_startup(tmp_path, certificate):
    from streamer.cli.serve import load_config
    from streamer.errors import StreamerError

    config = tmp_path / "streamer.toml"
    config.write_text(f'[sources]\ntls_verify = true\ntls_ca_file = "{certificate.cert}"\n')
    policy = load_config(str(config)).server.sources
    assert policy.tls_verify and policy.tls_ca_file == str(certificate.cert)
    config.write_text(f'[sources]\ntls_ca_file = "{certificate.cert}"\n')
    with pytest.raises(StreamerError, match="tls_ca_file is only used with tls_verify = true"):
        load_config(str(config))
    config.write_text(f'[sources]\ntls_verify = true\ntls_ca_file = "{tmp_path / "missing.pem"}"\n')
    with pytest.raises(StreamerError, match="cannot be loaded: No such file"):
        load_config(str(config))


async def test_rtsps_relay_speaks_tls_to_a_real_camera_and_verifies_it_when_asked(certificate):
    require_rtsp_server()
    refusals: list[tuple[str, str]] = []
    loopback = NetworkPolicy(allow=("127.0.0.1/32",))  # the GStreamer server: an explicit exception
    async with RtspRelay(loopback, on_refused=lambda kind, reason: refusals.append((kind, reason))) as r:
        with RtspServer(fps=15, user="cam", password="s3cr#t w", digest=True, tls_cert=certificate.chain) as rtsp:
            assert rtsp.url.startswith("rtsps://")
            # Control: the camera speaks only TLS, so plain RTSP from FFmpeg gets nowhere.
            with pytest.raises(av.error.FFmpegError):
                await asyncio.to_thread(_open, rtsp.url.replace("rtsps://", "rtsp://", 1), {"rtsp_transport": "tcp"})

            def policy(**tls) -> SourcePolicy:
                p = SourcePolicy(network=loopback, **tls)
                p.attach_relay(r)
                return p

            # Default (FFmpeg's own default, tls_verify 0): the self-signed camera plays; FFmpeg speaks
            # plain RTSP to the relay, digest authentication included.
            checked = policy().check(rtsp.url)
            assert checked.relay is not None
            session = await asyncio.to_thread(checked.relay)
            assert session.url == f"rtsp://cam:s3cr%23t%20w@127.0.0.1:{session.port}/stream"
            await asyncio.to_thread(_open, session.url, checked.ffmpeg_options)
            session.close()
            assert r.refused == 0

            # tls_verify = true: a self-signed certificate is refused, with the reason, and counted.
            checked = policy(tls_verify=True).check(rtsp.url)
            with pytest.raises(TlsRefused, match="TLS to camera failed: 127.0.0.1:\\d+: certificate verify failed: self.signed"):
                await asyncio.to_thread(checked.relay)
            assert r.refused == 1 and [k for k, _ in refusals] == ["tls"] and r.sessions == 0

            # ...unless tls_ca_file names it (its IP address SAN matches the URL's host, too).
            checked = policy(tls_verify=True, tls_ca_file=str(certificate.cert)).check(rtsp.url)
            session = await asyncio.to_thread(checked.relay)
            await asyncio.to_thread(_open, session.url, checked.ffmpeg_options)
            session.close()
            assert r.refused == 1
            await _until(lambda: r.sessions == 0, 5, "a closed session is still counted")


# -- the server-to-client parser, as FFmpeg reads the stream --


def _feed(*chunks: bytes) -> ServerStream:
    stream = ServerStream()
    for chunk in chunks:
        stream.feed(chunk)
    return stream


def frame(payload: bytes, channel: int = 0) -> bytes:
    return b"$" + bytes([channel]) + len(payload).to_bytes(2, "big") + payload


def test_parser_passes_replies_bodies_and_frames_split_anywhere():
    sdp = b"v=0\r\nm=video 0 RTP/AVP 96\r\na=control:rtsp://10.0.0.5/cam/trackID=1\r\n"
    data = (b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: " + str(len(sdp)).encode() + b"\r\n\r\n" + sdp
            + frame(b"\x80" * 1400) + b"RTSP/1.0 200 OK\r\nCSeq: 3\r\n\r\n" + frame(b"RTSP/1.0 302 Found\r\n\r\n\x00"))
    for size in (1, 7, len(data)):  # byte by byte, odd splits, all at once
        assert _feed(*(data[i : i + size] for i in range(0, len(data), size))).messages == 2


@pytest.mark.parametrize(
    "data",
    [
        b"RTSP/1.0 302 Found\r\nLocation: rtsp://127.0.0.1/\r\n\r\n",
        b"RTSP/1.0 302\n\n",  # no Location, bare LF: FFmpeg still treats it as a redirect
        b"  RTSP/1.0\t303 See Other\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nlOcAtIoN: rtsp://127.0.0.1/\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nLoca\rtion: rtsp://127.0.0.1/\r\n\r\n",  # FFmpeg drops every '\r'
        b"REDIRECT rtsp://cam/ RTSP/1.0\r\nCSeq: 1\r\n\r\n",
        # A body FFmpeg reads as 0 bytes (int overflow), so what follows is a head to it as well:
        b"RTSP/1.0 200 OK\r\nContent-Length: 4294967296\r\n\r\nRTSP/1.0 302 Found\r\n\r\n",
        # The last Content-Length wins, as in FFmpeg.
        b"RTSP/1.0 200 OK\r\nContent-Length: 30\r\nContent-Length: 0\r\n\r\nRTSP/1.0 302 Found\r\n\r\n",
        # A line starting with NUL ends the head for FFmpeg (C strings): the 302 after it is a new head.
        b"RTSP/1.0 200 OK\r\n\x00Content-Length: 22\r\nRTSP/1.0 302 Found\r\n\r\n",
        frame(b"\x80\x60") + b"RTSP/1.0 302 Found\r\n\r\n",  # FFmpeg's packet reader does not skip short frames
        b"RTSP/1.0 200 OK\r\n" + frame(b"\x80" * 12) + b"\r\n",  # a frame inside a head
        b"RTSP/1.0 2000 OK\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    ],
)
def test_parser_refuses_what_could_redirect_ffmpeg(data):
    for size in (1, len(data)):
        with pytest.raises(RelayRefused):
            _feed(*(data[i : i + size] for i in range(0, len(data), size)))


def test_parser_matches_ffmpeg_line_truncation():
    # FFmpeg keeps 4095 bytes of a line: this Content-Length value is cut off (0), so the 302 is a head.
    data = b"RTSP/1.0 200 OK\r\nContent-Length:" + b" " * 4090 + b"25\r\n\r\nRTSP/1.0 302 Found\r\n\r\n"
    with pytest.raises(RelayRefused, match="redirect"):
        _feed(data)


# -- the daemon: real HTTP API, real FFmpeg, real GStreamer server --


def _policy(allow: str) -> SourcePolicy:
    return SourcePolicy(network=NetworkPolicy(allow=(allow,)))


async def test_http_added_rtsp_captions_through_the_relay_and_removal_closes_it(tiny_model):
    require_rtsp_server()
    policy = _policy("127.0.0.1/32")  # the test camera is on loopback: an explicit exception
    with RtspServer(fps=15, user="cam", password="s3cr#t w", digest=True) as rtsp:
        async with running_daemon(tiny_model, server_config=ServerConfig(port=0, sources=policy)) as d, \
                aiohttp.ClientSession() as http:
            relay = policy.relay
            assert relay is not None
            async with websockets.connect(d.ws + "?all=1") as ws:
                await add_stream(http, d, id="cam", url=rtsp.url)
                await read_messages(ws, count_for("cam", 3), 40)
            assert relay.connections >= 1 and relay.sessions == 1  # it went through the relay, not around it
            (port,) = relay.ports
            async with http.delete(f"{d.http}/streams/cam") as resp:
                assert resp.status in (200, 204)
            await _until(lambda: relay.sessions == 0, 10, "the relay connection outlived its stream")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("rtsp-relay:")]
        assert relay.refused == 0
        with pytest.raises(ConnectionError):  # closed with the daemon
            await asyncio.to_thread(relay.connect, rtsp.url, "127.0.0.1", rtsp.port)


async def test_http_added_rtsps_captions_through_the_relay_over_tls(tiny_model, certificate):
    require_rtsp_server()
    policy = _policy("127.0.0.1/32")
    with RtspServer(fps=15, user="cam", password="pw", digest=True, tls_cert=certificate.chain) as rtsp:
        async with running_daemon(tiny_model, server_config=ServerConfig(port=0, sources=policy)) as d, \
                aiohttp.ClientSession() as http:
            async with websockets.connect(d.ws + "?all=1") as ws:
                await add_stream(http, d, id="cam", url=rtsp.url)
                await read_messages(ws, count_for("cam", 3), 40)
            relay = policy.relay
            assert relay is not None and relay.connections >= 1 and relay.sessions == 1 and relay.refused == 0


@pytest.mark.parametrize("tls", [False, True], ids=["rtsp", "rtsps"])
async def test_http_added_rtsp_redirect_is_refused_reported_and_counted(tiny_model, certificate, tls):
    policy = _policy(f"{CAMERA}/32")
    server_tls = certificate.server_context() if tls else None
    async with Victim() as victim, RedirectingCamera("DESCRIBE", redirect_to(0), server_tls) as camera:
        camera.answer = redirect_to(victim.port)
        async with running_daemon(tiny_model, server_config=ServerConfig(port=0, sources=policy)) as d, \
                aiohttp.ClientSession() as http:
            await add_stream(http, d, id="cam", url=camera.url)
            state: dict = {}

            async def failed() -> bool:
                async with http.get(f"{d.http}/streams/cam") as resp:
                    state.update(await resp.json())
                return state.get("state") == "failed"

            deadline = time.monotonic() + 20
            while not await failed():
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.1)
            assert "RTSP redirect refused" in (state.get("detail") or ""), state
            # With TLS: FFmpeg's plain RTSP reached the camera inside the relay's TLS, and the reply was read.
            assert any(line.startswith("DESCRIBE") for line in camera.seen), camera.seen
            assert victim.connections == 0
            async with http.get(f"{d.http}/metrics") as resp:
                text = await resp.text()
            assert 'streamer_requests_refused_total{reason="rtsp_redirect"} 1.0' in text
            assert policy.relay is not None and policy.relay.sessions == 0


async def test_http_added_rtsps_with_tls_verify_fails_clearly_and_is_counted(tiny_model, certificate):
    policy = SourcePolicy(network=NetworkPolicy(allow=(f"{CAMERA}/32",)), tls_verify=True)
    async with RedirectingCamera("NONE", redirect_to(0), certificate.server_context()) as camera, \
            running_daemon(tiny_model, server_config=ServerConfig(port=0, sources=policy)) as d, \
            aiohttp.ClientSession() as http:
        await add_stream(http, d, id="cam", url=camera.url)
        state: dict = {}
        deadline = time.monotonic() + 20
        while state.get("state") != "failed":
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.1)
            async with http.get(f"{d.http}/streams/cam") as resp:
                state = await resp.json()
        detail = state.get("detail") or ""
        assert "TLS to camera failed" in detail and "certificate verify failed" in detail, state
        assert camera.seen == []  # not one request left the relay
        async with http.get(f"{d.http}/metrics") as resp:
            text = await resp.text()
        assert 'streamer_requests_refused_total{reason="rtsp_tls"} 1.0' in text
