"""Reduced precision (bf16/fp16) against fp32 on the CPU, and on CUDA where there is a GPU.

The comparison model is the bundled world-git (small and trained): a
random-weight model has near-tied logits, so any change of precision flips
tokens there and says nothing. A trained model's margins are what a user
relies on: on them bf16 must give the fp32 captions (measured: 48/48 on the
CPU, mean log-probability within 0.022).
CI has no GPU: the CUDA tests run on a GPU machine and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from streamer.defaults import BUNDLED_MODEL
from streamer.engine import Engine, EngineConfig
from streamer.training.evaluate import synthetic_clips

CLIPS = 48
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.fixture(scope="module")
def windows():
    return [w for w, _ in synthetic_clips(CLIPS, seed=20_000, frames=6, size=64)]


@pytest.fixture(scope="module")
def fp32_captions(windows):
    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), device="cpu", dtype="float32"))
    return engine.caption(windows)


def check_same_captions(captions, reference) -> None:
    same = sum(got.text == want.text for got, want in zip(captions, reference))
    # a clip or two may sit on a near-tie of the model's own
    assert same / len(reference) >= 0.95, [(g.text, w.text) for g, w in zip(captions, reference) if g.text != w.text]
    # mean token log-probability moves by little more than bf16's resolution
    drift = max(abs(x.confidence - y.confidence) for x, y in zip(captions, reference))
    assert drift < 0.05


def test_bf16_on_the_cpu_gives_the_fp32_captions(windows, fp32_captions):
    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), device="cpu", dtype="bfloat16"))
    check_same_captions(engine.caption(windows), fp32_captions)


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gpu_captions_match_the_fp32_cpu_captions(windows, fp32_captions, dtype):
    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), device="cuda", dtype=dtype))
    assert engine.greedy == "masked"  # the GPU loop: no per-token host sync
    check_same_captions(engine.caption(windows), fp32_captions)


@cuda
def test_gpu_pipelined_batches_match_one_call_per_batch(windows, fp32_captions):
    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), device="cuda", dtype="float32"))
    batches = [windows[i : i + 8] for i in range(0, len(windows), 8)]
    got, prepared = [], engine.prepare(batches[0])
    for nxt in batches[1:]:
        ahead = engine.prepare(nxt)  # queued on the vision stream while the previous batch decodes
        got += engine.finish(prepared)
        prepared = ahead
    got += engine.finish(prepared)
    check_same_captions(got, fp32_captions)
