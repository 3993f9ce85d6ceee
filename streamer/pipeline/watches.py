"""Watches: a question re-asked on a live stream's newest window; an event when its answer
starts or stops matching (issue #13: "is anyone at the door?", and the moment that changes).

`WatchRule` is the pure part (no clock, no engine): is an answer a match (`on`: a word compared
case-insensitively, or a regular expression written `/.../`), and did the held state change?
The state goes through `Hysteresis(hold)` (publish/stabilizer.py, the rule captions use), primed
with "off": it turns on once `hold` answers in a row match, and off once `hold` in a row do not,
so one odd answer never flips it.

`Watches` is the per-daemon part: one supervised task (`watches`) that, for each watch due
(every `every` seconds), asks `Daemon.ask` about the stream's newest captioned window, feeds the
answer to the rule and publishes a `WatchEvent` (hub.publish_event: opted-in WebSocket clients,
webhooks, the bus) when the held state changes. A window is asked about once per watch: a tick
with no new window since the last ask is skipped, so a stalled stream asks nothing. A failing ask
is counted (streamer_watch_asks_total{result="failed"}), logged once until it recovers, and tried
again at the next tick; it never counts as an answer. Watches added over HTTP die with their
stream (removed, or replaced by a new one of the same id); `[[watches]]` from the config file
follow their stream id and wait, idle, while it does not run here (with a cluster, only the
stream's owner asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamer.publish.stabilizer import Hysteresis
from streamer.types import Answer, WatchEvent

__all__ = ["Watch", "WatchLimits", "WatchRefused", "WatchRule", "Watches", "attach_watches", "matcher", "watches_of"]

log = logging.getLogger(__name__)


def matcher(on: str) -> Callable[[str], bool]:
    """`on` as a test of an answer: `/regex/` searched case-insensitively, else case-insensitive equality
    (surrounding spaces ignored)."""
    if len(on) >= 2 and on.startswith("/") and on.endswith("/"):
        pattern = re.compile(on[1:-1], re.IGNORECASE)  # re.error: the caller validated it (config.py)
        return lambda answer: pattern.search(answer) is not None
    word = on.strip().casefold()
    return lambda answer: answer.strip().casefold() == word


class WatchRule:
    """Pure: `observe(answer)` returns the new held state ("on"/"off") when it changed, else None."""

    def __init__(self, on: str, hold: int) -> None:
        self.matches = matcher(on)
        self.hold = hold
        self._held: Hysteresis[bool] = Hysteresis(hold)
        self._held.update(False)  # a watch starts off: turning on takes `hold` matching answers

    @property
    def state(self) -> str:
        return "on" if self._held.current else "off"

    def observe(self, answer: str) -> str | None:
        self._held.update(self.matches(answer))
        return self.state if self._held.changed else None

    def reset(self) -> None:
        self._held.reset()
        self._held.update(False)


@dataclass(frozen=True)
class WatchLimits:
    max_watches: int = 64  # [limits] max_watches: on this daemon
    max_per_stream: int = 8  # [limits] max_watches_per_stream


class WatchRefused(ValueError):
    """A watch that cannot be added or found: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(eq=False)
class Watch:
    id: str
    stream_id: str
    question: str
    every: float
    on: str
    hold: int
    origin: str  # "config" ([[watches]]) or "http"
    rule: WatchRule
    runtime: Any = None  # the StreamRuntime it follows; an HTTP watch dies when its stream's runtime goes
    next_due: float = 0.0  # loop time of the next ask
    last_index: int | None = None  # the newest window asked about
    last: Answer | None = None
    asks: int = 0
    failures: int = 0
    failing: str | None = None  # the last error while asks fail (logged once), None once one succeeds
    task: asyncio.Task | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        last = self.last
        return {
            "id": self.id, "stream_id": self.stream_id, "question": self.question, "every": self.every,
            "on": self.on, "hold": self.hold, "origin": self.origin, "state": self.rule.state,
            "answer": last.answer if last else None, "start": last.start if last else None,
            "end": last.end if last else None, "asks": self.asks, "failures": self.failures,
            "error": self.failing,
        }


