"""Questions in the engine (issue #13): text prefixes in mixed batches, the image-token cache,
the window history and the planner's question jobs.

Real checkpoints only: the tiny random-weight GIT built from a config (tests/conftest.py) and
the bundled world-git. The reference for every answer is transformers' own
`model.generate(pixel_values=..., input_ids=[CLS] + question)` (greedy).
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from streamer.defaults import BUNDLED_MODEL
from streamer.engine import Engine, EngineConfig
from streamer.engine.cache import ImageKVCache
from streamer.pipeline.history import OutOfHistory, WindowHistory
from streamer.pipeline.scheduler import BatchPlanner, EngineFailed, Request, Scheduler, SchedulerBusy, SchedulerConfig
from streamer.types import Caption, Frame, Window
from tests.support.media import moving_square
from tests.support.models import greedy_reference as reference

QUESTIONS = ["what is it?", "is there a red circle moving to the left of the picture?", "how many", "colour"]


def window_of(images, stream="s", index=0, t0=0.0) -> Window:
    return Window(stream, index, tuple(Frame(stream, index * 100 + j, t0 + j / 6, img) for j, img in enumerate(images)))


def squares(count: int, size: int = 32, seed: int = 0) -> list[Window]:
    return [window_of(moving_square(6, size, size, seed=seed + i), stream=f"w{i}") for i in range(count)]


def count_calls(monkeypatch, runner, *names: str) -> dict[str, int]:
    """Count the runner's real calls (the real functions still run)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(runner, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(runner, name, counted)
    return counts


@pytest.fixture(scope="module")
def bundled() -> Engine:
    return Engine.load(EngineConfig(model=str(BUNDLED_MODEL), max_new_tokens=12, threads=1))


# -- prefixes in the engine ---------------------------------------------------------------------


def test_a_question_alone_is_answered_like_transformers_generate(tiny_engine):
    (window,) = squares(1, seed=3)
    for question in QUESTIONS:
        (answer,) = tiny_engine.answer([(window, question)], max_new_tokens=8)
        text, mean_logp = reference(tiny_engine, window, question, 8)
        assert answer.answer == text and text
        assert answer.confidence == pytest.approx(mean_logp, abs=1e-4)
        assert (answer.stream_id, answer.index, answer.start, answer.end) == ("w0", 0, window.start, window.end)
        assert answer.question == question and answer.model == tiny_engine.model_name


def test_a_mixed_batch_answers_each_row_as_if_it_were_alone(tiny_model):
    # different windows, questions of different lengths; rows finish at different steps (40 tokens: some hit [SEP])
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=20, cache_frames=0))
    windows = squares(4, seed=10)
    items = [(windows[i % 4], q) for i, q in enumerate(QUESTIONS + QUESTIONS[::-1])]
    together = engine.answer(items)
    alone = [engine.answer([item])[0] for item in items]
    assert [a.answer for a in together] == [a.answer for a in alone]
    assert [a.confidence for a in together] == pytest.approx([a.confidence for a in alone], abs=1e-4)
    assert [a.answer for a in together] == [reference(engine, w, q, 20)[0] for w, q in items]
    assert len({a.answer for a in together}) > 1  # the rows really differ


def test_caption_prompts_mix_with_prefix_free_rows_in_one_batch(tiny_model):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=10, cache_frames=0))
    windows = squares(5, seed=20)
    prompts = [None, "a photo of", None, "the square moves", "a"]
    together = engine.caption(windows, prompts=prompts)
    assert [c.text for c in together] == [reference(engine, w, p, 10)[0] for w, p in zip(windows, prompts)]
    plain = engine.caption([windows[0], windows[2]])  # the prompt-free rows caption as without prompts
    assert [together[0].text, together[2].text] == [c.text for c in plain]
    assert together[1].text != engine.caption([windows[1]])[0].text  # the prompt conditions the caption


