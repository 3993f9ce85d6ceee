"""Caption fan-out: one publisher, many subscribers, each with a bounded queue.

No network code: a WebSocket route subscribes, forwards `(await sub.get()).encoded`
to its socket, and closes the socket when the subscription closes (see
`Subscription.wait_closed()`). Sinks read the typed payload (`Caption` or
`StateChange`) of each `HubMessage`; nothing parses JSON back.

- Publishing is synchronous and never waits: each message is encoded at most once, on first use
  (protocol.py) and offered to every matching subscriber. Call it on the event
  loop (from the engine thread, via `loop.call_soon_threadsafe`).
- Drop policy: a subscriber whose queue is full is closed with reason
  "slow consumer" and its pending messages are dropped, so one stuck client
  never delays publishing or the other subscribers.
- `shown`: whether a caption is the one its stream's stabilizer shows
  (publish/stabilizer.py; always True with `stabilize = "off"`). Every
  caption is published either way; overlays and subtitle files follow the
  shown ones.
- `stable`: a caption whose text (and `shown`) equals the previous caption of
  its stream is sent with stable=True. Subscribers with only_changes=True (the default) skip
  it when they were already sent that text for that stream, so a client is
  never left without the current caption (after subscribing late, or when its
  replayed history starts with a stable caption).
- History: the last `history` caption messages per stream, plus each stream's
  latest state message, replayed to new subscribers (merged by time) before
  live messages. A replay fills at most half of a subscriber's queue (the
  newest messages win), leaving room for live ones.
- Removal: `end_stream()` publishes a stream's last state and ignores what
  its source still says while it stops, until `forget_stream()`, so clients
  see one `stopped` per removal.
- Events (`answer`, `watch`, `chapter`, `speech`: the StreamEvent records of
  types.py) are opt-in: a subscription gets the types it names in `types`
  and no others, so v1 clients see no change. They are not kept in history
  (nothing is replayed to a late subscriber) and never count as a caption.
- Bus (several replicas, publish/bus.py): after `attach_bus()`, what this
  daemon publishes goes to the bus only (`outlet`), and reaches subscribers
  when the bus reader hands it back through `deliver()`, with its per-stream
  `bus_seq`, like every other replica's messages: one path, no duplicates.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from streamer.publish.protocol import caption_message, encode, event_message, state_message
from streamer.types import EVENT_TYPES, Caption, StateChange, StreamEvent

__all__ = ["BusLink", "CaptionHub", "HubMessage", "Subscription", "SubscriptionClosed"]

REASON_CLOSED = "closed"
REASON_SLOW = "slow consumer"
REASON_SHUTDOWN = "server shutdown"


class BusLink(Protocol):
    """What the hub needs of a bus (publish/bus.py's CaptionBus)."""

    replica_id: str  # stored with each message this replica appends (HubMessage.origin when read back)

    def offer(self, m: HubMessage) -> None: ...  # take a message to append; never blocks

    async def flush(self, timeout: float) -> None: ...  # wait until what was offered came back


class SubscriptionClosed(Exception):
    """Raised by `Subscription.get()` once the subscription is closed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HubMessage:
    """One published message: the typed payload every sink consumes, and its wire form
    (`data`, `encoded`), each built once on first use and shared by every subscriber."""

    __slots__ = ("_data", "_encoded", "bus_seq", "origin", "payload", "seq", "shown", "stable")

    def __init__(self, payload: Caption | StateChange | StreamEvent, seq: int, stable: bool = False, *,
                 bus_seq: int | None = None, data: dict[str, Any] | None = None, origin: str | None = None,
                 shown: bool = True) -> None:
        self.payload = payload
        self.stable = stable
        self.shown = shown  # the caption its stream's stabilizer shows (always True for states)
        self.seq = seq  # publish order, breaks ties in replay
        self.bus_seq = bus_seq  # the stream's sequence number on the bus (the wire's `seq`); None without a bus
        self.origin = origin  # the replica that published it, for a message read from the bus (else None)
        self._data = data  # the wire form when it came from the bus (built from payload otherwise)
        self._encoded: str | None = None

    @property
    def stream_id(self) -> str:
        return self.payload.stream_id

    @property
    def kind(self) -> str:
        """The message's `type`: caption, state or an event type (EVENT_TYPES)."""
        p = self.payload
        return "caption" if isinstance(p, Caption) else "state" if isinstance(p, StateChange) else p.kind

    @property
    def text(self) -> str | None:
        """Caption text; None for state and event messages."""
        return self.payload.text if isinstance(self.payload, Caption) else None

    @property
    def time(self) -> float:
        """emit_time for captions and events, the change's time for states: the replay order."""
        return self.payload.emit_time if isinstance(self.payload, Caption) else self.payload.time

    @property
    def data(self) -> dict[str, Any]:
        """The protocol message as a dict (docs/protocol.md). Do not modify it: it is shared."""
        if self._data is None:
            p = self.payload
            if isinstance(p, Caption):
                self._data = caption_message(p, self.stable, self.shown)
            elif isinstance(p, StateChange):
                self._data = state_message(p)
            else:
                self._data = event_message(p)
            if self.bus_seq is not None:
                self._data["seq"] = self.bus_seq
        return self._data

    @property
    def encoded(self) -> str:
        """The protocol message as the text of a WebSocket frame."""
        if self._encoded is None:
            self._encoded = encode(self.data)
        return self._encoded

    def __repr__(self) -> str:
        return f"<HubMessage #{self.seq} {self.payload!r}>"


class Subscription:
    """One subscriber's view of the hub: a stream filter and a bounded queue of encoded messages.

    Made by `CaptionHub.subscribe()`. Read with `await get()` or `async for`.
    """

    def __init__(
        self, hub: CaptionHub, streams: Iterable[str] | None, *, only_changes: bool, replay: bool,
        types: Iterable[str] = (),
    ) -> None:
        self.only_changes = only_changes
        self.replay = replay
        self._hub = hub
        self._streams = _stream_set(streams)
        self.types = _type_set(types)  # the event types it opted in to (captions and states always come)
        self._maxsize = hub.queue_size
        self._queue: deque[HubMessage] = deque()
        self._ready = asyncio.Event()  # set while the queue is non-empty or closed
        self._closed_event = asyncio.Event()
        self._reason: str | None = None
        self._finishing: str | None = None  # closing once the queue is read out
        self._sent_text: dict[str, str] = {}  # stream -> last caption text queued for it

    # -- public ------------------------------------------------------------
    @property
    def streams(self) -> frozenset[str] | None:
        """The stream ids this subscription receives; None means every stream."""
        return self._streams

    @property
    def closed(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why it was closed ("closed", "slow consumer", "server shutdown"); None while open."""
        return self._reason

    @property
    def pending(self) -> int:
        """Messages queued and not read yet."""
        return len(self._queue)

    @property
    def capacity(self) -> int:
        """Messages the queue holds; one more closes the subscription as a slow consumer."""
        return self._maxsize

    def update(self, streams: Iterable[str] | None) -> None:
        """Change the filter (None: every stream).

        With `replay`, streams the filter did not have before replay their
        history now, queued after the messages already pending (per-stream
        order is kept; the order across streams is not).
        """
        if self.closed:
            return
        old = self._streams
        new = _stream_set(streams)
        self._streams = new
        if new is not None:
            # A stream left out may be re-added later: its replay must not count as already sent.
            for sid in [sid for sid in self._sent_text if sid not in new]:
                del self._sent_text[sid]
        if not self.replay or old is None:
            return
        if new is None:
            history = [m for m in self._hub._history(None) if m.stream_id not in old]
        else:
            history = self._hub._history(new - old)
        self._offer_replay(history)

    def update_types(self, types: Iterable[str]) -> None:
        """The event types to receive from now on (replaces the set; nothing is replayed)."""
        self.types = _type_set(types)

    async def get(self) -> HubMessage:
        """The next message; raises SubscriptionClosed once closed (pending messages are dropped),
        or, after `finish()`, once the pending messages have been read."""
        while True:
            if self._reason is not None:
                raise SubscriptionClosed(self._reason)
            if self._queue:
                msg = self._queue.popleft()
                if not self._queue and self._finishing is None:
                    self._ready.clear()
                return msg
            if self._finishing is not None:
                self.close(self._finishing)
                continue
            await self._ready.wait()

    def note_sent(self, m: HubMessage) -> None:
        """Record a message sent to the client outside the queue (a `since` replay from the bus),
        so that a stable repeat of its text is skipped as if it had been queued."""
        if m.text is not None and not self.closed:
            self._sent_text[m.stream_id] = m.text

    def finish(self, reason: str) -> None:
        """Take no more messages; close once what is queued has been read."""
        if self._reason is not None or self._finishing is not None:
            return
        self._finishing = reason
        self._ready.set()
        if not self._queue:
            self.close(reason)

    async def wait_closed(self) -> str:
        """Wait until the subscription is closed; return the reason.

        A forwarder that is blocked writing to a stuck socket uses this to notice
        it was dropped and close the socket.
        """
        await self._closed_event.wait()
        assert self._reason is not None
        return self._reason

    def close(self, reason: str = REASON_CLOSED) -> None:
        """Close (idempotent): pending messages are dropped, `get()` raises SubscriptionClosed."""
        if self._reason is not None:
            return
        self._reason = reason
        self._queue.clear()
        self._sent_text.clear()
        self._ready.set()  # wake a waiting get() so it raises
        self._closed_event.set()
        self._hub._on_close(self, reason)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> HubMessage:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        state = f"closed ({self._reason})" if self.closed else f"{len(self._queue)} pending"
        streams = "*" if self._streams is None else sorted(self._streams)
        return f"<Subscription streams={streams} {state}>"

    # -- called by the hub ---------------------------------------------------
    def _matches(self, stream_id: str) -> bool:
        return self._streams is None or stream_id in self._streams

    def _wants(self, m: HubMessage) -> bool:
        if m.text is None:
            return isinstance(m.payload, StateChange) or m.kind in self.types
        # Skip a repeat only if this subscriber was already sent that text.
        return not (self.only_changes and m.stable and self._sent_text.get(m.stream_id) == m.text)

    def _offer(self, m: HubMessage) -> None:
        if self._reason is not None or self._finishing is not None or not self._matches(m.stream_id) or not self._wants(m):
            return
        if len(self._queue) >= self._maxsize:
            self.close(REASON_SLOW)
            return
        self._push(m)

    def _push(self, m: HubMessage) -> None:
        self._queue.append(m)
        if m.text is not None:
            self._sent_text[m.stream_id] = m.text
        self._ready.set()

    def _offer_replay(self, history: list[HubMessage]) -> None:
        # Filter in order, as live delivery would have, then keep the newest
        # that fit in half the free room. _sent_text ends up recording only
        # what was really queued.
        sent = dict(self._sent_text)
        wanted: list[HubMessage] = []
        for m in history:
            if m.text is None or not (self.only_changes and m.stable and sent.get(m.stream_id) == m.text):
                wanted.append(m)
                if m.text is not None:
                    sent[m.stream_id] = m.text
        room = (self._maxsize - len(self._queue)) // 2
        for m in wanted[max(0, len(wanted) - room) :] if room > 0 else ():
            self._push(m)

    def _forget(self, stream_id: str) -> None:
        self._sent_text.pop(stream_id, None)


class CaptionHub:
    """Fans captions and stream states out to subscribers; see the module docstring for the policies."""

    def __init__(self, history: int = 20, queue_size: int = 256) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        self.history = history
        self.queue_size = queue_size
        self._subs: set[Subscription] = set()
        self._captions: dict[str, deque[HubMessage]] = {}
        self._states: dict[str, HubMessage] = {}
        self._last_text: dict[str, tuple[str, bool]] = {}  # stream -> (text, shown) of its last caption
        self._ended: set[str] = set()  # streams between end_stream() and forget_stream()
        self._seq = itertools.count()
        self._closed = False
        self._bus: BusLink | None = None
        self.messages_published = 0
        self.subscribers_dropped_slow = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @property
    def streams(self) -> list[str]:
        """Streams with history or state kept, sorted."""
        return sorted(self._captions.keys() | self._states.keys())

    @property
    def bus(self) -> BusLink | None:
        return self._bus

    def attach_bus(self, bus: BusLink) -> None:
        """Send what is published here to `bus.offer()` instead of the subscribers; they get it back
        through `deliver()`. `drain()` awaits `bus.flush()` so that the last messages of a draining
        daemon come back from the bus before the subscribers are closed."""
        self._bus = bus

    def deliver(self, m: HubMessage) -> None:
        """A message read from the bus (this replica's or another's): keep in history, fan out.

        Not checked against `end_stream()`: the owner's last `stopped` comes back this way."""
        if self._closed:
            return
        m.seq = next(self._seq)
        self._keep_and_fan_out(m)

    def subscribe(
        self, streams: Iterable[str] | None = None, *, only_changes: bool = True, replay: bool = True,
        types: Iterable[str] = (),
    ) -> Subscription:
        """A new subscription (streams None: every stream, including later ones; `types`: the event
        types it also wants, see the module docstring).

        With `replay`, its queue starts with the matching history. After
        `close()` of the hub, the subscription comes back already closed.
        """
        sub = Subscription(self, streams, only_changes=only_changes, replay=replay, types=types)
        if self._closed:
            sub.close(REASON_SHUTDOWN)
            return sub
        self._subs.add(sub)
        if replay:
            sub._offer_replay(self._history(sub.streams))
        return sub

    def publish_caption(self, caption: Caption, shown: bool = True) -> None:
        """Encode once, keep in history, offer to every matching subscriber. Never blocks.

        `shown`: the stream's stabilizer shows this caption. A caption that becomes shown with the
        text of the one before it is not `stable`: clients that skip repeats must still get it."""
        if self._closed or caption.stream_id in self._ended:
            return
        sid = caption.stream_id
        stable = self._last_text.get(sid) == (caption.text, shown)
        self._last_text[sid] = (caption.text, shown)
        self._emit(HubMessage(caption, next(self._seq), stable, shown=shown))

    def publish_state(self, stream_id: str, state: str, detail: str | None = None, *, at: float | None = None) -> None:
        """Encode once, remember as the stream's latest state, offer to matching subscribers.

        `at`: wall-clock time of the change (default: now).
        """
        if self._closed or stream_id in self._ended:
            return
        now = time.time() if at is None else at
        self._emit(HubMessage(StateChange(stream_id, state, detail, now), next(self._seq)))

    def publish_event(self, event: StreamEvent) -> None:
        """An answer, watch change, chapter or speech cue: to the subscribers that opted in to its type
        (through the bus when there is one). Never blocks; not kept in history."""
        if self._closed or event.stream_id in self._ended:
            return
        self._emit(HubMessage(event, next(self._seq)))

    def _emit(self, m: HubMessage) -> None:
        """One way out for what this daemon publishes: through the bus when there is one (it comes
        back by `deliver()`, like other replicas' messages), else straight to history and subscribers."""
        if self._bus is not None:
            self._bus.offer(m)
        else:
            self._keep_and_fan_out(m)

    def _keep_and_fan_out(self, m: HubMessage) -> None:
        """Keep as the stream's latest state or in its caption history; offer to subscribers."""
        sid = m.stream_id
        if isinstance(m.payload, StateChange):
            self._states[sid] = m
        elif m.text is None:
            pass  # events: live only
        elif self.history:
            hist = self._captions.get(sid)
            if hist is None:
                hist = self._captions[sid] = deque(maxlen=self.history)
            hist.append(m)
        self._fan_out(m)

    def end_stream(self, stream_id: str, state: str, detail: str | None = None, *, at: float | None = None) -> None:
        """Publish a stream's last state, then take nothing more for it until `forget_stream()`.

        For a stream being removed: its source says `stopped` too while it shuts
        down, and clients must see one `stopped` (with the owner's detail), not two."""
        self.publish_state(stream_id, state, detail, at=at)
        self._ended.add(stream_id)

    def forget_stream(self, stream_id: str) -> None:
        """Drop a removed stream's history, state and last text (a new stream with its id starts fresh)."""
        self._ended.discard(stream_id)
        self._captions.pop(stream_id, None)
        self._states.pop(stream_id, None)
        self._last_text.pop(stream_id, None)
        for sub in self._subs:
            sub._forget(stream_id)

    def close(self) -> None:
        """Close every subscription with reason "server shutdown" (idempotent); later publishes are ignored."""
        self._closed = True
        for sub in list(self._subs):
            sub.close(REASON_SHUTDOWN)

    async def drain(self, timeout: float) -> None:
        """Shut down gently: take no more messages, let every subscriber read what
        is already queued (the last captions of a draining daemon), for at most
        `timeout` seconds; then close whoever is left. With a bus, first wait (within
        the same timeout) for this daemon's last messages to come back from it."""
        if self._bus is not None and not self._closed:
            started = asyncio.get_running_loop().time()
            await self._bus.flush(timeout)
            timeout = max(0.0, timeout - (asyncio.get_running_loop().time() - started))
        self._closed = True
        for sub in list(self._subs):
            sub.finish(REASON_SHUTDOWN)
        deadline = asyncio.get_running_loop().time() + timeout
        while self._subs and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self.close()

    # -- internals -----------------------------------------------------------
    def _fan_out(self, m: HubMessage) -> None:
        self.messages_published += 1
        # A copy: a full queue closes its subscriber, which removes it from the set.
        for sub in tuple(self._subs):
            sub._offer(m)

    def _history(self, streams: frozenset[str] | None) -> list[HubMessage]:
        ids = self._captions.keys() | self._states.keys() if streams is None else streams
        runs: list[list[HubMessage]] = []
        for sid in ids:
            run = list(self._captions.get(sid, ()))
            state = self._states.get(sid)
            if state is not None:
                run.append(state)
                run.sort(key=_replay_key)
            if run:
                runs.append(run)
        return list(heapq.merge(*runs, key=_replay_key))

    def _on_close(self, sub: Subscription, reason: str) -> None:
        if sub in self._subs:
            self._subs.discard(sub)
            if reason == REASON_SLOW:
                self.subscribers_dropped_slow += 1


def _stream_set(streams: Iterable[str] | None) -> frozenset[str] | None:
    if isinstance(streams, str):  # a bare id would become a set of characters
        raise TypeError(f"streams must be a collection of stream ids or None, got the string {streams!r}")
    return None if streams is None else frozenset(streams)


def _type_set(types: Iterable[str]) -> frozenset[str]:
    if isinstance(types, str):
        raise TypeError(f"types must be a collection of event types, got the string {types!r}")
    kept = frozenset(types)
    unknown = kept - set(EVENT_TYPES)
    if unknown:
        raise ValueError(f"unknown event types {sorted(unknown)}; known: {', '.join(EVENT_TYPES)}")
    return kept


def _replay_key(m: HubMessage) -> tuple[float, int]:
    return (m.time, m.seq)
