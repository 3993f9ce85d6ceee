"""Webhooks against a real aiohttp receiver on loopback: a real daemon (file
played as live) with a real WebSocket client to compare with, a receiver
that dies and comes back on the same port, retries on 500, none on 4xx, a
regex filter, and a slow endpoint that must not hold anything up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import pytest
import websockets

from streamer.publish.hub import CaptionHub
from streamer.publish.webhooks import WebhookSink
from tests.support.webhooks import Receiver
from tests.test_outputs import (  # noqa: F401
    add_stream,
    collect_captions,
    colours,
    make_caption,
    publish_all,
    serving,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


def key(caption: dict) -> tuple:
    return (caption["stream_id"], caption["index"])


async def test_webhooks_get_every_matching_caption_once_in_order_and_survive_the_receiver_dying(tiny_model, colours):
    receiver = await Receiver().start()
    pattern = "mouse|hodges"
    everything = WebhookSink(receiver.url("all"), retries=1, backoff=0.05, timeout=2.0)
    matching = WebhookSink(receiver.url("match"), match=pattern, retries=1, backoff=0.05, timeout=2.0)
    ws_caps: list[dict] = []
    try:
        async with serving(tiny_model) as served:
            for sink in (everything, matching):
                await sink.start(served.daemon.hub)
            async with websockets.connect(served.ws + "?all=1") as ws:
                reader = asyncio.create_task(collect_captions(ws, ws_caps, "cam"))
                await add_stream(served, id="cam", url=str(colours), loop=True)

                # -- receiver up: every caption arrives, once, in order, with the WebSocket fields
                await wait_for(lambda: len(ws_caps) >= 6, 40, "6 captions")

                n_up = len(ws_caps)
                await wait_for(lambda: len(receiver.got.get("all", [])) >= n_up, 10, "deliveries")
                assert receiver.got["all"][:n_up] == ws_caps[:n_up]
                wanted = [c for c in ws_caps[:n_up] if re.search(pattern, c["text"], re.IGNORECASE)]
                assert receiver.got.get("match", [])[: len(wanted)] == wanted
                assert all(re.search(pattern, c["text"], re.IGNORECASE) for c in receiver.got.get("match", []))
                rate_up = (ws_caps[n_up - 1]["emit_time"] - ws_caps[1]["emit_time"]) / (n_up - 2)

                # -- receiver down: captioning over WebSocket goes on at the same pace
                await receiver.stop()
                down_at = len(ws_caps)
                failed_before = everything.failed
                await wait_for(lambda: len(ws_caps) >= down_at + 6 and everything.failed >= failed_before + 3, 20,
                               "captions while the receiver is down")
                down = ws_caps[down_at - 1 : down_at + 6]
                rate_down = (down[-1]["emit_time"] - down[0]["emit_time"]) / 6
                # (generous: other work shares this machine's CPUs; a stall would be far slower)
                assert rate_down < 2 * rate_up + 0.5, (rate_up, rate_down)
                assert everything.failed > failed_before

                # -- receiver back on the same port: deliveries resume
                await receiver.start()
                back_at = len(ws_caps)
                await wait_for(lambda: any(key(c) in {key(w) for w in ws_caps[back_at:]} for c in receiver.got["all"]),
                               20, "deliveries after the receiver came back")
                await wait_for(lambda: len(ws_caps) >= back_at + 4, 20, "more captions")
                for sink in (everything, matching):
                    await sink.close()  # the daemon keeps running: close flushes what is queued
                delivered = {key(c) for c in receiver.got["all"]}
                await wait_for(lambda: delivered <= {key(c) for c in ws_caps}, 10, "the WebSocket client to catch up")
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        await receiver.stop()
        for sink in (everything, matching):
            await sink.close()

    got = receiver.got["all"]
    keys = [key(c) for c in got]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)  # once each, in order
    by_key = {key(c): c for c in ws_caps}
    assert all(by_key[key(c)] == c for c in got)  # exactly the WebSocket caption message
    # from the first delivery after the outage to the close, nothing was skipped
    ws_keys = [key(c) for c in ws_caps]
    resumed = next(i for i, k in enumerate(keys) if k in set(ws_keys[back_at:]))
    first_back = ws_keys.index(keys[resumed])
    assert keys[resumed:] == ws_keys[first_back : first_back + len(keys) - resumed]
    assert len(keys) - resumed >= 3
    assert everything.delivered == len(got) and everything.pending == 0 and everything.dropped == 0
    matched = receiver.got.get("match", [])
    assert all(re.search(pattern, c["text"], re.IGNORECASE) for c in matched)
    assert len({key(c) for c in matched}) == len(matched) and matching.delivered == len(matched)


async def test_a_500_is_retried_and_the_caption_arrives_once():
    receiver = await Receiver(answers=[500]).start()
    hub = CaptionHub()
    sink = WebhookSink(receiver.url("hook"), retries=3, backoff=0.05, timeout=2.0)
    try:
        await sink.start(hub)
        captions = [make_caption("cam", i, i * 0.5, f"caption {i}") for i in range(3)]
        await publish_all(hub, captions)
        await wait_for(lambda: len(receiver.got.get("hook", [])) == 3, 10, "3 deliveries")
        assert [c["index"] for c in receiver.got["hook"]] == [0, 1, 2]
        assert [r[2] for r in receiver.requests] == [500, 200, 200, 200]
        assert receiver.requests[0][1] == receiver.requests[1][1]  # the retry carries the same Idempotency-Key
        assert len({r[1] for r in receiver.requests}) == 3
        assert (sink.delivered, sink.failed, sink.retried, sink.dropped) == (3, 0, 1, 0)
        body = receiver.got["hook"][0]
        assert body["type"] == "caption" and body["v"] == 1 and body["text"] == "caption 0" and "stable" in body
    finally:
        await sink.close()
        await receiver.stop()


async def test_4xx_is_not_retried_and_a_regex_filters_case_insensitively():
    receiver = await Receiver(answers=[lambda body: 400 if "bad" in body["text"] else 200]).start()
    hub = CaptionHub()
    sink = WebhookSink(receiver.url("hook"), match=r"\bperson\b", streams=["cam"], retries=3, backoff=0.05, timeout=2.0)
    try:
        await sink.start(hub)
        texts = ["a bad person", "a car drives by", "A PERSON walks in", "personal items", "the person sits"]
        captions = [make_caption("cam", i, i * 0.5, t) for i, t in enumerate(texts)]
        captions.append(make_caption("other", 0, 0.0, "a person on another stream"))
        await publish_all(hub, captions)
        await wait_for(lambda: len(receiver.got.get("hook", [])) == 2, 10, "2 deliveries")
        await asyncio.sleep(0.2)
        assert [c["text"] for c in receiver.got["hook"]] == ["A PERSON walks in", "the person sits"]
        assert [r[2] for r in receiver.requests] == [400, 200, 200]  # the 400 was not retried
        assert (sink.delivered, sink.failed, sink.retried) == (2, 1, 0)
    finally:
        await sink.close()
        await receiver.stop()


async def test_a_slow_endpoint_holds_nothing_up_and_drops_the_oldest():
    receiver = await Receiver(delay=0.5).start()
    hub = CaptionHub()
    sink = WebhookSink(receiver.url("slow"), queue_size=2, retries=0, timeout=1.0)
    dead = WebhookSink("http://127.0.0.1:9/nothing-listens", retries=2, backoff=0.05, timeout=1.0)
    watcher = hub.subscribe(None, only_changes=False, replay=False)
    try:
        await sink.start(hub)
        await dead.start(hub)
        captions = [make_caption("cam", i, i * 0.5, f"caption {i}") for i in range(10)]
        started = time.monotonic()
        await publish_all(hub, captions)
        got = [json.loads((await watcher.get()).encoded)["index"] for _ in captions]
        assert time.monotonic() - started < 1.0 and got == list(range(10))
        await wait_for(lambda: dead.failed >= 1, 5, "a failed delivery to the dead endpoint")
        await wait_for(lambda: sink.pending == 0 and len(receiver.got.get("slow", [])) >= 3, 10, "the slow deliveries")
        # the one in flight, then the newest two: the oldest waiting ones gave way
        got = [c["index"] for c in receiver.got["slow"]]
        assert len(got) == 3 and got[0] < 8 and got[1:] == [8, 9]
        assert sink.dropped == 7 and sink.failed == 0
        closing = time.monotonic()
        await dead.close()
        assert time.monotonic() - closing <= 1.5  # bounded by its timeout
    finally:
        await sink.close()
        await dead.close()
        await receiver.stop()
