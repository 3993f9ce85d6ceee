#!/usr/bin/env python
"""Every engine backend against the naive HF loop: same model, same windows, one run.

    python benchmarks/bench_backends.py [--model base|tiny|PATH] [--paths ...] [--sweep 1,4,8]
                                        [--streams 4] [--seconds S] [--repeats R] [--out benchmarks/results]

Paths (`--paths`, default all whose runtime is installed):

  naive        the checkpoint's image processor + `model.generate`, fp32, one window at a time
               (bench_engine.py's baseline, same code)
  torch-fp32   Engine, torch backend, fp32          torch-bf16   the same in bf16
  ort-fp32     Engine, ONNX Runtime, fp32 export    ort-int8     dynamic int8 export
  ov-fp32      Engine, OpenVINO, fp32 export        ov-bf16      bf16 inference precision
  ov-int8      int8-weight export, fp32 hint        ov-int8-bf16 int8 weights, bf16 hint

Each engine path runs at every batch size of --sweep, on batches taken across
--streams streams in live arrival order, feature cache on. Timing as in
bench_engine.py: the windows are cut into groups of lcm(sweep) windows and every
(path, batch) captions each group in turn, order rotating from group to group,
so load from other processes falls on all paths alike; each unit of work (a
window for naive, a batch for the engine) is timed, and the fastest of
--repeats rounds counts. Per path: windows/s and its ratio to naive (wall and
process CPU time), p50/p99 seconds per window (a window's latency in a batch
is the batch's time), the steady state (windows past each stream's first),
vision / prefill / decode split from EngineStats, and real-time streams at
hop 1 s: how many streams' windows per second the steady state sustains, each
within one hop.

Caption agreement: on the bundled (trained) model, --agreement-clips held-out
synthetic clips, each path's captions against torch fp32 (random weights have
near-tied logits, so agreement there says nothing).

Exports for the ONNX paths are made once into benchmarks/.cache/exports/.
Output: <out>/backends-<model>-cpu.json and .png. Progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np
import torch
from bench_engine import build_windows, naive_caption
from common import cpu_model, ensure_checkpoint, loadavg, log, machine_info

from streamer.defaults import BUNDLED_MODEL, BUNDLED_MODEL_NAME
from streamer.engine import Engine, EngineConfig
from streamer.engine.core import EngineStats
from streamer.engine.export import export_model, read_manifest
from streamer.engine.loader import load_model
from streamer.errors import ModelLoadError
from streamer.types import Window

EXPORTS = HERE / ".cache" / "exports"

# path -> (backend, dtype, export precision or None for torch)
PATHS: dict[str, tuple[str, str, str | None]] = {
    "torch-fp32": ("torch", "float32", None),
    "torch-bf16": ("torch", "bfloat16", None),
    "ort-fp32": ("onnxruntime", "float32", "float32"),
    "ort-int8": ("onnxruntime", "float32", "int8"),
    "ov-fp32": ("openvino", "float32", "float32"),
    "ov-bf16": ("openvino", "bfloat16", "float32"),
    "ov-int8": ("openvino", "float32", "int8"),
    "ov-int8-bf16": ("openvino", "bfloat16", "int8"),
}
RUNTIME_MODULE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def available(path: str) -> bool:
    if path == "naive":
        return True
    backend = PATHS[path][0]
    return backend == "torch" or importlib.util.find_spec(RUNTIME_MODULE[backend]) is not None


def ensure_exports(label: str, checkpoint: str, precisions: set[str]) -> dict[str, Path]:
    """benchmarks/.cache/exports/<label>-<precision>, made once per checkpoint revision."""
    out = {}
    for precision in sorted(precisions):
        target = EXPORTS / f"{label}-{precision}"
        try:
            manifest = read_manifest(target)
            from streamer.engine.export import model_revision

            if manifest.data["revision"] == model_revision(checkpoint)[2] and manifest.precision == precision:
                out[precision] = target
                continue
        except ModelLoadError:
            pass
        log(f"exporting {label} ({precision}) into {target} (once)")
        t0 = time.perf_counter()
        export_model(checkpoint, target, int8=precision == "int8", progress=lambda m: log(f"  export: {m}"))
        log(f"  export took {time.perf_counter() - t0:.0f} s")
        out[precision] = target
    return out


def open_engine(path: str, checkpoint: str, exports: dict[str, Path], max_new_tokens: int, threads: int) -> Engine:
    backend, dtype, precision = PATHS[path]
    model = checkpoint if precision is None else str(exports[precision])
    return Engine.load(EngineConfig(model=model, backend=backend, dtype=dtype, device="cpu", threads=threads,
                                    max_new_tokens=max_new_tokens))


@dataclasses.dataclass
class Unit:
    wall: float
    cpu: float
    windows: int
    steady: bool
    vision: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    frames: int = 0


class Runner:
    """One measured (path, batch): its engine (or the naive model) and what each unit cost."""

    def __init__(self, name: str, batch: int | None, engine: Engine | None, loaded, max_new_tokens: int) -> None:
        self.name, self.batch, self.engine, self.loaded, self.max_new_tokens = name, batch, engine, loaded, max_new_tokens
        self.units: dict[tuple[int, int, int], Unit] = {}
        self.texts: dict[str, str] = {}

    @property
    def label(self) -> str:
        return self.name if self.batch is None else f"{self.name} B={self.batch}"

    def warm_up(self, warm: list[Window]) -> None:
        if self.engine is None:
            naive_caption(self.loaded, warm[0], self.max_new_tokens)
        else:
            self.engine.caption((warm * self.batch)[: self.batch], self.max_new_tokens)  # type: ignore[operator]
            self.engine.cache.clear()

    def begin_round(self) -> None:
        if self.engine is not None:
            self.engine.cache.clear()  # every round starts cold, as a daemon that just started
            self.engine.stats = EngineStats()

    def run(self, rnd: int, g: int, group: list[Window]) -> None:
        step = 1 if self.engine is None else int(self.batch or 1)
        for u, j in enumerate(range(0, len(group), step)):
            chunk = group[j : j + step]
            cpu0, t0 = time.process_time(), time.perf_counter()
            unit = Unit(0.0, 0.0, len(chunk), min(w.index for w in chunk) >= 1)
            if self.engine is None:
                (w,) = chunk
                text, _ = naive_caption(self.loaded, w, self.max_new_tokens)
                self.texts[f"{w.stream_id}#{w.index}"] = text
                unit.frames = len(w.frames)
            else:
                before = dataclasses.replace(self.engine.stats)
                for w, c in zip(chunk, self.engine.caption(chunk, self.max_new_tokens)):
                    self.texts[f"{w.stream_id}#{w.index}"] = c.text
                after = self.engine.stats
                unit.vision = after.vision_seconds - before.vision_seconds
                unit.prefill = after.prefill_seconds - before.prefill_seconds
                unit.decode = (after.decode_seconds - before.decode_seconds) - unit.prefill
                unit.frames = after.frames_encoded - before.frames_encoded
            unit.wall, unit.cpu = time.perf_counter() - t0, time.process_time() - cpu0
            self.units[(rnd, g, u)] = unit
        log(f"round {rnd + 1} [{self.label}] group {g + 1}: "
            f"{sum(x.wall for (r, gg, _), x in self.units.items() if r == rnd and gg == g):.2f} s")

    def report(self, rounds: int) -> dict:
        keys = sorted({(g, u) for (_, g, u) in self.units})
        best = [min((self.units[(r, g, u)] for r in range(rounds)), key=lambda x: x.wall) for g, u in keys]
        cpu = sum(min(self.units[(r, g, u)].cpu for r in range(rounds)) for g, u in keys)

        def summary(units: list[Unit]) -> dict:
            n = sum(x.windows for x in units)
            wall = sum(x.wall for x in units)
            latencies = [x.wall for x in units for _ in range(x.windows)]
            return {
                "windows": n, "wall_s": wall, "windows_per_s": n / wall, "s_per_window": wall / n,
                "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
                "frames_encoded_per_window": sum(x.frames for x in units) / n,
                "vision_s_per_window": sum(x.vision for x in units) / n,
                "prefill_s_per_window": sum(x.prefill for x in units) / n,
                "decode_s_per_window": sum(x.decode for x in units) / n,
            }

        out = {"path": self.name, "batch": self.batch, **summary(best), "cpu_s": cpu,
               "windows_per_cpu_s": sum(x.windows for x in best) / cpu}
        steady = [x for x in best if x.steady]
        if steady:
            out["steady_state"] = summary(steady)
        out["texts"] = dict(self.texts)
        if self.engine is not None:
            out["precision"] = self.engine.precision
        return out


def realtime_streams(record: dict, hop: float = 1.0) -> int:
    """Streams at `hop` this path keeps up with: each needs one window per hop, and a stream
    past its first window costs the steady state's 2 new frames per window."""
    steady = record.get("steady_state") or record
    return int(steady["windows_per_s"] * hop)


