"""`streamer train`: fine-tune or train a GIT captioner on (clip, caption) pairs.

Data: the synthetic world (`--data synthetic`: clean clips), the world as a
live stream delivers it mixed with questions (`--data live`: what the bundled
model is trained on, see `live_world_examples`), or a JSON Lines manifest of
`{"path": ..., "start": s, "end": s, "caption": ...}` rows (frames are spread
over [start, end] the way the live sampler would pick them).

An example's text is a caption, or an answer after its question: questions
are the text prefix after [CLS] (GIT-VQA style) and only the answer's tokens
count in the loss.

A plain loop (AdamW, warm-up + cosine decay, gradient clipping, bf16
autocast on a GPU; examples rendered by `--data-workers` processes, each
from its own seed); progress and loss on a terminal bar or in log lines;
`--out DIR/checkpoint-N` every `--save-every` steps with the optimizer state,
and `--resume` continues from the newest one. The final model is a
`save_pretrained` directory that `streamer caption/serve --model DIR` loads.
`--grow-image-size` trains an existing model at a larger input (`grow_input`),
`--grow-hidden` at a larger width (`grow_width`), each starting from what the
model says.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.engine.loader import load_model, resolve_device
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.errors import StreamerError
from streamer.training.loop import (
    MAX_DATA_WORKERS,
    Progress,
    RunConfig,
    cosine_schedule,
    example_batches,
    optimizer_step,
    save_checkpoint,
    save_training_state,
)

__all__ = ["TrainConfig", "manifest_examples", "synthetic_examples", "train"]

log = logging.getLogger(__name__)

LIVE_SHARE = 0.55  # --data live: the share of live-like windows the bundled model trained on (the rest: clean clips)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A caption run (`streamer train`): RunConfig's fields, then its data and model options."""

    data: str = "synthetic"  # "synthetic" (clean world clips), "live" (live-like windows + questions) or a manifest .jsonl
    # model="new" only, its size: input resolution, ViT patch size, width, layers (vision and text each),
    # frames per window. The bundled model is 64 / 16 / 128 / 3 / 6: 4 x 4 patches see where things are
    # coarsely, and live windows show it (streamer/models/world-git/README.md); a GPU can train more.
    image_size: int = 64
    patch_size: int = 16
    hidden: int = 128
    layers: int = 3
    frames: int = 6
    # How the bundled model learned left from right (streamer/models/world-git/README.md):
    world: str = "full"  # synthetic data: "full", or "simple" (one kind of object: only the event varies)
    reversed_twins: bool = False  # synthetic data: each clip is followed by itself backwards, opposite event
    fixed_positions: bool = False  # ViT position embeddings frozen (model="new": set to random unit vectors x 8)
    vision_lr_scale: float = 1.0  # the vision tower's learning rate, relative to `lr` (fine-tuning: below 1)
    # data="live": how often each question kind is asked, relative (kinds not named: 1; the bundled model: all 1)
    question_weights: tuple[tuple[str, float], ...] = ()
    # data="live": the loss weight of what a question example says after its caption (checks, marker, answer),
    # relative to the other tokens: a yes/no answer is 1 token in 20, and at weight 1 it stayed at chance
    answer_weight: float = 1.0
    # the loss weight of a caption's last word (what happens: "left", "up", "appears", "still"), relative to the
    # other tokens: live, the event is what is still wrong (a direction reversed) while the rest is learned
    event_weight: float = 1.0
    live_share: float = LIVE_SHARE  # data="live": the share of live-like windows (the rest: clean clips)
    # data="live": the shares of clean clips whose objects enter or leave at an edge, and whose paths lie anywhere
    # in the frame at slower speeds (`live_world_examples`); 0 for the bundled model's stages 1-4
    edge_share: float = 0.0
    placed_share: float = 0.0
    wrap_share: float = 0.0  # clean clips that see an object wrap round the frame (`random_wrap_scene`); stage 6
    cut_share: float = 0.0  # clean clips of still objects cut by an edge of the frame (`random_cut_scene`)
    # an existing model (not "new"): train it at this input size, its position table regrown (`grow_input`)
    grow_image_size: int | None = None
    # an existing model: widen both transformers to this width, a whole multiple of theirs (`grow_width`)
    grow_hidden: int | None = None
    # "auto": bf16 autocast on a GPU, fp32 on a CPU; "bf16" on a CPU too, where it has bf16 matrix units (AMX:
    # 1.18x the bundled model's step, 1.55x at width 256, benchmarks/bench_train_step.py); "fp32" everywhere
    precision: str = "auto"
    # processes that render examples (0: the training process itself). The world's examples are rendered and
    # H.264-encoded on the CPU: on a GPU the model's step is the short part, and one process cannot keep up.
    data_workers: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.data_workers <= MAX_DATA_WORKERS:
            raise StreamerError(f"--data-workers {self.data_workers}: 0-{MAX_DATA_WORKERS}")
        if self.grow_image_size is not None:
            if self.model == "new":
                raise StreamerError("--grow-image-size grows an existing model (--model DIR); a new one takes --image-size")
            if not 0 < self.grow_image_size <= 1024:
                raise StreamerError(f"--grow-image-size {self.grow_image_size}: 1-1024 pixels")
        if self.grow_hidden is not None:
            if self.model == "new":
                raise StreamerError("--grow-hidden grows an existing model (--model DIR); a new one takes --hidden")
            if not 0 < self.grow_hidden <= 4096:
                raise StreamerError(f"--grow-hidden {self.grow_hidden}: 1-4096")
        shares = {"live-share": self.live_share, "edge-share": self.edge_share, "placed-share": self.placed_share,
                  "wrap-share": self.wrap_share, "cut-share": self.cut_share}
        if self.data != "live" and (self.live_share != LIVE_SHARE or any(list(shares.values())[1:])):
            raise StreamerError(f"{', '.join('--' + k for k in shares)} mix --data live; --data {self.data} "
                                "would ignore them")
        if min(shares.values()) < 0 or sum(shares.values()) > 1 + 1e-9:
            raise StreamerError(" + ".join(f"--{k} {v:g}" for k, v in shares.items()) + ": shares of the data, 0-1 in all")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise StreamerError(f"--precision {self.precision!r}: auto, bf16 or fp32")
        if self.image_size % self.patch_size or self.hidden % 4 or min(self.layers, self.frames, self.patch_size) < 1:
            raise StreamerError(f"a new model needs --image-size a multiple of --patch-size ({self.image_size} / "
                                f"{self.patch_size}), --hidden a multiple of 4 ({self.hidden}: 4 attention heads), "
                                f"--layers and --frames at least 1 ({self.layers}, {self.frames})")
        # bounds a typo cannot get past into an allocation that takes the machine's memory (git-base: 224/16/768/12/6)
        limits = {"image-size": (self.image_size, 1024), "hidden": (self.hidden, 4096), "layers": (self.layers, 48),
                  "frames": (self.frames, 64)}
        over = [f"--{name} {value} (at most {most})" for name, (value, most) in limits.items() if value > most]
        if over:
            raise StreamerError("a new model's size is out of range: " + ", ".join(over))