def test_the_masked_loop_answers_like_the_compact_one(tiny_model):
    compact = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=40, cache_frames=0, greedy="compact"))
    masked = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=40, cache_frames=0, greedy="masked",
                                      sync_every=3))
    windows = squares(3, seed=30)
    items = [(windows[i % 3], q) for i, q in enumerate(QUESTIONS)]
    a, b = compact.answer(items), masked.answer(items)
    assert [x.answer for x in b] == [x.answer for x in a]
    assert [x.confidence for x in b] == pytest.approx([x.confidence for x in a], abs=1e-4)
    prompts = [None, "a photo of", None]
    assert [c.text for c in masked.caption(windows, prompts=prompts)] == [c.text for c in compact.caption(windows, prompts=prompts)]


def test_the_bundled_model_answers_alone_and_in_a_batch_like_generate(bundled):
    from streamer.engine.prompts import split_answer
    from streamer.training.evaluate import synthetic_clips

    windows = [w for w, _ in synthetic_clips(3, seed=7, frames=bundled.num_frames, size=64)]
    items = [(windows[0], "what colour is it ?"), (windows[1], "how many are there ?"),
             (windows[2], "is there a red circle ?"), (windows[0], "which way does it move ?")]
    together = bundled.answer(items)
    for (window, question), answer in zip(items, together):
        text, mean_logp = reference(bundled, window, question, 12)
        assert answer.answer == split_answer(text, bundled.answer_marker)[1]
        if bundled.answer_marker is None:  # else the confidence is over the answer's tokens only
            assert answer.confidence == pytest.approx(mean_logp, abs=1e-4)
    assert [a.answer for a in together] == [bundled.answer([item])[0].answer for item in items]


def test_questions_are_checked_before_they_reach_a_batch(tiny_engine, bundled):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.check_question("  \n ")
    with pytest.raises(ValueError, match="at most 512"):
        tiny_engine.check_question("is it red " * 60)
    # the tiny model has 64 text positions: a question plus its answer tokens must fit
    with pytest.raises(ValueError, match="64 text positions"):
        tiny_engine.check_question(" ".join(["red"] * 60), max_new_tokens=8)
    assert tiny_engine.check_question("  what   colour is it? ") == "what colour is it?"
    with pytest.raises(ValueError, match="max_new_tokens"):
        bundled.check_question("what colour is it ?", max_new_tokens=0)


# -- the image-token cache --------------------------------------------------------------------


def test_a_question_about_a_kept_window_runs_only_its_own_tokens(tiny_model, monkeypatch):
    windows = squares(3, seed=40)
    cold = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=8, cache_frames=0))
    items = [(w, q) for w in windows for q in QUESTIONS[:2]]
    expected = cold.answer(items)  # nothing kept: every window encoded and prefilled

    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=8))
    engine.caption(windows, keep_kv=2)  # the first two are live windows: kept
    counts = count_calls(monkeypatch, engine.runner, "encode", "prefill")
    kept = [(w, q) for w, q in items if w is not windows[2]]
    got = engine.answer(kept)
    assert counts == {"encode": 0, "prefill": 0}  # no vision tower, no pass over image tokens
    want = [a for a in expected if a.stream_id != "w2"]
    assert [a.answer for a in got] == [a.answer for a in want]
    assert [a.confidence for a in got] == pytest.approx([a.confidence for a in want], abs=1e-5)
    assert (engine.stats.kv_hits, engine.stats.kv_misses) == (4, 0)

    # the third was captioned but not kept: its features are cached, its image part is recomputed once
    got = engine.answer([(windows[2], q) for q in QUESTIONS[:2]])
    assert counts == {"encode": 0, "prefill": 1}  # one row for both questions
    want = [a for a in expected if a.stream_id == "w2"]
    assert [a.answer for a in got] == [a.answer for a in want]
    assert [a.confidence for a in got] == pytest.approx([a.confidence for a in want], abs=1e-5)
    assert engine.stats.kv_misses == 2


def test_the_cache_serves_only_the_window_it_was_made_from(tiny_model, monkeypatch):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6, cache_frames=0))
    old = window_of(moving_square(6, 32, 32, seed=1), stream="cam")
    engine.caption([old], keep_kv=1)
    new = window_of(moving_square(6, 32, 32, seed=2), stream="cam")  # a re-added stream's window 0
    counts = count_calls(monkeypatch, engine.runner, "prefill")
    (answer,) = engine.answer([(new, "what is it?")])
    assert counts["prefill"] == 1 and answer.answer == reference(engine, new, "what is it?", 6)[0]


