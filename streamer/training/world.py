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

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "COLOURS",
    "NOTHING",
    "QUESTION_KINDS",
    "SHAPES",
    "STILL",
    "WINDOW_KINDS",
    "Obj",
    "Scene",
    "WindowTruth",
    "centre_crop_view",
    "clip",
    "demo_scenes",
    "labelled_questions",
    "questions_for",
    "random_edge_scene",
    "random_live_scene",
    "random_placed_scene",
    "random_scene",
    "reasoned_answer",
    "render_video",
    "same_answer",
    "window_times",
    "world_vocabulary",
    "write_video",
]

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
STILL = "still"  # the event of a window whose objects do not move ("a big red circle is still")
NOTHING = "nothing"  # the caption of a window with no object in view
LIVE_EVENTS = EVENTS + (STILL,)
# `Scene.window_kind`: what a window shows, from easy to hard to caption
WINDOW_KINDS = (NOTHING, STILL, "appears", "disappears", "moving: whole", "moving: partly out", "moving: mostly out",
                "moving: wraps")
# what each event looks like with the frames played backwards
REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "appears": "disappears", "disappears": "appears",
            STILL: STILL, NOTHING: NOTHING}
BACKGROUNDS = ("black", "gray", "noise")

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_SINGULAR = {plural: shape for shape, plural in _PLURAL.items()}


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
    wrap: bool = True  # objects leaving one edge come back at the other; False: they leave the frame

    @property
    def caption(self) -> str:
        """The caption of the scene's event (of a window that sees it; see `caption_for_window`)."""
        first = self.objects[0]
        return WindowTruth(len(self.objects), first.size, first.colour, first.shape, self.event).caption

    def truth_for_window(
        self, start: float, end: float, frames: int = 6, view: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
        aspect: float = 1.0,
    ) -> WindowTruth:
        """What a window [start, end) of this scene shows, judged on the frames a
        sampler picks (slot centres) and the part of the frame the model sees.

        `view` is that part as (x0, y0, x1, y1) in scene coordinates (the engine's
        centre crop of a wide frame sees less than the whole width) and `aspect`
        the rendered width / height. An object counts as in view when at least a
        quarter of its width and height is inside. The rules, in order: nothing in
        view in any frame -> NOTHING; the object turns up or goes within the window
        -> appears / disappears; objects that do not move -> STILL; else the
        direction of motion, whether the object crosses, enters or leaves the view.
        """
        times = window_times(start, end, frames)
        seen = [[self._in_view(obj, t, view, aspect) for t in times] for obj in self.objects]
        in_view = [obj for obj, s in zip(self.objects, seen) if any(s)]
        if not in_view:
            first = self.objects[0]
            return WindowTruth(0, first.size, first.colour, first.shape, NOTHING)
        first = in_view[0]
        if self.event in ("appears", "disappears"):
            shown = [any(s[j] for s in seen) for j in range(len(times))]
            if self.event == "appears" and not shown[0] and shown[-1]:
                event = "appears"
            elif self.event == "disappears" and shown[0] and not shown[-1]:
                event = "disappears"
            else:
                event = STILL  # before or after the change: an object standing there
        elif first.vx == 0 and first.vy == 0:
            event = STILL
        else:
            event = self.event
        return WindowTruth(len(in_view), first.size, first.colour, first.shape, event)

    def caption_for_window(self, start: float, end: float, frames: int = 6, **view) -> str:
        """The ground-truth caption of the window [start, end) (see `truth_for_window`):
        the training data, the held-out clips and the live evaluation all use it."""
        return self.truth_for_window(start, end, frames, **view).caption

    def window_kind(
        self, start: float, end: float, frames: int = 6, view: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
        aspect: float = 1.0,
    ) -> str:
        """Which kind of window [start, end) is, to split a score by what makes a window hard (WINDOW_KINDS):
        the truth's event where nothing moves across the view ("nothing", "still", "appears", "disappears"),
        else how much of the moving objects the view shows over the window's frames: "moving: whole" (every
        object in view entirely inside in every frame), "moving: partly out" (entirely inside in 3-5 of 6 frames),
        "moving: mostly out" (in at most 2: slivers at the view's edge), or "moving: wraps" (an object jumps
        from one edge to the other between two frames, which reads as the opposite motion)."""
        event = self.truth_for_window(start, end, frames, view=view, aspect=aspect).event
        if event not in MOTIONS:
            return event
        times = window_times(start, end, frames)
        if self.wrap and any(np.abs(np.subtract(self._position(obj, a), self._position(obj, b))).max() > 0.5
                             for obj in self.objects for a, b in itertools.pairwise(times)):
            return "moving: wraps"
        shown = [obj for obj in self.objects if any(self._in_view(obj, t, view, aspect) for t in times)]
        whole = min(sum(self._whole_in_view(obj, t, view, aspect) for t in times) for obj in shown)
        if whole == len(times):
            return "moving: whole"
        return "moving: partly out" if 2 * whole >= len(times) else "moving: mostly out"

    def _whole_in_view(self, obj: Obj, t: float, view: tuple[float, float, float, float], aspect: float) -> bool:
        inside_x, inside_y, rx, ry = self._inside(obj, t, view, aspect)
        return self.visible(t) and inside_x >= 2 * rx - 1e-9 and inside_y >= 2 * ry - 1e-9

    def _position(self, obj: Obj, t: float) -> tuple[float, float]:
        x, y = obj.x + obj.vx * t, obj.y + obj.vy * t
        return (x % 1.0, y % 1.0) if self.wrap else (x, y)

    def _in_view(self, obj: Obj, t: float, view: tuple[float, float, float, float], aspect: float) -> bool:
        inside_x, inside_y, rx, ry = self._inside(obj, t, view, aspect)
        return self.visible(t) and inside_x >= 0.5 * rx and inside_y >= 0.5 * ry

    def _inside(self, obj: Obj, t: float, view: tuple[float, float, float, float], aspect: float
                ) -> tuple[float, float, float, float]:
        """How much of the object's width and height lies inside the view at t, and its radii (frame units)."""
        x, y = self._position(obj, t)
        ry = SIZES[obj.size] / 2  # radius in frame heights
        rx = ry / aspect  # in frame widths
        x0, y0, x1, y1 = view
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
        return min(x + rx, x1) - max(x - rx, x0), min(y + ry, y1) - max(y - ry, y0), rx, ry

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
            x, y = self._position(obj, t)  # wraps by default: long scenes keep moving
            _draw(img, obj.shape, COLOURS[obj.colour], x * width, y * height, SIZES[obj.size] * height)
        return img


