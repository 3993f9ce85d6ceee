"""Routes: POST /whip/{id} (an SDP offer in, 201 + answer + Location), DELETE /whip/{id}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamer.http.common import daemon_of, error_response
from streamer.http.guard import read_body, refuse, requires
from streamer.pipeline.daemon import AtCapacity, StreamConfig, StreamExists, StreamNotFound

MAX_OFFER_BYTES = 64 * 1024  # an SDP offer is a few KiB


@requires("publisher", stream="id")
async def whip_offer(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    stream_id = request.match_info["id"]
    if request.content_type != "application/sdp":
        return error_response(415, "unsupported_media_type", "WHIP offers must be Content-Type: application/sdp")
    raw = await read_body(request)
    if len(raw) > MAX_OFFER_BYTES:
        return refuse(request, 413, "too_large", f"an SDP offer is at most {MAX_OFFER_BYTES} bytes")
    try:
        offer = raw.decode("utf-8")
    except UnicodeDecodeError:
        return error_response(400, "bad_offer", "the offer is not UTF-8 text")
    try:
        config = StreamConfig.from_dict({"id": stream_id, **_stream_params(request.query)})
        _, answer = await daemon.add_whip_stream(config, offer)
    except StreamExists as exc:
        return error_response(409, "exists", str(exc))
    except AtCapacity as exc:
        return refuse(request, 429, exc.reason, str(exc))
    except ValueError as exc:
        return error_response(400, "bad_offer", str(exc))
    return web.Response(
        status=201, text=answer, content_type="application/sdp", headers={"Location": f"/whip/{stream_id}"}
    )


def _stream_params(query) -> dict[str, Any]:
    """window, hop, frames from the query string, as strings for the schema ("3s", "1.5", "6")."""
    params: dict[str, Any] = {}
    for name in ("window", "hop"):
        if name in query:
            params[name] = query[name]
    if "frames" in query:
        text = query["frames"]
        params["frames"] = int(text) if text.isdigit() and len(text) <= 3 else text
    return params


@requires("publisher", stream="id")
async def whip_delete(request: web.Request) -> web.Response:
    """End a WHIP session; pulled streams are not the publisher's to remove (404)."""
    stream_id = request.match_info["id"]
    daemon = daemon_of(request)
    rt = daemon.streams.get(stream_id)
    if rt is None or rt.config.url:
        return error_response(404, "not_found", f"no WHIP session for stream {stream_id!r}")
    try:
        await daemon.remove_stream(stream_id)
    except StreamNotFound:
        return error_response(404, "not_found", f"no WHIP session for stream {stream_id!r}")
    return web.Response(status=204)

