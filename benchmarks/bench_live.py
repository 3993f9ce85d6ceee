#!/usr/bin/env python
"""End-to-end latency of the live daemon: frame arrival -> caption received by a WebSocket client.

    python benchmarks/bench_live.py [--model tiny|base|PATH] [--streams 1,4,16]
                                    [--seconds 20] [--warmup 3] [--out benchmarks/results]

For each stream count N, one run:

  1. the daemon starts in this process (`streamer.cli.serve.serve()`, port 0,
     default limits, the model on CPU), exactly as `streamer serve` wires it;
  2. one WebSocket client connects to /ws?all=1. The client is a separate
     Python process (the `websockets` library, as `streamer tail` uses), so
     its receive time is not delayed by the daemon's event loop or GIL;
  3. N streams are added over HTTP (POST /streams): the same synthetic
     moving-square clip (320x240 @ 15 fps, 4 s, H.264) played as live
     (`realtime: true`, `loop: true`), window 3 s / hop 1 s;
  4. once every stream has had a caption, --warmup seconds more, then the
     measurement: --seconds of wall time, /metrics read at both ends;
  5. the client stops, the daemon drains and stops.

Latency of one caption = the client's time.time() when `recv()` returned it
minus the caption's `capture_time` (time.time() in the daemon when the newest
frame of the window was handed over by the decoder, after real-time pacing).
Same machine, same clock. It is split into server (emit_time - capture_time:
scheduling, batching, the engine) and delivery (receive - emit_time: hub,
WebSocket, client). Only captions received inside the measurement interval
count; `?all=1` means repeated texts are sent too, so every captioned window
is one message.

captions/s is over all streams; "real-time sustained" = captions/s divided by
N / hop (one caption per stream per hop is keeping up; below 1 means windows
are dropped or frames arrive slower than real time). From /metrics (deltas
over the measurement): windows dropped under overload, ring-buffer frame
drops, frames decoded per stream, engine batch sizes (mean and histogram) and
engine seconds per batch.

The checkpoints for `tiny` (tests/support/models.py `tiny_config()`, random
weights: captions are noise, the work is real) and `base` (git-base-vatex
shape, random weights) are built once into benchmarks/.cache/, shared with
bench_engine.py. Output: <out>/live-<model>-<device>.json and .png; progress on
stderr. Other processes on the machine show in the load averages recorded
before and after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/common.py (scripts run from benchmarks/)
    ensure_checkpoint,
    loadavg,
    log,
    machine_info,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hubs are unreachable here: fail fast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE_DIR = HERE / ".cache"


# -- the client (runs in its own process) -------------------------------------------
async def _client(url: str, out_path: str) -> None:
    """Connect, say `ready` on stdout after the hello, record every message with
    its receive time until SIGTERM, then write them as JSON lines."""
    import websockets

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    received: list[tuple[float, str]] = []
    closed: list[str] = []
    async with websockets.connect(url, open_timeout=30, max_size=None) as ws:
        hello = await ws.recv()
        received.append((time.time(), hello))
        print("ready", flush=True)

        async def reader() -> None:
            try:
                async for raw in ws:
                    received.append((time.time(), raw))
            except websockets.ConnectionClosed as exc:
                closed.append(f"{exc.rcvd.code if exc.rcvd else 'no close frame'}")
            closed.append("closed")

        task = asyncio.create_task(reader())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with open(out_path, "w", encoding="utf-8") as f:
        for t, raw in received:
            message = json.loads(raw)
            message["_recv"] = t
            f.write(json.dumps(message) + "\n")
        if closed:
            f.write(json.dumps({"type": "_closed", "detail": closed[0]}) + "\n")


# -- checkpoint and clip ------------------------------------------------------------
def ensure_clip(width: int, height: int, fps: int, seconds: float) -> Path:
    from tests.support.media import moving_square, write_video

    target = CACHE_DIR / f"live-clip-{width}x{height}-{fps}fps-{seconds:g}s.mp4"
    if target.is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.building-{os.getpid()}.mp4")
    write_video(tmp, moving_square(round(fps * seconds), width, height, seed=1), fps=fps)
    tmp.replace(target)
    return target


# -- metrics --------------------------------------------------------------------------
def parse_metrics(text: str) -> dict:
    """Prometheus text -> {sample name: {labels tuple: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _total(m: dict, name: str) -> float:
    return sum(m.get(name, {}).values())


def _by_stream(m: dict, name: str) -> dict[str, float]:
    return {dict(k).get("stream", ""): v for k, v in m.get(name, {}).items()}


def metrics_delta(m0: dict, m1: dict, seconds: float, stream_ids: list[str]) -> dict:
    def d(name: str) -> float:
        return _total(m1, name) - _total(m0, name)

    def dstream(name: str) -> dict[str, float]:
        a, b = _by_stream(m0, name), _by_stream(m1, name)
        return {s: b.get(s, 0.0) - a.get(s, 0.0) for s in stream_ids}

    buckets0 = {dict(k)["le"]: v for k, v in m0.get("streamer_batch_size_bucket", {}).items()}
    buckets1 = {dict(k)["le"]: v for k, v in m1.get("streamer_batch_size_bucket", {}).items()}
    les = sorted(buckets1, key=lambda x: math.inf if x == "+Inf" else float(x))
    hist, below = {}, 0.0
    for le in les:  # cumulative -> per bucket
        cum = buckets1[le] - buckets0.get(le, 0.0)
        hist[f"<={le}" if le != "+Inf" else ">last"] = int(cum - below)
        below = cum
    batches = d("streamer_batch_size_count")
    frames = dstream("streamer_frames_total")
    return {
        "windows_captioned": int(d("streamer_windows_captioned_total")),
        "windows_dropped": int(d("streamer_windows_dropped_total")),
        "windows_dropped_by_stream": {s: int(v) for s, v in dstream("streamer_windows_dropped_total").items()},
        "ring_frames_dropped": int(d("streamer_frames_dropped_total")),
        "frames_decoded": int(d("streamer_frames_total")),
        "fps_per_stream_min": min(frames.values()) / seconds if frames else None,
        "fps_per_stream_mean": sum(frames.values()) / len(frames) / seconds if frames else None,
        "batches": int(batches),
        "batch_size_mean": d("streamer_batch_size_sum") / batches if batches else None,
        "batch_size_histogram": hist,
        "batch_seconds_mean": d("streamer_batch_seconds_sum") / batches if batches else None,
        "engine_busy_fraction": d("streamer_batch_seconds_sum") / seconds,
        "ws_clients_dropped": int(d("streamer_ws_clients_dropped_total")),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict:
    return {
        "p50": _pct(values, 50),
        "p90": _pct(values, 90),
        "p99": _pct(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# -- one run: N streams ------------------------------------------------------------------
async def run_point(n: int, args, model_path: str, clip: Path, workdir: Path) -> dict:
    import aiohttp

    from streamer.cli.serve import ServeConfig, serve
    from streamer.engine import EngineConfig
    from streamer.http.app import ServerConfig
    from streamer.pipeline.daemon import DaemonConfig
    from streamer.pipeline.scheduler import SchedulerConfig

    engine_kw = {"model": model_path, "device": args.device, "dtype": args.dtype}
    if args.max_new_tokens is not None:
        engine_kw["max_new_tokens"] = args.max_new_tokens
    daemon = DaemonConfig(scheduler=SchedulerConfig(max_batch=args.max_batch))
    config = ServeConfig(engine=EngineConfig(**engine_kw), server=ServerConfig(host="127.0.0.1", port=0), daemon=daemon)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future = loop.create_future()
    stop = asyncio.Event()
    t_start = time.perf_counter()
    load_before = loadavg()
    task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result((port, d)), stop=stop))
    done, _ = await asyncio.wait([ready, task], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    if not ready.done():
        raise RuntimeError("daemon did not start within 120 s")
    port, daemon = ready.result()
    http_url = f"http://127.0.0.1:{port}"
    ws_url = f"ws://127.0.0.1:{port}/ws?all=1"
    log(f"N={n}: daemon up on port {port} ({time.perf_counter() - t_start:.1f} s), model {daemon.engine.model_name}")
    messages_path = workdir / f"messages-{n}.jsonl"
    client = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--client", ws_url, str(messages_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )
    stream_ids = [f"s{i:02d}" for i in range(n)]
    try:
        line = await asyncio.wait_for(client.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"WebSocket client did not connect (said {line!r}, rc {client.returncode})")
        async with aiohttp.ClientSession() as http:
            for sid in stream_ids:
                body = {"id": sid, "url": str(clip), "loop": True, "realtime": True, "window": args.window, "hop": args.hop}
                async with http.post(f"{http_url}/streams", json=body) as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"POST /streams {sid}: {resp.status} {await resp.text()}")
            t_added = time.perf_counter()
            log(f"N={n}: {n} stream(s) added; waiting for every stream's first caption")
            deadline = t_added + args.first_caption_timeout
            while True:
                async with http.get(f"{http_url}/streams") as resp:
                    listed = (await resp.json())["streams"]
                missing = [s["id"] for s in listed if s["captions"] < 1]
                if not missing:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no caption within {args.first_caption_timeout} s for {missing}")
                await asyncio.sleep(0.2)
            first_caption_s = time.perf_counter() - t_added
            log(f"N={n}: all streams captioning after {first_caption_s:.1f} s; warm-up {args.warmup:g} s")
            await asyncio.sleep(args.warmup)

            async def metrics_text() -> str:
                async with http.get(f"{http_url}/metrics") as resp:
                    return await resp.text()

            # engine stats are read on the engine thread between batches (consistent, but may wait
            # for a batch): outside the [w0, w1] interval that the metrics and captions use
            stats0 = await daemon.scheduler.run_exclusive(_engine_stats, daemon)
            load_start = loadavg()
            log(f"N={n}: measuring {args.seconds:g} s (load average {load_start})")
            sys0, cpu0, w0 = _system_cpu(), os.times(), time.time()
            m0 = parse_metrics(await metrics_text())
            src0 = {sid: daemon.streams[sid].source.stats for sid in stream_ids}
            await asyncio.sleep(args.seconds)
            m1 = parse_metrics(await metrics_text())
            src1 = {sid: daemon.streams[sid].source.stats for sid in stream_ids}
            w1, cpu1, sys1 = time.time(), os.times(), _system_cpu()
            stats1 = await daemon.scheduler.run_exclusive(_engine_stats, daemon)
            async with http.get(f"{http_url}/streams") as resp:
                listed = {s["id"]: s for s in (await resp.json())["streams"]}
            load_end = loadavg()
    finally:
        if client.returncode is None:
            client.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client.wait(), 30)
        if client.returncode is None:
            client.kill()
        stop.set()
        t_stop = time.perf_counter()
        await asyncio.wait_for(task, 60)
        log(f"N={n}: daemon stopped (drain {time.perf_counter() - t_stop:.1f} s)")

    seconds = w1 - w0
    messages = [json.loads(x) for x in messages_path.read_text().splitlines() if x]
    captions = [m for m in messages if m.get("type") == "caption" and w0 <= m["_recv"] <= w1]
    e2e = [m["_recv"] - m["capture_time"] for m in captions]
    server = [m["emit_time"] - m["capture_time"] for m in captions]
    delivery = [m["_recv"] - m["emit_time"] for m in captions]
    per_stream = {sid: sum(1 for m in captions if m["stream_id"] == sid) for sid in stream_ids}
    half = w0 + seconds / 2
    first_half = [m["_recv"] - m["capture_time"] for m in captions if m["_recv"] < half]
    second_half = [m["_recv"] - m["capture_time"] for m in captions if m["_recv"] >= half]
    # gaps in window indexes per stream, over captions received in the interval
    skipped = 0
    for sid in stream_ids:
        idx = sorted(m["index"] for m in captions if m["stream_id"] == sid)
        skipped += sum(b - a - 1 for a, b in zip(idx, idx[1:]))
    expected_rate = n / args.hop
    rate = len(captions) / seconds
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    ncpu = os.cpu_count() or 1
    busy_all = (sys1[0] - sys0[0]) / (sys1[1] - sys0[1]) if sys0 and sys1 and sys1[1] > sys0[1] else None
    ds = {k: stats1[k] - stats0[k] for k in stats0}
    point = {
        "streams": n,
        "measure_s": round(seconds, 3),
        "first_caption_all_streams_s": round(first_caption_s, 2),
        "captions": len(captions),
        "captions_per_s": rate,
        "expected_captions_per_s": expected_rate,
        "realtime_sustained": rate / expected_rate,
        "latency_s": _stats(e2e),
        "latency_server_s": _stats(server),
        "latency_delivery_s": _stats(delivery),
        "latency_p50_first_half_s": _pct(first_half, 50),
        "latency_p50_second_half_s": _pct(second_half, 50),
        "captions_per_stream": per_stream,
        "every_stream_captioned": all(v > 0 for v in per_stream.values()),
        "window_index_gaps": skipped,
        "metrics": metrics_delta(m0, m1, seconds, stream_ids),
        "source_frames_dropped_loop_behind": sum(src1[s].dropped - src0[s].dropped for s in stream_ids),
        "stream_states": sorted({s["state"] for s in listed.values()}),
        "engine": {
            "windows": ds["windows"],
            "frames_encoded_per_window": ds["frames_encoded"] / ds["windows"] if ds["windows"] else None,
            "tokens_per_window": ds["tokens_generated"] / ds["windows"] if ds["windows"] else None,
            "vision_s": ds["vision_seconds"],
            "decode_s": ds["decode_seconds"],
        },
        # fractions of all CPUs over the measured interval: this process (daemon + engine + decoders)
        # vs everything else on the machine (other processes; includes the client, which is tiny)
        "cpu_fraction_this_process": cpu_s / seconds / ncpu,
        "cpu_fraction_other_processes": None if busy_all is None else max(0.0, busy_all - cpu_s / seconds / ncpu),
        "client_closed": next((m["detail"] for m in messages if m.get("type") == "_closed"), None),
        "loadavg_before": load_before,
        "loadavg_measure_start": load_start,
        "loadavg_measure_end": load_end,
        "run_s": round(time.perf_counter() - t_start, 1),
    }
    lat = point["latency_s"]
    log(f"N={n}: {len(captions)} captions, {rate:.2f}/s ({point['realtime_sustained']:.2f} of real time), "
        f"latency p50 {_fmt(lat['p50'])} p99 {_fmt(lat['p99'])} s, dropped {point['metrics']['windows_dropped']}, "
        f"mean batch {_fmt(point['metrics']['batch_size_mean'])}, load {load_end}, "
        f"CPU this process {point['cpu_fraction_this_process']:.0%} / other processes {_fmt(point['cpu_fraction_other_processes'], '.0%')}")
    return point


def _system_cpu() -> tuple[float, float] | None:
    """(busy jiffies, total jiffies) over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return float(total - idle), float(total)


def _engine_stats(daemon) -> dict:
    s = daemon.engine.stats
    return {"windows": s.windows, "frames_encoded": s.frames_encoded, "tokens_generated": s.tokens_generated,
            "vision_seconds": s.vision_seconds, "decode_seconds": s.decode_seconds}


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


# -- plot -----------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    ns = [p["streams"] for p in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))

    p50 = [p["latency_s"]["p50"] for p in pts]
    p99 = [p["latency_s"]["p99"] for p in pts]
    s50 = [p["latency_server_s"]["p50"] for p in pts]
    ax1.plot(ns, p50, "o-", color="#1f77b4", label="end to end p50")
    ax1.plot(ns, p99, "s-", color="#d62728", label="end to end p99")
    ax1.plot(ns, s50, "^--", color="#7f7f7f", label="server only p50 (emit - capture)")
    for n, a, b in zip(ns, p50, p99):
        ax1.annotate(f"{a * 1000:.0f} ms", (n, a), xytext=(6, -12), textcoords="offset points", fontsize=9, color="#1f77b4")
        ax1.annotate(f"{b * 1000:.0f} ms", (n, b), xytext=(6, 4), textcoords="offset points", fontsize=9, color="#d62728")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ns, [str(n) for n in ns])
    ax1.set_xlabel("streams")
    ax1.set_ylabel("seconds (lower is better)")
    ax1.set_ylim(0, max(p99) * 1.25)
    ax1.set_title("Frame arrival -> caption received by a WebSocket client")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9, frameon=False)  # outside: never hides a point
    ax1.grid(alpha=0.3)

    rate = [p["captions_per_s"] for p in pts]
    exp = [p["expected_captions_per_s"] for p in pts]
    ax2.plot(ns, exp, "-", color="#bdbdbd", linewidth=6, label="real time (streams / hop)")
    ax2.plot(ns, rate, "o-", color="#2ca02c", label="captions/s received")
    for p in pts:
        m = p["metrics"]
        note = (f"{p['realtime_sustained'] * 100:.0f}% of real time\nmean batch {_fmt(m['batch_size_mean'], '.2f')}"
                f"\ndropped {m['windows_dropped']} windows")
        ax2.annotate(note, (p["streams"], p["captions_per_s"]), xytext=(6, -34), textcoords="offset points", fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log", base=2)
    ax2.set_xticks(ns, [str(n) for n in ns])
    ax2.set_xlim(min(ns) / 1.4, max(ns) * 2.2)
    lo, hi = min(rate + exp) / 2, max(rate + exp) * 1.6
    ax2.set_ylim(lo, hi)
    ticks = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1) if lo <= 2.0**k <= hi]
    ax2.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax2.minorticks_off()
    ax2.set_xlabel("streams")
    ax2.set_ylabel("captions / s, all streams")
    ax2.set_title("Throughput")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9, frameon=False)  # outside: never hides a point
    ax2.grid(alpha=0.3)

    m, wl = result["machine"], result["workload"]
    loads = [p["loadavg_measure_start"][0] for p in pts if p.get("loadavg_measure_start")]
    fig.suptitle(
        f"streamer live daemon, GIT {result['model']} on {m.get('gpu') or 'CPU'} ({m['cpu_count']} cores, {m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}) - "
        f"{wl['frame_size'][0]}x{wl['frame_size'][1]} @ {wl['fps']} fps files as live, window {wl['window_s']:g} s / "
        f"hop {wl['hop_s']:g} s, {wl['measure_s']:g} s measured per point\n"
        f"{result['date']}; 1-min load average at measurement start: {', '.join(f'{x:.1f}' for x in loads)}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


# -- main -------------------------------------------------------------------------------------
def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)  # what `streamer serve` runs on


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        _run(_client(argv[1], argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | base | a checkpoint path (default tiny)")
    ap.add_argument("--streams", default="1,4,16", help="comma-separated stream counts (default 1,4,16)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured wall time per stream count (default 20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds after every stream's first caption (default 3)")
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--hop", type=float, default=1.0)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--size", default="320x240", help="clip size WxH (default 320x240)")
    ap.add_argument("--clip-seconds", type=float, default=4.0, help="clip length; it loops (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads() in the daemon process (default: torch's own, = cores); "
                         "results then go to live-<model>-cpu-t<N>.json/.png")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu); results go to live-<model>-<device>*")
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--max-batch", type=int, default=8, help="scheduler max_batch (default 8; try 64 on a GPU)")
    ap.add_argument("--first-caption-timeout", type=float, default=60.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))  # for tests.support (checkpoint + synthetic video builders)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    import torch

    from streamer.engine import EngineConfig

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # what OMP_NUM_THREADS=N does for `streamer serve`
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    width, height = (int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    label, model_path = ensure_checkpoint(args.model)
    clip = ensure_clip(width, height, args.fps, args.clip_seconds)
    log(f"model {label} ({model_path}); clip {clip}; stream counts {counts}; {os.cpu_count()} CPUs, "
        f"load average {loadavg()}")
    points = []
    with tempfile.TemporaryDirectory(prefix="bench_live-") as tmp:
        for n in counts:
            points.append(_run(run_point(n, args, model_path, clip, Path(tmp))))
    total = time.perf_counter() - t0

    result = {
        "benchmark": "bench_live",
        "model": label,
        "checkpoint": model_path,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(
            torch_threads_set_by="--torch-threads" if args.torch_threads else "torch default",
            event_loop="uvloop" if _has_uvloop() else "asyncio",
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            gpu_memory_peak_mib=(
                torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
            ),
        ),
        "workload": {
            "source": "file as live (realtime, loop): moving_square H.264 clip",
            "frame_size": [width, height],
            "fps": args.fps,
            "clip_s": args.clip_seconds,
            "window_s": args.window,
            "hop_s": args.hop,
            "warmup_s": args.warmup,
            "measure_s": args.seconds,
            "max_new_tokens": args.max_new_tokens or EngineConfig.max_new_tokens,
            "client": "one websockets client in a separate process on /ws?all=1",
            "latency": "client time.time() at recv() minus caption capture_time (same machine clock)",
        },
        "total_run_s": round(total, 1),
        "points": points,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"live-{label}-{args.device.split(':')[0]}" + (f"-t{args.torch_threads}" if args.torch_threads else "")
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    tmp_json = json_path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    tmp_json.replace(json_path)
    plot(result, png_path)

    print(f"model {label}, {width}x{height}@{args.fps} fps files as live, window {args.window:g} s / hop {args.hop:g} s, "
          f"{args.seconds:g} s measured per point")
    print(f"{'streams':>7} {'p50 s':>7} {'p99 s':>7} {'srv p50':>7} {'cap/s':>7} {'realtime':>8} {'dropped':>7} "
          f"{'batch':>6} {'all ok':>6} {'load1':>6} {'cpu other':>9}")
    for p in points:
        m = p["metrics"]
        print(f"{p['streams']:>7} {_fmt(p['latency_s']['p50']):>7} {_fmt(p['latency_s']['p99']):>7} "
              f"{_fmt(p['latency_server_s']['p50']):>7} {p['captions_per_s']:>7.2f} {p['realtime_sustained']:>8.2f} "
              f"{m['windows_dropped']:>7} {_fmt(m['batch_size_mean'], '.2f'):>6} {str(p['every_stream_captioned']):>6} "
              f"{(p['loadavg_measure_start'] or [float('nan')])[0]:>6.2f} {_fmt(p['cpu_fraction_other_processes'], '.0%'):>9}")
    print(f"total {total:.0f} s; wrote {json_path} and {png_path}")
    return 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
