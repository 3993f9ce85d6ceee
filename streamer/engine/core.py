"""The captioning engine: batched GIT inference with per-frame feature reuse.

GIT's vision tower encodes every frame on its own (GitModel.forward: per-frame
image_encoder, + img_temporal_embedding[slot], then visual_projection), so a
frame shared by overlapping windows needs encoding once. The engine keeps each
frame's encoder output in a FeatureCache and runs only the text decoder per
window: one prefill over [image tokens, BOS] for the whole batch, then greedy
decoding with the image keys/values computed once (graphs.py).

Questions (`answer`) are a text prefix after BOS, GIT-VQA style. The state a
prefill leaves depends on the window only, so a live window's row of it is
kept (ImageKVCache, `keep_kv`) and a question about that window starts from it:
no vision tower, no pass over the image tokens, only the question's and the
answer's tokens. A batch mixes prefixes of any lengths without padding: the
tokens all rows have go through one multi-token pass (`extend`), and a longer
prefix's remaining tokens are fed in the greedy loop in place of the model's
choice (teacher forcing) while shorter rows already generate, so every row
holds the same number of text tokens at every step and positions stay shared.

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

from streamer.engine.cache import FeatureCache, ImageKVCache
from streamer.engine.loader import LoadedModel, load_model
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.engine.prompts import MAX_QUESTION_CHARS, answer_marker, split_answer
from streamer.engine.runner import Runner, TorchRunner
from streamer.errors import ModelLoadError
from streamer.types import Answer, Caption, Frame, Window

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
    # Image-token keys/values kept per live window for questions about it (cache.py): 43.6 MB
    # per window on git-base in float32 (21.8 MB in bf16), 0.3 MB on the bundled model.
    kv_cache_windows: int = 256
    kv_cache_bytes: int = 1 << 30


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
    questions: int = 0  # answered (`answer`)
    question_seconds: float = 0.0
    kv_hits: int = 0  # questions whose window's row was in the image-token cache
    kv_misses: int = 0  # ... whose window's row was recomputed from its frames
    kv_cache_windows: int = 0  # windows in the image-token cache now
    kv_cache_bytes: int = 0


@dataclass
class PreparedBatch:
    """Windows whose per-frame features are computed (or, on CUDA, queued)."""

    windows: list[Window]
    features: Any  # (B, F, P+1, Dv) in the runner's own array type
    ready: torch.cuda.Event | None  # recorded on the vision stream after the last kernel
    keep_kv: int = 0  # the first keep_kv windows are live: their image keys/values are kept for questions
    prompts: list[list[int]] | None = None  # per window, BOS + its caption prompt's tokens; None: BOS alone


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
        self.kv_cache = ImageKVCache(self.config.kv_cache_windows, self.config.kv_cache_bytes)
        self.stats = EngineStats()
        self.max_positions = int(runner.model_config.max_position_embeddings)  # text positions the model has
        self.answer_marker = answer_marker(runner.model_config)
        self._marker_ids = (self.tokenizer(self.answer_marker, add_special_tokens=False).input_ids
                            if self.answer_marker else [])
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

    def caption(self, windows: Sequence[Window], max_new_tokens: int | None = None, *, keep_kv: int = 0,
                prompts: Sequence[str | None] | None = None) -> list[Caption]:
        """Caption a batch of windows (any mix of streams); one Caption per window, same order.
        `keep_kv`: the first keep_kv windows are live ones that questions may ask about: their
        image keys/values go into the image-token cache. `prompts`: per window, a text the
        caption goes on from (None: none); the caption is the text generated after it."""
        if not windows:
            return []
        return self.finish(self.prepare(windows, keep_kv=keep_kv, prompts=prompts), max_new_tokens)

    def prepare(self, windows: Sequence[Window], *, keep_kv: int = 0,
                prompts: Sequence[str | None] | None = None) -> PreparedBatch:
        """First half of `caption`: the per-frame features of each window. On CUDA
        this only queues work on the vision stream and returns at once."""
        prompt_ids = None
        if prompts is not None and any(p is not None for p in prompts):
            if len(prompts) != len(windows):
                raise ValueError(f"{len(prompts)} prompts for {len(windows)} windows")
            prompt_ids = [[self.bos_id] if p is None else self._prompt_ids(p, None, "prompt") for p in prompts]
        t0 = time.perf_counter()
        with torch.inference_mode(), _on_stream(self._vision_stream):
            features = self._window_features([self._fit(w.frames) for w in windows])
            ready = None
            if self._vision_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._vision_stream)
        self.stats.vision_seconds += time.perf_counter() - t0  # on CUDA: host time to queue it only
        return PreparedBatch(list(windows), features, ready, min(keep_kv, len(windows)), prompt_ids)

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
            logits, state = self._prefill(features)
            if prepared.keep_kv:
                self._keep(windows[: prepared.keep_kv], logits, state)
            token_ids, logps = self._decode(logits, state, prepared.prompts or [[self.bos_id]] * len(windows), limit)
        scores = [sum(lp) / max(1, len(lp)) for lp in logps]
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

    def check_question(self, question: str, max_new_tokens: int | None = None) -> str:
        """The question as the model reads it (whitespace collapsed); ValueError, with a message for
        the asker, when it is empty, longer than MAX_QUESTION_CHARS, or leaves no room in the
        model's text positions for `max_new_tokens` answer tokens. Safe off the engine thread."""
        self._prompt_ids(question, max_new_tokens)
        return " ".join(question.split())

    def answer(self, items: Sequence[tuple[Window, str]], max_new_tokens: int | None = None, *,
               keep_kv: Sequence[bool] | None = None) -> list[Answer]:
        """Answer (window, question) pairs in one batch; one Answer per pair, same order.

        The question is the text prefix after BOS; the answer is what the model generates
        after it (after the model's answer marker, if it has one: prompts.py); confidence is
        the mean log-probability of the answer's tokens. A window in the image-token cache
        (a live window captioned with `keep_kv`) costs only the question's and answer's
        tokens; any other window is encoded (frame features may be cached) and prefilled.
        `keep_kv`: per pair, keep its window's row when it had to be computed (a QA model,
        which captions nothing, asked about a live window: later questions about it reuse it)."""
        if not items:
            return []
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        prompts = [self._prompt_ids(question, limit) for _, question in items]
        keep = [w for (w, _), k in zip(items, keep_kv or ()) if k]
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, state = self.runner.join_rows(self._window_rows([w for w, _ in items], keep))
            token_ids, logps = self._decode(logits, state, prompts, limit)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        self.stats.questions += len(items)
        self.stats.question_seconds += time.perf_counter() - t0
        now = time.time()
        answers = []
        for (window, question), tokens, lps, text in zip(items, token_ids, logps, texts):
            answer_lps = lps[self._answer_start(tokens) :] or lps
            answers.append(Answer(
                stream_id=window.stream_id, index=window.index, start=window.start, end=window.end,
                question=" ".join(question.split()), answer=split_answer(text, self.answer_marker)[1],
                confidence=sum(answer_lps) / max(1, len(answer_lps)), model=self.model_name, emit_time=now,
            ))
        return answers

    def forget_stream(self, stream_id: str) -> None:
        self.cache.drop_stream(stream_id)
        self.kv_cache.drop_stream(stream_id)
        self._count_kv()

    def forget_window(self, stream_id: str, index: int) -> None:
        """A window left its stream's history: no question will ask about it again."""
        self.kv_cache.drop(stream_id, index)
        self._count_kv()

    # -- questions -------------------------------------------------------------
    def _prompt_ids(self, question: str, limit: int | None, what: str = "question") -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the {what} is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"the {what} is {len(question)} characters long; at most {MAX_QUESTION_CHARS}")
        limit = self.config.max_new_tokens if limit is None else limit
        if limit < 1:
            raise ValueError("max_new_tokens must be at least 1")
        ids = [self.bos_id, *self.tokenizer(" ".join(question.split()), add_special_tokens=False).input_ids]
        # positions fed: BOS, the question, every answer token but the last
        if len(ids) + limit - 1 > self.max_positions:
            room = self.max_positions - limit
            raise ValueError(f"the {what} is {len(ids) - 1} tokens long; with {limit} answer tokens this "
                             f"model ({self.max_positions} text positions) reads at most {max(0, room)}")
        return ids

    def _answer_start(self, tokens: list[int]) -> int:
        """Index of the first answer token: after the last answer marker (0 without a marker;
        len(tokens) when the model never said it: the whole text then counts)."""
        marker = self._marker_ids
        if not marker:
            return 0
        for at in range(len(tokens) - len(marker), -1, -1):
            if tokens[at : at + len(marker)] == marker:
                return at + len(marker)
        return len(tokens)

    def _keep(self, windows: Sequence[Window], logits: torch.Tensor, state: Any) -> None:
        for window, row in zip(windows, self.runner.split_rows(logits, state, list(range(len(windows))))):
            self.kv_cache.put(window, row, self.runner.row_nbytes(row))
        self._count_kv()

    def _window_rows(self, windows: list[Window], keep: Sequence[Window] = ()) -> list[Any]:
        """The prefill row of each window: from the image-token cache, else computed (each
        distinct window once; a computed row is kept only for the windows in `keep`)."""
        rows: dict[int, Any] = {}
        missing: list[Window] = []
        for w in windows:
            if id(w) in rows or any(m is w for m in missing):
                continue
            row = self.kv_cache.get(w)
            if row is None:
                missing.append(w)
            else:
                rows[id(w)] = row
        hits = sum(1 for w in windows if id(w) in rows)
        self.stats.kv_hits += hits  # per question: a recomputed window's row serves all its questions
        self.stats.kv_misses += len(windows) - hits
        if missing:
            t0 = time.perf_counter()
            features = self._window_features([self._fit(w.frames) for w in missing])
            self.stats.vision_seconds += time.perf_counter() - t0
            logits, state = self._prefill(features)
            for w, row in zip(missing, self.runner.split_rows(logits, state, list(range(len(missing))))):
                rows[id(w)] = row
                if any(k is w for k in keep):  # rows are copies, and decoding never writes into one
                    self.kv_cache.put(w, row, self.runner.row_nbytes(row))
            if keep:
                self._count_kv()
        return [rows[id(w)] for w in windows]

    def _count_kv(self) -> None:
        self.stats.kv_cache_windows, self.stats.kv_cache_bytes = len(self.kv_cache), self.kv_cache.bytes

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

    def _decode(self, logits: torch.Tensor, state: Any, prompts: list[list[int]],
                max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy decoding after each row's prompt (BOS + prefix), from the state after BOS."""
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens - 1 > self.max_positions:
            raise ValueError(f"a {longest}-token prompt and {max_new_tokens} new tokens pass this model's "
                             f"{self.max_positions} text positions")
        tails = [p[1:] for p in prompts]  # after BOS, which the state already holds
        text_len = 1
        common = min(len(t) for t in tails)
        if common:  # the tokens every row has, in one pass; the rest are fed in the greedy loop
            ids = torch.tensor([t[:common] for t in tails], dtype=torch.long, device=logits.device)
            logits, state = self.runner.extend(ids, text_len, state)
            text_len += common
            tails = [t[common:] for t in tails]
        return self._greedy(logits, state, text_len, tails, max_new_tokens)

    def _greedy(self, logits: torch.Tensor, state: Any, text_len: int, pending: list[list[int]],
                max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy decoding from a state holding `text_len` text tokens per row; `pending`: per row,
        prefix tokens still to feed before it generates. Returns each row's generated tokens and
        their log-probabilities."""
        if max_new_tokens < 1:
            return [[] for _ in pending], [[] for _ in pending]
        greedy = self._greedy_masked if self.greedy == "masked" else self._greedy_compact
        return greedy(logits, state, text_len, pending, max_new_tokens)

    def _greedy_compact(self, logits: torch.Tensor, state: Any, text_len: int, pending: list[list[int]],
                        max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        batch = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logps: list[list[float]] = [[] for _ in range(batch)]
        queues = [list(reversed(p)) for p in pending]  # popped from the end
        active = list(range(batch))  # original row of each row still in the batch
        while True:
            logp = torch.log_softmax(logits.float(), dim=-1)
            best_lp, best = logp.max(dim=-1)
            best_l, best_lp_l = best.tolist(), best_lp.tolist()
            still: list[int] = []
            feed: list[int] = []
            for row, (tok, lp) in enumerate(zip(best_l, best_lp_l)):
                orig = active[row]
                if queues[orig]:  # still reading its prefix: this prediction is no output
                    still.append(row)
                    feed.append(queues[orig].pop())
                    continue
                tokens[orig].append(tok)
                logps[orig].append(lp)
                self.stats.tokens_generated += 1
                if tok not in self.eos_ids and len(tokens[orig]) < max_new_tokens:
                    still.append(row)
                    feed.append(tok)
            if not still:
                break
            if len(still) < len(active):
                state = self.runner.keep_rows(state, still)
                active = [active[r] for r in still]
            ids = torch.tensor(feed, dtype=torch.long, device=best.device).unsqueeze(1)
            logits, state = self.runner.step(ids, text_len, state)
            text_len += 1
        return tokens, logps

    def _greedy_masked(self, logits: torch.Tensor, state: Any, text_len: int, pending: list[list[int]],
                       max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        batch, device = logits.shape[0], logits.device
        offsets = [len(p) for p in pending]  # steps each row spends reading its prefix
        longest = max(offsets)
        total = longest + max_new_tokens
        chosen = torch.zeros(batch, total, dtype=torch.long, device=device)
        chosen_lp = torch.zeros(batch, total, dtype=torch.float32, device=device)
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        if longest:
            prefix = torch.tensor([p + [0] * (longest - len(p)) for p in pending], dtype=torch.long, device=device)
            offset = torch.tensor(offsets, device=device)
        steps = 0
        for step in range(total):
            best_lp, best = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)
            chosen[:, step], chosen_lp[:, step] = best, best_lp
            steps = step + 1
            if longest:
                generating = offset <= step
                finished |= generating & (torch.isin(best, eos) | (step - offset + 1 >= max_new_tokens))
            else:
                finished |= torch.isin(best, eos)
            if step == total - 1:
                break
            if steps % self.config.sync_every == 0 and bool(finished.all()):  # the only mid-loop sync
                break
            # a finished row keeps stepping on its own output: rows never mix, and it is cut below
            ids = torch.where(step < offset, prefix[:, min(step, longest - 1)], best) if longest else best
            logits, state = self.runner.step(ids.unsqueeze(1), text_len + step, state)
        tokens, logps = [], []
        for row, (row_tokens, row_lp) in enumerate(zip(chosen[:, :steps].tolist(), chosen_lp[:, :steps].tolist())):
            first = offsets[row]
            row_tokens = row_tokens[first : first + max_new_tokens]
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in self.eos_ids), len(row_tokens))
            tokens.append(row_tokens[:end])
            logps.append(row_lp[first : first + end])
        self.stats.tokens_generated += batch * steps
        return tokens, logps


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
