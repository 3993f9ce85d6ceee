"""The caption bus ([bus], publish/bus.py): real daemons (tests/support/daemon.py) sharing a real
`redis-server` started here on a free loopback port, real WebSocket clients (websockets)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse

import aiohttp
import pytest
import websockets

from streamer.publish.bus import BusConfig
from tests.support.daemon import add_stream, captions_of, read_messages, running_daemon
from tests.support.media import moving_square, write_video
from tests.support.redis import RedisServer
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("bus") / "clip.mp4", moving_square(30, 160, 120, seed=3), fps=15)


def bus_config(server: RedisServer, **kw) -> BusConfig:
    kw.setdefault("reconnect_max", 0.5)
    return BusConfig(url=server.url, key_prefix="test:", **kw)


def seqs(messages, sid) -> list[int]:
    return [m["seq"] for m in messages if m.get("stream_id") == sid and m["type"] in ("caption", "state")]


def by_seq(messages, sid) -> dict[int, dict]:
    return {m["seq"]: m for m in messages if m.get("stream_id") == sid and m["type"] in ("caption", "state")}


def seq_at_least(sid, n):
    return lambda ms: any(s >= n for s in seqs(ms, sid))


async def wait_ready(http, d, want: int, timeout: float = 15) -> dict:
    """Poll /readyz (no event exists for it) until it answers `want`."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{d.http}/readyz") as resp:
            body = await resp.json()
            if resp.status == want:
                return body
        assert time.monotonic() < deadline, f"/readyz stayed {resp.status} {body}, wanted {want}"
        await asyncio.sleep(0.05)


