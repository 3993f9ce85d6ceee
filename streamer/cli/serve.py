"""`streamer serve`: the live daemon.

Configuration flows one way: TOML file -> command-line flags (override) ->
frozen config objects -> Daemon and server, loaded once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import tomllib
from dataclasses import dataclass, field
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
    bus: Any = None  # BusConfig ([bus]): several replicas share captions through Redis; None: alone
    watches: tuple = ()  # WatchConfig, ... ([[watches]]: pipeline/watches.py)
    watch_limits: Any = None  # WatchLimits from [limits]; None: the defaults
    qa_engines: tuple = ()  # EngineConfig per QA model ([model] qa_model, qa_models; --qa-model), the default first


def load_config(path: str | None, args: argparse.Namespace | None = None) -> ServeConfig:
    """streamer.toml sections: [model], [server], [limits], [[streams]], [outputs], [[webhooks]], [bus]; flags override.

    File and flags are merged first and validated once by `streamer.config.FileConfig`,
    so a bad value from either is one StreamerError line naming the key.
    """
    from streamer.config import ConfigError, FileConfig, StreamConfig, validate
    from streamer.engine import EngineConfig
    from streamer.http.common import ServerConfig
    from streamer.pipeline.daemon import DaemonConfig
    from streamer.pipeline.scheduler import SchedulerConfig
    from streamer.pipeline.speech import SpeechSettings

    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StreamerError(f"config {path}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise StreamerError(f"config {path}: {exc}") from None
    for name in ("model", "server", "limits"):
        if not isinstance(data.get(name, {}), dict):
            raise StreamerError(f"config: [{name}] must be a table")
    streams = data.get("streams", [])
    if not isinstance(streams, list):
        raise StreamerError("config: streams must be an array of tables: write [[streams]]")
    if args is not None:  # flags win over the file
        model = dict(data.get("model", {}))
        for key in ("model", "device", "dtype", "max_new_tokens", "threads", "backend", "qa_model"):
            if getattr(args, key, None) is not None:
                model.pop("id" if key == "model" else key, None)
                model[key] = getattr(args, key)
        server = dict(data.get("server", {}))
        server.update({k: getattr(args, k) for k in ("host", "port", "tls_cert", "tls_key")
                       if getattr(args, k, None) is not None})
        streams = list(streams)
        for item in getattr(args, "stream", None) or []:
            stream_id, sep, url = item.partition("=")
            if not sep:
                raise StreamerError(f"--stream {item!r}: expected ID=URL")
            try:
                streams.append(StreamConfig.from_dict({"id": stream_id, "url": url, "loop": True}))
            except ConfigError as exc:
                raise StreamerError(f"--stream {item!r}: {exc}") from None
        data = {**data, "model": model, "server": server}
    bus_url = os.environ.get("STREAMER_BUS_URL")
    if bus_url:  # a Kubernetes Secret holds the password, not the ConfigMap
        bus_table = data.get("bus")
        data = {**data, "bus": {**(bus_table if isinstance(bus_table, dict) else {}), "url": bus_url}}
    try:
        parsed = validate(FileConfig, {**data, "streams": streams})
    except ConfigError as exc:
        raise StreamerError(f"config{' ' + path if path else ''}: {exc}") from None
    limits = parsed.limits
    askable = parsed.model.askable_models()
    for i, stream in enumerate(parsed.streams, 1):  # a stream names a configured model; none is loaded for it
        if stream.qa_model is not None and stream.qa_model not in askable:
            raise StreamerError(f"config: [[streams]] #{i} ({stream.id}): qa_model = {stream.qa_model!r} is not "
                                f"configured: add it to [model] qa_models (or qa_model)")
    tokens = _tokens(parsed.auth, getattr(args, "token", None) or [])
    server_values = {**parsed.server.model_dump(), **_security(parsed, tokens, args)}
    for name in ("max_ws_clients", "max_ws_clients_per_address", "max_inflight_requests", "max_image_pixels"):
        server_values[name] = getattr(limits, name)
    if limits.max_body_bytes is not None:
        server_values["max_body_bytes"] = limits.max_body_bytes
    scheduler = SchedulerConfig(max_batch=limits.max_batch, max_wait=limits.max_wait,
                                max_pending_per_stream=limits.max_pending_per_stream, pipeline=limits.pipeline,
                                max_request_windows=limits.max_request_windows)
    daemon = DaemonConfig(scheduler=scheduler, ring_capacity=limits.ring_capacity, history=limits.history,
                          client_queue=limits.client_queue, max_failed_batches=limits.max_failed_batches,
                          restart_budget=limits.restart_budget, restart_window=limits.restart_window,
                          max_streams=limits.max_streams, max_whip_sessions=limits.max_whip_sessions,
                          whip_connect_timeout=limits.whip_connect_timeout,
                          speech=SpeechSettings.from_section(parsed.speech, getattr(args, "speech_model", None)),
                          qa_model=parsed.model.qa_model if parsed.model.qa_model != parsed.model.model else None)
    engine = EngineConfig(**parsed.model.engine_options())
    qa_engines = tuple(dataclasses.replace(engine, model=name) for name in parsed.model.answer_models())
    sinks = tuple((k, data[k]) for k in ("outputs", "webhooks") if k in data)
    try:
        from streamer.publish.sinks import outputs_from_config

        outputs_from_config(dict(sinks))  # validate now; serve() builds fresh ones
    except ValueError as exc:
        raise StreamerError(f"config {exc}") from None
    bus = None
    if parsed.bus is not None:
        from streamer.publish.bus import BusConfig

        bus = BusConfig.from_section(parsed.bus)
    return ServeConfig(engine, ServerConfig(**server_values), daemon, tuple(parsed.streams), sinks, bus,
                       tuple(parsed.watches), _watch_limits(parsed), qa_engines)


def _watch_limits(parsed):
    """[limits] for watches; [[watches]] checked against them and their streams' hops (others come over HTTP)."""
    from collections import Counter

    from streamer.pipeline.watches import WatchLimits

    limits = WatchLimits(parsed.limits.max_watches, parsed.limits.max_watches_per_stream)
    hops = {s.id: s.hop for s in parsed.streams}
    per_stream = Counter(w.stream for w in parsed.watches)
    ids = Counter((w.stream, w.id) for w in parsed.watches if w.id is not None)
    for i, w in enumerate(parsed.watches, 1):
        if w.stream in hops and w.every < hops[w.stream]:
            raise StreamerError(f"config: [[watches]] #{i}: every = {w.every:g} s is below stream {w.stream!r}'s "
                                f"hop of {hops[w.stream]:g} s")
        if per_stream[w.stream] > limits.max_per_stream:
            raise StreamerError(f"config: [[watches]]: {per_stream[w.stream]} watches on stream {w.stream!r}, over "
                                f"[limits] max_watches_per_stream = {limits.max_per_stream}")
        if ids[(w.stream, w.id)] > 1:
            raise StreamerError(f"config: [[watches]] #{i}: stream {w.stream!r} has two watches with id {w.id!r}")
    if len(parsed.watches) > limits.max_watches:
        raise StreamerError(f"config: {len(parsed.watches)} [[watches]], over [limits] max_watches = {limits.max_watches}")
    return limits


