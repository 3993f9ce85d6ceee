"""Chapters survive a stream's takeover (publish/chapters.py: `Chapterer.restore`, `ChapterRecovery`,
`ChapterSink.take_over`; cluster/ownership.py calls it before a taken stream starts).

- the rule restored from (closed chapters, captions since) goes on exactly as the rule that saw the
  whole timeline, at every caption of the demo's scenes as the bundled model captions them, with a
  foreign flicker placed at every window in turn;
- two buses and two sinks on one real Redis: B takes the stream over from A, garbled and misfit
  `chapter` entries in Redis are skipped and counted, nothing is published twice, a Redis that does not
  answer or a history trimmed past the open chapter's start makes B start afresh and say so once;
- two real replicas (`serve()`), the bundled model, the demo's scenes as a looping file: the owner
  closes a chapter, drains and hands over; the other replica's GET /streams/{id}/chapters lists the
  old owner's chapters and goes on from its open chapter, and a WebSocket client with `types=chapter`
  gets each chapter once."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from streamer.defaults import BUNDLED_MODEL
from streamer.ops.metrics import DaemonMetrics
from streamer.publish.bus import BusConfig, CaptionBus
from streamer.publish.chapters import Chapterer, ChapterRecovery, ChapterSink, similarity
from streamer.publish.hub import CaptionHub, HubMessage
from streamer.types import Caption, Chapter
from tests.support.daemon import add_to_cluster, read_messages, running_daemon
from tests.support.scenes import SceneClip, bundled_captions, demo_clip, names_colour_and_shape

pytestmark = pytest.mark.timeout(120)

WINDOW, HOP = 3.0, 1.0
FOREIGN = "two big blue squares move up"  # nothing like any scene of the demo clip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> SceneClip:
    """The demo's four scenes, 6 s each: cuts at 6, 12 and 18 s."""
    return demo_clip(tmp_path_factory.mktemp("takeover") / "scenes.mp4", 4, 6.0)


@pytest.fixture(scope="module")
def captions(scenes) -> list[Caption]:
    """The bundled model's captions of every window (3 s windows every second)."""
    return bundled_captions(scenes.path, WINDOW, HOP)


def centre(c: Caption) -> float:
    return (c.start + c.end) / 2


def rows(chapters) -> list[tuple]:
    return [(c.index, round(c.start, 9), round(c.end, 9), c.title) for c in chapters]


# -- the rule, pure ------------------------------------------------------------------------------------------


def test_a_restored_rule_goes_on_exactly_as_the_one_that_saw_the_whole_timeline(captions):
    assert all(similarity(FOREIGN, c.text) < 0.6 for c in captions)
    def flicker(at: set[int]) -> list[Caption]:
        return [dataclasses.replace(c, text=FOREIGN) if i in at else c for i, c in enumerate(captions)]

    # as captioned; a one-window flicker at every window in turn; a two-window one likewise
    variants = [captions] + [flicker({k}) for k in range(len(captions))] + [flicker({k, k + 1})
                                                                          for k in range(len(captions) - 1)]
    points = 0
    for timeline in variants:
        whole = Chapterer("cam")
        closed: list[Chapter] = []
        for k, caption in enumerate(timeline):
            closed += whole.feed(caption)
            # the old owner stops after caption k: what it published, and the captions since its last chapter began
            since = [c for c in timeline[:k + 1] if not closed or centre(c) >= closed[-1].start]
            restored = Chapterer("cam")
            assert restored.restore(closed, since) == []  # every chapter it closed was published
            assert restored.open_chapter == whole.open_chapter, k
            seen_all = Chapterer("cam")  # the rest of the timeline, against a rule that saw it all
            for c in timeline[:k + 1]:
                seen_all.feed(c)
            rest = [x for c in timeline[k + 1:] for x in seen_all.feed(c)] + seen_all.flush()
            assert rows([x for c in timeline[k + 1:] for x in restored.feed(c)] + restored.flush()) == rows(rest), k
            points += 1
    assert points == len(captions) * len(variants)
    # the old owner closed a chapter whose event never reached the bus (it drained first): the replay publishes it
    whole = Chapterer("cam")
    closed = [x for c in captions for x in whole.feed(c)]
    assert len(closed) >= 3
    published, lost = closed[:-1], closed[-1]
    restored = Chapterer("cam")
    assert rows(restored.restore(published, [c for c in captions if centre(c) >= published[-1].start])) == rows([lost])
    assert restored.open_chapter == whole.open_chapter


