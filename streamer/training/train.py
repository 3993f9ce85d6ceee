"""`streamer train`: fine-tune or train a GIT captioner on (clip, caption) pairs.

Data: the synthetic world (`--data synthetic`), or a JSON Lines manifest of
`{"path": ..., "start": s, "end": s, "caption": ...}` rows (frames are spread
over [start, end] the way the live sampler would pick them).

A plain loop (AdamW, warm-up + cosine decay, gradient clipping, bf16
autocast on a GPU); progress and loss on a terminal bar or in log lines;
`--out DIR/checkpoint-N` every `--save-every` steps with the optimizer state,
and `--resume` continues from the newest one. The final model is a
`save_pretrained` directory that `streamer caption/serve --model DIR` loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from streamer.engine.loader import load_model, resolve_device
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.errors import StreamerError

__all__ = ["TrainConfig", "train", "synthetic_examples", "manifest_examples"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    out: str
    model: str = "new"  # "new": a fresh small GIT with the world vocabulary; else a GIT checkpoint
    data: str = "synthetic"  # or a manifest .jsonl
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    save_every: int = 500
    resume: bool = False
    log_every: int = 50
    threads: int | None = None  # torch CPU threads (1 avoids oversubscription on a busy machine)
    image_size: int = 64  # model="new" only: input resolution and ViT patch size
    patch_size: int = 16
    # How the bundled model learned left from right (streamer/models/world-git/README.md):
    world: str = "full"  # synthetic data: "full", or "simple" (one kind of object: only the event varies)
    reversed_twins: bool = False  # synthetic data: each clip is followed by itself backwards, opposite event
    fixed_positions: bool = False  # ViT position embeddings frozen (model="new": set to random unit vectors x 8)


Example = tuple[list[np.ndarray], str]


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
            tokenizer, seed=config.seed, text_layers=3, image_size=config.image_size, patch_size=config.patch_size,
            fixed_positions=config.fixed_positions,
        )
        model = model.to(device)
    else:
        loaded = load_model(config.model, str(device), "float32")
        model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    if config.fixed_positions:
        model.git.image_encoder.vision_model.embeddings.position_embedding.weight.requires_grad_(False)
    return model, tokenizer, processor


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and (p / "training_state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return found[-1] if found else None


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
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
    model.train()
    spec = PreprocessSpec.from_processor(processor)
    frames = int(model.config.num_image_with_embedding or 1)
    size = spec.crop_hw[0] if spec.crop_hw else 64
    if config.data == "synthetic":
        examples = synthetic_examples(
            config.seed + start_step, frames=frames, size=size, world=config.world, reversed_twins=config.reversed_twins
        )
    else:
        examples = manifest_examples(config.data, frames, spec.short_side, config.seed + start_step)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start_step, unit="step", desc="train")
    started = time.monotonic()
    ema_loss = None
    for step in range(start_step, config.steps):
        batch = [next(examples) for _ in range(config.batch_size)]
        pixels = preprocess_frames([img for clip_frames, _ in batch for img in clip_frames], spec, device, torch.float32)
        pixels = pixels.view(len(batch), frames, *pixels.shape[1:])
        if frames == 1:
            pixels = pixels[:, 0]
        enc = tokenizer([text for _, text in batch], padding=True, return_tensors="pt").to(device)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        with autocast:
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elif done % config.log_every == 0 or done == config.steps:
            log.warning(
                "training",
                extra={"step": done, "steps": config.steps, "loss": round(ema_loss, 4),
                       "elapsed_s": round(time.monotonic() - started, 1)},
            )
        if done % config.save_every == 0 and done < config.steps:
            # written aside, then renamed: a run killed mid-save leaves no half checkpoint
            tmp = out / f".checkpoint-{done}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _save(tmp, model, tokenizer, processor, config, done, optimizer, scheduler)
            tmp.rename(out / f"checkpoint-{done}")
    if bar is not None:
        bar.close()
    model.eval()
    _save(out, model, tokenizer, processor, config, config.steps, None, None)
    for old in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _save(path: Path, model, tokenizer, processor, config: TrainConfig, step: int, optimizer, scheduler) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "training_args.json").write_text(
        json.dumps({**asdict(config), "step": step, "command": " ".join(sys.argv)}, indent=2) + "\n"
    )
    if optimizer is not None:
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   path / "training_state.pt")
