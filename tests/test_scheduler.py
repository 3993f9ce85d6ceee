"""Batching policy and the ring buffer, fed plain data."""

from __future__ import annotations

import asyncio

import numpy as np

from streamer.pipeline.ring import FrameRing
from streamer.pipeline.scheduler import BatchPlanner, Scheduler, SchedulerConfig
from streamer.types import Caption, Frame, Window

_IMG = np.zeros((2, 2, 3), np.uint8)


def window(stream: str, index: int) -> Window:
    return Window(stream, index, (Frame(stream, index, float(index), _IMG),))


def test_batches_are_fair_across_streams():
    planner = BatchPlanner(SchedulerConfig(max_batch=4, max_pending_per_stream=10))
    for i in range(6):
        planner.submit(window("busy", i))
    planner.submit(window("quiet1", 0))
    planner.submit(window("quiet2", 0))
    first = planner.next_batch()
    # the busy stream does not crowd out the others
    assert {w.stream_id for w in first} == {"busy", "quiet1", "quiet2"}
    assert [w.index for w in first if w.stream_id == "busy"] == [0, 1]
    rest = planner.next_batch() + planner.next_batch()
    assert [w.index for w in rest] == [2, 3, 4, 5]
    assert planner.next_batch() == []


def test_overload_keeps_the_newest_windows_and_counts_drops():
    planner = BatchPlanner(SchedulerConfig(max_batch=8, max_pending_per_stream=2))
    dropped = [planner.submit(window("cam", i)) for i in range(5)]
    assert [d.index for d in dropped if d] == [0, 1, 2]
    assert [w.index for w in planner.next_batch()] == [3, 4]
    assert planner.dropped == {"cam": 3}


async def test_scheduler_runs_batches_off_the_loop_and_drains_on_close():
    seen: list[list[str]] = []
    published: list[Caption] = []
    release = __import__("threading").Event()

    def caption(windows):
        release.wait(5)  # a slow engine: the loop must stay free meanwhile
        seen.append([f"{w.stream_id}:{w.index}" for w in windows])
        return [Caption(w.stream_id, w.index, w.start, w.end, "x", 0.0, "m") for w in windows]

    scheduler = Scheduler(caption, published.extend, SchedulerConfig(max_batch=2, max_wait=0.01, max_pending_per_stream=5))
    scheduler.start()
    for i in range(3):
        scheduler.submit(window("a", i))
    await asyncio.sleep(0.05)
    ticks = 0
    for _ in range(5):  # the event loop keeps running while the engine works
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5
    release.set()
    await scheduler.close(drain=True)
    assert [c.index for c in published] == [0, 1, 2]  # nothing waiting was lost at shutdown
    assert sum(len(b) for b in seen) == 3 and max(len(b) for b in seen) <= 2


async def test_ring_overwrites_the_oldest_and_never_blocks():
    ring = FrameRing(capacity=3)
    for i in range(5):
        ring.push(Frame("s", i, i / 10, _IMG))  # synchronous: never waits for a consumer
    assert ring.dropped == 2 and ring.latest.seq == 4
    assert [f.seq for f in await ring.take()] == [2, 3, 4]
    waiter = asyncio.create_task(ring.take())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    ring.push(Frame("s", 5, 0.5, _IMG))
    assert [f.seq for f in await asyncio.wait_for(waiter, 1)] == [5]


async def test_pipelined_scheduler_prepares_ahead_and_captions_like_the_plain_one(tiny_model):
    # The GPU order (prepare batch k+1, then finish k) run on the real engine on CPU:
    # same captions as captioning each window alone, each window once, none lost at close.
    from streamer.engine import Engine, EngineConfig
    from tests.support.media import moving_square

    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    reference = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6, cache_frames=0))
    streams = {s: moving_square(12, seed=i) for i, s in enumerate(("a", "b", "c"))}
    windows = [
        Window(s, k, tuple(Frame(s, j, j / 6, imgs[j]) for j in range(k * 2, k * 2 + 6)))
        for k in range(4) for s, imgs in streams.items()
    ]
    calls: list[str] = []

    def prepare(batch):
        calls.append("prepare")
        return engine.prepare(batch)

    def finish(prepared):
        calls.append("finish")
        return engine.finish(prepared)

    published: list[Caption] = []
    batches: list[int] = []
    scheduler = Scheduler(
        engine.caption, published.extend, SchedulerConfig(max_batch=2, max_wait=0.01, max_pending_per_stream=8),
        on_batch=lambda n, _s: batches.append(n), pipeline=(prepare, finish),
    )
    scheduler.start()
    for w in windows:
        scheduler.submit(w)
    await scheduler.close(drain=True)
    assert sorted((c.stream_id, c.index) for c in published) == sorted((w.stream_id, w.index) for w in windows)
    for s in streams:  # per stream, in window order
        assert [c.index for c in published if c.stream_id == s] == [0, 1, 2, 3]
    expected = {(w.stream_id, w.index): reference.caption([w])[0].text for w in windows}
    assert {(c.stream_id, c.index): c.text for c in published} == expected
    assert sum(batches) == len(windows) and max(batches) <= 2
    # the next batch was prepared before the one in flight was finished
    assert calls[:3] == ["prepare", "prepare", "finish"]
    assert calls.count("prepare") == calls.count("finish") == len(batches)


async def test_pipelined_scheduler_survives_an_engine_error():
    def prepare(batch):
        if any(w.stream_id == "bad" for w in batch):
            raise RuntimeError("corrupt batch")
        return batch

    def finish(batch):
        return [Caption(w.stream_id, w.index, w.start, w.end, "ok", 0.0, "m") for w in batch]

    published: list[Caption] = []
    scheduler = Scheduler(finish, published.extend, SchedulerConfig(max_batch=1, max_wait=0.0), pipeline=(prepare, finish))
    scheduler.start()
    for s in ("a", "bad", "b"):
        scheduler.submit(window(s, 0))
    await scheduler.close(drain=True)
    assert sorted(c.stream_id for c in published) == ["a", "b"]  # the bad batch is logged and skipped
