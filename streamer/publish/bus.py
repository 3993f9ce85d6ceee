"""The caption bus: Redis Streams shared by several replicas (`[bus]` in streamer.toml).

With a bus, a client may connect to any replica and see every stream. Keys,
under `key_prefix` ("streamer:" by default; stream ids are validated, so they
are safe in key names):

- `{p}s:{id}`: a Redis Stream per stream id, one entry per message (captions
  and states) with entry id `<seq>-0` and field `m`, the protocol message as
  JSON without `seq`. Trimmed to about `retention` entries (`MAXLEN ~`).
  The seq being the entry id, a resume is one `XRANGE` from `<seq+1>-0`.
- `{p}seq:{id}`: the stream's last seq (`INCR`).
- `{p}streams`: the SET of stream ids that have entries, and `{p}index`: a
  short Redis Stream with one entry each time an id enters that set, which
  wakes every reader for a new stream (no `KEYS`/`SCAN`).

Publisher: the hub hands each message it would publish to `offer()` (never
blocks) -> a bounded outbox (while Redis is unreachable it keeps the newest
`buffer` messages; the oldest are dropped and counted) -> one task appends
them with `APPEND_LUA` in pipelined batches: INCR the stream's counter and
XADD with that seq, atomically inside Redis. With ownership, `fence()` gives a
stream's lease (publish/lease.py): the script then checks inside Redis that
the lease is still held with our value before appending, and answers FENCED
otherwise; such a message is dropped, counted (`op="fenced"`) and logged once
per stream.

Reader: one task per daemon XREADs (blocking, bounded COUNT) the index and
every stream's key from the last seq it delivered, and hands each entry to
`hub.deliver()`: this replica's own messages come back this way too, so its
clients see exactly what every other replica's clients see (same seq, text,
times), and nothing twice.

Bus down: both tasks retry with backoff (up to `reconnect_max`); one log
line when it is lost, one when it is back; `problem()` ("bus unreachable")
keeps /readyz at 503 meanwhile; `streamer_bus_errors_total` counts failed
attempts, `streamer_bus_connected` says which it is. After the reconnection,
the outbox is appended and readers go on from their last seq.

Delivery is at least once towards Redis: a batch cut off by a lost
connection is sent again, so a message may be appended twice (two seqs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import socket
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamer.config import STREAM_ID
from streamer.publish.hub import CaptionHub, HubMessage
from streamer.publish.protocol import encode
from streamer.types import Answer, Caption, Chapter, SpeechCue, StateChange, StreamEvent, WatchEvent

__all__ = ["APPEND_LUA", "FENCED", "RESTORE_LUA", "BusConfig", "CaptionBus", "Fence", "Gap", "redacted"]

log = logging.getLogger(__name__)

# A Redis that lost its data (restarted without persistence) has neither the lease nor the stream's
# fencing counter (never deleted otherwise): the holder it forgot gets its lease back. Whoever
# acquired first since then made the counter exist again, so a later restore is refused.
RESTORE_LUA = """
local function restore(lease, counter, value, ttl, token)
  if redis.call('EXISTS', lease) == 1 or redis.call('EXISTS', counter) == 1 then return false end
  redis.call('SET', counter, token)
  redis.call('SET', lease, value, 'PX', ttl)
  return true
