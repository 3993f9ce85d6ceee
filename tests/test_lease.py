"""Stream ownership at the bus level (publish/lease.py, the fenced append in publish/bus.py): lease
managers and caption buses of two "replicas" in this process, sharing a real `redis-server` started
here on a free loopback port. A paused owner is simulated by cancelling its renewal task without
releasing (its process would simply stop running it); everything it then publishes goes through the
real fenced Lua script."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from streamer.ops.metrics import DaemonMetrics
from streamer.ops.supervisor import Supervisor
from streamer.publish.bus import APPEND_LUA, FENCED, BusConfig, CaptionBus
from streamer.publish.hub import CaptionHub
from streamer.publish.lease import LeaseManager, StreamLease
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(60)

TTL = 0.5
BOUND = 0.25  # how late after expiry a waiting replica may take over (its retry interval is ttl/10)


@pytest.fixture
async def raw(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def config(server: RedisServer) -> BusConfig:
    return BusConfig(url=server.url, key_prefix="test:", reconnect_max=0.5)


class Losses:
    """An on_lost callback that records its calls and can be awaited."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.event = asyncio.Event()

    def __call__(self, lease: StreamLease, why: str) -> None:
        self.calls.append((lease.stream_id, why))
        self.event.set()


async def pause(lease: StreamLease) -> None:
    """The owner stops running (SIGSTOP, a long GC pause): no renewal, no release."""
    task = lease.renewer
    assert task is not None and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_one_wins_the_other_takes_over_after_expiry_and_the_ex_owner_is_fenced(redis_server, raw):
    loop = asyncio.get_running_loop()
    lost_a, lost_b = Losses(), Losses()
    a = LeaseManager(config(redis_server), "replica-a", TTL, on_lost=lost_a)
    b = LeaseManager(config(redis_server), "replica-b", TTL, on_lost=lost_b)
    try:
        got = await asyncio.gather(a.acquire("cam"), b.acquire("cam"))
        assert sum(lease is not None for lease in got) == 1  # exactly one wins
        owner = next(lease for lease in got if lease is not None)
        owner_mgr, other, other_losses = (a, b, lost_b) if got[0] is not None else (b, a, lost_a)
        assert await owner.is_ours() and owner_mgr.held == ["cam"]

        # Renewals keep it: the other replica cannot take it for several TTLs (polled with a deadline).
        until = loop.time() + 3 * TTL
        while loop.time() < until:
            assert await other.acquire("cam") is None
            await asyncio.sleep(TTL / 10)
        assert owner.held and await owner.is_ours()

        await pause(owner)
        last_renewal = owner.renewed_at  # Redis expires the lease no earlier than this + TTL
        taken = await other.acquire_within("cam", TTL + 2)
        took = loop.time() - last_renewal
        assert taken is not None, "the other replica never took the stream over"
        assert TTL - 0.02 <= took <= TTL + BOUND, took  # not before the expiry, and soon after it
        assert taken.token > owner.token  # fencing tokens grow across owners
        assert await raw.get("test:lease:cam") == taken.value.encode()

        # The ex-owner's append is refused inside Redis, and nothing of it reaches the stream.
        append = raw.register_script(APPEND_LUA)
        keys = ["test:s:cam", "test:seq:cam", "test:streams", "test:index"]
        message = json.dumps({"v": 1, "type": "state", "stream_id": "cam", "state": "live", "detail": "old",
                              "time": 1.0})
        assert await append(keys=[*keys, owner.key], args=["cam", message, 100, 1, owner.value]) == FENCED
        assert await raw.xrange("test:s:cam") == [] and await raw.get("test:seq:cam") is None
        assert await append(keys=[*keys, taken.key], args=["cam", message, 100, 1, taken.value]) == 1
        assert await append(keys=keys, args=["cam", message, 100, 1]) == 2  # unfenced: as without ownership

        # The ex-owner finds out at its next renewal (it was paused, not told): reported once.
        owner_losses = lost_a if owner_mgr is a else lost_b
        assert await owner.renew() is False and await owner.renew() is False and not await owner.is_ours()
        assert owner_losses.calls == [("cam", "taken by another replica")] and not other_losses.calls
        assert owner_mgr.held == [] and other.held == ["cam"]
        await owner.release()  # not ours: must not delete the new owner's lease
        assert await raw.get("test:lease:cam") == taken.value.encode()
    finally:
        await a.close()
        await b.close()
    assert await raw.exists("test:lease:cam") == 0  # closing released the new owner's lease


async def test_release_and_close_hand_the_stream_over_at_once(redis_server, raw):
    a = LeaseManager(config(redis_server), "a", 30.0)  # a long TTL: only a release can free it in time
    b = LeaseManager(config(redis_server), "b", 30.0)
    try:
        first = await a.acquire("cam")
        assert first is not None and await b.acquire("cam") is None
        await first.release()
        second = await b.acquire("cam")  # one attempt, no waiting
        assert second is not None and second.token > first.token and not first.held
        assert await first.is_ours() is False
        await b.close()  # graceful shutdown releases what it holds
        third = await a.acquire("cam")
        assert third is not None and third.token > second.token
    finally:
        await a.close()
        await b.close()
    assert await raw.exists("test:lease:cam") == 0


