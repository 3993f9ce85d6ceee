"""Stream ownership with failover: which replica captions which stream (`[bus]`, `ownership = true`).

With a bus, the stream set lives in Redis (cluster/registry.py) and each stream is captioned by
exactly one replica: the one holding its lease (publish/lease.py), whose token the bus's append
script checks inside Redis before every message (so a paused or partitioned ex-owner publishes
nothing once its lease is gone).

One loop per replica, woken by registry events or every `tick` (lease_ttl / 5, at most 1 s):

1. heartbeat: `{p}replicas` (a ZSET, replica -> expiry) says who is alive, for the fair share;
2. streams removed from the registry are stopped here and their leases released;
3. free streams (no lease key) are taken, up to the fair share ceil(streams / live replicas) and
   never past `max_owned_streams`; a stream still free at the next tick is taken by anyone with
   room (a replica at its share must not leave a stream uncaptioned);
4. taking a stream: lease -> `bus.fence()` -> the stream's last caption on the bus -> the stream
   starts with the next window index, its media timeline after that caption's end plus the wall time
   since (StreamResume) -> the source policy for anything not from this replica's own config file
   -> the `on_take` hooks (the chapter sink reads the old owner's chapters back) -> started;
5. `{p}status` (a HASH, stream -> JSON) gets each owned stream's state, for `GET /streams` on any
   replica.

A lost lease (renewal found another owner, or Redis was unreachable for a whole TTL) stops the
stream here at once (publishing is refused anyway). Graceful shutdown: the daemon drains (its last
captions are appended while the leases are still held), then `close()` releases every lease and
says so on the registry's events, so the others take the streams at once.

WHIP streams belong to the replica that holds the peer connection: `claim_whip()` takes the lease
(a publish for an id owned elsewhere is refused) but they are never registered, so they do not
fail over (a load balancer needs session affinity for `/whip`).

Requests that need the owner (a thumbnail, the live details of a stream) go to it over Redis
(cluster/requests.py): the asker's replica sends, the owner answers to the asker only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from streamer.cluster.registry import Origin, RegistryEntry, RegistryFull, StreamRegistry
from streamer.cluster.requests import Handler, OwnerRequests, RequestFailed
from streamer.config import StreamConfig
from streamer.publish.bus import BusConfig, CaptionBus, redacted
from streamer.publish.lease import LeaseManager, StreamLease
from streamer.types import StreamResume

__all__ = ["NotOwner", "Ownership", "RegistryFull", "RequestFailed"]

log = logging.getLogger(__name__)

_UNREACHABLE = (RedisError, OSError)  # OSError: refused sockets, and TimeoutError of our own limits
_STATUS_BYTES = 16 * 1024


class NotOwner(RuntimeError):
    """A WHIP publish for a stream another replica owns (HTTP 409)."""


class Ownership:
    """This replica's part in the cluster. `start()` it after the daemon and the bus; `close()` it
    after the daemon has drained (graceful handover)."""

    def __init__(self, config: BusConfig, daemon: Any, bus: CaptionBus, policy: Any,
                 local_streams: Sequence[StreamConfig] = (), metrics: Any = None) -> None:
        self.config = config
        self.replica_id = config.replica()
        self.daemon = daemon  # pipeline.daemon.Daemon
        self.bus = bus
        self.policy = policy  # security.policy.SourcePolicy: what HTTP-added (or unproven) sources may open
        self.metrics = metrics
        self.tick = min(1.0, config.lease_ttl / 5)
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url, max_connections=24,  # the loop, status, HTTP calls, and requests waiting for replies
            timeout=config.connect_timeout, socket_connect_timeout=config.connect_timeout,
            socket_timeout=None, socket_keepalive=True,  # each call has its own limit (_op), see CaptionBus
            retry=Retry(NoBackoff(), 0), decode_responses=False, protocol=2)
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        p = config.key_prefix
        self._replicas_key, self._status_key = f"{p}replicas", f"{p}status"
        self.registry = StreamRegistry(self._redis, p, config.max_streams)
        self.leases = LeaseManager(config, self.replica_id, config.lease_ttl, on_lost=self._on_lost,
                                   metrics=metrics, max_leases=max(1, config.max_owned_streams))
        self.requests = OwnerRequests(self._redis, p, self.replica_id, config.request_timeout, self._op)
        self._local = {c.id: c for c in local_streams}
        self._owned: dict[str, StreamLease] = {}  # pulled streams this replica runs (or holds, refused)
        self._refused: dict[str, str] = {}  # owned streams that could not start: why (said in status)
        self._whip: dict[str, StreamLease] = {}
        self._seen_free: set[str] = set()
        self._live_replicas = 1
        self._problem: str | None = "not connected yet"
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()  # taking and dropping streams (the loop, lost leases, close)
        self._epoch: bytes | None = None  # the registry's epoch when we last registered (see _ensure_registry)
        self._entries: dict[str, RegistryEntry] = {}  # the entries of the streams we own
        self._on_take: list[Callable[[str, float], None]] = []
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------
    def start(self, spawn: Callable[[str, Callable[[], Any]], Any]) -> None:
        spawn("ownership", self._loop)

    def problem(self) -> str | None:
        """Why this replica cannot take part now (for /readyz), or None."""
        return f"ownership: {self._problem}" if self._problem else None

    def handle(self, kind: str, handler: Handler, *, payload: bool = False) -> None:
        """Answer requests of `kind` for streams owned here: `handler(stream_id)`, or with `payload`
        `handler(stream_id, payload)` (the request's bytes, bounded: cluster/requests.py)."""
        self.requests.handlers[kind] = handler
        if payload:
            self.requests.payload_kinds.add(kind)

    def on_take(self, hook: Callable[[str, float], None]) -> None:
        """Call `hook(stream_id, registered_at)` each time this replica takes a stream, just before it
        starts here (the chapter sink continues the stream's chapters from the bus). Must not block;
        one that raises is logged and counted, and the stream starts anyway."""
        self._on_take.append(hook)

    async def close(self) -> None:
        """After the daemon drained: release every lease (the others take the streams at once),
        leave the replica set, close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        owned = list(self._owned) + list(self._whip)
        await self.leases.close()
        with contextlib.suppress(*_UNREACHABLE):
            async with self._op(), self._redis.pipeline(transaction=False) as pipe:
                for sid in owned:
                    pipe.hdel(self._status_key, sid)
                    pipe.xadd(self.registry.events_key, {"op": "released", "id": sid}, maxlen=1000,
                              approximate=True)
                pipe.zrem(self._replicas_key, self.replica_id)
                await pipe.execute()
        if owned:
            log.warning("streams handed over", extra={"streams": len(owned), "replica": self.replica_id})
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # -- what the HTTP API asks -------------------------------------------------------
    def owns(self, stream_id: str) -> bool:
        return stream_id in self._owned or stream_id in self._whip

    async def add_stream(self, config: StreamConfig) -> None:
        """Register a stream from `POST /streams` (already checked by the source policy here; its
        owner checks it again). Raises StreamExists (from the daemon module), RegistryFull, redis errors."""
        from streamer.pipeline.daemon import StreamExists

        if config.id in self.daemon.streams:  # a WHIP stream of this replica
            raise StreamExists(f"stream {config.id!r} already exists")
        async with self._op():
            added = await self.registry.add(config, "http", self.replica_id)
        if not added:
            raise StreamExists(f"stream {config.id!r} already exists")

    async def remove_stream(self, stream_id: str) -> bool:
        """Unregister a stream (its owner stops it); False when the registry has no such stream."""
        async with self._op():
            return await self.registry.remove(stream_id)

    async def describe_all(self) -> list[dict[str, Any]]:
        """Every stream of the cluster: the registry, with each owner's last status."""
        async with self._op():
            entries = await self.registry.entries()
            status = await self._redis.hgetall(self._status_key)
        described: dict[str, dict[str, Any]] = {}
        for raw_sid, raw in status.items():
            sid = raw_sid.decode("utf-8", "replace")
            item = _status(raw)
            if item is not None and (sid in entries or item.get("kind") == "whip"):
                described[sid] = item
        for sid, entry in entries.items():
            if sid not in described:
                described[sid] = self._pending(entry)
            described[sid]["origin"] = entry.origin
        for sid in list(self._owned) + list(self._whip):  # our own: fresher than the status hash
            mine = self._status_of(sid)
            if mine is not None:
                described[sid] = {**described.get(sid, {}), **mine}
        return [described[sid] for sid in sorted(described)]

    async def describe(self, stream_id: str) -> dict[str, Any] | None:
        """One stream: live details from its owner (a request), else what the registry knows; None: no such stream."""
        async with self._op():
            entries = await self.registry.entries()
        entry = entries.get(stream_id)
        origin = {"origin": entry.origin} if entry else {}
        mine = self._status_of(stream_id)
        if mine is not None:
            return {**mine, **origin}
        owner = await self.owner_of(stream_id)
        if owner is not None and owner != self.replica_id:
            try:
                item = _status(await self.requests.ask(owner, "describe", stream_id))
            except RequestFailed:  # it did not answer (busy, gone): its last status says what it can
                async with self._op():
                    item = _status(await self._redis.hget(self._status_key, stream_id))
            if item is not None:
                return {**item, "owner": owner, **origin}
        if entry is None:
            return None
        return {**self._pending(entry), **origin, "owner": owner}

    def _status_of(self, stream_id: str) -> dict[str, Any] | None:
        """What this replica says of a stream it owns: its runtime's details, or why it could not start it."""
        rt = self.daemon.streams.get(stream_id)
        if rt is not None and self.owns(stream_id):
            return {**rt.describe(), "owner": self.replica_id}
        if stream_id in self._refused:
            return {"id": stream_id, "state": "failed", "detail": self._refused[stream_id], "owner": self.replica_id}
        return None

    async def owner_of(self, stream_id: str) -> str | None:
        async with self._op():
            raw = await self._redis.get(self.leases.key(stream_id))
        if not raw:
            return None
        replica, _, _ = raw.decode("utf-8", "replace").rpartition(":")
        return replica or None

    async def ask_owner(self, stream_id: str, kind: str, payload: bytes | None = None) -> bytes:
        """A request answered by the stream's owner (here if it is this replica's), with an optional
        small `payload` for kinds that take one. Raises RequestFailed (status 404 no such
        stream/owner, 413 payload too large, 504 no answer in time)."""
        if self.owns(stream_id):
            return await self.requests.answer_locally(kind, stream_id, payload)
        owner = await self.owner_of(stream_id)
        if owner is None:
            raise RequestFailed(404, "no_owner", f"no replica captions stream {stream_id!r} now")
        return await self.requests.ask(owner, kind, stream_id, payload)

    async def claim_whip(self, stream_id: str) -> StreamLease:
        """The lease for a WHIP stream published to this replica. Raises NotOwner when another
        replica holds the stream (pulled, or another publisher's), redis errors."""
        lease = self._whip.get(stream_id)
        if lease is not None and lease.held:
            return lease
        async with self._op():
            in_registry = stream_id in await self.registry.entries()
        lease = None if in_registry else await self.leases.acquire(stream_id)
        if lease is None:
            owner = await self.owner_of(stream_id)
            raise NotOwner(f"stream {stream_id!r} is owned by {'replica ' + owner if owner else 'the cluster'}")
        self._whip[stream_id] = lease
        self.bus.fence(stream_id, lease)
        return lease

    async def release_whip(self, stream_id: str) -> None:
        lease = self._whip.pop(stream_id, None)
        if lease is None:
            return
        with contextlib.suppress(*_UNREACHABLE):
            await self.bus.flush(2.0)  # its last state is appended while the lease is ours
            await lease.release()
            async with self._op():
                await self._redis.hdel(self._status_key, stream_id)

    # -- the loop ---------------------------------------------------------------------
    async def _loop(self) -> None:
        attempt = 0
        positions: dict[str, Any] = {}
        while True:
            try:
                if not positions:
                    positions = await self._read_positions()
                await self._tick()
                if self._problem is not None:
                    log.warning("ownership connected" if self._problem == "not connected yet" else "ownership reconnected",
                                extra={"bus": redacted(self.config.url), "replica": self.replica_id})
                self._problem = None
                attempt = 0
                async with self._op(self.tick):
                    response = await self._redis.xread(positions, count=100, block=max(1, int(self.tick * 1000)))
                for key, entries in response or ():
                    positions[key] = entries[-1][0]
                    if key == self.requests.key.encode():
                        for _, fields in entries:
                            self._spawn(self.requests.serve(fields))
            except _UNREACHABLE as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if self._problem is None:
                    log.error("ownership: Redis unreachable, retrying (owned streams go on until their leases "
                              "run out)", extra={"bus": redacted(self.config.url), "error": why})
                self._problem = f"Redis unreachable ({why})"
                self._count("ownership")
                positions = {}
                attempt += 1
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), self.config.reconnect_max) * random.uniform(0.8, 1))

    async def _read_positions(self) -> dict[Any, Any]:
        """Where the registry's events and our requests are now (older ones are not news)."""
        positions: dict[Any, Any] = {}
        for key in (self.registry.events_key, self.requests.key):
            async with self._op():
                last = await self._redis.xrevrange(key, count=1)
            positions[key.encode()] = last[0][0] if last else b"0-0"
        return positions

    async def _tick(self) -> None:
        now_ms = int(time.time() * 1000)
        async with self._op(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._replicas_key, {self.replica_id: now_ms + int(3 * self.config.lease_ttl * 1000)})
            pipe.zremrangebyscore(self._replicas_key, "-inf", now_ms)
            pipe.zcard(self._replicas_key)
            _, _, live = await pipe.execute()
        self._live_replicas = max(1, int(live))
        await self._ensure_registry()
        async with self._op():
            entries = await self.registry.entries()
        async with self._lock:
            for sid in [s for s in self._owned if s not in entries]:
                await self._drop(sid, "removed", release=True)
            for sid in [s for s in self._whip if s not in self.daemon.streams]:  # its session ended
                await self.release_whip(sid)
            await self._take_free(entries)
        await self._write_status()

    async def _ensure_registry(self) -> None:
        """Register our config file's streams (never over an entry already there), at the start and
        again whenever the registry's epoch changed: a Redis that lost its data (restarted without
        persistence) forgot the stream set, and each replica puts back what it knows (its config
        streams and the streams it owns), so that nothing is stopped for having been forgotten."""
        async with self._op():
            epoch = await self._redis.get(self.registry.epoch_key)
        if epoch is not None and epoch == self._epoch:
            return
        if self._epoch is not None:
            log.warning("the stream set in Redis was lost (Redis restarted without its data?): registering again "
                        "what this replica knows", extra={"owned": len(self._entries), "config": len(self._local)})
        again: list[tuple[StreamConfig, Origin]] = [(c, "config") for c in self._local.values()]
        again += [(e.config, e.origin) for sid, e in self._entries.items() if sid in self._owned]
        for config, origin in again:
            try:
                async with self._op():
                    await self.registry.add(config, origin, self.replica_id)
            except RegistryFull as exc:
                log.error("stream not registered", extra={"stream": config.id, "error": str(exc)})
        async with self._op():
            await self._redis.set(self.registry.epoch_key, secrets.token_hex(8), nx=True)
            self._epoch = await self._redis.get(self.registry.epoch_key)

    async def _take_free(self, entries: dict[str, RegistryEntry]) -> None:
        room = self.config.max_owned_streams - len(self._owned) - len(self._whip)
        candidates = [sid for sid in entries if sid not in self._owned and sid not in self.daemon.streams]
        if room <= 0 or not candidates or self._closed:
            self._seen_free = set()
            return
        async with self._op(), self._redis.pipeline(transaction=False) as pipe:
            for sid in candidates:
                pipe.exists(self.leases.key(sid))
            held = await pipe.execute()
        free = [sid for sid, h in zip(candidates, held) if not int(h)]
        # Each replica walks the free streams in its own order, so that replicas starting together
        # do not all race for the same stream first.
        free.sort(key=lambda sid: hashlib.blake2s(f"{self.replica_id}/{sid}".encode(), digest_size=8).digest())
        share = math.ceil(len(entries) / self._live_replicas)
        for sid in free:
            owned = len(self._owned) + len(self._whip)
            if owned >= self.config.max_owned_streams:
                break
            if owned >= share and sid not in self._seen_free:
                continue  # at our share: the others first; still free at the next tick, anyone takes it
            lease = await self.leases.acquire(sid)
            if lease is not None:
                await self._take(entries[sid], lease)
        self._seen_free = {sid for sid in free if sid not in self._owned}

    async def _take(self, entry: RegistryEntry, lease: StreamLease) -> None:
        sid = entry.config.id
        try:
            last = await self.bus.last_caption(sid)
        except _UNREACHABLE:
            await lease.release()  # not started: let the next look (here or elsewhere) take it whole
            raise
        self._owned[sid] = lease
        self._entries[sid] = entry
        self.bus.fence(sid, lease)
        resume = StreamResume.after(last, time.time()) if last is not None else None
        from streamer.security.policy import SourceRefused

        try:
            checked = None
            if self._local.get(sid) != entry.config:  # not this replica's own config: the policy decides
                checked = await asyncio.get_running_loop().run_in_executor(None, self.policy.check, entry.config.url)
            for hook in self._on_take:
                try:
                    hook(sid, entry.added_at)
                except Exception:
                    self._count("take_hook")
                    log.exception("stream take hook failed", extra={"stream": sid})
            await self.daemon.add_stream(entry.config, checked, resume=resume)
        except (SourceRefused, ValueError) as exc:  # SourceSpecError, AtCapacity, StreamExists are ValueErrors
            # Held, not released: another replica would refuse it the same way, over and over.
            why = f"{type(exc).__name__}: {exc}"
            self._refused[sid] = why
            self._count("stream_refused")
            log.error("stream not started by its owner", extra={"stream": sid, "origin": entry.origin, "error": why})
            self.daemon.hub.publish_state(sid, "failed", why)
            return
        log.warning("stream taken", extra={"stream": sid, "token": lease.token, "replica": self.replica_id,
                                        "next_index": resume.next_index if resume else 0,
                                        "media_after": round(resume.media_after, 3) if resume else None})

    async def _drop(self, sid: str, detail: str, *, release: bool) -> None:
        lease = self._owned.pop(sid, None)
        self._entries.pop(sid, None)
        self._refused.pop(sid, None)
        with contextlib.suppress(KeyError):  # StreamNotFound: it never started (refused)
            await self.daemon.remove_stream(sid, detail)
        if lease is not None and release:
            with contextlib.suppress(*_UNREACHABLE):
                await self.bus.flush(2.0)  # its last `stopped` is appended while the lease is ours
            await lease.release()
        with contextlib.suppress(*_UNREACHABLE):
            async with self._op():
                await self._redis.hdel(self._status_key, sid)

    def _on_lost(self, lease: StreamLease, why: str) -> None:
        """The lease manager lost a lease: stop the stream here (its messages are refused anyway)."""
        sid = lease.stream_id
        if self._whip.get(sid) is lease:
            self._whip.pop(sid, None)
            self._spawn(self._stop_whip(sid, f"lease lost: {why}"))
        elif self._owned.get(sid) is lease:
            self._spawn(self._drop_locked(sid, f"lease lost: {why}"))

    async def _drop_locked(self, sid: str, detail: str) -> None:
        async with self._lock:
            if sid in self._owned:
                await self._drop(sid, detail, release=False)

    async def _stop_whip(self, sid: str, detail: str) -> None:
        with contextlib.suppress(KeyError):
            await self.daemon.remove_whip_session(sid, None, detail)

    async def _write_status(self) -> None:
        items = {}
        for sid in list(self._owned) + list(self._whip):
            status = self._status_of(sid)
            if status is not None:
                items[sid] = json.dumps({**status, "updated": time.time()})
        if items:
            async with self._op():
                await self._redis.hset(self._status_key, mapping=items)

    # -- helpers ----------------------------------------------------------------------
    def _pending(self, entry: RegistryEntry) -> dict[str, Any]:
        from streamer.security.redact import redact_url

        return {**entry.config.model_dump(), "url": redact_url(entry.config.url), "state": "pending",
                "detail": "waiting for a replica to take it", "owner": None}

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._count("ownership_task")
            log.error("ownership task failed", exc_info=task.exception())

    def _op(self, waits: float = 0.0) -> Any:
        return asyncio.timeout(waits + self.config.connect_timeout + 1.0)

    def _count(self, op: str) -> None:
        """Failures are counted beside the bus's (`streamer_bus_errors_total{op=...}`)."""
        if self.metrics is not None:
            self.metrics.bus_errors.labels(op=op).inc()


def _status(raw: Any) -> dict[str, Any] | None:
    """A status entry from Redis (hostile: any writer could have put it there)."""
    if not isinstance(raw, bytes) or len(raw) > _STATUS_BYTES:
        return None
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    return item if isinstance(item, dict) else None
