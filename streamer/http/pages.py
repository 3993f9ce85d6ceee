"""Browser pages served by the daemon: an OBS overlay and an operator console.

Plain HTML/JS/CSS from `static/`, no build step. Routes added by `add_web_routes`:

  GET /                            console: every stream, its state, thumbnail, captions, add/remove
  GET /overlay/{stream}            OBS Browser Source page for one stream (styling in the query string)
  GET /streams/{id}/thumbnail.jpg  JPEG of the stream's newest frame (no-store)
  GET /web/...                     the pages' scripts and style sheets

The pages only use the daemon's public API (GET/POST/DELETE /streams and /ws),
so they show nothing a WebSocket or HTTP client could not see already.
Everything from the query string or the API is put into the page as text or
through the CSSOM after strict validation in the browser, never as markup;
a Content-Security-Policy forbids inline and foreign scripts on top of that.
"""

from __future__ import annotations

import asyncio
import io
import json
import weakref
from pathlib import Path

from aiohttp import web

from streamer.http.common import cluster_of, daemon_of
from streamer.http.guard import public, requires
from streamer.pipeline.daemon import STREAM_ID, StreamNotFound, StreamRuntime
from streamer.types import Frame

__all__ = ["STATIC_DIR", "add_web_routes"]

STATIC_DIR = Path(__file__).parent / "static"

# Scripts and styles from this origin only; no inline script, no plug-ins, no framing rules needed
# (OBS embeds the page as a top-level document). Styles set through the CSSOM are not "inline".
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'"
)

THUMBNAIL_QUALITY = 80

# StreamRuntime -> (frame, JPEG bytes): a frame is encoded once however many consoles ask;
# the entry goes when its stream does.
_THUMBS_KEY: web.AppKey[weakref.WeakKeyDictionary] = web.AppKey("thumbnails", weakref.WeakKeyDictionary)


def add_web_routes(app: web.Application) -> None:
    """Add the console, the overlay, thumbnails and their static files to `app` (once; calling
    it again is a no-op)."""
    if _THUMBS_KEY in app:
        return
    app[_THUMBS_KEY] = weakref.WeakKeyDictionary()
    app.add_routes(
        [
            web.get("/", console_page),
            web.get("/overlay/{stream}", overlay_page),
            web.get("/streams/{id}/thumbnail.jpg", thumbnail),
        ]
    )
    app.router.add_static("/web/", STATIC_DIR, show_index=False, follow_symlinks=False)


def _page(name: str) -> web.FileResponse:
    return web.FileResponse(
        STATIC_DIR / name,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@public
async def console_page(request: web.Request) -> web.StreamResponse:
    return _page("console.html")


@public
async def overlay_page(request: web.Request) -> web.StreamResponse:
    stream_id = request.match_info["stream"]
    if not STREAM_ID.match(stream_id):
        return _json_error(400, "bad_stream", "stream id: use 1-64 letters, digits, '.', '_' or '-'")
    # The stream need not exist yet: an overlay set up in OBS before its camera waits for it.
    return _page("overlay.html")


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def encode_jpeg(frame: Frame, quality: int = THUMBNAIL_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame.image, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@requires("viewer", stream="id")
async def thumbnail(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    try:
        rt: StreamRuntime = daemon_of(request).get(stream_id)
    except StreamNotFound:
        cluster = cluster_of(request)
        if cluster is None:
            return _json_error(404, "not_found", f"no stream {stream_id!r}")
        from streamer.cluster import RequestFailed

        try:  # captioned by another replica: its owner has the frames
            data = await cluster.ask_owner(stream_id, "thumbnail")
        except RequestFailed as exc:
            return _json_error(exc.status, exc.code, exc.message)
        return web.Response(body=data, content_type="image/jpeg", headers=headers)
    frame = rt.ring.latest
    if frame is None:
        return _json_error(404, "no_frame", f"stream {stream_id!r} has no frame yet")
    data = await _jpeg_of(request.app[_THUMBS_KEY], rt, frame)
    return web.Response(body=data, content_type="image/jpeg", headers={**headers, "X-Frame-Seq": str(frame.seq)})


async def _jpeg_of(cache: weakref.WeakKeyDictionary, rt: StreamRuntime, frame) -> bytes:
    """The stream's newest frame as JPEG, encoded once per frame (off the loop)."""
    cached = cache.get(rt)
    if cached is not None and cached[0] is frame:
        return cached[1]
    data = await asyncio.get_running_loop().run_in_executor(None, encode_jpeg, frame)
    cache[rt] = (frame, data)
    return data


def owner_handlers(daemon) -> dict:
    """What a stream's owner answers for other replicas (cluster/requests.py): its thumbnail and
    its live details."""
    from streamer.cluster import RequestFailed

    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def runtime(stream_id: str) -> StreamRuntime:
        try:
            return daemon.get(stream_id)
        except StreamNotFound:
            raise RequestFailed(404, "not_found", f"no stream {stream_id!r}") from None

    async def thumbnail_of(stream_id: str) -> bytes:
        rt = runtime(stream_id)
        frame = rt.ring.latest
        if frame is None:
            raise RequestFailed(404, "no_frame", f"stream {stream_id!r} has no frame yet")
        return await _jpeg_of(cache, rt, frame)

    async def describe(stream_id: str) -> bytes:
        return json.dumps(runtime(stream_id).describe()).encode()

    return {"thumbnail": thumbnail_of, "describe": describe}
