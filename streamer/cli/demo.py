"""`streamer demo`: the daemon on a live synthetic scene, captions printed as they arrive.

Honest by construction: the bundled model (trained on this world) unless
`--model` names another; scenes it was trained to describe (motion only,
each object crossing the frame once per scene, never wrapping round an edge);
every caption marked against the ground truth of its window
(`Scene.caption_for_window`), with a running score of the windows inside a
scene, as captioned and as the stream's stabilizer shows them.

Narrated: where espeak-ng and sox are installed, a voice says each scene's
caption half a second into the scene (espeak-ng, muxed into the demo video as
AAC), the stream runs with `speech = "on"`, and what the speech model heard
is printed beside the scene captions (`said "..."`), marked against what was
said. `--no-speech`, or no espeak-ng: captions only (said once). Each
chapter (a lasting scene, publish/chapters.py) is printed when it closes.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
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

    narrate = not args.no_speech and narration_missing() is None
    if not args.no_speech and not narrate:
        print(f"# no narration: {narration_missing()}; the demo runs with scene captions only", flush=True)
    source, schedule, truth = _demo_source(args.scene_seconds, args.window, args.hop, narrate=narrate)
    # The bundled model knows this world; another model's captions could not be scored against it.
    model = args.model or BUNDLED_MODEL_NAME
    config = load_config(None, argparse.Namespace(model=model, device=args.device, dtype=None, max_new_tokens=None,
                                                  host="127.0.0.1", port=args.port, stream=None,
                                                  speech_model=args.speech_model))
    config = replace(config, streams=(StreamConfig(id="demo", url=source, window=args.window, hop=args.hop, loop=True,
                                                   speech="on" if narrate else "off"),))

    async def main() -> None:
        stop = asyncio.Event()

        def ready(port: int, daemon) -> None:
            print(f"# streamer demo: a live synthetic scene -> captions; WebSocket ws://127.0.0.1:{port}/ws", flush=True)
            print(f"# model: {daemon.engine.model_name}; Ctrl-C to stop. What is on screen (loops):", flush=True)
            for line in schedule:
                print(f"#   {line}", flush=True)
            if truth.narration:
                print(f"# What is said (espeak-ng, voice {DEMO_VOICE}), printed as `said` when the speech model "
                      "has heard it:", flush=True)
                for n in truth.narration:
                    print(f"#   {n.start:5.1f}-{n.end:<5.1f} s  \"{n.text}\"", flush=True)
            truth.frames = daemon.engine.num_frames
            if args.model is not None:
                print("# (--model: a model not trained on this world may be marked wrong where it is merely "
                      "worded otherwise)", flush=True)
            sub = daemon.hub.subscribe(None, only_changes=False,
                                       types=["chapter", "speech"] if truth.narration else ["chapter"])

            async def show() -> None:
                shown = 0
                started = time.monotonic()
                while True:
                    message = (await sub.get()).data
                    if message.get("type") == "speech":
                        print(format_speech_line(message) + truth.judge_speech(message), flush=True)
                        continue
                    if message.get("type") == "chapter":  # a lasting scene ended (publish/chapters.py)
                        print(f"# chapter {message['index']}: {message['start']:.1f}-{message['end']:.1f} s  "
                              f"{message['title']}", flush=True)
                        continue
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
DEMO_VOICE = "en-us+m1"  # a voice the bundled speech model trained with (its card: streamer/models/world-whisper)
NARRATION_DELAY = 0.5  # seconds into each scene the voice starts


def format_speech_line(message: dict) -> str:
    """A `speech` message as `streamer demo` prints it, beside the caption lines."""
    conf = message.get("confidence")
    conf_text = "n/a" if conf is None else f"{conf:.2f}"
    start, end = message.get("start"), message.get("end")
    span = f"{start:9.2f}-{end:<9.2f}" if isinstance(start, (int, float)) and isinstance(end, (int, float)) else " " * 19
    return (f"[{message['stream_id']}] {span} said \"{message['text']}\"  (confidence {conf_text}, "
            f"{message.get('latency') or 0:.2f} s after the words)")


def narration_missing() -> str | None:
    """Why the demo cannot be narrated here (None: it can)."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found (apt-get install espeak-ng sox)" if missing else None


@dataclass(frozen=True)
class Narration:
    """What the demo's voice says, and when (media time within one loop)."""

    start: float
    end: float
    text: str


