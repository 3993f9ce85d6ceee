"""The live pipeline, wired: sources -> rings -> samplers -> scheduler -> engine -> hub.

One `StreamRuntime` per stream (runtime.py) owns its source, ring buffer,
sampler and the task between them; the `Daemon` owns the streams, the shared scheduler (one
engine for all streams), the caption hub and the metrics. Adding, removing
or losing a stream never touches another stream's objects.

Questions (`ask`) are about a stream's newest captioned window or one of its
history (`StreamConfig.history`, pipeline/history.py): they go through the
scheduler like one-off requests, and the engine answers them from the image
keys/values it kept when it captioned the window (engine/cache.py), so a
question costs only its own tokens. A window that leaves the history has its
keys/values freed in the next plan.

A QA model (`--qa-model`, [model] qa_model / qa_models, a stream's `qa_model`) is a second
engine beside the caption one, on the same scheduler and engine thread, with its own
feature and image-token caches: the first question about a live window runs its vision
tower and image prefill on the window's frames (the history keeps them), later ones reuse
them. Frees go to every engine. A stream may only name a model the operator configured:
nothing over HTTP makes the daemon load a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamer.config import STREAM_ID, StreamConfig
from streamer.ingest import FrameSource, SourceSpec, SourceState
from streamer.ops.metrics import DaemonMetrics
from streamer.ops.supervisor import Supervisor
from streamer.pipeline.history import OutOfHistory
from streamer.pipeline.runtime import StreamRuntime
from streamer.pipeline.sampler import SlotGate
from streamer.pipeline.scheduler import EngineFailed, Scheduler, SchedulerBusy, SchedulerConfig
from streamer.pipeline.speech import SpeechService, SpeechSettings, speech_only_gate
from streamer.publish.hub import CaptionHub
from streamer.security.policy import CheckedSource
from streamer.types import Answer, Caption, StreamResume, Window

__all__ = ["STREAM_ID", "AtCapacity", "Daemon", "DaemonConfig", "OutOfHistory", "StreamConfig", "StreamExists",
           "StreamNotFound", "StreamRuntime"]

log = logging.getLogger(__name__)


class StreamExists(ValueError):
    pass


class StreamNotFound(KeyError):
    pass


class AtCapacity(ValueError):
    """A count limit was reached (max_streams, max_whip_sessions): HTTP 429."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DaemonConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ring_capacity: int = 64
    history: int = 20  # captions replayed to a new WebSocket client, per stream
    client_queue: int = 256  # messages buffered per WebSocket client before it is dropped
    max_failed_batches: int = 3  # engine batches failing in a row before the daemon says it is not ready
    restart_budget: int = 5  # restarts of a died task allowed per restart_window; past it the daemon is unhealthy
    restart_window: float = 60.0
    max_streams: int = 64
    max_whip_sessions: int = 16
    whip_connect_timeout: float = 15.0  # a WHIP session that has not connected by then is removed
    speech: SpeechSettings = field(default_factory=SpeechSettings)  # for streams with speech on ([speech])
    qa_model: str | None = None  # the QA model (a key of Daemon's qa_engines) that answers by default; None: the caption model


class CaptionEngine(Protocol):
    model_name: str
    num_frames: int
    device: Any  # torch.device (this module stays free of torch)
    stats: Any  # EngineStats, read by the metrics at scrape time

    @property
    def frame_short_side(self) -> int | None: ...

    def caption(self, windows, max_new_tokens: int | None = None, *, keep_kv: int = 0) -> list[Caption]: ...

    def prepare(self, windows, *, keep_kv: int = 0): ...  # caption = finish(prepare(...)), split for pipelining

    def finish(self, prepared, max_new_tokens: int | None = None) -> list[Caption]: ...

    def answer(self, items, max_new_tokens: int | None = None) -> list[Answer]: ...

    def check_question(self, question: str, max_new_tokens: int | None = None) -> str: ...

    def forget_stream(self, stream_id: str) -> None: ...

    def forget_window(self, stream_id: str, index: int) -> None: ...


