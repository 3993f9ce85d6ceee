"""The speech engine: Whisper (transformers) on voice-activity segments, in batches.

`SpeechEngine.load(SpeechConfig)` finds the checkpoint the way the caption
engine does (engine/loader.py: a local directory, the HF cache, the hub; no
model named: DEFAULT_SPEECH_MODEL when cached or reachable, else the tiny
model bundled with the package), with the same device and dtype handling.
`transcribe(segments)` turns `SpeechSegment`s (speech/vad.py) into
`SpeechCue`s: one `generate` per batch, text, the mean log-probability of its
tokens as confidence, and the segment's media times.

Not thread-safe: one thread calls `transcribe` at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.utils import logging as hf_logging

from streamer.engine.loader import _first_line, _hub_reachable, resolve_device, resolve_dtype
from streamer.errors import ModelLoadError
from streamer.speech import BUNDLED_SPEECH_MODEL, BUNDLED_SPEECH_MODEL_NAME, DEFAULT_SPEECH_MODEL
from streamer.speech.vad import SAMPLE_RATE, SpeechSegment
from streamer.types import SpeechCue

__all__ = ["SpeechConfig", "SpeechEngine", "default_speech_model", "load_speech_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechConfig:
    model: str | None = None  # None: DEFAULT_SPEECH_MODEL when cached or reachable, else the bundled model
    device: str = "auto"
    dtype: str = "auto"
    language: str = "en"  # for multilingual checkpoints (an English-only one has no language token)
    max_new_tokens: int = 96
    batch_size: int = 8
    threads: int | None = None  # torch CPU threads; None: leave torch's setting (the caption engine sets it)


def default_speech_model() -> str:
    """DEFAULT_SPEECH_MODEL when it is cached or the hub answers, else the bundled model (logged)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_SPEECH_MODEL, "config.json"), str) or _hub_reachable():
        return DEFAULT_SPEECH_MODEL
    if (BUNDLED_SPEECH_MODEL / "config.json").is_file():
        log.warning("default speech model not available offline: using the bundled model",
                    extra={"wanted": DEFAULT_SPEECH_MODEL, "using": BUNDLED_SPEECH_MODEL_NAME})
        return BUNDLED_SPEECH_MODEL_NAME
    return DEFAULT_SPEECH_MODEL  # loading it will say what was tried


def load_speech_model(name: str | None, device: str = "auto", dtype: str = "auto") -> tuple[str, Any, Any]:
    """(name, model, processor) of a Whisper checkpoint: a local directory, else the HF cache, else the hub.
    Raises ModelLoadError naming every place tried."""
    if name is None:
        name = default_speech_model()
    if name == BUNDLED_SPEECH_MODEL_NAME:
        _, model, processor = load_speech_model(str(BUNDLED_SPEECH_MODEL), device, dtype)
        return BUNDLED_SPEECH_MODEL_NAME, model, processor
    if not log.isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"speech model {name!r}: local directory {path} has no config.json")
        candidates = [(str(path), True, f"local directory {path}")]
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"speech model {name!r}: no such local directory")
    else:
        candidates = [(name, True, "the Hugging Face cache"), (name, False, "the Hugging Face hub")]
    attempts: list[str] = []
    for source, local_only, where in candidates:
        try:
            loaded: Any = WhisperForConditionalGeneration.from_pretrained(
                source, dtype=torch_dtype, local_files_only=local_only, output_loading_info=True
            )
            model, info = loaded
            processor = WhisperProcessor.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            attempts.append(f"{where} (not there)" if local_only and where.endswith("cache") else f"{where} ({_first_line(exc)})")
            log.debug("speech model not loaded", extra={"model": name, "where": where}, exc_info=True)
            continue
        missing = [k for k in info.get("missing_keys", []) if "position" not in k]
        if missing:
            raise ModelLoadError(f"speech model {name!r}: checkpoint lacks {len(missing)} weights (e.g. {sorted(missing)[:3]})")
        model.to(torch_device).eval()
        log.info("speech model loaded", extra={"model": name, "where": where, "device": str(torch_device)})
        return name, model, processor
    raise ModelLoadError(f"speech model {name!r} could not be loaded; tried " + "; ".join(attempts))


class SpeechEngine:
    def __init__(self, name: str, model: Any, processor: Any, config: SpeechConfig) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        features = processor.feature_extractor
        # The longest audio one generate() call takes (30 s for OpenAI's checkpoints, 6 s for the bundled one):
        # the VAD cuts utterances to fit (`max_utterance`).
        self.window_seconds = features.n_samples / features.sampling_rate
        # Scores for the confidence; a copy, so that the model's own generation config stays as loaded.
        self._generation = copy.deepcopy(model.generation_config)
        self._generation.output_scores = True
        self._generation.return_dict_in_generate = True
        # One length limit, counted with the prompt tokens (<|startoftranscript|>... ~4): Whisper's generate
        # sets max_length from the model anyway, and warns on every call when max_new_tokens is set too.
        self._generation.max_new_tokens = None
        self._generation.max_length = min(model.config.max_target_positions, config.max_new_tokens + 4)
        self._generate_kwargs: dict[str, Any] = {}
        if getattr(self._generation, "is_multilingual", False) and getattr(self._generation, "lang_to_id", None):
            self._generate_kwargs.update(language=config.language, task="transcribe")

    @classmethod
    def load(cls, config: SpeechConfig | None = None) -> SpeechEngine:
        config = config or SpeechConfig()
        if config.threads:
            torch.set_num_threads(config.threads)
        name, model, processor = load_speech_model(config.model, config.device, config.dtype)
        return cls(name, model, processor, config)

    @torch.inference_mode()
    def transcribe(self, segments: Sequence[SpeechSegment]) -> list[SpeechCue]:
        """One cue per segment with words in it (a segment the model hears nothing in gives none)."""
        cues: list[SpeechCue] = []
        size = max(1, self.config.batch_size)
        for i in range(0, len(segments), size):
            cues.extend(self._batch(segments[i : i + size]))
        return cues

    def _batch(self, segments: Sequence[SpeechSegment]) -> list[SpeechCue]:
        limit = int(self.window_seconds * SAMPLE_RATE)
        audios = [np.asarray(s.audio[:limit], dtype=np.float32) for s in segments]
        features = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        inputs = features.input_features.to(self.device, self.dtype)
        out = self.model.generate(inputs, generation_config=self._generation, **self._generate_kwargs)
        sequences = out.sequences
        confidences = self._confidences(sequences, out.scores)
        texts = self.processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        now = time.time()
        cues = []
        for seg, text, conf in zip(segments, texts, confidences, strict=True):
            text = " ".join(text.split())
            if not text:
                continue
            cues.append(SpeechCue(seg.stream_id, seg.start, seg.end, text, round(conf, 4), self.name,
                                  capture_time=seg.capture_time, emit_time=now))
        return cues

    def _confidences(self, sequences: torch.Tensor, scores: Sequence[torch.Tensor] | None) -> list[float]:
        """Mean log-probability of each row's generated tokens (up to and including end-of-text)."""
        if not scores:
            return [0.0] * len(sequences)
        steps = len(scores)
        generated = sequences[:, -steps:]
        logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in scores], dim=1)  # batch, steps, vocab
        picked = logprobs.gather(2, generated.unsqueeze(-1)).squeeze(-1)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        result = []
        for row, ids in zip(picked, generated.tolist()):
            n = next((j + 1 for j, t in enumerate(ids) if t in eos_ids), len(ids))
            vals = row[:n]
            vals = vals[torch.isfinite(vals)]
            result.append(float(vals.mean()) if len(vals) else 0.0)
        return result
