"""Questions/s with and without the image-token cache (issue #13), same run, same windows, same answers.

A live stream's windows are captioned first, as the daemon captions them (`keep_kv`: their image
keys/values are kept). Then the same questions are asked about those windows three ways:

- kv:       the image-token cache holds the window: only the question's and the answer's tokens run;
- features: no image-token cache, but the frames' vision features are cached (what a question about a
            captioned window would cost without the cache): the pass over the image tokens runs again;
- cold:     nothing cached: vision tower, image pass and tokens.

Each way asks one question at a time (`--batch 1`, what a watch or a console does) and in batches of
`--batch`. The answers are checked to be identical across the three (so are the token counts; both recorded).

    python benchmarks/bench_questions.py                 # bundled world-git and the git-base-vatex shape, 1 thread
    python benchmarks/bench_questions.py --models bundled --windows 8 --threads 2

Writes benchmarks/results/questions-cpu.json and questions-cpu.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ensure_checkpoint, loadavg, log, machine_info
from streamer.defaults import BUNDLED_MODEL
from streamer.engine import Engine, EngineConfig
from streamer.types import Frame, Window

QUESTIONS = ["what colour is it ?", "how many are there ?", "which way does it move ?", "is there a red circle ?"]
MODES = ("kv", "features", "cold")


def world_windows(count: int, frames: int, size: int, window: float = 3.0, hop: float = 1.0) -> list[Window]:
    """A live stream's windows over the synthetic world: `window` seconds, one every `hop`."""
    from streamer.training.world import random_scene

    rng = np.random.default_rng(5)
    scene = random_scene(rng, duration=count * hop + window, start=0.0)
    step = window / frames
    shared: dict[int, Frame] = {}  # overlapping windows share frames, as the sampler's do

    def frame(t_index: int) -> Frame:
        if t_index not in shared:
            t = (t_index + 0.5) * step
            shared[t_index] = Frame("cam", t_index, t, scene.frame(t, size, size))
        return shared[t_index]

    per_hop = round(hop / step)
    return [Window("cam", k, tuple(frame(k * per_hop + j) for j in range(frames))) for k in range(count)]