@dataclass(frozen=True)
class WindowTruth:
    """What one window shows: the parts of its caption and the answers to questions about it."""

    count: int  # objects in view; 0: nothing (the other fields then name the scene's object)
    size: str
    colour: str
    shape: str
    event: str  # one of LIVE_EVENTS, or NOTHING

    @property
    def caption(self) -> str:
        if self.count == 0 or self.event == NOTHING:
            return NOTHING
        n = self.count
        noun = self.shape if n == 1 else _PLURAL[self.shape]
        subject = f"{'a' if n == 1 else 'two'} {self.size} {self.colour} {noun}"
        if self.event in MOTIONS:
            verb = "moves" if n == 1 else "move"
            return f"{subject} {verb} {_direction_phrase(self.event)}"
        if self.event == STILL:
            return f"{subject} {'is' if n == 1 else 'are'} still"
        verb = self.event if n == 1 else self.event[:-1]  # appears -> appear
        return f"{subject} {verb}"

    def reversed(self) -> WindowTruth:
        """What the window shows with its frames played backwards."""
        return replace(self, event=REVERSED[self.event])


def centre_crop_view(width: int, height: int, content: tuple[int, int] | None = None) -> dict:
    """`view` and `aspect` for `Scene.truth_for_window` of a scene rendered at
    width x height (or as a `content` (w, h) picture centred in that frame, with
    bars) and seen through the engine's centre crop of the short side, which
    cuts the sides off a wide frame: `scene.caption_for_window(s, e, **centre_crop_view(128, 96))`."""
    cw, ch = content or (width, height)
    side = min(width, height)
    x0, y0 = (cw - side) / (2 * cw), (ch - side) / (2 * ch)
    return {"view": (x0, y0, 1 - x0, 1 - y0), "aspect": cw / ch}


def window_times(start: float, end: float, frames: int = 6) -> list[float]:
    """The media times a window sampler takes frames at: the centres of `frames` equal slots."""
    step = (end - start) / frames
    return [start + (j + 0.5) * step for j in range(frames)]


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