def agreement_on_bundled(paths: list[str], clips: int, threads: int, max_new_tokens: int) -> dict:
    """Each path's captions of held-out synthetic clips vs torch fp32, on the trained bundled model."""
    from streamer.training.evaluate import synthetic_clips

    windows = [w for w, _ in synthetic_clips(clips, seed=50_000, frames=6, size=64)]
    exports = ensure_exports("world-git", str(BUNDLED_MODEL), {p for path in paths if path in PATHS for p in [PATHS[path][2]] if p})
    reference = [c.text for c in open_engine("torch-fp32", BUNDLED_MODEL_NAME, exports, max_new_tokens, threads).caption(windows)]
    out = {}
    for path in paths:
        if path == "naive":
            continue
        engine = open_engine(path, BUNDLED_MODEL_NAME, exports, max_new_tokens, threads)
        got = [c.text for b in range(0, len(windows), 4) for c in engine.caption(windows[b : b + 4])]
        same = sum(a == b for a, b in zip(got, reference))
        out[path] = {"clips": len(windows), "equal_to_torch_fp32": same, "fraction": same / len(windows),
                     "differences": [{"torch_fp32": a, "path": b} for a, b in zip(reference, got) if a != b][:5]}
        log(f"agreement [{path}] {same}/{len(windows)}")
    return out


