"""Stream ownership with failover (cluster/ownership.py): three real `streamer serve` processes and one
real `redis-server`, real WebSocket clients, a real webhook receiver; the owner is killed with
SIGKILL and paused with SIGSTOP. Plus the stream registry's security on in-process daemons."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from streamer.cluster.requests import OwnerRequests, RequestFailed
from streamer.publish.bus import BusConfig
from tests.support.daemon import running_daemon
from tests.support.media import moving_square, write_video
from tests.support.webhooks import Receiver
from tests.support.webrtc import AiortcPublisher

pytestmark = pytest.mark.timeout(240)

TTL = 2.0  # lease_ttl of the replicas here (5 s by default)
WINDOW = 1.0
PREFIX = "cl:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """`streamer serve --config` in its own process; its log goes to a file (read by the test)."""

    def __init__(self, name: str, tmp: Path, model: Path, clip: Path, redis_url: str, hook: str) -> None:
        self.name, self.port = name, free_port()
        self.http, self.ws = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}/ws"
        self.log = tmp / f"{name}.log"
        config = tmp / f"{name}.toml"
        config.write_text(f"""
[model]
id = "{model}"
max_new_tokens = 4

[server]
port = {self.port}

[limits]
max_batch = 4

[bus]
url = "{redis_url}"
key_prefix = "{PREFIX}"
replica_id = "{name}"
lease_ttl = {TTL}
reconnect_max = 0.5

[[streams]]
id = "cam"
url = "{clip}"
loop = true
window = {WINDOW}
hop = 0.5

[[webhooks]]
url = "{hook}"
retries = 5
backoff = 0.1
""", encoding="utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--config", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env)

    def said(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


async def until(check, timeout: float, what: str, every: float = 0.1):
    """Poll `check()` (async) until it returns something truthy (no event exists across processes)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(every)