def random_live_scene(rng: np.random.Generator, seconds: float = 8.0) -> Scene:
    """A scene as a live camera would show it for `seconds`: any speed from slow
    motion to the world's fastest (0.05-0.4 frame per second, 0.15-1.2 per 3 s
    window), still scenes, objects starting anywhere (entering, leaving, partly
    outside the frame), wrapping around or leaving for good, an appear or
    disappear at any time. Windows of it are captioned by `caption_for_window`."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    event = LIVE_EVENTS[rng.choice(len(LIVE_EVENTS), p=[0.14, 0.14, 0.14, 0.14, 0.13, 0.13, 0.18])]
    count = 1 if rng.random() < 0.7 else 2
    speed = log_uniform(rng, 0.05, 0.4)
    dx, dy = MOTIONS.get(event, (0, 0))
    wrap = bool(rng.random() < 0.5)
    if wrap or not (dx or dy):
        along = rng.uniform(0.0, 1.0)
    else:  # make sure the window range sees it: start it somewhere it will cross in the scene
        travel = speed * seconds
        along = rng.uniform(-0.2, 1.2) if travel > 1.4 else rng.uniform(0.5 - travel, 0.5 + 0.3)
        along = along if dx + dy > 0 else 1.0 - along
    objects = []
    for i in range(count):
        lane = (i + 0.5) / count + rng.uniform(-0.05, 0.05) if count > 1 else rng.uniform(0.2, 0.8)
        if dy:
            x, y = lane, along
        elif dx:
            x, y = along, lane
        else:
            x, y = rng.uniform(0.15, 0.85), lane
        objects.append(Obj(shape, colour, size, x, y, dx * speed, dy * speed))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    event_time = rng.uniform(0.5, seconds - 0.5) if event in ("appears", "disappears") else 0.0
    return Scene(tuple(objects), event, background, event_time, seed=int(rng.integers(2**31)), wrap=wrap)


def random_edge_scene(rng: np.random.Generator, duration: float = 3.0) -> Scene:
    """A scene whose window [0, duration) sees its object(s) enter or leave the frame at an edge, at any of
    the live generator's speeds (0.05-0.4 frame/s), from a sliver to the whole object at mid-window: the
    windows the bundled model was at chance on (`benchmarks/probe_motion.py`), drawn clean and on purpose."""
    event = list(MOTIONS)[rng.integers(len(MOTIONS))]
    sign = sum(MOTIONS[event])  # +1: right / down
    speed = log_uniform(rng, 0.05, 0.4)
    size = list(SIZES)[rng.integers(len(SIZES))]
    radius = SIZES[size] / 2
    middle = float(rng.integers(2)) + rng.uniform(-radius, radius)  # the centre at mid-window: on an edge
    return _placed(rng, event, size, middle - sign * speed * duration / 2, speed, duration)


def random_cut_scene(rng: np.random.Generator, duration: float = 3.0) -> Scene:
    """Still object(s) cut by an edge of the frame, from a quarter of their width or height inside (what
    `truth_for_window` counts as in view) to whole: what a wide frame's centre crop shows of objects near its
    sides, where the bundled model misnames shapes (a cut square is a bar, a cut circle a bump) and counts."""
    scene = _placed(rng, STILL, list(SIZES)[rng.integers(len(SIZES))], 0.5, 0.0, duration)
    radius = SIZES[scene.objects[0].size] / 2
    vertical = bool(rng.integers(2))  # cut by the top or bottom edge, else by the left or right one

    def cut(obj: Obj) -> Obj:  # its lane (y, apart from the other object's) runs along the cutting edge
        inside = rng.uniform(0.25, 1.0) * 2 * radius  # of the object's extent across the edge, in frame units
        centre = inside - radius if rng.integers(2) else 1.0 - inside + radius
        return replace(obj, x=obj.y, y=centre) if vertical else replace(obj, x=centre)

    return replace(scene, objects=tuple(cut(obj) for obj in scene.objects))


def random_placed_scene(rng: np.random.Generator, duration: float = 3.0) -> Scene:
    """A world clip of any event whose path lies anywhere in the frame, edges included, at 0.05-0.25 frame/s:
    where an object is says nothing of which way it moves (`random_scene`'s always cross the middle, fast)."""
    event = EVENTS[rng.integers(len(EVENTS))]
    sign = sum(MOTIONS.get(event, (0, 0)))
    speed = log_uniform(rng, 0.05, 0.25)
    size = list(SIZES)[rng.integers(len(SIZES))]
    return _placed(rng, event, size, rng.uniform(0.0, 1.0) - sign * speed * duration / 2, speed, duration)


def random_wrap_scene(rng: np.random.Generator, duration: float = 3.0) -> Scene:
    """A scene whose window [0, duration) sees its object(s) leave one edge and come back at the opposite one
    between two sampled frames, at any of the live generator's speeds: the jump across the frame reads as the
    opposite motion, and only the object shrinking at one edge and growing at the other says which way it
    goes (`Scene.window_kind` "moving: wraps", stage 5 of the bundled model's worst kind of window)."""
    event = list(MOTIONS)[rng.integers(len(MOTIONS))]
    sign = sum(MOTIONS[event])  # +1: right / down
    speed = log_uniform(rng, 0.05, 0.4)
    step = duration / 6  # the sampler's 6 slots: the centre crosses the edge after the first one, before the last
    crossing = rng.uniform(0.5 * step, duration - 0.5 * step)
    edge = 1.0 if sign > 0 else 0.0
    scene = _placed(rng, event, list(SIZES)[rng.integers(len(SIZES))], edge - sign * speed * crossing, speed, duration)
    return replace(scene, objects=tuple(replace(obj, x=obj.x % 1.0, y=obj.y % 1.0) for obj in scene.objects), wrap=True)


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Speeds spread evenly over their ratio: as many between 0.05 and 0.1 as between 0.2 and 0.4."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _placed(rng: np.random.Generator, event: str, size: str, along: float, speed: float, duration: float) -> Scene:
    """One or two objects of a random kind starting at `along` on the event's axis, in lanes across it; no wrap."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    dx, dy = MOTIONS.get(event, (0, 0))
    count = 1 if rng.random() < 0.7 else 2
    objects = []
    for i in range(count):
        lane = (i + 0.5) / count + rng.uniform(-0.05, 0.05) if count > 1 else rng.uniform(0.2, 0.8)
        x, y = (lane, along) if dy else (along, lane) if dx else (rng.uniform(0.15, 0.85), lane)
        objects.append(Obj(shape, colour, size, x, y, dx * speed, dy * speed))
    event_time = rng.uniform(0.3, 0.7) * duration if event in ("appears", "disappears") else 0.0
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(tuple(objects), event, background, event_time, seed=int(rng.integers(2**31)), wrap=False)


def clip(scene: Scene, frames: int = 6, duration: float = 3.0, start: float = 0.0, size: int = 64) -> list[np.ndarray]:
    """The frames a window sampler picks from [start, start+duration): slot centres."""
    step = duration / frames
    return [scene.frame(start + (j + 0.5) * step, size, size) for j in range(frames)]


def render_video(scenes: list[tuple[Scene, float]], fps: int = 15, height: int = 96, width: int = 128) -> list[np.ndarray]:
    """Scenes back to back, each for its seconds (scene cuts between them)."""
    frames = []
    for scene, seconds in scenes:
        for i in range(round(seconds * fps)):
            frames.append(scene.frame(i / fps, height, width))
    return frames


def demo_scenes(count: int, seed: int = 7) -> list[Scene]:
    """Scenes that stay describable in every window: motion only (an appear or
    disappear happens once, and windows away from it would see a still object)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, events=tuple(MOTIONS)) for _ in range(count)]


