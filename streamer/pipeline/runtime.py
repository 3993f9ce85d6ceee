"""One live stream's ingest side: its source, ring buffer, sampler and the pump task between them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from streamer.config import StreamConfig
from streamer.ingest import SourceState
from streamer.ingest.base import Source
from streamer.ops.metrics import DaemonMetrics
from streamer.pipeline.history import WindowHistory
from streamer.pipeline.ring import FrameRing
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.publish.stabilizer import CaptionStabilizer
from streamer.security.redact import redact_url
from streamer.types import Caption, Frame, Window

__all__ = ["StreamRuntime"]


class StreamRuntime:
    """One stream's ingest side: source -> ring -> sampler -> scheduler.

    It is given what it feeds (the scheduler's `submit`, the hub's
    `publish_state`, the metrics) and a `spawn` for its supervised pump task;
    it never reaches into the daemon."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        frames: int,
        ring_capacity: int,
        submit: Callable[[Window], None],
        publish_state: Callable[[str, str, str | None], None],
        metrics: DaemonMetrics,
        spawn: Callable[[str, Callable[[], Any]], asyncio.Task],
        first_index: int = 0,
    ) -> None:
        self.config = config
        self.sampler = WindowSampler(SamplerConfig(config.window, config.frames or frames, config.hop), config.id,
                                     first_index)
        self.ring = FrameRing(ring_capacity)
        self._submit = submit
        self._publish_state = publish_state
        self._metrics = metrics
        self._spawn = spawn
        self.source: Source | None = None  # FrameSource, or a WhipSession
        self.speech: Any = None  # StreamSpeech (pipeline/speech.py) when the stream has speech on
        self.state = SourceState.CONNECTING.value
        self.detail: str | None = None
        self.windows = 0
        self.captions = 0
        self.last_caption: Caption | None = None
        # captioned windows over the last `history` media seconds, for questions (`Daemon.ask`)
        self.history = WindowHistory(config.id, config.history, config.hop)
        self.stabilizer = CaptionStabilizer.for_stream(config)  # which caption overlays show (`shown`)
        self.created = time.time()
        self._task: asyncio.Task | None = None

    def start_pipeline(self) -> None:
        self._task = self._spawn(f"pump:{self.config.id}", self._pump)

    def on_frame(self, frame: Frame) -> None:
        if not frame.is_tick:
            self._metrics.frames.labels(stream=self.config.id).inc()
        dropped_before = self.ring.dropped
        self.ring.push(frame)  # a tick too: it moves the sampler on, in order with the frames
        if self.ring.dropped != dropped_before:
            self._metrics.ring_dropped.labels(stream=self.config.id).inc()

    def on_state(self, stream_id: str, state: SourceState, detail: str | None) -> None:
        self.state, self.detail = state.value, detail
        self._publish_state(self.config.id, state.value, detail)
        self._metrics.set_state(self.config.id, state.value)

    async def _pump(self) -> None:
        visual = self.config.speech != "only"  # speech only: frames for thumbnails and liveness, no windows
        while True:
            for frame in await self.ring.take():
                if not visual:
                    continue
                for window in self.sampler.feed(frame):
                    self.windows += 1
                    self._submit(window)

    async def stop(self) -> None:
        if self.source is not None:
            await self.source.close()
        if self.speech is not None:
            await self.speech.stop()
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
            **self.config.model_dump(),
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
            "shown_caption": self.stabilizer.shown_text,
            **({"speech_status": self.speech.describe()} if self.speech is not None else {}),
        }


def _kind(source: Any) -> str | None:
    spec = getattr(source, "spec", None)
    kind = getattr(spec, "kind", None)
    return getattr(kind, "value", kind)


def _redacted(url: str) -> str:
    return redact_url(url) if url else ""
