"""`streamer demo`: the daemon on a live synthetic scene, captions printed as they arrive."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from pathlib import Path

from streamer.cli.common import parse_duration, run_async
from streamer.cli.serve import load_config, serve
from streamer.cli.tail import format_caption_line


def run_demo(args: argparse.Namespace) -> int:
    """Start the daemon on a live synthetic scene and print captions as they arrive."""
    from streamer.pipeline.daemon import StreamConfig

    source, schedule = _demo_source(args.scene_seconds)
    config = load_config(None, argparse.Namespace(model=args.model, device=args.device, dtype=None, max_new_tokens=None,
                                                  host="127.0.0.1", port=args.port, stream=None))
    config = replace(config, streams=(StreamConfig(id="demo", url=source, window=args.window, hop=args.hop, loop=True),))

    async def main() -> None:
        stop = asyncio.Event()

        def ready(port: int, daemon) -> None:
            print(f"# streamer demo: a live synthetic scene -> captions; WebSocket ws://127.0.0.1:{port}/ws", flush=True)
            print(f"# model: {daemon.engine.model_name}; Ctrl-C to stop. What is on screen (loops):", flush=True)
            for line in schedule:
                print(f"#   {line}", flush=True)
            sub = daemon.hub.subscribe(None, only_changes=False)

            async def show() -> None:
                shown = 0
                started = time.monotonic()
                while True:
                    message = (await sub.get()).data
                    line = format_caption_line(message)
                    if line:
                        print(line, flush=True)
                    if message.get("type") == "caption":
                        shown += 1
                    if (args.count and shown >= args.count) or (args.seconds and time.monotonic() - started > args.seconds):
                        stop.set()
                        return

            asyncio.get_running_loop().create_task(show())

        await serve(config, on_ready=ready, stop=stop)

    run_async(main())
    return 0


def _demo_source(scene_seconds: float) -> tuple[str, list[str]]:
    """A looping video of synthetic scenes (cached), and what each scene shows."""
    import os

    from streamer.training.world import demo_scenes, render_video, write_video

    scenes = demo_scenes(4)
    root = Path(os.environ.get("STREAMER_CACHE") or Path.home() / ".cache" / "streamer")
    path = root / f"demo-world-{len(scenes)}x{scene_seconds:g}s.mp4"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        # square, like the training clips: a centre crop of a wide frame would cut the edges off
        write_video(str(tmp), render_video([(s, scene_seconds) for s in scenes], fps=15, height=128, width=128))
        tmp.replace(path)
    schedule = [f"{i * scene_seconds:5.0f}-{(i + 1) * scene_seconds:<3.0f} s  {s.caption}" for i, s in enumerate(scenes)]
    return str(path), schedule


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="caption a built-in live test pattern end to end")
    demo.add_argument("--model", default=None)
    demo.add_argument("--device", default=None)
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--window", type=parse_duration, default=3.0)
    demo.add_argument("--hop", type=parse_duration, default=1.0)
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long (default: run until Ctrl-C)")
    demo.add_argument("--count", type=int, default=None, help="stop after this many captions")
    demo.add_argument("--scene-seconds", type=float, default=6.0, help="how long each synthetic scene lasts")
    demo.set_defaults(run=run_demo)
