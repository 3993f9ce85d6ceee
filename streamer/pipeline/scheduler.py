"""Gathers ready windows from all streams into engine batches.

`BatchPlanner` is the pure part (what to run next, what to drop);
`Scheduler` is the loop that waits, runs the engine in its one worker thread
and hands captions on. Overload policy: each stream keeps at most
`max_pending_per_stream` windows waiting; a newer window pushes out the
oldest (newest wins), so latency stays bounded instead of growing, and every
drop is counted.

With `pipeline` (prepare, finish), the loop prepares batch k+1 before it
finishes batch k: on a GPU the engine queues k+1's upload and vision work on
its own CUDA stream, so it runs while k decodes (streamer/engine/core.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamer.types import Caption, Window

__all__ = ["SchedulerConfig", "BatchPlanner", "Scheduler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # windows per engine call
    max_wait: float = 0.05  # seconds to wait for a fuller batch once one window is ready
    max_pending_per_stream: int = 2  # newest wins beyond this
    pipeline: bool | None = None  # prepare batch k+1 while k decodes; None: on when the engine is on CUDA


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
PrepareFn = Callable[[Sequence[Window]], Any]
FinishFn = Callable[[Any], list[Caption]]


class Scheduler:
    def __init__(
        self,
        caption_fn: CaptionFn,
        on_captions: Callable[[list[Caption]], None],
        config: SchedulerConfig | None = None,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        on_drop: Callable[[Window], None] | None = None,
        pipeline: tuple[PrepareFn, FinishFn] | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.planner = BatchPlanner(self.config)
        self._caption_fn = caption_fn
        self._on_captions = on_captions
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._pipeline = pipeline
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

    async def _next_batch(self, wait_for_more: bool) -> list[Window]:
        """The next batch; [] once closing with nothing left, or (not waiting) when idle."""
        loop = asyncio.get_running_loop()
        while not self.planner.pending:
            if self._closing or not wait_for_more:
                return []
            self._wake.clear()
            await self._wake.wait()
        if wait_for_more and self.planner.pending < self.config.max_batch and not self._closing:
            # a fuller batch is cheaper per window; wait a little for one
            deadline = loop.time() + self.config.max_wait
            while self.planner.pending < self.config.max_batch and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
        return self.planner.next_batch()

    async def _on_engine(self, fn, arg, batch: list[Window]):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)
        except Exception:
            log.exception("engine failed on a batch", extra={"windows": len(batch)})
            return None

    def _done(self, batch: list[Window], started: float, captions: list[Caption] | None) -> None:
        if captions is None:
            return
        if self._on_batch:
            self._on_batch(len(batch), time.perf_counter() - started)
        self._on_captions(captions)

    async def _run(self) -> None:
        if self._pipeline is not None:
            return await self._run_pipelined(*self._pipeline)
        while batch := await self._next_batch(wait_for_more=True):
            started = time.perf_counter()
            self._done(batch, started, await self._on_engine(self._caption_fn, batch, batch))

    async def _run_pipelined(self, prepare: PrepareFn, finish: FinishFn) -> None:
        in_flight = None  # (batch, prepared, started): prepared, not yet finished
        while True:
            # with a batch in flight, take what is waiting now rather than wait
            batch = await self._next_batch(wait_for_more=in_flight is None)
            if not batch and in_flight is None:
                return  # closing and drained
            queued = None
            if batch:
                started = time.perf_counter()
                prepared = await self._on_engine(prepare, batch, batch)
                queued = None if prepared is None else (batch, prepared, started)
            if in_flight is not None:
                done_batch, prepared_before, started_before = in_flight
                self._done(done_batch, started_before, await self._on_engine(finish, prepared_before, done_batch))
            in_flight = queued

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
