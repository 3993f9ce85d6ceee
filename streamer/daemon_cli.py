"""`streamer serve`, `streamer tail` and `streamer demo`: the live daemon from the command line.

Configuration flows one way: TOML file -> command-line flags (override) ->
frozen config objects -> Daemon and server, loaded once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import logging
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import StreamerError

__all__ = ["add_commands", "ServeConfig", "load_config", "serve"]

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
    from .daemon import DaemonConfig, StreamConfig
    from .engine import EngineConfig
    from .scheduler import SchedulerConfig
    from .server import ServerConfig

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
        from .sinks import outputs_from_config

        outputs_from_config(dict(sinks))  # validate now; serve() builds fresh ones
    except ValueError as exc:
        raise StreamerError(f"config {exc}") from None
    return ServeConfig(engine, server, daemon, tuple(streams), sinks)


async def serve(config: ServeConfig, *, on_ready=None, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM (or `stop`). The first signal drains:
    ingest stops, windows in flight are captioned, clients get close code 1001.
    A second signal exits at once."""
    from aiohttp import web

    from .daemon import Daemon
    from .engine import Engine
    from .server import build_app

    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine.load, config.engine)
    daemon = Daemon(engine, config.daemon)
    await daemon.start()
    from .sinks import close_sinks, outputs_from_config

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


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, args)
    _run(serve(config))
    return 0


def format_caption_line(message: dict) -> str | None:
    kind = message.get("type")
    if kind == "caption":
        conf = message.get("confidence")
        conf_text = "n/a" if conf is None else f"{conf:.2f}"
        return (
            f"[{message['stream_id']}] {message['start']:9.2f}-{message['end']:<9.2f} "
            f"{message['text']}  (confidence {conf_text}, latency {message['latency']:.2f} s)"
        )
    if kind == "state":
        detail = f": {message['detail']}" if message.get("detail") else ""
        return f"[{message['stream_id']}] state {message['state']}{detail}"
    return None


async def tail(url: str, streams: str | None, as_json: bool, limit: int | None = None, changes_only: bool = False) -> None:
    import websockets

    query = [f"streams={streams}"] if streams else []
    if not changes_only:
        query.append("all=1")  # a log shows every window, repeats included
    if query:
        url = f"{url}{'&' if '?' in url else '?'}{'&'.join(query)}"
    count = 0
    async for ws in websockets.connect(url, open_timeout=10):  # reconnects by itself
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "hello":
                    continue
                line = raw if as_json else format_caption_line(message)
                if line:
                    print(line, flush=True)
                if message.get("type") == "caption":
                    count += 1
                    if limit and count >= limit:
                        return
        except websockets.ConnectionClosed as exc:
            print(f"# disconnected ({exc.rcvd.code if exc.rcvd else 'no close frame'}); reconnecting", file=sys.stderr)
            continue


def run_tail(args: argparse.Namespace) -> int:
    try:
        _run(tail(args.url, args.streams, args.json, args.count, args.changes_only))
    except OSError as exc:
        raise StreamerError(f"{args.url}: {exc}") from None
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Start the daemon on a live synthetic scene and print captions as they arrive."""
    from .daemon import StreamConfig

    source, schedule = _demo_source(args.scene_seconds)
    config = load_config(None, argparse.Namespace(model=args.model, device=args.device, dtype=None, max_new_tokens=None,
                                                  host="127.0.0.1", port=args.port, stream=None))
    config = replace(config, streams=(StreamConfig(id="demo", url=source, window=args.window, hop=args.hop, loop=True),))

    async def main() -> None:
        stop = asyncio.Event()

        def ready(port: int, daemon) -> None:
            print(f"# streamer demo: a live synthetic scene -> captions; WebSocket ws://127.0.0.1:{port}/ws", flush=True)
            print(f"# model: {daemon.engine.model_name}; Ctrl-C to stop. What is on screen (loops):", flush=True)
            for line in schedule:
                print(f"#   {line}", flush=True)
            sub = daemon.hub.subscribe(None, only_changes=False)

            async def show() -> None:
                shown = 0
                started = time.monotonic()
                while True:
                    message = json.loads(await sub.get())
                    line = format_caption_line(message)
                    if line:
                        print(line, flush=True)
                    if message.get("type") == "caption":
                        shown += 1
                    if (args.count and shown >= args.count) or (args.seconds and time.monotonic() - started > args.seconds):
                        stop.set()
                        return

            asyncio.get_running_loop().create_task(show())

        await serve(config, on_ready=ready, stop=stop)

    _run(main())
    return 0


def _demo_source(scene_seconds: float) -> tuple[str, list[str]]:
    """A looping video of synthetic scenes (cached), and what each scene shows."""
    import os

    from .world import demo_scenes, render_video, write_video

    scenes = demo_scenes(4)
    root = Path(os.environ.get("STREAMER_CACHE") or Path.home() / ".cache" / "streamer")
    path = root / f"demo-world-{len(scenes)}x{scene_seconds:g}s.mp4"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        # square, like the training clips: a centre crop of a wide frame would cut the edges off
        write_video(str(tmp), render_video([(s, scene_seconds) for s in scenes], fps=15, height=128, width=128))
        tmp.replace(path)
    schedule = [f"{i * scene_seconds:5.0f}-{(i + 1) * scene_seconds:<3.0f} s  {s.caption}" for i, s in enumerate(scenes)]
    return str(path), schedule


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .cli import add_model_options, parse_duration

    srv = sub.add_parser("serve", help="run the live captioning daemon")
    srv.add_argument("--config", help="streamer.toml")
    add_model_options(srv)
    srv.set_defaults(model=None, device=None, dtype=None, max_new_tokens=None, threads=None)
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--stream", action="append", metavar="ID=URL", help="a stream to start with (repeatable)")
    srv.set_defaults(run=run_serve)

    tl = sub.add_parser("tail", help="print live captions from a running daemon")
    tl.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/ws")
    tl.add_argument("--streams", help="comma-separated stream ids (default: all)")
    tl.add_argument("--json", action="store_true", help="print raw JSON messages")
    tl.add_argument("--count", type=int, default=None, help="exit after this many captions")
    tl.add_argument("--changes-only", action="store_true", help="skip captions identical to the previous one")
    tl.set_defaults(run=run_tail)

    demo = sub.add_parser("demo", help="caption a built-in live test pattern end to end")
    demo.add_argument("--model", default=None)
    demo.add_argument("--device", default=None)
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--window", type=parse_duration, default=3.0)
    demo.add_argument("--hop", type=parse_duration, default=1.0)
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long (default: run until Ctrl-C)")
    demo.add_argument("--count", type=int, default=None, help="stop after this many captions")
    demo.add_argument("--scene-seconds", type=float, default=6.0, help="how long each synthetic scene lasts")
    demo.set_defaults(run=run_demo)
