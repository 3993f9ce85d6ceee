"""The OBS overlay and the console in a real browser (Debian's Chromium driven by
Playwright) against a real daemon fed by a file played as a live source.

Screenshots go to artifacts/ (gitignored)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import websockets

from streamer.http import app as server_module
from streamer.http.app import ServerConfig
from tests.support.browser import eventually
from tests.support.media import write_video
from tests.test_daemon import add_stream, running_daemon

CHROMIUM = Path(os.environ.get("STREAMER_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.timeout(120)


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def web_routes(monkeypatch):
    """The daemon serves the pages (add_web_routes is idempotent: harmless if build_app already calls it)."""
    from streamer.http.pages import add_web_routes

    original = server_module.build_app

    def build_app(*args, **kwargs):
        app = original(*args, **kwargs)
        add_web_routes(app)
        return app

    monkeypatch.setattr(server_module, "build_app", build_app)


@pytest.fixture
async def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (deploy/apt-packages.txt)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(scope="module")
def live_clip(tmp_path_factory) -> Path:
    """4 s at 15 fps, played as a live source with loop=true: a square sliding over blocks of
    colour that change every 8 frames, so that successive windows (and captions) differ."""
    rng = np.random.default_rng(7)
    frames = []
    for i in range(60):
        if i % 8 == 0:
            colour = rng.integers(0, 256, 3, dtype=np.uint8)
        img = np.empty((120, 160, 3), np.uint8)
        img[...] = colour
        img[40:80, i * 2 : i * 2 + 40] = 255 - colour
        frames.append(img)
    return write_video(tmp_path_factory.mktemp("web") / "clip.mp4", frames, fps=15)


# -- helpers --------------------------------------------------------------------------
class CaptionLog:
    """A websockets client on /ws?streams=...&all=1 that records every caption the daemon sends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[dict] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> CaptionLog:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await self._task

    async def _run(self) -> None:
        async with websockets.connect(self.url) as ws:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "hello":
                    self._ready.set()
                self.messages.append(message)

    def texts(self, stream_id: str) -> set[str]:
        return {m["text"] for m in self.messages if m["type"] == "caption" and m["stream_id"] == stream_id}


