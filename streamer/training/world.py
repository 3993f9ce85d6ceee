"""A procedural video world with ground-truth captions (numpy, deterministic by seed).

Shapes of a few kinds, colours and sizes move across plain or noisy
backgrounds, appear and disappear, alone or in pairs. A `Scene` renders a
frame at any media time, so the same scene gives training clips (the frames a
window sampler would pick) and long continuous videos (for live tests).

Some events are only visible in the order of frames (left vs right, appears
vs disappears), and red/blue trade places under an RGB/BGR swap, so a pipeline
that shuffles frames or swaps channels gets captions wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

__all__ = ["COLOURS", "SHAPES", "Obj", "Scene", "random_scene", "clip", "render_video", "demo_scenes", "write_video", "world_vocabulary"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 220, 30),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.24, "big": 0.40}  # side / diameter as a fraction of the frame height
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = tuple(MOTIONS) + ("appears", "disappears")
# what each event looks like with the frames played backwards
REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "appears": "disappears", "disappears": "appears"}
BACKGROUNDS = ("black", "gray", "noise")

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre at t=0, in frame widths (0..1)
    y: float  # centre at t=0, in frame heights (0..1)
    vx: float = 0.0  # frame widths per second
    vy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    event: str  # one of EVENTS
    background: str = "black"
    event_time: float = 0.0  # appears / disappears: when (seconds)
    seed: int = 0
    noise: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def caption(self) -> str:
        first = self.objects[0]
        n = len(self.objects)
        noun = first.shape if n == 1 else _PLURAL[first.shape]
        subject = f"{'a' if n == 1 else 'two'} {first.size} {first.colour} {noun}"
        if self.event in MOTIONS:
            verb = "moves" if n == 1 else "move"
            return f"{subject} {verb} {_direction_phrase(self.event)}"
        verb = self.event if n == 1 else self.event[:-1]  # appears -> appear
        return f"{subject} {verb}"

    @property
    def reversed_caption(self) -> str:
        """The caption of this scene's clip played backwards."""
        return replace(self, event=REVERSED[self.event]).caption

    def visible(self, t: float) -> bool:
        if self.event == "appears":
            return t >= self.event_time
        if self.event == "disappears":
            return t < self.event_time
        return True

    def frame(self, t: float, height: int = 64, width: int = 64) -> np.ndarray:
        img = _background(self.background, height, width, self.seed)
        if not self.visible(t):
            return img
        for obj in self.objects:
            cx = (obj.x + obj.vx * t) % 1.0 * width  # wraps: long scenes keep moving
            cy = (obj.y + obj.vy * t) % 1.0 * height
            _draw(img, obj.shape, COLOURS[obj.colour], cx, cy, SIZES[obj.size] * height)
        return img


def _direction_phrase(event: str) -> str:
    return f"to the {event}" if event in ("left", "right") else event


def _background(kind: str, h: int, w: int, seed: int) -> np.ndarray:
    if kind == "black":
        return np.zeros((h, w, 3), np.uint8)
    if kind == "gray":
        return np.full((h, w, 3), 70, np.uint8)
    rng = np.random.default_rng(seed)  # same texture on every frame of a scene
    return rng.integers(0, 60, (h, w, 3), dtype=np.uint8)


def _draw(img: np.ndarray, shape: str, rgb: tuple[int, int, int], cx: float, cy: float, size: float) -> None:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = size / 2
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    else:  # triangle pointing up
        top = cy - r
        rel = (yy - top) / (2 * r)  # 0 at the apex, 1 at the base
        mask = (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)
    img[mask] = rgb


def random_scene(
    rng: np.random.Generator,
    duration: float = 3.0,
    start: float = 0.0,
    events: tuple[str, ...] = EVENTS,
    subject: tuple[str, str, str] | None = None,
) -> Scene:
    """A scene whose event is visible in the window [start, start + duration).

    `subject` fixes what the object is, so that only the event varies (the
    first stage of training the bundled model).

    Objects wrap around the frame edges, so a window late in a long scene can
    see an object leave one side and come back on the other, as live video does.
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    if subject is not None:  # (shape, colour, size): the same thing every time
        shape, colour, size = subject
    event = events[rng.integers(len(events))]
    count = 1 if rng.random() < 0.7 else 2
    # Most of the frame per window: the object crosses several ViT patches,
    # so direction is plain to see even at 64x64 with 16-pixel patches.
    speed = rng.uniform(0.45, 0.7) / duration
    dx, dy = MOTIONS.get(event, (0, 0))
    # start on the side the motion leaves from, so the window sees it cross the middle
    along = rng.uniform(0.12, 0.22)
    along = along if dx + dy >= 0 else 1.0 - along
    objects = []
    for i in range(count):
        lane = (i + 0.5) / count if count > 1 else rng.uniform(0.3, 0.7)  # pairs: separate lanes
        if dy:
            x, y = lane, along - dy * speed * start
        elif dx:
            x, y = along - dx * speed * start, lane
        else:
            x, y = rng.uniform(0.25, 0.75), lane
        objects.append(Obj(shape, colour, size, x % 1.0, y % 1.0, dx * speed, dy * speed))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    event_time = start + rng.uniform(0.3, 0.7) * duration if event in ("appears", "disappears") else 0.0
    return Scene(tuple(objects), event, background, event_time, seed=int(rng.integers(2**31)))


def clip(scene: Scene, frames: int = 6, duration: float = 3.0, start: float = 0.0, size: int = 64) -> list[np.ndarray]:
    """The frames a window sampler picks from [start, start+duration): slot centres."""
    step = duration / frames
    return [scene.frame(start + (j + 0.5) * step, size, size) for j in range(frames)]


def render_video(scenes: list[tuple[Scene, float]], fps: int = 15, height: int = 96, width: int = 128) -> list[np.ndarray]:
    """Scenes back to back, each for its seconds (scene cuts between them)."""
    frames = []
    for scene, seconds in scenes:
        for i in range(int(round(seconds * fps))):
            frames.append(scene.frame(i / fps, height, width))
    return frames


def demo_scenes(count: int, seed: int = 7) -> list[Scene]:
    """Scenes that stay describable in every window: motion only (an appear or
    disappear happens once, and windows away from it would see a still object)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, events=tuple(MOTIONS)) for _ in range(count)]


def write_video(path: str, frames: list[np.ndarray], fps: int = 15) -> str:
    """H.264 in MP4 (PyAV/libx264)."""
    import av

    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        # no B-frames and a keyframe every second: streams as live, a client can join at any time
        stream.options = {"preset": "veryfast", "tune": "zerolatency", "crf": "18", "g": str(fps)}
        stream.time_base = time_base = Fraction(1, 90000)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = round(i / fps / time_base), time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def world_vocabulary() -> list[str]:
    words = {"a", "two", "to", "the", "moves", "move"}
    words |= set(COLOURS) | set(SIZES) | set(SHAPES) | set(_PLURAL.values())
    words |= {"left", "right", "up", "down", "appears", "appear", "disappears", "disappear"}
    return sorted(words)


def _check_all_captions_in_vocabulary() -> bool:  # used by tests
    vocab = set(world_vocabulary())
    rng = np.random.default_rng(0)
    return all(set(random_scene(rng).caption.split()) <= vocab for _ in range(500))

