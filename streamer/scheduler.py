"""Gathers ready windows from all streams into engine batches.

`BatchPlanner` is the pure part (what to run next, what to drop);
`Scheduler` is the loop that waits, runs the engine in its one worker thread
and hands captions on. Overload policy: each stream keeps at most
`max_pending_per_stream` windows waiting; a newer window pushes out the
oldest (newest wins), so latency stays bounded instead of growing, and every
drop is counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .types import Caption, Window

__all__ = ["SchedulerConfig", "BatchPlanner", "Scheduler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # windows per engine call
    max_wait: float = 0.05  # seconds to wait for a fuller batch once one window is ready
    max_pending_per_stream: int = 2  # newest wins beyond this


class BatchPlanner:
    """Pure batching state: submit windows, take fair batches, count drops."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._pending: OrderedDict[str, deque[Window]] = OrderedDict()
        self.dropped: dict[str, int] = {}

    def submit(self, window: Window) -> Window | None:
        """Queue a window; return the window it pushed out, if any."""
        queue = self._pending.setdefault(window.stream_id, deque())
        queue.append(window)
        if len(queue) > self.config.max_pending_per_stream:
            old = queue.popleft()
            self.dropped[old.stream_id] = self.dropped.get(old.stream_id, 0) + 1
            return old
        return None

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def next_batch(self) -> list[Window]:
        """Up to max_batch windows, round-robin over streams (oldest window of
        each first), so one busy stream cannot starve the others."""
        batch: list[Window] = []
        while len(batch) < self.config.max_batch and self._pending:
            for stream_id in list(self._pending):
                queue = self._pending[stream_id]
                batch.append(queue.popleft())
                if not queue:
                    del self._pending[stream_id]
                else:  # rotate: this stream goes to the back
                    self._pending.move_to_end(stream_id)
                if len(batch) == self.config.max_batch:
                    break
        return batch

    def forget(self, stream_id: str) -> int:
        return len(self._pending.pop(stream_id, ()))

    def clear(self) -> int:
        count = self.pending
        self._pending.clear()
        return count


CaptionFn = Callable[[Sequence[Window]], list[Caption]]


class Scheduler:
    def __init__(
        self,
        caption_fn: CaptionFn,
        on_captions: Callable[[list[Caption]], None],
        config: SchedulerConfig | None = None,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        on_drop: Callable[[Window], None] | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.planner = BatchPlanner(self.config)
        self._caption_fn = caption_fn
        self._on_captions = on_captions
        self._on_batch = on_batch
        self._on_drop = on_drop
        # One worker: the engine is not thread-safe, and HTTP one-off requests
        # share it through run_exclusive().
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def submit(self, window: Window) -> None:
        if self._closing:
            return
        dropped = self.planner.submit(window)
        if dropped is not None:
            log.debug("window dropped", extra={"stream": dropped.stream_id, "index": dropped.index})
            if self._on_drop:
                self._on_drop(dropped)
        self._wake.set()

    def forget(self, stream_id: str) -> None:
        self.planner.forget(stream_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="scheduler")

    async def run_exclusive(self, fn, *args):
        """Run `fn(*args)` on the engine thread, between batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.planner.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.planner.pending < self.config.max_batch and not self._closing:
                # a fuller batch is cheaper per window; wait a little for one
                deadline = loop.time() + self.config.max_wait
                while self.planner.pending < self.config.max_batch and loop.time() < deadline:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
            batch = self.planner.next_batch()
            started = time.perf_counter()
            try:
                captions = await loop.run_in_executor(self._executor, self._caption_fn, batch)
            except Exception:
                log.exception("engine failed on a batch", extra={"windows": len(batch)})
                continue
            if self._on_batch:
                self._on_batch(len(batch), time.perf_counter() - started)
            self._on_captions(captions)

    async def close(self, drain: bool = True) -> None:
        """Stop: with drain, windows already waiting are captioned first."""
        self._closing = True
        if not drain:
            self.planner.clear()
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)
