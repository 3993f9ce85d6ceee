#!/usr/bin/env python
"""How captioning scales with the number of live streams: naive loop, engine on CPU, engine on GPU.

    python benchmarks/bench_streams.py --model tiny                 # 1, 4, 16, 64 streams, about 2 min on 2 cores
    python benchmarks/bench_streams.py --model base --streams 1,4   # git-base-vatex shape on a CPU
    python benchmarks/bench_streams.py --model base --streams 1,4,16,64,128   # on a GPU machine

N streams run at hop 1 s (window 3 s, 6 frames): every second of media time
each stream completes one window, so a "tick" hands the captioner N windows
at once (all streams in phase: the worst case for latency). For each N and
each path the script captions --ticks ticks after one cold tick (every
stream's first window, all 6 frames new) and records:

- windows/s over the measured ticks, and its ratio to the naive loop;
- tick time: seconds to caption all N windows of one tick. The path keeps up
  in real time with N streams if every tick takes at most one hop;
  `capacity_streams` = N * hop / mean tick time is how many streams it would
  sustain at that batch size;
- latency per window: from the start of its tick to its caption, p50/p99;
- peak GPU memory (CUDA paths).

Paths, on one checkpoint and the same synthetic frames:

  naive        the HF-example loop, fp32 on the CPU, one window at a time:
               image processor + model.generate (6 frames through the vision
               tower per window). Sequential, so its windows/s does not grow
               with N; it runs for N <= --naive-max-streams only.
  engine-cpu   streamer's Engine on the CPU (fp32; --cpu-dtypes adds others,
               e.g. bfloat16 on CPUs with AMX), batches of --cpu-batch.
  engine-cuda  the Engine on the GPU when there is one (--cuda-dtype, default
               bfloat16), batches of up to --cuda-batch, pipelined the way the
               daemon's scheduler does it on CUDA: batch k+1 is prepared
               (upload + vision, on the engine's vision stream) before batch k
               is finished (decoder).

Ticks are interleaved across paths (path order rotating) so load from other
processes hits every path alike. Captions are compared with the naive loop's
(identical fraction per path). Output: <out>/streams-<model>-<device>.json and
.png. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_engine import build_windows, naive_caption  # noqa: E402
from common import ensure_checkpoint, machine_info  # noqa: E402

from streamer.engine import Engine, EngineConfig  # noqa: E402
from streamer.types import Window  # noqa: E402

HOP = 1.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    """One path: how it captions the N windows of a tick, and what that cost."""

    def __init__(self, name: str, engine: Engine | None, loaded, batch: int, max_new_tokens: int, pipeline: bool) -> None:
        self.name, self.engine, self.loaded = name, engine, loaded
        self.batch, self.max_new_tokens, self.pipeline = batch, max_new_tokens, pipeline
        self.cuda = engine is not None and engine.device.type == "cuda"

    def reset(self) -> None:
        if self.engine is not None:
            self.engine.cache.clear()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.engine.device)

    def tick(self, windows: list[Window]) -> tuple[float, list[float], dict[tuple[str, int], str]]:
        """(tick seconds, per-window latency from the tick's start, texts)."""
        texts: dict[tuple[str, int], str] = {}
        latencies: list[float] = []
        start = time.perf_counter()
        if self.engine is None:
            for w in windows:
                texts[(w.stream_id, w.index)], _ = naive_caption(self.loaded, w, self.max_new_tokens)
                latencies.append(time.perf_counter() - start)
            return time.perf_counter() - start, latencies, texts

        batches = [windows[i : i + self.batch] for i in range(0, len(windows), self.batch)]

        def done(captions) -> None:
            now = time.perf_counter() - start  # finish() has read the tokens back: the GPU is done
            for c in captions:
                texts[(c.stream_id, c.index)] = c.text
                latencies.append(now)

        if self.pipeline:
            prepared = self.engine.prepare(batches[0])
            for nxt in batches[1:]:
                ahead = self.engine.prepare(nxt)
                done(self.engine.finish(prepared, self.max_new_tokens))
                prepared = ahead
            done(self.engine.finish(prepared, self.max_new_tokens))
        else:
            for b in batches:
                done(self.engine.caption(b, self.max_new_tokens))
        return time.perf_counter() - start, latencies, texts

    def gpu_memory(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.engine.device) / 2**20 if self.cuda else None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(runners: list[Runner], streams: int, ticks: int, fps: float, size: tuple[int, int], short_side, naive_max: int) -> dict:
    windows = build_windows(streams, ticks + 3.0, fps, size, short_side)
    by_tick: dict[int, list[Window]] = {}
    for w in windows:
        by_tick.setdefault(w.index, []).append(w)
    tick_ids = sorted(i for i, ws in by_tick.items() if len(ws) == streams)[: ticks + 1]
    active = [r for r in runners if r.engine is not None or streams <= naive_max]
    for r in active:
        r.reset()
    records = {r.name: {"tick_s": [], "latency_s": [], "texts": {}} for r in active}
    for k, t in enumerate(tick_ids):
        for j in range(len(active)):
            r = active[(k + j) % len(active)]
            seconds, latencies, texts = r.tick(by_tick[t])
            if k == 0:
                continue  # the cold tick: every stream's first window, nothing to reuse yet
            rec = records[r.name]
            rec["tick_s"].append(seconds)
            rec["latency_s"] += latencies
            rec["texts"].update({f"{s}/{i}": v for (s, i), v in texts.items()})
        log(f"  {streams} streams, tick {k}/{len(tick_ids) - 1}: "
            + ", ".join(f"{r.name} {records[r.name]['tick_s'][-1]:.2f} s" for r in active if k and records[r.name]["tick_s"]))
    out = {}
    naive_texts = records.get("naive", {}).get("texts")
    for r in active:
        rec = records[r.name]
        mean_tick = float(np.mean(rec["tick_s"]))
        out[r.name] = {
            "windows_per_s": streams / mean_tick,
            "tick_s_mean": mean_tick,
            "tick_s_max": float(np.max(rec["tick_s"])),
            "real_time": bool(np.max(rec["tick_s"]) <= HOP),
            "capacity_streams": streams * HOP / mean_tick,
            "latency_p50_s": percentile(rec["latency_s"], 50),
            "latency_p99_s": percentile(rec["latency_s"], 99),
            "gpu_memory_peak_mib": r.gpu_memory(),
            "identical_to_naive": (
                sum(rec["texts"][k] == v for k, v in naive_texts.items()) / len(naive_texts)
                if naive_texts and r.name != "naive" else None
            ),
            "texts": rec["texts"],
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({name for point in result["points"] for name in point["paths"]}, key=lambda n: (n != "naive", n))
    for name in names:
        xs = [p["streams"] for p in result["points"] if name in p["paths"]]
        ys = [p["paths"][name]["windows_per_s"] for p in result["points"] if name in p["paths"]]
        ax1.plot(xs, ys, marker="o", label=name)
        ys = [p["paths"][name]["latency_p99_s"] * 1000 for p in result["points"] if name in p["paths"]]
        ax2.plot(xs, ys, marker="o", label=f"{name} p99")
    xs = [p["streams"] for p in result["points"]]
    ax1.plot(xs, [x / HOP for x in xs], "k:", label="needed for real time")
    ax2.axhline(250, color="r", ls=":", label="250 ms")
    ax2.axhline(HOP * 1000, color="k", ls=":", label="one hop")
    for ax, title, ylabel in ((ax1, "windows/s", "windows/s"), (ax2, "window latency (all streams in phase)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("live streams (hop 1 s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result['model']}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu_model']} / {result['machine'].get('gpu') or 'no GPU'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, base (git-base-vatex shape, random weights) or a checkpoint dir")
    ap.add_argument("--streams", default="1,4,16,64", help="stream counts (default 1,4,16,64)")
    ap.add_argument("--ticks", type=int, default=2, help="measured ticks per stream count, after one cold tick (default 2)")
    ap.add_argument("--naive-max-streams", type=int, default=16,
                    help="run the naive loop up to this many streams (default 16; 0: not at all, e.g. where the "
                         "transformers installed cannot run it: 5.17's GIT generate indexes past 1024 positions)")
    ap.add_argument("--cpu-batch", type=int, default=8)
    ap.add_argument("--cpu-dtypes", default="float32", help="engine-cpu dtypes, e.g. float32,bfloat16 ('' = no CPU engine)")
    ap.add_argument("--cuda-batch", type=int, default=64)
    ap.add_argument("--cuda-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: what Engine.load picks)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    label, path = ensure_checkpoint(args.model)
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    base_cfg = {"model": path, "max_new_tokens": args.max_new_tokens, "cache_frames": 4096}
    if args.threads:
        base_cfg["threads"] = args.threads
    log(f"loading {path} (fp32, CPU)")
    cpu32 = Engine.load(EngineConfig(device="cpu", dtype="float32", **base_cfg))
    runners = [Runner("naive", None, cpu32.loaded, 1, args.max_new_tokens, False)] if args.naive_max_streams > 0 else []
    for dtype in [d for d in args.cpu_dtypes.split(",") if d]:
        engine = cpu32 if dtype == "float32" else Engine.load(EngineConfig(device="cpu", dtype=dtype, **base_cfg))
        name = "engine-cpu" if dtype == "float32" else f"engine-cpu-{dtype}"
        runners.append(Runner(name, engine, engine.loaded, args.cpu_batch, args.max_new_tokens, False))
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        log(f"loading {path} ({args.cuda_dtype}, {gpu})")
        engine = Engine.load(EngineConfig(device="cuda", dtype=args.cuda_dtype, **base_cfg))
        runners.append(Runner("engine-cuda", engine, engine.loaded, args.cuda_batch, args.max_new_tokens, True))
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = cpu32.spec
    input_hw = spec.crop_hw or spec.resize_hw or (spec.shortest_edge, spec.shortest_edge)
    size = (input_hw[1], input_hw[0])  # frames at the model's input size: no resizing in any path
    warm = build_windows(2, 4.0, args.fps, size, cpu32.frame_short_side, prefix="warm", seed0=99)
    for r in runners:
        log(f"[{r.name}] warm-up")
        r.tick(warm[: max(1, min(len(warm), r.batch))])

    started = time.perf_counter()
    points = []
    for n in counts:
        log(f"{n} streams")
        paths = measure(runners, n, args.ticks, args.fps, size, cpu32.frame_short_side, args.naive_max_streams)
        points.append({"streams": n, "paths": paths})
    # sequential, so the same at any N: pooled over every tick it ran
    naive_ticks = [(p["streams"], p["paths"]["naive"]["tick_s_mean"]) for p in points if "naive" in p["paths"]]
    naive_rate = sum(n for n, _ in naive_ticks) / sum(t for _, t in naive_ticks) if naive_ticks else None
    summary = {}
    for r in runners:
        rows = [p for p in points if r.name in p["paths"]]
        ok = [p["streams"] for p in rows if p["paths"][r.name]["real_time"] and p["paths"][r.name]["latency_p99_s"] <= 0.25]
        summary[r.name] = {
            "best_windows_per_s": max(p["paths"][r.name]["windows_per_s"] for p in rows),
            "speedup_vs_naive": (max(p["paths"][r.name]["windows_per_s"] for p in rows) / naive_rate) if naive_rate else None,
            "max_streams_real_time_p99_under_250ms": max(ok) if ok else 0,
            "max_streams_real_time": max((p["streams"] for p in rows if p["paths"][r.name]["real_time"]), default=0),
        }
    device = "cuda" if gpu else "cpu"
    result = {
        "benchmark": "bench_streams",
        "model": label,
        "checkpoint": path,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(transformers=__import__("transformers").__version__, gpu=gpu),
        "workload": {"window_s": 3.0, "frames": 6, "hop_s": HOP, "fps": args.fps, "frame_size": list(size),
                     "ticks": args.ticks, "max_new_tokens": args.max_new_tokens, "cpu_batch": args.cpu_batch,
                     "cuda_batch": args.cuda_batch, "cuda_dtype": args.cuda_dtype,
                     "arrival": "all streams in phase: N windows at the start of each tick"},
        "naive_windows_per_s": naive_rate,
        "summary": summary,
        "points": points,
        "total_s": time.perf_counter() - started,
        "loadavg": list(os.getloadavg()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"streams-{label}-{device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))

    print(f"{label} on {result['machine']['cpu_model']} / {gpu or 'no GPU'}, hop {HOP:g} s, {args.ticks} ticks per point")
    print(f"{'streams':>7} {'path':<22} {'win/s':>8} {'vs naive':>8} {'tick s':>7} {'real time':>9} {'p50 ms':>7} {'p99 ms':>7} {'GPU MiB':>8} {'same':>5}")
    for p in points:
        for name, m in p["paths"].items():
            ratio = f"{m['windows_per_s'] / naive_rate:.1f}x" if naive_rate else "-"
            same = "-" if m["identical_to_naive"] is None else f"{m['identical_to_naive']:.2f}"
            mem = "-" if m["gpu_memory_peak_mib"] is None else f"{m['gpu_memory_peak_mib']:.0f}"
            print(f"{p['streams']:>7} {name:<22} {m['windows_per_s']:>8.2f} {ratio:>8} {m['tick_s_mean']:>7.2f} "
                  f"{'yes' if m['real_time'] else 'no':>9} {m['latency_p50_s'] * 1000:>7.0f} {m['latency_p99_s'] * 1000:>7.0f} {mem:>8} {same:>5}")
    for name, s in summary.items():
        print(f"{name}: best {s['best_windows_per_s']:.2f} windows/s"
              + (f" = {s['speedup_vs_naive']:.1f}x naive" if s["speedup_vs_naive"] else "")
              + f"; real time up to {s['max_streams_real_time']} streams, with p99 <= 250 ms up to {s['max_streams_real_time_p99_under_250ms']}")
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