def test_the_cache_is_bounded_by_entries_and_bytes_and_frees_with_its_windows(tiny_model):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=4, kv_cache_windows=3))
    live = [window_of(moving_square(6, 32, 32, seed=i), stream="cam", index=i) for i in range(5)]
    for w in live:
        engine.caption([w], keep_kv=1)
    assert [("cam", i) in engine.kv_cache for i in range(5)] == [False, False, True, True, True]  # the newest
    row_bytes = engine.kv_cache.bytes // 3
    assert engine.stats.kv_cache_windows == 3 and engine.stats.kv_cache_bytes == 3 * row_bytes > 0
    engine.forget_window("cam", 3)  # left the history
    assert ("cam", 3) not in engine.kv_cache and engine.kv_cache.bytes == 2 * row_bytes
    engine.caption([window_of(moving_square(6, 32, 32), stream="other")], keep_kv=1)
    engine.forget_stream("cam")  # stream removed
    assert len(engine.kv_cache) == 1 and engine.kv_cache.bytes == row_bytes and engine.stats.kv_cache_windows == 1

    by_bytes = ImageKVCache(max_entries=100, max_bytes=250)
    for i in range(4):
        by_bytes.put(live[i], object(), 100)
    assert len(by_bytes) == 2 and by_bytes.bytes == 200  # the two newest fit in 250 bytes
    by_bytes.put(live[4], object(), 300)  # larger than the whole budget: not kept
    assert ("cam", 4) not in by_bytes and by_bytes.bytes == 200


def test_one_off_windows_are_not_kept(tiny_engine):
    before = len(tiny_engine.kv_cache)
    tiny_engine.caption(squares(3, seed=50))  # keep_kv=0: HTTP clips, evaluation
    tiny_engine.answer([(squares(1, seed=51)[0], "what is it?")])
    assert len(tiny_engine.kv_cache) == before


# -- the window history -------------------------------------------------------------------------


def _entry(index: int, start: float, length: float = 3.0, stream: str = "cam") -> tuple[Window, Caption]:
    img = np.zeros((2, 2, 3), np.uint8)
    frames = tuple(Frame(stream, index * 10 + j, start + j * length / 5, img) for j in range(6))
    window = Window(stream, index, frames)
    return window, Caption(stream, index, window.start, window.end, f"caption {index}", -0.1, "m")


def test_history_keeps_the_windows_of_its_horizon_and_says_which_leave():
    history = WindowHistory("cam", horizon=30.0, hop=1.0)
    assert history.capacity == 31
    gone: list[int] = []
    for i in range(40):
        gone += [w.index for w in history.add(*_entry(i, float(i)))]
    assert len(history) == 31 and gone == list(range(9))
    assert history.span() == (9.0, 42.0)
    assert history.newest().caption.text == "caption 39"
    # a gap in the stream: windows older than the horizon leave even below the count bound
    assert [w.index for w in history.add(*_entry(40, 100.0))] == list(range(9, 40))
    assert [w.index for w in WindowHistory("x", 0, 1.0).add(*_entry(0, 0.0))] == []
    assert [w.index for w in history.clear()] == [40] and len(history) == 0


def test_history_finds_the_window_about_a_media_time():
    history = WindowHistory("cam", horizon=10.0, hop=1.0)
    for i in range(5):
        history.add(*_entry(i, 10.0 + i))  # windows [10, 13], [11, 14], ... [14, 17]
    assert history.at(10.2).window.index == 0  # only window 0 holds it
    assert history.at(13.0).window.index == 2  # windows 0-3 hold it; 1 and 2 have their middles nearest: the newer
    assert history.at(16.9).window.index == 4
    assert history.at(17.8).window.index == 4  # after the newest, within a hop
    assert history.at(9.5).window.index == 0  # before the oldest, within a hop
    with pytest.raises(OutOfHistory, match=r"at=25 s is outside stream 'cam'.s history, which holds media 10.000-17.000 s"):
        history.at(25.0)
    with pytest.raises(OutOfHistory, match="finite"):
        history.at(math.nan)
    with pytest.raises(OutOfHistory, match="no captioned window yet"):
        WindowHistory("empty", 30.0, 1.0).at(1.0)
    assert issubclass(OutOfHistory, ValueError)


