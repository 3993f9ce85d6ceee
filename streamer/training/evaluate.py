"""`streamer eval`: caption quality and speed of a model on held-out clips.

Scores: exact match (the synthetic world has one right caption per clip),
per-part accuracy (count, size, colour, shape, event), and the COCO caption
metrics BLEU-4, METEOR, ROUGE-L and CIDEr from `pycocoevalcap` (the
maintained reference implementation; METEOR needs Java and is skipped
without it). Windows/s is engine time only.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streamer.engine import Engine
from streamer.types import Frame, Window

__all__ = [
    "EvalResult",
    "answer_questions",
    "coco_scores",
    "evaluate",
    "evaluate_questions",
    "manifest_clips",
    "question_windows",
    "synthetic_clips",
]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    clips: int
    exact_match: float
    part_accuracy: dict[str, float]
    scores: dict[str, float]
    windows_per_second: float
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "clips": self.clips,
            "exact_match": round(self.exact_match, 4),
            "part_accuracy": {k: round(v, 4) for k, v in self.part_accuracy.items()},
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "windows_per_second": round(self.windows_per_second, 2),
            "examples": self.examples,
        }


def _parts(caption: str) -> dict[str, str]:
    """count, size, colour, shape, event of a world caption ('' where missing)."""
    words = caption.split()
    get = lambda i: words[i] if len(words) > i else ""
    return {"count": get(0), "size": get(1), "colour": get(2), "shape": get(3).rstrip("s"), "event": words[-1] if words else ""}


def coco_scores(references: list[str], candidates: list[str]) -> dict[str, float]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        log.warning("pycocoevalcap not installed: BLEU/METEOR/ROUGE-L/CIDEr skipped (pip install 'streamer[eval]')")
        return {}
    # Captions here are lower-case words already: the PTB tokenizer (Java) is not needed.
    gts = {i: [r.lower()] for i, r in enumerate(references)}
    res = {i: [c.lower() or "<empty>"] for i, c in enumerate(candidates)}
    scores = {
        "BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["METEOR"] = meteor.compute_score(gts, res)[0]
        finally:
            with meteor.lock:
                meteor.meteor_p.kill()
    return scores


def synthetic_clips(count: int, seed: int, frames: int, size: int, window: float = 3.0) -> Iterator[tuple[Window, str]]:
    import numpy as np

    from streamer.training.world import random_scene

    rng = np.random.default_rng(seed)
    step = window / frames
    for n in range(count):
        start = float(rng.uniform(0.0, 4.0))
        scene = random_scene(rng, duration=window, start=start)
        times = [start + (j + 0.5) * step for j in range(frames)]
        sid = f"_eval{n}"
        window_frames = tuple(Frame(sid, j, t, scene.frame(t, size, size)) for j, t in enumerate(times))
        yield Window(sid, 0, window_frames), scene.caption


def manifest_clips(path: str, frames: int, short_side: int | None) -> Iterator[tuple[Window, str]]:
    """Held-out clips from a manifest of {path, start, end, caption}, spread like training."""
    from streamer.training.train import read_manifest, window_from_video

    for n, (video, start, end, caption) in enumerate(read_manifest(path)):
        yield window_from_video(video, start, end, frames, short_side, f"_eval{n}"), caption


def evaluate(
    engine: Engine,
    clips: Iterator[tuple[Window, str]],
    *,
    batch_size: int = 16,
    on_progress: Callable[[float, float | None], None] | None = None,
    total: int | None = None,
) -> EvalResult:
    references: list[str] = []
    candidates: list[str] = []
    engine_seconds = 0.0
    iterator = iter(clips)
    while batch := list(itertools.islice(iterator, batch_size)):
        windows = [w for w, _ in batch]
        started = time.perf_counter()
        captions = engine.caption(windows)
        engine_seconds += time.perf_counter() - started
        for w in windows:
            engine.forget_stream(w.stream_id)
        references.extend(ref for _, ref in batch)
        candidates.extend(c.text for c in captions)
        if on_progress:
            on_progress(len(references), total)
    n = len(references)
    if n == 0:
        raise ValueError("no clips to evaluate")
    exact = sum(r == c for r, c in zip(references, candidates)) / n
    parts = {}
    for key in ("count", "size", "colour", "shape", "event"):
        parts[key] = sum(_parts(r)[key] == _parts(c)[key] for r, c in zip(references, candidates)) / n
    wrong = [{"reference": r, "caption": c} for r, c in zip(references, candidates) if r != c][:10]
    return EvalResult(n, exact, parts, coco_scores(references, candidates), n / max(engine_seconds, 1e-9), wrong)


# -- questions (GIT-VQA style: the question is the text prefix after [CLS]) ----------------------------------


def question_windows(count: int, seed: int, frames: int, size: int, *, live: bool = False) -> Iterator[tuple[list, object]]:
    """(frames, WindowTruth) of held-out windows: clean clips drawn as `synthetic_clips`
    draws them, or (`live`) windows of live-rendered scenes (H.264, the daemon's resize)."""
    import numpy as np

    from streamer.training.world import WindowTruth, clip, random_scene

    if live:
        from streamer.training.train import live_windows

        yield from itertools.islice(live_windows(seed, frames, size), count)
        return
    rng = np.random.default_rng(seed)
    for _ in range(count):
        start = float(rng.uniform(0.0, 4.0))
        scene = random_scene(rng, start=start)
        first = scene.objects[0]
        truth = WindowTruth(len(scene.objects), first.size, first.colour, first.shape, scene.event)
        yield clip(scene, frames=frames, start=start, size=size), truth


def answer_questions(engine: Engine, items: list[tuple[list, str]], max_new_tokens: int = 16,
                     batch_size: int = 32) -> list[str]:
    """The answer to each (window frames, question), by `Engine.answer`: the question is the text prefix
    after [CLS], the answer what the model generates after it (after its answer marker, if it has one:
    engine/prompts.py). Questions about the same frames (list) share their window's image part."""
    windows: dict[int, Window] = {}
    asked: list[tuple[Window, str]] = []
    for frames, question in items:
        window = windows.get(id(frames))
        if window is None:
            sid = f"_ask{len(windows)}"
            window = windows[id(frames)] = Window(sid, 0, tuple(Frame(sid, j, float(j), img) for j, img in enumerate(frames)))
        asked.append((window, question))
    answers: list[str] = []
    for start in range(0, len(asked), batch_size):
        answers += [a.answer for a in engine.answer(asked[start : start + batch_size], max_new_tokens)]
    for window in windows.values():
        engine.forget_stream(window.stream_id)
    return answers


def evaluate_questions(engine: Engine, windows: Iterator[tuple[list, object]], *, seed: int = 0) -> dict:
    """Accuracy per question kind (world.QUESTION_KINDS) on windows with known truth:
    every window is asked one question of each kind (`labelled_questions`)."""
    import numpy as np

    from streamer.training.world import QUESTION_KINDS, labelled_questions, same_answer

    rng = np.random.default_rng(seed)
    asked: list[tuple[str, list, str, str]] = []
    for frames, truth in windows:
        for kind, question, answer in labelled_questions(truth, rng):  # type: ignore[arg-type]
            asked.append((kind, frames, question, answer))
    if not asked:
        raise ValueError("no windows to ask about")
    got = answer_questions(engine, [(frames, q) for _, frames, q, _ in asked])
    accuracy = {}
    for kind in QUESTION_KINDS:
        rows = [same_answer(g, a) for (k, _, _, a), g in zip(asked, got) if k == kind]
        accuracy[kind] = round(sum(rows) / len(rows), 4)
    yes_no = [same_answer(g, a) for (k, _, _, a), g in zip(asked, got) if k in ("yes", "no")]
    accuracy["yes/no"] = round(sum(yes_no) / len(yes_no), 4)
    wrong = [{"question": q, "answer": a, "got": g} for (_, _, q, a), g in zip(asked, got) if not same_answer(g, a)][:10]
    return {"windows": len(asked) // len(QUESTION_KINDS), "accuracy": accuracy, "wrong": wrong}
