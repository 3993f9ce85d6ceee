"""`streamer eval --live`: how a model captions a live stream, scored against known scene cuts.

The held-out evaluation (evaluate.py) scores clips drawn like the training
data. Live windows differ: the motion per window, where the window falls
against the motion and the cuts, objects leaving the frame, H.264 at a
camera's bitrate, the daemon's own resize path. This module measures that:

1. A long synthetic stream: scenes from the world's generator (seeded),
   back to back, each for about `scene_seconds` (lengths vary by +-`jitter`
   so that cuts fall at every phase of the hop), rendered at each cell's size
   and frame rate and encoded to H.264 (libx264, `bits_per_pixel` x pixels x
   fps: 0.1 is a security camera's 6 Mbit/s at 1080p30; no B-frames, a
   keyframe every 2 s). Or a user's video with a manifest of timed captions.
2. Played through the real daemon (`Daemon`: FrameSource with its SlotGate,
   ring, sampler, scheduler, engine, hub), stream config as a user gives it.
   The file is read as fast as it decodes (`realtime=False`) and the
   scheduler keeps every window (no newest-wins drops) so that every window
   is scored; pacing changes only wall-clock times, not which frames a window
   takes (the sampler and the gate go by pts). Drops are counted and reported.
3. Scored by `score_runs` (pure, plain data): see its docstring for the
   definitions. Ground truth of a window is the world's own
   `Scene.caption_for_window` (judged on the frames the sampler picks and on
   the part of the frame the engine's centre crop keeps), or `Scene.caption`
   in a world that has no such function.

The same captions are scored as published ("off") and as a stabilizer
shows them ("hold", publish/stabilizer.py), so one engine run measures both.
The JSON has the same keys every time (`LIVE_KEYS`, `SCORE_KEYS`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamer.publish.stabilizer import CaptionStabilizer
from streamer.training.evaluate import _parts, coco_scores

__all__ = [
    "DEFAULT_SEED",
    "LIVE_KEYS",
    "PARTS",
    "SCORE_KEYS",
    "LiveCell",
    "Segment",
    "TimedCaption",
    "encode_h264",
    "live_evaluation",
    "live_scenes",
    "score_captions",
    "score_runs",
    "stabilized",
]

log = logging.getLogger(__name__)

DEFAULT_SEED = 20_000  # training draws from small seeds and held-out clips from 10_000: never seen
PARTS = ("count", "size", "colour", "shape", "event")
SCORE_KEYS = ("windows", "inside", "exact", "exact_ci95", "parts", "kinds", "straddle", "change_delay", "flicker",
              "flicker_per_100", "unscored", "wrong")
LIVE_KEYS = ("model", "source", "truth", "seed", "scenes", "scene_seconds", "window", "hop", "frames",
             "stabilizer", "cells", "off", "hold", "sweep", "coco", "seconds")
_EPS = 1e-6
_STREAM = "live-eval"


# -- plain data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """What is on screen from `start` to `end` (media seconds): one scene, or one manifest row.

    `truth(start, end)`, given a window's extent in the segment's own time
    (0 = the segment's first frame), says what that window shows; None: the
    fixed `caption` for every window. `scene`: segments of several runs with the same `scene`
    show the same thing (the cells of a live evaluation): `exact_ci95` resamples them together.
    `kind(start, end)`, in the same time, names what makes that window easy or hard (the world's
    `Scene.window_kind`: "moving: mostly out" for slivers at the edge...): scores split by it;
    None: not split (a user's manifest)."""

    start: float
    end: float
    caption: str
    truth: Callable[[float, float], str] | None = field(default=None, compare=False, repr=False)
    scene: int | None = field(default=None, compare=False)
    kind: Callable[[float, float], str] | None = field(default=None, compare=False, repr=False)

    def caption_for(self, window_start: float, window_end: float) -> str:
        if self.truth is None:
            return self.caption
        return self.truth(window_start - self.start, window_end - self.start)

    def kind_for(self, window_start: float, window_end: float) -> str | None:
        return None if self.kind is None else self.kind(window_start - self.start, window_end - self.start)


@dataclass(frozen=True)
class TimedCaption:
    """One window's caption as scoring needs it. `start`/`end`: media time of its first and last frame
    (as on the wire); `window`: the window's extent [start, end) on the sampler's grid (default: start, end)."""

    index: int
    start: float
    end: float
    text: str
    confidence: float = math.nan
    window: tuple[float, float] | None = None

    @property
    def extent(self) -> tuple[float, float]:
        return self.window if self.window is not None else (self.start, self.end)


Run = tuple[Sequence[TimedCaption], Sequence[Segment]]


# -- scoring (pure) ----------------------------------------------------------------------------------------


def score_captions(captions: Sequence[TimedCaption], segments: Sequence[Segment]) -> dict[str, Any]:
    """`score_runs` of one stream."""
    return score_runs([(captions, segments)])


def score_runs(runs: Sequence[Run]) -> dict[str, Any]:
    """Scores of the captions of one or more streams, each with its segments (in time order, no overlap).

    A window is *inside* a segment when all its frames are (`start` and `end`
    in [segment.start, segment.end)); it *straddles* a cut when its first
    frame is before the cut and its last at or after it. Cuts are the
    boundaries between consecutive segments.

    - exact, parts: on inside windows, the caption against the segment's truth
      for that window (whole caption; count, size, colour, shape, event).
    - kinds: exact and event accuracy on inside windows split by `Segment.kind_for` ({kind: {windows,
      exact, event}} by name; {} when no segment names kinds): where the
      errors are (whole objects, slivers at the edge, still scenes...).
    - exact_ci95: a 95% interval on `exact`, [low, high], resampling scenes
      (segments, or `Segment.scene` across runs: windows of one scene fail
      together, so a binomial interval over windows would be too narrow);
      None below 2 scenes with inside windows.
    - straddle: accuracy on straddling windows, either side's truth accepted.
    - change_delay: per cut whose new segment shows something else, media time
      from the cut to the `end` (last frame) of the first window with a frame
      after the cut whose caption is the new segment's truth for it; a cut
      whose new segment never gets named before the next cut is `missed`.
    - flicker: changes of caption between consecutive windows that see the
      same thing: both inside one segment, whose truth is the same for both
      (nothing on screen changed), except the first change to that truth
      (the cut's, late: `change_delay`). Changes across a cut (a straddling
      window, or windows of two segments) are the cut's: `change_delay` and
      `straddle` score them. Per 100 windows of the run.
    - unscored: windows outside every segment (gaps in a manifest).
    """
    windows = inside = exact = straddling = straddle_right = flicker = unscored = 0
    parts_right = dict.fromkeys(PARTS, 0)
    delays: list[float] = []
    missed = cuts_scored = 0
    wrong: list[dict[str, Any]] = []
    per_scene: dict[Any, list[int]] = {}  # scene -> [right, inside windows], for exact_ci95
    per_kind: dict[str, list[int]] = {}  # kind -> [right, event right, inside windows]
    for captions, segments in runs:
        caps = sorted(captions, key=lambda c: c.index)
        segs = sorted(segments, key=lambda s: s.start)
        cuts = [b.start for a, b in itertools.pairwise(segs)]
        windows += len(caps)
        placed = [_place(c, segs) for c in caps]
        for cap, (kind, touched) in zip(caps, placed):
            if kind == "inside":
                seg = touched[0]
                truth = seg.caption_for(*cap.extent)
                inside += 1
                exact += cap.text == truth
                tally = per_scene.setdefault(id(seg) if seg.scene is None else seg.scene, [0, 0])
                tally[0] += cap.text == truth
                tally[1] += 1
                got, want = _parts(cap.text), _parts(truth)
                for part in PARTS:
                    parts_right[part] += got[part] == want[part]
                kind_name = seg.kind_for(*cap.extent)
                if kind_name is not None:
                    counts = per_kind.setdefault(kind_name, [0, 0, 0])
                    counts[0] += cap.text == truth
                    counts[1] += got["event"] == want["event"]
                    counts[2] += 1
                if cap.text != truth and len(wrong) < 10:
                    wrong.append({"start": round(cap.start, 3), "end": round(cap.end, 3), "caption": cap.text,
                                  "reference": truth})
            elif kind == "straddle":
                straddling += 1
                straddle_right += any(cap.text == seg.caption_for(*cap.extent) for seg in touched)
            else:
                unscored += 1
        # change delay, per cut
        for a, b, cut in zip(segs, segs[1:], cuts):
            first_inside = next((c for c, (k, t) in zip(caps, placed) if k == "inside" and t[0] is b), None)
            last_before = next((c for c, (k, t) in zip(reversed(caps), reversed(placed)) if k == "inside" and t[0] is a),
                               None)
            if first_inside is None:
                continue  # the new segment is shorter than a window: nothing to name it by
            if last_before is not None and a.caption_for(*last_before.extent) == b.caption_for(*first_inside.extent):
                continue  # the cut changes nothing a caption says
            cuts_scored += 1
            named = next((c for c in caps if c.end >= cut - _EPS and c.start < b.end - _EPS
                          and c.text == b.caption_for(*c.extent)), None)
            if named is None:
                missed += 1
            else:
                delays.append(named.end - cut)
        # flicker: a change between two windows that see the same thing (both inside one scene, whose
        # truth is the same for both), except the first change to the scene's truth: that one is the
        # cut's, late (`change_delay` says how late). Changes that involve a window with frames of two
        # scenes are the cut's too (`straddle` scores those windows).
        named: set[int] = set()  # segments whose truth a caption has said
        for i, (cap, (kind, touched)) in enumerate(zip(caps, placed)):
            if i and kind == "inside":
                prev, (pk, pt) = caps[i - 1], placed[i - 1]
                seg = touched[0]
                truth = seg.caption_for(*cap.extent)
                if prev.text != cap.text and pk == "inside" and pt[0] is seg and seg.caption_for(*prev.extent) == truth:
                    flicker += not (cap.text == truth and id(seg) not in named)
            named.update(id(seg) for seg in touched if cap.text == seg.caption_for(*cap.extent))
    return {
        "windows": windows,
        "inside": inside,
        "exact": _ratio(exact, inside),
        "exact_ci95": _scene_bootstrap(list(per_scene.values())),
        "parts": {part: _ratio(parts_right[part], inside) for part in PARTS},
        "kinds": {name: {"windows": n, "exact": _ratio(right, n), "event": _ratio(event, n)}
                  for name, (right, event, n) in sorted(per_kind.items())},
        "straddle": {"windows": straddling, "accuracy": _ratio(straddle_right, straddling)},
        "change_delay": _delay_summary(delays, cuts_scored, missed),
        "flicker": flicker,
        "flicker_per_100": None if not windows else round(100 * flicker / windows, 2),
        "unscored": unscored,
        "wrong": wrong,
    }


def _place(cap: TimedCaption, segments: Sequence[Segment]) -> tuple[str, list[Segment]]:
    """("inside", [seg]) | ("straddle", [segs touched]) | ("none", [])."""
    touched = [s for s in segments if cap.start < s.end - _EPS and cap.end >= s.start - _EPS]
    if len(touched) == 1 and touched[0].start - _EPS <= cap.start and cap.end < touched[0].end - _EPS:
        return "inside", touched
    if len(touched) >= 2:
        return "straddle", touched
    return "none", []


def _ratio(n: int, d: int) -> float | None:
    return None if d == 0 else round(n / d, 4)


def _scene_bootstrap(per_scene: list[list[int]], draws: int = 2000) -> list[float] | None:
    """95% percentile interval of right / inside over scenes drawn with replacement (seeded: the same
    captions give the same interval)."""
    if len(per_scene) < 2:
        return None
    right, n = np.array(per_scene, dtype=float).T
    picks = np.random.default_rng(0).integers(len(per_scene), size=(draws, len(per_scene)))
    ratios = right[picks].sum(1) / n[picks].sum(1)
    return [round(float(q), 4) for q in np.percentile(ratios, [2.5, 97.5])]


def _delay_summary(delays: list[float], cuts: int, missed: int) -> dict[str, Any]:
    ordered = sorted(delays)

    def pick(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3) if ordered else None

    return {
        "cuts": cuts,
        "named": len(delays),
        "missed": missed,
        "mean": round(statistics.fmean(delays), 3) if delays else None,
        "median": round(statistics.median(delays), 3) if delays else None,
        "p90": pick(0.9),
        "max": round(ordered[-1], 3) if ordered else None,
    }


def stabilized(captions: Sequence[TimedCaption], mode: str = "hold", windows: int = 2,
               margin: float | None = None, patience: int | None | Literal["auto"] = "auto") -> list[TimedCaption]:
    """The captions an overlay shows under a stabilizer: each window's text replaced by the shown text."""
    rule = CaptionStabilizer(mode, windows, margin, patience)
    out = []
    for cap in sorted(captions, key=lambda c: c.index):
        rule.offer(_as_caption(cap))
        out.append(replace(cap, text=rule.shown_text or ""))
    return out


def _as_caption(cap: TimedCaption):
    from streamer.types import Caption

    return Caption(_STREAM, cap.index, cap.start, cap.end, cap.text, cap.confidence, "")


# -- the synthetic stream ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveCell:
    """One stream format of the matrix."""

    fps: int = 15
    width: int = 128
    height: int = 128

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}@{self.fps}"


def live_scenes(seed: int, count: int, scene_seconds: float, *, jitter: float = 0.25,
                events: tuple[str, ...] | None = None) -> list[tuple[Any, float]]:
    """(scene, seconds) pairs from the world's generator, seeded: the stream the live evaluation plays
    (and, with jitter 0 and motion events, the demo).

    Each scene's event is made to fill its own length (`random_scene(duration=its seconds)`), so an
    object crosses the frame once over the scene and never wraps around the edges mid-scene."""
    from streamer.training import world

    rng = np.random.default_rng(seed)
    generator = getattr(world, "random_live_scene", None)
    out = []
    for _ in range(count):
        seconds = scene_seconds * (1.0 + jitter * float(rng.uniform(-1.0, 1.0))) if jitter else scene_seconds
        if generator is not None and events is None:
            scene = generator(rng, seconds)
        else:
            kwargs: dict[str, Any] = {} if events is None else {"events": events}
            scene = world.random_scene(rng, duration=seconds, **kwargs)
            if hasattr(scene, "wrap"):
                scene = replace(scene, wrap=False)  # an object leaves the frame rather than come back mid-scene
        out.append((scene, seconds))
    return out


def encode_h264(path: str | Path, frames: Sequence[np.ndarray], fps: int, bitrate: int, gop_seconds: float = 2.0) -> str:
    """H.264 in MP4 at a constant-ish bitrate, as a camera sends it: libx264, no B-frames, a keyframe
    every `gop_seconds`, rate-limited (maxrate = bitrate, a one-second buffer)."""
    from streamer.media.encode import write_h264

    return write_h264(path, frames, fps, bitrate=bitrate, gop=max(1, round(fps * gop_seconds)), bframes=0)


def _render(scenes: Sequence[tuple[Any, float]], cell: LiveCell) -> tuple[list[np.ndarray], list[tuple[Any, float, float]]]:
    """Frames of the scenes back to back, and each scene's [start, end) in media time (whole frames)."""
    frames: list[np.ndarray] = []
    spans = []
    for scene, seconds in scenes:
        n = max(1, round(seconds * cell.fps))
        start = len(frames) / cell.fps
        frames.extend(scene.frame(i / cell.fps, cell.height, cell.width) for i in range(n))
        spans.append((scene, start, len(frames) / cell.fps))
    return frames, spans


def _engine_view(engine: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """The part of a height x width frame the engine keeps (its centre crop), in frame fractions."""
    spec = getattr(engine, "spec", None)
    crop = getattr(spec, "crop_hw", None)
    if not crop:
        return (0.0, 0.0, 1.0, 1.0)
    short = getattr(spec, "shortest_edge", None)
    if short:  # resize the short side to `short`, then crop the centre
        scale = short / min(height, width)
        rh, rw = height * scale, width * scale
    else:
        rh, rw = getattr(spec, "resize_hw", None) or (height, width)
    ch, cw = crop
    fx = min(1.0, cw / rw)
    fy = min(1.0, ch / rh)
    return ((1 - fx) / 2, (1 - fy) / 2, (1 + fx) / 2, (1 + fy) / 2)


def _truth_for(scene: Any, frames: int, view: tuple[float, float, float, float], aspect: float):
    if hasattr(scene, "caption_for_window"):
        return lambda s, e: scene.caption_for_window(s, e, frames, view=view, aspect=aspect)
    return None


def _kind_for(scene: Any, frames: int, view: tuple[float, float, float, float], aspect: float):
    if hasattr(scene, "window_kind"):
        return lambda s, e: scene.window_kind(s, e, frames, view=view, aspect=aspect)
    return None


def _truth_name(scene: Any) -> str:
    return "Scene.caption_for_window" if hasattr(scene, "caption_for_window") else "Scene.caption"


# -- playing a video through the daemon ----------------------------------------------------------------------


@dataclass
class _Played:
    captions: list[TimedCaption]
    windows_dropped: int
    frames_dropped: int
    windows_skipped: int
    seconds: float


async def _play(engine: Any, video: str, window: float, hop: float, realtime: bool) -> _Played:
    """Every caption of `video` played as a stream through a real Daemon; windows on the sampler's grid."""
    from streamer.config import StreamConfig
    from streamer.pipeline.daemon import Daemon, DaemonConfig
    from streamer.pipeline.scheduler import SchedulerConfig
    from streamer.publish.hub import SubscriptionClosed
    from streamer.types import StateChange

    big = 1 << 20
    config = DaemonConfig(scheduler=SchedulerConfig(max_pending_per_stream=big), ring_capacity=4096,
                          client_queue=big, history=0)
    daemon = Daemon(engine, config)
    started = time.perf_counter()
    await daemon.start()
    sub = daemon.hub.subscribe([_STREAM], only_changes=False, replay=False)
    messages: list[Any] = []
    ended = asyncio.get_running_loop().create_future()

    async def read() -> None:
        try:
            while True:
                m = await sub.get()
                messages.append(m)
                if isinstance(m.payload, StateChange) and m.payload.state in ("stopped", "failed") and not ended.done():
                    ended.set_result(m.payload)
        except SubscriptionClosed:
            return

    reader = asyncio.create_task(read())
    try:
        rt = await daemon.add_stream(StreamConfig(id=_STREAM, url=video, window=window, hop=hop, realtime=realtime))
        fatal = asyncio.ensure_future(daemon.fatal.wait())
        await asyncio.wait([ended, fatal], return_when=asyncio.FIRST_COMPLETED)
        fatal.cancel()
        if daemon.fatal.is_set():
            raise RuntimeError(f"the daemon gave up: {daemon.health()[1]}")
        state = ended.result()
        if state.state == "failed":
            raise RuntimeError(f"{video}: the stream failed: {state.detail}")
        while len(rt.ring):  # frames handed over before `stopped` still go through the sampler
            await asyncio.sleep(0.01)
        windows_dropped = daemon.scheduler.planner.dropped.get(_STREAM, 0)
        source_dropped = rt.source.stats.dropped if rt.source is not None else 0
        frames_dropped, skipped = rt.ring.dropped + source_dropped, rt.sampler.skipped
        step = rt.sampler.config.step
        t0 = getattr(rt.sampler, "_t0", None) or 0.0  # the grid starts at the first frame
    finally:
        await daemon.stop()  # the windows still waiting are captioned first
        await reader
        # The engine outlives this daemon (the next cell, the next video): frame features are cached
        # by (stream, seq), and the next stream of this name starts again at seq 0.
        engine.forget_stream(_STREAM)
    if daemon.last_batch_error is not None:  # a score over the windows that were left would flatter the model
        raise RuntimeError(f"the engine failed on a batch: {daemon.last_batch_error}")
    captions = []
    for m in messages:
        c = m.payload
        if m.text is None:
            continue
        first = math.ceil(c.index * hop / step - 1e-9)  # the sampler's grid (pipeline/sampler.py)
        captions.append(TimedCaption(c.index, c.start, c.end, c.text, c.confidence,
                                     (t0 + first * step, t0 + first * step + window)))
    if not captions:
        raise RuntimeError(f"{video}: no captions (shorter than one {window:g} s window?)")
    return _Played(captions, windows_dropped, frames_dropped, skipped, time.perf_counter() - started)


# -- the evaluation ----------------------------------------------------------------------------------------


def live_evaluation(
    model: str | None,
    *,
    seed: int = DEFAULT_SEED,
    scenes: int = 20,
    scene_seconds: float = 6.0,
    fps: int = 15,
    width: int = 128,
    height: int = 128,
    cells: Sequence[LiveCell] | None = None,
    window: float = 3.0,
    hop: float = 1.0,
    jitter: float = 0.25,
    scene_set: str = "random",
    bits_per_pixel: float = 0.1,
    stabilize_windows: int = 2,
    stabilize_margin: float | None = None,
    sweep: Sequence[tuple[int, float | None]] = (),
    manifest: str | None = None,
    coco: bool | None = None,
    realtime: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = 1,
    max_new_tokens: int = 20,
    engine: Any = None,
    workdir: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Play a long stream with known scene cuts through the daemon and score its captions.

    `cells` (default: one, `fps`, `width` x `height`) is the matrix of stream formats; every cell plays
    the same scenes. `scene_set`: "random" (the world's generator, `seed`) or "demo" (the scenes
    `streamer demo` plays: motion only, fixed lengths). `manifest`: a user's JSON Lines of
    {path, start, end, caption} instead (consecutive rows of one video are scenes; the matrix does not
    apply). "off" scores the captions as published; "hold" as a stabilizer with `stabilize_windows` /
    `stabilize_margin` shows them; `sweep` adds more (windows, margin) settings. `coco`: BLEU/ROUGE/
    CIDEr/METEOR of the windows inside scenes (None: for a manifest only, where exact match says little;
    METEOR's JVM takes seconds). Returns JSON-ready data with the keys of `LIVE_KEYS`; scores pool
    every cell.
    """
    from streamer.engine import Engine, EngineConfig

    if scene_set not in ("random", "demo"):
        raise ValueError(f"scene_set must be 'random' or 'demo', got {scene_set!r}")
    say = on_progress or (lambda text: log.info(text))
    began = time.perf_counter()
    videos = _manifest_videos(manifest) if manifest is not None else []  # a bad manifest fails before the model loads
    if engine is None:
        engine = Engine.load(EngineConfig(model=model, device=device, dtype=dtype, threads=threads,
                                          max_new_tokens=max_new_tokens))
    frames = engine.num_frames
    cells = list(cells) if cells else [LiveCell(fps, width, height)]
    runs: list[tuple[LiveCell | None, _Played, list[Segment], dict[str, Any]]] = []
    truth = "manifest"
    with tempfile.TemporaryDirectory(prefix="streamer-live-", dir=workdir) as tmp:
        if manifest is not None:
            for video, segments in videos:
                say(f"live eval: {video} ({len(segments)} segments)")
                played = asyncio.run(_play(engine, video, window, hop, realtime))
                runs.append((None, played, segments, {"name": Path(video).name, "fps": None, "width": None, "height": None,
                                                       "bitrate_kbps": None}))
            source = "manifest"
        else:
            if scene_set == "demo":
                from streamer.training.world import MOTIONS

                playlist = live_scenes(seed, scenes, scene_seconds, jitter=0.0, events=tuple(MOTIONS))
            else:
                playlist = live_scenes(seed, scenes, scene_seconds, jitter=jitter)
            truth = _truth_name(playlist[0][0])
            for cell in cells:
                video_frames, spans = _render(playlist, cell)
                bitrate = max(16_000, int(bits_per_pixel * cell.width * cell.height * cell.fps))
                video = encode_h264(Path(tmp) / f"live-{cell.name}.mp4", video_frames, cell.fps, bitrate)
                del video_frames
                view = _engine_view(engine, cell.height, cell.width)
                aspect = cell.width / cell.height
                segments = [Segment(s, e, scene.caption, _truth_for(scene, frames, view, aspect), n,
                                    _kind_for(scene, frames, view, aspect))
                            for n, (scene, s, e) in enumerate(spans)]
                say(f"live eval: {cell.name}, {len(segments)} scenes, {spans[-1][2]:.0f} s of video at "
                    f"{bitrate / 1000:.0f} kbit/s")
                played = asyncio.run(_play(engine, video, window, hop, realtime))
                runs.append((cell, played, segments, {"name": cell.name, "fps": cell.fps, "width": cell.width,
                                                      "height": cell.height, "bitrate_kbps": round(bitrate / 1000, 1)}))
            source = f"synthetic:{scene_set}"

    def score(windows_k: int | None, margin: float | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        per_cell = []
        pooled: list[Run] = []
        for _, played, segments, _ in runs:
            caps = played.captions if windows_k is None else stabilized(played.captions, "hold", windows_k, margin)
            pooled.append((caps, segments))
            per_cell.append(score_runs([(caps, segments)]))
        return score_runs(pooled), per_cell

    off, off_cells = score(None, None)
    hold, hold_cells = score(stabilize_windows, stabilize_margin)
    sweep_out = []
    for k, m in sweep:
        pooled_k, _ = score(k, m)
        sweep_out.append({"windows": k, "margin": m, **_brief(pooled_k)})
    cell_out = []
    for (_, played, _, meta), o, h in zip(runs, off_cells, hold_cells):
        cell_out.append({**meta, "windows": len(played.captions), "windows_dropped": played.windows_dropped,
                         "windows_skipped": played.windows_skipped, "frames_dropped": played.frames_dropped,
                         "seconds": round(played.seconds, 2), "off": _brief(o), "hold": _brief(h)})
    inside_refs, inside_caps = _inside_pairs(runs)
    want_coco = manifest is not None if coco is None else coco
    return {
        "model": engine.model_name,
        "source": source,
        "truth": truth,
        "seed": seed if manifest is None else None,
        "scenes": scenes if manifest is None else sum(len(r[2]) for r in runs),
        "scene_seconds": scene_seconds if manifest is None else None,
        "window": window,
        "hop": hop,
        "frames": frames,
        "stabilizer": {"mode": "hold", "windows": stabilize_windows, "margin": stabilize_margin,
                       "patience": stabilize_windows + 1},
        "cells": cell_out,
        "off": off,
        "hold": hold,
        "sweep": sweep_out,
        "coco": coco_scores(inside_refs, inside_caps) if want_coco and inside_refs else {},
        "seconds": round(time.perf_counter() - began, 1),
    }


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a score dict (for cells and sweeps)."""
    return {"exact": scores["exact"], "straddle": scores["straddle"]["accuracy"],
            "delay_median": scores["change_delay"]["median"], "delay_max": scores["change_delay"]["max"],
            "missed": scores["change_delay"]["missed"], "flicker_per_100": scores["flicker_per_100"]}


def _inside_pairs(runs) -> tuple[list[str], list[str]]:
    refs, caps = [], []
    for _, played, segments, _ in runs:
        for cap in played.captions:
            kind, touched = _place(cap, segments)
            if kind == "inside":
                refs.append(touched[0].caption_for(*cap.extent))
                caps.append(cap.text)
    return refs, caps


def _manifest_videos(path: str) -> list[tuple[str, list[Segment]]]:
    """A manifest's rows grouped by video, in order: each video's rows are its segments."""
    from streamer.training.train import read_manifest

    videos: dict[str, list[Segment]] = {}
    for video, start, end, caption in read_manifest(path):
        videos.setdefault(video, []).append(Segment(start, end, caption))
    out = []
    for video, segments in videos.items():
        segments.sort(key=lambda s: s.start)
        for a, b in itertools.pairwise(segments):
            if b.start < a.end - _EPS:
                raise ValueError(f"{path}: rows of {video} overlap ({a.start:g}-{a.end:g} and {b.start:g}-{b.end:g})")
        out.append((video, segments))
    return out
