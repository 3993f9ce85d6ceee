"""The stream set in Redis, shared by every replica (`[bus]` with `ownership = true`).

Keys, under the bus's `key_prefix`:

- `{p}registry`: a HASH, stream id -> JSON `{"config": {...}, "origin": "config" | "http",
  "by": replica, "at": time}`. Streams from a replica's config file are registered at its start
  (never over an existing entry); streams added through any replica's `POST /streams` are added
  here, and removed by any replica's `DELETE /streams/{id}`.
- `{p}registry:events`: a short Redis Stream, one entry per change (added, removed, released), that
  wakes every replica's ownership loop at once instead of at its next tick.

Everything read back is hostile until checked: anyone with write access to Redis could have
written it. An entry is parsed through the same `StreamConfig` schema as a request body, and its
`origin` is only a claim: the owner trusts a "config" entry only when its own config file has the
same stream (cluster/ownership.py); anything else goes through the source policy like an HTTP
request, so write access to Redis alone cannot add a `lavfi:` stream or a host file.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from streamer.config import STREAM_ID, ConfigError, StreamConfig

__all__ = ["RegistryEntry", "RegistryFull", "StreamRegistry"]

log = logging.getLogger(__name__)

Origin = Literal["config", "http"]
_MAX_ENTRY_BYTES = 16 * 1024  # a stream's config is far smaller

# KEYS: 1 the registry, 2 its events. ARGV: 1 stream id, 2 entry JSON, 3 the most entries.
# Atomic, so two replicas adding the same id at once cannot both succeed.
ADD_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'EXISTS' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 'FULL' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'op', 'added', 'id', ARGV[1])
return 'OK'
"""

# KEYS: 1 the registry, 2 its events. ARGV: 1 stream id. 1 when removed, 0 when there was none.
REMOVE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'op', 'removed', 'id', ARGV[1])
return 1
"""


class RegistryFull(ValueError):
    """The registry holds the most streams the cluster takes (`[bus] max_streams`)."""


@dataclass(frozen=True)
class RegistryEntry:
    config: StreamConfig
    origin: Origin
    added_by: str
    added_at: float

    def to_json(self) -> str:
        return json.dumps({"config": self.config.model_dump(), "origin": self.origin, "by": self.added_by,
                           "at": self.added_at}, separators=(",", ":"))

    @classmethod
    def from_json(cls, sid: str, raw: bytes) -> RegistryEntry:
        """Raises ValueError for anything that is not an entry of stream `sid`."""
        if len(raw) > _MAX_ENTRY_BYTES:
            raise ValueError("entry too large")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        config = StreamConfig.from_dict(data.get("config"))  # the request schema: ConfigError is a ValueError
        if config.id != sid:
            raise ValueError("config id differs from its key")
        if not config.url:
            raise ValueError("a registered stream needs a url (WHIP streams are never registered)")
        origin = data.get("origin")
        if origin not in ("config", "http"):
            raise ValueError("unknown origin")
        by, at = data.get("by"), data.get("at")
        return cls(config, origin, str(by)[:64] if by is not None else "?",
                   float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0)


class StreamRegistry:
    """The shared stream set, on a redis.asyncio client the caller owns (and times out)."""

    def __init__(self, redis: Any, key_prefix: str, max_entries: int) -> None:
        self._redis = redis
        self.key = f"{key_prefix}registry"
        self.events_key = f"{key_prefix}registry:events"
        self.epoch_key = f"{key_prefix}registry:epoch"  # set once per life of the data (cluster/ownership.py)
        self.max_entries = max_entries
        self._add = redis.register_script(ADD_LUA)
        self._remove = redis.register_script(REMOVE_LUA)
        self._warned: set[str] = set()

    async def add(self, config: StreamConfig, origin: Origin, by: str) -> bool:
        """Register a stream; False when the id is taken. Raises RegistryFull, redis errors."""
        entry = RegistryEntry(config, origin, by, time.time())
        answer = await self._add(keys=[self.key, self.events_key], args=[config.id, entry.to_json(), self.max_entries])
        if answer == b"FULL":
            raise RegistryFull(f"the cluster holds its limit of {self.max_entries} streams")
        return answer == b"OK"

    async def remove(self, stream_id: str) -> bool:
        return int(await self._remove(keys=[self.key, self.events_key], args=[stream_id])) == 1

    async def announce(self, op: str, stream_id: str) -> None:
        """Wake the other replicas' ownership loops (a lease released: take the stream now)."""
        await self._redis.xadd(self.events_key, {"op": op, "id": stream_id}, maxlen=1000, approximate=True)

    async def entries(self) -> dict[str, RegistryEntry]:
        """Every valid entry; a bad one is logged once and left out (nobody captions it)."""
        raw = await self._redis.hgetall(self.key)
        out: dict[str, RegistryEntry] = {}
        for key, value in raw.items():
            sid = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if not STREAM_ID.match(sid):
                self._warn_once(f"id:{sid[:80]}", "stream registry: an entry with an invalid stream id (ignored)",
                                stream=sid[:80])
                continue
            try:
                out[sid] = RegistryEntry.from_json(sid, value)
            except (ValueError, TypeError, ConfigError) as exc:
                self._warn_once(f"bad:{sid}", "stream registry: an entry that is not a valid stream (ignored)",
                                stream=sid, error=str(exc)[:200])
        return out

    def _warn_once(self, kind: str, message: str, **extra: Any) -> None:
        if kind in self._warned or len(self._warned) > 1000:
            return
        self._warned.add(kind)
        log.warning(message, extra=extra)