def prefill_gflop(config) -> float:
    """Multiply-adds x 2 of one window's prefill: image part (last layer keys/values only) + BOS."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    v = config.vision_config
    n = int(config.num_image_with_embedding or 1) * ((v.image_size // v.patch_size) ** 2 + 1)
    per_token_layer = 4 * d * d + 2 * d * ff  # q, k, v, out + MLP
    attention = 2 * n * n * d  # QK^T and PV
    full = (layers - 1) * (n * per_token_layer + attention) + n * 2 * d * d  # last layer: K, V only
    projection = n * v.hidden_size * d
    return 2 * (full + projection) / 1e9


def vision_gflop(config) -> float:
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = n * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 2 * n * n * v.hidden_size
    patch = (n - 1) * 3 * v.patch_size**2 * v.hidden_size
    return 2 * (v.num_hidden_layers * per_layer + patch) / 1e9


def cpu_ghz() -> float | None:
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else None
    except OSError:
        return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    naive = result["naive"]["windows_per_s"]
    names = list(result["paths"])
    sweep = result["workload"]["sweep"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(sweep)
    x = np.arange(len(names))
    for k, b in enumerate(sweep):
        vals = [result["paths"][n]["by_batch"].get(str(b), {}).get("windows_per_s", 0) / naive for n in names]
        bars = ax1.bar(x + (k - (len(sweep) - 1) / 2) * width, vals, width, label=f"batch {b}")
        for bar, v in zip(bars, vals):
            ax1.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="grey", lw=1, ls="--")
    ax1.axhline(8.0, color="red", lw=1, ls=":", label="target 8x")
    ax1.set_xticks(x, [f"{n}\n({result['agreement'].get(n, {}).get('fraction', float('nan')):.0%} same)" for n in names], fontsize=8)
    ax1.set_ylabel("windows/s vs naive HF loop (same run)")
    ax1.set_title(f"Throughput vs naive ({naive:.3g} windows/s); () = bundled-model captions equal to torch fp32")
    ax1.legend(fontsize=8)
    streams = [result["paths"][n]["realtime_streams_hop_1s"] for n in names]
    ax2.barh(names, streams, color="#2ca02c")
    for i, s in enumerate(streams):
        ax2.annotate(str(s), (s, i), va="center", xytext=(3, 0), textcoords="offset points")
    ax2.set_xlabel("streams captioned in real time at hop 1 s (steady state)")
    ax2.invert_yaxis()
    m, wl = result["machine"], result["workload"]
    fig.suptitle(f"GIT {result['model']} on {m['cpu_model']} ({m['cpu_count']} cores, {wl['threads']} thread), "
                 f"{wl['streams']} streams x {wl['seconds']:g} s, {wl['windows']} windows, {wl['max_new_tokens']} tokens, "
                 f"best of {wl['repeats']}; load {result['loadavg_before']} -> {result['loadavg_after']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", help="base (git-base-vatex shape, random weights), tiny, or a checkpoint dir")
    ap.add_argument("--paths", default=",".join(["naive", *PATHS]), help="comma-separated paths (see above)")
    ap.add_argument("--sweep", default="1,4,8")
    ap.add_argument("--batch", type=int, default=4, help="the headline batch size")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=None, help="seconds per stream (default 6 base, 12 otherwise)")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 1 base, 2 otherwise)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--agreement-clips", type=int, default=96)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p != "naive" and p not in PATHS]
    if unknown:
        ap.error(f"unknown paths {unknown}")
    skipped = {p: f"{RUNTIME_MODULE[PATHS[p][0]]} not installed" for p in paths if not available(p)}
    paths = [p for p in paths if p not in skipped]
    sweep = sorted({int(b) for b in args.sweep.split(",") if b} | {args.batch})
    repeats = args.repeats or (1 if args.model == "base" else 2)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    agreement = agreement_on_bundled(paths, args.agreement_clips, args.threads, args.max_new_tokens)
    label, checkpoint = ensure_checkpoint(args.model)
    exports = ensure_exports(label, checkpoint, {PATHS[p][2] for p in paths if p in PATHS and PATHS[p][2]})
    seconds = args.seconds if args.seconds is not None else (6.0 if args.model == "base" else 12.0)

    loaded = load_model(checkpoint, "cpu", "float32")  # the naive loop's model
    runners: list[Runner] = [Runner("naive", None, None, loaded, args.max_new_tokens)] if "naive" in paths else []
    engines: dict[str, Engine] = {}
    for p in paths:
        if p == "naive":
            continue
        log(f"loading {p}")
        engines[p] = open_engine(p, checkpoint, exports, args.max_new_tokens, args.threads)
        for b in sweep:  # one Engine per batch size (own cache and stats), one runner underneath
            runners.append(Runner(p, b, Engine(engines[p].runner, engines[p].config), None, args.max_new_tokens))
    torch.set_num_threads(args.threads)  # Engine.load sets it too; the naive loop shares it
    spec = next(iter(engines.values())).spec if engines else None
    input_hw = (spec.crop_hw or spec.resize_hw or (spec.shortest_edge, spec.shortest_edge)) if spec else (224, 224)
    size = (input_hw[1], input_hw[0])
    short_side = spec.short_side if spec else None
    windows = build_windows(args.streams, seconds, args.fps, size, short_side)
    warm = build_windows(1, 4.0, args.fps, size, short_side, prefix="warmup", seed0=99)[:2]
    for r in runners:
        log(f"[{r.label}] warm-up")
        r.warm_up(warm)
    group_size = math.lcm(*sweep)
    groups = [windows[i : i + group_size] for i in range(0, len(windows), group_size)]
    load0 = loadavg()
    step = 0
    for rnd in range(repeats):
        for r in runners:
            r.begin_round()
        for g, group in enumerate(groups):
            log(f"round {rnd + 1}/{repeats}, group {g + 1}/{len(groups)}, load average {loadavg()}")
            for k in range(len(runners)):
                runners[(step + k) % len(runners)].run(rnd, g, group)
            step += 1
    load1 = loadavg()

    reports = [r.report(repeats) for r in runners]
    naive = next((x for x in reports if x["path"] == "naive"), None)
    base_wps = naive["windows_per_s"] if naive else float("nan")
    base_cpu = naive["windows_per_cpu_s"] if naive else float("nan")
    base_steady = naive["steady_state"]["windows_per_s"] if naive and "steady_state" in naive else float("nan")
    torch_texts = next((x["texts"] for x in reports if x["path"] == "torch-fp32" and x["batch"] == args.batch), None)
    summary: dict[str, dict] = {}
    for p in paths:
        if p == "naive":
            continue
        by_batch = {}
        for x in reports:
            if x["path"] != p:
                continue
            x["speedup"] = x["windows_per_s"] / base_wps
            x["speedup_cpu_time"] = x["windows_per_cpu_s"] / base_cpu
            if "steady_state" in x:
                x["steady_state"]["speedup"] = x["steady_state"]["windows_per_s"] / base_steady
            if naive:
                x["same_as_naive"] = sum(x["texts"].get(k) == v for k, v in naive["texts"].items()) / len(naive["texts"])
            if torch_texts:
                x["same_as_torch_fp32"] = sum(x["texts"].get(k) == v for k, v in torch_texts.items()) / len(torch_texts)
            by_batch[str(x["batch"])] = x
        best = max(by_batch.values(), key=lambda x: x.get("steady_state", x)["windows_per_s"])
        summary[p] = {
            "precision": best.get("precision"),
            "by_batch": by_batch,
            "headline_speedup": by_batch[str(args.batch)]["speedup"],
            "realtime_streams_hop_1s": realtime_streams(best),
            "realtime_best_batch": best["batch"],
        }
    config = loaded.model.config
    head = {p: s["by_batch"][str(args.batch)] for p, s in summary.items()}
    ghz = cpu_ghz()
    bound = {
        "prefill_gflop_per_window": prefill_gflop(config),
        "vision_gflop_per_frame": vision_gflop(config),
        "cpu_ghz": ghz,
        "peak_gflops_one_core": {"fp32_avx512": 64 * ghz, "bf16_amx": 1024 * ghz, "int8_amx_gops": 2048 * ghz} if ghz else None,
        "achieved_gflops_at_headline_batch": {
            p: {"prefill": prefill_gflop(config) / x["prefill_s_per_window"] if x["prefill_s_per_window"] else None,
                "vision": (vision_gflop(config) * x["frames_encoded_per_window"] / x["vision_s_per_window"]
                           if x["vision_s_per_window"] else None)}
            for p, x in head.items()
        },
    }
    result = {
        "benchmark": "bench_backends",
        "model": label,
        "checkpoint": checkpoint,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(transformers=__import__("transformers").__version__,
                                onnxruntime=_version("onnxruntime"), openvino=_version("openvino")),
        "workload": {"streams": args.streams, "seconds": seconds, "fps": args.fps, "windows": len(windows), "sweep": sweep,
                     "headline_batch": args.batch, "max_new_tokens": args.max_new_tokens, "repeats": repeats,
                     "threads": args.threads, "frame_size": list(size),
                     "sampler": {"window_s": 3.0, "frames": 6, "hop_s": 1.0}},
        "skipped": skipped,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "naive": naive,
        "paths": summary,
        "agreement": agreement,
        "bound": bound,
        "total_run_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"backends-{label}-cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png")

    print(f"model {label} on {cpu_model()}: {len(windows)} windows, {args.threads} thread, load {load0} -> {load1}")
    if naive:
        print(f"  naive          {base_wps:.4f} windows/s  p50 {naive['p50_s']:.2f} s  p99 {naive['p99_s']:.2f} s")
    for p, s in summary.items():
        cells = "  ".join(f"B={b}: {x['windows_per_s']:.3f} w/s {x['speedup']:.2f}x (cpu {x['speedup_cpu_time']:.2f}x, "
                          f"steady {x.get('steady_state', {}).get('speedup', float('nan')):.2f}x, p99 {x['p99_s']:.2f} s)"
                          for b, x in s["by_batch"].items())
        ag = agreement.get(p, {})
        print(f"  {p:13} {cells}  | real-time streams {s['realtime_streams_hop_1s']} | bundled same as fp32 "
              f"{ag.get('equal_to_torch_fp32', '-')}/{ag.get('clips', '-')}")
    print(f"  wrote {out / stem}.json and .png ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 (not installed: recorded as None)
        return None


if __name__ == "__main__":
    sys.exit(main())