def test_what_is_read_back_is_checked_and_bounded():
    def caption(i: int, text: str = "a big red circle moves up", emit: float = 100.0) -> Caption:
        return Caption("cam", i, float(i), i + 3.0, text, -0.1, "m", emit_time=emit + i)

    def newest_first(payloads) -> list[HubMessage]:
        return [HubMessage(p, 0, bus_seq=seq) for seq, p in reversed(list(enumerate(payloads, start=1)))]

    def recover(payloads, **kw):
        recovery = ChapterRecovery("cam", **kw)
        read_all = True
        for m in newest_first(payloads):
            if not recovery.feed(m):
                read_all = False
                break
        return recovery, recovery.result(read_all=read_all)

    first = Chapter("cam", 0, 0.0, 4.0, "a big red circle moves up", emit_time=110.0)
    run = [caption(i) for i in range(5)] + [first] + [caption(i, "two small blue squares move down") for i in range(5, 9)]
    recovery, found = recover(run)
    assert found is not None and found.closed == (first,) and found.upto == len(run)
    assert [c.index for c in found.captions] == list(range(9))  # those of the last closed chapter and the open one
    # appended twice (the bus delivers at least once): once
    twice = run[:7] + [run[5], run[6]] + run[7:]
    assert recover(twice)[1] == dataclasses.replace(found, upto=len(twice))
    # an earlier run of the stream (its index and media time went back): not read past
    earlier = [caption(i, "a small green triangle moves to the left") for i in range(20, 26)]
    _, found = recover(earlier + run)
    assert found is not None and found.closed == (first,) and found.captions[0].index == 0
    # an earlier stream of the same id (before `since`, its registration): not read past
    _, found = recover([dataclasses.replace(c, emit_time=1.0) for c in earlier] + run, since=50.0)
    assert found is not None and found.closed == (first,)
    # a chapter that does not fit (ends after every caption, or overlaps the next one): skipped, counted
    future = Chapter("cam", 7, 50.0, 90.0, "from nowhere", emit_time=111.0)
    overlapping = Chapter("cam", 0, 1.0, 6.0, "overlaps", emit_time=109.0)
    second = Chapter("cam", 1, 4.0, 8.0, "two small blue squares move down", emit_time=120.0)
    recovery, found = recover(run[:4] + [overlapping] + run[4:] + [future] + [caption(9, "a big red circle moves up")]
                              + [second])
    assert found is not None and found.closed == (first, second) and recovery.skipped == 2
    # trimmed past retention (the oldest entry kept is not the first) with no chapter closed since: unknown start
    trimmed = ChapterRecovery("cam")
    for m in newest_first([caption(i) for i in range(6)])[:-2]:  # seqs 6..3: 1 and 2 are gone
        trimmed.feed(m)
    assert trimmed.result(read_all=True) is None and trimmed.found == (0, 4)
    # nothing of the stream: nothing to continue (a new stream)
    assert ChapterRecovery("cam").result(read_all=True) is None
    # `keep`: the newest chapters only, and the scan stops once it has them and the captions
    many = [Chapter("cam", i, 2.0 * i, 2.0 * i + 2, f"chapter {i}", emit_time=100.0 + i) for i in range(10)]
    timeline = [x for i in range(10) for x in (caption(2 * i), caption(2 * i + 1), many[i])] + [caption(20)]
    recovery, found = recover(timeline, keep=3)
    assert found is not None and [c.index for c in found.closed] == [7, 8, 9]
    assert recovery.oldest_seq is not None and recovery.oldest_seq > 1


