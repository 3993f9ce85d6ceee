"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) publishing over WHIP from
its own WebRTC stack, with a fake camera (and optionally a fake microphone playing a WAV file), from a
page served on a given origin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from aiohttp import web

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",  # a camera, granted without asking
    "--allow-loopback-in-peer-connection",  # TEST ONLY: ICE over 127.0.0.1, as the daemon under test answers
]

# The publisher page: WHIP as a browser does it (fetch with CORS), and a WebSocket to read captions.
PAGE = """<!doctype html><meta charset="utf-8"><title>whip publisher</title><script>
let pc;
async function publish(url, token) {
  try {
    const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}});
    pc = new RTCPeerConnection({iceServers: []});
    pc.addTransceiver(media.getVideoTracks()[0], {direction: "sendonly"});
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise(done => {  // WHIP without trickle: every candidate in the offer
      if (pc.iceGatheringState === "complete") return done();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    });
    const headers = {"Content-Type": "application/sdp"};
    if (token) headers.Authorization = "Bearer " + token;
    const resp = await fetch(url, {method: "POST", headers, body: pc.localDescription.sdp});
    const body = await resp.text();
    if (resp.status !== 201) return {status: resp.status, body};
    await pc.setRemoteDescription({type: "answer", sdp: body});
    return {status: resp.status, location: resp.headers.get("Location")};
  } catch (e) {
    return {error: String(e)};
  }
}
function connection() { return pc ? pc.connectionState : "none"; }
function openSocket(url) {
  return new Promise(done => {
    const ws = new WebSocket(url);
    ws.onopen = () => { ws.close(); done("open"); };
    ws.onerror = () => done("error");
  });
}
</script>"""


def chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (deploy/apt-packages.txt: chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing"
    return None


@contextlib.asynccontextmanager
async def page_server(page: str = PAGE):
    """Serves `page` at / on 127.0.0.1, port 0; yields the port (getUserMedia needs a page origin). The
    same page under http://localhost:PORT is another origin (the daemon under test allows only one)."""
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def chromium(microphone: str | Path | None = None):
    """A headless Chromium (Playwright driving Debian's binary; never `playwright install`). With
    `microphone` (a WAV file), its fake microphone plays that once (%noloop), then silence."""
    from playwright.async_api import async_playwright

    flags = FLAGS if microphone is None else [*FLAGS, f"--use-file-for-fake-audio-capture={microphone}%noloop"]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            yield browser
        finally:
            await browser.close()


async def eventually(probe, timeout: float, what: str, interval: float = 0.1):
    """Poll `probe()` (async: a page's state, say) until it returns something truthy; fail with `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