def write_video(path: str, frames: list[np.ndarray], fps: int = 15) -> str:
    """H.264 in MP4 (PyAV/libx264): no B-frames and a keyframe every second, so it streams as live
    and a client can join at any time."""
    from streamer.media.encode import write_h264

    return write_h264(path, frames, fps, crf=18, gop=fps)


# Questions (GIT-VQA style: the question is the text prefix after [CLS], the
# answer follows it). Phrasings vary so that a user's wording still works.
QUESTION_KINDS = ("colour", "shape", "count", "direction", "yes", "no")
_ASK = {
    "colour": ("what colour is it ?", "what color is it ?", "what colour are they ?", "what color are they ?"),
    "shape": ("what shape is it ?", "what shape are they ?"),
    "count": ("how many are there ?", "how many shapes are there ?"),
    "direction": ("which way does it move ?", "which way do they move ?", "where does it move ?"),
}
NONE = "none"  # the answer about a window with nothing in view
# The bundled model first says what it sees, then the answer after this word
# ("a big red circle moves up so red"): the answer is read from its own caption,
# which it already gets right (streamer/engine/prompts.py reads it back).
ANSWER_MARKER = "so"


def reasoned_answer(caption: str, answer: str, question: str = "") -> str:
    """The text the bundled model learns to say after a question: its caption,
    the marker, the answer. A shape is answered with the caption's own noun
    ("circles" when it said two), a copy rather than a translation. A yes/no
    question ("is there a red circle ?") is checked one word at a time between
    the caption and the marker: "two small red squares move up red yes circle
    no so no". Each check only asks whether the word just said occurs in the
    caption, and the answer is the AND of the checks; answering in one step
    (both words at once) stayed at chance (the model card)."""
    said = caption.split()
    if answer in SHAPES:
        answer = next((w for w in said if _SINGULAR.get(w, w) == answer), answer)
    asked = question.split()
    if len(asked) == 6 and asked[:3] == ["is", "there", "a"]:
        colour, shape = asked[3], asked[4]
        seen = lambda word: "yes" if any(_SINGULAR.get(w, w) == word for w in said) else "no"
        return f"{caption} {colour} {seen(colour)} {shape} {seen(shape)} {ANSWER_MARKER} {answer}"
    return f"{caption} {ANSWER_MARKER} {answer}"


