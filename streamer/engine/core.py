"""The captioning engine: batched GIT inference with per-frame feature reuse.

GIT's vision tower encodes every frame on its own (GitModel.forward: per-frame
image_encoder, + img_temporal_embedding[slot], then visual_projection), so a
frame shared by overlapping windows needs encoding once. The engine keeps each
frame's encoder output in a FeatureCache, builds each window's image tokens
from cached features, and runs only the text decoder per window: one prefill
over [image tokens, BOS] for the whole batch, then greedy decoding with the
KV cache.

Two greedy loops give the same tokens (tests/test_engine.py):
- "compact" (CPU default): rows leave the batch as they finish. It reads
  every token back to the host, which costs nothing on a CPU.
- "masked" (CUDA default): the batch keeps its shape; finished rows are
  masked on the device and the host looks only every `sync_every` tokens
  (to stop early) and once at the end, so the GPU never waits on Python.

On CUDA, `prepare` (upload, preprocessing, vision tower, projection) runs on
its own CUDA stream and `finish` (the decoder) on the current one, ordered by
an event: a caller that prepares batch k+1 before finishing batch k (the
scheduler does, with `pipeline`) gets the two overlapped on the GPU.

Not thread-safe: one thread calls `caption` at a time (the scheduler's worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamer.engine.cache import FeatureCache
from streamer.engine.loader import LoadedModel, load_model
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.types import Caption, Frame, Window

__all__ = ["Engine", "EngineConfig", "EngineStats", "PreparedBatch"]

log = logging.getLogger(__name__)


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


@dataclass
class EngineStats:
    windows: int = 0
    batches: int = 0
    frames_encoded: int = 0  # vision-tower work actually done
    frames_reused: int = 0  # frame slots served from the feature cache
    tokens_generated: int = 0
    vision_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class PreparedBatch:
    """Windows whose image tokens are computed (or, on CUDA, queued)."""

    windows: list[Window]
    image_tokens: torch.Tensor  # (B, frames * (patches + 1), D)
    ready: torch.cuda.Event | None  # recorded on the vision stream after the last kernel


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig(model=loaded.name)
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.model_name = loaded.name
        self.spec = PreprocessSpec.from_processor(loaded.image_processor)
        self.cache = FeatureCache(self.config.cache_frames)
        self.stats = EngineStats()
        cfg = self.model.config
        self.num_frames = int(cfg.num_image_with_embedding or 1)
        self._temporal = cfg.num_image_with_embedding is not None
        gen = self.model.generation_config
        self.bos_id = _first_id(gen.bos_token_id, cfg.bos_token_id, loaded.tokenizer.cls_token_id)
        eos = _first_id(gen.eos_token_id, cfg.eos_token_id, loaded.tokenizer.sep_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        greedy = self.config.greedy
        if greedy == "auto":
            greedy = "masked" if self.device.type == "cuda" else "compact"
        if greedy not in ("compact", "masked"):
            raise ValueError(f"greedy: expected auto, compact or masked, got {greedy!r}")
        self.greedy = greedy
        self._vision_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        loaded = load_model(config.model, config.device, config.dtype)
        if loaded.device.type == "cpu":
            torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) - 1))
            if config.dtype == "auto" and _cpu_has_amx():
                # fp32 stays the CPU default (it matches the reference captions exactly)
                log.info("this CPU has AMX: --dtype bfloat16 captions 2-3x faster (benchmarks/README.md)")
        return cls(loaded, config)

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
        """First half of `caption`: the image tokens of each window. On CUDA this
        only queues work on the vision stream and returns at once."""
        t0 = time.perf_counter()
        with torch.inference_mode(), _on_stream(self._vision_stream):
            image_tokens = self._image_tokens([self._fit(w.frames) for w in windows])
            ready = None
            if self._vision_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._vision_stream)
        self.stats.vision_seconds += time.perf_counter() - t0  # on CUDA: host time to queue it only
        return PreparedBatch(list(windows), image_tokens, ready)

    def finish(self, prepared: PreparedBatch, max_new_tokens: int | None = None) -> list[Caption]:
        """Second half of `caption`: greedy decoding, on the current CUDA stream."""
        windows = prepared.windows
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        t0 = time.perf_counter()
        with torch.inference_mode():
            image_tokens = prepared.image_tokens
            if prepared.ready is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(prepared.ready)
                image_tokens.record_stream(stream)  # made on the vision stream, used here
            greedy = self._greedy_masked if self.greedy == "masked" else self._greedy_compact
            token_ids, scores = greedy(image_tokens, limit)
        texts = self.loaded.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
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
        encoder = self.model.git.image_encoder
        for start in range(0, len(todo), self.config.vision_batch):
            chunk = todo[start : start + self.config.vision_batch]
            pixels = preprocess_frames([f.image for f in chunk], self.spec, self.device, self.dtype)
            hidden = encoder(pixel_values=pixels).last_hidden_state  # (b, patches+1, D_vision)
            for f, h in zip(chunk, hidden):
                features[f.key] = h
                self.cache.put(f.key, h)
        self.stats.frames_encoded += len(todo)
        return features

    def _image_tokens(self, windows: list[list[Frame]]) -> torch.Tensor:
        all_frames = [f for frames in windows for f in frames]
        encoded_before = self.stats.frames_encoded
        features = self._encode_missing(all_frames)
        self.stats.frames_reused += len(all_frames) - (self.stats.frames_encoded - encoded_before)
        git = self.model.git
        rows = []
        for frames in windows:
            per_frame = [features[f.key] for f in frames]
            if self._temporal:
                # out of place: cached features must stay untouched
                per_frame = [h + git.img_temporal_embedding[j][0] for j, h in enumerate(per_frame)]
            rows.append(torch.cat(per_frame, dim=0))
        return git.visual_projection(torch.stack(rows))  # (B, n*(patches+1), D)

    # -- text ------------------------------------------------------------------
    def _decoder(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache: PreallocatedKVCache) -> torch.Tensor:
        return _decoder_layers(self.model, hidden, mask, cache)

    def _prefill(self, image_tokens: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, PreallocatedKVCache]:
        """One decoder pass over [image tokens, BOS]: logits of the first token."""
        git, head = self.model.git, self.model.output
        batch, n_img, _ = image_tokens.shape
        device = image_tokens.device
        bos = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=device)
        text = git.embeddings(input_ids=bos, position_ids=torch.zeros_like(bos))
        hidden = torch.cat([image_tokens, text], dim=1)
        # Image tokens see each other both ways but never the text; text sees all before it.
        length = n_img + 1
        mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)  # True: may attend
        mask[..., :n_img, n_img:] = False
        cache = PreallocatedKVCache(len(git.encoder.layer), capacity=length + max_new_tokens)
        logits = head(self._decoder(hidden, mask, cache)[:, -1])
        cache.advance(length)
        return logits, cache

    def _step(self, ids: torch.Tensor, step: int, cache: PreallocatedKVCache) -> torch.Tensor:
        """Feed token `step` (0-based among generated ones) of each row; logits of the next."""
        pos = torch.full_like(ids, step + 1)
        hidden = self.model.git.embeddings(input_ids=ids, position_ids=pos)
        logits = self.model.output(self._decoder(hidden, None, cache)[:, -1])
        cache.advance(1)
        return logits

    def _greedy_compact(self, image_tokens: torch.Tensor, max_new_tokens: int) -> tuple[list[list[int]], list[float]]:
        batch = image_tokens.shape[0]
        logits, cache = self._prefill(image_tokens, max_new_tokens)
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
                keep = torch.tensor(still, device=best.device)
                cache.batch_select_indices(keep)
                best = best[keep]
                active = [active[r] for r in still]
            logits = self._step(best.unsqueeze(1), step, cache)
        scores = [s / max(1, len(t)) for s, t in zip(logprob_sum, tokens)]
        return tokens, scores

    def _greedy_masked(self, image_tokens: torch.Tensor, max_new_tokens: int) -> tuple[list[list[int]], list[float]]:
        batch, device = image_tokens.shape[0], image_tokens.device
        logits, cache = self._prefill(image_tokens, max_new_tokens)
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
            logits = self._step(best.unsqueeze(1), step, cache)
        tokens, scores = [], []
        for row_tokens, row_lp in zip(chosen[:, :steps].tolist(), chosen_lp[:, :steps].tolist()):
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in self.eos_ids), steps)
            tokens.append(row_tokens[:end])
            scores.append(sum(row_lp[:end]) / end)
        self.stats.tokens_generated += batch * steps
        return tokens, scores


def _decoder_layers(model, hidden: torch.Tensor, mask: torch.Tensor | None, cache: PreallocatedKVCache) -> torch.Tensor:
    """GIT's text decoder (GitLayer for GitLayer, same weights and order of
    operations) with scaled_dot_product_attention in place of the eager
    matmul + softmax: no (batch, heads, L, L) score tensor for the ~1200-token
    prefill, which made batched prefill slower per window than one at a time."""
    for index, layer in enumerate(model.git.encoder.layer):
        attn = layer.attention.self
        b, n, _ = hidden.shape
        shape = (b, n, attn.num_attention_heads, attn.attention_head_size)
        q = attn.query(hidden).view(shape).transpose(1, 2)
        k = attn.key(hidden).view(shape).transpose(1, 2)
        v = attn.value(hidden).view(shape).transpose(1, 2)
        k, v = cache.update(k, v, index)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(b, n, attn.all_head_size)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden


class PreallocatedKVCache:
    """Keys and values written in place into buffers sized for the whole
    generation and handed back as views. transformers' DynamicCache
    concatenates on every step, copying the ~1200 cached image positions of
    every layer for each new token. Implements what GIT's attention calls
    (`update`); the engine moves `length` on after each forward."""

    def __init__(self, layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._keys: list[torch.Tensor | None] = [None] * layers
        self._values: list[torch.Tensor | None] = [None] * layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object):
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if keys is None or values is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            keys = self._keys[layer_idx] = key.new_empty(shape)
            values = self._values[layer_idx] = value.new_empty(shape)
        end = self.length + key.shape[2]
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (rows that finished leave the batch)."""
        self._keys = [None if k is None else k.index_select(0, rows) for k in self._keys]
        self._values = [None if v is None else v.index_select(0, rows) for v in self._values]


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in some builds
    try:
        return bool(probe and probe())
    except (RuntimeError, OSError):
        return False


def _on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _first_id(*candidates):
    for c in candidates:
        if c is not None:
            return c
    raise ValueError("model config names no special token id")


def _clean(text: str) -> str:
    return " ".join(text.split())
