"""The live daemon end to end: real sources (GStreamer RTSP server, aiortc peer,
files as live), a real HTTP client (aiohttp) and real WebSocket clients
(websockets), against the tiny GIT checkpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time

import aiohttp
import numpy as np
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from prometheus_client.parser import text_string_to_metric_families

from streamer.http.app import ServerConfig
from streamer.pipeline.daemon import DaemonConfig
from streamer.pipeline.scheduler import SchedulerConfig
from tests.support.daemon import add_stream, captions_of, count_for, read_messages, running_daemon
from tests.support.media import moving_square, write_video
from tests.support.rtsp import RtspServer, require_rtsp_server
from tests.support.webrtc import NumberedTrack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip2(tmp_path_factory):
    """2 s, 15 fps, starting at media time 0."""
    return write_video(tmp_path_factory.mktemp("live") / "clip2.mp4", moving_square(30, 160, 120, seed=4), fps=15)


def assert_media_aligned(caps: list[dict], hop: float) -> None:
    starts = [c["start"] for c in caps]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), starts
    assert [c["index"] for c in caps] == sorted(c["index"] for c in caps)
    for c in caps:
        assert c["start"] <= c["end"]
        assert 0 <= c["latency"] < 10
        assert c["capture_time"] <= c["emit_time"]
    # window k starts k hops after the first (in media time), to within a frame
    for a, b in zip(caps, caps[1:]):
        assert (b["start"] - a["start"]) == pytest.approx(hop * (b["index"] - a["index"]), abs=0.08)


async def test_rtsp_and_file_streams_caption_over_websocket(tiny_model, clip2):
    require_rtsp_server()
    with RtspServer(fps=15) as rtsp:
        async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
            async with websockets.connect(d.ws + "?all=1") as ws:
                hello = json.loads(await ws.recv())
                assert hello["type"] == "hello" and hello["v"] == 1
                await add_stream(http, d, id="cam", url=rtsp.url)
                await add_stream(http, d, id="file", url=str(clip2), loop=True)
                messages = await read_messages(ws, lambda ms: count_for("cam", 5)(ms) and count_for("file", 5)(ms), 40)
            for sid in ("cam", "file"):
                caps = captions_of(messages, sid)
                assert_media_aligned(caps, hop=0.5)
                assert all(c["model"] == str(tiny_model) and c["v"] == 1 for c in caps)
            states = [(m["stream_id"], m["state"]) for m in messages if m["type"] == "state"]
            assert ("cam", "live") in states and ("file", "live") in states
            # a looped file keeps one media timeline: it runs past the 2 s clip
            assert captions_of(messages, "file")[-1]["start"] > 2.0
            async with http.get(f"{d.http}/streams") as resp:
                listed = {s["id"]: s for s in (await resp.json())["streams"]}
            assert listed["cam"]["state"] == "live" and listed["cam"]["captions"] >= 5


async def test_rtsp_source_reconnects_while_other_streams_continue(tiny_model, clip2):
    require_rtsp_server()
    with RtspServer(fps=15) as rtsp:
        async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
            async with websockets.connect(d.ws + "?all=1") as ws:  # the test pattern is static: repeated captions too
                await add_stream(http, d, id="cam", url=rtsp.url, stall_timeout=1.5)
                await add_stream(http, d, id="file", url=str(clip2), loop=True)
                await read_messages(ws, count_for("cam", 2), 30)
                rtsp.kill()
                killed_at = time.time()
                # while the camera is down, the other stream keeps captioning
                during = await read_messages(ws, lambda ms: any(m.get("state") == "reconnecting" for m in ms)
                                             and count_for("file", 3)(ms), 30)
                assert any(m["type"] == "state" and m["stream_id"] == "cam" and m["state"] in ("stalled", "reconnecting")
                           for m in during)
                rtsp.restart_same_port()
                after = await read_messages(ws, lambda ms: any(c["emit_time"] > killed_at for c in captions_of(ms, "cam"))
                                            and count_for("cam", 3)(ms), 45)
            assert ("cam", "live") in [(m["stream_id"], m.get("state")) for m in after]
            file_caps = [c for c in captions_of(during + after, "file")]
            assert len(file_caps) >= 3
            cam_before = captions_of(during, "cam")
            cam_after = captions_of(after, "cam")
            # the camera's media timeline continues across the reconnect
            if cam_before:
                assert cam_after[0]["start"] > cam_before[-1]["start"]


async def test_webrtc_publisher_over_whip_gets_captions(tiny_model, loopback_ice):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        publisher = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        publisher.addTransceiver(NumberedTrack(), direction="sendonly")
        try:
            async with websockets.connect(d.ws + "?streams=obs") as ws:
                await publisher.setLocalDescription(await publisher.createOffer())
                async with http.post(f"{d.http}/whip/obs?window=1&hop=0.5", data=publisher.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp"}) as resp:
                    assert resp.status == 201
                    location = resp.headers["Location"]
                    assert location.startswith("/whip/obs/") and len(location) > len("/whip/obs/") + 16
                    assert resp.content_type == "application/sdp"
                    answer = await resp.text()
                await publisher.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
                messages = await read_messages(ws, count_for("obs", 3), 30)
            assert_media_aligned(captions_of(messages, "obs"), hop=0.5)
            async with http.post(f"{d.http}/whip/obs", data=publisher.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 409  # one publisher per stream id
            async with http.delete(f"{d.http}{location}") as resp:
                assert resp.status == 204
            async with http.get(f"{d.http}/streams/obs") as resp:
                assert resp.status == 404
        finally:
            await publisher.close()


async def stalled_websocket(port: int) -> socket.socket:
    """A client that completes the WebSocket handshake and then never reads
    again, with a small receive buffer: what a hung browser tab looks like
    from the server (a library client would keep reading into its own buffers)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()  # the daemon runs on this loop: never block it
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET /ws?all=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_many_streams_all_get_captions_and_a_stalled_client_is_dropped(tiny_model, clip2):
    require_rtsp_server()
    # the queue must hold a whole engine batch (captions are published a batch at a time)
    daemon_config = DaemonConfig(client_queue=24, scheduler=SchedulerConfig(max_batch=12))
    server_config = ServerConfig(port=0, client_send_buffer=8192)
    ids = [f"f{i}" for i in range(8)] + ["cam"]
    with RtspServer(fps=15) as rtsp:
        async with running_daemon(tiny_model, daemon_config=daemon_config, server_config=server_config) as d, \
                aiohttp.ClientSession() as http:
            stalled = await stalled_websocket(d.port)
            async with websockets.connect(d.ws + "?all=1") as reader:
                for i in range(8):
                    await add_stream(http, d, id=f"f{i}", url=str(clip2), loop=True)
                await add_stream(http, d, id="cam", url=rtsp.url)
                messages = await read_messages(
                    reader, lambda ms: all(count_for(s, 3)(ms) for s in ids) and d.daemon.hub.subscribers_dropped_slow >= 1, 90
                )
                # the reader goes on receiving after the other client was dropped
                more = await read_messages(reader, lambda ms: len(captions_of(ms)) >= 9, 30)
            for sid in ids:
                idx = [c["index"] for c in captions_of(messages + more, sid)]
                assert idx == sorted(idx) and len(set(idx)) == len(idx)
            # the server closed the stalled connection (close frame, then the socket)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(ConnectionResetError):
                while await asyncio.wait_for(loop.sock_recv(stalled, 65536), 15):
                    pass
            stalled.close()
            async with http.get(f"{d.http}/metrics") as resp:
                families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
            assert families["streamer_ws_clients_dropped"].samples[0].value == 1


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipelined"])
async def test_overload_drops_old_windows_and_keeps_latency_bounded(tiny_model, clip2, pipeline):
    # hop 0.1 s on 8 streams, one window per engine call and 40 tokens per
    # caption: far more windows than the engine can caption (~80/s asked),
    # so the newest-wins policy has to act. Pipelined is the GPU scheduling
    # order (prepare the next batch before finishing this one), run on the CPU.
    scheduler = SchedulerConfig(max_batch=1, max_wait=0.0, max_pending_per_stream=1, pipeline=pipeline)
    daemon_config = DaemonConfig(scheduler=scheduler)
    async with running_daemon(tiny_model, daemon_config=daemon_config, max_new_tokens=40) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?all=1") as ws:
            for i in range(8):
                await add_stream(http, d, id=f"s{i}", url=str(clip2), loop=True, window=0.5, hop=0.1)
            messages = await read_messages(ws, lambda ms: len(captions_of(ms)) >= 80, 60)
        caps = captions_of(messages)
        late = [c["latency"] for c in caps[-30:]]
        assert max(late) < 2.0, late  # bounded, not growing with the backlog
        async with http.get(f"{d.http}/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        dropped = sum(s.value for s in families["streamer_windows_dropped"].samples if s.name.endswith("_total"))
        print("windows dropped under overload:", dropped)
        assert dropped > 0
        # skipped windows show up as gaps in a stream's indices, never as reordering
        for i in range(8):
            idx = [c["index"] for c in captions_of(messages, f"s{i}")]
            assert idx == sorted(idx)


async def test_bad_requests_get_clear_errors_and_nothing_else_is_disturbed(tiny_model, clip2):
    server_config = ServerConfig(port=0, max_body_bytes=64 * 1024)
    async with running_daemon(tiny_model, server_config=server_config) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?streams=good&all=1") as ws:
            await add_stream(http, d, id="good", url=str(clip2), loop=True)
            cases = [
                ("POST", "/streams", {"json": {"id": "x", "url": "foo://bar"}}, 403, "'foo' URLs may not be added over HTTP"),
                ("POST", "/streams", {"json": {"id": "x", "url": "/no/such/file.mp4"}}, 403, "not under a configured media directory"),
                ("POST", "/streams", {"json": {"id": "good", "url": str(clip2)}}, 409, "already exists"),
                ("POST", "/streams", {"json": {"id": "bad id!", "url": str(clip2)}}, 400, "stream id"),
                ("POST", "/streams", {"json": {"id": "y", "url": str(clip2), "hop": -1}}, 400, "hop"),
                ("POST", "/streams", {"json": {"id": "y", "url": str(clip2), "colour": 1}}, 400, "unknown stream field"),
                ("POST", "/streams", {"json": {"id": "y", "url": str(clip2), "hwaccel": "nvdec"}}, 400, "hwaccel 'nvdec'"),
                ("POST", "/streams", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
                ("DELETE", "/streams/nope", {}, 404, "no stream"),
                ("POST", "/whip/w1", {"data": "v=0 garbage", "headers": {"Content-Type": "application/sdp"}}, 400, ""),
                ("POST", "/whip/w1", {"data": "v=0", "headers": {"Content-Type": "text/plain"}}, 415, "application/sdp"),
                ("POST", "/v1/caption/video", {"json": {"video": "%%%not base64%%%"}}, 400, "not valid base64"),
                ("POST", "/v1/caption/video", {"json": {"video": base64.b64encode(b"\x00garbage" * 50).decode()}}, 400, "not a readable video"),
                ("POST", "/v1/caption/video", {"json": {"video": "QUJD", "max_length": "long"}}, 400, "max_length"),
                ("POST", "/v1/caption/video", {"json": {"video": "A" * 100_000}}, 413, "over the limit"),
                ("POST", "/v1/caption/frames", {"json": {"frames": [base64.b64encode(b"nope").decode()]}}, 400, "not a readable image"),
                ("POST", "/v1/caption/videos", {"json": {"videos": []}}, 400, "videos"),
            ]
            for method, path, kwargs, status, text in cases:
                async with http.request(method, d.http + path, **kwargs) as resp:
                    body = await resp.json()
                    assert resp.status == status, (path, body)
                    assert text in body["error"]["message"], (path, body)
            # an unreachable camera is accepted and retried in the background, not an HTTP error
            await add_stream(http, d, id="gone", url="rtsp://127.0.0.1:1/nothing")
            async with http.get(f"{d.http}/healthz") as resp:
                assert resp.status == 200
            # the good stream kept captioning through all of it
            before = d.daemon.get("good").captions
            await read_messages(ws, count_for("good", 3), 20)
            assert d.daemon.get("good").captions > before
            async with http.get(f"{d.http}/streams/gone") as resp:
                assert (await resp.json())["state"] in ("connecting", "reconnecting")


async def test_json_apis_caption_base64_clips_and_frames(tiny_model, clip2, tmp_path):
    from PIL import Image

    other = write_video(tmp_path / "other.mp4", moving_square(20, 96, 96, seed=11), fps=10)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in (clip2, other)]
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        singles = []
        for clip in b64:
            async with http.post(f"{d.http}/v1/caption/video", json={"video": clip, "max_length": 6}) as resp:
                assert resp.status == 200
                singles.append(await resp.json())
        async with http.post(f"{d.http}/v1/caption/videos", json={"videos": b64, "max_length": 6}) as resp:
            batch = (await resp.json())["results"]
        assert [r["caption"] for r in batch] == [s["caption"] for s in singles]  # batched == alone
        assert singles[0]["caption"] != singles[1]["caption"]
        assert singles[0]["start"] < 0.2 and singles[0]["end"] > 1.7  # spread over the clip
        frames = []
        for img in moving_square(6, 64, 64, seed=2):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            frames.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        async with http.post(f"{d.http}/v1/caption/frames", json={"frames": frames}) as resp:
            assert resp.status == 200
            result = await resp.json()
        assert result["caption"] and result["confidence"] <= 0


async def test_websocket_subscriptions_history_and_protocol_errors(tiny_model, clip2):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        await add_stream(http, d, id="a", url=str(clip2), loop=True)
        await add_stream(http, d, id="b", url=str(clip2), loop=True)
        async with websockets.connect(d.ws + "?all=1") as ws:
            await read_messages(ws, lambda ms: count_for("a", 3)(ms) and count_for("b", 3)(ms), 30)
        # a late client subscribing to "a" only: history first, then live, never "b"
        async with websockets.connect(d.ws.replace("/ws", "/ws?streams=a&all=1")) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "hello" and set(first["streams"]) >= {"a", "b"}
            messages = await read_messages(ws, count_for("a", 6), 30)
            assert not captions_of(messages, "b")
            await ws.send("{broken")
            await ws.send(json.dumps({"type": "ping"}))
            replies = await read_messages(ws, lambda ms: any(m["type"] == "pong" for m in ms), 10)
            errors = [m for m in replies if m["type"] == "error"]
            assert errors and errors[0]["code"] == "bad_json"
            await ws.send(json.dumps({"type": "subscribe", "streams": ["b"]}))
            later = await read_messages(ws, count_for("b", 2), 20)
            assert captions_of(later, "b")


async def test_identical_captions_are_not_resent_unless_asked(tiny_model, tmp_path):
    # a still image: every window looks the same, so every caption repeats
    still = write_video(tmp_path / "still.mp4", [np.full((120, 160, 3), 90, np.uint8)] * 30, fps=15)
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?all=1") as everything, websockets.connect(d.ws) as changes:
            await add_stream(http, d, id="still", url=str(still), loop=True)
            all_msgs = await read_messages(everything, count_for("still", 6), 30)
            await asyncio.sleep(0.2)
            change_msgs = []
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    change_msgs.append(json.loads(await asyncio.wait_for(changes.recv(), 0.5)))
        texts = {c["text"] for c in captions_of(all_msgs, "still")}
        assert len(texts) == 1
        assert any(c["stable"] for c in captions_of(all_msgs, "still"))
        assert len(captions_of(change_msgs, "still")) == 1  # sent once, not on every window


async def test_sixteen_clips_over_http_stay_within_max_batch_while_a_live_stream_captions(tiny_model, clip2):
    # At c81686b the 16 clips of one request ran as one engine call of 16, ahead of live windows.
    scheduler = SchedulerConfig(max_batch=4, max_wait=0.01)
    async with running_daemon(tiny_model, daemon_config=DaemonConfig(scheduler=scheduler)) as d, \
            aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?streams=live&all=1") as ws:
            await add_stream(http, d, id="live", url=str(clip2), loop=True)
            await read_messages(ws, count_for("live", 1), 20)
            clip = base64.b64encode(clip2.read_bytes()).decode()
            request = asyncio.ensure_future(http.post(f"{d.http}/v1/caption/videos",
                                                      json={"videos": [clip] * 16, "max_new_tokens": 4}))
            during = await read_messages(ws, count_for("live", 2), 30)  # live captions go on meanwhile
            async with await request as resp:
                results = (await resp.json())["results"]
            assert resp.status == 200 and len(results) == 16 and len({r["caption"] for r in results}) == 1
            assert captions_of(during, "live")
        async with http.get(f"{d.http}/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        buckets = {s.labels["le"]: s.value for s in families["streamer_batch_size"].samples if s.name.endswith("_bucket")}
        assert buckets["4.0"] == buckets["+Inf"] > 0  # no engine call over max_batch
