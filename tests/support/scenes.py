"""The demo's synthetic scenes as a video file with known cuts, optionally narrated by espeak-ng
(what `streamer demo` plays: streamer/cli/demo.py), for chapter and speech-output tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from streamer.cli.demo import DEMO_FPS, DEMO_SEED, Narration, narration_track, write_narrated_video
from streamer.training.live import LiveCell, _render, live_scenes
from streamer.training.world import MOTIONS, write_video


@dataclass(frozen=True)
class SceneClip:
    path: Path
    scenes: list[tuple[str, float, float]]  # (caption, start, end) of each scene, media seconds
    narration: list[Narration] = field(default_factory=list)  # what is said, when

    @property
    def cuts(self) -> list[float]:
        return [start for _, start, _ in self.scenes[1:]]


def espeak_missing() -> str | None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} missing: apt-get install espeak-ng sox (deploy/apt-packages.txt)" if missing else None


def demo_clip(path: Path, count: int = 4, scene_seconds: float = 6.0, *, narrated: bool = False,
              said: list[str] | None = None) -> SceneClip:
    """`count` of the demo's scenes (seed DEMO_SEED, motion only, no wrapping), square 128 px at 15 fps.
    Narrated: each scene's caption (or `said[k]` in scene k) said 0.5 s into it (voice en-us+m1), as AAC."""
    playlist = live_scenes(DEMO_SEED, count, scene_seconds, jitter=0.0, events=tuple(MOTIONS))
    frames, spans = _render(playlist, LiveCell(DEMO_FPS, 128, 128))
    scenes = [(scene.caption, start, end) for scene, start, end in spans]
    if not narrated:
        write_video(str(path), frames, fps=DEMO_FPS)
        return SceneClip(path, scenes)
    lines = [(said[k] if said else caption, start, end) for k, (caption, start, end) in enumerate(scenes)]
    track, narration = narration_track(lines, len(frames) / DEMO_FPS)
    write_narrated_video(str(path), frames, DEMO_FPS, track)
    return SceneClip(path, scenes, narration)


def names_colour_and_shape(title: str, caption: str) -> bool:
    """The title says the scene's colour and shape (count, size and direction may differ)."""
    from streamer.training.world import COLOURS, SHAPES

    words = set(caption.split())
    colour = next(c for c in COLOURS if c in words)
    shape = next(s for s in SHAPES if s in words or f"{s}s" in words)
    said = set(title.split())
    return colour in said and (shape in said or f"{shape}s" in said)


def bundled_captions(video: Path, window: float = 3.0, hop: float = 1.0) -> list:
    """The bundled model's captions of every window of a video (1 thread, offline: caption_file)."""
    from streamer.defaults import BUNDLED_MODEL
    from streamer.engine import Engine, EngineConfig
    from streamer.pipeline.offline import CaptionJob, caption_file
    from streamer.pipeline.sampler import SamplerConfig

    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), threads=1, max_new_tokens=20))
    return list(caption_file(engine, CaptionJob(str(video), SamplerConfig(window=window, frames=engine.num_frames, hop=hop))))