def watch_errors(page) -> list[str]:
    """Uncaught script errors and CSP violations on the page."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text else None)
    return errors


async def overlay_text(page) -> str:
    return await page.eval_on_selector("#caption", "e => e.textContent")


async def body_state(page) -> str:
    return await page.evaluate("document.body.dataset.state")


def alpha_at(png: bytes, xy: tuple[int, int]) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGBA").getpixel(xy)[3]


# -- overlay --------------------------------------------------------------------------
OVERLAY_QUERY = "size=42&font=DejaVu%20Serif&position=top&color=ffcc00&bg=000080&bgOpacity=0.25&lines=2&fade=6"


async def test_overlay_shows_live_captions_styled_and_recovers_after_a_daemon_restart(tiny_model, live_clip, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    errors = watch_errors(page)
    stack = contextlib.AsyncExitStack()
    async with aiohttp.ClientSession() as http:
        d = await stack.enter_async_context(running_daemon(tiny_model))
        port = d.port
        log = await stack.enter_async_context(CaptionLog(d.ws + "?streams=cam&all=1"))
        await add_stream(http, d, id="cam", url=str(live_clip), loop=True)
        resp = await page.goto(f"{d.http}/overlay/cam?{OVERLAY_QUERY}")
        assert resp.status == 200 and "default-src 'none'" in resp.headers["content-security-policy"]

        async def shows_a_sent_caption():
            text = await overlay_text(page)
            return text if text and text in log.texts("cam") else None

        shown = await eventually(shows_a_sent_caption, 30, "the overlay to show a caption the daemon sent")
        assert await body_state(page) == "connected"
        # lines=2: the caption before stays above the newest one, and no more than that
        previous = await eventually(lambda: page.eval_on_selector_all("#previous div", "ds => ds.map(d => d.textContent)"),
                                    15, "a second caption line")
        assert len(previous) == 1 and previous[0] in log.texts("cam")

        # transparent page, query-string styling applied
        style = await page.evaluate("""() => {
            const box = getComputedStyle(document.getElementById('box'));
            const r = document.getElementById('box').getBoundingClientRect();
            return {html: getComputedStyle(document.documentElement).backgroundColor,
                    body: getComputedStyle(document.body).backgroundColor,
                    color: box.color, bg: box.backgroundColor, size: box.fontSize, font: box.fontFamily,
                    maxHeight: parseFloat(box.maxHeight), lineHeight: parseFloat(box.lineHeight), top: r.top, bottom: r.bottom};
        }""")
        assert style["html"] == "rgba(0, 0, 0, 0)" and style["body"] == "rgba(0, 0, 0, 0)"
        assert style["color"] == "rgb(255, 204, 0)"
        assert style["bg"] == "rgba(0, 0, 128, 0.25)"
        assert style["size"] == "42px"
        assert style["font"].startswith('"DejaVu Serif"')
        assert style["maxHeight"] == pytest.approx(2 * style["lineHeight"] + 0.3 * 42, abs=1)  # lines=2
        assert style["bottom"] < 720 / 2  # position=top
        # what the compositor gets: transparent around the caption, the caption box drawn
        png = await page.screenshot(path=str(ARTIFACTS / "overlay.png"), omit_background=True)
        assert alpha_at(png, (5, 700)) == 0 and alpha_at(png, (640, 400)) == 0
        assert alpha_at(png, (640, 50)) > 0  # the box, centred 4vh below the top edge (28.8 px)
        # for people to look at: the same page over a grey backdrop (set through the CSSOM; CSP allows it)
        await page.evaluate("document.documentElement.style.background = '#6b7b8c'")
        await page.screenshot(path=str(ARTIFACTS / "overlay-on-grey.png"))
        await page.evaluate("document.documentElement.style.background = ''")

        # the daemon goes away: the overlay says so and shows nothing stale
        await stack.aclose()
        await eventually(lambda: _both(body_state(page), overlay_text(page), ("disconnected", "")), 10,
                         "the overlay to show disconnected and no text")
        await asyncio.sleep(1.0)  # a few reconnect attempts fail meanwhile
        assert await body_state(page) == "disconnected" and await overlay_text(page) == ""

        # a new daemon on the same port: the overlay reconnects by itself and shows its captions
        async with running_daemon(tiny_model, server_config=ServerConfig(port=port)) as d2, \
                CaptionLog(d2.ws + "?streams=cam&all=1") as log2:
            assert d2.port == port
            await add_stream(http, d2, id="cam", url=str(live_clip), loop=True)
            await eventually(lambda: _is(body_state(page), "connected"), 15, "the overlay to reconnect")

            async def shows_a_new_caption():
                text = await overlay_text(page)
                return text if text and text in log2.texts("cam") else None

            again = await eventually(shows_a_new_caption, 30, "the overlay to show a caption from the new daemon")
            await page.screenshot(path=str(ARTIFACTS / "overlay-after-restart.png"))
    assert shown and again
    assert not errors, errors


async def _both(a, b, expected):
    return (await a, await b) == expected


async def _is(a, expected):
    return await a == expected


async def test_overlay_fades_out_and_neutralises_injection(tiny_model, live_clip, browser):
    page = await browser.new_page(viewport={"width": 960, "height": 540})
    errors = watch_errors(page)
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            CaptionLog(d.ws + "?streams=cam&all=1") as log:
        await add_stream(http, d, id="cam", url=str(live_clip), loop=True)
        await page.goto(f"{d.http}/overlay/cam?fade=1&lines=1")

        async def shows_a_sent_caption():
            text = await overlay_text(page)
            return text if text and text in log.texts("cam") else None

        await eventually(shows_a_sent_caption, 30, "a caption on the overlay")
        async with http.delete(f"{d.http}/streams/cam") as resp:
            assert resp.status == 204
        removed = time.monotonic()
        await eventually(lambda: _is(overlay_text(page), ""), 3, "the caption to fade out", interval=0.05)
        faded_after = time.monotonic() - removed
        assert faded_after < 2.0, faded_after
        assert await body_state(page) == "connected"  # faded, not disconnected
        assert await page.evaluate("document.body.dataset.streamState") == "stopped"

        # injection through the query string: rejected values fall back to the defaults
        evil = await browser.new_page(viewport={"width": 960, "height": 540})
        evil_errors = watch_errors(evil)
        requested: list[str] = []
        evil.on("request", lambda r: requested.append(r.url))
        query = ("color=red;background:url(x)&bg=%3Cscript%3Ewindow.pwned=1%3C/script%3E"
                 "&font=%3Cimg%20src=x%20onerror=window.pwned=1%3E&size=42px;color:red"
                 "&position=top;background:red&bgOpacity=1);background:url(y)&lines=%3Cb%3E&fade=x")
        await evil.goto(f"{d.http}/overlay/cam?{query}")
        await eventually(lambda: _is(body_state(evil), "connected"), 10, "the overlay to connect")
        got = await evil.evaluate("""() => {
            const box = getComputedStyle(document.getElementById('box'));
            return {pwned: window.pwned === undefined ? null : window.pwned,
                    color: box.color, bg: box.backgroundColor, bgImage: box.backgroundImage,
                    bodyBg: getComputedStyle(document.body).backgroundColor,
                    bodyBgImage: getComputedStyle(document.body).backgroundImage,
                    size: box.fontSize, font: box.fontFamily, top: document.body.classList.contains('top'),
                    scripts: document.scripts.length, imgs: document.images.length,
                    inline: document.body.getAttribute('style')};
        }""")
        assert got["pwned"] is None
        assert got["color"] == "rgb(255, 255, 255)" and got["bg"] == "rgba(0, 0, 0, 0.5)"
        assert got["bgImage"] == "none" and got["bodyBgImage"] == "none" and got["bodyBg"] == "rgba(0, 0, 0, 0)"
        assert got["size"] == "42px" and "<" not in got["font"] and not got["top"]
        assert got["scripts"] == 1 and got["imgs"] == 0
        assert "url(" not in (got["inline"] or "") and "<" not in (got["inline"] or "")
        assert not [u for u in requested if u.endswith(("/x", "/y"))], requested
        # markup in the path never reaches a page
        async with http.get(f"{d.http}/overlay/%3Cscript%3Ealert(1)%3C%2Fscript%3E") as resp:
            assert resp.status == 400 and resp.content_type == "application/json"
    assert not errors and not evil_errors, errors + evil_errors


# -- console --------------------------------------------------------------------------
async def test_console_lists_streams_with_thumbnails_and_captions_and_adds_and_removes(tiny_model, live_clip, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_errors(page)
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, CaptionLog(d.ws + "?all=1") as log:
        await add_stream(http, d, id="cam", url=str(live_clip), loop=True)
        # the thumbnail route on its own
        async with http.get(f"{d.http}/streams/nope/thumbnail.jpg") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        await eventually(lambda: _frames(http, d, "cam"), 15, "frames from the source")
        async with http.get(f"{d.http}/streams/cam/thumbnail.jpg") as resp:
            assert resp.status == 200 and resp.content_type == "image/jpeg"
            assert resp.headers["Cache-Control"] == "no-store"
            jpeg = await resp.read()
        assert jpeg[:2] == b"\xff\xd8"

        async with http.get(f"{d.http}/web/console.js") as resp:
            assert resp.status == 200 and "javascript" in resp.content_type
        resp = await page.goto(f"{d.http}/")
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        card = page.locator('.stream[data-id="cam"]')
        await card.wait_for(timeout=10_000)
        await eventually(lambda: _eq(_text(card.locator(".state")), "live"), 15, "state live")
        await eventually(lambda: card.locator(".thumb").evaluate("img => img.complete && img.naturalWidth > 0"), 10,
                         "the thumbnail to load")

        async def current_is_sent():
            text = await card.locator(".current").text_content()
            return text if text and text in log.texts("cam") else None

        await eventually(current_is_sent, 30, "the current caption")
        await eventually(lambda: _at_least(card.locator(".timeline li").count(), 2), 30, "two timeline entries")
        timeline = await card.locator(".timeline li .text").all_text_contents()
        assert set(timeline) <= log.texts("cam")
        assert int(await card.locator(".frames").text_content()) > 0
        assert (await card.locator(".latency-last").text_content()).endswith(" s")

        # add a second stream through the form
        await page.fill("#add-id", "cam2")
        await page.fill("#add-url", str(live_clip))
        await page.fill("#add-window", "1")
        await page.fill("#add-hop", "0.5")
        await page.check("#add-loop")
        await page.click("#add-submit")
        card2 = page.locator('.stream[data-id="cam2"]')
        await card2.wait_for(timeout=10_000)
        listed = await _listed(http, d)
        assert "cam2" in listed and listed["cam2"]["loop"] is True and listed["cam2"]["window"] == 1.0
        assert await page.locator("#error").is_hidden()
        await eventually(lambda: _eq(_text(card2.locator(".state")), "live"), 15, "cam2 live")
        await eventually(lambda: card2.locator(".thumb").evaluate("img => img.complete && img.naturalWidth > 0"), 10,
                         "the second thumbnail")
        await eventually(lambda: _at_least(card2.locator(".timeline li").count(), 1), 30, "cam2 captions")

        # the API's errors are shown: the same id again
        await page.fill("#add-id", "cam2")
        await page.fill("#add-url", str(live_clip))
        await page.click("#add-submit")
        error = page.locator("#error")
        await error.wait_for(state="visible", timeout=5_000)
        assert "already exists" in await error.text_content() and "409" in await error.text_content()
        await page.fill("#add-id", "")
        await page.fill("#add-url", "")
        await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

        # remove it with its button (two clicks: arm, confirm)
        remove = card2.locator(".remove")
        await remove.click()
        assert await remove.text_content() == "Confirm remove"
        await remove.click()
        await card2.wait_for(state="detached", timeout=10_000)
        assert "cam2" not in await _listed(http, d)
        assert await card.is_visible()
    assert not errors, errors


async def _frames(http, d, stream_id):
    async with http.get(f"{d.http}/streams/{stream_id}") as resp:
        return (await resp.json())["frames"] > 0


async def _listed(http, d) -> dict:
    async with http.get(f"{d.http}/streams") as resp:
        return {s["id"]: s for s in (await resp.json())["streams"]}


async def _text(locator):
    return await locator.text_content()


async def _eq(a, expected):
    return await a == expected


async def _at_least(a, n):
    return await a >= n