# -- the glue: two buses, two sinks, one real Redis -------------------------------------------------------------


class Replica:
    """A hub, its bus and its chapter sink: the part of a daemon this is about."""

    def __init__(self, url: str, name: str, **bus) -> None:
        self.hub = CaptionHub()
        self.metrics = DaemonMetrics(())
        self.bus = CaptionBus(BusConfig(url=url, key_prefix="tk:", replica_id=name, reconnect_max=0.3, **bus),
                              self.hub, self.metrics)
        self.sink = ChapterSink(metrics=self.metrics)
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> Replica:
        def spawn(name: str, factory) -> asyncio.Task:
            self.tasks.append(asyncio.create_task(factory(), name=name))
            return self.tasks[-1]

        self.bus.start(spawn)
        await self.sink.start(self.hub)
        return self

    async def stop(self) -> None:
        """The replica is gone (as a killed process: nothing is flushed)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.hub.close()
        await self.sink.close()
        await self.bus.close()

    def counted(self, op: str) -> float:
        return self.metrics.bus_errors.labels(op=op)._value.get()


async def wait_for(check, timeout: float, what: str):
    """Poll `check()` (no event says when another replica's message came back through Redis)."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return got


def live(timeline: list[Caption], t0: float) -> list[Caption]:
    """The captions as a live stream publishes them: wall-clock times after `t0`."""
    return [dataclasses.replace(c, stream_id="cam", capture_time=t0 + c.end, emit_time=t0 + c.end) for c in timeline]


async def test_a_sink_that_takes_a_stream_over_goes_on_with_its_chapters(captions, redis_server, caplog):
    t0 = time.time()
    timeline = live(captions, t0)
    whole = Chapterer("cam")
    expected = [x for c in timeline for x in whole.feed(c)] + whole.flush()
    assert len(expected) >= 4
    raw = aioredis.from_url(redis_server.url)
    a, b = await Replica(redis_server.url, "a").start(), await Replica(redis_server.url, "b").start()
    watcher = b.hub.subscribe(["cam"], replay=False, types=["chapter"])  # a client of B, opted in to chapters
    try:
        # A captions the stream until its second chapter closed, and a caption more
        rule, closed = Chapterer("cam"), 0
        for handover, c in enumerate(timeline, start=2):
            closed += len(rule.feed(c))
            if closed == 2:
                break
        for c in timeline[:handover]:
            a.hub.publish_caption(c)
        await wait_for(lambda: len(a.sink.chapters("cam")) >= 2, 10, "A's chapters")
        await a.bus.flush(5)
        await a.stop()

        # what anyone with write access to Redis could add: garbled and misfit chapter entries
        key, seq_key = "tk:s:cam", "tk:seq:cam"
        forged = [b"not json", json.dumps({"type": "chapter", "stream_id": "cam", "index": "1", "start": 0,
                                           "end": 1, "title": "x", "emit_time": 1}).encode(),
                  json.dumps({"type": "chapter", "stream_id": "cam", "index": 5, "start": None, "end": 9.0,
                              "title": "nan start", "emit_time": 1}).encode(),
                  json.dumps({"type": "chapter", "stream_id": "cam", "index": 5, "start": 9.0, "end": 2.0,
                              "title": "backwards", "emit_time": 1}).encode(),
                  json.dumps({"type": "chapter", "stream_id": "other", "index": 5, "start": 1.0, "end": 2.0,
                              "title": "another stream's", "emit_time": 1}).encode(),
                  b"{" * 70_000]
        for m in forged:
            await raw.xadd(key, {"m": m, "r": "a"}, id=f"{await raw.incr(seq_key)}-0")
        misfit = {"type": "chapter", "stream_id": "cam", "index": 9, "start": 500.0, "end": 900.0,
                  "title": "ends after every caption", "emit_time": t0}  # valid as a message; no chapter of this stream
        await raw.xadd(key, {"m": json.dumps(misfit), "r": "a"}, id=f"{await raw.incr(seq_key)}-0")

        # B takes the stream over: its chapters first, then its own captions. Its restore reads the bus only
        # once B's first captions are on it too (as when the old owner's history is long): it reads them, and
        # they are not fed to the rule again when they come back from the bus
        class AfterTheFirstCaptions:
            async def newest_first(self, stream_id: str):
                await b.bus.flush(5)
                async for m in b.bus.newest_first(stream_id):
                    yield m

        b.sink.take_over("cam", AfterTheFirstCaptions(), since=t0 - 1)
        for c in timeline[handover:]:
            b.hub.publish_caption(c)
        assert await b.sink.settled("cam", 5)
        await wait_for(lambda: b.sink.chapters("cam") and b.sink.chapters("cam")[-1].index >= len(expected) - 2, 10,
                       "B's chapters")
        await b.bus.flush(5)
        await b.sink.close()  # the end of the stream: its last chapter closes (and is kept)
        assert rows(b.sink.chapters("cam")) == rows(expected)  # A's, B's: one timeline, as if one replica saw it all
        assert b.sink.restores == {"continued": 1, "afresh": 0, "skipped": 1}
        # each garbled entry skipped and counted each time it is read: by B's reader and by the restore; the misfit once
        await wait_for(lambda: b.counted("bad_entry") >= 2 * len(forged) + 1, 5, "the bad entries counted")
        assert b.counted("bad_entry") == 2 * len(forged) + 1 and b.counted("chapters_afresh") == 0
        # a client of B (opted in) got every chapter A and B published, once each
        got: list[Chapter] = []
        while watcher.pending:
            m = await watcher.get()
            if isinstance(m.payload, Chapter) and m.payload.title != misfit["title"]:  # the forged one is the bus's
                got.append(m.payload)
        assert [c.index for c in got] == sorted({c.index for c in got}) == list(range(len(got)))
        assert rows(got) == rows(expected)[:len(got)] and len(got) >= len(expected) - 1  # the last closed at close()
        on_bus = [json.loads(f[b"m"]) for _, f in await raw.xrange(key) if f[b"m"].startswith(b"{\"")]
        published = [(m["index"], m["title"]) for m in on_bus if m.get("type") == "chapter" and m.get("emit_time", 0) > 1
                     and m.get("index") != 9]
        assert len(published) == len(set(published))  # no chapter twice on the bus

        # B takes another stream whose history is trimmed past its open chapter's start: afresh, said once
        c = Replica(redis_server.url, "c")
        await c.start()
        for cap in timeline[:5]:
            c.hub.publish_caption(dataclasses.replace(cap, stream_id="trimmed"))
        await wait_for(lambda: c.sink.open_chapter("trimmed"), 10, "C's open chapter")
        await c.bus.flush(5)
        await c.stop()
        await raw.xtrim("tk:s:trimmed", maxlen=3, approximate=False)
        b2 = await Replica(redis_server.url, "b2").start()
        caplog.set_level(logging.WARNING, logger="streamer")
        b2.sink.take_over("trimmed", b2.bus)
        assert await b2.sink.settled("trimmed", 5)
        assert b2.sink.restores["afresh"] == 1 and b2.counted("chapters_afresh") == 1
        said = [r for r in caplog.records if r.getMessage() == "chapters of a stream taken over start afresh"]
        assert len(said) == 1 and "trimmed" in said[0].error
        # Redis does not answer: afresh too, said, and the stream's chapters start with its first caption here
        redis_server.kill()
        b2.sink.take_over("cam", b2.bus)
        assert await b2.sink.settled("cam", 10)
        said = [r for r in caplog.records if r.getMessage() == "chapters of a stream taken over start afresh"]
        assert len(said) == 2 and "could not be read" in said[1].error
        assert b2.sink.restores["afresh"] == 2 and b2.counted("chapters_afresh") == 2
        assert b2.sink.chapters("cam") == [] and b2.sink.open_chapter("cam") is None
        await b2.stop()
    finally:
        watcher.close()
        await b.stop()
        await raw.aclose()


# -- two real replicas ------------------------------------------------------------------------------------------


async def test_the_replica_that_takes_a_stream_over_serves_and_continues_its_chapters(scenes, redis_server):
    bus = BusConfig(url=redis_server.url, key_prefix="takeover:", reconnect_max=0.5, lease_ttl=2.0)
    async with running_daemon(BUNDLED_MODEL, bus=bus, max_new_tokens=20) as a, \
            running_daemon(BUNDLED_MODEL, bus=bus, max_new_tokens=20) as b, aiohttp.ClientSession() as http:
        owner, heir = await add_to_cluster(http, a, b, id="cam", url=str(scenes.path), window=WINDOW, hop=HOP, loop=True)

        def chapters_in(ms: list[dict]) -> list[dict]:
            return [m for m in ms if m["type"] == "chapter"]

        async with websockets.connect(heir.ws + "?streams=cam&types=chapter") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            got = await read_messages(ws, lambda ms: len(chapters_in(ms)) >= 1, 60)
            theirs = chapters_in(got)  # the owner closed the first scene's chapter
            async with http.get(f"{owner.http}/streams/cam/chapters") as resp:
                before = await resp.json()
            assert before[0]["index"] == 0 and before[-1]["open"]

            owner.stop.set()  # SIGTERM's way: drain, then hand the stream over
            await asyncio.wait_for(owner.task, 30)
            deadline = time.monotonic() + 20
            while "cam" not in heir.daemon.streams:
                assert time.monotonic() < deadline, "the other replica did not take the stream"
                await asyncio.sleep(0.05)
            # the heir's first captions are the file from its start again (the first scene): the open chapter,
            # the second scene's, closes with the old owner's start and title
            got += await read_messages(ws, lambda ms: len(chapters_in(ms)) >= 2, 60)
        events = chapters_in(got)
        assert [m["index"] for m in events] == list(range(len(events)))  # each once, in order, none twice
        assert events[0] == theirs[0]
        assert events[1]["start"] == events[0]["end"]
        assert names_colour_and_shape(events[1]["title"], scenes.scenes[1][0]), events[1]
        async with http.get(f"{heir.http}/streams/cam/chapters") as resp:
            assert resp.status == 200
            listing = await resp.json()
        closed = [c for c in listing if not c["open"]]
        assert [{k: v for k, v in c.items() if k != "open"} for c in closed[:2]] == [
            {**{k: v for k, v in m.items() if k not in ("v", "seq")}, "start": round(m["start"], 3),
             "end": round(m["end"], 3)}
            for m in events[:2]]
        assert listing[-1]["open"] and listing[-1]["index"] == closed[-1]["index"] + 1
        for before_, after in itertools.pairwise(listing):
            assert before_["end"] == after["start"]
        async with http.get(f"{heir.http}/metrics") as resp:
            assert 'streamer_bus_errors_total{op="chapters_afresh"} 0.0' in await resp.text()

        # While a replica reads a stream's chapters back, GET waits a little, then says so (503, Retry-After);
        # once read, the same chapters again (here: the heir taking the stream again, its reading held)
        sink = next(s for s in heir.daemon.sinks if isinstance(s, ChapterSink))
        release = asyncio.Event()

        class Held:
            async def newest_first(self, stream_id: str):
                await release.wait()
                async for m in heir.daemon.hub.bus.newest_first(stream_id):
                    yield m

        sink.take_over("cam", Held())
        async with http.get(f"{heir.http}/streams/cam/chapters") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "chapters_restoring"
        release.set()
        async with http.get(f"{heir.http}/streams/cam/chapters") as resp:
            assert resp.status == 200
            again = [c for c in await resp.json() if not c["open"]]
        assert again[:len(closed)] == closed
