"""Speech on live streams: each stream's audio -> its voice-activity segmenter -> one speech worker -> hub.

    source (decode thread, or WHIP on the loop)
      -> AudioQueue (ingest/audio.py: bounded, drop-oldest, counted)
      -> StreamSpeech (a supervised task per stream: VoiceActivitySegmenter, on the loop: cheap numpy)
      -> SpeechWorker (one thread for all streams: bounded utterance queue, drop-oldest, counted;
                       batches through SpeechEngine.transcribe)
      -> SpeechService (on the loop: metrics, the stream's counts, hub.publish_event(cue))

Silence costs nothing past the segmenter. The speech model is loaded once, in the worker's thread,
when the first stream with speech starts (`[speech] model` / `--speech-model`); a model that fails
to load, or a batch that raises, is logged once, counted and shown in the stream's `speech` status,
and never touches video. This module does not import torch: the engine is imported in the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from streamer.ingest.audio import AudioChunk, AudioQueue
from streamer.ops.metrics import DaemonMetrics
from streamer.pipeline.sampler import SamplerConfig, SlotGate
from streamer.speech.vad import SpeechSegment, VadConfig, VoiceActivitySegmenter
from streamer.types import SpeechCue

__all__ = ["SpeechService", "SpeechSettings", "SpeechWorker", "StreamSpeech", "speech_only_gate"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 10.0  # a drain waits this long for the worker's last batches
_DROP_REASONS = {
    "behind": "the speech worker fell behind: the oldest waiting utterances gave way",
    "no model": "the speech model is not loaded",
    "closing": "the daemon is stopping",
}


@dataclass(frozen=True)
class SpeechSettings:
    """The daemon's speech settings ([speech]; `--speech-model`)."""

    model: str | None = None  # None: openai/whisper-small when cached or reachable, else the bundled model
    device: str = "auto"
    dtype: str = "auto"
    language: str = "en"
    batch_size: int = 8  # utterances per model call
    queue: int = 32  # utterances waiting, all streams together; past it the oldest is dropped
    vad: VadConfig = field(default_factory=VadConfig)

    @classmethod
    def from_section(cls, section: Any, model: str | None = None) -> SpeechSettings:
        """From config.SpeechSection; `model` (the flag) wins over the file's."""
        return cls(model=model or section.model, device=section.device, dtype=section.dtype, language=section.language,
                   batch_size=section.batch_size, queue=section.queue)


def speech_only_gate() -> SlotGate:
    """The gate of a `speech = "only"` stream: no caption slot ever, so its source converts only
    the first frame and one a second (thumbnails). The video is still decoded: it drives the
    source's liveness (live, stalled, reconnects) and the media clock audio is placed on."""
    return SlotGate(SamplerConfig(window=1e9, frames=1, hop=1e9), refresh=1.0)


class SpeechWorker:
    """The one speech thread: utterances of every stream in (`submit`, on the loop), results out
    (`on_result(segments, cues, error, seconds)` and `on_dropped(segments, reason)`, called on the loop).

    Loads the engine first (`load`, in the thread). Then takes whatever is queued, up to
    `batch_size` utterances, as one `transcribe` call. The queue holds `queue` utterances; a new
    one past that pushes out the oldest (newest wins, as for windows), reported as dropped."""

    def __init__(
        self,
        settings: SpeechSettings,
        *,
        load: Callable[[SpeechSettings], Any],
        on_result: Callable[[list[SpeechSegment], list[SpeechCue], BaseException | None, float], None],
        on_dropped: Callable[[list[SpeechSegment], str], None],
        on_loaded: Callable[[Any, str | None], None],
    ) -> None:
        self.settings = settings
        self._load = load
        self._on_result = on_result
        self._on_dropped = on_dropped
        self._on_loaded = on_loaded
        self._cond = threading.Condition()
        self._queue: deque[SpeechSegment] = deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._drain = True

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread (it loads the model first). Idempotent; call on the loop."""
        if self._thread is not None or self._closing:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="speech", daemon=True)
        self._thread.start()

    def submit(self, segment: SpeechSegment) -> None:
        with self._cond:
            if self._closing:
                dropped = [segment]
            else:
                self._queue.append(segment)
                dropped = []
                while len(self._queue) > self.settings.queue:
                    dropped.append(self._queue.popleft())
                self._cond.notify()
        if dropped:
            self._on_dropped(dropped, "closing" if self._closing else "behind")

    def forget(self, stream_id: str) -> int:
        """Drop the waiting utterances of a removed stream; returns how many."""
        with self._cond:
            kept = deque(s for s in self._queue if s.stream_id != stream_id)
            gone = len(self._queue) - len(kept)
            self._queue = kept
        return gone

    def waiting(self, stream_id: str | None = None) -> int:
        with self._cond:
            return sum(1 for s in self._queue if stream_id is None or s.stream_id == stream_id)

    async def close(self, drain: bool = True, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the thread: with `drain`, the waiting utterances are transcribed first (up to
        `timeout`); without, they are dropped (reported). Idempotent."""
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            left = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        if left:
            self._on_dropped(left, "closing")
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:  # poll: the loop never blocks on it
            await asyncio.sleep(0.02)
        if thread.is_alive():
            log.warning("speech worker still busy at shutdown; its last batch is dropped")

    # -- the thread -----------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass

    def _run(self) -> None:
        try:
            engine = self._load(self.settings)
        except Exception as exc:  # noqa: BLE001 (any failure: bad path, no network, corrupt weights, memory)
            error = f"{type(exc).__name__}: {exc}"
            self._post(self._on_loaded, None, error)
            engine = None
        else:
            self._post(self._on_loaded, engine, None)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or (self._closing and not self._drain):
                    return
                size = max(1, self.settings.batch_size)
                batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            if engine is None:
                self._post(self._on_dropped, batch, "no model")
                continue
            started = time.perf_counter()
            try:
                cues = engine.transcribe(batch)
            except Exception as exc:  # noqa: BLE001 (a failing batch costs its utterances, nothing else)
                self._post(self._on_result, batch, [], exc, time.perf_counter() - started)
            else:
                self._post(self._on_result, batch, cues, None, time.perf_counter() - started)


