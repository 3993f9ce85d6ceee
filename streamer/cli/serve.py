"""`streamer serve`: the live daemon.

Configuration flows one way: TOML file -> command-line flags (override) ->
frozen config objects -> Daemon and server, loaded once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streamer.cli.common import add_model_options, run_async
from streamer.errors import StreamerError

__all__ = ["ServeConfig", "load_config", "serve"]

log = logging.getLogger("streamer.serve")


@dataclass(frozen=True)
class ServeConfig:
    engine: Any  # EngineConfig
    server: Any  # ServerConfig
    daemon: Any  # DaemonConfig
    streams: tuple = field(default_factory=tuple)  # StreamConfig, ...
    sinks: tuple = ()  # raw ("outputs", table) / ("webhooks", [tables]) pairs; see sinks.py


def load_config(path: str | None, args: argparse.Namespace | None = None) -> ServeConfig:
    """streamer.toml sections: [model], [server], [limits], [[streams]], [outputs], [[webhooks]]; flags override."""
    from streamer.engine import EngineConfig
    from streamer.http.app import ServerConfig
    from streamer.pipeline.daemon import DaemonConfig, StreamConfig
    from streamer.pipeline.scheduler import SchedulerConfig

    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StreamerError(f"config {path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise StreamerError(f"config {path}: {exc}") from None

    def section(name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise StreamerError(f"config: [{name}] must be a table")
        return dict(value)

    def build(cls, values: dict[str, Any], where: str):
        try:
            return cls(**values)
        except TypeError as exc:
            raise StreamerError(f"config [{where}]: {exc}") from None

    model = section("model")
    if "id" in model:
        model["model"] = model.pop("id")
    limits = section("limits")
    sched_keys = {"max_batch", "max_wait", "max_pending_per_stream", "pipeline"}
    scheduler = build(SchedulerConfig, {k: v for k, v in limits.items() if k in sched_keys}, "limits")
    daemon_values = {k: v for k, v in limits.items() if k not in sched_keys and k not in ("max_body_bytes",)}
    server_values = section("server")
    if "max_body_bytes" in limits:
        server_values["max_body_bytes"] = limits["max_body_bytes"]
    engine = build(EngineConfig, model, "model")
    server = build(ServerConfig, server_values, "server")
    daemon = build(DaemonConfig, {**daemon_values, "scheduler": scheduler}, "limits")
    try:
        streams = [StreamConfig.from_dict(s) for s in data.get("streams", [])]
    except ValueError as exc:
        raise StreamerError(f"config [[streams]]: {exc}") from None

    if args is not None:  # flags win over the file
        overrides = {k: getattr(args, a) for k, a in (("model", "model"), ("device", "device"), ("dtype", "dtype"), ("max_new_tokens", "max_new_tokens"), ("threads", "threads")) if getattr(args, a, None) is not None}
        engine = replace(engine, **overrides)
        server = replace(server, **{k: getattr(args, k) for k in ("host", "port") if getattr(args, k, None) is not None})
        for item in getattr(args, "stream", None) or []:
            stream_id, sep, url = item.partition("=")
            if not sep:
                raise StreamerError(f"--stream {item!r}: expected ID=URL")
            try:
                streams.append(StreamConfig(id=stream_id, url=url, loop=True))
            except ValueError as exc:
                raise StreamerError(f"--stream {item!r}: {exc}") from None
    sinks = tuple((k, data[k]) for k in ("outputs", "webhooks") if k in data)
    try:
        from streamer.publish.sinks import outputs_from_config

        outputs_from_config(dict(sinks))  # validate now; serve() builds fresh ones
    except ValueError as exc:
        raise StreamerError(f"config {exc}") from None
    return ServeConfig(engine, server, daemon, tuple(streams), sinks)


async def serve(config: ServeConfig, *, on_ready=None, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM (or `stop`). The first signal drains:
    ingest stops, windows in flight are captioned, clients get close code 1001.
    A second signal exits at once."""
    from aiohttp import web

    from streamer.engine import Engine
    from streamer.http.app import build_app
    from streamer.pipeline.daemon import Daemon

    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine.load, config.engine)
    daemon = Daemon(engine, config.daemon)
    await daemon.start()
    from streamer.publish.sinks import close_sinks, outputs_from_config

    stop = stop or asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(130)
        stop.set()

    sinks: list = []
    runner: web.AppRunner | None = None
    try:
        sinks = outputs_from_config(dict(config.sinks))
        for sink in sinks:
            await sink.start(daemon.hub)
        runner = web.AppRunner(build_app(daemon, config.server), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.server.host, config.server.port).start()
        except OSError as exc:
            raise StreamerError(f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1] if runner.addresses else config.server.port
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
        for stream in config.streams:
            try:
                await daemon.add_stream(stream)
            except ValueError as exc:  # one bad stream in the config must not stop the others
                log.error("stream not started", extra={"stream": stream.id, "error": str(exc)})
        log.warning("serving", extra={"url": f"http://{config.server.host}:{port}", "model": engine.model_name})
        if on_ready:
            on_ready(port, daemon)
        await stop.wait()
    finally:
        log.warning("shutting down")
        await daemon.stop()
        await close_sinks(sinks)  # after the drain: the last captions reach files and webhooks
        if runner is not None:
            await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, args)
    run_async(serve(config))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="run the live captioning daemon")
    srv.add_argument("--config", help="streamer.toml")
    add_model_options(srv)
    srv.set_defaults(model=None, device=None, dtype=None, max_new_tokens=None, threads=None)
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--stream", action="append", metavar="ID=URL", help="a stream to start with (repeatable)")
    srv.set_defaults(run=run_serve)