# -- questions in the planner --------------------------------------------------------------------


def window(stream: str, index: int) -> Window:
    return Window(stream, index, (Frame(stream, index, float(index), np.zeros((2, 2, 3), np.uint8)),))


def _request(windows, max_new_tokens=None, submitted=0.0, questions=None, free_after=True) -> Request:
    loop = asyncio.new_event_loop()
    try:
        return Request(list(windows), max_new_tokens, submitted, loop.create_future(),
                       questions=questions, free_after=free_after)
    finally:
        loop.close()


def test_questions_fill_plans_after_live_windows_with_their_own_token_limit():
    planner = BatchPlanner(SchedulerConfig(max_batch=4, max_pending_per_stream=4, request_max_wait=10.0))
    asked = [_request([window("cam", 0)], 6, questions=[f"q{i}"], free_after=False) for i in range(3)]
    for r in asked:
        planner.submit_request(r)
    for i in range(3):
        planner.submit(window("cam", i))
    plan = planner.next_plan(now=1.0)
    assert [w.stream_id for w in plan.windows] == ["cam"] * 3 and plan.max_new_tokens is None and plan.live == 3
    assert [r for r, _ in plan.questions] == asked[:1] and plan.question_max_new_tokens == 6  # max_batch 4 in all
    assert plan.items == [(asked[0].windows[0], "q0")] and plan.free == []  # a live stream's features stay
    plan = planner.next_plan(now=1.0)
    assert plan.windows == [] and [r for r, _ in plan.questions] == asked[1:]
    assert not planner.has_work


def test_questions_of_another_token_limit_wait_for_a_plan_of_their_own():
    planner = BatchPlanner(SchedulerConfig(max_batch=8))
    first, second = _request([window("a", 0)], 4, questions=["q"]), _request([window("b", 0)], 9, questions=["q"])
    planner.submit_request(first)
    planner.submit_request(second)
    plan = planner.next_plan(now=0.0)
    assert [r for r, _ in plan.questions] == [first] and plan.free == ["a"]  # a one-off window: freed once answered
    plan = planner.next_plan(now=0.0)
    assert [r for r, _ in plan.questions] == [second] and plan.question_max_new_tokens == 9


def test_an_overdue_question_goes_before_live_windows():
    planner = BatchPlanner(SchedulerConfig(max_batch=2, max_pending_per_stream=8, request_max_wait=2.0))
    question = _request([window("cam", 0)], questions=["q"], submitted=0.0, free_after=False)
    planner.submit_request(question)
    for i in range(4):
        planner.submit(window("cam", i))
    planner.submit(window("cam2", 0))
    assert planner.next_plan(now=0.5).questions == []  # live windows fill the batch
    plan = planner.next_plan(now=2.5)
    assert plan.windows == [] and [r for r, _ in plan.questions] == [question]


def test_questions_count_against_the_one_off_limit_and_freed_windows_ride_the_next_plan():
    planner = BatchPlanner(SchedulerConfig(max_batch=2, max_request_windows=3))
    planner.submit_request(_request([window("_a", 0)] * 3, questions=["q"] * 3))
    with pytest.raises(SchedulerBusy, match="3 one-off windows waiting"):
        planner.submit_request(_request([window("_b", 0)], questions=["q"]))
    cancelled = _request([window("_c", 0)], questions=["q"])
    planner.next_plan(0.0)
    planner.submit_request(cancelled)
    cancelled.future.cancel()  # the asker went away
    planner.free_window("cam", 7)
    plan = planner.next_plan(0.0)
    assert len(plan.questions) == 1 and plan.free_windows == [("cam", 7)] and plan.free == ["_a"]
    assert not planner.has_work


