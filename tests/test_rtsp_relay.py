"""The RTSP relay for rtsp:// sources added over HTTP: real FFmpeg (PyAV), real daemon, real RTSP server.

The normal path uses the real GStreamer RTSP server (tests/support/rtsp.py), with digest
credentials. The redirecting peer is a tiny asyncio RTSP "camera" stub: no Debian RTSP
server answers with a redirect. Linux routes all of 127.0.0.0/8 to loopback: the stub
listens on 127.0.0.2, which the policy allows as an explicit exception; the "victim"
listens on 127.0.0.1 (loopback, refused) and records every connection, so a redirect
that slipped through shows up there.
"""

from __future__ import annotations

import asyncio
import re
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
from streamer.security.rtsp_relay import RelayRefused, RtspRelay, ServerStream, ffmpeg_options, relay_url
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
    """A stub RTSP server on 127.0.0.2 that answers `redirect_on` with `answer(cseq)`, other methods with 200."""

    def __init__(self, redirect_on: str, answer: Callable[[int], bytes]) -> None:
        self.redirect_on, self.answer = redirect_on, answer
        self.seen: list[str] = []  # request lines, as they arrived
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"rtsp://{CAMERA}:{self.port}/cam"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._on, CAMERA, 0)
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
        except (asyncio.IncompleteReadError, ConnectionError):
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


async def test_http_added_rtsp_redirect_is_refused_reported_and_counted(tiny_model):
    policy = _policy(f"{CAMERA}/32")
    async with Victim() as victim, RedirectingCamera("DESCRIBE", redirect_to(0)) as camera:
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
            assert any(line.startswith("DESCRIBE") for line in camera.seen), camera.seen
            assert victim.connections == 0
            async with http.get(f"{d.http}/metrics") as resp:
                text = await resp.text()
            assert 'streamer_requests_refused_total{reason="rtsp_redirect"} 1.0' in text
            assert policy.relay is not None and policy.relay.sessions == 0
