"""Routes: POST /whip/{id} (an SDP offer in, 201 + answer + Location /whip/{id}/{session}),
DELETE /whip/{id}/{session} (end that session), DELETE /whip/{id} (whichever session it has, for
publishers that ignore Location). Only WHIP streams: a pulled stream is 404 here."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from streamer.cluster import NotOwner
from streamer.http.common import cluster_of, daemon_of, error_response
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
    cluster = cluster_of(request)
    try:
        config = StreamConfig.from_dict({"id": stream_id, **_stream_params(request.query)})
        if cluster is not None:
            # The publisher's replica owns a WHIP stream (no failover): not one owned elsewhere.
            await cluster.claim_whip(stream_id)
        rt, answer = await daemon.add_whip_stream(config, offer)
    except NotOwner as exc:
        return error_response(409, "exists", str(exc))
    except (RedisError, OSError) as exc:
        return error_response(503, "bus_unreachable", f"the stream set lives in Redis, which does not answer now "
                                                      f"({type(exc).__name__})")
    except StreamExists as exc:  # a live or connecting session, or a pulled stream of that id
        return error_response(409, "exists", str(exc))
    except AtCapacity as exc:
        return refuse(request, 429, exc.reason, str(exc))
    except ValueError as exc:
        return error_response(400, "bad_offer", str(exc))
    # The session's own URL: a DELETE from a publisher that was replaced cannot end its successor.
    return web.Response(
        status=201, text=answer, content_type="application/sdp",
        headers={"Location": f"/whip/{stream_id}/{rt.source.id}"},
    )


def _stream_params(query) -> dict[str, Any]:
    """window, hop, stall_timeout, frames, speech from the query string, as strings for the schema ("3s",
    "1.5", "6", "on"): the publisher's own microphone may be transcribed when it asks (`?speech=on`)."""
    params: dict[str, Any] = {}
    for name in ("window", "hop", "stall_timeout", "speech"):
        if name in query:
            params[name] = query[name]
    if "frames" in query:
        text = query["frames"]
        params["frames"] = int(text) if text.isdigit() and len(text) <= 3 else text
    return params


@requires("publisher", stream="id")
async def whip_delete(request: web.Request) -> web.Response:
    """End a WHIP session: `/whip/{id}/{session}` only while that session is the stream's;
    `/whip/{id}` whichever it is. Pulled streams are not the publisher's to remove (404)."""
    stream_id = request.match_info["id"]
    session_id = request.match_info.get("session")
    try:
        await daemon_of(request).remove_whip_session(stream_id, session_id)
    except StreamNotFound:
        what = f"session {session_id!r} of stream {stream_id!r}" if session_id else f"WHIP session for stream {stream_id!r}"
        return error_response(404, "not_found", f"no {what} (ended, replaced, or not a WHIP stream)")
    return web.Response(status=204)
