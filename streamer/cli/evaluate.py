"""`streamer eval`: score a model on held-out clips."""

from __future__ import annotations

import argparse

from streamer.cli.common import add_model_options, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="score a model on held-out clips")
    add_model_options(ev)
    ev.add_argument("--data", default="synthetic", help='"synthetic" (held-out world clips) or a manifest .jsonl')
    ev.add_argument("--clips", type=positive_int, default=200)
    ev.add_argument("--seed", type=int, default=None,
                    help="synthetic clips: far from training seeds (default 10000; --live: 20000)")
    ev.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the result as JSON to PATH (no PATH: print it)")
    ev.add_argument("--questions", action="store_true",
                    help="score answers to world questions per kind (colour, shape, count, direction, yes, no) on "
                    "--clips held-out windows: clean clips, or live-rendered ones with --data live")
    live = ev.add_argument_group("live evaluation (--live): a long stream with scene cuts through the daemon")
    live.add_argument("--live", action="store_true", help="score captions of a live stream: accuracy inside scenes "
                      "and across cuts, change delay, flicker; with and without the stabilizer")
    live.add_argument("--scenes", type=positive_int, default=50,
                      help="synthetic scenes back to back, per cell (default 50: fewer leave the figures a lottery)")
    live.add_argument("--scene-seconds", type=float, default=6.0, help="mean scene length (default 6 s, +-25%%)")
    live.add_argument("--scene-set", choices=["random", "demo"], default="random",
                      help="random: the world's live generator; demo: the scenes `streamer demo` plays")
    live.add_argument("--fps", default="15,30", help="frame rates, comma-separated: a matrix with --size (default 15,30)")
    live.add_argument("--size", default="128x128,160x90", help="WxH, comma-separated (default 128x128,160x90)")
    live.add_argument("--bpp", type=float, default=0.1,
                      help="H.264 bits per pixel per frame (default 0.1: a camera's 6 Mbit/s at 1080p30)")
    live.add_argument("--window", type=float, default=3.0)
    live.add_argument("--hop", type=float, default=1.0)
    live.add_argument("--stabilize-windows", type=positive_int, default=2, help="the stabilizer scored as 'hold'")
    live.add_argument("--stabilize-margin", type=float, default=None)
    live.add_argument("--sweep", action="store_true", help="also score the stabilizer at 1-5 windows")
    live.add_argument("--coco", action="store_true", help="also BLEU-4, ROUGE-L, CIDEr, METEOR (always with --manifest)")
    live.add_argument("--manifest", default=None,
                      help="a user's video(s) instead: JSON Lines of {path, start, end, caption}, rows = scenes")
    ev.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.live:
        return run_live_eval(args)
    if args.questions:
        return run_question_eval(args)

    from streamer.engine import Engine, EngineConfig
    from streamer.ops.progress import Progress
    from streamer.training.evaluate import evaluate, manifest_clips, synthetic_clips

    engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                      max_new_tokens=args.max_new_tokens, threads=args.threads,
                                      backend=args.backend))
    size = engine.spec.crop_hw[0] if engine.spec.crop_hw else 224
    if args.data == "synthetic":
        clips = synthetic_clips(args.clips, 10_000 if args.seed is None else args.seed, engine.num_frames, size)
    else:
        clips = manifest_clips(args.data, engine.num_frames, engine.frame_short_side)
    progress = Progress(label="eval", unit="clip")
    try:
        result = evaluate(engine, clips, on_progress=progress.update, total=args.clips if args.data == "synthetic" else None)
    finally:
        progress.close()
    if args.json:
        _write_json(result.to_dict(), args.json)
    else:
        print(f"model {engine.model_name}: {result.clips} clips, exact match {result.exact_match:.1%}, "
              f"{result.windows_per_second:.1f} windows/s")
        print("  parts: " + ", ".join(f"{k} {v:.1%}" for k, v in result.part_accuracy.items()))
        print("  scores: " + ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items()))
        for ex in result.examples[:5]:
            print(f"  wrong: {ex['caption']!r} for {ex['reference']!r}")
    return 0