def same_answer(got: str, expected: str) -> bool:
    """Whether an answer is right: a shape in the singular or the plural names it."""
    return _SINGULAR.get(got, got) == _SINGULAR.get(expected, expected)


def labelled_questions(truth: WindowTruth | Scene, rng: np.random.Generator | None = None) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one window, one of each kind in QUESTION_KINDS:
    colour, shape, count ("one", "two", "none"), direction (left/right/up/down, or
    "still" for objects that do not move) and "is there a <colour> <shape> ?" once
    with the answer yes and once with no (a wrong colour, shape or both)."""
    if isinstance(truth, Scene):
        first = truth.objects[0]
        truth = WindowTruth(len(truth.objects), first.size, first.colour, first.shape, truth.event)
    rng = rng or np.random.default_rng(0)
    pick = lambda options: options[int(rng.integers(len(options)))]
    empty = truth.count == 0 or truth.event == NOTHING
    direction = truth.event if truth.event in MOTIONS else STILL
    out = [
        ("colour", pick(_ASK["colour"]), NONE if empty else truth.colour),
        ("shape", pick(_ASK["shape"]), NONE if empty else truth.shape),
        ("count", pick(_ASK["count"]), NONE if empty else ("one" if truth.count == 1 else "two")),
        ("direction", pick(_ASK["direction"]), NONE if empty else direction),
    ]
    other_colour = pick([c for c in COLOURS if c != truth.colour])
    other_shape = pick([s for s in SHAPES if s != truth.shape])
    wrong = pick([(other_colour, truth.shape), (truth.colour, other_shape), (other_colour, other_shape)])
    if not empty:
        out.append(("yes", f"is there a {truth.colour} {truth.shape} ?", "yes"))
    else:  # nothing to say yes to: ask about what the scene would show
        out.append(("yes", f"is there a {truth.colour} {truth.shape} ?", "no"))
    out.append(("no", f"is there a {wrong[0]} {wrong[1]} ?", "no"))
    return out


def questions_for(truth: WindowTruth | Scene, rng: np.random.Generator | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs about a window (or a scene's event), one per QUESTION_KINDS."""
    return [(q, a) for _, q, a in labelled_questions(truth, rng)]


def world_vocabulary() -> list[str]:
    """Every word of the world's captions, questions and answers."""
    words = {"a", "two", "to", "the", "moves", "move", "is", "are", STILL, NOTHING}
    words |= set(COLOURS) | set(SIZES) | set(SHAPES) | set(_PLURAL.values())
    words |= {"left", "right", "up", "down", "appears", "appear", "disappears", "disappear"}
    for phrasings in _ASK.values():
        for question in phrasings:
            words |= set(question.split())
    words |= {"there", "yes", "no", "one", NONE, ANSWER_MARKER}
    return sorted(words)


def _check_all_captions_in_vocabulary() -> bool:  # used by tests
    vocab = set(world_vocabulary())
    rng = np.random.default_rng(0)
    return all(set(random_scene(rng).caption.split()) <= vocab for _ in range(500))

