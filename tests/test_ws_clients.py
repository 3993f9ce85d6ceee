"""WebSocket clients against a real in-process daemon (tests/support/daemon.py): clients that stop
reading (1008 slow consumer), hung peers (1011 ping timeout), and the protocol as docs/protocol.md
says it (a bare /ws follows every stream, `too_large` error frames, one `stopped` per DELETE).

Every client is real: `websockets`' asyncio client, or its sans-I/O protocol driven over a plain
socket where a test needs a client that stops reading at the TCP level."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from streamer.http.common import ServerConfig
from streamer.publish.protocol import MAX_FRAME_BYTES, MAX_MESSAGE_BYTES
from tests.support.daemon import add_stream, captions_of, count_for, read_messages, running_daemon
from tests.support.media import moving_square, write_video

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 2.0  # ping 2 s after the last pong, pong due 1 s later: a stopped reader is closed within 3 s


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s, 15 fps, played in a loop: a live stream with a caption every hop."""
    return write_video(tmp_path_factory.mktemp("ws") / "clip.mp4", moving_square(30, 160, 120, seed=7), fps=15)


class StalledClient:
    """A real WebSocket client (websockets' sans-I/O protocol over a plain socket) that stops reading
    once connected: a receive buffer of ~2 KB that fills, no pong ever sent. What a hung browser
    tab or a stopped process looks like from the server. `resume()` reads again."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock, self.protocol = sock, protocol
        self.texts: list[str] = []

    @classmethod
    async def connect(cls, port: int, path: str) -> StalledClient:
        loop = asyncio.get_running_loop()  # the daemon runs on this loop: never block it
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel makes it its minimum, ~2 KB
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"))
        protocol.send_request(protocol.connect())
        for data in protocol.data_to_send():
            await loop.sock_sendall(sock, data)
        client = cls(sock, protocol)
        while protocol.state is State.CONNECTING:  # read the 101 (and whatever follows it), then stop
            client._feed(await asyncio.wait_for(loop.sock_recv(sock, 1024), 10))
        assert protocol.state is State.OPEN, protocol.handshake_exc
        return client

    def _feed(self, data: bytes) -> None:
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if getattr(event, "opcode", None) is Opcode.TEXT:
                self.texts.append(event.data.decode())

    async def resume(self, timeout: float = 10) -> tuple[int | None, str | None]:
        """Read until the server's close frame (or EOF); return its (code, reason)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.protocol.close_rcvd is None and self.protocol.state is not State.CLOSED:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), deadline - time.monotonic())
            except ConnectionResetError:
                break
            self._feed(data)
            if not data:
                break
        self.sock.close()
        close = self.protocol.close_rcvd
        return (close.code, close.reason) if close is not None else (None, None)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def http_log():
    recorder = Recorder()
    logger = logging.getLogger("streamer.http")
    logger.addHandler(recorder)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield recorder.records
    logger.removeHandler(recorder)
    logger.setLevel(old_level)


def dropped(d, reason: str) -> float:
    return d.daemon.metrics.registry.get_sample_value("streamer_ws_clients_dropped_total", {"reason": reason})


async def until(condition, timeout: float, what: str) -> float:
    """Poll an observable condition (the server offers no event for it) with a deadline; return when it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic()


class Healthy:
    """A websockets client that reads everything, recording when each caption arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrivals: list[tuple[float, dict]] = []
        self.closed: websockets.ConnectionClosed | None = None

    async def run(self) -> None:
        async with websockets.connect(self.url) as ws:
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    if message["type"] == "caption":
                        self.arrivals.append((time.monotonic(), message))
            except websockets.ConnectionClosed as closed:
                self.closed = closed

    def gaps_between(self, start: float, end: float) -> list[float]:
        times = [start] + [t for t, _ in self.arrivals if start <= t <= end] + [end]
        return [b - a for a, b in itertools.pairwise(times)]


