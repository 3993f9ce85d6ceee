"""What every hub-reading sink shares: its subscription, the consume loop, and the drain at close.

A sink subclasses `HubConsumer`, sets `streams` and `only_changes`, and
implements `_on_message(message)` (a `HubMessage`: read its typed `payload`), which must not block (hand slow work to a
queue of its own). The loop drains the subscription eagerly; if the hub ever
drops the sink for lagging (the loop was blocked elsewhere), it subscribes
again and says so once. A message the sink cannot handle is logged with its
traceback and counted (`errors`), and the loop goes on. Under a Supervisor
(`start(hub, spawn=...)`) a loop that still dies is restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from streamer.publish.hub import REASON_SLOW, CaptionHub, HubMessage, Subscription, SubscriptionClosed
from streamer.types import Caption

__all__ = ["HubConsumer", "Spawn"]

log = logging.getLogger(__name__)

Spawn = Callable[[str, Callable[[], Any]], asyncio.Task]
_RECENT = 4096  # captions remembered against the bus's rare duplicates (a re-sent batch is recent)


class HubConsumer:
    streams: frozenset[str] | None = None
    only_changes: bool = False
    types: frozenset[str] = frozenset()  # opt-in event types (hub.py) the sink also takes
    consumer_name = "sink"

    def _init_consumer(self) -> None:
        self._recent: OrderedDict[tuple, None] = OrderedDict()  # captions read from the bus, newest last
        self._hub: CaptionHub | None = None
        self._sub: Subscription | None = None
        self._consumer: asyncio.Task | None = None
        self._stopping = False
        self.errors = 0  # messages the sink failed to handle (each logged)

    def _start_consuming(self, hub: CaptionHub, spawn: Spawn | None) -> None:
        self._hub = hub
        self._sub = self._subscribe()
        name = f"{self.consumer_name}:{id(self):x}"
        self._consumer = spawn(name, self._consume) if spawn else asyncio.create_task(self._consume(), name=name)

    async def _stop_consuming(self) -> None:
        """Handle what is already queued (nothing is lost), then stop the loop."""
        self._stopping = True
        sub = self._sub
        if sub is not None:
            while sub.pending and not sub.closed:  # returns at once: nothing is lost
                self._handle(await sub.get())
            sub.close()
        task, self._consumer = self._consumer, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _on_message(self, message: HubMessage) -> None:
        raise NotImplementedError

    def _ours(self, m: HubMessage) -> bool:
        """With a bus, a sink runs once in the cluster: it takes only what this replica published
        (every replica reads every stream back from the bus, for its clients), and each caption once
        (the bus is at least once: a batch cut off by a lost connection is appended again)."""
        bus = self._hub.bus if self._hub is not None else None
        if bus is None or m.bus_seq is None:
            return True  # alone, or not from the bus
        if m.origin != bus.replica_id:
            return False
        if isinstance(m.payload, Caption):
            p = m.payload
            key = (p.stream_id, p.index, p.emit_time)
            if key in self._recent:
                return False
            self._recent[key] = None
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        return True

    def _subscribe(self) -> Subscription:
        assert self._hub is not None
        return self._hub.subscribe(self.streams, only_changes=self.only_changes, replay=False, types=self.types)

    async def _consume(self) -> None:
        while True:
            assert self._sub is not None
            try:
                message = await self._sub.get()
            except SubscriptionClosed as closed:
                if closed.reason == REASON_SLOW and not self._stopping:
                    log.warning("sink fell behind the hub and was dropped; subscribing again",
                                extra={"sink": self.consumer_name})
                    self._sub = self._subscribe()
                    continue
                return
            self._handle(message)

    def _handle(self, message: HubMessage) -> None:
        if not self._ours(message):
            return
        try:
            self._on_message(message)
        except Exception:
            self.errors += 1
            log.exception("sink failed on a hub message", extra={"sink": self.consumer_name})