def _demo_source(scene_seconds: float, window: float = 3.0, hop: float = 1.0, *,
                 narrate: bool = False) -> tuple[str, list[str], DemoTruth]:
    """A looping video of synthetic scenes (cached), what each scene shows, and the judge of captions
    (and, narrated, of speech cues)."""
    import os

    from streamer.training.live import LiveCell, _render, live_scenes
    from streamer.training.world import MOTIONS, write_video

    # The live evaluation's demo scenes (`streamer eval --live --scene-set demo` scores them): motion only,
    # each object crossing the frame once per scene, so no window sees it wrap round an edge.
    playlist = live_scenes(DEMO_SEED, DEMO_SCENES, scene_seconds, jitter=0.0, events=tuple(MOTIONS))
    # square, like the training clips: a centre crop of a wide frame would cut the edges off
    frames, spans = _render(playlist, LiveCell(DEMO_FPS, 128, 128))
    root = Path(os.environ.get("STREAMER_CACHE") or Path.home() / ".cache" / "streamer")
    seconds = len(frames) / DEMO_FPS
    narration: list[Narration] = []
    if narrate:
        track, narration = narration_track([(scene.caption, start, end) for scene, start, end in spans], seconds)
        path = root / f"demo-world-v2-{len(playlist)}x{scene_seconds:g}s-narrated-v1.mp4"
        def write(out: str) -> str:
            return write_narrated_video(out, frames, DEMO_FPS, track)
    else:
        path = root / f"demo-world-v2-{len(playlist)}x{scene_seconds:g}s.mp4"  # v2: scenes that do not wrap
        def write(out: str) -> str:
            return write_video(out, frames, fps=DEMO_FPS)
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        write(str(tmp))
        tmp.replace(path)
    schedule = [f"{start:5.1f}-{end:<5.1f} s  {scene.caption}" for scene, start, end in spans]
    return str(path), schedule, DemoTruth(spans, seconds, window, hop, narration=narration)


def narration_track(lines: list[tuple[str, float, float]], seconds: float, *, voice: str = DEMO_VOICE,
                    delay: float = NARRATION_DELAY, seed: int = 0) -> tuple[Any, list[Narration]]:
    """16 kHz mono float32 audio of `seconds` in which `voice` says each (text, start, end) `delay` s after its
    start (a line that would run past its end, less 0.3 s, is left out), over the hiss of a quiet room."""
    import numpy as np

    from streamer.speech.vad import SAMPLE_RATE
    from streamer.training.speech import synthesize

    track = np.zeros(round(seconds * SAMPLE_RATE), np.float32)
    said: list[Narration] = []
    for text, start, end in lines:
        audio = synthesize(text, voice, 160, 50)
        voiced = np.flatnonzero(np.abs(audio) > 0.01)
        if not len(voiced):
            continue
        words = audio[voiced[0] : voiced[-1] + 1]  # the words only: espeak-ng pads with its own silence
        at = start + delay
        if at + len(words) / SAMPLE_RATE > end - 0.3:
            continue  # would run into the next scene
        i = round(at * SAMPLE_RATE)
        track[i : i + len(words)] += 0.5 * words[: len(track) - i]
        said.append(Narration(at, at + len(words) / SAMPLE_RATE, text))
    track += 0.003 * np.random.default_rng(seed).standard_normal(len(track)).astype(np.float32)
    return track, said


def write_narrated_video(path: str, frames: list, fps: int, track: Any) -> str:
    """H.264 video (as world.write_video: a keyframe a second, no B-frames) and `track` (16 kHz mono
    float32) as AAC at 44.1 kHz, muxed into one MP4 by PyAV."""
    from streamer.media.encode import write_h264
    from streamer.speech.vad import SAMPLE_RATE

    return write_h264(path, frames, fps, crf=18, gop=fps, audio=track, audio_rate=SAMPLE_RATE)


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
    narration: list[Narration] = field(default_factory=list)  # what the voice says, within one loop
    inside: int = 0
    right: int = 0
    shown_right: int = 0
    said: int = 0  # speech cues that overlap a line of the narration
    said_right: int = 0  # ... and heard it word for word
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

    def judge_speech(self, message: dict) -> str:
        """A short verdict for a speech cue: the narration line it overlaps, heard right or not."""
        start, end = message.get("start"), message.get("end")
        if not self.narration or not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
            return ""
        base = math.floor(start / self.loop) * self.loop
        start, end = start - base, end - base
        overlap = [(min(end, n.end) - max(start, n.start), n) for n in self.narration]
        best, line = max(overlap, key=lambda pair: pair[0])
        if best <= 0:
            return "   ~ nothing was said then"
        self.said += 1
        heard = " ".join(str(message.get("text", "")).lower().split())
        if heard == line.text:
            self.said_right += 1
            return "   ok"
        return f"   WRONG, said: {line.text}"

    def summary(self) -> str:
        if not self.inside:
            return "accuracy so far: no window inside a scene yet"
        speech = f"; speech heard word for word: {self.said_right}/{self.said}" if self.said else ""
        return (f"accuracy so far: {self.right}/{self.inside} windows inside a scene right "
                f"({self.right / self.inside:.0%}); as shown (stabilizer): {self.shown_right}/{self.inside} "
                f"({self.shown_right / self.inside:.0%}){speech}")


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
    demo.add_argument("--no-speech", action="store_true",
                      help="no narration (by default, where espeak-ng and sox are installed, a voice says each scene's "
                      "caption and the stream transcribes it)")
    demo.add_argument("--speech-model", default=None,
                      help="Whisper checkpoint for the narration (default: openai/whisper-small when cached or "
                      "reachable, else the bundled streamer/world-whisper)")
    demo.set_defaults(run=run_demo)
