"""Stream ownership on the bus: one lease per stream, with a fencing token (issue 15).

Each stream is captioned by exactly one replica: the one holding its lease. Keys, under the
bus's `key_prefix` (stream ids are validated, so they are safe in key names):

- `{p}lease:{id}`: "<replica_id>:<token>", set only if absent, with an expiry (`ttl`). The owner
  renews it every ttl/3 (compare-and-PEXPIRE: only while the value is still exactly ours) and
  deletes it on release (compare-and-DEL), so a graceful shutdown hands the stream over at once.
- `{p}fence:{id}`: the stream's fencing counter, INCR'd by every acquisition: each owner's token
  is greater than every earlier owner's. (A Redis that lost its data restarts it; the manager
  passes the highest token it has seen as a floor, and the docs recommend AOF.)

A renewal is not what keeps an ex-owner quiet: a paused or partitioned process cannot know its
lease is gone. The bus's append script (bus.APPEND_LUA) compares the lease with the publisher's
expected value inside Redis before each XADD, and appends nothing when they differ (FENCED):
`CaptionBus.fence(stream_id, lease)`.

A lease is lost when a renewal finds another value or none (someone else owns the stream, or
Redis forgot it), or when no renewal succeeded for `ttl` (Redis unreachable: the key may have
expired, so we must assume it did). The loss is logged once, counted
(`streamer_bus_errors_total{op="lease_lost"}`) and reported once through `on_lost`; the owner must
then stop captioning the stream (publishing is refused anyway).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from streamer.config import STREAM_ID
from streamer.publish.bus import RESTORE_LUA, BusConfig, redacted

__all__ = ["LeaseManager", "StreamLease"]

log = logging.getLogger(__name__)

REPLICA_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: "$" would let a trailing newline through

# Take the lease if nobody holds it. KEYS: 1 the lease, 2 the fencing counter.
# ARGV: 1 replica id, 2 ttl in ms, 3 floor (the highest token this replica has seen).
# Returns the token, or 0 when the lease is held. Atomic: the counter moves only on a success.
ACQUIRE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2])
return token
"""

# KEYS: 1 the lease, 2 the fencing counter. ARGV: 1 our value, 2 ttl in ms, 3 our token.
# 1 when renewed, 0 when not ours (any more). A Redis that lost its data (restarted without
# persistence: the counter, never deleted otherwise, is gone too) gets our lease back, as the
# bus's append script does (bus.RESTORE_LUA): the holder it forgot stands, and a replica that
# acquired first since then has made the counter exist again, so this one is refused.
RENEW_LUA = RESTORE_LUA + """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if restore(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 1 end
return 0
"""

# KEYS: 1 the lease. ARGV: 1 our value. 1 when deleted, 0 when it was not ours.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

OnLost = Callable[["StreamLease", str], None]


