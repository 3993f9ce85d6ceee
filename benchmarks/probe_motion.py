"""Which way things move, on clean frames: where a world model reads motion and where it guesses.

The live evaluation (`streamer eval --live`) splits its score by kind of window (whole objects, objects
partly or mostly outside the view, wrapping ones) but mixes in H.264, the engine's crop and cuts. These
probes isolate the motion: clean frames at the model's input size, one or two objects, a 3 s window of
6 frames, the caption's last word (the event) scored against `Scene.truth_for_window`:

- centre: whole objects crossing the middle of the frame, 0.03-0.3 frame/s (the training clips: 0.15-0.23);
- side:   whole objects moving slowly (0.04-0.09 frame/s) on one side of the frame, never crossing the middle;
- edge:   objects entering or leaving at an edge (0.05-0.4 frame/s, as live scenes), sliver to whole
          (`world.random_edge_scene`, what `streamer train --edge-share` trains on);
- wrap:   objects leaving one edge and coming back at the other between two frames (0.05-0.4 frame/s;
          `world.random_wrap_scene`, what `streamer train --wrap-share` trains on): the jump across the frame
          goes against the motion, which only the object's steps before and after it show.

Scores are split by path (direction, where) and by speed. A model that reads motion from frame to frame
gets side as centre at the same speed; one that learned where objects are at the start or end of a
training clip (they cross the middle there) fails side and edge.

    python benchmarks/probe_motion.py                           # the bundled model, 400 windows a probe
    python benchmarks/probe_motion.py --model runs/ckpt --windows 200 --out /tmp/probe.json

Writes benchmarks/results/motion-probe.json (and .png): per probe, event accuracy, the share named with
the reverse direction, exact match, and the event accuracy per (direction, where) and per speed band.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import log, machine_info, save_result
from streamer.defaults import BUNDLED_MODEL
from streamer.training.evaluate import _parts
from streamer.training.world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    REVERSED,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    log_uniform,
    random_edge_scene,
    random_wrap_scene,
    window_times,
)

PROBES = ("centre", "side", "edge", "wrap")
WINDOW = 3.0


def probe_scene(rng: np.random.Generator, probe: str) -> tuple[Scene, str]:
    """A scene whose window [0, 3) the probe asks about, and where its path lies (for the split)."""
    if probe == "edge":  # what `streamer train --edge-share` draws: a model trained on it has seen such windows
        scene = random_edge_scene(rng, WINDOW)
        first = scene.objects[0]
        at_high_edge = (first.x + first.vx * WINDOW / 2 if first.vx else first.y + first.vy * WINDOW / 2) > 0.5
        return scene, "enters" if at_high_edge == (first.vx + first.vy < 0) else "leaves"
    if probe == "wrap":  # the share of the window before the jump: the object leaves early or comes back late
        scene = random_wrap_scene(rng, WINDOW)
        times = window_times(0.0, WINDOW)
        first = scene.objects[0]
        steps = [abs(np.subtract(scene._position(first, a), scene._position(first, b))).max() > 0.5
                 for a, b in itertools.pairwise(times)]
        jump = steps.index(True)  # of 5 steps between 6 frames
        return scene, "jumps early" if jump < 2 else "jumps mid-window" if jump == 2 else "jumps late"
    event = list(MOTIONS)[rng.integers(len(MOTIONS))]
    dx, dy = MOTIONS[event]
    size = list(SIZES)[rng.integers(len(SIZES))]
    r = SIZES[size] / 2
    speed = log_uniform(rng, 0.03, 0.3) if probe == "centre" else rng.uniform(0.04, 0.09)
    travel = speed * WINDOW
    if probe == "centre":
        middle = 0.5 + rng.uniform(-0.25, 0.25) * travel  # the first and last frames on either side
        where = "crosses"
    else:
        high = bool(rng.integers(2))
        lo, hi = (r + 0.02 + travel / 2, 0.5 - travel / 2) if not high else (0.5 + travel / 2, 1 - r - 0.02 - travel / 2)
        middle = rng.uniform(lo, max(lo, hi))
        where = "high side" if high else "low side"
    along = middle - (dx + dy) * travel / 2
    count = 1 if rng.random() < 0.7 else 2
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    objects = []
    for i in range(count):
        lane = (i + 0.5) / count if count > 1 else rng.uniform(0.3, 0.7)
        x, y = (lane, along) if dy else (along, lane)
        objects.append(Obj(shape, colour, size, x, y, dx * speed, dy * speed))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(tuple(objects), event, background, seed=int(rng.integers(2**31)), wrap=False), where


SPEEDS = ((0.0, 0.06), (0.06, 0.12), (0.12, 0.2), (0.2, 1.0))  # frame widths (heights) per second


def probe_windows(probe: str, count: int, seed: int, size: int) -> list[tuple[list[np.ndarray], str, str, float]]:
    """(frames, truth caption, where, speed) of `count` windows whose truth is a motion."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        scene, where = probe_scene(rng, probe)
        truth = scene.truth_for_window(0.0, WINDOW)
        if truth.event in MOTIONS:  # an edge path can leave only a sliver under a quarter: nothing in view
            frames = [scene.frame(t, size, size) for t in window_times(0.0, WINDOW)]
            out.append((frames, truth.caption, where, abs(scene.objects[0].vx + scene.objects[0].vy)))
    return out


