"""A daemon served in-process on port 0 (the real `serve()`), and helpers to read its WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import tempfile
import time

import aiohttp

from streamer.cli.serve import ServeConfig, serve
from streamer.engine import EngineConfig
from streamer.http.common import ServerConfig
from streamer.pipeline.daemon import DaemonConfig


def trusting_policy():
    """TEST ONLY: sources over HTTP may be files under the temp dir and servers on loopback, where
    the tests' RTSP servers and clips live. The default policy (tests/test_security.py) refuses both."""
    from streamer.security.network import NetworkPolicy
    from streamer.security.policy import SourcePolicy

    return SourcePolicy(media_dirs=(tempfile.gettempdir(),), network=NetworkPolicy(allow=("127.0.0.0/8",)))


_REPLICAS = itertools.count(1)


class Running:
    def __init__(self, port: int, daemon) -> None:
        self.port, self.daemon = port, daemon
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws"


@contextlib.asynccontextmanager
async def running_daemon(
    model, *, daemon_config: DaemonConfig | None = None, server_config: ServerConfig | None = None,
    max_new_tokens: int = 4, sinks: tuple = (), bus=None,
):
    """`serve()` in this loop, as `streamer serve` runs it; `sinks`: raw ("outputs"/"webhooks", table) pairs;
    `bus`: a BusConfig (replicas sharing captions through Redis)."""
    server = server_config or ServerConfig(port=0)
    if bus is not None and bus.replica_id is None:  # replicas in one process: hostname-pid would be shared
        bus = dataclasses.replace(bus, replica_id=f"replica-{next(_REPLICAS)}")
    if server.sources is None:
        server = dataclasses.replace(server, sources=trusting_policy())
    config = ServeConfig(
        engine=EngineConfig(model=str(model), max_new_tokens=max_new_tokens),
        server=server,
        daemon=daemon_config or DaemonConfig(),
        sinks=sinks,
        bus=bus,
    )
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result(Running(port, d)), stop=stop))
    done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong
    running = ready.result()
    running.stop, running.task = stop, task
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def add_stream(session: aiohttp.ClientSession, running: Running, **body) -> dict:
    body.setdefault("window", 1.0)
    body.setdefault("hop", 0.5)
    async with session.post(f"{running.http}/streams", json=body) as resp:
        data = await resp.json()
        assert resp.status == 201, data
        return data


async def add_to_cluster(session: aiohttp.ClientSession, a: Running, b: Running, timeout: float = 30.0,
                         **body) -> tuple[Running, Running]:
    """Add a stream through replica `a` of a two-replica cluster and wait until one of them captions
    it (either may win the lease): (its owner, the other replica)."""
    await add_stream(session, a, **body)
    deadline = time.monotonic() + timeout
    while not any(body["id"] in r.daemon.streams for r in (a, b)):
        assert time.monotonic() < deadline, "no replica took the stream"
        await asyncio.sleep(0.1)  # ownership is decided in Redis: nothing here to await
    return (a, b) if body["id"] in a.daemon.streams else (b, a)


async def read_messages(ws, until, timeout: float) -> list[dict]:
    """Read messages until `until(messages)` holds; fail after `timeout` seconds."""
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(messages):
        try:
            raw = await asyncio.wait_for(ws.recv(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            counts: dict = {}
            for m in captions_of(messages):
                counts[m["stream_id"]] = counts.get(m["stream_id"], 0) + 1
            states = [(m["stream_id"], m["state"], m["detail"]) for m in messages if m["type"] == "state"][-6:]
            raise AssertionError(f"timed out after {timeout} s; captions per stream {counts}; states {states}") from None
        messages.append(json.loads(raw))
    return messages


def captions_of(messages, stream_id=None) -> list[dict]:
    return [m for m in messages if m["type"] == "caption" and (stream_id is None or m["stream_id"] == stream_id)]


def count_for(stream_id: str, n: int):
    return lambda ms: len(captions_of(ms, stream_id)) >= n