async def test_a_client_that_stops_reading_gets_1008_while_a_healthy_one_keeps_its_pace(tiny_model, clip, http_log):
    server = ServerConfig(port=0, heartbeat=HEARTBEAT, close_timeout=5.0, client_send_buffer=8192)
    async with running_daemon(tiny_model, server_config=server) as d, aiohttp.ClientSession() as http:
        healthy = Healthy(d.ws + "?all=1")
        healthy_task = asyncio.create_task(healthy.run())
        await add_stream(http, d, id="cam", url=str(clip), loop=True)
        await until(lambda: len(healthy.arrivals) >= 8, 30, "the stream's first captions")  # history for a replay

        stalled = await StalledClient.connect(d.port, "/ws?all=1")
        stalled_at = time.monotonic()
        dropped_at = await until(lambda: dropped(d, "slow") == 1, 4 * HEARTBEAT, "the stalled client to be dropped")
        # within the documented bound: heartbeat + heartbeat/2 after its last pong (the handshake)
        assert dropped_at - stalled_at < 1.5 * HEARTBEAT + 1.0
        assert dropped(d, "ping_timeout") == 0

        # it reads again (within close_timeout): what was sent, then the close frame
        assert await stalled.resume() == (1008, "slow consumer")
        got = [json.loads(t) for t in stalled.texts]
        assert got[0]["type"] == "hello"
        indexes = [m["index"] for m in got if m["type"] == "caption"]
        assert indexes and indexes == sorted(indexes)

        # the healthy client kept its pace (a caption every 0.5 s hop) before, during and after
        after = await until(lambda: len(healthy.arrivals) >= 8 + 8 and healthy.arrivals[-1][0] > dropped_at + 2, 30,
                            "captions after the drop")
        gaps = healthy.gaps_between(stalled_at, after)
        assert max(gaps) < 2.0, gaps
        assert healthy.closed is None and not healthy_task.done()

        lines = [r for r in http_log if r.getMessage() == "websocket client closed"]
        assert len(lines) == 1
        assert (lines[0].reason, lines[0].code, lines[0].rule) == ("slow consumer", 1008, "no pong")
        assert lines[0].unsent + lines[0].buffered + lines[0].queued > 0  # what made it slow, not dead

        async with http.get(f"{d.http}/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        values = {s.labels["reason"]: s.value for s in families["streamer_ws_clients_dropped"].samples
                  if s.name.endswith("_total")}
        assert values == {"slow": 1, "ping_timeout": 0, "protocol_error": 0}
        healthy_task.cancel()
        await asyncio.gather(healthy_task, return_exceptions=True)


async def test_a_client_that_pings_but_does_not_read_gets_1008(tiny_model, clip, http_log):
    # websockets with its reader paused: the app never calls recv(), so after max_queue messages the
    # library stops reading the socket. It keeps sending its own pings: incoming frames are no proof
    # that a client reads (they reset aiohttp's heartbeat, which therefore never cut it).
    server = ServerConfig(port=0, heartbeat=HEARTBEAT, close_timeout=5.0, client_send_buffer=8192)
    async with running_daemon(tiny_model, server_config=server) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?all=1") as reader:
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await read_messages(reader, count_for("cam", 8), 30)

            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel makes it its minimum, ~2 KB
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.port))
            # no permessage-deflate: repeated captions compress to ~60 bytes, and it would take
            # minutes of them to fill even this window (the heartbeat then says 1011, nothing stuck)
            paused = await websockets.connect(d.ws + "?all=1", sock=sock, max_queue=2, ping_interval=0.3,
                                              ping_timeout=None, close_timeout=1, compression=None)
            connected_at = time.monotonic()
            dropped_at = await until(lambda: dropped(d, "slow") == 1, 4 * HEARTBEAT, "the paused client to be dropped")
            assert dropped_at - connected_at < 1.5 * HEARTBEAT + 1.0

            # it resumes reading: the messages queued for it, then 1008
            received = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    received.append(json.loads(await asyncio.wait_for(paused.recv(), 10)))
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "slow consumer")
            assert received[0]["type"] == "hello" and captions_of(received)

            # the reader was never disturbed
            more = await read_messages(reader, count_for("cam", 3), 10)
            assert len(captions_of(more)) >= 3
        assert len([r for r in http_log if r.getMessage() == "websocket client closed"]) == 1


