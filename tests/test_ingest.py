"""Live ingest against real peers: a GStreamer RTSP server, files and lavfi
played as live, and an aiortc WebRTC publisher. Nothing here is mocked."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.errors import VideoError
from streamer.ingest import (
    Backoff,
    FrameSource,
    SourceSpec,
    SourceSpecError,
    SourceState,
    WhipError,
    WhipSession,
    detect_kind,
    redact_url,
)
from streamer.types import Frame
from tests.support.media import moving_square, write_video
from tests.support.rtsp import RtspServer, require_rtsp_server
from tests.support.webrtc import NumberedTrack

pytestmark = pytest.mark.timeout(30)

FAST_RETRY = dict(backoff_initial=0.1, backoff_factor=2.0, backoff_cap=1.0, backoff_jitter=0.0)


class Recorder:
    """Collects what a source hands the loop."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.states: list[tuple[SourceState, str | None]] = []

    def on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def on_state(self, stream_id: str, state: SourceState, detail: str | None) -> None:
        self.states.append((state, detail))

    @property
    def names(self) -> list[str]:
        return [s.value for s, _ in self.states]

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; states: {self.states}")
            await asyncio.sleep(0.02)

    async def until_state(self, state: SourceState, timeout: float, after: int = 0) -> None:
        await self.until(lambda: any(s is state for s, _ in self.states[after:]), timeout, f"state {state.value}")

    async def until_frames(self, n: int, timeout: float) -> None:
        await self.until(lambda: len(self.frames) >= n, timeout, f"{n} frames (have {len(self.frames)})")


def assert_timeline(frames: list[Frame]) -> None:
    """seq counts up by one and pts strictly increase: what every consumer relies on."""
    seqs = np.array([f.seq for f in frames])
    pts = np.array([f.pts for f in frames])
    assert (np.diff(seqs) == 1).all(), f"seq not consecutive: {seqs.tolist()}"
    assert (np.diff(pts) > 0).all(), "pts not strictly increasing"


def ingest_threads(stream_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"ingest:{stream_id}" and t.is_alive()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rtsp() -> Iterator[Callable[..., RtspServer]]:
    require_rtsp_server()
    servers: list[RtspServer] = []

    def start(**kwargs: object) -> RtspServer:
        server = RtspServer(**kwargs).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One second of 30 fps H.264 (30 frames)."""
    return str(write_video(tmp_path_factory.mktemp("ingest") / "clip.mp4", moving_square(30), fps=30))


@pytest.fixture(scope="module")
def clip2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two seconds of 30 fps H.264: the test RTSP server fails to loop clips much shorter."""
    return str(write_video(tmp_path_factory.mktemp("ingest") / "clip2.mp4", moving_square(60), fps=30))


# -- specs, URLs, backoff --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("rtsp://cam.local:554/live", "rtsp"),
        ("rtsps://user:pw@cam.local/live", "rtsp"),
        ("/dev/video0", "webcam"),
        ("lavfi:testsrc2=size=320x240:rate=30", "lavfi"),
        ("http://example.com/live.m3u8", "url"),
        ("udp://127.0.0.1:5000", "url"),
        ("srt://127.0.0.1:9000", "url"),
        ("tcp://127.0.0.1:9000", "url"),
    ],
)
def test_kind_detected_from_url(url: str, kind: str) -> None:
    assert SourceSpec("s", url).kind == kind


def test_files_detected_by_path_and_file_url(clip: str) -> None:
    assert SourceSpec("s", clip).kind == "file"
    spec = SourceSpec("s", "file://" + clip)
    assert (spec.kind, spec.target) == ("file", clip)
    assert detect_kind("lavfi:testsrc2")[1:] == ("testsrc2", "lavfi")


def test_unknown_scheme_and_missing_file_are_clear_errors(tmp_path) -> None:
    with pytest.raises(SourceSpecError, match="unsupported URL scheme 'foo'") as info:
        SourceSpec("s", "foo://user:hunter22@host/x")
    assert isinstance(info.value, ValueError) and isinstance(info.value, VideoError)
    assert "hunter22" not in str(info.value)
    with pytest.raises(SourceSpecError, match="no such file"):
        SourceSpec("s", str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceSpecError, match="rtsp_transport"):
        SourceSpec("s", "rtsp://h/x", rtsp_transport="carrier-pigeon")
    with pytest.raises(SourceSpecError, match="hwaccel .nvdec.: expected one of .*cuda"):
        SourceSpec("s", "rtsp://h/x", hwaccel="nvdec")