Example = tuple[list[np.ndarray], str]  # frames, caption
# frames, text, question (the prefix the text follows), how many of the text's last words are the answer
# (what follows the caption: a yes/no question's checks, the marker, the answer; they weigh `answer_weight`)
QAExample = tuple[list[np.ndarray], str, str, int]


SIMPLE_SUBJECT = ("square", "white", "big")


def synthetic_examples(
    seed: int, frames: int = 6, size: int = 64, *, world: str = "full", reversed_twins: bool = False
) -> Iterator[Example]:
    """World clips and their captions. `reversed_twins`: every clip is followed
    by itself played backwards with the opposite event's caption; the pair
    differs only in frame order, so its gradient is all about order."""
    from streamer.training.world import clip, random_scene

    if world not in ("full", "simple"):
        raise StreamerError(f"world: expected full or simple, got {world!r}")
    subject = SIMPLE_SUBJECT if world == "simple" else None
    rng = np.random.default_rng(seed)
    while True:
        start = float(rng.uniform(0.0, 4.0))  # late windows see objects wrap, like live video
        scene = random_scene(rng, start=start, subject=subject)
        frames_ = clip(scene, frames=frames, start=start, size=size)
        yield frames_, scene.caption
        if reversed_twins:
            yield frames_[::-1], scene.reversed_caption