class StreamSpeech:
    """One stream's speech on the loop: its audio queue through its segmenter to the worker.
    `run()` is the stream's supervised `speech:` task; `stop()` ends it and frees the segmenter."""

    def __init__(self, stream_id: str, audio: AudioQueue, submit: Callable[[SpeechSegment], None],
                 vad: VadConfig, info: Callable[[], tuple[str | None, str | None]] = lambda: (None, None)) -> None:
        self.stream_id = stream_id
        self.audio = audio
        self._submit = submit
        self._info = info  # (model name, why there are no cues) from the service
        self.segmenter: VoiceActivitySegmenter | None = VoiceActivitySegmenter(stream_id, vad)
        self.max_utterance: float | None = None  # set once the model is known: its window, less the rolls
        self.segments = 0
        self.pending = 0  # submitted, not yet transcribed or dropped
        self.cues = 0
        self.dropped = 0
        self.failed = 0
        self.last_cue: SpeechCue | None = None
        self.ended = False  # the last audio item read was an end of input (the source's, for a file)
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while self.segmenter is not None:
            self._feed(await self.audio.get())

    def _feed(self, items: list[AudioChunk | None]) -> None:
        for item in items:
            segmenter = self.segmenter
            if segmenter is None:
                return
            self._fit(segmenter)
            if item is None:
                segments = segmenter.flush()
            else:
                segments = segmenter.feed(item.samples, item.pts, item.arrival)
            for segment in segments:
                self.segments += 1
                self.pending += 1
                self._submit(segment)
            self.ended = item is None
        self.changed()

    def _fit(self, segmenter: VoiceActivitySegmenter) -> None:
        """Utterances no longer than the model's window (the VAD cuts longer speech into pieces)."""
        fit = self.max_utterance
        if fit is not None and segmenter.config.max_utterance > fit:
            segmenter.config = replace(segmenter.config, max_utterance=fit)

    def changed(self) -> None:
        self._changed.set()

    async def settled(self) -> None:
        """Wait until the source's audio ended and every utterance of it was transcribed or
        dropped (a file played to its end; tests and one-shot tools)."""
        while not (self.ended and self.pending == 0 and self.audio.empty):
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> None:
        """End the task; the audio already queued is segmented and the open utterance closed (a
        drain transcribes it; a removed stream's are forgotten), then the segmenter is freed."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        if self.segmenter is not None:
            self._feed([*self.audio.take(), None])
            self.segmenter = None

    def describe(self) -> dict[str, Any]:
        model, error = self._info()
        stats = self.audio.stats
        last = self.last_cue
        return {
            "model": model, "error": error,
            "segments": self.segments, "cues": self.cues, "dropped": self.dropped, "failed": self.failed,
            "audio_seconds": stats.seconds, "audio_dropped": stats.dropped, "audio_errors": stats.errors,
            "last_text": last.text if last else None, "last_end": last.end if last else None,
        }


class SpeechService:
    """The daemon's speech side: the worker (started with the first stream that has speech), the
    streams' StreamSpeech, and what becomes of their results (metrics, hub)."""

    def __init__(self, settings: SpeechSettings | None, *, publish: Callable[[SpeechCue], None],
                 metrics: DaemonMetrics, spawn: Callable[[str, Callable[[], Any]], asyncio.Task],
                 load: Callable[[SpeechSettings], Any] | None = None) -> None:
        self.settings = settings or SpeechSettings()
        self._publish = publish
        self._metrics = metrics
        self._spawn = spawn
        self.streams: dict[str, StreamSpeech] = {}
        self.model: str | None = None  # the loaded model's name
        self.error: str | None = None  # why there is no model, or why the last batch failed
        self.window: float | None = None  # the model's longest audio, seconds
        self._failing = False  # the last batch raised (the first of a run is logged)
        self._drops_logged: set[str] = set()
        self.worker = SpeechWorker(self.settings, load=load or _load_engine, on_result=self._on_result,
                                   on_dropped=self._on_dropped, on_loaded=self._on_loaded)

    def attach(self, stream_id: str, audio: AudioQueue | None) -> StreamSpeech | None:
        """Start speech for a stream whose source decodes audio (None: its speech is off)."""
        if audio is None:
            return None
        self.worker.start()  # loads the model, once
        speech = StreamSpeech(stream_id, audio, self._submit, self.settings.vad, info=lambda: (self.model, self.error))
        speech.max_utterance = self._fit()
        self.streams[stream_id] = speech
        speech.task = self._spawn(f"speech:{stream_id}", speech.run)
        return speech

    async def detach(self, stream_id: str) -> None:
        """A removed stream: its task ends, its segmenter and waiting utterances are gone."""
        speech = self.streams.pop(stream_id, None)
        if speech is not None:
            await speech.stop()
        self.worker.forget(stream_id)

    async def close(self, drain: bool = True) -> None:
        await self.worker.close(drain)

    # -- on the loop ------------------------------------------------------------------

    def _fit(self) -> float | None:
        if self.window is None:
            return None
        vad = self.settings.vad
        return max(1.0, self.window - vad.pre_roll - vad.post_roll - 0.2)

    def _submit(self, segment: SpeechSegment) -> None:
        self._metrics.speech_segments.labels(stream=segment.stream_id).inc()
        self.worker.submit(segment)

    def _on_loaded(self, engine: Any, error: str | None) -> None:
        if engine is None:
            self.error = f"speech model not loaded: {error}"
            log.error("speech model could not be loaded: no speech cues (video is not affected)",
                      extra={"model": self.settings.model, "error": error})
            return
        self.model = engine.name
        self.window = float(engine.window_seconds)
        fit = self._fit()
        for speech in self.streams.values():
            speech.max_utterance = fit
        log.info("speech model ready", extra={"model": engine.name, "window_s": self.window})

    def _on_result(self, segments: list[SpeechSegment], cues: list[SpeechCue], error: BaseException | None,
                   seconds: float) -> None:
        self._done(segments)
        self._metrics.speech_batch_seconds.observe(seconds)
        if error is not None:
            self._metrics.speech_batches_failed.inc()
            self.error = f"speech batch failed: {type(error).__name__}: {error}"
            for segment in segments:
                if (speech := self.streams.get(segment.stream_id)) is not None:
                    speech.failed += 1
            if not self._failing:  # once per run of failures, with the traceback
                self._failing = True
                log.error("speech batch failed; its utterances get no cue (video is not affected)",
                          exc_info=(type(error), error, error.__traceback__), extra={"utterances": len(segments)})
            return
        if self._failing:
            self._failing = False
            self.error = None
            log.warning("speech batches succeed again")
        for cue in cues:
            speech = self.streams.get(cue.stream_id)
            if speech is None:  # removed while its utterance was in the model
                continue
            speech.cues += 1
            speech.last_cue = cue
            self._metrics.speech_cues.labels(stream=cue.stream_id).inc()
            self._metrics.speech_latency.labels(stream=cue.stream_id).observe(cue.latency)
            self._publish(cue)

    def _on_dropped(self, segments: list[SpeechSegment], reason: str) -> None:
        self._done(segments)
        if reason not in self._drops_logged:  # counted every time, said once per reason
            self._drops_logged.add(reason)
            log.warning("speech utterances dropped untranscribed (%s; counted in streamer_speech_segments_dropped)",
                        _DROP_REASONS.get(reason, reason), extra={"utterances": len(segments)})
        for segment in segments:
            speech = self.streams.get(segment.stream_id)
            if speech is None:
                continue
            speech.dropped += 1
            self._metrics.speech_segments_dropped.labels(stream=segment.stream_id).inc()

    def _done(self, segments: list[SpeechSegment]) -> None:
        for segment in segments:
            speech = self.streams.get(segment.stream_id)
            if speech is not None:
                speech.pending = max(0, speech.pending - 1)
                speech.changed()


def _load_engine(settings: SpeechSettings) -> Any:
    """The speech engine (imports torch and transformers: in the worker's thread, on first use)."""
    from streamer.speech.engine import SpeechConfig, SpeechEngine

    return SpeechEngine.load(SpeechConfig(model=settings.model, device=settings.device, dtype=settings.dtype,
                                          language=settings.language, batch_size=settings.batch_size))
