"""The model that ships with streamer: loads by default, and is accurate on held-out clips.

The threshold is below what was measured when it was trained (see
streamer/models/world-git/README.md): a broken pipeline (wrong colours, frame
order, preprocessing) drops far below it, as the last test shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamer.defaults import BUNDLED_MODEL, BUNDLED_MODEL_NAME
from streamer.engine import Engine, EngineConfig
from streamer.training.evaluate import evaluate, synthetic_clips
from streamer.types import Frame, Window

HELD_OUT_SEED = 10_000  # training draws from seed 0 onwards; these scenes were never seen
EXACT_MATCH_FLOOR = 0.85  # measured 0.95 on these 120 clips (0.97 on 200) when stage 4 shipped (the card)
LIVE_SEED = 20_000  # `streamer eval --live`'s default: no training run draws scenes from it
# Stage 6 (the card) measured on these 8 scenes: exact 0.9375 (30 of 32 windows), flicker 4.1 / 100, change delay
# median 3.0 s, max 3.67 s (stage 5: 0.84, 4.1, 3.0 s, 5.33 s; stage 4: 0.81, 10.2, 3.0 s, 3.67 s). Every cut is
# named within the #14 target (hop + window = 4 s) here; the full evaluation still has a few that are not.
LIVE_EXACT_FLOOR = 0.88
LIVE_FLICKER_CEILING = 6.0
LIVE_DELAY_CEILING = 4.0


@pytest.fixture(scope="module")
def bundled():
    return Engine.load(EngineConfig(model=str(BUNDLED_MODEL), max_new_tokens=12))


def test_the_bundled_model_is_small_and_documented():
    weights = BUNDLED_MODEL / "model.safetensors"
    assert weights.stat().st_size < 8 * 1024 * 1024
    args = json.loads((BUNDLED_MODEL / "training_args.json").read_text())
    assert isinstance(args["seed"], int) and args["steps"] > 0  # how it was trained: recorded with it
    assert (BUNDLED_MODEL / "README.md").is_file()


def test_no_model_given_and_no_hub_means_the_bundled_model(tmp_path, caplog):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    code = "from streamer.engine import Engine, EngineConfig; print(Engine.load(EngineConfig()).model_name)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == BUNDLED_MODEL_NAME
    assert "using the bundled model" in result.stderr  # said, not silent


def test_held_out_accuracy(bundled):
    result = evaluate(bundled, synthetic_clips(120, HELD_OUT_SEED, bundled.num_frames, 64))
    print(json.dumps(result.to_dict(), indent=1))
    assert result.exact_match >= EXACT_MATCH_FLOOR
    for part in ("count", "size", "colour", "shape"):  # measured 0.99 / 0.975 / 1.00 / 0.958
        assert result.part_accuracy[part] >= 0.9, (part, result.part_accuracy)
    assert result.part_accuracy["event"] >= 0.9  # which way things move, appear or disappear: measured 0.99


def _broken(clips, how):
    for window, caption in clips:
        frames = window.frames
        if how == "bgr":
            frames = tuple(Frame(f.stream_id, f.seq, f.pts, np.ascontiguousarray(f.image[..., ::-1])) for f in frames)
        elif how == "reversed":
            frames = tuple(Frame(f.stream_id, f.seq, g.pts, f.image) for f, g in zip(reversed(frames), frames))
        yield Window(window.stream_id, window.index, frames), caption


def test_a_pipeline_that_swaps_channels_or_reorders_frames_is_caught(bundled):
    clips = list(synthetic_clips(60, HELD_OUT_SEED + 1, bundled.num_frames, 64))
    good = evaluate(bundled, iter(clips))
    bgr = evaluate(bundled, _broken(clips, "bgr"))
    backwards = evaluate(bundled, _broken(clips, "reversed"))
    # measured when it shipped: colour 1.00 -> 0.47 with BGR; event 1.00 -> 0.00 with frames reversed
    assert bgr.part_accuracy["colour"] < good.part_accuracy["colour"] - 0.3  # red <-> blue
    assert backwards.part_accuracy["event"] < 0.2  # every left <-> right, up <-> down, appear <-> disappear
    assert good.exact_match - max(bgr.exact_match, backwards.exact_match) > 0.4


def _trained_for_live() -> bool:
    return json.loads((BUNDLED_MODEL / "training_args.json").read_text()).get("data") == "live"


@pytest.mark.skipif(not _trained_for_live(), reason="the bundled model was trained on clean clips only "
                    "(`streamer train --data live` is the live-robust fine-tune: see its README)")
def test_live_stream_captions_are_right_steady_and_on_time():
    # issue #14: windows of a live stream (H.264 at a camera's bitrate, the daemon's own path, scene cuts at
    # every phase of the hop), stabilizer off; a seed no training used. Measured when it shipped: see the card.
    from streamer.training.live import live_evaluation

    result = live_evaluation(str(BUNDLED_MODEL), seed=LIVE_SEED, scenes=8, scene_seconds=6.0, max_new_tokens=12)
    off = result["off"]
    print(json.dumps({k: off[k] for k in ("exact", "parts", "flicker_per_100", "change_delay")}, indent=1))
    assert off["exact"] >= LIVE_EXACT_FLOOR, off["wrong"]
    assert off["flicker_per_100"] <= LIVE_FLICKER_CEILING
    delay = off["change_delay"]
    assert delay["missed"] <= 1 and delay["max"] <= LIVE_DELAY_CEILING  # media time, from the cut
    assert delay["median"] <= 4.0  # the #14 target (hop + window) for the typical cut


def test_eval_command_reports_the_scores(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "eval", "--model", str(BUNDLED_MODEL), "--clips", "24", "--json"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clips"] == 24 and report["windows_per_second"] > 0
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(report["scores"])
