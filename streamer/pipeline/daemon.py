"""The live pipeline, wired: sources -> rings -> samplers -> scheduler -> engine -> hub.

One `StreamRuntime` per stream owns its source, ring buffer, sampler and the
task between them; the `Daemon` owns the streams, the shared scheduler (one
engine for all streams), the caption hub and the metrics. Adding, removing
or losing a stream never touches another stream's objects.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from streamer.ingest import FrameSource, SourceSpec, SourceState
from streamer.ops.metrics import Registry
from streamer.pipeline.ring import FrameRing
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.pipeline.scheduler import Scheduler, SchedulerConfig
from streamer.publish.hub import CaptionHub
from streamer.types import Caption, Frame, Window

__all__ = ["StreamConfig", "DaemonConfig", "Daemon", "StreamExists", "StreamNotFound"]

log = logging.getLogger(__name__)

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also safe in URLs and file names


class StreamExists(ValueError):
    pass


class StreamNotFound(KeyError):
    pass


@dataclass(frozen=True)
class StreamConfig:
    """What a user says about one stream (config file, POST /streams, CLI)."""

    id: str
    url: str = ""  # empty for WHIP streams, which are pushed to us
    window: float = 3.0
    hop: float = 1.0
    frames: int | None = None  # default: what the model takes
    realtime: bool = True  # files: play at real-time pace
    loop: bool = False  # files: start again at the end
    rtsp_transport: str = "tcp"
    stall_timeout: float = 5.0
    hwaccel: str | None = None  # hardware decoding ("cuda": NVDEC) where FFmpeg has it, else software

    def __post_init__(self) -> None:
        if not STREAM_ID.match(self.id):
            raise ValueError(f"stream id {self.id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        SamplerConfig(self.window, self.frames or 1, self.hop)  # validates the numbers

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamConfig:
        if not isinstance(data, dict):
            raise ValueError("a stream must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown stream field(s): {', '.join(sorted(unknown))}")
        if "id" not in data:
            raise ValueError("a stream needs an 'id'")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class DaemonConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ring_capacity: int = 64
    history: int = 20  # captions replayed to a new WebSocket client, per stream
    client_queue: int = 256  # messages buffered per WebSocket client before it is dropped


class CaptionEngine(Protocol):
    model_name: str
    num_frames: int
    device: Any  # torch.device (this module stays free of torch)

    @property
    def frame_short_side(self) -> int | None: ...

    def caption(self, windows, max_new_tokens: int | None = None) -> list[Caption]: ...

    def prepare(self, windows): ...  # caption = finish(prepare(...)), split for pipelining

    def finish(self, prepared, max_new_tokens: int | None = None) -> list[Caption]: ...

    def forget_stream(self, stream_id: str) -> None: ...


class StreamRuntime:
    """One stream's ingest side: source -> ring -> sampler -> scheduler."""

    def __init__(self, config: StreamConfig, daemon: Daemon) -> None:
        self.config = config
        self._daemon = daemon
        frames = config.frames or daemon.engine.num_frames
        self.sampler = WindowSampler(SamplerConfig(config.window, frames, config.hop), config.id)
        self.ring = FrameRing(daemon.config.ring_capacity)
        self.source: Any = None  # FrameSource, or a WHIP session
        self.state = SourceState.CONNECTING.value
        self.detail: str | None = None
        self.windows = 0
        self.captions = 0
        self.last_caption: Caption | None = None
        self.created = time.time()
        self._task: asyncio.Task | None = None

    def start_pipeline(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"pump:{self.config.id}")

    def on_frame(self, frame: Frame) -> None:
        self._daemon.metrics_frames.labels(stream=self.config.id).inc()
        dropped_before = self.ring.dropped
        self.ring.push(frame)
        if self.ring.dropped != dropped_before:
            self._daemon.metrics_ring_dropped.labels(stream=self.config.id).inc()

    def on_state(self, stream_id: str, state: SourceState, detail: str | None) -> None:
        self.state, self.detail = state.value, detail
        self._daemon.hub.publish_state(self.config.id, state.value, detail)
        for s in SourceState:
            self._daemon.metrics_state.labels(stream=self.config.id, state=s.value).set(1 if s is state else 0)

    async def _pump(self) -> None:
        while True:
            for frame in await self.ring.take():
                for window in self.sampler.feed(frame):
                    self.windows += 1
                    self._daemon.scheduler.submit(window)

    async def stop(self) -> None:
        if self.source is not None:
            close = getattr(self.source, "stop", None) or self.source.close
            await close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def describe(self) -> dict[str, Any]:
        last = self.last_caption
        return {
            **asdict(self.config),
            "url": _redacted(self.config.url),
            "kind": "whip" if not self.config.url else _kind(self.source),
            "state": self.state,
            "detail": self.detail,
            "frames": self.ring.pushed,
            "frames_dropped": self.ring.dropped,
            "windows": self.windows,
            "captions": self.captions,
            "last_caption": last.text if last else None,
            "last_caption_end": last.end if last else None,
        }


