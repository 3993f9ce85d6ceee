"""Routes: GET/POST /streams, GET/DELETE /streams/{id}.

With stream ownership on the bus (cluster/ownership.py) the stream set is the cluster's: POST
registers a stream in Redis (after the same checks as alone; its owner checks the source again),
DELETE unregisters it, and GET lists every replica's streams with their owners."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from streamer.cluster.registry import RegistryFull
from streamer.errors import VideoError
from streamer.http.common import CONFIG_KEY, cluster_of, daemon_of, error_response, json_body
from streamer.http.guard import principal_of, refuse, requires
from streamer.ingest.source import SourceSpecError
from streamer.pipeline.daemon import AtCapacity, StreamConfig, StreamExists, StreamNotFound
from streamer.security.policy import SourcePolicy, SourceRefused


@requires("viewer")
async def list_streams(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    principal = principal_of(request)
    cluster = cluster_of(request)
    if cluster is not None:
        try:
            described = await cluster.describe_all()
        except _BUS_DOWN as exc:
            return _bus_down(exc)
        return web.json_response({"streams": [d for d in described if principal.covers(str(d.get("id")))]})
    return web.json_response({"streams": [rt.describe() for sid, rt in daemon.streams.items() if principal.covers(sid)]})


@requires("viewer", stream="id")
async def get_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    daemon, cluster = daemon_of(request), cluster_of(request)
    if cluster is not None:
        try:
            described = await cluster.describe(stream_id)
        except _BUS_DOWN as exc:
            return _bus_down(exc)
        if described is None:
            return error_response(404, "not_found", f"no stream {stream_id!r}")
        return web.json_response(described)
    try:
        rt = daemon.get(stream_id)
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {stream_id!r}")
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
        daemon.check_qa_model(config)  # a model the operator configured: nothing sent here loads one
        # a URL from the network is hostile: the policy decides what it may open (resolving a name blocks: off the loop)
        checked = await asyncio.get_running_loop().run_in_executor(None, policy.check, config.url)
        cluster = cluster_of(request)
        if cluster is not None:
            if not config.url:
                raise ValueError("a pulled stream needs a 'url' (WHIP streams are created by POST /whip/{id})")
            # What is registered is the request's config: its owner checks the source again.
            await cluster.add_stream(config)
            described = await cluster.describe(config.id)
            return web.json_response(described, status=201, headers={"Location": f"/streams/{config.id}"})
        rt = await daemon.add_stream(config, checked)
    except _BUS_DOWN as exc:
        return _bus_down(exc)
    except SourceRefused as exc:
        return refuse(request, 403, "source_not_allowed", str(exc))
    except AtCapacity as exc:
        return refuse(request, 429, exc.reason, str(exc))
    except RegistryFull as exc:
        return refuse(request, 429, "max_streams", str(exc))
    except StreamExists as exc:
        return error_response(409, "exists", str(exc))
    except (SourceSpecError, VideoError, ValueError) as exc:
        return error_response(400, "bad_stream", str(exc))
    return web.json_response(rt.describe(), status=201, headers={"Location": f"/streams/{config.id}"})


@requires("operator", stream="id")
async def remove_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    daemon, cluster = daemon_of(request), cluster_of(request)
    if cluster is not None and not (stream_id in daemon.streams and not daemon.streams[stream_id].config.url):
        try:  # its owner stops it (a WHIP stream of this replica is ended here, below)
            removed = await cluster.remove_stream(stream_id)
        except _BUS_DOWN as exc:
            return _bus_down(exc)
        if not removed:
            return error_response(404, "not_found", f"no stream {stream_id!r}")
        return web.Response(status=204)
    try:
        await daemon.remove_stream(stream_id)
    except StreamNotFound:
        return error_response(404, "not_found", f"no stream {stream_id!r}")
    return web.Response(status=204)


_BUS_DOWN = (RedisError, OSError)  # OSError: refused sockets, and the time limits of our Redis calls


def _bus_down(exc: BaseException) -> web.Response:
    return error_response(503, "bus_unreachable", f"the stream set lives in Redis, which does not answer now "
                                                  f"({type(exc).__name__})")

