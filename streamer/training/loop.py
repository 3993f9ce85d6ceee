"""What the caption and speech trainers share: the schedule, the optimizer step, progress, checkpoints."""

from __future__ import annotations

import logging
import math
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAX_DATA_WORKERS", "Progress", "RunConfig", "cosine_schedule", "example_batches", "optimizer_step",
           "save_checkpoint", "save_training_state"]

MAX_DATA_WORKERS = 64
WORKER_SEED_STRIDE = 1_000_003  # worker k draws from seed + stride * (k + 1): streams that never meet
DATA_WORKER_TIMEOUT_S = 300.0  # a batch later than this is a stuck worker: the run fails ("DataLoader timed out")


@dataclass(frozen=True)
class RunConfig:
    """What every training run is told: where it writes, what it starts from, the optimizer's schedule,
    checkpoints and logging. The caption (train.py) and speech (speech.py) trainers add their data."""

    out: str
    model: str = "new"  # "new": a fresh small model; else a checkpoint to continue from
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    save_every: int = 500
    resume: bool = False  # continue from the newest checkpoint in `out`
    log_every: int = 50
    threads: int | None = None  # torch CPU threads (1 avoids oversubscription on a busy machine)


class _Batches(torch.utils.data.IterableDataset):
    """Endless batches of `make(seed)`'s examples; in a DataLoader worker, each worker from its own seed."""

    def __init__(self, make: Callable[[int], Iterator[Any]], seed: int, batch_size: int) -> None:
        self.make, self.seed, self.batch_size = make, seed, batch_size

    def __iter__(self) -> Iterator[list[Any]]:
        info = torch.utils.data.get_worker_info()
        examples = self.make(self.seed if info is None else self.seed + WORKER_SEED_STRIDE * (info.id + 1))
        while True:
            yield [next(examples) for _ in range(self.batch_size)]


def _as_is(batch: Any) -> Any:
    return batch  # the default collate would turn frames into tensors; the trainer preprocesses them itself


def example_batches(make: Callable[[int], Iterator[Any]], seed: int, batch_size: int, workers: int = 0
                    ) -> Iterator[list[Any]]:
    """Batches of examples, rendered here (`workers` 0) or by `workers` processes, each drawing from its own seed.
    Same seed, same workers: the same batches in the same order (the DataLoader takes its workers in turn)."""
    dataset = _Batches(make, seed, batch_size)
    if workers <= 0:
        return iter(dataset)
    # Workers fork from a forkserver (one clean, single-threaded process that has imported the renderer once),
    # not from the trainer: a plain fork copies every lock another of the trainer's threads holds at that instant
    # (a test runner's, a notebook's, a library's), and a worker that needs one waits forever. CI saw exactly that.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", getattr(make, "func", make).__module__])  # no-op once it runs
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=4, persistent_workers=True, multiprocessing_context=context,
                                         timeout=DATA_WORKER_TIMEOUT_S)
    return iter(loader)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine down to 5% of the peak learning rate."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """Backward, clip the gradient norm at 1, step; the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


class Progress:
    """A smoothed loss, shown on a progress bar on a terminal, else logged every `log_every` steps."""

    def __init__(self, steps: int, start_step: int, *, show: bool, desc: str, log_every: int,
                 log: logging.Logger) -> None:
        self.steps, self.log_every, self.log = steps, log_every, log
        self.ema_loss: float | None = None
        self.started = time.monotonic()
        self._bar: Any = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=steps, initial=start_step, unit="step", desc=desc)

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def update(self, done: int, loss: float, lr: float) -> None:
        self.ema_loss = loss if self.ema_loss is None else 0.95 * self.ema_loss + 0.05 * loss
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self.ema_loss:.3f}", lr=f"{lr:.2e}")
        elif done % self.log_every == 0 or done == self.steps:
            self.log.warning("training", extra={"step": done, "steps": self.steps, "loss": round(self.ema_loss, 4),
                                                "elapsed_s": self.elapsed})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def save_checkpoint(out: Path, done: int, save: Callable[[Path], None]) -> Path:
    """`save(dir)` into `out/checkpoint-{done}`, written aside and then renamed: a run killed mid-save
    leaves no half checkpoint."""
    tmp = out / f".checkpoint-{done}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    final = out / f"checkpoint-{done}"
    tmp.rename(final)
    return final


def save_training_state(path: Path, step: int, optimizer: Any, scheduler: Any) -> None:
    """What a resumed run needs besides the weights (nothing for a finished model: optimizer None)."""
    if optimizer is not None:
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   path / "training_state.pt")