async def test_a_lease_redis_forgot_is_reported_once_by_the_renewal(redis_server, raw, caplog):
    metrics, losses = DaemonMetrics(["live"]), Losses()
    a = LeaseManager(config(redis_server), "a", TTL, on_lost=losses, metrics=metrics)
    try:
        lease = await a.acquire("cam")
        assert lease is not None
        await raw.delete("test:lease:cam")  # as after a Redis restart without persistence
        async with asyncio.timeout(TTL / 3 + 1.0):  # the next renewal (every TTL/3) finds it gone
            await losses.event.wait()
        await lease.renewer  # the renewal stops with the loss
        assert losses.calls == [("cam", "expired")] and not lease.held and a.held == []
        assert metrics.registry.get_sample_value("streamer_bus_errors_total", {"op": "lease_lost"}) == 1
        said = [r.getMessage() for r in caplog.records if r.name == "streamer.publish.lease"]
        assert said.count("stream lease lost: this replica must stop captioning the stream") == 1
        assert await raw.exists("test:lease:cam") == 0  # nobody re-created it behind our back
    finally:
        await a.close()


async def test_a_paused_owner_publishes_nothing_once_another_took_over(redis_server, raw, caplog):
    """Both replicas keep publishing as fast as they can around the takeover; the stream, read back
    from Redis, holds the old owner's messages, then the new owner's, never both mixed."""
    loop = asyncio.get_running_loop()
    cfg = config(redis_server)
    replicas = []
    for name in ("a", "b"):
        metrics, supervisor = DaemonMetrics(["live"]), Supervisor()
        hub = CaptionHub()
        bus = CaptionBus(cfg, hub, metrics)
        bus.start(supervisor.spawn)
        replicas.append((name, hub, bus, metrics, supervisor, LeaseManager(cfg, f"replica-{name}", TTL)))
    (_, hub_a, bus_a, metrics_a, _, mgr_a), (_, hub_b, bus_b, metrics_b, _, mgr_b) = replicas
    offered = {"a": 0, "b": 0}
    stop = asyncio.Event()

    async def produce(name: str, hub: CaptionHub) -> None:
        while not stop.is_set():
            hub.publish_state("cam", "live", f"{name}{offered[name]}")
            offered[name] += 1
            await asyncio.sleep(0.001)

    tasks = []
    try:
        lease_a = await mgr_a.acquire("cam")
        assert lease_a is not None and await mgr_b.acquire("cam") is None
        bus_a.fence("cam", lease_a)
        tasks.append(asyncio.create_task(produce("a", hub_a)))
        deadline = loop.time() + 10
        while await raw.xlen("test:s:cam") < 50:  # the owner's messages go through (polled: no event)
            assert loop.time() < deadline, offered
            await asyncio.sleep(0.02)

        await pause(lease_a)  # A stops renewing but goes on publishing (it does not know)
        lease_b = await mgr_b.acquire_within("cam", TTL + 2)
        assert lease_b is not None and lease_b.token > lease_a.token
        bus_b.fence("cam", lease_b)
        a_at_takeover = offered["a"]
        tasks.append(asyncio.create_task(produce("b", hub_b)))

        # both publish concurrently until B has a good number of messages on the stream
        deadline = loop.time() + 10
        while offered["b"] < 300 or offered["a"] < a_at_takeover + 300:
            assert loop.time() < deadline, offered
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)
        await bus_a.flush(5)
        await bus_b.flush(5)
        assert bus_a.buffered == 0 and bus_b.buffered == 0

        entries = await raw.xrange("test:s:cam")
        owners = [json.loads(fields[b"m"])["detail"][0] for _, fields in entries]
        first_b = owners.index("b")
        assert first_b > 0 and set(owners[:first_b]) == {"a"} and set(owners[first_b:]) == {"b"}, \
            "the old owner's messages are mixed with the new owner's"
        assert owners.count("b") == offered["b"]  # the new owner lost nothing
        # fenced appends take no seq: the stream's seqs run on without a hole
        assert [int(entry_id.split(b"-")[0]) for entry_id, _ in entries] == list(range(1, len(entries) + 1))
        fenced_a = metrics_a.registry.get_sample_value("streamer_bus_errors_total", {"op": "fenced"})
        appended_a = owners.count("a")
        assert appended_a + fenced_a == offered["a"]  # each of A's messages appended or refused, none lost silently
        assert offered["a"] - appended_a >= offered["a"] - a_at_takeover  # all it sent after the takeover: refused
        assert metrics_b.registry.get_sample_value("streamer_bus_errors_total", {"op": "fenced"}) == 0
        said = [r.getMessage() for r in caplog.records if r.name == "streamer.publish.bus"]
        assert sum("no longer holds the stream's lease" in s for s in said) == 1  # logged once, counted always
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for _, _, bus, _, supervisor, mgr in replicas:
            await supervisor.close()
            await bus.close()
            await mgr.close()


def test_lease_inputs_are_checked() -> None:
    cfg = BusConfig(url="redis://127.0.0.1:1/0")
    for bad in ("", "a:b", "x" * 65, "a b"):
        with pytest.raises(ValueError, match="replica_id"):
            LeaseManager(cfg, bad)
    with pytest.raises(ValueError, match="ttl"):
        LeaseManager(cfg, "a", 0.01)


async def test_an_invalid_stream_id_is_refused_before_redis(redis_server) -> None:
    a = LeaseManager(config(redis_server), "a", TTL)
    try:
        for bad in ("../x", "", "a b"):
            with pytest.raises(ValueError, match="stream id"):
                await a.acquire(bad)
    finally:
        await a.close()

