"""Speech cues for a media file: audio -> voice-activity segments -> batched transcription."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from streamer.speech.audio import iter_audio
from streamer.speech.engine import SpeechEngine
from streamer.speech.vad import SpeechSegment, VadConfig, VoiceActivitySegmenter
from streamer.types import SpeechCue

__all__ = ["file_segments", "transcribe_file"]

log = logging.getLogger(__name__)


def file_segments(path: str, stream_id: str, vad: VadConfig) -> Iterator[SpeechSegment]:
    segmenter = VoiceActivitySegmenter(stream_id, vad)
    for samples, pts in iter_audio(path):
        yield from segmenter.feed(samples, pts, arrival=time.time())  # decoded now: a cue's latency counts from here
    yield from segmenter.flush()


def transcribe_file(engine: SpeechEngine, path: str, stream_id: str = "file", vad: VadConfig | None = None) -> list[SpeechCue]:
    """Every utterance of the file's first audio stream, transcribed. Utterances
    longer than the model's window are cut to fit it (the VAD's max_utterance)."""
    vad = vad or VadConfig()
    fit = max(1.0, engine.window_seconds - vad.pre_roll - vad.post_roll - 0.2)
    if vad.max_utterance > fit:
        from dataclasses import replace

        vad = replace(vad, max_utterance=fit)
    cues: list[SpeechCue] = []
    batch: list[SpeechSegment] = []
    for segment in file_segments(path, stream_id, vad):
        batch.append(segment)
        if len(batch) >= engine.config.batch_size:
            cues.extend(engine.transcribe(batch))
            batch = []
    if batch:
        cues.extend(engine.transcribe(batch))
    return cues
