"""Routes: GET/POST /streams, GET/DELETE /streams/{id}."""

from __future__ import annotations

import asyncio

from aiohttp import web

from streamer.errors import VideoError
from streamer.http.common import CONFIG_KEY, daemon_of, error_response, json_body
from streamer.http.guard import principal_of, refuse, requires
from streamer.ingest.source import SourceSpecError
from streamer.pipeline.daemon import AtCapacity, StreamConfig, StreamExists, StreamNotFound
from streamer.security.policy import SourcePolicy, SourceRefused


@requires("viewer")
async def list_streams(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    principal = principal_of(request)
    return web.json_response({"streams": [rt.describe() for sid, rt in daemon.streams.items() if principal.covers(sid)]})


@requires("viewer", stream="id")
async def get_stream(request: web.Request) -> web.Response:
    try:
        rt = daemon_of(request).get(request.match_info["id"])
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {request.match_info['id']!r}")
    return web.json_response(rt.describe())


@requires("operator")
async def add_stream(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    if daemon.draining:
        return error_response(503, "draining", "the daemon is shutting down")
    body = await json_body(request)
    policy = request.app[CONFIG_KEY].sources or SourcePolicy()
    try:
        config = StreamConfig.from_dict(body)
        # a URL from the network is hostile: the policy decides what it may open (resolving a name blocks: off the loop)
        checked = await asyncio.get_running_loop().run_in_executor(None, policy.check, config.url)
        rt = await daemon.add_stream(config, checked)
    except SourceRefused as exc:
        return refuse(request, 403, "source_not_allowed", str(exc))
    except AtCapacity as exc:
        return refuse(request, 429, exc.reason, str(exc))
    except StreamExists as exc:
        return error_response(409, "exists", str(exc))
    except (SourceSpecError, VideoError, ValueError) as exc:
        return error_response(400, "bad_stream", str(exc))
    return web.json_response(rt.describe(), status=201, headers={"Location": f"/streams/{config.id}"})


@requires("operator", stream="id")
async def remove_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    try:
        await daemon_of(request).remove_stream(stream_id)
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {stream_id!r}")
    return web.Response(status=204)

