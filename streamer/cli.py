"""Command line: `streamer caption`, `streamer serve`, `streamer tail`, `streamer demo`."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from .errors import StreamerError
from .logs import setup_logging

__all__ = ["main", "parse_duration"]

log = logging.getLogger("streamer.cli")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$")


def parse_duration(text: str) -> float:
    """'3s', '1.5', '500ms', '2m' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 3s, 500ms, 1.5)")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    seconds = value / 1000 if unit == "ms" else value * 60 if unit in ("m", "min") else value
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def _hwaccel(text: str) -> str:
    from .decode import check_hwaccel

    try:
        return check_hwaccel(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    from .defaults import BUNDLED_MODEL_NAME, DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=None,
        help=f"hub id, HF cache entry or local directory (default: {DEFAULT_MODEL} when cached or reachable, "
        f"else the bundled {BUNDLED_MODEL_NAME})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-new-tokens", type=_positive_int, default=20, help="caption length limit in tokens")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores but one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Real-time video captioning.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("caption", help="caption a video file")
    cap.add_argument("video")
    add_model_options(cap)
    cap.add_argument("--window", type=parse_duration, default=3.0, help="seconds of video per caption (default 3s)")
    cap.add_argument("--frames", type=_positive_int, default=None, help="frames per window (default: the model's)")
    cap.add_argument("--hop", type=parse_duration, default=1.0, help="seconds between captions (default 1s)")
    cap.add_argument("--summary", action="store_true", help="one caption for the whole video")
    cap.add_argument("--format", default="vtt", choices=["vtt", "srt", "jsonl", "text"])
    cap.add_argument("--batch-size", type=_positive_int, default=8)
    cap.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    cap.add_argument("--no-progress", action="store_true")
    cap.add_argument("--hwaccel", type=_hwaccel, default=None, help="decode on this FFmpeg hardware device, e.g. cuda (NVDEC); software where unavailable")
    cap.set_defaults(run=run_caption)

    tr = sub.add_parser("train", help="train or fine-tune a GIT captioner")
    tr.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    tr.add_argument("--model", default="new", help='"new" (a fresh small GIT with the synthetic-world vocabulary) or a GIT checkpoint')
    tr.add_argument("--data", default="synthetic", help='"synthetic" or a JSON Lines manifest {path, start, end, caption}')
    tr.add_argument("--steps", type=_positive_int, default=3000)
    tr.add_argument("--batch-size", type=_positive_int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    tr.add_argument("--save-every", type=_positive_int, default=500)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--log-every", type=_positive_int, default=50, help="steps between log lines (no terminal)")
    tr.add_argument("--world", default="full", choices=["full", "simple"],
                    help="synthetic data: the full world, or one kind of object so that only the event varies")
    tr.add_argument("--reversed-twins", action="store_true",
                    help="synthetic data: follow each clip with itself played backwards, captioned with the opposite event")
    tr.add_argument("--fixed-positions", action="store_true",
                    help="keep the ViT position embeddings frozen (a new model gets large random ones)")
    tr.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="score a model on held-out clips")
    add_model_options(ev)
    ev.add_argument("--data", default="synthetic", help='"synthetic" (held-out world clips) or a manifest .jsonl')
    ev.add_argument("--clips", type=_positive_int, default=200)
    ev.add_argument("--seed", type=int, default=10_000, help="synthetic clips: far from training seeds")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(run=run_eval)

    from . import daemon_cli  # serve, tail, demo

    daemon_cli.add_commands(sub)
    return parser


def run_caption(args: argparse.Namespace) -> int:
    from .engine import Engine, EngineConfig
    from .formats import CaptionWriter
    from .offline import CaptionJob, caption_file
    from .progress import Progress
    from .sampler import SamplerConfig

    from .decode import open_input

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


def run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(
        out=args.out, model=args.model, data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, seed=args.seed, device=args.device, save_every=args.save_every, resume=args.resume,
        threads=args.threads, log_every=args.log_every, world=args.world, reversed_twins=args.reversed_twins,
        fixed_positions=args.fixed_positions,
    )
    out = train(config)
    print(f"model saved to {out}; use it with: streamer caption VIDEO --model {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from .engine import Engine, EngineConfig
    from .evaluate import evaluate, manifest_clips, synthetic_clips
    from .progress import Progress

    engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                      max_new_tokens=args.max_new_tokens, threads=args.threads))
    size = engine.spec.crop_hw[0] if engine.spec.crop_hw else 224
    if args.data == "synthetic":
        clips = synthetic_clips(args.clips, args.seed, engine.num_frames, size)
    else:
        clips = manifest_clips(args.data, engine.num_frames, engine.frame_short_side)
    progress = Progress(label="eval", unit="clip")
    try:
        result = evaluate(engine, clips, on_progress=progress.update, total=args.clips if args.data == "synthetic" else None)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"model {engine.model_name}: {result.clips} clips, exact match {result.exact_match:.1%}, "
              f"{result.windows_per_second:.1f} windows/s")
        print("  parts: " + ", ".join(f"{k} {v:.1%}" for k, v in result.part_accuracy.items()))
        print("  scores: " + ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items()))
        for ex in result.examples[:5]:
            print(f"  wrong: {ex['caption']!r} for {ex['reference']!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `streamer caption x.mp4 | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
