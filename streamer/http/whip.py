"""Routes: POST /whip/{id} (an SDP offer in, 201 + answer + Location), DELETE /whip/{id}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamer.http.common import daemon_of, error_response
from streamer.http.streams import remove_stream
from streamer.pipeline.daemon import StreamConfig, StreamExists


async def whip_offer(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    stream_id = request.match_info["id"]
    if request.content_type != "application/sdp":
        return error_response(415, "unsupported_media_type", "WHIP offers must be Content-Type: application/sdp")
    offer = await request.text()
    try:
        config = StreamConfig.from_dict({"id": stream_id, **_stream_params(request.query)})
        _, answer = await daemon.add_whip_stream(config, offer)
    except StreamExists as exc:
        return error_response(409, "exists", str(exc))
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


async def whip_delete(request: web.Request) -> web.Response:
    return await remove_stream(request)