async def ready(http: aiohttp.ClientSession, r: Replica) -> bool:
    try:
        async with http.get(f"{r.http}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def owner_seen_by(http: aiohttp.ClientSession, r: Replica) -> str | None:
    async with http.get(f"{r.http}/streams/cam") as resp:
        if resp.status != 200:
            return None
        body = await resp.json()
        return body.get("owner") if body.get("state") != "pending" else None


async def read_captions(ws, n: int, timeout: float) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        message = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        if message["type"] == "caption":
            got.append(message)
            RECEIVED[(ws.id, message["seq"])] = time.time()
    return got


RECEIVED: dict[tuple, float] = {}  # (client, seq) -> wall time the client read it


async def bus_entries(raw) -> list[tuple[int, str, dict]]:
    """(seq, publishing replica, message) of every entry of the stream on the bus."""
    out = []
    for entry_id, fields in await raw.xrange(f"{PREFIX}s:cam"):
        out.append((int(entry_id.split(b"-")[0]), fields[b"r"].decode(), json.loads(fields[b"m"])))
    return out


def runs(publishers: list[str]) -> list[str]:
    """The replicas in the order they published, one item per uninterrupted run."""
    out: list[str] = []
    for p in publishers:
        if not out or out[-1] != p:
            out.append(p)
    return out


@pytest.fixture
def clip(tmp_path):
    return write_video(tmp_path / "clip.mp4", moving_square(45, 160, 120, seed=5), fps=15)


async def test_three_replicas_one_owner_failover_on_kill_and_pause(tiny_model, clip, redis_server, tmp_path):
    receiver = await Receiver().start()
    replicas = {name: Replica(name, tmp_path, tiny_model, clip, redis_server.url, receiver.url("hook"))
                for name in ("r1", "r2", "r3")}
    raw = aioredis.from_url(redis_server.url)
    try:
        async with aiohttp.ClientSession() as http:
            for r in replicas.values():
                await until(lambda r=r: ready(http, r), 90, f"{r.name} ready")
            first = await until(lambda: owner_seen_by(http, replicas["r1"]), 20, "an owner for cam")
            owner = replicas[first]
            others = [r for r in replicas.values() if r is not owner]
            viewer = others[0]

            # One stream, one owner, every replica: a client of a non-owner sees what the owner's client sees.
            async with websockets.connect(viewer.ws + "?all=1&streams=cam") as on_viewer, \
                    websockets.connect(owner.ws + "?all=1&streams=cam") as on_owner:
                for ws in (on_viewer, on_owner):
                    assert json.loads(await ws.recv())["type"] == "hello"
                seen, at_owner = await asyncio.gather(read_captions(on_viewer, 6, 30), read_captions(on_owner, 6, 30))
            by_seq_owner = {c["seq"]: c for c in at_owner}
            common = [c for c in seen if c["seq"] in by_seq_owner]
            assert len(common) >= 3 and all(by_seq_owner[c["seq"]] == c for c in common)
            # what the bus adds: caption made (emit_time) -> read by a client of another replica, and of the owner
            added = {name: sorted(RECEIVED[(ws.id, c["seq"])] - c["emit_time"] for c in caps)
                     for name, ws, caps in (("viewer", on_viewer, seen), ("owner", on_owner, at_owner))}
            print("\nemit -> client (ms), p50 / max: " + ", ".join(
                f"{k} {1000 * v[len(v) // 2]:.1f} / {1000 * v[-1]:.1f}" for k, v in added.items()))
            async with http.get(f"{viewer.http}/streams") as resp:
                listed = (await resp.json())["streams"]
            assert [(s["id"], s["owner"], s["origin"]) for s in listed] == [("cam", owner.name, "config")]
            # a request that needs the owner's frames is routed to it
            async with http.get(f"{viewer.http}/streams/cam/thumbnail.jpg") as resp:
                assert resp.status == 200 and resp.content_type == "image/jpeg"
                assert (await resp.read())[:2] == b"\xff\xd8"

            # kill -9 the owner: another replica takes the stream within TTL + one window (+ start-up).
            async with websockets.connect(viewer.ws + "?all=1&streams=cam") as on_viewer:
                assert json.loads(await on_viewer.recv())["type"] == "hello"
                before = (await read_captions(on_viewer, 2, 30))[-1]
                killed_at = time.time()
                owner.proc.kill()
                owner.proc.wait(10)
                alive = others

                async def new_owner():
                    seen = await owner_seen_by(http, viewer)
                    return seen if seen != owner.name else None

                second = await until(new_owner, 30, "a new owner")
                after = await read_captions(on_viewer, 6, 30)
            entries = await bus_entries(raw)
            firsts = [m for _, r, m in entries if r == second and m["type"] == "caption"]
            failover = firsts[0]["emit_time"] - killed_at
            print(f"\nfailover after kill -9: first caption of the new owner {failover:.2f} s after the kill "
                  f"(lease ttl {TTL} s, window {WINDOW} s)")
            assert failover <= TTL + WINDOW + 2.5, failover
            # the new owner goes on with the stream's index and media timeline
            last_old = [m for _, r, m in entries if r == owner.name and m["type"] == "caption"][-1]
            assert firsts[0]["index"] == last_old["index"] + 1
            assert firsts[0]["start"] > last_old["end"]
            indexes = [c["index"] for c in after]
            assert indexes == sorted(indexes) and indexes[-1] > before["index"]

            # A client that reconnects (to another replica) with `since` misses nothing and gets nothing twice.
            since = before["seq"] - 3
            other = next(r for r in alive if r is not viewer)
            query = urllib.parse.quote(json.dumps({"cam": since}))
            newest = entries[-1][0]
            async with websockets.connect(f"{other.ws}?all=1&streams=cam&since={query}") as back:
                got: list[dict] = []
                while not got or got[-1]["seq"] < newest:
                    got.append(json.loads(await asyncio.wait_for(back.recv(), 20)))
                    if got[-1]["type"] in ("hello", "pong"):
                        got.pop()
            assert not [m for m in got if m["type"] == "gap"]
            assert [m["seq"] for m in got] == list(range(since + 1, got[-1]["seq"] + 1))

            # SIGSTOP the new owner: the third replica takes over; once resumed, the paused one publishes nothing.
            paused = replicas[second]
            third = next(r for r in alive if r is not paused)
            os.kill(paused.proc.pid, signal.SIGSTOP)
            paused_at = time.time()

            async def third_owns():
                return await owner_seen_by(http, third) == third.name

            await until(third_owns, 30, "the third replica taking over")
            await asyncio.sleep(1.0)
            os.kill(paused.proc.pid, signal.SIGCONT)
            await until(lambda: asyncio.sleep(0, "stream lease lost" in paused.said()), 20,
                        "the paused replica to find its lease gone")
            await until(lambda: owner_seen_by(http, paused), 10, "the paused replica to see the new owner")
            assert await owner_seen_by(http, paused) == third.name
            await asyncio.sleep(TTL)  # anything the ex-owner still had queued would be on the bus by now
            entries = await bus_entries(raw)
            publishers = [r for _, r, _ in entries]
            # no two replicas ever published the stream at once: each owner's messages form one run
            assert runs(publishers) == [owner.name, paused.name, third.name], runs(publishers)
            seqs = [s for s, _, _ in entries]
            assert seqs == list(range(1, len(seqs) + 1))  # no hole, no repeat on the bus
            took = next(m for _, r, m in entries if r == third.name and m["type"] == "caption")["emit_time"] - paused_at
            print(f"failover after SIGSTOP: first caption of the new owner {took:.2f} s after the pause")
            assert took <= TTL + WINDOW + 2.5, took

            # A graceful stop (SIGTERM) drains and hands the stream over at once: no waiting for the lease to expire.
            termed_at = time.time()
            third.proc.send_signal(signal.SIGTERM)
            assert third.proc.wait(30) == 0
            exited_at = time.time()  # drained (its last captions out), then its leases released

            async def resumed_publishing():
                return [m for _, r, m in await bus_entries(raw) if r == paused.name and m["type"] == "caption"
                        and m["emit_time"] > termed_at]

            first = (await until(resumed_publishing, 20, "the handover after SIGTERM"))[0]["emit_time"]
            print(f"handover after SIGTERM: first caption of the next owner {first - termed_at:.2f} s after the "
                  f"signal; the old one drained and exited in {exited_at - termed_at:.2f} s")
            # Released, not expired: within a window of the old owner's exit (its leases go before it exits;
            # an expiry would come up to TTL after its last renewal). Draining takes what the load makes it.
            assert first - exited_at < WINDOW + 1.0, (first - termed_at, exited_at - termed_at)
            assert "streams handed over" in third.said()
            entries = await bus_entries(raw)
            assert runs([r for _, r, _ in entries]) == [owner.name, paused.name, third.name, paused.name]

            # Webhooks ran once per caption across the three replicas (each owner's sinks only).
            await asyncio.sleep(1.0)
            counts = collections.Counter((h["stream_id"], h["index"]) for h in receiver.got.get("hook", []) if h.get("type") == "caption")
            assert counts and max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
            on_bus = {m["index"] for _, r, m in entries if m["type"] == "caption" and r != owner.name}
            delivered = {i for (_, i) in counts}
            assert on_bus - delivered <= {max(on_bus)}, sorted(on_bus - delivered)  # the newest may be in flight
    finally:
        for r in replicas.values():
            r.stop()
        await raw.aclose()
        await receiver.stop()
    for r in replicas.values():
        assert "Traceback" not in r.said(), r.said()[-3000:]


async def test_the_stream_set_lives_in_redis_and_its_entries_meet_the_source_policy(tiny_model, clip, redis_server):
    bus = BusConfig(url=redis_server.url, key_prefix="reg:", reconnect_max=0.5, lease_ttl=2.0)
    raw = aioredis.from_url(redis_server.url)
    try:
        async with running_daemon(tiny_model, bus=bus) as a, running_daemon(tiny_model, bus=bus) as b, \
                aiohttp.ClientSession() as http:
            # Write access to Redis alone cannot start what the policy refuses: an entry claiming to come
            # from a config file that no replica has is checked like an HTTP request, and refused.
            forged = {"config": {"id": "evil", "url": "lavfi:testsrc2=size=64x64:rate=5"}, "origin": "config",
                      "by": "x", "at": 0}
            await raw.hset("reg:registry", "evil", json.dumps(forged))
            await raw.xadd("reg:registry:events", {"op": "added", "id": "evil"})

            async def evil_state():
                async with http.get(f"{a.http}/streams/evil") as resp:
                    body = await resp.json()
                return body if body.get("state") == "failed" else None

            refused = await until(evil_state, 15, "the forged stream to be refused")
            assert "not allowed" in refused["detail"] or "lavfi" in refused["detail"]
            assert "evil" not in a.daemon.streams and "evil" not in b.daemon.streams
            counted = []
            for d in (a, b):  # the refusal is counted where it happened (the owner)
                async with http.get(f"{d.http}/metrics") as resp:
                    counted.append('streamer_bus_errors_total{op="stream_refused"} 1.0' in await resp.text())
            assert counted.count(True) == 1
            # the same over HTTP: refused before anything is registered
            async with http.post(f"{b.http}/streams", json={"id": "evil2", "url": "lavfi:testsrc2"}) as resp:
                assert resp.status == 403
            assert not await raw.hexists("reg:registry", "evil2")

            # Added through A, captioned by whichever replica takes it; removed through B, stopped by its owner.
            async with http.post(f"{a.http}/streams", json={"id": "cam", "url": str(clip), "loop": True,
                                                              "window": 1.0, "hop": 0.5}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.post(f"{b.http}/streams", json={"id": "cam", "url": str(clip)}) as resp:
                assert resp.status == 409  # one stream set for the cluster

            async def running_on():
                return [d for d in (a, b) if "cam" in d.daemon.streams]

            owners = await until(running_on, 15, "an owner to start cam")
            assert len(owners) == 1
            async with http.delete(f"{b.http}/streams/cam") as resp:
                assert resp.status == 204
            await until(lambda: asyncio.sleep(0, not any("cam" in d.daemon.streams for d in (a, b))), 10,
                        "the owner to stop cam")
            async with http.get(f"{a.http}/streams/cam") as resp:
                assert resp.status == 404
    finally:
        await raw.aclose()


async def test_a_whip_stream_belongs_to_the_replica_holding_the_peer(tiny_model, redis_server):
    bus = BusConfig(url=redis_server.url, key_prefix="whip:", reconnect_max=0.5, lease_ttl=2.0)
    raw = aioredis.from_url(redis_server.url)
    first, second = AiortcPublisher(), AiortcPublisher()
    try:
        async with running_daemon(tiny_model, bus=bus) as a, running_daemon(tiny_model, bus=bus) as b, \
                aiohttp.ClientSession() as http:
            status, location, _ = await first.publish(http, f"{a.http}/whip/desk")
            assert status == 201 and location
            # the id is A's (its lease), so a publish of the same id to B is refused, and nothing starts on B
            status, _, body = await second.publish(http, f"{b.http}/whip/desk")
            assert status == 409 and "owned by replica" in body
            assert "desk" not in b.daemon.streams
            assert (await raw.get("whip:lease:desk")).decode().startswith(a.daemon.hub.bus.replica_id + ":")
            # WHIP streams are never registered: they do not fail over
            assert not await raw.hexists("whip:registry", "desk")
            async with http.delete(f"{a.http}{location}") as resp:
                assert resp.status == 204

            async def released():
                return not await raw.exists("whip:lease:desk")

            await until(released, 10, "the lease to be released once the session ended")
    finally:
        await first.close()
        await second.close()
        await raw.aclose()


async def test_an_owner_request_times_out_clearly_and_hostile_entries_do_no_harm(redis_server):
    raw = aioredis.from_url(redis_server.url)

    def op(waits: float = 0.0):
        return asyncio.timeout(waits + 3)

    asker = OwnerRequests(raw, "rq:", "asker", 0.3, op)
    owner = OwnerRequests(raw, "rq:", "owner", 0.3, op)
    answered: list[str] = []

    async def thumbnail(stream_id: str) -> bytes:
        answered.append(stream_id)
        return b"\xff\xd8jpeg"

    owner.handlers["thumbnail"] = thumbnail
    try:
        # nobody reads replica "gone"'s requests: a clear 504 naming the owner, after the timeout
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("gone", "thumbnail", "cam")
        assert failed.value.status == 504 and "gone" in failed.value.message
        # the owner answers its own requests to the asker; unknown kinds and bad ids are refused
        for fields, want in (
            ({b"id": b"a" * 32, b"kind": b"thumbnail", b"stream": b"cam"}, b"ok\n\xff\xd8jpeg"),
            ({b"id": b"b" * 32, b"kind": b"rm -rf", b"stream": b"cam"}, b"400\n"),
            ({b"id": b"c" * 32, b"kind": b"thumbnail", b"stream": b"../etc"}, b"400\n"),
        ):
            await owner.serve(fields)
            reply = await raw.lpop(f"rq:rp:{fields[b'id'].decode()}")
            assert reply.startswith(want), reply
        await owner.serve({b"id": b"not-an-id", b"kind": b"thumbnail", b"stream": b"cam"})  # ignored: no reply key
        assert await raw.keys("rq:rp:not-an-id") == []
        assert answered == ["cam"]
    finally:
        await raw.aclose()