@dataclass(frozen=True)
class LiveLook:
    """How a camera and the daemon deliver one synthetic scene."""

    width: int
    height: int
    fps: int
    crf: int  # x264 constant rate factor: 18 (clean) .. 36 (blocky at these sizes)
    content: tuple[int, int]  # (w, h) of the picture inside the frame; smaller: letterbox / pillarbox bars

    def view(self) -> dict:
        """What of the scene the model sees after the engine's centre crop, for `Scene.truth_for_window`."""
        from streamer.training.world import centre_crop_view

        return centre_crop_view(self.width, self.height, self.content)


_FRAME_SIZES = ((64, 64), (96, 96), (128, 128), (128, 96), (160, 120), (160, 90), (192, 108), (96, 128), (112, 84))


def random_look(rng: np.random.Generator) -> LiveLook:
    width, height = _FRAME_SIZES[rng.integers(len(_FRAME_SIZES))]
    content = (width, height)
    if rng.random() < 0.15:  # a picture of another shape inside the frame, with black bars
        if width > height:  # pillarbox: a 1:1 .. 4:3 picture in a wider frame
            content = (min(width, int(height * rng.uniform(1.0, 1.34))) // 2 * 2, height)
        else:  # letterbox: a wide picture in a square or portrait frame
            content = (width, int(width * rng.uniform(0.56, 0.85)) // 2 * 2)
    fps = int(rng.choice([10, 12, 15, 24, 25, 30]))
    return LiveLook(width, height, fps, int(rng.integers(18, 37)), content)


def render_live(scene, look: LiveLook, seconds: float, short_side: int) -> list[tuple[float, Any]]:
    """(pts, decoded frame) of a scene rendered at the look's size and rate,
    encoded with libx264 and decoded back, as a camera stream arrives."""
    from fractions import Fraction

    import av

    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = look.width, look.height, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, look.fps), Fraction(look.fps)
    enc.thread_count = 1
    enc.options = {"preset": "veryfast", "tune": "zerolatency", "g": str(2 * look.fps), "crf": str(look.crf)}
    dec = av.CodecContext.create("h264", "r")
    dec.thread_count = 1
    decoded = []
    cw, ch = look.content
    top, left = (look.height - ch) // 2, (look.width - cw) // 2
    for i in range(int(seconds * look.fps)):
        img = np.zeros((look.height, look.width, 3), np.uint8)
        img[top : top + ch, left : left + cw] = scene.frame(i / look.fps, ch, cw)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        for packet in enc.encode(frame):
            decoded.extend(dec.decode(packet))
    for packet in enc.encode(None):
        decoded.extend(dec.decode(packet))
    decoded.extend(dec.decode(None))
    return [(i / look.fps, f) for i, f in enumerate(decoded)]


def live_windows(seed: int, frames: int = 6, short_side: int = 64, window: float = 3.0, per_scene: int = 8):
    """(frames, WindowTruth) of windows cut at random phases from live-rendered
    scenes (`random_live_scene`, `random_look`): H.264 at camera quality, then
    the daemon's own decode-time resize (`to_rgb`); the engine's centre crop is
    left to the training loop's preprocessing, as in the daemon. Windows with
    nothing in view are kept at 1 in 4 (they would be a third otherwise)."""
    from streamer.media.decode import to_rgb
    from streamer.training.world import NOTHING, random_live_scene, window_times

    rng = np.random.default_rng(seed)
    seconds = 8.0
    while True:
        scene = random_live_scene(rng, seconds)
        look = random_look(rng)
        decoded = render_live(scene, look, seconds, short_side)
        pts = np.array([t for t, _ in decoded])
        rgb: dict[int, np.ndarray] = {}  # converted once, only the frames a window picks (as the daemon does)
        view = look.view()
        starts = rng.uniform(0.0, seconds - window, per_scene)
        if scene.event in ("appears", "disappears"):  # half of them see the change happen (else it is rare)
            near = rng.uniform(scene.event_time - window + 0.3, scene.event_time - 0.3, per_scene // 2)
            starts[: per_scene // 2] = np.clip(near, 0.0, seconds - window)
        for start in starts:
            truth = scene.truth_for_window(start, start + window, frames, **view)
            if truth.event == NOTHING and rng.random() > 0.25:
                continue
            picked = [int(np.abs(pts - t).argmin()) for t in window_times(start, start + window, frames)]
            for i in picked:
                if i not in rgb:
                    rgb[i] = to_rgb(decoded[i][1], short_side)
            yield [rgb[i] for i in picked], truth


# What the bundled model trains on (`--data live`), per example (the live-window share: TrainConfig.live_share):
QUESTION_SHARE = 0.5  # a question about the window (else its caption); its text is caption + "so" + answer


def live_world_examples(seed: int, frames: int = 6, size: int = 64, short_side: int = 64,
                        question_weights: dict[str, float] | None = None, live_share: float = LIVE_SHARE,
                        edge_share: float = 0.0, placed_share: float = 0.0, wrap_share: float = 0.0,
                        cut_share: float = 0.0):
    """Captions and questions on live-like windows and clean world clips, each
    followed by its reversed twin (frames backwards, the opposite event), so
    that the direction stays learned from frame order. `question_weights`: how
    often each question kind is asked (TrainConfig.question_weights): the kinds
    learned last get asked more (a shape answer is copied from the caption;
    yes/no compares two words of the question with the caption's).
    `edge_share` and `placed_share` of the clean clips are drawn where the
    bundled model guesses (`benchmarks/probe_motion.py`): objects entering or
    leaving at an edge (`random_edge_scene`), and paths anywhere in the frame
    at slower speeds (`random_placed_scene`); `wrap_share`, objects that leave
    one edge and come back at the other mid-window (`random_wrap_scene`);
    `cut_share`, still objects cut by an edge (`random_cut_scene`); the rest as
    `streamer eval` draws."""
    from streamer.training.world import (
        MOTIONS,
        NOTHING,
        WindowTruth,
        clip,
        labelled_questions,
        random_cut_scene,
        random_edge_scene,
        random_placed_scene,
        random_scene,
        random_wrap_scene,
        reasoned_answer,
    )

    # the clean clips aimed at what the bundled model got wrong: (share, generator, keep motion windows only)
    aimed = ((edge_share, random_edge_scene, True), (placed_share, random_placed_scene, False),
             (wrap_share, random_wrap_scene, True), (cut_share, random_cut_scene, False))
    aimed_upto = [live_share + upto for upto in itertools.accumulate(share for share, _, _ in aimed)]
    rng = np.random.default_rng(seed)
    live = live_windows(seed + 1, frames, short_side)
    while True:
        draw = rng.random()
        if draw < live_share:
            frames_, truth = next(live)
        elif draw < aimed_upto[-1]:
            _, generator, motion_only = aimed[next(n for n, upto in enumerate(aimed_upto) if draw < upto)]
            scene = generator(rng)
            truth = scene.truth_for_window(0.0, 3.0, frames)
            # an edge or wrap window whose object stays under a quarter in view says nothing of the edge; windows
            # with nothing in view are kept at 1 in 4, as in `live_windows`
            if (motion_only and truth.event not in MOTIONS) or (truth.event == NOTHING and rng.random() > 0.25):
                continue
            frames_ = clip(scene, frames=frames, size=size)
        else:
            start = float(rng.uniform(0.0, 4.0))
            scene = random_scene(rng, start=start)
            frames_ = clip(scene, frames=frames, start=start, size=size)
            first = scene.objects[0]
            truth = WindowTruth(len(scene.objects), first.size, first.colour, first.shape, scene.event)
        for imgs, t in ((frames_, truth), (frames_[::-1], truth.reversed())):
            if rng.random() < QUESTION_SHARE:
                questions = labelled_questions(t, rng)
                weights = np.array([(question_weights or {}).get(kind, 1.0) for kind, _, _ in questions])
                _, question, answer = questions[int(rng.choice(len(questions), p=weights / weights.sum()))]
                text = reasoned_answer(t.caption, answer, question)
                yield imgs, text, question, len(text.split()) - len(t.caption.split())
            else:
                yield imgs, t.caption


def read_manifest(path: str) -> list[tuple[str, float, float, str]]:
    """Rows of (video path, start s, end s, caption); paths relative to the manifest."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StreamerError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            start, end = float(row["start"]), float(row["end"])
            if not end > start >= 0:
                raise ValueError("need 0 <= start < end")
            rows.append((str(Path(path).parent / row["path"]), start, end, str(row["caption"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamerError(f"{path}:{n}: expected {{path, start, end, caption}} ({exc})") from None
    if not rows:
        raise StreamerError(f"{path}: no examples")
    return rows


def window_from_video(video: str, start: float, end: float, frames: int, short_side: int | None, stream_id: str):
    """One window of `frames` frames spread over [start, end] of a video file."""
    from streamer.media.decode import iter_frames, open_input
    from streamer.pipeline.sampler import SamplerConfig, WindowSampler

    span = max(end - start, 1e-3)
    sampler = WindowSampler(SamplerConfig(window=span, frames=frames, hop=span), stream_id)
    container = open_input(video)
    windows = []
    try:
        for frame in iter_frames(container, stream_id, short_side=short_side):
            if frame.pts < start:
                continue
            if frame.pts > end:
                break
            windows.extend(sampler.feed(frame))
            if windows:
                break
        windows.extend(sampler.flush())
    finally:
        container.close()
    if not windows:
        raise StreamerError(f"{video}: no frames between {start} s and {end} s")
    return windows[0]


def manifest_examples(path: str, frames: int, short_side: int | None, seed: int) -> Iterator[Example]:
    rows = read_manifest(path)
    cache: dict[int, list[np.ndarray]] = {}  # decoded once; a manifest is a list of short clips
    order = random.Random(seed)
    while True:
        i = order.randrange(len(rows))
        if i not in cache:
            video, start, end, _ = rows[i]
            cache[i] = [f.image for f in window_from_video(video, start, end, frames, short_side, "train").frames]
        yield cache[i], rows[i][3]


def _build_or_load(config: TrainConfig, device: torch.device):
    if config.model == "new":
        from streamer.engine.fresh import new_git_model, word_tokenizer
        from streamer.training.world import world_vocabulary

        tokenizer = word_tokenizer(world_vocabulary())
        model, processor = new_git_model(
            tokenizer, seed=config.seed, image_size=config.image_size, patch_size=config.patch_size,
            hidden=config.hidden, vision_layers=config.layers, text_layers=config.layers, frames=config.frames,
            fixed_positions=config.fixed_positions,
        )
        model = model.to(device)
    else:
        loaded = load_model(config.model, str(device), "float32")
        model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
        if config.data in ("synthetic", "live"):
            from streamer.training.world import world_vocabulary

            missing = set(world_vocabulary()) - set(tokenizer.get_vocab())
            if missing:
                log.warning("widening the vocabulary", extra={"new_words": len(missing), "model": config.model})
                model, tokenizer = widen_vocabulary(model, tokenizer, world_vocabulary())
    if config.grow_image_size not in (None, model.config.vision_config.image_size):  # (a resumed run: grown already)
        model, processor = grow_input(model, processor, config.grow_image_size, seed=config.seed)
        model = model.to(device)
    if config.grow_hidden not in (None, model.config.hidden_size):  # (a resumed run: grown already)
        model = grow_width(model, config.grow_hidden, seed=config.seed).to(device)
    if config.data == "live":
        from streamer.training.world import ANSWER_MARKER

        model.config.answer_marker = ANSWER_MARKER  # saved in config.json: the engine reads answers after it
    if config.fixed_positions:
        model.git.image_encoder.vision_model.embeddings.position_embedding.weight.requires_grad_(False)
    return model, tokenizer, processor


GROWN_POSITION_NOISE = 3.0  # norm of the random part each grown patch position gets (the bundled model's are 8)


def grow_input(model, processor, size: int, *, seed: int = 0):
    """The same GIT at a larger (or smaller) square input: `size` x `size` pixels, same patch size, so
    more patches see the frame (the bundled model's 4 x 4 locate objects coarsely: world-git/README.md).

    Every weight is kept but the vision tower's position table, which is regrown on the new grid: each
    new patch starts at the position of the old patch its centre lies in, plus a random vector of norm
    GROWN_POSITION_NOISE so that neighbours under one old patch tell apart from the first step; training
    shapes the rest. Returns (model, processor) with the new input size."""
    from transformers import GitForCausalLM

    vision = model.config.vision_config
    patch = int(vision.patch_size)
    if size % patch:
        raise StreamerError(f"--grow-image-size {size}: a multiple of the model's patch size ({patch})")
    old_grid, new_grid = int(vision.image_size) // patch, size // patch
    old = model.git.image_encoder.vision_model.embeddings.position_embedding.weight.detach().cpu()
    config = copy.deepcopy(model.config)
    config.vision_config.image_size = size
    generator = torch.Generator().manual_seed(seed)
    grown = GitForCausalLM(config)
    kept = {k: v for k, v in model.state_dict().items() if "vision_model.embeddings.position" not in k}
    missing, unexpected = grown.load_state_dict(kept, strict=False)
    if unexpected or any("vision_model.embeddings.position" not in k for k in missing):
        raise StreamerError(f"cannot grow this model's input: unexpected {unexpected}, missing {missing}")
    rows = torch.arange(new_grid).repeat_interleave(new_grid)  # patch index -> (row, column), row-major as ViT
    cols = torch.arange(new_grid).repeat(new_grid)
    parent = ((2 * rows + 1) * old_grid // (2 * new_grid)) * old_grid + (2 * cols + 1) * old_grid // (2 * new_grid)
    noise = torch.randn(new_grid * new_grid, old.shape[1], generator=generator)
    noise = noise / noise.norm(dim=1, keepdim=True) * GROWN_POSITION_NOISE
    with torch.no_grad():
        table = grown.git.image_encoder.vision_model.embeddings.position_embedding.weight
        table[0] = old[0]  # the class token's
        table[1:] = old[1 + parent] + noise
    settings = processor.to_dict()
    settings.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    settings.pop("image_processor_type", None)
    settings.pop("processor_class", None)
    log.warning("grew the model's input", extra={"from_px": int(vision.image_size), "to_px": size,
                                                 "patches": f"{old_grid}x{old_grid} -> {new_grid}x{new_grid}"})
    return grown, type(processor)(**settings)


GROWN_WIDTH_NOISE = 1e-3  # relative size of the noise that tells a widened unit from its copy


def grow_width(model, hidden: int, *, seed: int = 0, noise: float = GROWN_WIDTH_NOISE):
    """The same GIT, both transformers `hidden` wide (a whole multiple k of their width), saying what it said.

    Net2Net's widening (Chen et al., 2016), for GIT: every unit of the residual stream, the attention heads
    and the feed-forward layers is copied k times, and every weight that reads a copied unit is divided by k,
    so each layer computes the same sum. A LayerNorm over k copies of a vector has the vector's mean and
    variance, and a head's width stays, so the widened model's outputs are the model's (up to float error,
    tests/test_world_train.py). The copies would get the same gradients for ever (the vision tower has no dropout to
    tell them apart): every widened weight gets noise of `noise` times its own spread."""
    from transformers import GitForCausalLM

    old_hidden = int(model.config.hidden_size)
    vision = model.config.vision_config
    if int(vision.hidden_size) != old_hidden or hidden % old_hidden or hidden < old_hidden:
        raise StreamerError(f"--grow-hidden {hidden}: a whole multiple of the model's width ({old_hidden}, "
                            f"vision {int(vision.hidden_size)}: both must be the same)")
    k = hidden // old_hidden
    config = copy.deepcopy(model.config)
    for part in (config, config.vision_config):
        part.hidden_size *= k
        part.intermediate_size *= k
        part.num_attention_heads *= k  # the same head width: the heads are copied with their units
    grown = GitForCausalLM(config).to(next(model.parameters()).device)
    readers = {f"{name}.weight" for name, module in grown.named_modules() if isinstance(module, torch.nn.Linear)}
    old_state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    new_state = {}
    for name, target in grown.state_dict().items():
        value = old_state[name]
        if value.ndim != target.ndim or any(t % v for t, v in zip(target.shape, value.shape)):
            raise StreamerError(f"cannot widen {name}: {tuple(value.shape)} -> {tuple(target.shape)}")
        repeats = [t // v for t, v in zip(target.shape, value.shape)]
        value = value.repeat(*repeats)
        if name in readers and repeats[1] > 1:
            value = value / repeats[1]  # a Linear's input is k copies of each unit: read each 1/k
        if noise and value.is_floating_point() and value.numel() > 1 and any(r > 1 for r in repeats):
            spread = float(value.std()) or 1.0
            value = value + torch.randn(value.shape, generator=generator).to(value) * noise * spread
        new_state[name] = value
    grown.load_state_dict(new_state)
    grown.generation_config = copy.deepcopy(model.generation_config)
    log.warning("grew the model's width", extra={"from_hidden": old_hidden, "to_hidden": hidden,
                                                 "parameters": sum(p.numel() for p in grown.parameters())})
    return grown


def widen_vocabulary(model, tokenizer, words: list[str]):
    """A word tokenizer with `words` added, and the model's input embeddings and
    output layer widened to it: rows of known words copied (they keep what was
    learned), new rows drawn small around the mean of the known ones."""
    from streamer.engine.fresh import word_tokenizer

    new_tok = word_tokenizer(set(tokenizer.get_vocab()) | set(words))
    old_vocab, new_vocab = tokenizer.get_vocab(), new_tok.get_vocab()
    old_in = model.git.embeddings.word_embeddings.weight.detach()
    old_out_w, old_out_b = model.output.weight.detach(), model.output.bias.detach()
    n = len(new_tok)
    generator = torch.Generator().manual_seed(0)
    new_in = old_in.mean(0) + 0.02 * torch.randn(n, old_in.shape[1], generator=generator)
    new_out_w = old_out_w.mean(0) + 0.02 * torch.randn(n, old_out_w.shape[1], generator=generator)
    new_out_b = torch.full((n,), float(old_out_b.min()))  # new words start unlikely
    for word, i in new_vocab.items():
        if word in old_vocab:
            j = old_vocab[word]
            new_in[i], new_out_w[i], new_out_b[i] = old_in[j], old_out_w[j], old_out_b[j]
    model.git.embeddings.word_embeddings = torch.nn.Embedding(n, old_in.shape[1], padding_idx=new_tok.pad_token_id)
    model.git.embeddings.word_embeddings.weight.data.copy_(new_in)
    model.output = torch.nn.Linear(old_out_w.shape[1], n).to(old_out_w.device)
    model.output.weight.data.copy_(new_out_w)
    model.output.bias.data.copy_(new_out_b)
    model.config.vocab_size = n
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, key, new_vocab[{"pad_token_id": "[PAD]", "bos_token_id": "[CLS]", "eos_token_id": "[SEP]"}[key]])
        if model.generation_config is not None:
            setattr(model.generation_config, key, getattr(model.config, key))
    return model.to(old_in.device), new_tok


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and (p / "training_state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return found[-1] if found else None


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    out = Path(config.out)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    start_step = 0
    resume_from = _latest_checkpoint(out) if config.resume else None
    if resume_from is not None:
        model, tokenizer, processor = _build_or_load(replace(config, model=str(resume_from)), device)
        state = torch.load(resume_from / "training_state.pt", weights_only=False)
        start_step = state["step"]
    else:
        model, tokenizer, processor = _build_or_load(config, device)
        state = None
    out.mkdir(parents=True, exist_ok=True)  # after the model: one that cannot load or grow leaves no directory
    model.train()
    spec = PreprocessSpec.from_processor(processor)
    frames = int(model.config.num_image_with_embedding or 1)
    size = spec.crop_hw[0] if spec.crop_hw else 64
    make: Callable[[int], Iterator[Example | QAExample]]  # seed -> examples
    if config.data == "synthetic":
        make = partial(synthetic_examples, frames=frames, size=size, world=config.world,
                       reversed_twins=config.reversed_twins)
    elif config.data == "live":
        make = partial(live_world_examples, frames=frames, size=size, short_side=spec.short_side or size,
                       question_weights=dict(config.question_weights), live_share=config.live_share,
                       edge_share=config.edge_share, placed_share=config.placed_share,
                       wrap_share=config.wrap_share, cut_share=config.cut_share)
    else:
        make = partial(manifest_examples, config.data, frames, spec.short_side)
    batches = example_batches(make, config.seed + start_step, config.batch_size, config.data_workers)

    # (vision tower?, weight decay?) -> parameters. A lower rate for the tower (`vision_lr_scale`) lets a
    # fine-tune teach the decoder new words without wiping what the tower learned (shape went from 95% to
    # chance in 250 steps at 5e-4 for the whole model; see streamer/models/world-git/README.md).
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        vision = name.startswith("git.image_encoder.")
        groups.setdefault((vision, not (p.ndim < 2 or "embedding" in name)), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay if decays else 0.0,
          "lr": config.lr * (config.vision_lr_scale if vision else 1.0)}
         for (vision, decays), params in sorted(groups.items())],
        lr=config.lr,
    )

    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    autocast = _autocast(config.precision, device)

    shown = Progress(config.steps, start_step, show=progress, desc="train", log_every=config.log_every, log=log)
    for step in range(start_step, config.steps):
        batch = next(batches)
        pixels = preprocess_frames([img for ex in batch for img in ex[0]], spec, device, torch.float32)
        pixels = pixels.view(len(batch), frames, *pixels.shape[1:])
        if frames == 1:
            pixels = pixels[:, 0]
        enc, labels, weights = _text_batch(tokenizer, batch, device, config.answer_weight, config.event_weight)
        with autocast:
            if weights is None:
                loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, labels=labels).loss
            else:
                logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels).logits
                loss = weighted_text_loss(logits, labels, weights)
        done = step + 1
        shown.update(done, optimizer_step(loss, model, optimizer, scheduler), float(scheduler.get_last_lr()[0]))
        if done % config.save_every == 0 and done < config.steps:
            save_checkpoint(out, done, partial(_save, model=model, tokenizer=tokenizer, processor=processor,
                                               config=config, step=done, optimizer=optimizer, scheduler=scheduler))
    shown.close()
    del batches  # stops the example workers now, not whenever the collector gets to them
    model.eval()
    _save(out, model, tokenizer, processor, config, config.steps, None, None)
    for old in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _autocast(precision: str, device: torch.device):
    """bf16 autocast where `precision` asks for it (weights and optimizer stay fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type == "cpu" and not torch.backends.mkldnn.is_available():
        raise StreamerError("--precision bf16 on the CPU needs torch's oneDNN")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _text_batch(tokenizer, batch, device: torch.device, answer_weight: float = 1.0, event_weight: float = 1.0):
    """Token ids, labels and (with an `answer_weight` or `event_weight` other than 1) per-token loss
    weights; a question's [CLS] and words are context, not targets; an answer's tokens weigh
    `answer_weight`, the caption's last word (its event) `event_weight`."""
    texts = [ex[1] if len(ex) == 2 else f"{ex[2]} {ex[1]}" for ex in batch]
    enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    weights = None if answer_weight == event_weight == 1.0 else torch.ones(labels.shape, device=device)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for row, ex in enumerate(batch):
        prefix = 1  # [CLS]
        if len(ex) == 4:
            prefix += count(ex[2])  # + the question
            labels[row, :prefix] = -100
            if weights is not None and ex[3] > 0:
                answer = " ".join(ex[1].split()[-ex[3]:])
                end = int(enc.attention_mask[row].sum()) - 1  # [SEP]
                weights[row, end - count(answer) : end] = answer_weight
        words = ex[1].split()
        caption = words[: len(words) - ex[3]] if len(ex) == 4 else words
        if weights is not None and event_weight != 1.0 and caption:  # a manifest's caption may be empty
            before = prefix + count(" ".join(caption[:-1]))
            weights[row, before : before + count(caption[-1])] = event_weight
    return enc, labels, weights


def weighted_text_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """GIT's captioning loss (each text position predicts the next token; image positions and -100
    labels ignored) with a weight per target token, normalised by the weights."""
    text = logits[:, -labels.shape[1] : -1].float()  # logits = image tokens, then text tokens
    target, weight = labels[:, 1:], weights[:, 1:] * (labels[:, 1:] != -100)
    losses = torch.nn.functional.cross_entropy(text.reshape(-1, text.shape[-1]), target.clamp(min=0).reshape(-1),
                                               reduction="none").view_as(weight)
    return (losses * weight).sum() / weight.sum().clamp(min=1e-9)


def _save(path: Path, model, tokenizer, processor, config: TrainConfig, step: int, optimizer, scheduler) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "training_args.json").write_text(
        json.dumps({**asdict(config), "step": step, "command": " ".join(sys.argv)}, indent=2) + "\n"
    )
    save_training_state(path, step, optimizer, scheduler)