class Watches:
    """The daemon's watches and the one task that asks their questions."""

    def __init__(self, daemon: Any, limits: WatchLimits | None = None) -> None:
        self.daemon = daemon  # pipeline.daemon.Daemon
        self.limits = limits or WatchLimits()
        self._by_stream: dict[str, dict[str, Watch]] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._started = False

    # -- what the HTTP API and the config do ------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self.daemon.supervisor.spawn("watches", self._run)

    def add(self, stream_id: str, request: Any, *, origin: str = "http") -> Watch:
        """Add a watch (`request`: config.WatchRequest or WatchConfig). Over HTTP the stream must run
        here and `every` be at least its hop; raises WatchRefused (404, 400, 409, 429) or ValueError
        (a question the model cannot read)."""
        self._prune()
        rt = self.daemon.streams.get(stream_id)
        if origin == "http":
            if rt is None:
                raise WatchRefused(404, "not_found", f"no stream {stream_id!r}")
            if request.every < rt.config.hop:
                raise WatchRefused(400, "every_below_hop", f"every = {request.every:g} s is below stream "
                                   f"{stream_id!r}'s hop of {rt.config.hop:g} s: it has no newer window to ask about")
        question = self.daemon.check_question(request.question, stream_id=stream_id)  # ValueError: empty, too long for its model
        mine = self._by_stream.get(stream_id, {})
        if len(mine) >= self.limits.max_per_stream:
            raise WatchRefused(429, "max_watches_per_stream",
                               f"stream {stream_id!r} has {len(mine)} watches, the limit ([limits] max_watches_per_stream)")
        total = sum(len(w) for w in self._by_stream.values())
        if total >= self.limits.max_watches:
            raise WatchRefused(429, "max_watches", f"at the limit of {self.limits.max_watches} watches ([limits] max_watches)")
        watch_id = request.id
        if watch_id is None:
            watch_id = next(f"w{n}" for n in self._ids if f"w{n}" not in mine)
        elif watch_id in mine:
            raise WatchRefused(409, "exists", f"stream {stream_id!r} already has a watch {watch_id!r}")
        watch = Watch(watch_id, stream_id, question, float(request.every), request.on, request.hold, origin,
                      WatchRule(request.on, request.hold), runtime=rt if origin == "http" else None,
                      next_due=asyncio.get_running_loop().time())
        self._by_stream.setdefault(stream_id, {})[watch_id] = watch
        self.daemon.metrics.watch_state.labels(stream=stream_id, watch=watch_id).set(0)
        log.info("watch added", extra={"stream": stream_id, "watch": watch_id, "every": watch.every, "origin": origin})
        self._wake.set()
        return watch

    def remove(self, stream_id: str, watch_id: str, why: str = "deleted") -> bool:
        watch = self._by_stream.get(stream_id, {}).pop(watch_id, None)
        if watch is None:
            return False
        if not self._by_stream[stream_id]:
            del self._by_stream[stream_id]
        if watch.task is not None:
            watch.task.cancel()
        self.daemon.metrics.forget_watch(stream_id, watch_id)
        log.info("watch removed", extra={"stream": stream_id, "watch": watch_id, "why": why})
        self._wake.set()
        return True

    def of_stream(self, stream_id: str) -> list[Watch]:
        self._prune()
        return list(self._by_stream.get(stream_id, {}).values())

    def get(self, stream_id: str, watch_id: str) -> Watch | None:
        self._prune()
        return self._by_stream.get(stream_id, {}).get(watch_id)

    def all(self) -> list[Watch]:
        return [w for mine in self._by_stream.values() for w in mine.values()]

    # -- the task -------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                self._prune()
                now = loop.time()
                for watch in self.all():
                    if watch.next_due > now:
                        continue
                    watch.next_due += watch.every
                    if watch.next_due <= now:  # fell behind (or was idle): the next tick from now
                        watch.next_due = now + watch.every
                    if watch.task is None or watch.task.done():  # one ask per watch at a time
                        watch.task = asyncio.create_task(self._tick(watch), name=f"watch:{watch.stream_id}:{watch.id}")
                due = min((w.next_due for w in self.all()), default=None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), None if due is None else max(0.0, due - loop.time()))
        finally:  # cancelled (daemon stopping) or died: no ask outlives the loop (a restart starts afresh)
            tasks = [w.task for w in self.all() if w.task is not None and not w.task.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick(self, watch: Watch) -> None:
        from streamer.pipeline.daemon import StreamNotFound

        rt = self.daemon.streams.get(watch.stream_id)
        if rt is None or self.daemon.draining or (watch.runtime is not None and rt is not watch.runtime):
            return  # gone (an HTTP watch is pruned), or not running here (a config watch waits)
        newest = rt.last_caption
        if newest is None or newest.index == watch.last_index:
            return  # no new window since the last ask: nothing new to say
        labels = {"stream": watch.stream_id, "watch": watch.id}
        try:
            answer = await self.daemon.ask(watch.stream_id, watch.question)
        except StreamNotFound:
            return  # removed while asking: pruned next
        except Exception as exc:  # noqa: BLE001 -- engine failed, busy, ...: counted, logged once, next tick
            if self.daemon.draining:
                return  # the scheduler refuses new work while the daemon stops: not the watch's failure
            watch.failures += 1
            self.daemon.metrics.watch_asks.labels(**labels, result="failed").inc()
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if watch.failing is None:
                log.warning("watch ask failed; retrying every tick (logged once until it succeeds)",
                            extra={**labels, "error": why})
            watch.failing = why
            return
        if watch.failing is not None:
            log.warning("watch asks again", extra={**labels, "failures": watch.failures})
            watch.failing = None
        self.daemon.metrics.watch_asks.labels(**labels, result="ok").inc()
        watch.asks += 1
        watch.last, watch.last_index = answer, answer.index
        changed = watch.rule.observe(answer.answer)
        if changed is None:
            return
        self.daemon.metrics.watch_state.labels(**labels).set(1 if changed == "on" else 0)
        self.daemon.metrics.watch_changes.labels(**labels).inc()
        log.info("watch changed", extra={**labels, "state": changed, "answer": answer.answer, "end": answer.end})
        self.daemon.hub.publish_event(WatchEvent(watch.id, watch.stream_id, watch.question, changed, answer.answer,
                                                 answer.start, answer.end, time.time()))

    def _prune(self) -> None:
        """HTTP watches whose stream is gone die with it; config watches start afresh with a new run of their stream."""
        for watch in self.all():
            rt = self.daemon.streams.get(watch.stream_id)
            if watch.origin == "http":
                if rt is not watch.runtime:
                    self.remove(watch.stream_id, watch.id, why="its stream was removed")
            elif rt is not watch.runtime:
                watch.runtime = rt
                watch.rule.reset()
                watch.last_index = None
                self.daemon.metrics.watch_state.labels(stream=watch.stream_id, watch=watch.id).set(0)


_WATCHES: weakref.WeakKeyDictionary[Any, Watches] = weakref.WeakKeyDictionary()


def watches_of(daemon: Any) -> Watches:
    """The daemon's watches (made and started with default limits on first use, when serve did not)."""
    watches = _WATCHES.get(daemon)
    if watches is None:
        watches = attach_watches(daemon)
    return watches


def attach_watches(daemon: Any, limits: WatchLimits | None = None, configs: Iterable[Any] = ()) -> Watches:
    """Give a started daemon its watches: `configs` are [[watches]] (config.WatchConfig), checked at load."""
    watches = Watches(daemon, limits)
    _WATCHES[daemon] = watches
    for config in configs:
        watches.add(config.stream, config, origin="config")
    watches.start()
    return watches