async def test_replicas_share_streams_and_a_client_resumes_with_since(tiny_model, clip, redis_server):
    bus = bus_config(redis_server)
    async with running_daemon(tiny_model, bus=bus) as a, running_daemon(tiny_model, bus=bus) as b, \
            aiohttp.ClientSession() as http:
        await wait_ready(http, a, 200)
        await wait_ready(http, b, 200)
        async with websockets.connect(a.ws + "?all=1") as on_a, websockets.connect(b.ws + "?all=1") as on_b:
            for ws in (on_a, on_b):
                assert json.loads(await ws.recv())["type"] == "hello"
            await add_stream(http, b, id="cam", url=str(clip), loop=True)  # captioned by B only
            got_a = await read_messages(on_a, seq_at_least("cam", 8), 30)
            got_b = await read_messages(on_b, seq_at_least("cam", 8), 30)
            # A client on A sees B's stream: the same messages (seq, text, times), in the same order.
            common = sorted(set(by_seq(got_a, "cam")) & set(by_seq(got_b, "cam")))
            assert len(common) >= 8
            assert [by_seq(got_a, "cam")[s] for s in common] == [by_seq(got_b, "cam")[s] for s in common]
            assert seqs(got_a, "cam") == list(range(1, len(seqs(got_a, "cam")) + 1))  # from 1, no hole (all=1)
            caps = captions_of(got_a, "cam")
            assert all(c["seq"] > 0 and c["text"] is not None for c in caps) and len(caps) >= 5
            assert "seq" in got_a[-1]

            # Resume: a client on A leaves at seq `left`, comes back with since and gets exactly what it missed.
            left = seqs(got_a, "cam")[-1]
            got_b += await read_messages(on_b, seq_at_least("cam", left + 4), 30)  # B's client stayed
            since = urllib.parse.quote(json.dumps({"cam": left}))
            async with websockets.connect(f"{a.ws}?all=1&streams=cam&since={since}") as back:
                hello = json.loads(await back.recv())
                assert "cam" in hello["streams"]  # a stream of another replica is listed
                last_b = seqs(got_b, "cam")[-1]
                resumed = await read_messages(back, seq_at_least("cam", last_b), 30)
            assert not [m for m in resumed if m["type"] == "gap"]
            after = [m for m in resumed if m["type"] in ("caption", "state")]
            assert [m["seq"] for m in after] == list(range(left + 1, after[-1]["seq"] + 1))  # no hole, no repeat
            assert after[: last_b - left] == [by_seq(got_b, "cam")[s] for s in range(left + 1, last_b + 1)]

        async with http.get(f"{a.http}/metrics") as resp:
            text = await resp.text()
        assert "streamer_bus_connected 1.0" in text

        # `since` is checked before the upgrade
        async with http.get(f"{a.ws}?since=%7B%22cam%22%3A-1%7D".replace("ws://", "http://"),
                            headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
            assert resp.status == 400 and "since" in (await resp.json())["error"]["message"]


async def test_since_older_than_retention_gets_a_gap(tiny_model, clip, redis_server):
    async with running_daemon(tiny_model, bus=bus_config(redis_server, retention=2)) as d, \
            aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await read_messages(ws, seq_at_least("cam", 16), 30)  # stream nodes of 4: the first ones are trimmed
        since = urllib.parse.quote(json.dumps({"cam": 1}))
        async with websockets.connect(f"{d.ws}?all=1&since={since}") as back:
            got = await read_messages(back, lambda ms: any(m["type"] == "caption" for m in ms[2:]), 30)
        gap = next(m for m in got if m["type"] == "gap")
        first = next(m for m in got if m["type"] in ("caption", "state") and m["seq"] > 1)
        assert gap == {"v": 1, "type": "gap", "stream_id": "cam", "from_seq": 2, "to_seq": first["seq"] - 1}
        assert got.index(gap) < got.index(first)  # said before the messages that follow it


async def test_redis_restart_readyz_and_outage_messages_arrive(tiny_model, clip, redis_server, caplog):
    bus = bus_config(redis_server)
    receiver = await Receiver().start()
    sinks = (("webhooks", [{"url": receiver.url("hook"), "retries": 5, "backoff": 0.1}]),)
    async with running_daemon(tiny_model, bus=bus, sinks=sinks) as a, running_daemon(tiny_model, bus=bus, sinks=sinks) as b, \
            aiohttp.ClientSession() as http:
        await wait_ready(http, a, 200)
        async with websockets.connect(a.ws + "?all=1") as on_a:
            await add_stream(http, b, id="cam", url=str(clip), loop=True)
            got = await read_messages(on_a, lambda ms: len(captions_of(ms, "cam")) >= 3, 30)
            owner = next(d for d in (a, b) if "cam" in d.daemon.streams)
            redis_server.kill()  # everything in it is lost (no persistence)
            for d in (a, b):
                body = await wait_ready(http, d, 503)
                assert "bus unreachable" in body["reason"]
            # The stream was added through B, but either replica may hold its lease: the owner goes on
            # captioning into its bounded buffer until the lease runs out (polled: no event says it).
            deadline = time.monotonic() + 15
            while owner.daemon.hub.bus.buffered < 4:
                assert time.monotonic() < deadline, "the owner buffered nothing while Redis was down"
                await asyncio.sleep(0.05)
            redis_server.start()
            for d in (a, b):
                await wait_ready(http, d, 200)
            got += await read_messages(on_a, lambda ms: len(captions_of(ms, "cam")) >= len(captions_of(got, "cam")) + 6, 30)
        said = [r.getMessage() for r in caplog.records if r.name == "streamer.publish.bus"]
        # one line per replica when Redis went away, one when it came back (however many attempts between)
        assert said.count("bus unreachable: retrying") == 2 and said.count("bus reconnected") == 2, said
        indexes = [c["index"] for c in captions_of(got, "cam")]
        # every caption the owner made, including those made while Redis was down, reached A's client, once
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))
        numbers = seqs(got, "cam")
        assert numbers == sorted(set(numbers))  # seqs never go back, though Redis forgot them
        async with http.get(f"{a.http}/metrics") as resp:
            text = await resp.text()
        assert 'streamer_bus_errors_total{op="read"}' in text and "streamer_bus_connected 1.0" in text
        # Both replicas configure the webhook; only the stream's owner delivers, once per caption,
        # across the outage (the bus is at least once: a re-sent batch is not delivered twice).
        delivered = [h["index"] for h in receiver.got.get("hook", []) if h.get("type") == "caption" and h["stream_id"] == "cam"]
        assert len(delivered) == len(set(delivered)) and set(indexes) - set(delivered) <= {indexes[-1]}
    await receiver.stop()


def test_gap_and_seq_are_documented_as_sent() -> None:
    import re

    from streamer.publish.protocol import SCHEMA, encode_gap

    documented = json.loads(re.search(r'`(\{"v": 1, "type": "gap".*?\})`', SCHEMA).group(1))
    assert documented == json.loads(encode_gap("cam1", 42, 180))
    assert "`seq` (integer, only when the daemon runs with a bus" in SCHEMA
    assert "- `since`" in SCHEMA


def test_since_is_checked_before_anything_reads_it() -> None:
    from streamer.publish.protocol import ProtocolError, parse_since

    assert parse_since('{"cam": 0, "b.2": 41}') == {"cam": 0, "b.2": 41}
    for bad in ('[1]', '{"cam": -1}', '{"cam": true}', '{"cam": 1.5}', '{"../x": 1}', 'nope',
                json.dumps({f"s{i}": 1 for i in range(1001)}), '{"cam": 4611686018427387904}'):
        with pytest.raises(ProtocolError):
            parse_since(bad)