def run_question_eval(args: argparse.Namespace) -> int:
    from streamer.engine import Engine, EngineConfig
    from streamer.training.evaluate import evaluate_questions, question_windows

    engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, threads=args.threads))
    size = engine.spec.crop_hw[0] if engine.spec.crop_hw else 224
    seed = 10_000 if args.seed is None else args.seed
    windows = question_windows(args.clips, seed, engine.num_frames, size, live=args.data == "live")
    result = evaluate_questions(engine, windows, seed=seed)
    if args.json:
        _write_json(result, args.json)
    else:
        print(f"model {engine.model_name}: {result['windows']} windows, answers right per question kind: "
              + ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items()))
        for ex in result["wrong"][:5]:
            print(f"  wrong: {ex['question']!r} -> {ex['got']!r}, expected {ex['answer']!r}")
    return 0


def run_live_eval(args: argparse.Namespace) -> int:
    import sys

    from streamer.training.live import LiveCell, live_evaluation

    try:
        rates = [int(f) for f in str(args.fps).split(",")]
        sizes = [tuple(int(n) for n in s.lower().split("x")) for s in str(args.size).split(",")]
        if any(r < 1 for r in rates) or any(len(s) != 2 or min(s) < 16 for s in sizes):
            raise ValueError
    except ValueError:
        print("streamer eval --live: --fps takes integers and --size WxH (at least 16x16), comma-separated",
              file=sys.stderr)
        return 2
    cells = [LiveCell(r, w, h) for r in rates for (w, h) in sizes]
    result = live_evaluation(
        args.model, cells=cells, scenes=args.scenes, scene_seconds=args.scene_seconds, scene_set=args.scene_set,
        bits_per_pixel=args.bpp, window=args.window, hop=args.hop, stabilize_windows=args.stabilize_windows,
        stabilize_margin=args.stabilize_margin, sweep=[(k, args.stabilize_margin) for k in range(1, 6)] if args.sweep else (),
        manifest=args.manifest, coco=True if args.coco else None, device=args.device, dtype=args.dtype, threads=args.threads or 1,
        max_new_tokens=args.max_new_tokens, on_progress=lambda text: print(f"# {text}", file=sys.stderr, flush=True),
        **({"seed": args.seed} if args.seed is not None else {}),
    )
    if args.json:
        _write_json(result, args.json)
    if args.json != "-":
        print(format_live(result))
    return 0


def format_live(result: dict) -> str:
    """The live evaluation's headline figures, one block for a terminal."""

    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    def secs(x):
        return "n/a" if x is None else f"{x:.2f} s"

    lines = [(f"model {result['model']}: live evaluation, {result['source']}, {result['scenes']} scenes, "
             f"window {result['window']:g} s / hop {result['hop']:g} s ({result['seconds']:.0f} s)")]
    for cell in result["cells"]:
        lines.append(f"  {cell['name']}: {cell['windows']} windows (dropped {cell['windows_dropped']}), "
                     f"exact {pct(cell['off']['exact'])}, flicker {cell['off']['flicker_per_100']}/100")
    stab = result["stabilizer"]
    for key, label in (("off", "stabilizer off"), ("hold", f"hold {stab['windows']} windows")):
        s = result[key]
        d = s["change_delay"]
        ci = s["exact_ci95"]
        interval = f" (95% {ci[0]:.0%}-{ci[1]:.0%} over scenes)" if ci else ""
        lines.append(f"  {label:>16}: exact {pct(s['exact'])}{interval} on {s['inside']} windows inside scenes, "
                     f"straddling {pct(s['straddle']['accuracy'])}, change delay median {secs(d['median'])} "
                     f"max {secs(d['max'])} ({d['missed']} of {d['cuts']} cuts missed), "
                     f"flicker {s['flicker_per_100']}/100 windows")
    for row in result["sweep"]:
        lines.append(f"  sweep hold {row['windows']}: exact {pct(row['exact'])}, delay median {secs(row['delay_median'])}, "
                     f"missed {row['missed']}, flicker {row['flicker_per_100']}/100")
    parts = result["off"]["parts"]
    lines.append("  parts (off): " + ", ".join(f"{k} {pct(v)}" for k, v in parts.items()))
    kinds = result["off"]["kinds"]
    if kinds:  # where the errors are
        lines.append("  by kind of window (off): " + ", ".join(
            f"{name} {pct(row['exact'])} of {row['windows']}" for name, row in kinds.items()))
    return "\n".join(lines)


def _write_json(data: dict, path: str) -> None:
    import json

    text = json.dumps(data, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