end
"""

# INCR the stream's counter, XADD with that seq as the entry id, register the stream id.
# KEYS: 1 the stream, 2 its counter, 3 the set of stream ids, 4 the index stream.
# ARGV: 1 stream id, 2 message JSON, 3 retention, 4 floor: the publisher's last seq + 1 (a Redis
# that lost its data restarts the counter at 1; the floor keeps seqs growing, so readers and
# `since` never see a number twice).
# Fencing (stream ownership, publish/lease.py), optional: KEYS[5] the stream's lease, ARGV[5] the
# value the publisher holds it with ("<replica>:<token>"). Checked first: when the lease is not held
# with exactly that value (expired, or another replica's), nothing is appended or counted and the
# script returns FENCED, so a paused or partitioned ex-owner publishes nothing. Optional with it:
# KEYS[6] the fencing counter, ARGV[7] the lease ttl in ms, ARGV[8] the token: a Redis that lost its
# data (no lease, no counter) gets the lease back (RESTORE_LUA) instead of refusing its owner.
# ARGV[6], optional: the publishing replica's id, stored beside the message as field `r` (not part of
# the protocol message): the owner's sinks take only their own messages, so they run once (hub.py).
APPEND_LUA = RESTORE_LUA + """
if KEYS[5] and redis.call('GET', KEYS[5]) ~= ARGV[5] then
  if not (KEYS[6] and restore(KEYS[5], KEYS[6], ARGV[5], ARGV[7], ARGV[8])) then return 'FENCED' end
end
local seq = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if seq < floor then
  seq = floor
  redis.call('SET', KEYS[2], seq)
end
local fields = {'m', ARGV[2]}
if ARGV[6] and ARGV[6] ~= '' then fields = {'m', ARGV[2], 'r', ARGV[6]} end
local ok = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-0', unpack(fields))
if type(ok) == 'table' and ok.err then
  -- the counter is behind the stream (it was deleted or restored on its own): go on after the stream
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1
  redis.call('SET', KEYS[2], seq)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-0', unpack(fields))
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000, '*', 'id', ARGV[1])
end
return seq
"""

# Redis answers none of these: reconnect with backoff. (OSError: a refused or reset socket that
# redis-py did not wrap.) Any other RedisError (a key of the wrong type, out of memory, a wrong
# password) is treated the same: retried with backoff and said in /readyz, rather than a task
# crash loop that would end the daemon.
_LINK_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_UNREACHABLE = (*_LINK_DOWN, RedisError)
_BACKOFF_FIRST = 0.1
_MAX_ENTRY_BYTES = 64 * 1024  # a protocol message is far smaller; a bigger entry is not ours
_MAX_TEXT = 4096
FENCED = b"FENCED"  # the append script's answer when the publisher's lease is not held (bytes: RESP2 bulk)


class Fence(Protocol):
    """What the append script checks: the lease key and the value we hold it with (a StreamLease),
    and what restores it in a Redis that lost its data."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> str: ...

    @property
    def fence_key(self) -> str: ...

    @property
    def ttl_ms(self) -> int: ...

    @property
    def token(self) -> int: ...


