"""The captioning engine: batched GIT inference with per-frame feature reuse.

GIT's vision tower encodes every frame on its own (GitModel.forward: per-frame
image_encoder, + img_temporal_embedding[slot], then visual_projection), so a
frame shared by overlapping windows needs encoding once. The engine keeps each
frame's encoder output in a FeatureCache and runs only the text decoder per
window: one prefill over [image tokens, BOS] for the whole batch, then greedy
decoding with the image keys/values computed once (graphs.py).

The model calls themselves go to a runner (runner.py): torch, or an ONNX
export run by ONNX Runtime or OpenVINO (onnx_runners.py, `--backend`). The
cache, batching and the greedy loops here are the same for every backend.

Two greedy loops give the same tokens (tests/test_engine.py):
- "compact" (CPU default): rows leave the batch as they finish. It reads
  every token back to the host, which costs nothing on a CPU.
- "masked" (CUDA default): the batch keeps its shape; finished rows are
  masked on the device and the host looks only every `sync_every` tokens
  (to stop early) and once at the end, so the GPU never waits on Python.

On CUDA, `prepare` (upload, preprocessing, vision tower) runs on its own CUDA
stream and `finish` (the decoder) on the current one, ordered by an event: a
caller that prepares batch k+1 before finishing batch k (the scheduler does,
with `pipeline`) gets the two overlapped on the GPU.

Not thread-safe: one thread calls `caption` at a time (the scheduler's worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.engine.cache import FeatureCache
from streamer.engine.loader import LoadedModel, load_model
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.engine.runner import Runner, TorchRunner
from streamer.errors import ModelLoadError
from streamer.types import Caption, Frame, Window

__all__ = ["BACKENDS", "Engine", "EngineConfig", "EngineStats", "PreparedBatch"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: DEFAULT_MODEL if reachable, else the bundled model
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_new_tokens: int = 20
    cache_frames: int = 512  # frame features kept for reuse (LRU)
    vision_batch: int = 32  # frames per vision-tower forward
    # CPU threads for torch. None: all cores but one, which decoding and the event
    # loop need: on a busy 2-core box two OpenMP threads spin against the decode
    # threads and a batch takes 10-40x longer (benchmarks/README.md, live latency).
    threads: int | None = None
    greedy: str = "auto"  # auto | compact | masked (see the module doc); auto: masked on CUDA
    sync_every: int = 4  # masked: tokens between looks at "all rows finished?"
    # torch | onnxruntime | openvino. The ONNX backends take an exported directory
    # (`streamer export`) as `model`, or export the model once into streamer's cache.
    backend: str = "torch"


@dataclass
class EngineStats:
    windows: int = 0
    batches: int = 0
    frames_encoded: int = 0  # vision-tower work actually done
    frames_reused: int = 0  # frame slots served from the feature cache
    tokens_generated: int = 0
    vision_seconds: float = 0.0
    decode_seconds: float = 0.0  # prefill + steps + detokenising
    prefill_seconds: float = 0.0  # of decode_seconds: the pass over image tokens + BOS


@dataclass
class PreparedBatch:
    """Windows whose per-frame features are computed (or, on CUDA, queued)."""

    windows: list[Window]
    features: Any  # (B, F, P+1, Dv) in the runner's own array type
    ready: torch.cuda.Event | None  # recorded on the vision stream after the last kernel


class Engine:
    def __init__(self, model: Runner | LoadedModel, config: EngineConfig | None = None) -> None:
        runner: Runner = TorchRunner(model) if isinstance(model, LoadedModel) else model
        self.runner = runner
        self.config = config or EngineConfig(model=runner.info.name, backend=runner.backend)
        self.backend = runner.backend
        # the transformers model behind the torch backend (None for the ONNX ones)
        self.loaded: LoadedModel | None = getattr(runner, "loaded", None)
        self.model = self.loaded.model if self.loaded is not None else None
        self.tokenizer = runner.info.tokenizer
        self.device = runner.device
        self.dtype = runner.dtype
        self.precision = runner.precision
        self.model_name = runner.info.name
        self.spec = PreprocessSpec.from_processor(runner.info.image_processor)
        self.cache = FeatureCache(self.config.cache_frames)
        self.stats = EngineStats()
        self.num_frames = int(runner.model_config.num_image_with_embedding or 1)
        self.bos_id, self.eos_ids = runner.bos_id, runner.eos_ids
        greedy = self.config.greedy
        if greedy == "auto":
            greedy = "masked" if self.device.type == "cuda" else "compact"
        if greedy not in ("compact", "masked"):
            raise ValueError(f"greedy: expected auto, compact or masked, got {greedy!r}")
        self.greedy = greedy
        self._vision_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        if config.backend not in BACKENDS:
            raise ModelLoadError(f"--backend {config.backend}: expected one of {', '.join(BACKENDS)}")
        threads = config.threads or max(1, (os.cpu_count() or 2) - 1)
        runner: Runner
        if config.backend == "torch":
            loaded = load_model(config.model, config.device, config.dtype)
            if loaded.device.type == "cpu":
                torch.set_num_threads(threads)
                if config.dtype == "auto" and _cpu_has_amx():
                    # fp32 stays the CPU default (it matches the reference captions exactly)
                    log.info("this CPU has AMX: --dtype bfloat16 captions 2-3x faster (benchmarks/README.md)")
            runner = TorchRunner(loaded)
        else:
            from streamer.engine.onnx_runners import load_onnx_runner

            torch.set_num_threads(threads)  # preprocessing and the greedy loop still run in torch
            runner = load_onnx_runner(config, threads)
        return cls(runner, config)

    # -- public ------------------------------------------------------------
    @property
    def frame_short_side(self) -> int | None:
        """Decoders may downscale frames to this short side before handing them over."""
        return self.spec.short_side

    def caption(self, windows: Sequence[Window], max_new_tokens: int | None = None) -> list[Caption]:
        """Caption a batch of windows (any mix of streams); one Caption per window, same order."""
        if not windows:
            return []
        return self.finish(self.prepare(windows), max_new_tokens)

    def prepare(self, windows: Sequence[Window]) -> PreparedBatch:
        """First half of `caption`: the per-frame features of each window. On CUDA
        this only queues work on the vision stream and returns at once."""
        t0 = time.perf_counter()
        with torch.inference_mode(), _on_stream(self._vision_stream):
            features = self._window_features([self._fit(w.frames) for w in windows])
            ready = None
            if self._vision_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._vision_stream)
        self.stats.vision_seconds += time.perf_counter() - t0  # on CUDA: host time to queue it only
        return PreparedBatch(list(windows), features, ready)

    def finish(self, prepared: PreparedBatch, max_new_tokens: int | None = None) -> list[Caption]:
        """Second half of `caption`: greedy decoding, on the current CUDA stream."""
        windows = prepared.windows
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        t0 = time.perf_counter()
        with torch.inference_mode():
            features = prepared.features
            if prepared.ready is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(prepared.ready)
                features.record_stream(stream)  # made on the vision stream, used here
            greedy = self._greedy_masked if self.greedy == "masked" else self._greedy_compact
            token_ids, scores = greedy(features, limit)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        self.stats.windows += len(windows)
        self.stats.batches += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        now = time.time()
        return [
            Caption(
                stream_id=w.stream_id,
                index=w.index,
                start=w.start,
                end=w.end,
                text=_clean(text),
                confidence=score,
                model=self.model_name,
                capture_time=w.capture_time,
                emit_time=now,
            )
            for w, text, score in zip(windows, texts, scores)
        ]

    def forget_stream(self, stream_id: str) -> None:
        self.cache.drop_stream(stream_id)

    # -- vision --------------------------------------------------------------
    def _fit(self, frames: Sequence[Frame]) -> list[Frame]:
        """The model takes exactly num_frames frames: spread-sample (or repeat) to that."""
        n = self.num_frames
        if len(frames) == n:
            return list(frames)
        idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
        return [frames[i] for i in idx]

    def _encode_missing(self, frames: list[Frame]) -> dict:
        features: dict = {}
        todo: list[Frame] = []
        for f in frames:
            if f.key in features:
                continue
            cached = self.cache.get(f.key)
            if cached is not None:
                features[f.key] = cached
            else:
                features[f.key] = None
                todo.append(f)
        for start in range(0, len(todo), self.config.vision_batch):
            chunk = todo[start : start + self.config.vision_batch]
            pixels = preprocess_frames([f.image for f in chunk], self.spec, self.device, self.dtype)
            for f, h in zip(chunk, self.runner.encode(pixels)):
                features[f.key] = h
                self.cache.put(f.key, h)
        self.stats.frames_encoded += len(todo)
        return features

    def _window_features(self, windows: list[list[Frame]]) -> Any:
        all_frames = [f for frames in windows for f in frames]
        encoded_before = self.stats.frames_encoded
        features = self._encode_missing(all_frames)
        self.stats.frames_reused += len(all_frames) - (self.stats.frames_encoded - encoded_before)
        # the runner stacks copies: cached features stay untouched
        return self.runner.stack([[features[f.key] for f in frames] for frames in windows])

    # -- text ------------------------------------------------------------------
    def _prefill(self, features: Any) -> tuple[torch.Tensor, Any]:
        t0 = time.perf_counter()
        logits, state = self.runner.prefill(features)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return logits, state

    def _greedy_compact(self, features: Any, max_new_tokens: int) -> tuple[list[list[int]], list[float]]:
        logits, state = self._prefill(features)
        batch = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprob_sum = [0.0] * batch
        active = list(range(batch))  # original row of each row still in the batch
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            best_lp, best = logp.max(dim=-1)
            best_l, best_lp_l = best.tolist(), best_lp.tolist()
            still: list[int] = []
            for row, (tok, lp) in enumerate(zip(best_l, best_lp_l)):
                orig = active[row]
                tokens[orig].append(tok)
                logprob_sum[orig] += lp
                if tok not in self.eos_ids:
                    still.append(row)
            self.stats.tokens_generated += len(active)
            if not still or step == max_new_tokens - 1:
                break
            if len(still) < len(active):
                state = self.runner.keep_rows(state, still)
                best = best[torch.tensor(still, device=best.device)]
                active = [active[r] for r in still]
            # token `step` (0-based among generated ones) sits at text position step + 1
            logits, state = self.runner.step(best.unsqueeze(1), step + 1, state)
        scores = [s / max(1, len(t)) for s, t in zip(logprob_sum, tokens)]
        return tokens, scores

    def _greedy_masked(self, features: Any, max_new_tokens: int) -> tuple[list[list[int]], list[float]]:
        logits, state = self._prefill(features)
        batch, device = logits.shape[0], logits.device
        chosen = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        chosen_lp = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = 0
        for step in range(max_new_tokens):
            best_lp, best = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)
            chosen[:, step], chosen_lp[:, step] = best, best_lp
            finished |= torch.isin(best, eos)
            steps = step + 1
            if step == max_new_tokens - 1:
                break
            if steps % self.config.sync_every == 0 and bool(finished.all()):  # the only mid-loop sync
                break
            # a finished row keeps stepping on its own output: rows never mix, and it is cut below
            logits, state = self.runner.step(best.unsqueeze(1), step + 1, state)
        tokens, scores = [], []
        for row_tokens, row_lp in zip(chosen[:, :steps].tolist(), chosen_lp[:, :steps].tolist()):
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in self.eos_ids), steps)
            tokens.append(row_tokens[:end])
            scores.append(sum(row_lp[:end]) / end)
        self.stats.tokens_generated += batch * steps
        return tokens, scores


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in some builds
    try:
        return bool(probe and probe())
    except (RuntimeError, OSError):
        return False


def _on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _clean(text: str) -> str:
    return " ".join(text.split())