def run_model(label: str, path: str, args) -> dict:
    log(f"{label}: loading {path}")
    cfg = {"model": path, "device": "cpu", "threads": args.threads, "max_new_tokens": args.max_new_tokens}
    engines = {
        "kv": Engine.load(EngineConfig(**cfg)),
        "features": Engine.load(EngineConfig(**cfg, kv_cache_windows=0)),
        "cold": Engine.load(EngineConfig(**cfg, cache_frames=0, kv_cache_windows=0)),
    }
    torch.set_num_threads(args.threads)
    engine = engines["kv"]
    size = engine.spec.crop_hw[0] if engine.spec.crop_hw else 224
    windows = world_windows(args.windows, engine.num_frames, size)
    per_window = args.questions_per_window
    # a batch of questions spans several windows (a batch about one window would share its image pass)
    items = [(w, QUESTIONS[(i + q) % len(QUESTIONS)]) for q in range(per_window) for i, w in enumerate(windows)]
    for name in ("kv", "features"):  # the stream's captions: what the daemon pays anyway
        started = time.perf_counter()
        for w in windows:
            engines[name].caption([w], keep_kv=1)
        log(f"{label}: {name}: captioned {len(windows)} windows in {time.perf_counter() - started:.1f} s")
    result: dict = {"model": label, "path": path, "windows": len(windows), "questions_per_window": per_window,
                    "frames_per_window": engine.num_frames,
                    "image_tokens_per_window": None, "max_new_tokens": args.max_new_tokens, "modes": {}}
    answers: dict[str, list[str]] = {}
    for batch in sorted({1, args.batch}):
        runs: dict[str, list[float]] = {name: [] for name in MODES}
        tokens: dict[str, int] = {}
        for _ in range(args.repeat):  # modes interleaved: load on a shared machine falls on each alike
            for name in MODES:
                eng = engines[name]
                eng.stats.kv_hits = eng.stats.kv_misses = 0
                tokens_before = eng.stats.tokens_generated
                got = []
                started = time.perf_counter()
                for at in range(0, len(items), batch):
                    got += eng.answer(items[at : at + batch])
                runs[name].append(time.perf_counter() - started)
                answers[f"{name}/{batch}"] = [a.answer for a in got]
                tokens[name] = eng.stats.tokens_generated - tokens_before
        for name in MODES:
            best = min(runs[name])
            result["modes"][f"{name}/batch{batch}"] = {
                "questions": len(items), "seconds_best": round(best, 4),
                "seconds_median": round(float(np.median(runs[name])), 4), "runs": len(runs[name]),
                "questions_per_s": round(len(items) / best, 3), "tokens": tokens[name],
                "kv_hits": engines[name].stats.kv_hits, "kv_misses": engines[name].stats.kv_misses,
            }
            log(f"{label}: {name} batch {batch}: {len(items) / best:.2f} questions/s (best of {len(runs[name])})")
    reference = answers["kv/1"]
    result["answers_identical"] = all(a == reference for a in answers.values())
    if not result["answers_identical"]:  # a near-tie flipped by batching (random weights): tokens are recorded
        log(f"{label}: WARNING the answers differ between modes: {answers}")
    row = engine.kv_cache.bytes // max(1, len(engine.kv_cache))
    result["kv_bytes_per_window"] = row
    config = engine.runner.model_config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    result["image_tokens_per_window"] = patches * engine.num_frames
    for batch in sorted({1, args.batch}):
        modes = result["modes"]
        kv = modes[f"kv/batch{batch}"]["questions_per_s"]
        result[f"speedup_batch{batch}"] = {
            "kv_vs_features": round(kv / modes[f"features/batch{batch}"]["questions_per_s"], 2),
            "kv_vs_cold": round(kv / modes[f"cold/batch{batch}"]["questions_per_s"], 2),
        }
    result["example_answers"] = reference[:4]
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    colours = {"kv": "#2a9d8f", "features": "#e9c46a", "cold": "#e76f51"}
    for ax, model in zip(axes[0], models):
        batches = sorted({int(k.split("batch")[1]) for k in model["modes"]})
        width = 0.8 / len(MODES)
        for m, name in enumerate(MODES):
            values = [model["modes"][f"{name}/batch{b}"]["questions_per_s"] for b in batches]
            xs = [i + (m - 1) * width for i in range(len(batches))]
            bars = ax.bar(xs, values, width, label={"kv": "image-token cache", "features": "vision features cached",
                                                    "cold": "nothing cached"}[name], color=colours[name])
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(batches)), [f"{b} question{'s' if b > 1 else ''} per call" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("questions / s")
        speed = model["speedup_batch1"]
        ax.set_title(f"{model['model']} ({model['image_tokens_per_window']} image tokens)\n"
                     f"cache: {speed['kv_vs_features']}x vs features, {speed['kv_vs_cold']}x vs cold (1 per call)",
                     fontsize=9)
        ax.legend(fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"Questions about captioned live windows, CPU: {machine['cpu_model']}, "
                 f"{result['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bundled,base", help="comma-separated: bundled, base, tiny or a path")
    parser.add_argument("--windows", type=int, default=8, help="windows asked about (per model)")
    parser.add_argument("--base-windows", type=int, default=4, help="windows asked about on the base shape")
    parser.add_argument("--questions-per-window", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode (best kept); the base shape runs once")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    models = []
    for which in args.models.split(","):
        label, path = ("world-git (bundled)", str(BUNDLED_MODEL)) if which == "bundled" else ensure_checkpoint(which)
        if which == "base":
            label = "git-base-vatex shape (random weights)"
        windows = args.base_windows if which == "base" else args.windows
        repeat = 1 if which == "base" else args.repeat
        models.append(run_model(label, path, argparse.Namespace(**{**vars(args), "windows": windows, "repeat": repeat})))
    result = {"threads": args.threads, "questions": QUESTIONS, "models": models,
              "machine": machine_info(loadavg=loadavg())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "questions-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "questions-cpu.png")
    print(json.dumps([{k: m[k] for k in ("model", "speedup_batch1", f"speedup_batch{args.batch}",
                                         "kv_bytes_per_window")} for m in models], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
