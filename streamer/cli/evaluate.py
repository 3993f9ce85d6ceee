"""`streamer eval`: score a model on held-out clips."""

from __future__ import annotations

import argparse

from streamer.cli.common import add_model_options, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="score a model on held-out clips")
    add_model_options(ev)
    ev.add_argument("--data", default="synthetic", help='"synthetic" (held-out world clips) or a manifest .jsonl')
    ev.add_argument("--clips", type=positive_int, default=200)
    ev.add_argument("--seed", type=int, default=10_000, help="synthetic clips: far from training seeds")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import json

    from streamer.engine import Engine, EngineConfig
    from streamer.ops.progress import Progress
    from streamer.training.evaluate import evaluate, manifest_clips, synthetic_clips

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
