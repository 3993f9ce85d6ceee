"""The daemon's Prometheus metrics, on `prometheus_client`.

One `DaemonMetrics` per daemon, on its own `CollectorRegistry` (not the
process-wide default, so that several daemons in one process, as in the
tests, do not collide). It holds:

- the metrics the pipeline updates as things happen (frames, windows,
  captions, latency, batches, failures, restarts, source states), every
  per-stream series removed with its stream (`forget_stream`);
- engine and source statistics read at scrape time from the objects that
  keep them (`EngineStats`, each source's `SourceStats`), so the hot paths
  count nothing twice and a removed stream's series vanish by themselves;
- the client's process and platform collectors (CPU, memory, open files,
  Python version).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DaemonMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonMetrics:
    def __init__(self, states: Iterable[str]) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._states = tuple(states)
        self.frames = Counter("streamer_frames", "Frames delivered converted to RGB (decoded: this + "
                              "streamer_source_frames_unconverted)", ["stream"], registry=r)
        self.ring_dropped = Counter("streamer_frames_dropped", "Frames overwritten in the ring buffer", ["stream"], registry=r)
        self.captioned = Counter("streamer_windows_captioned", "Windows captioned", ["stream"], registry=r)
        self.windows_dropped = Counter("streamer_windows_dropped", "Windows dropped under overload (newest wins)",
                                       ["stream"], registry=r)
        self.latency = Histogram("streamer_caption_latency_seconds",
                                 "Newest frame of a window arriving -> caption published", ["stream"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=r)
        self.batch_size = Histogram("streamer_batch_size", "Windows per engine call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("streamer_batch_seconds", "Engine time per batch",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8), registry=r)
        self.batches_failed = Counter("streamer_batches_failed", "Engine batches that raised (their windows get no caption)",
                                      registry=r)
        self.restarts = Counter("streamer_task_restarts", "Supervised tasks restarted after dying", ["task"], registry=r)
        self.state = Gauge("streamer_source_state", "1 for the state each source is in", ["stream", "state"], registry=r)
        self.streams = Gauge("streamer_streams", "Streams configured", registry=r)
        self.clients_dropped = Counter("streamer_ws_clients_dropped", "WebSocket clients the server closed: slow "
                                       "(1008, stopped reading), ping_timeout (1011), protocol_error (bad frames)",
                                       ["reason"], registry=r)
        for reason in ("slow", "ping_timeout", "protocol_error"):
            self.clients_dropped.labels(reason=reason)  # every series present from the start, at 0
        self.refused = Counter("streamer_requests_refused",
                               "Requests refused, by reason (HTTP: auth, limits, source policy; egress: rtsp_redirect, ...)",
                               ["reason"], registry=r)
        # the caption bus ([bus]; publish/bus.py): all at 0 without one
        self.bus_connected = Gauge("streamer_bus_connected", "1 while the caption bus (Redis) answers, 0 while "
                                   "it is unreachable (or there is no [bus])", registry=r)
        self.bus_errors = Counter("streamer_bus_errors", "Failed bus operations: publish/read/replay (each "
                                  "reconnection attempt), rejected (a message Redis refused), bad_entry "
                                  "(an entry that is not a valid message), gap (messages this replica's "
                                  "reader missed), fenced (a message refused: this replica no longer "
                                  "holds the stream's lease), lease_lost (a stream lease lost), "
                                  "lease_renew (a failed renewal attempt)", ["op"], registry=r)
        for op in ("publish", "read", "replay", "rejected", "bad_entry", "gap", "fenced", "lease_lost",
                   "lease_renew"):
            self.bus_errors.labels(op=op)
        self.bus_dropped = Counter("streamer_bus_dropped", "Messages dropped before reaching the bus: its "
                                   "outage buffer was full (oldest first), or it closed with some waiting",
                                   registry=r)
        self.questions = Counter("streamer_questions", "Questions asked (Daemon.ask, ask_window), by result: "
                                 "answered, failed (the engine raised), busy (too much one-off work waiting), "
                                 "invalid (empty or too long), out_of_history (`at` outside the history, or "
                                 "nothing captioned yet), not_found (no such stream)", ["result"], registry=r)
        for result in ("answered", "failed", "busy", "invalid", "out_of_history", "not_found"):
            self.questions.labels(result=result)
        self.bus_buffered = Gauge("streamer_bus_buffered", "Messages waiting to be appended to the bus", registry=r)
        # watches (pipeline/watches.py): series per (stream, watch), removed with the watch
        self.watch_state = Gauge("streamer_watch_state", "1 while a watch is on (its question's answer matches "
                                 "`on`, held for `hold` asks), 0 while off", ["stream", "watch"], registry=r)
        self.watch_changes = Counter("streamer_watch_changes", "Watch state changes published (watch events)",
                                     ["stream", "watch"], registry=r)
        self.watch_asks = Counter("streamer_watch_asks", "Questions watches asked, by result: ok, failed (the "
                                  "ask raised: engine failed, busy, ...; retried next tick)",
                                  ["stream", "watch", "result"], registry=r)
        # speech (streams with speech on; pipeline/speech.py). Audio decoded and dropped: streamer_source_audio_*.
        self.speech_segments = Counter("streamer_speech_segments", "Utterances the voice-activity segmenter closed",
                                       ["stream"], registry=r)
        self.speech_segments_dropped = Counter("streamer_speech_segments_dropped", "Utterances dropped untranscribed: "
                                               "the speech worker fell behind (oldest first), its model failed to "
                                               "load, or the daemon stopped", ["stream"], registry=r)
        self.speech_cues = Counter("streamer_speech_cues", "Speech cues published", ["stream"], registry=r)
        self.speech_latency = Histogram("streamer_speech_latency_seconds", "End of an utterance's audio arriving -> "
                                        "its speech cue (includes the wait for silence)", ["stream"],
                                        buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10), registry=r)
        self.speech_batch_seconds = Histogram("streamer_speech_batch_seconds", "Speech model time per batch",
                                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8), registry=r)
        self.speech_batches_failed = Counter("streamer_speech_batches_failed", "Speech batches that raised (their "
                                             "utterances get no cue; video is not affected)", registry=r)
        self._per_stream = (self.frames, self.ring_dropped, self.captioned, self.windows_dropped, self.latency,
                            self.speech_segments, self.speech_segments_dropped, self.speech_cues, self.speech_latency)

    def forget_watch(self, stream_id: str, watch_id: str) -> None:
        """Remove a deleted watch's series."""
        for metric, labels in ((self.watch_state, ()), (self.watch_changes, ()),
                               (self.watch_asks, ("ok",)), (self.watch_asks, ("failed",))):
            with contextlib.suppress(KeyError):
                metric.remove(stream_id, watch_id, *labels)

    def set_state(self, stream_id: str, state: str) -> None:
        for s in self._states:
            self.state.labels(stream=stream_id, state=s).set(1 if s == state else 0)

    def forget_stream(self, stream_id: str) -> None:
        """Remove every series of a stream that is gone (a scrape must not show it forever)."""
        for metric in self._per_stream:
            with contextlib.suppress(KeyError):
                metric.remove(stream_id)
        for s in self._states:
            with contextlib.suppress(KeyError):
                self.state.remove(stream_id, s)

    def watch(self, engine_stats: Callable[[], Any], source_stats: Callable[[], dict[str, Any]]) -> None:
        """Export engine and source statistics, read at scrape time."""
        self.registry.register(_StatsCollector(engine_stats, source_stats))

    def watch_qa_engines(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        """Export each QA model's engine statistics (`--qa-model`), labelled by model, read at scrape time."""
        self.registry.register(_QAStatsCollector(engine_stats))

    def watch_sinks(self, sinks: Callable[[], list[Any]]) -> None:
        """Export what the sinks (subtitle files, webhooks, chapters) count, read at scrape time: a
        message a sink failed on is logged there and counted here, never only in a log."""
        self.registry.register(_SinkCollector(sinks))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    def __init__(self, engine_stats: Callable[[], Any], source_stats: Callable[[], dict[str, Any]]) -> None:
        self._engine_stats = engine_stats
        self._source_stats = source_stats

    def describe(self):
        return []  # no fixed set: do not collect at registration time

    def collect(self):
        stats = self._engine_stats()
        for name, help_, value in (
            ("streamer_engine_frames_encoded", "Frames through the vision tower", stats.frames_encoded),
            ("streamer_engine_frames_reused", "Frame slots served from the feature cache", stats.frames_reused),
            ("streamer_engine_tokens_generated", "Caption tokens generated", stats.tokens_generated),
            ("streamer_engine_vision_seconds", "Seconds spent in the vision tower", stats.vision_seconds),
            ("streamer_engine_decode_seconds", "Seconds spent decoding captions", stats.decode_seconds),
            ("streamer_engine_questions", "Questions answered by the engine", getattr(stats, "questions", 0)),
            ("streamer_engine_question_seconds", ("Seconds spent answering questions (image part included when "
             "recomputed)"), getattr(stats, "question_seconds", 0.0)),
            ("streamer_engine_kv_hits", ("Questions whose window's image keys/values were kept (no vision, no "
             "image prefill)"), getattr(stats, "kv_hits", 0)),
            ("streamer_engine_kv_misses", ("Questions whose window's image keys/values were recomputed from its "
             "frames"), getattr(stats, "kv_misses", 0)),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        hits, misses = getattr(stats, "kv_hits", 0), getattr(stats, "kv_misses", 0)
        for name, help_, value in (
            ("streamer_engine_kv_hit_ratio", ("Share of questions served from the image-token cache, since start "
             "(0 before any question)"), hits / (hits + misses) if hits + misses else 0.0),
            ("streamer_engine_kv_cache_windows", "Windows whose image keys/values are kept now",
             getattr(stats, "kv_cache_windows", 0)),
            ("streamer_engine_kv_cache_bytes", "Memory the kept image keys/values take now",
             getattr(stats, "kv_cache_bytes", 0)),
        ):
            yield GaugeMetricFamily(name, help_, value=value)
        sources = self._source_stats()
        for name, help_, attr in (
            ("streamer_source_decode_errors", "Packets the decoder rejected (skipped)", "decode_errors"),
            ("streamer_source_frames_dropped_late", "Frames decoded but dropped because the loop fell behind", "dropped"),
            ("streamer_source_reconnects", "Connection attempts after the first", "reconnects"),
            ("streamer_source_frames_unconverted",
             ("Frames decoded but never converted to RGB (no sampler slot or thumbnail needed them)"), "unconverted"),
            ("streamer_source_frames_skipped",
             "Frames never decoded: non-reference frames (B-frames, mostly) no sampler slot or thumbnail could take",
             "skipped"),
            ("streamer_source_audio_seconds", "Seconds of audio decoded for speech (streams with speech on)",
             "audio_seconds"),
            ("streamer_source_audio_dropped_seconds", ("Seconds of decoded audio dropped: the segmenter fell behind, "
             "or it could not be placed on the video's clock"), "audio_dropped"),
            ("streamer_source_audio_errors", ("Audio packets that did not decode, and audio streams that cannot be "
             "decoded (unknown codec)"), "audio_errors"),
        ):
            family = CounterMetricFamily(name, help_, labels=["stream"])
            for stream_id, s in sorted(sources.items()):
                family.add_metric([stream_id], getattr(s, attr))
            yield family


class _QAStatsCollector(Collector):
    """The QA engines' statistics (the caption engine's are streamer_engine_*), one series per model."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self._engine_stats = engine_stats

    def describe(self):
        return []

    def collect(self):
        stats = self._engine_stats()
        if not stats:
            return
        for kind, name, help_, attr in (
            (CounterMetricFamily, "streamer_qa_engine_questions", "Questions a QA model answered", "questions"),
            (CounterMetricFamily, "streamer_qa_engine_question_seconds",
             "Seconds a QA model spent answering (its vision and image prefill included)", "question_seconds"),
            (CounterMetricFamily, "streamer_qa_engine_frames_encoded", "Frames through a QA model's vision tower",
             "frames_encoded"),
            (CounterMetricFamily, "streamer_qa_engine_kv_hits",
             "Questions whose window's image keys/values the QA model had kept", "kv_hits"),
            (CounterMetricFamily, "streamer_qa_engine_kv_misses",
             "Questions whose window's image keys/values the QA model computed from its frames", "kv_misses"),
            (GaugeMetricFamily, "streamer_qa_engine_kv_cache_windows",
             "Windows whose image keys/values a QA model keeps now", "kv_cache_windows"),
            (GaugeMetricFamily, "streamer_qa_engine_kv_cache_bytes",
             "Memory a QA model's kept image keys/values take now", "kv_cache_bytes"),
        ):
            family = kind(name, help_, labels=["model"])
            for model, s in sorted(stats.items()):
                family.add_metric([model], getattr(s, attr, 0))
            yield family


class _SinkCollector(Collector):
    """Per sink, labelled `kind#n` (n: its place among sinks of that kind; never a URL: it may hold a secret)."""

    def __init__(self, sinks: Callable[[], list[Any]]) -> None:
        self._sinks = sinks

    def describe(self):
        return []

    def collect(self):
        errors = CounterMetricFamily("streamer_sink_errors", "Hub messages a sink failed to handle (each logged)",
                                     labels=["sink"])
        webhook = {key: CounterMetricFamily(f"streamer_webhook_{key}", help_, labels=["sink"]) for key, help_ in (
            ("delivered", "Messages a webhook endpoint accepted (2xx)"),
            ("failed", "Webhook deliveries given up (retries spent, or a 4xx/3xx answer)"),
            ("dropped", "Webhook messages dropped: oldest from a full queue, or left at close"),
            ("retried", "Webhook delivery attempts after the first"),
        )}
        seen: dict[str, int] = {}
        for sink in self._sinks():
            kind = getattr(sink, "consumer_name", type(sink).__name__)
            seen[kind] = seen.get(kind, 0) + 1
            label = f"{kind}#{seen[kind]}"
            errors.add_metric([label], getattr(sink, "errors", 0))
            if kind == "webhook":
                stats = sink.stats()
                for key, family in webhook.items():
                    family.add_metric([label], stats[key])
        yield errors
        yield from webhook.values()