@dataclass(frozen=True)
class BusConfig:
    url: str
    retention: int = 10_000  # messages kept per stream (MAXLEN ~, so a little more)
    key_prefix: str = "streamer:"
    buffer: int = 10_000  # messages held while Redis is unreachable; the oldest are dropped past it
    read_count: int = 500  # entries per XREAD / XRANGE / append batch
    max_streams: int = 10_000  # stream ids followed on the bus; more are ignored (logged once)
    connect_timeout: float = 2.0
    reconnect_max: float = 5.0
    block: float = 1.0  # XREAD BLOCK: how long one read waits for news
    # Stream ownership (cluster/ownership.py): the stream set lives in Redis and each stream is
    # captioned by the one replica holding its lease.
    ownership: bool = True
    replica_id: str | None = None  # None: STREAMER_REPLICA_ID, else "<hostname>-<pid>" (default_replica_id())
    lease_ttl: float = 5.0  # a dead owner's streams are taken over within this + one window
    max_owned_streams: int = 64  # streams this replica captions at most
    request_timeout: float = 5.0  # a request routed to a stream's owner (thumbnail, details) waits this long

    def replica(self) -> str:
        """This replica's id on the bus."""
        return self.replica_id or default_replica_id()

    @classmethod
    def from_section(cls, section: Any) -> BusConfig:
        """From streamer.config.BusSection."""
        return cls(**section.model_dump())

    def __repr__(self) -> str:  # never print the password
        return f"BusConfig(url={redacted(self.url)!r}, retention={self.retention}, key_prefix={self.key_prefix!r})"


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages `from_seq`..`to_seq` of a stream are no longer on the bus."""

    stream_id: str
    from_seq: int
    to_seq: int


def default_replica_id() -> str:
    """STREAMER_REPLICA_ID, else "<hostname>-<pid>" (a Kubernetes pod's hostname is its name), cut to
    what a replica id may hold."""
    raw = os.environ.get("STREAMER_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[-64:] or f"replica-{os.getpid()}"


def redacted(url: str) -> str:
    """The URL for logs: host, port and database, never the password."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or ''}"


class CaptionBus:
    """One daemon's side of the bus: `start()` it with the daemon's supervisor, `close()` it last."""

    def __init__(self, config: BusConfig, hub: CaptionHub, metrics: Any = None) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics  # DaemonMetrics, or None
        self.replica_id = config.replica()
        p = config.key_prefix
        self._set_key, self._index_key = f"{p}streams", f"{p}index"
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=32,  # the reader, the publisher, and `since` replays of connecting clients
            timeout=config.connect_timeout,  # waiting for a free connection
            socket_connect_timeout=config.connect_timeout,
            # No socket_timeout: redis-py then wraps each send in asyncio.wait_for, which on Python 3.11
            # can swallow a cancellation (the reader never stops). Each call has its own timeout (_op).
            socket_timeout=None,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),  # reconnection is ours (backoff, logs, metrics), and a retried
            # append could be appended twice
            decode_responses=False,
            protocol=2,  # RESP2: XREAD answers a list of [key, entries] on every server version
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool)  # Any: redis-py's answers are loosely typed
        self._append = self._redis.register_script(APPEND_LUA)
        self._outbox: deque[HubMessage] = deque()
        self._outbox_ready = asyncio.Event()
        self._overflowing = False  # the outbox is dropping (logged once per episode)
        self._published: dict[str, int] = {}  # stream -> last seq this replica appended
        self._fences: dict[str, tuple[str, str, str, int, int]] = {}  # stream -> the lease's (key, value,
        # fencing counter, ttl ms, token): appends are checked
        self._read_pos: dict[str, int] = {}  # stream -> last seq the reader delivered
        self._index_pos: bytes | str | None = None
        self._progress = asyncio.Event()  # something was appended or delivered (for flush)
        self._down: dict[str, str] = {"read": "not connected yet"}  # side -> why; empty while connected
        self._ever_connected = False
        self._warned: set[str] = set()  # one log line per kind of bad input
        self._closed = False
        self._set_gauge()

    # -- public ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return not self._down

    def problem(self) -> str | None:
        """Why captions cannot flow through the bus now (for /readyz), or None."""
        if not self._down:
            return None
        return f"bus unreachable ({redacted(self.config.url)}: {next(iter(self._down.values()))})"

    @property
    def streams(self) -> list[str]:
        """Stream ids followed on the bus (every replica's)."""
        return sorted(self._read_pos)

    @property
    def buffered(self) -> int:
        return len(self._outbox)

    def start(self, spawn: Callable[[str, Callable[[], Any]], Any]) -> None:
        """Attach to the hub and start the two supervised tasks (`spawn`: Supervisor.spawn)."""
        self.hub.attach_bus(self)
        spawn("bus-read", self._read_loop)
        spawn("bus-publish", self._publish_loop)

    def offer(self, m: HubMessage) -> None:
        """The hub's outlet: queue a message to append. Never blocks; past `buffer` waiting messages
        (Redis unreachable) the oldest is dropped and counted."""
        if self._closed:
            return
        if len(self._outbox) >= self.config.buffer:
            self._outbox.popleft()
            if self.metrics is not None:
                self.metrics.bus_dropped.inc()
            if not self._overflowing:
                self._overflowing = True
                log.warning("bus buffer full: dropping the oldest messages until Redis takes them",
                            extra={"buffer": self.config.buffer})
        self._outbox.append(m)
        self._outbox_ready.set()
        self._set_buffered()

    def fence(self, stream_id: str, lease: Fence | None) -> None:
        """Append `stream_id`'s messages only while Redis holds `lease` with its value (checked
        inside the append script); None: unfenced, as without ownership. Keep a lost lease here
        until the stream is dropped: its stale value is what refuses the ex-owner's messages."""
        if lease is None:
            self._fences.pop(stream_id, None)
        else:
            self._fences[stream_id] = (lease.key, lease.value, lease.fence_key, lease.ttl_ms, lease.token)
            self._warned.discard(f"fenced:{stream_id}")  # a new lease: a later refusal is news again

    async def flush(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until everything offered was appended and read back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._flushed():
            left = deadline - loop.time()
            if left <= 0:
                log.warning("bus flush timed out: the last messages may not reach this replica's clients",
                            extra={"buffered": len(self._outbox)})
                return
            self._progress.clear()
            try:
                async with asyncio.timeout(left):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._progress.wait()
            except TimeoutError:
                pass

    async def since(self, stream_id: str, after: int) -> AsyncIterator[HubMessage | Gap]:
        """The stream's messages after seq `after`, oldest first, read in chunks; first a `Gap`
        when some of them are gone. Raises redis errors (the caller answers "bus unreachable")."""
        key, count, start, first = self._key(stream_id), self.config.read_count, after + 1, True
        while True:
            async with self._op():
                entries = await self._redis.xrange(key, min=f"{start}-0", max="+", count=count)
            if first:
                first = False
                head = _seq_of(entries[0][0]) if entries else None
                if head is None:
                    async with self._op():
                        last = int(await self._redis.get(self._seq_key(stream_id)) or 0)
                    if last > after:
                        yield Gap(stream_id, after + 1, last)
                elif head > after + 1:
                    yield Gap(stream_id, after + 1, head - 1)
            for entry_id, fields in entries:
                m = self._message(stream_id, entry_id, fields)
                if m is not None:
                    yield m
            last_seq = _seq_of(entries[-1][0]) if entries else None
            if len(entries) < count or last_seq is None:
                return
            start = last_seq + 1

    async def last_caption(self, stream_id: str, look_back: int = 64) -> Caption | None:
        """The newest caption of a stream on the bus (among its last `look_back` messages), or None:
        where a new owner continues the stream's index and media timeline. Raises redis errors."""
        async with self._op():
            entries = await self._redis.xrevrange(self._key(stream_id), count=look_back)
        for entry_id, fields in entries:
            m = self._message(stream_id, entry_id, fields)
            if m is not None and isinstance(m.payload, Caption):
                return m.payload
        return None

    async def newest_first(self, stream_id: str) -> AsyncGenerator[HubMessage, None]:
        """The stream's messages on the bus, newest first, read in chunks of `read_count` (at most
        its retention and a chunk: `MAXLEN ~` keeps a little more): what a new owner continues
        the stream's chapters from (publish/chapters.py). Entries that are not valid messages are
        skipped and counted (`bad_entry`) as the reader does. Raises redis errors."""
        key, count, top = self._key(stream_id), self.config.read_count, "+"
        left = self.config.retention + count
        while left > 0:
            async with self._op():
                entries = await self._redis.xrevrange(key, max=top, min="-", count=min(count, left))
            for entry_id, fields in entries:
                m = self._message(stream_id, entry_id, fields)
                if m is not None:
                    yield m
            left -= len(entries)
            if len(entries) < count:
                return
            oldest = entries[-1][0]
            # exclusive: older than the oldest read (Redis >= 6.2; deploy/ runs 7)
            top = "(" + (oldest.decode("ascii", "replace") if isinstance(oldest, bytes) else str(oldest))

    async def close(self) -> None:
        """After the supervisor cancelled the tasks: close the connections (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._outbox:
            log.warning("bus closed with messages not appended", extra={"dropped": len(self._outbox)})
            if self.metrics is not None:
                self.metrics.bus_dropped.inc(len(self._outbox))
            self._outbox.clear()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # -- the publisher ------------------------------------------------------------------
    async def _publish_loop(self) -> None:
        attempt = 0
        while True:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            batch = [self._outbox[i] for i in range(min(len(self._outbox), self.config.read_count))]
            try:
                results = await self._append_batch(batch)
            except _UNREACHABLE as exc:
                self._failed("publish", exc)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            self._recovered("publish")
            # offer() may have dropped some of the batch meanwhile (oldest first): remove what was sent
            sent = {id(m) for m in batch}
            while self._outbox and id(self._outbox[0]) in sent:
                self._outbox.popleft()
            if not self._outbox:
                self._overflowing = False
            self._set_buffered()
            for m, result in zip(batch, results):
                if result == FENCED:
                    # our lease on the stream is gone (expired while paused or cut off, or taken over):
                    # the new owner publishes the stream; ours must not reach it
                    self._count("fenced")
                    self._warn_once(f"fenced:{m.stream_id}", "bus refused a message: this replica no "
                                    "longer holds the stream's lease (dropped)", stream=m.stream_id)
                elif isinstance(result, Exception):
                    # Redis refused this one (out of memory, a key of the wrong type); retrying would not help.
                    self._count("rejected")
                    self._warn_once("rejected", "bus refused a message (dropped)",
                                    stream=m.stream_id, error=str(result)[:200])
                else:
                    self._published[m.stream_id] = max(self._published.get(m.stream_id, 0), int(result))
            self._progress.set()

    async def _append_batch(self, batch: list[HubMessage]) -> list[Any]:
        async with self._op(), self._redis.pipeline(transaction=False) as pipe:
            for m in batch:
                sid = m.stream_id
                keys = [self._key(sid), self._seq_key(sid), self._set_key, self._index_key]
                fence = self._fences.get(sid)
                args: list[str | int] = [sid, encode(m.data), self.config.retention, self._published.get(sid, 0) + 1,
                                         fence[1] if fence is not None else "", self.replica_id]
                if fence is not None:
                    keys += [fence[0], fence[2]]
                    args += [fence[3], fence[4]]
                await self._append(keys=keys, args=args, client=pipe)
            results = await pipe.execute(raise_on_error=False)
        for r in results:
            if isinstance(r, _LINK_DOWN):  # the link broke: send the batch again (a refusal is per message)
                raise r
        return results

    # -- the reader -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        attempt = 0
        while True:
            try:
                await self._sync()
                self._recovered("read")
                attempt = 0
                while True:
                    keys: dict[Any, Any] = {self._index_key: self._index_pos}
                    keys.update((self._key(sid), f"{seq}-0") for sid, seq in self._read_pos.items())
                    async with self._op(self.config.block):
                        response = await self._redis.xread(keys, count=self.config.read_count,
                                                           block=max(1, int(self.config.block * 1000)))
                    self._recovered("read")
                    for key, entries in response or ():
                        self._on_entries(key, entries)
            except _UNREACHABLE as exc:
                self._failed("read", exc)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))

    async def _sync(self) -> None:
        """On (re)connecting: where the index is, and every stream id in the set (a stream new to
        this replica starts with its last `history` messages, as a new subscriber would)."""
        if self._index_pos is None:
            async with self._op():
                last = await self._redis.xrevrange(self._index_key, count=1)
            self._index_pos = last[0][0] if last else "0-0"
        async with self._op():
            members = await self._redis.smembers(self._set_key)
        for raw in sorted(members):
            sid = self._stream_id(raw)
            if sid is not None and sid not in self._read_pos:
                await self._follow_recent(sid)

    async def _follow_recent(self, sid: str) -> None:
        if not self._room_for(sid):
            return
        async with self._op():
            entries = await self._redis.xrevrange(self._key(sid), count=max(1, self.hub.history))
        self._read_pos[sid] = 0
        if not entries:
            return
        if self.hub.history == 0:
            self._read_pos[sid] = _seq_of(entries[0][0]) or 0
            return
        self._deliver(sid, list(reversed(entries)))

    def _on_entries(self, key: Any, entries: list) -> None:
        name = key.decode("utf-8", "replace")
        if name == self._index_key:
            for entry_id, fields in entries:
                self._index_pos = entry_id
                sid = self._stream_id(fields.get(b"id", b""))
                if sid is not None and sid not in self._read_pos and self._room_for(sid):
                    self._read_pos[sid] = 0  # new while we watch: read it from the start
            return
        sid = name[len(self._key("")):]
        if sid in self._read_pos:
            self._deliver(sid, entries)

    def _deliver(self, sid: str, entries: list) -> None:
        pos = self._read_pos.get(sid, 0)
        for entry_id, fields in entries:
            seq = _seq_of(entry_id)
            if seq is None or seq <= pos:
                continue  # read twice (a resync) or not one of ours
            if pos and seq > pos + 1:
                # trimmed (past retention) while this replica could not read, or lost by Redis:
                # this replica's live clients miss them; a client resuming with `since` gets a `gap`
                self._count("gap")
                self._warn_once(f"gap:{sid}", "bus messages missed by this replica (trimmed or lost)",
                                stream=sid, from_seq=pos + 1, to_seq=seq - 1)
            pos = seq
            m = self._message(sid, entry_id, fields)
            if m is not None:
                self.hub.deliver(m)
        self._read_pos[sid] = pos
        self._progress.set()

    # -- entries from Redis: anyone with write access to it could have written them -------
    def _message(self, sid: str, entry_id: Any, fields: dict) -> HubMessage | None:
        seq = _seq_of(entry_id)
        raw = fields.get(b"m")
        if seq is None or not isinstance(raw, bytes) or len(raw) > _MAX_ENTRY_BYTES:
            self._bad(sid, "not a message entry")
            return None
        try:
            data = json.loads(raw)
            payload, stable = _payload(sid, data)
        except (ValueError, TypeError, KeyError) as exc:
            self._bad(sid, str(exc)[:200])
            return None
        origin = fields.get(b"r")
        shown = data.get("shown", True)  # the stabilizer's flag (older entries have none: shown)
        if not isinstance(shown, bool):
            self._bad(sid, "shown must be a boolean")
            return None
        return HubMessage(payload, 0, stable, bus_seq=seq, shown=shown,
                          origin=origin.decode("utf-8", "replace")[:64] if isinstance(origin, bytes) else None)

    def _bad(self, sid: str, why: str) -> None:
        self._count("bad_entry")
        self._warn_once(f"bad:{sid}", "bus entry ignored: not a valid message", stream=sid, error=why)

    def _stream_id(self, raw: Any) -> str | None:
        sid = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if STREAM_ID.match(sid):
            return sid
        self._count("bad_entry")
        self._warn_once("bad-id", "bus names a stream id that is not valid (ignored)", stream=sid[:80])
        return None

    def _room_for(self, sid: str) -> bool:
        if len(self._read_pos) < self.config.max_streams:
            return True
        self._warn_once("max_streams", "bus has more streams than max_streams: ignoring the rest",
                        max_streams=self.config.max_streams, stream=sid)
        return False

    # -- state, logs, metrics ----------------------------------------------------------------
    def _failed(self, side: str, exc: BaseException) -> None:
        self._count(side)
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        was_up = not self._down
        self._down[side] = why
        if was_up:
            log.error("bus unreachable: retrying", extra={"bus": redacted(self.config.url), "error": why})
            self._set_gauge()

    def _recovered(self, side: str) -> None:
        if side not in self._down:
            return
        del self._down[side]
        if not self._down:
            first = not self._ever_connected
            self._ever_connected = True
            log.warning("bus connected" if first else "bus reconnected",
                        extra={"bus": redacted(self.config.url), "buffered": len(self._outbox)})
            self._set_gauge()

    def _count(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.bus_errors.labels(op=op).inc()

    def _warn_once(self, kind: str, message: str, **extra: Any) -> None:
        if kind in self._warned or len(self._warned) > 1000:
            return
        self._warned.add(kind)
        log.warning(message, extra=extra)

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.bus_connected.set(0 if self._down else 1)

    def _set_buffered(self) -> None:
        if self.metrics is not None:
            self.metrics.bus_buffered.set(len(self._outbox))

    def _backoff(self, attempt: int) -> float:
        # jitter: replicas that lost Redis together do not all come back in the same millisecond
        return min(_BACKOFF_FIRST * 2 ** (attempt - 1), self.config.reconnect_max) * random.uniform(0.8, 1.0)

    def _flushed(self) -> bool:
        return not self._outbox and all(self._read_pos.get(s, 0) >= seq for s, seq in self._published.items())

    def _op(self, waits: float = 0.0) -> Any:
        """The time limit of one Redis call (`waits`: how long it blocks by design). A partitioned
        Redis does not answer; past this the call raises TimeoutError (an OSError: reconnect)."""
        return asyncio.timeout(waits + self.config.connect_timeout + 1.0)

    def _key(self, sid: str) -> str:
        return f"{self.config.key_prefix}s:{sid}"

    def _seq_key(self, sid: str) -> str:
        return f"{self.config.key_prefix}seq:{sid}"


def _seq_of(entry_id: Any) -> int | None:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, part = text.partition("-")
    return int(ms) if ms.isdigit() and part == "0" else None


def _num(data: dict, key: str) -> float:
    """A finite number, or NaN for null (the wire writes non-finite numbers as null)."""
    value = data[key]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number")
    return float(value)


def _str(data: dict, key: str, *, optional: bool = False) -> str | None:
    value = data[key]
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise TypeError(f"{key} must be a string of at most {_MAX_TEXT} characters")
    return value


_EVENTS: dict[str, type] = {cls.kind: cls for cls in (Answer, WatchEvent, Chapter, SpeechCue)}


def _event(cls: type, data: dict) -> StreamEvent:
    """An event record from a bus entry, every field checked against its declared type."""
    values = {}
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        if kind == "int":
            value = data[f.name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name} must be an integer")
        elif kind == "float":
            value = _num(data, f.name)
        else:  # "str" or "str | None"
            value = _str(data, f.name, optional=kind.endswith("None"))
        values[f.name] = value
    return cls(**values)


def _payload(sid: str, data: Any) -> tuple[Caption | StateChange | StreamEvent, bool]:
    """The typed payload of a protocol message read from the bus; raises for anything else."""
    if not isinstance(data, dict) or data.get("stream_id") != sid:
        raise ValueError("not a message of this stream")
    kind = data.get("type")
    if kind == "caption":
        index, stable = data["index"], data["stable"]
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(stable, bool):
            raise TypeError("index must be an integer and stable a boolean")
        caption = Caption(sid, index, _num(data, "start"), _num(data, "end"), _str(data, "text") or "",
                          _num(data, "confidence"), _str(data, "model") or "",
                          _num(data, "capture_time"), _num(data, "emit_time"))
        return caption, stable
    if kind == "state":
        return StateChange(sid, _str(data, "state") or "", _str(data, "detail", optional=True), _num(data, "time")), False
    if isinstance(kind, str) and kind in _EVENTS:
        event = _event(_EVENTS[kind], data)
        if isinstance(event, Chapter) and not (event.index >= 0 and event.start <= event.end  # NaN fails too
                                               and math.isfinite(event.start) and math.isfinite(event.end)):
            raise ValueError("a chapter needs an index >= 0 and finite times, start <= end")
        return event, False
    raise ValueError(f"unknown message type {str(kind)[:40]!r}")

