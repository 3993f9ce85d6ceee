"""`Daemon.ask` on the real daemon (`serve()` in-process) over a real clip played as a live stream,
against the tiny GIT checkpoint: questions about now and about a recent media time, the errors
a caller sees, the image-token cache freed with the history and the stream, and live captions
that keep their pace while questions come in."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from streamer.pipeline.daemon import DaemonConfig, OutOfHistory, StreamNotFound
from streamer.pipeline.scheduler import SchedulerBusy, SchedulerConfig
from streamer.types import Frame, Window
from tests.support.daemon import add_stream, captions_of, count_for, read_messages, running_daemon
from tests.support.media import moving_square

pytestmark = pytest.mark.timeout(120)


def metric(daemon, name: str, **labels) -> float:
    for family in text_string_to_metric_families(daemon.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def kept(daemon, stream_id: str) -> list[int]:
    """Indices of the stream's windows whose image keys/values the engine keeps (read on the engine thread)."""
    cache = daemon.engine.kv_cache
    return await daemon.scheduler.run_exclusive(lambda: sorted(i for s, i in cache.windows() if s == stream_id))


async def test_questions_about_now_and_a_recent_media_time(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        daemon = d.daemon
        async with websockets.connect(d.ws + "?all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip_10s), history=2.0)  # window 1 s, hop 0.5 s
            with pytest.raises(OutOfHistory, match="no captioned window yet"):
                await daemon.ask("cam", "what is it?")  # 1 s of media has not played yet
            messages = await read_messages(ws, count_for("cam", 8), timeout=60)
        last_seen = captions_of(messages, "cam")[-1]
        history = daemon.streams["cam"].history
        assert history.capacity == 5

        # now: the newest captioned window, at least as new as the last caption a client saw
        answer = await daemon.ask("cam", "  what   is it? ", request_id="r-1")
        assert answer.stream_id == "cam" and answer.index >= last_seen["index"]
        assert answer.question == "what is it?" and answer.request_id == "r-1" and answer.answer
        assert answer.model == daemon.engine.model_name and answer.confidence <= 0 and answer.emit_time > 0
        window = next(e.window for e in history.entries() if e.window.index == answer.index)
        assert (answer.start, answer.end) == (window.start, window.end)
        (direct,) = await daemon.scheduler.run_exclusive(daemon.engine.answer, [(window, "what is it?")])
        assert (answer.answer, answer.confidence) == (direct.answer, pytest.approx(direct.confidence, abs=1e-5))

        # `at`: the window of the history about that media time (the clip's media time starts at 2.0 s)
        middle = history.entries()[2].window  # leaves the history two hops from now at the earliest
        at = (middle.start + middle.end) / 2  # no other window holds it (windows 1 s long, one every 0.5 s)
        past = await daemon.ask("cam", "what is it?", at=at)
        assert (past.index, past.start, past.end) == (middle.index, middle.start, middle.end)
        start, end = history.span()
        for outside in (start - 5.0, end + 5.0, 1e9):
            with pytest.raises(OutOfHistory, match="outside stream 'cam'"):
                await daemon.ask("cam", "what is it?", at=outside)
        with pytest.raises(StreamNotFound):
            await daemon.ask("nope", "what is it?")
        with pytest.raises(ValueError, match="empty"):
            await daemon.ask("cam", "   ")
        with pytest.raises(ValueError, match="at most 512"):
            await daemon.ask("cam", "x" * 513)
        with pytest.raises(ValueError, match="text positions"):
            await daemon.ask("cam", "what is it?", max_new_tokens=100)

        # a window of no live stream (the one-off APIs): answered through the same scheduler, its features freed
        one_off = Window("_one", 0, tuple(Frame("_one", j, j / 6, img) for j, img in enumerate(moving_square(6, 32, 32))))
        (alone,) = await daemon.scheduler.run_exclusive(daemon.engine.answer, [(one_off, "what is it?")])
        assert all(("_one", f.seq) in daemon.engine.cache for f in one_off.frames)
        assert (await daemon.ask_window(one_off, "what is it?")).answer == alone.answer
        assert not any(("_one", f.seq) in daemon.engine.cache for f in one_off.frames)
        with pytest.raises(SchedulerBusy, match="256"):  # over the one-off limit: refused whole, nothing queued
            await daemon.ask_windows([(one_off, "what is it?")] * 257)

        assert metric(daemon, "streamer_questions_total", result="answered") == 3
        assert metric(daemon, "streamer_questions_total", result="busy") == 257
        assert metric(daemon, "streamer_questions_total", result="out_of_history") == 4
        assert metric(daemon, "streamer_questions_total", result="not_found") == 1
        assert metric(daemon, "streamer_questions_total", result="invalid") == 3
        assert metric(daemon, "streamer_engine_kv_hit_ratio") > 0

        # the engine keeps image keys/values for the history's windows only: once the clip has played
        # to its end (no more windows), exactly those; none once the stream is gone
        async with websockets.connect(d.ws + "?all=1") as ws:
            await read_messages(ws, lambda ms: any(m["type"] == "state" and m["stream_id"] == "cam"
                                                   and m["state"] == "stopped" for m in ms), timeout=60)
        assert await settled(daemon, lambda kept: kept == [e.window.index for e in history.entries()])
        assert len(history) == history.capacity
        await daemon.remove_stream("cam")
        assert await settled(daemon, lambda kept: kept == [])


async def settled(daemon, check, timeout: float = 10.0) -> bool:
    """Whether `check(kept indices of "cam")` comes true: frees ride the scheduler's next plan."""
    deadline = time.monotonic() + timeout
    while not check(await kept(daemon, "cam")):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_live_captions_keep_their_pace_while_questions_are_asked(tiny_model, clip_10s):
    config = DaemonConfig(scheduler=SchedulerConfig(pipeline=True))  # the GPU order, on the CPU
    async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http:
        daemon = d.daemon
        async with websockets.connect(d.ws + "?all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip_10s), hop=0.5)
            await read_messages(ws, count_for("cam", 2), timeout=60)
            answers: list = []
            stop = asyncio.Event()

            async def keep_asking(question: str) -> None:
                while not stop.is_set():
                    answers.append(await daemon.ask("cam", question))

            askers = [asyncio.create_task(keep_asking(q)) for q in ("what is it?", "is it red?", "how many squares")]
            started = time.monotonic()
            messages = await read_messages(ws, count_for("cam", 8), timeout=60)
            elapsed = time.monotonic() - started
            stop.set()
            await asyncio.gather(*askers)
        during = captions_of(messages, "cam")
        indices = [c["index"] for c in during]
        assert indices == list(range(indices[0], indices[0] + len(indices)))  # not one window dropped
        assert daemon.scheduler.planner.dropped.get("cam", 0) == 0
        assert max(c["latency"] for c in during) < 1.0
        assert elapsed < len(during) * 0.5 + 1.0  # a caption every hop, as without questions
        assert len(answers) >= 8 and all(a.answer for a in answers)
        # asked about the newest window, whose image keys/values its caption left: no image prefill
        assert metric(daemon, "streamer_engine_kv_hits_total") == len(answers)
        assert metric(daemon, "streamer_engine_kv_misses_total") == 0
        print(json.dumps({"captions": len(during), "questions": len(answers), "seconds": round(elapsed, 2),
                          "max_latency": max(c["latency"] for c in during)}))