def _tokens(auth, flags: list[str]) -> tuple:
    """[auth] tokens, then --token flags, then STREAMER_TOKENS."""
    from streamer.security.auth import AuthError, TokenEntry, parse_token_spec, tokens_from_env

    entries = []
    try:
        for i, table in enumerate(auth.tokens):
            entries.append(TokenEntry.make(table.role, token=table.token, sha256=table.sha256, streams=table.streams))
    except AuthError as exc:
        raise StreamerError(f"config: [auth] tokens #{i + 1}: {exc}") from None
    for flag in flags:
        try:
            entries.append(parse_token_spec(flag))
        except AuthError as exc:  # the flag is a secret: never echo it
            raise StreamerError(f"--token: {exc}") from None
    try:
        entries.extend(tokens_from_env())
    except AuthError as exc:
        raise StreamerError(f"STREAMER_TOKENS: {exc}") from None
    return tuple(entries)


def _security(parsed, tokens: tuple, args) -> dict[str, Any]:
    """The ServerConfig fields about who may reach what; refuses an exposed daemon with no tokens."""
    import ipaddress

    from streamer.security.network import DEFAULT_DENY, NetworkPolicy
    from streamer.security.policy import SourcePolicy

    insecure = parsed.auth.insecure_no_auth or bool(getattr(args, "insecure_no_auth", False))
    host = parsed.server.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not tokens and not loopback and not insecure:
        raise StreamerError(
            f"refusing to serve {host} with no tokens: anyone who reaches the port could add sources and read "
            "captions. Add --token admin=SECRET (or [auth] tokens / STREAMER_TOKENS), bind 127.0.0.1, or pass "
            "--insecure-no-auth if you really mean it")
    if (parsed.server.tls_cert is None) != (parsed.server.tls_key is None):
        raise StreamerError("config: give both tls_cert and tls_key (or neither)")
    sources = parsed.sources
    try:
        network = NetworkPolicy(deny=tuple(sources.deny_networks) if sources.deny_networks is not None else DEFAULT_DENY,
                                allow=tuple(sources.allow_networks))
        policy = SourcePolicy(schemes=frozenset(sources.schemes), media_dirs=tuple(sources.media_dirs), network=network,
                              tls_verify=sources.tls_verify, tls_ca_file=sources.tls_ca_file)  # a bad CA file: here
    except ValueError as exc:
        raise StreamerError(f"config: [sources] {exc}") from None
    return {"tokens": tokens, "metrics_public": parsed.auth.metrics_public, "insecure_no_auth": insecure,
            "allowed_origins": tuple(parsed.server.allowed_origins), "allowed_hosts": tuple(parsed.server.allowed_hosts),
            "sources": policy}


