"""Supervision of the daemon's long-lived tasks (scheduler loop, stream pumps, sink loops).

A task that ends with an exception is logged once with its traceback, counted,
and started again after a short backoff, as long as the restart budget lasts
(`budget` restarts of all tasks together within `window` seconds). While a task
is down, `problems()` names it, and the daemon reports not ready; once the
budget is spent the supervisor is `failed` and calls `on_fatal` once: a daemon
that cannot caption must not look alive, so `serve` then exits non-zero for
systemd or Kubernetes to restart it.

A task that returns normally is done (the scheduler after a drain); a cancelled
one is stopped, not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

# A crashed loop waits this long before its restart, doubling per crash up to the max: long enough
# for /readyz to show the outage, short enough that a one-off fault costs about one hop of captions.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 10.0


class Supervisor:
    def __init__(
        self,
        budget: int = 5,
        window: float = 60.0,
        *,
        on_restart: Callable[[str], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.budget = budget
        self.window = window
        self.failed: str | None = None  # why the budget ran out; None while healthy
        self._on_restart = on_restart
        self._on_fatal = on_fatal
        self._down: dict[str, str] = {}  # task name -> why it is down (waiting to restart)
        self._restarts: deque[float] = deque()  # monotonic times of recent restarts
        self._tasks: dict[str, asyncio.Task] = {}

    def spawn(self, name: str, run: Callable[[], Awaitable[object]]) -> asyncio.Task:
        """Run `run()` as the supervised task `name` (unique); returns the guarding task.

        Awaiting the returned task waits until `run()` returned normally, the
        budget was spent, or the task was cancelled."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"a supervised task named {name!r} is running")
        task = asyncio.create_task(self._guard(name, run), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t, name=name: self._forget(name, t))
        return task

    def problems(self) -> list[str]:
        """What keeps the daemon from being ready: tasks down, or the spent budget."""
        out = [f"task {name} restarting after {why}" for name, why in sorted(self._down.items())]
        if self.failed:
            out.insert(0, self.failed)
        return out

    @property
    def running(self) -> list[str]:
        return sorted(name for name, task in self._tasks.items() if not task.done())

    async def cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every task still running and wait for them (idempotent)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------
    async def _guard(self, name: str, run: Callable[[], Awaitable[object]]) -> None:
        attempt = 0
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.error("task died", exc_info=True, extra={"task": name, "error": why})
                if not self._may_restart():
                    self._fatal(f"task {name} kept failing ({len(self._restarts)} restarts in "
                                f"{self.window:g} s), last: {why}")
                    return
                self._down[name] = why
                if self._on_restart is not None:
                    self._on_restart(name)
            delay = min(_BACKOFF_FIRST * 2**attempt, _BACKOFF_MAX)
            attempt += 1
            await asyncio.sleep(delay)  # a timer, not synchronisation: give a crash loop room to breathe
            self._down.pop(name, None)
            log.warning("task restarted", extra={"task": name, "attempt": attempt})

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.budget:
            return False
        self._restarts.append(now)
        return True

    def _fatal(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        log.critical("restart budget spent: the daemon cannot go on", extra={"reason": reason})
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def _forget(self, name: str, task: asyncio.Task) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        self._down.pop(name, None)
