#!/usr/bin/env python
"""How many watches one live stream carries at its hop (issue #13), on the real daemon.

The daemon (`serve()` in-process, as `streamer serve` runs it) captions one live stream: a synthetic
world clip (demo scenes) played in real time, looped, window 3 s, hop 1 s (the defaults). For each
count K (--watches), K watches are added over HTTP (`every` = the hop: each asks about every new
window), and for --seconds the script measures:

- coverage: the watches' asks / (K x the windows captioned meanwhile): 1.0 when every watch asked
  about every new window (a watch asks at most once per window; one whose ask is still waiting at its
  next tick skips that tick);
- the live captions: windows dropped under load (newest wins) and the caption latency p50/p95 (newest
  frame of a window -> its caption), against K = 0 in the same run;
- asks failed.

A stream "carries" K watches when coverage >= 0.95, no ask fails, no window is dropped and the caption
latency p95 stays within one hop of K = 0's. (Coverage can read a little over 1: asks already under way
when the period starts are counted, their windows not.) Past [limits] max_request_windows (256) questions
waiting at once, asks are refused `busy`: a limit of the daemon's one-off queue, not of the engine. Writes benchmarks/results/watches-<model>-cpu.json and .png.

    python benchmarks/bench_watches.py                        # bundled model, 1 torch thread, ~3 min
    python benchmarks/bench_watches.py --watches 0,4,16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import ensure_checkpoint, loadavg, log, machine_info

HOP, WINDOW = 1.0, 3.0
QUESTION = "is there a red circle ?"


def make_clip(path: Path, seconds: float = 60.0) -> Path:
    from streamer.training.world import demo_scenes, render_video, write_video

    if not path.is_file():
        scenes = demo_scenes(int(seconds // 10), seed=11)
        write_video(str(path), render_video([(s, 10.0) for s in scenes], fps=15, height=96, width=128))
    return path


def metric(daemon, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(daemon.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def measure(model: str, threads: int, counts: list[int], seconds: float, clip: Path) -> list[dict]:
    import aiohttp
    import websockets

    from streamer.cli.serve import ServeConfig, serve
    from streamer.engine import EngineConfig
    from streamer.http.common import ServerConfig
    from streamer.pipeline.daemon import DaemonConfig
    from streamer.pipeline.watches import WatchLimits
    from streamer.security.network import NetworkPolicy
    from streamer.security.policy import SourcePolicy

    config = ServeConfig(
        engine=EngineConfig(model=model, threads=threads),
        server=ServerConfig(port=0, sources=SourcePolicy(media_dirs=(str(clip.parent),), network=NetworkPolicy())),
        daemon=DaemonConfig(), watch_limits=WatchLimits(max_watches=10_000, max_per_stream=10_000))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result((port, d)), stop=stop))
    port, daemon = await asyncio.wait_for(ready, 120)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        async with aiohttp.ClientSession() as http, websockets.connect(f"ws://127.0.0.1:{port}/ws?all=1") as ws:
            async with http.post(f"{base}/streams", json={"id": "cam", "url": str(clip), "loop": True,
                                                          "window": WINDOW, "hop": HOP}) as resp:
                assert resp.status == 201, await resp.text()
            latencies: list[float] = []

            async def read() -> None:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("type") == "caption":
                        latencies.append(message["latency"])

            reader = asyncio.create_task(read())
            while len(latencies) < 3:  # warm: the first windows are cold
                await asyncio.sleep(0.2)
            for k in counts:
                for i in range(k):
                    async with http.post(f"{base}/streams/cam/watches",
                                         json={"question": QUESTION, "every": HOP, "on": "yes", "id": f"k{i}"}) as resp:
                        assert resp.status == 201, await resp.text()
                await asyncio.sleep(2 * HOP)  # settle: every watch has had its first tick
                ok0 = metric(daemon, "streamer_watch_asks_total", result="ok")
                failed0 = metric(daemon, "streamer_watch_asks_total", result="failed")
                captioned0 = metric(daemon, "streamer_windows_captioned_total")
                dropped0 = metric(daemon, "streamer_windows_dropped_total")
                lat_from = len(latencies)
                started = time.perf_counter()
                await asyncio.sleep(seconds)  # the measurement period (wall time: the stream is live)
                elapsed = time.perf_counter() - started
                windows = metric(daemon, "streamer_windows_captioned_total") - captioned0
                asks = metric(daemon, "streamer_watch_asks_total", result="ok") - ok0
                lat = np.array(latencies[lat_from:] or [float("nan")])
                row = {
                    "watches": k, "seconds": round(elapsed, 2), "windows": int(windows),
                    "asks": int(asks), "asks_per_s": round(asks / elapsed, 2),
                    "coverage": round(asks / (k * windows), 3) if k and windows else None,
                    "asks_failed": int(metric(daemon, "streamer_watch_asks_total", result="failed") - failed0),
                    "windows_dropped": int(metric(daemon, "streamer_windows_dropped_total") - dropped0),
                    "latency_p50": round(float(np.percentile(lat, 50)), 3),
                    "latency_p95": round(float(np.percentile(lat, 95)), 3),
                    "loadavg": loadavg(),
                }
                rows.append(row)
                log(json.dumps(row))
                for i in range(k):
                    async with http.delete(f"{base}/streams/cam/watches/k{i}") as resp:
                        assert resp.status == 204
            reader.cancel()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return rows


def carried(rows: list[dict]) -> int:
    """The most watches the stream carried: coverage >= 0.95, no ask failed, no window dropped, caption
    latency p95 within a hop of K=0's."""
    base = next((r["latency_p95"] for r in rows if r["watches"] == 0), 0.0)
    ok = [r["watches"] for r in rows if r["watches"] and (r["coverage"] or 0) >= 0.95 and r["asks_failed"] == 0
          and r["windows_dropped"] == 0 and r["latency_p95"] <= base + HOP]
    return max(ok, default=0)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ks = [r["watches"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ks[1:], [r["coverage"] for r in rows[1:]], "o-")
    a.axhline(0.95, color="gray", ls="--")
    a.set_xscale("log", base=2)
    a.set_xlabel("watches on the stream (every = hop = 1 s)")
    a.set_ylabel("coverage (asks / watch / new window)")
    b.plot(ks, [r["latency_p50"] for r in rows], "o-", label="caption latency p50")
    b.plot(ks, [r["latency_p95"] for r in rows], "o-", label="p95")
    b.set_xscale("symlog", base=2)
    b.set_xlabel("watches")
    b.set_ylabel("seconds")
    b.legend()
    fig.suptitle(f"{result['model']}: carries {result['carried']} watches at hop {HOP:g} s ({result['machine']['cpu_model']}, "
                 f"{result['threads']} thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="bundled (default), tiny, base, or a checkpoint directory")
    parser.add_argument("--watches", default="0,1,4,16,64,128,256,512")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.model == "bundled":
        from streamer.defaults import BUNDLED_MODEL

        label, model = "world-git", str(BUNDLED_MODEL)
    else:
        label, model = ensure_checkpoint(args.model)
    clip = make_clip(Path(tempfile.gettempdir()) / "bench_watches_world.mp4")
    counts = sorted({int(k) for k in args.watches.split(",")})
    rows = asyncio.run(measure(model, args.threads, counts, args.seconds, clip))
    result = {"model": label, "threads": args.threads, "hop": HOP, "window": WINDOW, "question": QUESTION,
              "rows": rows, "carried": carried(rows), "machine": machine_info(), "loadavg_end": loadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"watches-{label}-cpu"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    print(json.dumps({k: result[k] for k in ("model", "carried", "threads")} | {"cpu": result["machine"]["cpu_model"]}))


if __name__ == "__main__":
    main()