def test_bus_config_is_validated_and_never_echoes_the_password() -> None:
    from streamer.config import ConfigError, FileConfig, validate

    assert validate(FileConfig, {}).bus is None  # no [bus]: alone, as before
    ok = validate(FileConfig, {"bus": {"url": "redis://:pw@127.0.0.1:6379/2", "retention": 5}}).bus
    assert ok.retention == 5 and ok.key_prefix == "streamer:"
    assert "pw" not in repr(BusConfig.from_section(ok))
    for bus, words in (({"url": "http://x"}, "redis://"), ({"url": "redis://:s3cret@h:99999/0"}, "Port"),
                       ({"url": "redis://h/x"}, "0-15"), ({"url": "redis://h", "retention": 0}, "retention"),
                       ({"url": "redis://h", "key_prefix": "a b"}, "key_prefix"), ({"url": "redis://h", "x": 1}, "x")):
        with pytest.raises(ConfigError) as err:
            validate(FileConfig, {"bus": bus})
        assert words in str(err.value) and "s3cret" not in str(err.value)


async def test_hub_with_a_bus_sends_through_it_only() -> None:
    """The hub's side of the bus, with a recording BusLink (no Redis: the hub's own interface)."""
    from streamer.publish.hub import CaptionHub, HubMessage
    from streamer.types import Caption

    class Recorder:
        def __init__(self) -> None:
            self.offered: list[HubMessage] = []
            self.flushed: list[float] = []

        def offer(self, m: HubMessage) -> None:
            self.offered.append(m)

        async def flush(self, timeout: float) -> None:
            self.flushed.append(timeout)

    hub, bus = CaptionHub(), Recorder()
    hub.attach_bus(bus)
    sub = hub.subscribe(None, only_changes=False)
    hub.publish_caption(Caption("cam", 0, 0.0, 1.0, "a dog", -0.1, "m", 1.0, 1.5))
    hub.publish_state("cam", "live", at=2.0)
    assert sub.pending == 0 and [m.stream_id for m in bus.offered] == ["cam", "cam"]  # not delivered locally
    assert "seq" not in bus.offered[0].data  # Redis assigns it
    for seq, m in enumerate(bus.offered, 1):
        hub.deliver(HubMessage(m.payload, 0, m.stable, bus_seq=seq))
    got = [json.loads((await sub.get()).encoded) for _ in range(2)]
    assert [(m["type"], m["seq"]) for m in got] == [("caption", 1), ("state", 2)]
    late = hub.subscribe(["cam"], only_changes=False)  # history and state kept from what the bus delivered
    assert late.pending == 2
    await hub.drain(0.1)  # `late` is never read: drain closes it at the deadline
    assert bus.flushed and sub.closed


async def test_an_unreachable_bus_keeps_the_newest_messages_and_counts_the_rest() -> None:
    """Nothing listens on the port: the publisher retries with backoff while offers never block."""
    from streamer.ops.metrics import DaemonMetrics
    from streamer.ops.supervisor import Supervisor
    from streamer.publish.bus import CaptionBus
    from streamer.publish.hub import CaptionHub

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    metrics, hub, supervisor = DaemonMetrics(["live"]), CaptionHub(), Supervisor()
    bus = CaptionBus(BusConfig(url=f"redis://:secret@127.0.0.1:{port}/0", buffer=5, reconnect_max=0.2), hub, metrics)
    bus.start(supervisor.spawn)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    try:
        for i in range(12):
            hub.publish_state("cam", "live", str(i))
        assert bus.buffered == 5 and sample("streamer_bus_dropped_total") == 7
        assert [m.payload.detail for m in bus._outbox] == ["7", "8", "9", "10", "11"]  # the newest kept
        deadline = time.monotonic() + 5
        while sample("streamer_bus_errors_total", op="publish") < 2:  # polled: it retries on a timer
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert "bus unreachable" in bus.problem() and "secret" not in bus.problem()
        assert not bus.connected and sample("streamer_bus_connected") == 0
    finally:
        await supervisor.close()
        await bus.close()


def test_streamer_toml_bus_section_reaches_the_daemon(tmp_path) -> None:
    from streamer.cli.serve import load_config
    from streamer.errors import StreamerError

    toml = tmp_path / "streamer.toml"
    toml.write_text('[bus]\nurl = "redis://:pw@10.0.0.5:6380/1"\nretention = 500\n', encoding="utf-8")
    config = load_config(str(toml))
    assert config.bus == BusConfig(url="redis://:pw@10.0.0.5:6380/1", retention=500)
    assert load_config(None).bus is None
    toml.write_text('[bus]\nurl = "redis://:pw@10.0.0.5:6380/1"\nretention = -1\n', encoding="utf-8")
    with pytest.raises(StreamerError, match="bus.retention"):
        load_config(str(toml))
