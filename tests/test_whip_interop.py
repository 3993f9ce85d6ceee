"""WHIP against peers nobody on this project wrote: GStreamer's webrtcbin (RSA DTLS certificate),
headless Chromium's own WebRTC, and aiortc. Real daemon, real peers, loopback only."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
import websockets
from aiortc import RTCSessionDescription

from streamer.http.common import ServerConfig
from streamer.ingest import SourceState
from streamer.ingest.whip import WhipSession
from streamer.media.decode import to_rgb
from streamer.pipeline.daemon import DaemonConfig
from tests.support.daemon import captions_of, count_for, read_messages, running_daemon
from tests.support.gst_whip import WhipPublisher, gst_webrtc_missing
from tests.support.media import moving_square, write_video
from tests.support.webrtc import AiortcPublisher


@pytest.fixture(scope="module")
def gst() -> None:
    why = gst_webrtc_missing()
    if why:
        pytest.skip(f"GStreamer WHIP publisher cannot run: {why}")


async def next_state(ws, stream_id: str, timeout: float) -> tuple[dict, float]:
    """The next state message of `stream_id` and when it came (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        message = json.loads(raw)
        if message["type"] == "state" and message["stream_id"] == stream_id:
            return message, time.monotonic()


async def until_state(ws, stream_id: str, state: str, timeout: float) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            message, at = await next_state(ws, stream_id, deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise AssertionError(f"no {state!r} for {stream_id} within {timeout} s; states {seen}") from None
        seen.append((message["state"], message["detail"]))
        if message["state"] == state:
            return message, at


# -- GStreamer webrtcbin ------------------------------------------------------------------


@pytest.mark.parametrize("source", ["vp8", "h264-file"])
async def test_gstreamer_webrtcbin_publisher_gets_captions(tiny_model, loopback_ice, gst, source, tmp_path):
    if source == "h264-file":  # a real H.264 file, sent as it is
        source += ":" + str(write_video(tmp_path / "clip.mp4", moving_square(240, 320, 240)))
    # all=1 on every socket here that counts captions: the tiny random model often says the same text
    # for every window, and a default subscriber (only changes) would get only the first of them.
    async with running_daemon(tiny_model) as d, websockets.connect(d.ws + "?streams=gst&all=1") as ws:
        publisher = WhipPublisher(f"{d.http}/whip/gst?window=1&hop=0.5&stall_timeout=1.5", source=source)
        try:
            answer = await publisher.wait_for("answer")
            assert answer["status"] == 201, answer
            assert answer["location"].startswith("/whip/gst/")
            messages = await read_messages(ws, count_for("gst", 2), 30)
            assert len(captions_of(messages, "gst")) >= 2
            session = d.daemon.streams["gst"].source
            assert session.dtls_role == "server"  # answered setup:passive to webrtcbin's actpass
            if not source.startswith("vp8"):
                return
            # The publisher crashes: no DELETE, no DTLS close. Stalled within stall_timeout, not ~30 s later.
            await publisher.kill()
            killed = time.monotonic()
            message, at = await until_state(ws, "gst", "stalled", timeout=10)
            assert at - killed <= 1.5 + 1.0, f"stalled after {at - killed:.2f} s"
            assert "no video" in message["detail"]
        finally:
            await publisher.stop()


async def test_gstreamer_offer_insisting_on_setup_passive_publishes_with_the_daemon_as_dtls_client(
        tiny_model, loopback_ice, gst):
    """webrtcbin's offer munged to `a=setup:passive` makes the daemon the DTLS client against GStreamer's
    RSA certificate. aiortc alone offers only ECDHE-ECDSA suites there ("no shared cipher"); the daemon
    also offers their ECDHE-RSA twins, so the handshake meets and captions come."""
    async with running_daemon(tiny_model) as d, websockets.connect(d.ws + "?streams=rsa&all=1") as ws:
        publisher = WhipPublisher(f"{d.http}/whip/rsa?window=1&hop=0.5", source="vp8", setup="passive")
        try:
            answer = await publisher.wait_for("answer")
            assert answer["status"] == 201, answer
            messages = await read_messages(ws, count_for("rsa", 2), 30)
            assert len(captions_of(messages, "rsa")) >= 2
            session = d.daemon.streams["rsa"].source
            assert session.dtls_role == "client"
            # What made it work (aiortc has no public accessor for it): an RSA suite, so an RSA server certificate.
            dtls = session._pc.getTransceivers()[0].receiver.transport
            assert dtls._ssl.get_cipher_name().startswith("ECDHE-RSA-"), dtls._ssl.get_cipher_name()
            assert not [m for m in messages if m["type"] == "state" and m["state"] == "failed"]
        finally:
            await publisher.stop()


def forge_fingerprints(offer: str) -> str:
    """The offer with every certificate fingerprint replaced by zeros of the same length."""
    return re.sub(r"^(a=fingerprint:\S+ )([0-9A-Fa-f:]+)", lambda m: m[1] + re.sub("[0-9A-Fa-f]", "0", m[2]),
                  offer, flags=re.MULTILINE)


async def test_a_failed_dtls_handshake_is_reported_in_one_line_with_its_reason(tiny_model, loopback_ice, caplog):
    """A publisher whose certificate does not match the fingerprint its offer announced (a forged or
    mangled offer): the handshake fails, and the state detail and one log line say which layer, which
    DTLS role and why."""
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?streams=forged") as ws:
        publisher = AiortcPublisher()
        try:
            offer = await publisher.offer()
            forged = forge_fingerprints(offer)
            assert forged != offer and "a=fingerprint:" in forged
            async with http.post(f"{d.http}/whip/forged", data=forged,
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201
                answer = await resp.text()
            await publisher.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            message, _ = await until_state(ws, "forged", "failed", timeout=20)
        finally:
            await publisher.close()
    assert message["detail"] == "DTLS failed as server: DTLS handshake failed (fingerprint mismatch)", message
    failed = [r for r in caplog.records
              if getattr(r, "state", None) == "failed" and getattr(r, "stream", None) == "forged"]
    assert len(failed) == 1 and failed[0].detail == message["detail"]


def test_dtls_contexts_offer_rsa_suites_and_a_changed_aiortc_is_refused_at_startup(monkeypatch):
    """The wrap that lets the daemon meet RSA servers as a DTLS client: every context aiortc makes
    offers ECDHE-RSA twins of its ECDHE-ECDSA suites; an aiortc whose context creation changed
    shape makes importing the WHIP module fail with a reason, not RSA publishers fail one by one."""
    from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate
    from OpenSSL import SSL

    from streamer.ingest import whip

    context = RTCCertificate.generateCertificate()._create_ssl_context(SRTP_PROFILES)
    suites = SSL.Connection(context).get_cipher_list()
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in suites and "ECDHE-RSA-AES128-GCM-SHA256" in suites
    whip._offer_rsa_suites_as_client()  # again: a no-op
    assert RTCCertificate._create_ssl_context.__wrapped__.__name__ == "_create_ssl_context"

    def _create_ssl_context(self, srtp_profiles, dtls_version):  # as if aiortc had grown a parameter
        raise AssertionError("never called")

    monkeypatch.setattr(RTCCertificate, "_create_ssl_context", _create_ssl_context)
    with pytest.raises(RuntimeError, match=r"aiortc .*_create_ssl_context\(self, srtp_profiles\) not found"):
        whip._offer_rsa_suites_as_client()


# -- aiortc: a publisher that never connects -----------------------------------------------


@pytest.mark.parametrize("fault, progress", [
    ("drops the answer", "never connected (ICE checking (1 remote candidate), DTLS not started)"),
    # answered setup:passive, it takes the answer as setup:active: two DTLS servers wait for a ClientHello
    ("also a DTLS server", "never connected (ICE connected, DTLS handshake as server not finished)"),
], ids=["drops-answer", "two-dtls-servers"])
async def test_a_publisher_that_never_connects_is_removed_and_the_detail_says_how_far_it_got(
        tiny_model, loopback_ice, fault, progress):
    config = DaemonConfig(whip_connect_timeout=1.0)
    async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?streams=mute") as ws:
        publisher = AiortcPublisher()
        try:
            async with http.post(f"{d.http}/whip/mute", data=await publisher.offer(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 201
                answer = await resp.text()
            if fault == "also a DTLS server":
                assert "a=setup:passive" in answer
                answer = answer.replace("a=setup:passive", "a=setup:active")
                await publisher.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            message, _ = await until_state(ws, "mute", "stopped", timeout=10)
        finally:
            await publisher.close()
    assert message["detail"] == progress
    assert "mute" not in d.daemon.streams


# -- aiortc: vanish, replace, stale DELETE, 409 --------------------------------------------


async def test_vanished_publisher_stalls_and_a_new_one_replaces_it(tiny_model, loopback_ice):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?streams=cam&all=1") as ws:
        first, second, third = AiortcPublisher(), AiortcPublisher(), AiortcPublisher()
        try:
            status, old_location, _ = await first.publish(http, f"{d.http}/whip/cam?window=1&hop=0.5&stall_timeout=1")
            assert status == 201
            await until_state(ws, "cam", "live", timeout=15)
            # A second publisher while the first is live: refused, with the reason.
            status, _, body = await second.publish(http, f"{d.http}/whip/cam")
            assert status == 409 and "live WHIP session" in body, body
            # The first one stops sending (its peer connection stays up, as a frozen publisher's does).
            first.track.pause()
            paused = time.monotonic()
            message, at = await until_state(ws, "cam", "stalled", timeout=10)
            assert at - paused <= 1 + 1.0, f"stalled after {at - paused:.2f} s"
            # A new publisher replaces the stalled session.
            status, new_location, _ = await third.publish(http, f"{d.http}/whip/cam?window=1&hop=0.5")
            assert status == 201 and new_location != old_location
            replaced, _ = await until_state(ws, "cam", "stopped", timeout=10)
            assert "replaced" in replaced["detail"]
            await until_state(ws, "cam", "live", timeout=15)
            # The first publisher's late DELETE ends nothing.
            async with http.delete(f"{d.http}{old_location}") as resp:
                assert resp.status == 404
            messages = await read_messages(ws, count_for("cam", 2), 20)
            assert all(m["state"] != "stopped" for m in messages if m["type"] == "state")
            assert d.daemon.streams["cam"].state == "live"
            async with http.delete(f"{d.http}{new_location}") as resp:
                assert resp.status == 204
            assert "cam" not in d.daemon.streams
        finally:
            for publisher in (first, second, third):
                await publisher.close()


# -- bounded receive path -------------------------------------------------------------------


async def test_slow_conversion_drops_old_frames_instead_of_growing_latency(loopback_ice):
    """The publisher sends 30 fps; conversion manages ~7 fps (a loaded CPU, simulated by a slow
    converter: the only stand-in in this file). Frames reach on_frame fresh, and drops are counted."""

    def slow_convert(av_frame, short_side):
        time.sleep(0.15)
        return to_rgb(av_frame, short_side)

    latencies: list[float] = []
    session = WhipSession("slow", lambda f: latencies.append(time.time() - f.arrival), short_side=64,
                          convert=slow_convert)
    publisher = AiortcPublisher()
    try:
        answer = await session.accept(await publisher.offer())
        await publisher.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        deadline = time.monotonic() + 20
        while len(latencies) < 25 and time.monotonic() < deadline:  # ~3.5 s of frames
            await asyncio.sleep(0.1)  # polling an observable count; there is no event for "n frames"
        assert len(latencies) >= 25
    finally:
        await publisher.close()
        await session.close()
    # Unbounded, the 25th frame would wait ~25 * (0.15 - 1/30) s = 2.9 s; kept newest 2: ~2 conversions.
    assert max(latencies[5:]) < 0.6, [round(x, 2) for x in latencies]
    assert session.stats.dropped >= 30  # ~23 of every 30 frames
    assert session.state is SourceState.STOPPED


# -- headless Chromium ----------------------------------------------------------------------


async def test_chromium_page_on_an_allowed_origin_publishes_and_another_origin_is_refused(tiny_model, loopback_ice):
    from tests.support.browser import chromium, chromium_missing, page_server

    why = chromium_missing()
    if why:
        pytest.skip(f"headless Chromium cannot run: {why}")
    async with page_server() as page_port:
        allowed, foreign = f"http://127.0.0.1:{page_port}", f"http://localhost:{page_port}"
        server = ServerConfig(port=0, allowed_origins=(allowed,))
        async with running_daemon(tiny_model, server_config=server) as d, chromium() as browser, \
                websockets.connect(d.ws + "?streams=web,evil&all=1") as ws:
            page = await browser.new_page()
            await page.goto(allowed + "/")
            result = await page.evaluate("publish", f"{d.http}/whip/web?window=1&hop=0.5")
            assert result.get("status") == 201, result
            assert result["location"].startswith("/whip/web/")  # exposed to the page by CORS
            messages = await read_messages(ws, count_for("web", 2), 30)
            assert len(captions_of(messages, "web")) >= 2
            assert await page.evaluate("connection()") == "connected"
            assert d.daemon.streams["web"].source.dtls_role == "server"
            assert await page.evaluate("openSocket", d.ws) == "open"

            other = await browser.new_page()
            await other.goto(foreign + "/")
            refused = await other.evaluate("publish", f"{d.http}/whip/evil")
            assert "error" in refused and "fetch" in refused["error"].lower(), refused  # the preflight was refused
            assert "evil" not in d.daemon.streams
            assert await other.evaluate("openSocket", d.ws) == "error"  # WebSocket Origin checked
            assert "web" in d.daemon.streams and d.daemon.streams["web"].state == "live"