async def test_a_hung_client_with_nothing_waiting_gets_1011_and_a_live_idle_one_stays(tiny_model, http_log):
    server = ServerConfig(port=0, heartbeat=1.0, close_timeout=5.0)
    async with running_daemon(tiny_model, server_config=server) as d:
        # both follow a stream that does not exist: nothing is ever sent to them but the hello
        async with websockets.connect(d.ws + "?streams=nothing") as idle:
            hung = await StalledClient.connect(d.port, "/ws?streams=nothing")
            start = time.monotonic()
            dropped_at = await until(lambda: dropped(d, "ping_timeout") == 1, 4.0, "the hung client to be dropped")
            assert dropped_at - start < 1.5 + 1.0
            assert await hung.resume() == (1011, "ping timeout")
            assert dropped(d, "slow") == 0
            # the idle client answers every ping (websockets does) and is left alone for several heartbeats
            await asyncio.sleep(3.5)  # the observable is that nothing happens: no event to wait for
            await idle.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(idle.recv(), 5))["type"] == "hello"
            assert json.loads(await asyncio.wait_for(idle.recv(), 5))["type"] == "pong"
        lines = [r for r in http_log if r.getMessage() == "websocket client closed"]
        assert [(r.reason, r.code) for r in lines] == [("ping timeout", 1011)]


async def test_an_oversized_message_gets_too_large_and_the_connection_stays(tiny_model):
    async with running_daemon(tiny_model) as d:
        async with websockets.connect(d.ws, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            big = json.dumps({"type": "subscribe", "streams": ["x" * (MAX_MESSAGE_BYTES + 1)]})
            for frame in (big, big.encode()):  # text or binary: same answer
                await ws.send(frame)
                error = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert (error["type"], error["code"]) == ("error", "too_large"), error
            # still open and still serving
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "pong"
            # past what the server reads at all: 1009, as documented
            await ws.send("x" * (MAX_FRAME_BYTES + 1))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert dropped(d, "protocol_error") == 1


async def test_a_bare_ws_follows_every_stream_including_later_ones(tiny_model, clip):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        await add_stream(http, d, id="early", url=str(clip), loop=True)
        async with websockets.connect(d.ws) as ws:
            await add_stream(http, d, id="late", url=str(clip), loop=True)
            messages = await read_messages(ws, lambda ms: count_for("early", 1)(ms) and count_for("late", 1)(ms), 30)
        assert messages[0]["type"] == "hello"
        assert {m["stream_id"] for m in messages if m["type"] == "state"} >= {"early", "late"}


async def test_a_delete_sends_exactly_one_stopped(tiny_model, clip):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, websockets.connect(d.ws) as ws:
        await add_stream(http, d, id="a", url=str(clip), loop=True)
        messages = await read_messages(ws, count_for("a", 1), 30)
        async with http.delete(f"{d.http}/streams/a") as resp:
            assert resp.status == 204
        # DELETE returns once the stream is torn down, so all it published is out before what
        # follows: a new stream's first state is the barrier.
        await add_stream(http, d, id="b", url=str(clip), loop=True)
        messages += await read_messages(ws, lambda ms: any(m.get("stream_id") == "b" for m in ms), 30)
        stopped = [m for m in messages if m["type"] == "state" and m["stream_id"] == "a" and m["state"] == "stopped"]
        assert [m["detail"] for m in stopped] == ["removed"]
        # the id is free again, and a new stream under it is heard from
        await add_stream(http, d, id="a", url=str(clip), loop=True)
        again = await read_messages(ws, count_for("a", 1), 30)
        assert any(m["type"] == "state" and m["stream_id"] == "a" and m["state"] == "connecting" for m in again)