def _kind(source: Any) -> str | None:
    spec = getattr(source, "spec", None)
    kind = getattr(spec, "kind", None)
    return getattr(kind, "value", kind)


def _redacted(url: str) -> str:
    from streamer.ingest.source import redact_url

    return redact_url(url) if url else ""


class Daemon:
    def __init__(self, engine: CaptionEngine, config: DaemonConfig | None = None) -> None:
        self.engine = engine
        self.config = config or DaemonConfig()
        self.hub = CaptionHub(history=self.config.history, queue_size=self.config.client_queue)
        self.metrics = Registry()
        m = self.metrics
        self.metrics_frames = m.counter("streamer_frames", "Frames decoded", ("stream",))
        self.metrics_ring_dropped = m.counter("streamer_frames_dropped", "Frames overwritten in the ring buffer", ("stream",))
        self.metrics_captioned = m.counter("streamer_windows_captioned", "Windows captioned", ("stream",))
        self.metrics_dropped = m.counter("streamer_windows_dropped", "Windows dropped under overload (newest wins)", ("stream",))
        self.metrics_latency = m.histogram(
            "streamer_caption_latency_seconds", "Newest frame of a window arriving -> caption published", ("stream",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.metrics_batch = m.histogram("streamer_batch_size", "Windows per engine call", buckets=(1, 2, 4, 8, 16, 32, 64))
        self.metrics_batch_seconds = m.histogram(
            "streamer_batch_seconds", "Engine time per batch", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)
        )
        self.metrics_state = m.gauge("streamer_source_state", "1 for the state each source is in", ("stream", "state"))
        self.metrics_streams = m.gauge("streamer_streams", "Streams configured")
        self.metrics_clients_dropped = m.counter("streamer_ws_clients_dropped", "WebSocket clients closed for reading too slowly")
        pipeline = self.config.scheduler.pipeline
        if pipeline is None:
            pipeline = self.engine.device.type == "cuda"
        self.scheduler = Scheduler(
            self.engine.caption,
            self._publish,
            self.config.scheduler,
            on_batch=self._on_batch,
            on_drop=lambda w: self.metrics_dropped.labels(stream=w.stream_id).inc(),
            pipeline=(self.engine.prepare, self.engine.finish) if pipeline else None,
        )
        self.streams: dict[str, StreamRuntime] = {}
        self.ready = False
        self.draining = False
        self._lock = asyncio.Lock()  # add/remove are check-then-act

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        self.scheduler.start()
        self.ready = True

    async def stop(self) -> None:
        """Drain: stop ingest, caption the windows already waiting, close clients."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        await asyncio.gather(*(rt.stop() for rt in list(self.streams.values())), return_exceptions=True)
        await self.scheduler.close(drain=True)
        await self.hub.drain(timeout=2.0)  # clients get the last captions before the close frame

    # -- streams ----------------------------------------------------------------
    async def add_stream(self, config: StreamConfig) -> StreamRuntime:
        """Start pulling a stream. Raises StreamExists, or ValueError for a bad URL."""
        if not config.url:
            raise ValueError("a pulled stream needs a 'url' (WHIP streams are created by POST /whip/{id})")
        async with self._lock:
            if config.id in self.streams:
                raise StreamExists(f"stream {config.id!r} already exists")
            rt = StreamRuntime(config, self)
            spec = SourceSpec(
                stream_id=config.id,
                url=config.url,
                realtime=config.realtime,
                loop=config.loop,
                rtsp_transport=config.rtsp_transport,
                stall_timeout=config.stall_timeout,
                short_side=self.engine.frame_short_side,
                hwaccel=config.hwaccel,
            )  # raises SourceSpecError (a ValueError) for unknown schemes, missing files
            rt.source = FrameSource(spec, rt.on_frame, rt.on_state)
            self.streams[config.id] = rt
            self.metrics_streams.labels().set(len(self.streams))
        rt.start_pipeline()
        await rt.source.start()
        log.info("stream added", extra={"stream": config.id, "url": spec.redacted_url})
        return rt

    async def add_whip_stream(self, config: StreamConfig, offer_sdp: str) -> tuple[StreamRuntime, str]:
        """A stream pushed to us over WebRTC: answer the offer, frames flow in."""
        from streamer.ingest.whip import WhipSession

        async with self._lock:
            if config.id in self.streams:
                raise StreamExists(f"stream {config.id!r} already exists")
            rt = StreamRuntime(config, self)
            session = WhipSession(config.id, rt.on_frame, on_state=rt.on_state, short_side=self.engine.frame_short_side)
            answer = await session.accept(offer_sdp)  # raises on a bad offer: nothing registered
            rt.source = session
            self.streams[config.id] = rt
            self.metrics_streams.labels().set(len(self.streams))
        rt.start_pipeline()
        log.info("whip stream added", extra={"stream": config.id})
        return rt, answer

    async def remove_stream(self, stream_id: str) -> None:
        async with self._lock:
            rt = self.streams.pop(stream_id, None)
            if rt is None:
                raise StreamNotFound(stream_id)
            self.metrics_streams.labels().set(len(self.streams))
        await rt.stop()
        self.scheduler.forget(stream_id)
        await self.scheduler.run_exclusive(self.engine.forget_stream, stream_id)  # the cache is the engine thread's
        self.hub.publish_state(stream_id, SourceState.STOPPED.value, "removed")
        self.hub.forget_stream(stream_id)
        log.info("stream removed", extra={"stream": stream_id})

    def get(self, stream_id: str) -> StreamRuntime:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise StreamNotFound(stream_id) from None

    # -- engine output --------------------------------------------------------
    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics_batch.labels().observe(size)
        self.metrics_batch_seconds.labels().observe(seconds)

    def _publish(self, captions: list[Caption]) -> None:
        for caption in captions:
            rt = self.streams.get(caption.stream_id)
            if rt is None:  # removed while its window was in the engine
                continue
            rt.captions += 1
            rt.last_caption = caption
            self.metrics_captioned.labels(stream=caption.stream_id).inc()
            self.metrics_latency.labels(stream=caption.stream_id).observe(caption.latency)
            self.hub.publish_caption(caption)

    # -- one-off requests (HTTP JSON APIs) -----------------------------------
    async def caption_windows(self, windows: list[Window], max_new_tokens: int | None = None) -> list[Caption]:
        """Caption windows that belong to no live stream (HTTP clips, frame lists)
        on the engine thread, between live batches; their cached features are
        dropped afterwards. Stream ids must be unique to the request."""

        def run() -> list[Caption]:
            try:
                return self.engine.caption(windows, max_new_tokens)
            finally:
                for stream_id in {w.stream_id for w in windows}:
                    self.engine.forget_stream(stream_id)

        return await self.scheduler.run_exclusive(run)