class Daemon:
    def __init__(
        self, engine: CaptionEngine, config: DaemonConfig | None = None, *, metrics: DaemonMetrics | None = None,
        qa_engines: dict[str, CaptionEngine] | None = None,
    ) -> None:
        """`metrics`: made before the model loads when the port is bound first (serve), so that
        /metrics answers during the load; a new one otherwise. `qa_engines`: the QA models by the
        name streams and `config.qa_model` call them (each loaded once)."""
        self.engine = engine
        self.config = config or DaemonConfig()
        self.qa_engines = dict(qa_engines or {})
        if self.config.qa_model is not None and self._qa_key(self.config.qa_model) not in (None, *self.qa_engines):
            raise ValueError(f"qa_model {self.config.qa_model!r} is not loaded")
        self.hub = CaptionHub(history=self.config.history, queue_size=self.config.client_queue)
        self.metrics = metrics or DaemonMetrics(s.value for s in SourceState)
        self.metrics.watch(
            lambda: self.engine.stats,
            lambda: {sid: rt.source.stats for sid, rt in list(self.streams.items()) if rt.source is not None},
        )
        self.metrics.watch_qa_engines(lambda: {name: qa.stats for name, qa in self.qa_engines.items()})
        self.supervisor = Supervisor(
            self.config.restart_budget, self.config.restart_window, on_fatal=self._on_fatal,
            on_restart=lambda name: self.metrics.restarts.labels(task=name.partition(":")[0]).inc(),
        )
        self.fatal = asyncio.Event()  # set once the restart budget is spent: serve() exits non-zero
        self.batches_failed_in_row = 0
        self.last_batch_error: str | None = None
        pipeline = self.config.scheduler.pipeline
        if pipeline is None:
            pipeline = self.engine.device.type == "cuda"
        self.scheduler = Scheduler(
            self.engine.caption,
            self._publish,
            self.config.scheduler,
            on_batch=self._on_batch,
            on_drop=lambda w: self.metrics.windows_dropped.labels(stream=w.stream_id).inc(),
            on_failure=self._on_batch_failed,
            pipeline=(self.engine.prepare, self.engine.finish) if pipeline else None,
            forget_fn=self._forget_stream,
            answer_fn=self.engine.answer,
            forget_window_fn=self._forget_window,
            keep_live_kv=True,  # live windows' image keys/values stay for questions about them
            on_live=self._remember,
            answer_fns={name: qa.answer for name, qa in self.qa_engines.items()},
        )
        self.streams: dict[str, StreamRuntime] = {}
        self.ready = False
        self.draining = False
        self.readiness_checks: list[Callable[[], str | None]] = []  # more reasons not to be ready (the bus)
        self.sinks: list[Any] = []  # the hub's consumers serve() started (subtitle files, webhooks, chapters)
        self._lock = asyncio.Lock()  # add/remove are check-then-act
        # Speech (streams with speech on): one worker thread, its model loaded with the first such stream.
        self.speech = SpeechService(self.config.speech, publish=self.hub.publish_event, metrics=self.metrics,
                                    spawn=self.supervisor.spawn)

    # -- models -----------------------------------------------------------------
    @property
    def engines(self) -> list[CaptionEngine]:
        """The caption engine, then the QA engines."""
        return [self.engine, *self.qa_engines.values()]

    @property
    def models(self) -> list[str]:
        """What a stream's `qa_model` may name: the caption model and the QA models loaded."""
        return [self.engine.model_name, *(m for m in self.qa_engines if m != self.engine.model_name)]

    @property
    def frame_short_side(self) -> int | None:
        """The short side sources downscale frames to: the largest any model reads (None: full size)."""
        sides = [e.frame_short_side for e in self.engines]
        return None if any(side is None for side in sides) else max(s for s in sides if s is not None)

    def _qa_key(self, model: str | None) -> str | None:
        """The `answer_fns` key of the model named `model`; None for the caption model (or no model)."""
        if model is None or model == self.engine.model_name:
            return None
        return model

    def qa_model_of(self, stream_id: str | None = None) -> str | None:
        """The QA model (a qa_engines key) that answers about `stream_id` (None: a one-off window),
        or None when the caption model does. Raises StreamNotFound."""
        wanted = self.get(stream_id).config.qa_model if stream_id is not None else None
        return self._qa_key(wanted or self.config.qa_model)

    def answering_engine(self, stream_id: str | None = None) -> CaptionEngine:
        key = self.qa_model_of(stream_id)
        return self.engine if key is None else self.qa_engines[key]

    def check_question(self, question: str, max_new_tokens: int | None = None, stream_id: str | None = None) -> str:
        """The question as the model that answers about `stream_id` reads it; ValueError when that model
        cannot (engine.check_question). A stream not running here: the default answering model's check."""
        key = self.qa_model_of(stream_id if stream_id in self.streams else None)
        return (self.engine if key is None else self.qa_engines[key]).check_question(question, max_new_tokens)

    def check_qa_model(self, config: StreamConfig) -> None:
        """A stream's qa_model must be a model loaded here: nothing a caller sends loads one."""
        if config.qa_model is not None and config.qa_model not in self.models:
            raise ValueError(f"qa_model {config.qa_model[:80]!r} is not one of this daemon's models "
                             f"({', '.join(map(repr, self.models))}); the operator configures them "
                             f"([model] qa_model, qa_models)")

    def _forget_stream(self, stream_id: str) -> None:
        """Engine thread: a stream is gone (or a one-off request done): every engine drops its caches of it."""
        for engine in self.engines:
            engine.forget_stream(stream_id)

    def _forget_window(self, stream_id: str, index: int) -> None:
        for engine in self.engines:
            engine.forget_window(stream_id, index)

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        self.scheduler.start(self.supervisor.spawn)
        self.ready = True

    async def stop(self) -> None:
        """Drain: stop ingest, caption the windows already waiting, close clients."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        await asyncio.gather(*(rt.stop() for rt in list(self.streams.values())), return_exceptions=True)
        await self.scheduler.close(drain=True)
        await self.speech.close(drain=True)
        await self.hub.drain(timeout=2.0)  # clients get the last captions before the close frame
        await self.supervisor.close()

    async def abort(self) -> int:
        """Stop without waiting (a second signal, or a drain cut short): windows still waiting are
        dropped and counted, clients closed at once. Returns the windows dropped."""
        self.draining = True
        self.ready = False
        dropped = await self.scheduler.close(drain=False)
        await self.speech.close(drain=False)
        self.hub.close()
        await self.supervisor.close()
        return dropped

    # -- health ---------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): what /readyz says."""
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "starting"
        problems = self.supervisor.problems() + [why for check in self.readiness_checks if (why := check())]
        if problems:
            return False, "; ".join(problems)
        if self.batches_failed_in_row >= self.config.max_failed_batches:
            return False, f"{self.batches_failed_in_row} engine batches failed in a row, last: {self.last_batch_error}"
        return True, "ready"

    def health(self) -> tuple[bool, str]:
        """(alive, why not): what /healthz says. Unhealthy only once recovery was given up."""
        if self.supervisor.failed:
            return False, self.supervisor.failed
        return True, "ok"

    def _on_fatal(self, reason: str) -> None:
        self.fatal.set()

    def _on_batch_failed(self, size: int, exc: BaseException) -> None:
        self.metrics.batches_failed.inc()
        self.batches_failed_in_row += 1
        self.last_batch_error = f"{type(exc).__name__}: {exc}"

    # -- streams ----------------------------------------------------------------
    async def add_stream(self, config: StreamConfig, checked: CheckedSource | None = None, *,
                         resume: StreamResume | None = None) -> StreamRuntime:
        """Start pulling a stream. Raises StreamExists, AtCapacity, or ValueError for a bad URL.

        `checked`: what the source policy allowed for a URL from HTTP (what to open, the FFmpeg
        protocol whitelist, the destination check); None for the operator's own sources.
        `resume`: go on from another replica's index and media timeline (a stream taken over)."""
        if not config.url:
            raise ValueError("a pulled stream needs a 'url' (WHIP streams are created by POST /whip/{id})")
        self.check_qa_model(config)
        async with self._lock:
            self._check_new(config.id)
            rt = self._runtime(config, resume.next_index if resume else 0)
            spec = SourceSpec(
                stream_id=config.id,
                url=checked.url if checked is not None else config.url,
                ffmpeg_options=checked.ffmpeg_options if checked is not None else {},
                check_destination=checked.check_destination if checked is not None else None,
                relay=checked.relay if checked is not None else None,
                realtime=config.realtime,
                loop=config.loop,
                rtsp_transport=config.rtsp_transport,
                stall_timeout=config.stall_timeout,
                short_side=self.frame_short_side,
                hwaccel=config.hwaccel,
                start_after=resume.media_after if resume else None,
                audio=config.speech != "off",
            )  # raises SourceSpecError (a ValueError) for unknown schemes, missing files
            # The gate mirrors this stream's sampler: only frames it will choose are converted.
            gate = speech_only_gate() if config.speech == "only" else SlotGate(rt.sampler.config)
            rt.source = source = FrameSource(spec, rt.on_frame, rt.on_state, gate=gate)
            rt.speech = self.speech.attach(config.id, source.audio)
            self.streams[config.id] = rt
            self.metrics.streams.set(len(self.streams))
        rt.start_pipeline()
        await rt.source.start()
        log.info("stream added", extra={"stream": config.id, "url": spec.redacted_url})
        return rt

    async def add_whip_stream(self, config: StreamConfig, offer_sdp: str) -> tuple[StreamRuntime, str]:
        """A stream pushed to us over WebRTC: answer the offer, frames flow in. Returns the runtime
        (its `source.id` names the session) and the answer.

        A WHIP stream whose session is stopped, failed or stalled (its publisher went away) is
        replaced by the new session; a connecting or live one raises StreamExists, as does a pulled
        stream of that id."""
        from streamer.ingest.whip import WhipSession, check_offer

        self.check_qa_model(config)
        async with self._lock:
            old = self.streams.get(config.id)
            if old is not None and not _replaceable_whip(old):
                kind = "a pulled stream" if old.config.url else f"a {old.state} WHIP session"
                raise StreamExists(f"stream {config.id!r} already exists ({kind}); end it first")
            if old is None:
                self._check_new(config.id)
                whip = sum(1 for rt in self.streams.values() if not rt.config.url)
                if whip >= self.config.max_whip_sessions:
                    raise AtCapacity("max_whip_sessions", f"at the limit of {self.config.max_whip_sessions} WHIP sessions")
            check_offer(offer_sdp)  # a malformed offer replaces nothing
            first_seq = 0
            if old is not None:
                # Under the lock: the old session's windows, features and state are gone before the new one's come.
                # It goes on from the old seq: frame keys (stream, seq) name cached features.
                first_seq = getattr(old.source, "next_seq", 0)
                del self.streams[config.id]
                self.metrics.streams.set(len(self.streams))
                await self._teardown(old, f"replaced by a new WHIP session (was {old.state})")
            rt = self._runtime(config)
            session = WhipSession(config.id, rt.on_frame, on_state=rt.on_state, short_side=self.frame_short_side,
                                  stall_timeout=config.stall_timeout, first_seq=first_seq,
                                  audio=config.speech != "off", visual=config.speech != "only")
            answer = await session.accept(offer_sdp)  # raises if aiortc cannot answer: nothing registered
            rt.source = session
            rt.speech = self.speech.attach(config.id, session.audio)
            self.streams[config.id] = rt
            self.metrics.streams.set(len(self.streams))
        rt.start_pipeline()
        log.info("whip stream added", extra={"stream": config.id, "session": session.id})
        self.supervisor.spawn(f"whip-connect:{config.id}:{session.id}", lambda: self._expire_unconnected(rt))
        return rt, answer

    async def remove_whip_session(self, stream_id: str, session_id: str | None = None, detail: str = "removed") -> None:
        """End a WHIP stream (DELETE of its Location). `session_id`: only if that session is still the
        stream's (a late DELETE from a replaced publisher must not end its successor); None: whichever
        session it has. Raises StreamNotFound for no such WHIP stream or session."""
        async with self._lock:
            rt = self.streams.get(stream_id)
            if rt is None or rt.config.url or rt.source is None:
                raise StreamNotFound(stream_id)
            current = str(getattr(rt.source, "id", "")).encode()
            if session_id is not None and not secrets.compare_digest(current, session_id.encode()):
                raise StreamNotFound(stream_id)
            del self.streams[stream_id]
            self.metrics.streams.set(len(self.streams))
        await self._teardown(rt, detail)

    def _check_new(self, stream_id: str) -> None:
        if stream_id in self.streams:
            raise StreamExists(f"stream {stream_id!r} already exists")
        if len(self.streams) >= self.config.max_streams:
            raise AtCapacity("max_streams", f"at the limit of {self.config.max_streams} streams")

    async def _expire_unconnected(self, rt: StreamRuntime) -> None:
        """A WHIP offer whose peer never connects holds a slot: free it after whip_connect_timeout."""
        await asyncio.sleep(self.config.whip_connect_timeout)
        session = rt.source
        if self.streams.get(rt.config.id) is rt and session is not None and session.stats.frames == 0:
            # How far it got says whose side to look at: ICE (addresses, firewall) or DTLS (roles, suites).
            progress = session.progress() if hasattr(session, "progress") else "unknown"
            if getattr(session, "connected", False):
                detail = f"no video within {self.config.whip_connect_timeout:g} s of connecting ({progress})"
            else:
                detail = f"never connected ({progress})"
            log.warning("whip session removed: %s", detail,
                        extra={"stream": rt.config.id, "after_s": self.config.whip_connect_timeout})
            self.metrics.refused.labels(reason="whip_never_connected").inc()
            with contextlib.suppress(StreamNotFound):  # only this session: a successor may hold the id by now
                await self.remove_whip_session(rt.config.id, session.id, detail=detail)

    async def remove_stream(self, stream_id: str, detail: str = "removed") -> None:
        async with self._lock:
            rt = self.streams.pop(stream_id, None)
            if rt is None:
                raise StreamNotFound(stream_id)
            self.metrics.streams.set(len(self.streams))
        await self._teardown(rt, detail)

    async def _teardown(self, rt: StreamRuntime, detail: str) -> None:
        """Stop a stream already taken out of `streams` and forget it everywhere."""
        stream_id = rt.config.id
        # The one `stopped` clients see: the hub ignores the source's own while it stops.
        self.hub.end_stream(stream_id, SourceState.STOPPED.value, detail)
        await rt.stop()
        await self.speech.detach(stream_id)  # its audio task, segmenter and waiting utterances
        self.scheduler.forget(stream_id)  # waiting windows dropped; cached features freed on the engine thread
        self.hub.forget_stream(stream_id)
        self.metrics.forget_stream(stream_id)
        log.info("stream removed", extra={"stream": stream_id, "detail": detail})

    def _runtime(self, config: StreamConfig, first_index: int = 0) -> StreamRuntime:
        return StreamRuntime(
            config, frames=self.engine.num_frames, ring_capacity=self.config.ring_capacity,
            submit=self.scheduler.submit, publish_state=self.hub.publish_state, metrics=self.metrics,
            spawn=self.supervisor.spawn, first_index=first_index,
        )

    def get(self, stream_id: str) -> StreamRuntime:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise StreamNotFound(stream_id) from None

    # -- engine output --------------------------------------------------------
    def _on_batch(self, size: int, seconds: float) -> None:
        self.batches_failed_in_row = 0
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    def _remember(self, windows: list[Window], captions: list[Caption]) -> None:
        """Live windows just captioned join their stream's history (before their captions go out,
        so a client can ask about a caption it got); those that leave it are freed in the engine."""
        for window, caption in zip(windows, captions):
            rt = self.streams.get(window.stream_id)
            if rt is None:  # removed while its window was in the engine: forget_stream frees it
                continue
            for gone in rt.history.add(window, caption):
                self.scheduler.free_window(gone.stream_id, gone.index)

    def _publish(self, captions: list[Caption]) -> None:
        for caption in captions:
            rt = self.streams.get(caption.stream_id)
            if rt is None:  # removed while its window was in the engine
                continue
            rt.captions += 1
            rt.last_caption = caption
            self.metrics.captioned.labels(stream=caption.stream_id).inc()
            self.metrics.latency.labels(stream=caption.stream_id).observe(caption.latency)
            self.hub.publish_caption(caption, shown=rt.stabilizer.offer(caption))

    # -- one-off requests (HTTP JSON APIs) -----------------------------------
    async def caption_windows(self, windows: list[Window], max_new_tokens: int | None = None) -> list[Caption]:
        """Caption windows that belong to no live stream (HTTP clips, frame lists) through the
        scheduler: after live windows, within max_batch; their cached features are freed once
        they are captioned. Stream ids must be unique to the request."""
        return await self.scheduler.caption(windows, max_new_tokens)

    # -- questions ----------------------------------------------------------------
    async def ask(self, stream_id: str, question: str, *, at: float | None = None,
                  max_new_tokens: int | None = None, request_id: str | None = None) -> Answer:
        """Answer `question` about stream `stream_id`'s newest captioned window, or (`at`, media
        seconds) the window of its history about that time (history.py's `at`).

        The stream's QA model answers (`qa_model`, else [model] qa_model, else the caption model).
        Raises StreamNotFound; ValueError for an empty or over-long question (or token limit);
        OutOfHistory (a ValueError) when `at` is outside the history or nothing is captioned yet;
        SchedulerBusy over the scheduler's one-off limit; EngineFailed when the engine raised."""
        try:
            rt = self.get(stream_id)
            model = self.qa_model_of(stream_id)
            question = self.answering_engine(stream_id).check_question(question, max_new_tokens)
            entry = rt.history.newest() if at is None else rt.history.at(at)
        except StreamNotFound:
            self.metrics.questions.labels(result="not_found").inc()
            raise
        except OutOfHistory:
            self.metrics.questions.labels(result="out_of_history").inc()
            raise
        except ValueError:
            self.metrics.questions.labels(result="invalid").inc()
            raise
        (answer,) = await self._answer([(entry.window, question)], max_new_tokens, free_after=False, model=model)
        return dataclasses.replace(answer, request_id=request_id)

    async def ask_window(self, window: Window, question: str, max_new_tokens: int | None = None) -> Answer:
        """Answer `question` about a window that is no live stream's (the one-off video and frames
        APIs, `streamer caption --question`); its cached features are freed once answered. Its
        stream id must be unique to the call, as for `caption_windows`. Raises as `ask` does."""
        (answer,) = await self.ask_windows([(window, question)], max_new_tokens)
        return answer

    async def ask_windows(self, items: list[tuple[Window, str]], max_new_tokens: int | None = None) -> list[Answer]:
        """`ask_window` for many (window, question) pairs of one clip at once: its windows share
        frames, whose features are freed only once every question is answered. [model] qa_model answers
        (else the caption model)."""
        model = self.qa_model_of()
        engine = self.answering_engine()
        try:
            items = [(window, engine.check_question(question, max_new_tokens)) for window, question in items]
        except ValueError:
            self.metrics.questions.labels(result="invalid").inc()
            raise
        return await self._answer(items, max_new_tokens, free_after=True, model=model)

    async def _answer(self, items: list[tuple[Window, str]], max_new_tokens: int | None, *,
                      free_after: bool, model: str | None) -> list[Answer]:
        try:
            answers = await self.scheduler.ask(items, max_new_tokens, free_after=free_after, model=model)
        except SchedulerBusy:
            self.metrics.questions.labels(result="busy").inc(len(items))
            raise
        except EngineFailed:
            self.metrics.questions.labels(result="failed").inc(len(items))
            raise
        self.metrics.questions.labels(result="answered").inc(len(answers))
        return answers


def _replaceable_whip(rt: StreamRuntime) -> bool:
    """A WHIP stream whose publisher is gone (ended, failed, or silent past stall_timeout)."""
    return not rt.config.url and rt.state in (SourceState.STOPPED.value, SourceState.FAILED.value,
                                              SourceState.STALLED.value)
