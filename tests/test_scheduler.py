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


def _request(windows, max_new_tokens=None, submitted=0.0):
    from streamer.pipeline.scheduler import Request

    loop = asyncio.new_event_loop()
    try:
        return Request(list(windows), max_new_tokens, submitted, loop.create_future())
    finally:
        loop.close()


def test_plans_put_live_windows_first_and_fill_with_one_off_windows_within_max_batch():
    planner = BatchPlanner(SchedulerConfig(max_batch=4, max_pending_per_stream=4, request_max_wait=10.0))
    clips = [window(f"_clip.{i}", 0) for i in range(6)]
    request = _request(clips)
    planner.submit_request(request)
    planner.submit(window("cam", 0))
    planner.submit(window("cam", 1))
    first = planner.next_plan(now=1.0)
    assert [w.stream_id for w in first.windows] == ["cam", "cam", "_clip.0", "_clip.1"] and first.live == 2
    assert first.free == []  # the request is not finished: its features may still be shared
    second = planner.next_plan(now=1.0)
    assert [w.stream_id for w in second.windows] == ["_clip.2", "_clip.3", "_clip.4", "_clip.5"] and second.live == 0
    assert second.free == [f"_clip.{i}" for i in range(6)]  # freed with the plan that finishes the request
    assert not planner.has_work


def test_a_one_off_request_with_its_own_token_limit_waits_for_a_batch_of_its_own_but_never_starves():
    planner = BatchPlanner(SchedulerConfig(max_batch=4, max_pending_per_stream=8, request_max_wait=2.0))
    planner.submit_request(_request([window("_f", 0)], max_new_tokens=5, submitted=0.0))
    for i in range(3):
        planner.submit(window("cam", i))
    plan = planner.next_plan(now=0.5)
    assert [w.stream_id for w in plan.windows] == ["cam"] * 3 and plan.max_new_tokens is None
    planner.submit(window("cam", 3))
    plan = planner.next_plan(now=2.5)  # the request is overdue: it goes first, alone
    assert [w.stream_id for w in plan.windows] == ["_f"] and plan.max_new_tokens == 5 and plan.free == ["_f"]
    assert [w.index for w in planner.next_plan(now=2.5).windows] == [3]


def test_a_request_whose_caller_went_away_costs_no_more_engine_time():
    planner = BatchPlanner(SchedulerConfig(max_batch=2))
    request = _request([window(f"_c.{i}", 0) for i in range(4)])
    planner.submit_request(request)
    assert [w.stream_id for w in planner.next_plan(now=0.0).windows] == ["_c.0", "_c.1"]
    request.future.cancel()
    plan = planner.next_plan(now=0.0)
    assert plan.windows == [] and plan.free == ["_c.0", "_c.1"] and not planner.has_work


def test_forgetting_a_stream_frees_its_features_in_the_next_plan():
    planner = BatchPlanner(SchedulerConfig())
    planner.submit(window("gone", 0))
    planner.forget("gone")
    planner.free("gone")
    plan = planner.next_plan(now=0.0)
    assert plan.windows == [] and plan.free == ["gone"] and not planner.has_work


async def test_one_off_captions_go_through_the_planner_within_max_batch_beside_live_windows(tiny_model):
    # 16 one-off windows (what /v1/caption/videos may send) while live windows keep coming:
    # every batch stays within max_batch, live windows are never held back, the one-off
    # captions equal captioning each window alone, and their cached features are freed.
    from streamer.engine import Engine, EngineConfig
    from tests.support.media import moving_square

    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    reference = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6, cache_frames=0))
    imgs = moving_square(12, seed=3)
    clips = [Window(f"_clip.{i}", 0, tuple(Frame(f"_clip.{i}", j, j / 6, imgs[(i + j) % 12]) for j in range(6)))
             for i in range(16)]
    live = [Window("cam", k, tuple(Frame("cam", j, j / 6, imgs[j]) for j in range(k, k + 6))) for k in range(6)]
    batches: list[list[str]] = []
    published: list[Caption] = []
    real_caption = engine.caption

    def caption(batch, max_new_tokens=None):
        batches.append([w.stream_id for w in batch])
        return real_caption(batch, max_new_tokens)

    scheduler = Scheduler(caption, published.extend, SchedulerConfig(max_batch=4, max_wait=0.0, max_pending_per_stream=8),
                          forget_fn=engine.forget_stream)
    scheduler.start()
    one_off = asyncio.ensure_future(scheduler.caption(clips, 4))
    for w in live:
        scheduler.submit(w)
    results = await asyncio.wait_for(one_off, 60)
    await scheduler.close(drain=True)
    assert max(len(b) for b in batches) <= 4
    assert [c.stream_id for c in results] == [w.stream_id for w in clips]
    assert [c.text for c in results] == [reference.caption([w], 4)[0].text for w in clips]
    assert sorted(c.index for c in published) == list(range(6))
    last_live = max(i for i, b in enumerate(batches) if "cam" in b)
    first_one_off = min(i for i, b in enumerate(batches) if any(s.startswith("_clip") for s in b))
    assert last_live < first_one_off  # live windows first
    assert not any((w.stream_id, f.seq) in engine.cache for w in clips for f in w.frames)  # freed
    assert any(("cam", f.seq) in engine.cache for f in live[-1].frames)  # live features kept


def test_one_off_work_waiting_is_bounded_with_a_clear_refusal():
    import pytest

    from streamer.pipeline.scheduler import SchedulerBusy

    planner = BatchPlanner(SchedulerConfig(max_batch=2, max_request_windows=4))
    planner.submit_request(_request([window(f"_a.{i}", 0) for i in range(3)]))
    with pytest.raises(SchedulerBusy, match="3 one-off windows waiting"):
        planner.submit_request(_request([window(f"_b.{i}", 0) for i in range(2)]))
    planner.next_plan(now=0.0)  # two of the three are taken: room for two more
    planner.submit_request(_request([window(f"_b.{i}", 0) for i in range(2)]))
    assert sum(len(p.windows) for p in (planner.next_plan(0.0), planner.next_plan(0.0))) == 3
