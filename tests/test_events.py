"""Opt-in message types (answer, watch, chapter, speech; publish/hub.py, docs/protocol.md): a client or
webhook that does not ask for them sees exactly what it saw before; one that asks gets them, through a
real daemon, real WebSocket clients, a real webhook receiver and, with a bus, a real Redis."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import websockets

from streamer.publish.bus import BusConfig
from streamer.publish.hub import CaptionHub
from streamer.types import Answer, Caption, Chapter, SpeechCue, WatchEvent
from tests.support.daemon import add_stream, captions_of, read_messages, running_daemon
from tests.support.media import moving_square, write_video
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.timeout(120)

CUE = SpeechCue("cam", 1.0, 2.5, "two red circles move up", -0.1, "world-whisper", 10.0, 10.4)
ANSWER = Answer("cam", 3, 2.0, 5.0, "what colour is it ?", "red", -0.05, "world-git", "q1", 11.0)
WATCH = WatchEvent("w1", "cam", "is there a red circle ?", "on", "yes", 4.0, 7.0, 12.0)
CHAPTER = Chapter("cam", 0, 0.0, 6.0, "a big red circle moves up", 13.0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("events") / "clip.mp4", moving_square(30, 160, 120, seed=5), fps=15)


def caption(index: int) -> Caption:
    return Caption("cam", index, index, index + 1.0, f"caption {index}", -0.1, "m", 1.0, 2.0 + index)


async def test_hub_gives_each_subscription_the_event_types_it_asked_for_and_no_history() -> None:
    hub = CaptionHub(history=5)
    plain, speech, everything = hub.subscribe(), hub.subscribe(types=["speech"]), hub.subscribe(
        types=["speech", "answer", "watch", "chapter"])
    hub.publish_caption(caption(0))
    for event in (CUE, ANSWER, WATCH, CHAPTER):
        hub.publish_event(event)
    hub.publish_caption(caption(1))
    async def kinds(sub) -> list[str]:  # what is queued for it now
        return [(await sub.get()).kind for _ in range(sub.pending)]

    assert await kinds(plain) == ["caption", "caption"]  # a v1 client: unchanged
    assert await kinds(speech) == ["caption", "speech", "caption"]
    assert await kinds(everything) == ["caption", "speech", "answer", "watch", "chapter", "caption"]
    late = hub.subscribe(types=["speech"])
    assert await kinds(late) == ["caption", "caption"]  # events are live only: no replay
    speech.update_types(["chapter"])
    hub.publish_event(CUE)
    hub.publish_event(CHAPTER)
    assert await kinds(speech) == ["chapter"]
    with pytest.raises(ValueError, match="unknown event types"):
        hub.subscribe(types=["caption"])


async def test_websocket_clients_opt_in_by_url_and_subscribe(tiny_model) -> None:
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with http.get(f"{d.http}/ws?types=speech,nonsense",
                            headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
            assert resp.status == 400 and "nonsense" in (await resp.json())["error"]["message"]
        async with websockets.connect(d.ws) as plain, websockets.connect(d.ws + "?types=speech") as speech, \
                websockets.connect(d.ws) as later:
            for ws in (plain, speech, later):
                assert json.loads(await ws.recv())["type"] == "hello"
            await later.send(json.dumps({"type": "subscribe", "types": ["watch", "chapter"]}))
            await later.send(json.dumps({"type": "subscribe", "types": ["bogus"]}))
            error = json.loads(await later.recv())
            assert error["type"] == "error" and error["code"] == "bad_message" and "bogus" in error["message"]
            await later.send(json.dumps({"type": "ping"}))
            assert json.loads(await later.recv())["type"] == "pong"  # the subscribe before it was applied
            for event in (CUE, ANSWER, WATCH, CHAPTER):
                d.daemon.hub.publish_event(event)
            d.daemon.hub.publish_state("cam", "live", None)
            got = {}
            for name, ws in (("plain", plain), ("speech", speech), ("later", later)):
                got[name] = await read_messages(ws, lambda ms: ms and ms[-1]["type"] == "state", 10)
            assert [m["type"] for m in got["plain"]] == ["state"]
            assert [m["type"] for m in got["speech"]] == ["speech", "state"]
            assert [m["type"] for m in got["later"]] == ["watch", "chapter", "state"]
            cue = got["speech"][0]
            assert cue == {"v": 1, **CUE.to_dict()} and cue["latency"] == 0.4
            await later.send(json.dumps({"type": "unsubscribe", "types": ["watch"]}))
            await later.send(json.dumps({"type": "ping"}))
            assert json.loads(await later.recv())["type"] == "pong"
            d.daemon.hub.publish_event(WATCH)
            d.daemon.hub.publish_event(CHAPTER)
            assert json.loads(await later.recv())["type"] == "chapter"


async def test_a_webhook_gets_the_types_it_names_matched_on_their_text(tiny_model, clip) -> None:
    receiver = await Receiver().start()
    sinks = (("webhooks", [{"url": receiver.url("speech"), "types": ["speech"], "match": "red"},
                           {"url": receiver.url("plain")}]),)
    try:
        async with running_daemon(tiny_model, sinks=sinks) as d, aiohttp.ClientSession() as http:
            async with websockets.connect(d.ws) as ws:
                await add_stream(http, d, id="cam", url=str(clip), loop=True)
                await read_messages(ws, lambda ms: len(captions_of(ms, "cam")) >= 2, 30)
                d.daemon.hub.publish_event(SpeechCue("cam", 3.0, 4.0, "nothing", -0.1, "m", 1.0, 1.2))
                d.daemon.hub.publish_event(ANSWER)
                d.daemon.hub.publish_event(CUE)  # a sink handles messages in order: the two before were skipped
                plain_before = len(receiver.got.get("plain", []))
                await receiver.wait_for("speech", 1, timeout=10)
                await receiver.wait_for("plain", plain_before + 1, timeout=20)  # a caption after the events
                # What the sinks count is in /metrics (per sink, never its URL); a sink that fails on a
                # message counts it there too (fault injected into the chapters sink).
                chapters = next(s for s in d.daemon.sinks if s.consumer_name == "chapters")
                chapters._on_message = lambda message: 1 / 0
                d.daemon.hub.publish_caption(caption(99))
                deadline = time.monotonic() + 10
                while True:  # the sink handles it on its own task: read /metrics until it says so
                    async with http.get(f"{d.http}/metrics") as resp:
                        text = await resp.text()
                    if 'streamer_sink_errors_total{sink="chapters#1"} 1.0' in text:
                        break
                    assert time.monotonic() < deadline, [ln for ln in text.splitlines() if "sink_errors" in ln]
                    await asyncio.sleep(0.05)
                assert 'streamer_webhook_delivered_total{sink="webhook#1"} 1.0' in text  # the one cue
                assert 'streamer_sink_errors_total{sink="webhook#1"} 0.0' in text
                assert receiver.url("speech") not in text
        speech = receiver.got["speech"]
        assert [h["type"] for h in speech] == ["speech"] and speech[0]["text"] == CUE.text  # "nothing" did not match
        assert all(h["type"] == "caption" for h in receiver.got["plain"])  # no types: captions only, as before
    finally:
        await receiver.stop()
    with pytest.raises(ValueError, match="types"):
        from streamer.publish.webhooks import WebhookSink

        WebhookSink("http://127.0.0.1:9/x", types=["captions"])


async def test_events_cross_the_bus_to_opted_in_clients_of_another_replica(tiny_model, redis_server) -> None:
    bus = BusConfig(url=redis_server.url, key_prefix="events:", reconnect_max=0.5)
    async with running_daemon(tiny_model, bus=bus) as a, running_daemon(tiny_model, bus=bus) as b:
        async with websockets.connect(b.ws + "?types=speech,chapter") as on_b, websockets.connect(b.ws) as plain:
            for ws in (on_b, plain):
                assert json.loads(await ws.recv())["type"] == "hello"
            a.daemon.hub.publish_event(CUE)
            a.daemon.hub.publish_event(ANSWER)  # not asked for by either client
            a.daemon.hub.publish_event(CHAPTER)
            a.daemon.hub.publish_state("cam", "live", None)
            got = await read_messages(on_b, lambda ms: ms and ms[-1]["type"] == "state", 15)
            assert [m["type"] for m in got] == ["speech", "chapter", "state"]
            assert {k: v for k, v in got[0].items() if k != "seq"} == {"v": 1, **CUE.to_dict()}
            assert got[0]["seq"] < got[1]["seq"] < got[2]["seq"]  # one sequence per stream, as captions
            assert [m["type"] for m in await read_messages(plain, lambda ms: ms and ms[-1]["type"] == "state", 15)] == ["state"]