async def test_questions_and_live_windows_through_the_pipelined_scheduler(tiny_model):
    # the GPU order (prepare k+1, then finish k) on CPU, with questions waiting beside live windows:
    # every live window captioned once, every question answered as the engine answers it alone,
    # from the image keys/values its window's caption left
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    reference_engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6, cache_frames=0))
    imgs = moving_square(20, 32, 32, seed=7)
    live = [Window("cam", k, tuple(Frame("cam", j, j / 6, imgs[j]) for j in range(k * 2, k * 2 + 6))) for k in range(6)]
    published: list[Caption] = []
    seen: dict[int, Window] = {}
    captioned = asyncio.Event()

    def on_live(windows, captions):
        seen.update({w.index: w for w in windows})
        captioned.set()

    scheduler = Scheduler(
        engine.caption, published.extend, SchedulerConfig(max_batch=2, max_wait=0.0, max_pending_per_stream=8),
        pipeline=(engine.prepare, engine.finish), answer_fn=engine.answer, keep_live_kv=True, on_live=on_live,
        forget_fn=engine.forget_stream, forget_window_fn=engine.forget_window,
    )
    scheduler.start()
    for w in live[:2]:
        scheduler.submit(w)
    await asyncio.wait_for(captioned.wait(), 30)
    asked = [(seen[min(seen)], q) for q in QUESTIONS]
    answering = asyncio.ensure_future(asyncio.gather(*(scheduler.ask([item], free_after=False) for item in asked)))
    for w in live[2:]:
        scheduler.submit(w)
    answers = [a for (a,) in await asyncio.wait_for(answering, 30)]
    scheduler.free_window("cam", 0)
    await scheduler.close(drain=True)
    assert sorted(c.index for c in published) == list(range(6))
    assert [a.answer for a in answers] == [reference_engine.answer([item])[0].answer for item in asked]
    assert engine.stats.kv_hits >= 1 and engine.stats.kv_misses == 0
    assert ("cam", 0) not in engine.kv_cache and ("cam", 5) in engine.kv_cache


async def test_a_failing_question_batch_costs_no_live_caption(tiny_model):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=4))
    published: list[Caption] = []
    failures: list[int] = []
    scheduler = Scheduler(engine.caption, published.extend, SchedulerConfig(max_batch=4, max_wait=0.05),
                          answer_fn=engine.answer, keep_live_kv=True, on_failure=lambda n, _e: failures.append(n))
    scheduler.start()
    broken = Window("_broken", 0, ())  # no frames: the engine raises on it
    scheduler.submit(squares(1, seed=60)[0])
    with pytest.raises(EngineFailed, match="the engine failed on this batch"):
        await asyncio.wait_for(scheduler.ask([(broken, "what is it?")]), 30)
    (answer,) = await scheduler.ask([(squares(1, seed=61)[0], "what is it?")])
    await scheduler.close(drain=True)
    assert [c.stream_id for c in published] == ["w0"] and answer.answer and failures == [1]


# -- the ONNX backends ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install 'streamer[onnx]')")
    from streamer.engine.export import export_model

    return export_model(str(tiny_model), tmp_path_factory.mktemp("exports") / "tiny", verify=False)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_backends_answer_like_torch_through_the_unchanged_step_graph(tiny_export, tiny_model, backend):
    from streamer.engine.onnx_runners import available_backends, open_runner

    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    reference = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=8, cache_frames=0))
    runner = open_runner(backend, tiny_export, dtype="float32", device="cpu", threads=1)
    exported = Engine(runner, EngineConfig(max_new_tokens=8))
    windows = squares(3, seed=70)
    exported.caption(windows[:2], keep_kv=2)  # kept rows are numpy arrays here
    items = [(windows[i % 3], q) for i, q in enumerate(QUESTIONS)]
    got, want = exported.answer(items), reference.answer(items)
    assert [a.answer for a in got] == [a.answer for a in want]
    assert [a.confidence for a in got] == pytest.approx([a.confidence for a in want], abs=1e-3)
    assert exported.stats.kv_hits == 3 and exported.stats.kv_misses == 1