def score(captions: list[str], windows: list[tuple[list[np.ndarray], str, str, float]]) -> dict:
    by_path: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_speed: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    right = reversed_ = exact = 0
    for caption, (_, truth, where, speed) in zip(captions, windows):
        got, want = _parts(caption)["event"], _parts(truth)["event"]
        right += got == want
        reversed_ += got == REVERSED[want]
        exact += caption == truth
        low, high = next(band for band in SPEEDS if band[0] <= speed < band[1])
        for split, key in ((by_path, f"{want}, {where}"), (by_speed, f"{low:g}-{high:g}")):
            split[key][0] += got == want
            split[key][1] += 1
    n = len(windows)

    def rows(split: dict[str, list[int]]) -> dict:
        return {k: {"windows": v[1], "event": round(v[0] / v[1], 4)} for k, v in sorted(split.items())}

    return {"windows": n, "event": round(right / n, 4), "reversed": round(reversed_ / n, 4), "exact": round(exact / n, 4),
            "by_path": rows(by_path), "by_speed": rows(by_speed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--windows", type=int, default=400, help="per probe")
    ap.add_argument("--seed", type=int, default=30_000, help="far from training seeds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/motion-probe.json")
    args = ap.parse_args()

    import torch

    from streamer.engine import Engine, EngineConfig
    from streamer.types import Frame, Window

    engine = Engine.load(EngineConfig(model=args.model, device="cpu", threads=args.threads))
    size = engine.spec.crop_hw[0] if engine.spec.crop_hw else 64
    result = {"model": args.model, "seed": args.seed, "input_size": size, "probes": {},
              "machine": machine_info(torch_threads=torch.get_num_threads())}
    for n, probe in enumerate(PROBES):
        windows = probe_windows(probe, args.windows, args.seed + n, size)
        captions: list[str] = []
        for start in range(0, len(windows), 32):
            batch = [Window(f"_probe{i}", 0, tuple(Frame(f"_probe{i}", j, float(j), img) for j, img in enumerate(frames)))
                     for i, (frames, *_) in enumerate(windows[start : start + 32], start)]
            captions += [c.text for c in engine.caption(batch)]
            for w in batch:
                engine.forget_stream(w.stream_id)
        result["probes"][probe] = score(captions, windows)
        s = result["probes"][probe]
        log(f"{probe}: event {s['event']:.1%}, reversed {s['reversed']:.1%}, exact {s['exact']:.1%} ({s['windows']} windows)")

    def draw(ax) -> None:  # direction right per speed band, one line per probe
        bands = [f"{low:g}-{high:g}" for low, high in SPEEDS]
        for probe in PROBES:
            rows = result["probes"][probe]["by_speed"]
            shown = [b for b in bands if b in rows]
            ax.plot([bands.index(b) for b in shown], [rows[b]["event"] for b in shown], marker="o", label=probe)
        ax.set_xticks(range(len(bands)), [f"{b} frame/s" for b in bands], fontsize=7)
        ax.set_ylim(0.3, 1.0)
        ax.set_ylabel("direction right")
        ax.legend(fontsize=7)

    save_result(Path(args.out), result, draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