class StreamLease:
    """This replica's lease on one stream. `key` and `value` are what the bus's append script
    checks (`CaptionBus.fence`); they stay set after a loss, so a stale publisher stays fenced."""

    def __init__(self, manager: LeaseManager, stream_id: str, key: str, token: int, acquired_at: float) -> None:
        self.stream_id = stream_id
        self.key = key
        self.token = token
        self.value = f"{manager.replica_id}:{token}"
        self.fence_key = manager.fence_key(stream_id)  # the stream's fencing counter
        self.ttl_ms = manager.ttl_ms
        self.renewed_at = acquired_at  # loop time the last successful renewal was *sent* (expiry >= this + ttl)
        self.lost: str | None = None  # why it was lost; None while held
        self.released = False
        self._manager = manager
        self._task: asyncio.Task | None = None

    @property
    def held(self) -> bool:
        return self.lost is None and not self.released

    @property
    def renewer(self) -> asyncio.Task | None:
        """The renewal task (cancelling it without `release()` is how a paused owner looks)."""
        return self._task

    async def renew(self) -> bool:
        """Renew once; False (and the loss reported) when the lease is no longer ours.
        Raises redis errors (the renewal loop retries them until the lease's time is up)."""
        if not self.held:
            return False
        m = self._manager
        sent = asyncio.get_running_loop().time()
        async with m._op(self):
            ok = await m._renew(keys=[self.key, self.fence_key], args=[self.value, m.ttl_ms, self.token])
        if int(ok) == 1:
            self.renewed_at = sent
            return True
        m._lose(self, "taken by another replica" if await self._holder() else "expired")
        return False

    async def is_ours(self) -> bool:
        """Whether Redis holds this lease with our value now (a loss found here is reported too)."""
        if not self.held:
            return False
        async with self._manager._op(self):
            current = await self._manager._redis.get(self.key)
        if current == self.value.encode():
            return True
        self._manager._lose(self, "taken by another replica" if current else "expired")
        return False

    async def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours, so another replica takes the
        stream at once. Idempotent; a Redis that does not answer is logged (the lease then expires)."""
        await self._manager.release(self)

    async def _holder(self) -> str | None:
        try:
            async with self._manager._op(self):
                raw = await self._manager._redis.get(self.key)
        except (RedisError, OSError):
            return None
        return raw.decode("utf-8", "replace")[:200] if raw else None

    def __repr__(self) -> str:
        return f"StreamLease({self.stream_id!r}, {self.value!r}, held={self.held})"


class LeaseManager:
    """One replica's leases, on its own small connection pool (renewals never wait behind the bus's
    blocking reads). `close()` it on shutdown: it releases every lease it holds."""

    def __init__(
        self,
        config: BusConfig,
        replica_id: str,
        ttl: float = 10.0,
        *,
        on_lost: OnLost | None = None,
        metrics: Any = None,
        max_leases: int = 10_000,
    ) -> None:
        if not REPLICA_ID.fullmatch(replica_id):
            raise ValueError("replica_id must be 1-64 of A-Z a-z 0-9 _ . -")
        if not 0.1 <= ttl <= 3600:
            raise ValueError("lease ttl must be 0.1-3600 s")
        self.config = config
        self.replica_id = replica_id
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.max_leases = max_leases
        self.metrics = metrics  # DaemonMetrics, or None
        self._on_lost = on_lost
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url, max_connections=8, timeout=config.connect_timeout,
            socket_connect_timeout=config.connect_timeout,
            socket_timeout=None,  # each call has its own time limit (_op); see CaptionBus
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),  # a renewal is retried by its loop, against the lease's deadline
            decode_responses=False, protocol=2)
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._acquire = self._redis.register_script(ACQUIRE_LUA)
        self._renew = self._redis.register_script(RENEW_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._leases: dict[str, StreamLease] = {}  # held ones only
        self._floor: dict[str, int] = {}  # stream -> highest token seen here
        self._warned: set[str] = set()
        self._closed = False

    # -- public ----------------------------------------------------------------------
    def lease(self, stream_id: str) -> StreamLease | None:
        """The lease held on `stream_id`, or None."""
        return self._leases.get(stream_id)

    @property
    def held(self) -> list[str]:
        return sorted(self._leases)

    def key(self, stream_id: str) -> str:
        return f"{self.config.key_prefix}lease:{stream_id}"

    def fence_key(self, stream_id: str) -> str:
        return f"{self.config.key_prefix}fence:{stream_id}"

    async def acquire(self, stream_id: str) -> StreamLease | None:
        """One attempt: the lease (renewed from now on) if nobody holds it, else None.
        Raises redis errors; ValueError for an invalid stream id."""
        if self._closed:
            raise RuntimeError("lease manager closed")
        if not STREAM_ID.match(stream_id):
            raise ValueError("not a valid stream id")
        if stream_id in self._leases:
            return self._leases[stream_id]
        if len(self._leases) >= self.max_leases:
            self._warn_once("max", "lease limit reached: not taking more streams", max_leases=self.max_leases)
            return None
        loop = asyncio.get_running_loop()
        sent = loop.time()
        async with asyncio.timeout(self.config.connect_timeout + 1.0):
            token = int(await self._acquire(keys=[self.key(stream_id), self.fence_key(stream_id)],
                                            args=[self.replica_id, self.ttl_ms, self._floor.get(stream_id, 0)]))
        if token <= 0:
            return None
        self._floor[stream_id] = max(self._floor.get(stream_id, 0), token)
        lease = StreamLease(self, stream_id, self.key(stream_id), token, sent)
        self._leases[stream_id] = lease
        lease._task = asyncio.create_task(self._renew_loop(lease), name=f"lease-{stream_id}")
        log.info("stream lease taken", extra={"stream": stream_id, "token": token, "replica": self.replica_id})
        return lease

    async def acquire_within(self, stream_id: str, timeout: float) -> StreamLease | None:
        """Try until the lease is ours or `timeout` passes. Between attempts it waits for the
        holder's expiry (PTTL; there is no event for it) but at most ttl/10."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            lease = await self.acquire(stream_id)
            if lease is not None:
                return lease
            left = deadline - loop.time()
            if left <= 0:
                return None
            async with asyncio.timeout(self.config.connect_timeout + 1.0):
                pttl = int(await self._redis.pttl(self.key(stream_id)))
            wait = self.ttl / 10 if pttl < 0 else min(pttl / 1000, self.ttl / 10)
            await asyncio.sleep(max(0.005, min(wait, left)))

    async def release(self, lease: StreamLease) -> None:
        if lease.released:
            return
        lease.released = True
        if self._leases.get(lease.stream_id) is lease:
            del self._leases[lease.stream_id]
        await _cancel(lease._task)
        if lease.lost is not None:
            return  # not ours any more: deleting would free another owner's lease
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1.0):
                await self._release(keys=[lease.key], args=[lease.value])
        except (RedisError, OSError) as exc:
            log.warning("stream lease not released (it expires by itself)",
                        extra={"stream": lease.stream_id, "ttl": self.ttl, "bus": redacted(self.config.url),
                               "error": f"{type(exc).__name__}: {exc}"})
            return
        log.info("stream lease released", extra={"stream": lease.stream_id, "token": lease.token})

    async def close(self) -> None:
        """Release every lease (graceful handover), then close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        leases = list(self._leases.values())
        await asyncio.gather(*(_cancel(lease._task) for lease in leases))
        await asyncio.gather(*(self.release(lease) for lease in leases))
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # -- renewal ------------------------------------------------------------------------
    async def _renew_loop(self, lease: StreamLease) -> None:
        try:
            await self._renewing(lease)
        except Exception as exc:  # a bug here must not leave an owner that believes it still owns
            log.exception("stream lease renewal crashed", extra={"stream": lease.stream_id})
            self._lose(lease, f"renewal crashed: {type(exc).__name__}")

    async def _renewing(self, lease: StreamLease) -> None:
        loop = asyncio.get_running_loop()
        period = self.ttl / 3
        next_at = lease.renewed_at + period
        failing = False
        while lease.held:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() >= lease.renewed_at + self.ttl:
                self._lose(lease, "not renewed in time (Redis unreachable)")
                return
            try:
                if not await lease.renew():
                    return
            except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                self._count("lease_renew")
                if not failing:
                    failing = True
                    log.warning("stream lease renewal failed: retrying until it expires",
                                extra={"stream": lease.stream_id, "bus": redacted(self.config.url),
                                       "error": f"{type(exc).__name__}: {exc}"})
                next_at = loop.time() + period / 4  # a few more tries before the lease's time is up
                continue
            failing = False
            next_at = lease.renewed_at + period

    def _lose(self, lease: StreamLease, why: str) -> None:
        if lease.lost is not None or lease.released:
            return
        lease.lost = why
        if self._leases.get(lease.stream_id) is lease:
            del self._leases[lease.stream_id]
        self._count("lease_lost")
        log.warning("stream lease lost: this replica must stop captioning the stream",
                    extra={"stream": lease.stream_id, "token": lease.token, "reason": why})
        if self._on_lost is not None:
            try:
                self._on_lost(lease, why)
            except Exception:  # the owner's bug must not end the renewal of other streams
                log.exception("lease-lost callback failed", extra={"stream": lease.stream_id})

    def _op(self, lease: StreamLease) -> Any:
        """A renewal's time limit: a call still unanswered when the lease may have expired is useless."""
        left = lease.renewed_at + self.ttl - asyncio.get_running_loop().time()
        return asyncio.timeout(max(0.01, min(left, self.config.connect_timeout + 1.0)))

    def _count(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.bus_errors.labels(op=op).inc()

    def _warn_once(self, kind: str, message: str, **extra: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, extra=extra)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task.done() or task is asyncio.current_task():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise  # we are being cancelled ourselves
    except Exception:  # _renew_loop catches its own errors; this would be a bug
        log.exception("stream lease task ended with an error")
