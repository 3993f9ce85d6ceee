"""The bundled model answers questions about a window (issue #13), GIT-VQA style:
the question is the text prefix after [CLS] and the answer is what the model
generates after it. Held-out windows only (training seeds are small numbers).

Thresholds sit below what was measured when the model shipped (figures in
streamer/models/world-git/README.md); a model that ignores the question or the
picture falls far below them, as the last tests show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamer.defaults import BUNDLED_MODEL
from streamer.engine import Engine, EngineConfig
from streamer.training.evaluate import answer_questions, evaluate_questions, question_windows
from streamer.training.world import Obj, Scene, clip
from streamer.types import Frame, Window


def _answers_questions() -> bool:
    vocab = json.loads((BUNDLED_MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    return "?" in vocab


# The model that answers is trained by `streamer train --data live` (see the model card); until it is the
# bundled one, say so rather than fail on a model that was never asked a question.
pytestmark = pytest.mark.skipif(not _answers_questions(), reason="the bundled model has no question vocabulary "
                                "(not trained on questions yet: streamer/models/world-git/README.md)")

HELD_OUT_SEED = 10_000
LIVE_SEED = 30_000  # live-rendered windows (H.264, the daemon's resize): a seed no training used
# Measured on these windows when the model shipped (model card, stage 4): clean colour 1.00, shape 0.93, count 1.00,
# direction 0.98, yes/no 0.98; live colour 1.00, shape 0.52, count 0.63, direction 0.82, yes/no 0.74 (stage 3: yes/no
# 0.50 on both, at chance).
FLOORS = {"colour": 0.95, "shape": 0.88, "count": 0.93, "direction": 0.93, "yes/no": 0.93}
LIVE_FLOORS = {"colour": 0.9, "shape": 0.4, "count": 0.55, "direction": 0.7, "yes/no": 0.65}


@pytest.fixture(scope="module")
def bundled():
    return Engine.load(EngineConfig(model=str(BUNDLED_MODEL), max_new_tokens=16, threads=1))  # yes/no: up to 15


def test_answers_on_held_out_clips(bundled):
    result = evaluate_questions(bundled, question_windows(60, HELD_OUT_SEED, bundled.num_frames, 64), seed=HELD_OUT_SEED)
    print(json.dumps(result, indent=1))
    for kind, floor in FLOORS.items():
        assert result["accuracy"][kind] >= floor, (kind, result["accuracy"])


def test_answers_on_live_windows(bundled):
    windows = question_windows(60, LIVE_SEED, bundled.num_frames, 64, live=True)
    result = evaluate_questions(bundled, windows, seed=LIVE_SEED)
    print(json.dumps(result, indent=1))
    for kind, floor in LIVE_FLOORS.items():
        assert result["accuracy"][kind] >= floor, (kind, result["accuracy"])


def window_of(frames: list[np.ndarray]) -> Window:
    return Window("_q", 0, tuple(Frame("_q", j, 0.25 + 0.5 * j, img) for j, img in enumerate(frames)))


def test_the_answer_follows_the_picture_and_the_question(bundled):
    scene = Scene((Obj("circle", "red", "big", 0.8, 0.5, vx=-0.2),), "left", background="gray")
    frames = clip(scene)
    bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames]  # red <-> blue
    asked = [
        (frames, "What colour is it?"), (bgr, "what colour is it ?"), (frames, "how many are there ?"),
        (frames, "which way does it move ?"), (frames[::-1], "which way does it move ?"),
        (frames, "is there a red circle ?"), (frames, "is there a red square ?"), (bgr, "is there a red circle ?"),
        (bgr, "is there a blue circle ?"),
    ]
    # BGR frames: red reads as blue; frames backwards: left reads as right
    assert answer_questions(bundled, asked) == ["red", "blue", "one", "left", "right", "yes", "no", "no", "yes"]
    # no question: the same model captions the window
    (caption,) = bundled.caption([window_of(frames)])
    assert caption.text.startswith("a big red ") and caption.text.endswith(" moves to the left")


def test_eval_questions_command_reports_every_kind():
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "eval", "--questions", "--model", str(BUNDLED_MODEL), "--clips", "12", "--json"],
        check=False, capture_output=True, text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows"] == 12
    assert set(report["accuracy"]) == {"colour", "shape", "count", "direction", "yes", "no", "yes/no"}
