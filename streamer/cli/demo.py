"""`streamer demo`: the daemon on a live synthetic scene, captions printed as they arrive.

Honest by construction: the bundled model (trained on this world) unless
`--model` names another; scenes it was trained to describe (motion only,
each object crossing the frame once per scene, never wrapping round an edge);
every caption marked against the ground truth of its window
(`Scene.caption_for_window`), with a running score of the windows inside a
scene, as captioned and as the stream's stabilizer shows them.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streamer.cli.common import parse_duration, run_async
from streamer.cli.serve import load_config, serve
from streamer.cli.tail import format_caption_line


def run_demo(args: argparse.Namespace) -> int:
    """Start the daemon on a live synthetic scene and print captions as they arrive."""
    from streamer.defaults import BUNDLED_MODEL_NAME
    from streamer.pipeline.daemon import StreamConfig

    source, schedule, truth = _demo_source(args.scene_seconds, args.window, args.hop)
    # The bundled model knows this world; another model's captions could not be scored against it.
    model = args.model or BUNDLED_MODEL_NAME
    config = load_config(None, argparse.Namespace(model=model, device=args.device, dtype=None, max_new_tokens=None,
                                                  host="127.0.0.1", port=args.port, stream=None))
    config = replace(config, streams=(StreamConfig(id="demo", url=source, window=args.window, hop=args.hop, loop=True),))

    async def main() -> None:
        stop = asyncio.Event()

        def ready(port: int, daemon) -> None:
            print(f"# streamer demo: a live synthetic scene -> captions; WebSocket ws://127.0.0.1:{port}/ws", flush=True)
            print(f"# model: {daemon.engine.model_name}; Ctrl-C to stop. What is on screen (loops):", flush=True)
            for line in schedule:
                print(f"#   {line}", flush=True)
            truth.frames = daemon.engine.num_frames
            if args.model is not None:
                print("# (--model: a model not trained on this world may be marked wrong where it is merely "
                      "worded otherwise)", flush=True)
            sub = daemon.hub.subscribe(None, only_changes=False)

            async def show() -> None:
                shown = 0
                started = time.monotonic()
                while True:
                    message = (await sub.get()).data
                    line = format_caption_line(message)
                    if line and message.get("type") == "caption":
                        line += truth.judge(message)
                    if line:
                        print(line, flush=True)
                    if message.get("type") == "caption":
                        shown += 1
                        if truth.scene_changed:
                            print(f"# {truth.summary()}", flush=True)
                    if (args.count and shown >= args.count) or (args.seconds and time.monotonic() - started > args.seconds):
                        print(f"# {truth.summary()}", flush=True)
                        stop.set()
                        return

            asyncio.get_running_loop().create_task(show())

        await serve(config, on_ready=ready, stop=stop)

    run_async(main())
    return 0


DEMO_SEED = 7
DEMO_SCENES = 4
DEMO_FPS = 15


def _demo_source(scene_seconds: float, window: float = 3.0, hop: float = 1.0) -> tuple[str, list[str], DemoTruth]:
    """A looping video of synthetic scenes (cached), what each scene shows, and the judge of captions."""
    import os

    from streamer.training.live import LiveCell, _render, live_scenes
    from streamer.training.world import MOTIONS, write_video

    # The live evaluation's demo scenes (`streamer eval --live --scene-set demo` scores them): motion only,
    # each object crossing the frame once per scene, so no window sees it wrap round an edge.
    playlist = live_scenes(DEMO_SEED, DEMO_SCENES, scene_seconds, jitter=0.0, events=tuple(MOTIONS))
    # square, like the training clips: a centre crop of a wide frame would cut the edges off
    frames, spans = _render(playlist, LiveCell(DEMO_FPS, 128, 128))
    root = Path(os.environ.get("STREAMER_CACHE") or Path.home() / ".cache" / "streamer")
    path = root / f"demo-world-v2-{len(playlist)}x{scene_seconds:g}s.mp4"  # v2: scenes that do not wrap
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        write_video(str(tmp), frames, fps=DEMO_FPS)
        tmp.replace(path)
    schedule = [f"{start:5.1f}-{end:<5.1f} s  {scene.caption}" for scene, start, end in spans]
    return str(path), schedule, DemoTruth(spans, len(frames) / DEMO_FPS, window, hop)


@dataclass
class DemoTruth:
    """Judges each caption of the looping demo against what its window showed, and keeps the score.

    A window lies inside a scene when all its frames do (media time modulo the loop); windows that
    straddle a cut are marked, not scored (either scene would do)."""

    spans: list[tuple[Any, float, float]]  # (scene, start, end) within one loop
    loop: float  # seconds per loop: the looped file's media time goes on by this much each pass
    window: float
    hop: float
    frames: int = 6
    inside: int = 0
    right: int = 0
    shown_right: int = 0
    scene_changed: bool = False
    _scene: int | None = field(default=None, repr=False)
    _shown_text: str | None = field(default=None, repr=False)

    def judge(self, message: dict) -> str:
        """A short verdict to append to the caption's line; updates the score."""
        if message.get("shown", True):
            self._shown_text = message["text"]
        start, end = message.get("start"), message.get("end")
        if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
            return ""
        base = math.floor(start / self.loop) * self.loop
        start, end = start - base, end - base
        scene_index = next((i for i, (_, s, e) in enumerate(self.spans) if s <= start + 1e-6 and end < e - 1e-6), None)
        self.scene_changed = scene_index is not None and self._scene is not None and scene_index != self._scene
        if scene_index is None:
            return "   ~ straddles a cut"
        self._scene = scene_index
        scene, s, _ = self.spans[scene_index]
        step = self.window / self.frames
        first = math.ceil(int(message["index"]) * self.hop / step - 1e-9) * step - base  # the sampler's grid
        truth = scene.caption_for_window(first - s, first - s + self.window, self.frames) \
            if hasattr(scene, "caption_for_window") else scene.caption
        self.inside += 1
        self.right += message["text"] == truth
        self.shown_right += self._shown_text == truth
        return "   ok" if message["text"] == truth else f"   WRONG, on screen: {truth}"

    def summary(self) -> str:
        if not self.inside:
            return "accuracy so far: no window inside a scene yet"
        return (f"accuracy so far: {self.right}/{self.inside} windows inside a scene right "
                f"({self.right / self.inside:.0%}); as shown (stabilizer): {self.shown_right}/{self.inside} "
                f"({self.shown_right / self.inside:.0%})")


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