async def serve(config: ServeConfig, *, on_ready=None, stop: asyncio.Event | None = None,
                on_listening=None) -> None:
    """Run the daemon until SIGINT/SIGTERM (or `stop`), as uvicorn runs an app:

    startup   bind the port first (/healthz 200, /readyz 503 "loading model"),
              load the model off the loop, start the daemon, the bus ([bus]:
              /readyz 503 "bus unreachable" until Redis answers), the sinks, the
              configured streams; then /readyz 200 and `on_ready(port, daemon)`.
    main      wait for a signal, `stop`, or the daemon giving up (a supervised
              task spent its restart budget: raises StreamerError, exit 2).
    shutdown  first signal: drain (ingest stops, waiting windows are captioned,
              clients get their last captions, then 1001). A second signal skips
              the waits: waiting windows and webhook deliveries are dropped and
              said, subtitle files are still flushed.
    """
    from aiohttp import web

    from streamer.engine import Engine
    from streamer.http.app import Service, build_app
    from streamer.http.chapters import attach as attach_chapters
    from streamer.http.chapters import owner_handler as chapters_owner_handler
    from streamer.http.guard import GuardedSite
    from streamer.ingest import SourceState
    from streamer.ops.metrics import DaemonMetrics
    from streamer.pipeline.daemon import Daemon
    from streamer.pipeline.watches import attach_watches
    from streamer.publish.chapters import ChapterSink
    from streamer.publish.sinks import close_sinks, outputs_from_config, with_chapters

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: shutting down without waiting")
            force.set()
        stop.set()

    metrics = DaemonMetrics(s.value for s in SourceState)
    service = Service(metrics=metrics)
    daemon: Daemon | None = None
    bus = None  # CaptionBus, with [bus]
    ownership = None  # cluster.Ownership, with [bus] ownership = true
    sinks: list = []
    app = build_app(service, config.server)
    chapters = ChapterSink(metrics=metrics)  # one per daemon: `chapter` events, GET /streams/{id}/chapters, {id}.chapters.vtt
    attach_chapters(app, chapters)
    # an idle kept-alive connection is closed after this (aiohttp's default is 75 s)
    keepalive = max(config.server.header_timeout, 15.0)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=keepalive)
    await runner.setup()
    proxy = relay = None
    try:
        try:
            await GuardedSite(runner, app, config.server.host, config.server.port, header_timeout=config.server.header_timeout,
                              ssl_context=_tls(config.server)).start()
        except OSError as exc:
            raise StreamerError(f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1] if runner.addresses else config.server.port
        url = f"{'https' if config.server.tls_cert else 'http'}://{config.server.host}:{port}"
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
        log.warning("listening; loading the model", extra={"url": url})
        if on_listening:
            on_listening(port)
        if not config.server.tokens:
            log.warning("no tokens configured: open to every local client (loopback only)")
        proxy = await _start_egress(config.server)
        relay = await _start_rtsp_relay(config.server, metrics)
        loaded, engine = await _until_stopped(loop.run_in_executor(None, Engine.load, config.engine), stop)
        if not loaded:
            return  # stopped while the model loaded
        loaded, qa_engines = await _until_stopped(loop.run_in_executor(None, _load_qa_engines, config.qa_engines), stop)
        if not loaded:
            return
        daemon = Daemon(engine, config.daemon, metrics=metrics, qa_engines=qa_engines)
        await daemon.start()
        if config.bus is not None:
            from streamer.publish.bus import CaptionBus

            # before the sinks and streams: every message goes through the bus from the first one
            bus = CaptionBus(config.bus, daemon.hub, metrics)
            bus.start(daemon.supervisor.spawn)
            daemon.readiness_checks.append(bus.problem)
        sinks = with_chapters(outputs_from_config(dict(config.sinks)), chapters)
        for sink in sinks:
            await sink.start(daemon.hub, daemon.supervisor.spawn)
        daemon.sinks = sinks  # what /metrics reports on (and tests inspect)
        metrics.watch_sinks(lambda: sinks)
        try:  # before the streams: a watch follows its stream from the first window
            attach_watches(daemon, config.watch_limits, config.watches)
        except ValueError as exc:  # a [[watches]] question the model cannot read
            raise StreamerError(f"config: [[watches]]: {exc}") from None
        if bus is not None and config.bus.ownership:
            ownership = _start_ownership(config, daemon, bus, metrics)
            ownership.handle("chapters", chapters_owner_handler(daemon, chapters))
            # a stream taken over goes on with the chapters its old owner published on the bus
            ownership.on_take(lambda stream_id, registered_at: chapters.take_over(stream_id, bus, since=registered_at))
            service.cluster = ownership
        else:
            for stream in config.streams:
                try:
                    await daemon.add_stream(stream)
                except ValueError as exc:  # one bad stream in the config must not stop the others
                    log.error("stream not started", extra={"stream": stream.id, "error": str(exc)})
        service.daemon, service.phase = daemon, "ready"
        log.warning("serving", extra={"url": url, "model": engine.model_name,
                                      **({"qa_models": list(qa_engines)} if qa_engines else {})})
        if on_ready:
            on_ready(port, daemon)
        waiters = [asyncio.ensure_future(daemon.fatal.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if daemon.fatal.is_set():
            raise StreamerError(f"giving up: {daemon.supervisor.failed}")
    finally:
        log.warning("shutting down")
        service.phase = "draining"
        if daemon is not None:
            drained, _ = await _until_stopped(daemon.stop(), force)
            if not drained:
                dropped = await daemon.abort()
                log.warning("shutdown cut short", extra={"windows_dropped": dropped})
        await close_sinks(sinks, force=force)  # after the drain: the last captions reach files and webhooks
        if ownership is not None:
            await ownership.close()  # after the drain (its last captions were appended under our leases): hand over
        if bus is not None:
            await bus.close()  # its tasks ended with the daemon's supervisor
        await runner.cleanup()
        if proxy is not None:
            await proxy.close()
        if relay is not None:
            await relay.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _load_qa_engines(configs: tuple) -> dict:
    """The QA models, each loaded once as the caption model is; a model that does not load stops the start."""
    from streamer.engine import Engine
    from streamer.errors import ModelLoadError

    engines = {}
    for qa in configs:
        try:
            engines[qa.model] = Engine.load(qa)
        except ModelLoadError as exc:
            raise ModelLoadError(f"qa_model: {exc}") from None
    return engines


def _start_ownership(config: ServeConfig, daemon, bus, metrics):
    """Stream ownership on the bus: the config's streams are registered in Redis (not started here)
    and each stream is captioned by the replica that holds its lease (cluster/ownership.py)."""
    from streamer.cluster import Ownership
    from streamer.http.pages import owner_handlers
    from streamer.security.policy import SourcePolicy

    ownership = Ownership(config.bus, daemon, bus, config.server.sources or SourcePolicy(), config.streams, metrics)
    for kind, handler in owner_handlers(daemon).items():
        ownership.handle(kind, handler)
    from streamer.http.ask import owner_handlers as ask_handlers

    for kind, handler in ask_handlers(daemon).items():  # questions and watches, with a JSON payload
        ownership.handle(kind, handler, payload=True)
    ownership.start(daemon.supervisor.spawn)
    daemon.readiness_checks.append(ownership.problem)
    log.warning("stream ownership on the bus", extra={"replica": ownership.replica_id,
                                                      "max_owned_streams": config.bus.max_owned_streams,
                                                      "lease_ttl": config.bus.lease_ttl})
    return ownership


def _tls(server):
    if server.tls_cert is None:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StreamerError(f"cannot load the TLS certificate/key: {exc}") from None
    return context


async def _start_egress(server):
    """The proxy every http(s) source added over HTTP goes through (it checks each destination)."""
    policy = server.sources
    if policy is None or policy.network is None or not ({"http", "https"} & policy.schemes):
        return None
    from streamer.security.egress import EgressProxy, clear_ffmpeg_bypass

    bypass = clear_ffmpeg_bypass()
    if bypass is not None:
        # FFmpeg would connect straight to the hosts it names (`*`: all), around the proxy's checks.
        log.warning("no_proxy removed from the environment: FFmpeg would bypass the egress proxy for those hosts",
                    extra={"no_proxy": bypass[:200]})
    proxy = EgressProxy(policy.network)
    proxy.on_refused = lambda reason: log.warning("egress refused", extra={"reason": reason})
    await proxy.start()
    policy.attach_proxy(proxy.url)
    return proxy


async def _start_rtsp_relay(server, metrics):
    """The relay every rtsp(s):// source added over HTTP goes through (it refuses RTSP redirects)."""
    policy = server.sources
    if policy is None or policy.network is None or not {"rtsp", "rtsps"} & policy.schemes:
        return None
    from streamer.security.rtsp_relay import RtspRelay

    def refused(kind: str, reason: str) -> None:  # the relay logs it; counted here
        metrics.refused.labels(reason=f"rtsp_{kind}").inc()

    relay = RtspRelay(policy.network, on_refused=refused)
    await relay.start()
    policy.attach_relay(relay)
    return relay


async def _until_stopped(work, stop: asyncio.Event):
    """(True, result of `work`), or (False, None) when `stop` was set first: then `work` is
    cancelled. (A model load in a thread cannot be cancelled; its result is dropped.)"""
    work = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if work.done():
        return True, work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False, None


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, args)
    run_async(serve(config))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="run the live captioning daemon")
    srv.add_argument("--config", help="streamer.toml")
    add_model_options(srv)
    srv.set_defaults(model=None, device=None, dtype=None, max_new_tokens=None, threads=None, backend=None)
    srv.add_argument("--qa-model", default=None,
                     help="the model that answers questions (asks, watches), e.g. a VQA checkpoint such as "
                     "microsoft/git-base-vqav2: hub id, HF cache entry or local directory ([model] qa_model; "
                     "default: the caption model)")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--stream", action="append", metavar="ID=URL", help="a stream to start with (repeatable)")
    srv.add_argument("--speech-model", help="Whisper checkpoint for streams with speech on ([speech] model); "
                     "default openai/whisper-small when cached or reachable, else the bundled streamer/world-whisper")
    srv.add_argument("--token", action="append", metavar="ROLE[:ID,ID]=TOKEN",
                     help="an API token: admin, operator, viewer or publisher, optionally limited to streams (repeatable)")
    srv.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback address with no tokens")
    srv.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS/WSS")
    srv.add_argument("--tls-key", help="PEM private key for --tls-cert")
    srv.set_defaults(run=run_serve)
