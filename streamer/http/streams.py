"""Routes: GET/POST /streams, GET/DELETE /streams/{id}."""

from __future__ import annotations

from aiohttp import web

from streamer.errors import VideoError
from streamer.http.common import daemon_of, error_response, json_body
from streamer.ingest.source import SourceSpecError
from streamer.pipeline.daemon import StreamConfig, StreamExists, StreamNotFound


async def list_streams(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    return web.json_response({"streams": [rt.describe() for rt in daemon.streams.values()]})


async def get_stream(request: web.Request) -> web.Response:
    try:
        rt = daemon_of(request).get(request.match_info["id"])
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {request.match_info['id']!r}")
    return web.json_response(rt.describe())


async def add_stream(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    if daemon.draining:
        return error_response(503, "draining", "the daemon is shutting down")
    body = await json_body(request)
    try:
        config = StreamConfig.from_dict(body)
        rt = await daemon.add_stream(config)
    except StreamExists as exc:
        return error_response(409, "exists", str(exc))
    except (SourceSpecError, VideoError, ValueError) as exc:
        return error_response(400, "bad_stream", str(exc))
    return web.json_response(rt.describe(), status=201, headers={"Location": f"/streams/{config.id}"})


async def remove_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    try:
        await daemon_of(request).remove_stream(stream_id)
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {stream_id!r}")
    return web.Response(status=204)

