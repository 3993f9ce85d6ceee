"""`streamer caption VIDEO`: captions for a file (vtt, srt, jsonl, text)."""

from __future__ import annotations

import argparse
import logging
import sys

from streamer.cli.common import (
    add_model_options,
    hwaccel_arg,
    parse_duration,
    positive_int,
)

log = logging.getLogger("streamer.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    cap = sub.add_parser("caption", help="caption a video file")
    cap.add_argument("video")
    add_model_options(cap)
    cap.add_argument("--window", type=parse_duration, default=3.0, help="seconds of video per caption (default 3s)")
    cap.add_argument("--frames", type=positive_int, default=None, help="frames per window (default: the model's)")
    cap.add_argument("--hop", type=parse_duration, default=1.0, help="seconds between captions (default 1s)")
    cap.add_argument("--summary", action="store_true", help="one caption for the whole video")
    cap.add_argument("--format", default="vtt", choices=["vtt", "srt", "jsonl", "text"])
    cap.add_argument("--batch-size", type=positive_int, default=8)
    cap.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    cap.add_argument("--no-progress", action="store_true")
    cap.add_argument("--hwaccel", type=hwaccel_arg, default=None, help="decode on this FFmpeg hardware device, e.g. cuda (NVDEC); software where unavailable")
    cap.set_defaults(run=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    from streamer.engine import Engine, EngineConfig
    from streamer.media.decode import open_input
    from streamer.ops.progress import Progress
    from streamer.pipeline.offline import CaptionJob, caption_file
    from streamer.pipeline.sampler import SamplerConfig
    from streamer.publish.formats import CaptionWriter

    open_input(args.video).close()  # a bad file fails before the model loads
    engine = Engine.load(
        EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                     threads=args.threads)
    )
    frames = args.frames or engine.num_frames
    if frames != engine.num_frames:
        log.warning("model takes a fixed frame count; windows are resampled", extra={"frames": frames, "model_frames": engine.num_frames})
    job = CaptionJob(
        video=args.video,
        sampler=SamplerConfig(window=args.window, frames=frames, hop=args.hop),
        summary=args.summary,
        batch_size=args.batch_size,
        hwaccel=args.hwaccel,
    )
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    progress = Progress(enabled=not args.no_progress, label=args.video)
    count = 0
    try:
        writer = CaptionWriter(args.format, out, min_duration=args.hop)
        for caption in caption_file(engine, job, on_progress=progress.update):
            writer.write(caption)
            count += 1
        writer.close()
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    log.info("captioned", extra={"video": args.video, "captions": count})
    return 0