def test_redacted_url_hides_secrets() -> None:
    spec = SourceSpec("s", "rtsp://admin:pa55%3Aw%40rd@10.0.0.5:554/h264")
    assert spec.redacted_url == "rtsp://admin:***@10.0.0.5:554/h264"
    assert "pa55" not in repr(spec)
    assert redact_url("https://host/live.m3u8?token=abc123&q=1") == "https://host/live.m3u8?token=***&q=1"
    assert redact_url("https://TOKEN@host/x") == "https://***@host/x"


def test_backoff_grows_to_cap_with_bounded_jitter_and_resets() -> None:
    exact = Backoff(0.5, 2.0, 4.0, 0.0)
    assert [exact.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    exact.reset()
    assert exact.next_delay() == 0.5

    jittered = Backoff(1.0, 2.0, 8.0, 0.25, rng=random.Random(7))
    delays = [jittered.next_delay() for _ in range(200)]
    assert 0.75 <= delays[0] <= 1.25
    assert all(d <= 8.0 for d in delays) and min(delays[10:]) >= 6.0
    assert len({round(d, 6) for d in delays[10:]}) > 50  # spread, not one value
    again = Backoff(1.0, 2.0, 8.0, 0.25, rng=random.Random(7))
    assert [again.next_delay() for _ in range(200)] == delays
    with pytest.raises(ValueError):
        Backoff(initial=0)


# -- RTSP ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_rtsp_stream_arrives_live_at_real_time_rate(rtsp, transport: str) -> None:
    server = rtsp()
    rec = Recorder()
    spec = SourceSpec("cam", server.url, rtsp_transport=transport, short_side=120)
    async with FrameSource(spec, rec.on_frame, rec.on_state) as source:
        await rec.until_frames(1, timeout=8)
        assert rec.names[:2] == ["connecting", "live"]
        assert source.state is SourceState.LIVE
        start_n, start_t = len(rec.frames), time.monotonic()
        await asyncio.sleep(2.0)
        window = rec.frames[start_n:]
        elapsed = time.monotonic() - start_t
    assert len(window) / elapsed >= 20, f"{len(window)} frames in {elapsed:.2f} s"
    media_span = window[-1].pts - window[0].pts
    assert abs(media_span - elapsed) < 0.5, f"media advanced {media_span:.2f} s in {elapsed:.2f} s of wall time"
    assert_timeline(rec.frames)
    first = rec.frames[0]
    assert (first.stream_id, first.image.shape, first.image.dtype) == ("cam", (120, 160, 3), np.uint8)
    assert source.stats.frames == len(rec.frames) and source.stats.reconnects == 0
    assert rec.names[-1] == "stopped" and not ingest_threads("cam")


async def test_rtsp_credentials_work_and_never_leak(rtsp, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    password, wrong = "pa55:w@rd/x", "not-the-pa55"
    server = rtsp(user="alice", password=password)

    rec = Recorder()
    good = SourceSpec("cam", server.url)
    assert good.redacted_url == f"rtsp://alice:***@127.0.0.1:{server.port}/stream"
    async with FrameSource(good, rec.on_frame, rec.on_state):
        await rec.until_frames(5, timeout=8)

    bad_rec = Recorder()
    bad = SourceSpec("cam2", server.url_with("alice", wrong), max_retries=1, **FAST_RETRY)
    async with FrameSource(bad, bad_rec.on_frame, bad_rec.on_state) as source:
        await bad_rec.until_state(SourceState.FAILED, timeout=8)
        assert source.state is SourceState.FAILED
    assert not bad_rec.frames
    assert bad_rec.names == ["connecting", "reconnecting", "failed"]
    reconnect_detail = bad_rec.states[1][1] or ""
    assert "401" in reconnect_detail and "retry 1" in reconnect_detail
    assert "gave up after 1 retries" in (bad_rec.states[2][1] or "")

    # Nothing a user sees may hold a password: details, log messages, log fields.
    seen = [str(d) for _, d in rec.states + bad_rec.states] + [caplog.text]
    seen += [str(v) for r in caplog.records for v in vars(r).values()]
    for secret in (password, wrong, "pa55%3Aw%40rd%2Fx", "not-the-pa55"):
        assert not [s for s in seen if secret in s], f"{secret!r} leaked"


async def test_rtsp_server_crash_and_restart_keeps_timeline(rtsp) -> None:
    server = rtsp()
    rec = Recorder()
    spec = SourceSpec("cam", server.url, **FAST_RETRY)
    async with FrameSource(spec, rec.on_frame, rec.on_state) as source:
        await rec.until_frames(15, timeout=8)
        server.kill()
        await rec.until_state(SourceState.RECONNECTING, timeout=5)
        before = len(rec.frames)
        await asyncio.sleep(0.5)  # a few failed attempts against the closed port
        server.restart_same_port()
        live_again = rec.names.index("reconnecting")
        await rec.until_state(SourceState.LIVE, timeout=8, after=live_again)
        await rec.until_frames(before + 15, timeout=5)
        assert source.stats.reconnects >= 2
    assert_timeline(rec.frames)
    seam = rec.frames[before].pts - rec.frames[before - 1].pts
    assert 0 < seam < 0.1, f"media timeline jumped {seam:.3f} s across the reconnect"
    assert any("Connection refused" in (d or "") for s, d in rec.states if s is SourceState.RECONNECTING)


async def test_rtsp_hung_server_is_detected_as_stall_and_recovers(rtsp) -> None:
    server = rtsp()
    rec = Recorder()
    spec = SourceSpec("cam", server.url, stall_timeout=1.0, open_timeout=5.0, **FAST_RETRY)
    async with FrameSource(spec, rec.on_frame, rec.on_state):
        await rec.until_frames(10, timeout=8)
        server.pause()
        t0 = time.monotonic()
        await rec.until_state(SourceState.RECONNECTING, timeout=4)
        assert rec.names[-2:] == ["stalled", "reconnecting"]
        assert 0.8 < time.monotonic() - t0 < 2.5
        before = len(rec.frames)
        server.resume()  # the camera comes back: the pending reconnect gets through
        await rec.until_state(SourceState.LIVE, timeout=8, after=2)
        await rec.until_frames(before + 10, timeout=5)
    assert_timeline(rec.frames)


async def test_stop_returns_promptly_while_read_is_blocked(rtsp) -> None:
    server = rtsp()
    rec = Recorder()
    spec = SourceSpec("cam", server.url, stall_timeout=30.0)
    source = FrameSource(spec, rec.on_frame, rec.on_state)
    await source.start()
    await rec.until_frames(10, timeout=8)
    server.pause()  # the decode thread now sits in a network read that gets nothing
    await asyncio.sleep(0.8)
    t0 = time.monotonic()
    await source.stop()
    took = time.monotonic() - t0
    assert took < 1.5, f"stop took {took:.2f} s"  # READ_TICK is 0.5 s
    assert not source.is_running and not ingest_threads("cam")
    assert source.state is SourceState.STOPPED
    n = len(rec.frames)
    server.resume()
    await asyncio.sleep(0.2)
    assert len(rec.frames) == n  # nothing after stop
    await source.stop()  # idempotent


async def test_rtsp_server_restarting_its_clock_does_not_break_pts(rtsp, clip2) -> None:
    # The file server loops by seeking back, which restarts its RTP timestamps
    # at 0 within the session, as some cameras do after a glitch.
    server = rtsp(file=clip2)
    rec = Recorder()
    async with FrameSource(SourceSpec("cam", server.url), rec.on_frame, rec.on_state):
        await rec.until(lambda: len(rec.frames) > 70, timeout=10, what="frames past the file's end")
    assert_timeline(rec.frames)
    steps = np.diff([f.pts for f in rec.frames])
    assert steps.max() < 0.2, "the timeline jumped at the server's loop point"
    assert rec.names.count("live") == 1  # spliced in place, no reconnect


# -- isolation between sources -------------------------------------------------------


async def test_unreachable_source_backs_off_without_slowing_others(clip) -> None:
    down, up = Recorder(), Recorder()
    dead = SourceSpec("dead", f"rtsp://127.0.0.1:{closed_port()}/stream", **FAST_RETRY)
    live = SourceSpec("file", clip, realtime=True, loop=True)
    lags: list[float] = []

    async def ticker() -> None:  # how late the loop runs a 10 ms timer
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    async with FrameSource(dead, down.on_frame, down.on_state), FrameSource(live, up.on_frame, up.on_state):
        await up.until_frames(1, timeout=5)
        n0, t0 = len(up.frames), time.monotonic()
        await asyncio.sleep(1.6)
        rate = (len(up.frames) - n0) / (time.monotonic() - t0)
    tick.cancel()

    assert 26 <= rate <= 34, f"file source ran at {rate:.1f} fps beside the dead one"
    assert max(lags) < 0.1, f"event loop blocked for {max(lags):.3f} s"
    delays = [float(m.group(1)) for _, d in down.states if (m := re.search(r"in ([\d.]+) s", d or ""))]
    assert len(delays) >= 3 and delays[:3] == [0.1, 0.2, 0.4], down.states
    assert not down.frames and "Connection refused" in (down.states[1][1] or "")
    assert_timeline(up.frames)


# -- files and lavfi as live ------------------------------------------------------------


async def test_file_plays_at_real_time_and_loops_with_continuing_pts(clip) -> None:
    rec = Recorder()
    async with FrameSource(SourceSpec("f", clip, realtime=True, loop=True), rec.on_frame, rec.on_state):
        await rec.until(lambda: rec.frames and rec.frames[-1].pts > 1.5, timeout=5, what="pts past the end")
    assert_timeline(rec.frames)
    # Each frame arrives when its pts says, measured from the first frame.
    first = rec.frames[0]
    drift = [abs((f.arrival - first.arrival) - (f.pts - first.pts)) for f in rec.frames]
    assert max(drift) < 0.15, f"pacing off by {max(drift):.3f} s"
    loop_seam = rec.frames[30].pts - rec.frames[29].pts
    assert loop_seam == pytest.approx(1 / 30, abs=1e-3)
    assert rec.names == ["connecting", "live", "stopped"]


async def test_file_without_realtime_runs_fast_and_ends(clip) -> None:
    looped, once = Recorder(), Recorder()
    async with FrameSource(SourceSpec("fast", clip, realtime=False, loop=True), looped.on_frame):
        await looped.until_frames(150, timeout=5)  # five passes, far faster than real time
    assert_timeline(looped.frames)
    assert looped.frames[149].pts == pytest.approx(149 / 30, abs=1e-3)

    async with FrameSource(SourceSpec("once", clip, realtime=False), once.on_frame, once.on_state) as source:
        await once.until_state(SourceState.STOPPED, timeout=5)
        assert source.state is SourceState.STOPPED
    assert len(once.frames) == 30 and once.states[-1] == (SourceState.STOPPED, "end of file")


async def test_lavfi_source_is_paced_like_a_camera() -> None:
    rec = Recorder()
    spec = SourceSpec("synthetic", "lavfi:testsrc2=size=320x240:rate=30")
    async with FrameSource(spec, rec.on_frame, rec.on_state):
        await rec.until_frames(1, timeout=5)
        n0, t0 = len(rec.frames), time.monotonic()
        await asyncio.sleep(1.0)
        rate = (len(rec.frames) - n0) / (time.monotonic() - t0)
    assert 25 <= rate <= 35
    assert rec.frames[0].image.shape == (240, 320, 3)
    assert_timeline(rec.frames)


# -- WHIP ---------------------------------------------------------------------------------


async def test_whip_session_receives_a_real_webrtc_publisher(loopback_ice) -> None:
    rec = Recorder()
    session = WhipSession("whip", rec.on_frame, rec.on_state, short_side=120)
    publisher = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = NumberedTrack()
    publisher.addTransceiver(track, direction="sendonly")
    try:
        await publisher.setLocalDescription(await publisher.createOffer())
        answer = await session.accept(publisher.localDescription.sdp)
        assert answer.startswith("v=0") and "m=video" in answer and "a=candidate" in answer
        await publisher.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await rec.until_frames(20, timeout=10)
        assert session.state is SourceState.LIVE
    finally:
        await publisher.close()
        await session.close()
    await session.close()  # idempotent
    assert rec.names[0] == "connecting" and "live" in rec.names and rec.names[-1] == "stopped"
    assert_timeline(rec.frames)
    frame = rec.frames[-1]
    assert frame.image.shape == (120, 160, 3) and frame.stream_id == "whip"
    levels = {round((float(f.image.mean()) - 20) / 10) for f in rec.frames[5:]}
    assert len(levels) >= 5, f"frames do not carry the sent content: levels {sorted(levels)}"
    assert session.stats.frames == len(rec.frames)


async def test_whip_rejects_bad_offers() -> None:
    session = WhipSession("whip", lambda f: None)
    with pytest.raises(WhipError, match="not an SDP offer"):
        await session.accept("hello")
    audio_only = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    audio_only.addTransceiver("audio", direction="sendonly")
    try:
        await audio_only.setLocalDescription(await audio_only.createOffer())
        with pytest.raises(WhipError, match="no video") as info:
            await session.accept(audio_only.localDescription.sdp)
        assert isinstance(info.value, ValueError)
        broken = audio_only.localDescription.sdp.replace("m=audio", "m=video").replace("a=ice-pwd", "a=x-nothing")
        with pytest.raises(WhipError):
            await session.accept(broken)
    finally:
        await audio_only.close()
        await session.close()



def test_platform_camera_names_need_their_ffmpeg_input() -> None:

    for fmt, url in (("avfoundation", "avfoundation:0"), ("dshow", "dshow:video=USB Camera")):
        if fmt in av.formats_available:
            assert detect_kind(url) == ("webcam", url.split(":", 1)[1], fmt)
        else:
            with pytest.raises(SourceSpecError, match=f"no {fmt} input"):
                detect_kind(url)
