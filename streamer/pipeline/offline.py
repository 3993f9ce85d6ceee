"""Offline captioning of a file: decode -> sampler -> engine, in order, with progress (or, with a
question, the model's answer about each window: `answer_file`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from streamer.engine import Engine
from streamer.errors import VideoError
from streamer.media.decode import iter_frames, open_input, probe_media_span
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.types import Answer, Caption, Frame, Window

__all__ = ["CaptionJob", "answer_file", "caption_file"]

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class CaptionJob:
    video: str
    sampler: SamplerConfig
    summary: bool = False  # one caption for the whole video, frames spread over it
    batch_size: int = 8
    max_new_tokens: int | None = None
    hwaccel: str | None = None  # FFmpeg hardware decoding ("cuda": NVDEC), software where unavailable


def plan_sampler(job: CaptionJob, span: tuple[float, float] | None) -> SamplerConfig:
    """The sampler a job really needs: summary mode, and windows longer than the
    video, become one window over the whole video."""
    cfg = job.sampler
    if span is None:
        if job.summary:
            raise VideoError(f"{job.video}: duration unknown, cannot spread frames for --summary")
        return cfg
    duration = max(span[1] - span[0], 1e-3)
    if job.summary or cfg.window > duration:
        if not job.summary:
            log.warning(
                "window longer than the video: captioning the whole video once",
                extra={"window": cfg.window, "duration": round(duration, 3)},
            )
        return SamplerConfig(window=duration, frames=cfg.frames, hop=duration)
    return cfg


def caption_file(
    engine: Engine,
    job: CaptionJob,
    *,
    on_progress: Callable[[float, float | None], None] | None = None,
) -> Iterator[Caption]:
    """Yield captions in media-time order. `on_progress(media_seconds_done, total)`
    is called as frames are decoded."""
    for batch in _batches(engine, job, on_progress):
        yield from engine.caption(batch, job.max_new_tokens)


def answer_file(
    engine: Engine,
    job: CaptionJob,
    question: str,
    *,
    on_progress: Callable[[float, float | None], None] | None = None,
) -> Iterator[Answer]:
    """The answer to `question` about each window (one, over the whole file, with `summary`), in
    media-time order."""
    for batch in _batches(engine, job, on_progress):
        yield from engine.answer([(w, question) for w in batch], job.max_new_tokens)


def _batches(
    engine: Engine, job: CaptionJob, on_progress: Callable[[float, float | None], None] | None
) -> Iterator[list[Window]]:
    """The file's windows in batches of job.batch_size, decoded ahead in a thread."""
    span = probe_media_span(job.video)
    sampler = WindowSampler(plan_sampler(job, span), stream_id=job.video)
    total = (span[1] - span[0]) if span else None
    origin = span[0] if span else 0.0
    frames = _DecodeAhead(job.video, engine.frame_short_side, job.hwaccel)
    pending: list[Window] = []
    try:
        while True:
            item = frames.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            frame: Frame = item
            if on_progress:
                on_progress(frame.pts - origin, total)
            pending.extend(sampler.feed(frame))
            while len(pending) >= job.batch_size:
                yield pending[: job.batch_size]
                del pending[: job.batch_size]
        pending.extend(sampler.flush())
        for start in range(0, len(pending), job.batch_size):
            yield pending[start : start + job.batch_size]
        if on_progress and total is not None:
            on_progress(total, total)
    finally:
        frames.close()


class _DecodeAhead:
    """Decodes in one thread ahead of inference; the bounded queue holds it back."""

    def __init__(self, video: str, short_side: int | None, hwaccel: str | None = None, depth: int = 64) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._video, self._short_side, self._hwaccel = video, short_side, hwaccel
        self._thread = threading.Thread(target=self._run, name=f"decode:{video}", daemon=True)
        self._thread.start()

    def get(self) -> object:
        return self.queue.get()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            container = open_input(self._video, hwaccel=self._hwaccel)
            try:
                for frame in iter_frames(container, self._video, short_side=self._short_side):
                    if not self._put(frame):
                        return
            finally:
                container.close()
            self._put(_END)
        except BaseException as exc:  # handed to the consumer and raised there
            self._put(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
