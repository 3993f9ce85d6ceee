"""`--qa-model` (issue #13): a QA checkpoint beside the caption one, on one scheduler and one
engine thread, each model with its own feature and image-token caches.

Real checkpoints only: three tiny random-weight GITs built from one config with different seeds
(so their outputs differ), saved with save_pretrained and loaded by path through the real loader.
Every answer's reference is the answering model's own transformers
`model.generate(pixel_values=..., input_ids=[CLS] + question)` (greedy). The daemon is the real
`serve()` over a real clip played live, asked over real HTTP; the CLI is the real `streamer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from streamer.cli import main
from streamer.cli.serve import load_config, serve
from streamer.engine import Engine, EngineConfig
from streamer.errors import StreamerError
from streamer.pipeline.offline import CaptionJob, answer_file
from streamer.pipeline.sampler import SamplerConfig
from streamer.pipeline.scheduler import EngineFailed, Scheduler, SchedulerConfig
from streamer.types import Caption, Frame, Window
from tests.support.daemon import Running, add_stream, captions_of, read_messages, trusting_policy
from tests.support.media import moving_square
from tests.support.models import greedy_reference, save_git_checkpoint, tiny_config

pytestmark = pytest.mark.timeout(120)

QUESTION = "what is it?"
TOKENS = 4


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    """The QA checkpoint: the caption model's shape, other weights (seed 1)."""
    return save_git_checkpoint(tmp_path_factory.mktemp("models") / "qa-git", tiny_config(), seed=1)


@pytest.fixture(scope="module")
def qa_model_2(tmp_path_factory):
    """A second QA checkpoint that a stream may pick ([model] qa_models), seed 2."""
    return save_git_checkpoint(tmp_path_factory.mktemp("models") / "qa-git-2", tiny_config(), seed=2)


def load(path) -> Engine:
    return Engine.load(EngineConfig(model=str(path), max_new_tokens=TOKENS, threads=1))


def generate(engine: Engine, window: Window, question: str | None) -> str:
    """transformers' greedy generate after [CLS] (+ the question) on the window: the text after the prefix."""
    return greedy_reference(engine, window, question, TOKENS)[0]


def live_windows(count: int, stream: str = "cam", seed: int = 5) -> list[Window]:
    """Overlapping windows of a stream, sharing Frame objects as the sampler's do."""
    frames = [Frame(stream, j, j / 6, img) for j, img in enumerate(moving_square(6 + 2 * count, 32, 32, seed=seed))]
    return [Window(stream, k, tuple(frames[2 * k : 2 * k + 6])) for k in range(count)]


# -- one scheduler, batches per model -----------------------------------------------------------


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
async def test_one_step_captions_and_answers_each_question_with_its_own_model(tiny_model, qa_model, pipelined):
    caption_engine, qa = load(tiny_model), load(qa_model)
    reference_caption, reference_qa = load(tiny_model), load(qa_model)  # untouched by the scheduler's caches
    published: list[Caption] = []
    steps: list[int] = []
    failures: list[int] = []

    def forget_stream(stream_id: str) -> None:
        caption_engine.forget_stream(stream_id)
        qa.forget_stream(stream_id)

    def forget_window(stream_id: str, index: int) -> None:
        caption_engine.forget_window(stream_id, index)
        qa.forget_window(stream_id, index)

    scheduler = Scheduler(
        caption_engine.caption, published.extend, SchedulerConfig(max_batch=8, max_wait=0.0, max_pending_per_stream=8),
        answer_fn=caption_engine.answer, answer_fns={"qa": qa.answer}, keep_live_kv=True,
        forget_fn=forget_stream, forget_window_fn=forget_window,
        on_batch=lambda size, _s: steps.append(size), on_failure=lambda size, _e: failures.append(size),
        pipeline=(caption_engine.prepare, caption_engine.finish) if pipelined else None,  # the GPU order, on the CPU
    )
    live = live_windows(6)
    for window in live[:3]:
        scheduler.submit(window)
    # before the loop starts: all of it is one plan (3 live windows, 3 questions)
    asked = [
        asyncio.ensure_future(scheduler.ask([(live[0], QUESTION)], free_after=False)),  # the caption model
        asyncio.ensure_future(scheduler.ask([(live[1], QUESTION)], free_after=False, model="qa")),
        asyncio.ensure_future(scheduler.ask([(live[0], QUESTION)], free_after=False, model="qa")),
    ]
    await asyncio.sleep(0)
    scheduler.start()
    (by_caption,), (by_qa,), (by_qa_0,) = await asyncio.wait_for(asyncio.gather(*asked), 60)
    assert steps == [6]
    assert [c.text for c in published] == [generate(reference_caption, w, None) for w in live[:3]]
    assert by_caption.answer == generate(reference_caption, live[0], QUESTION) and by_caption.model == str(tiny_model)
    assert by_qa.answer == generate(reference_qa, live[1], QUESTION) and by_qa.model == str(qa_model)
    assert by_qa_0.answer == generate(reference_qa, live[0], QUESTION)
    assert by_qa_0.answer and by_qa_0.answer != generate(reference_caption, live[0], QUESTION)  # the models differ
    # the caption model answered from its caption's image keys/values; the QA model computed its own and kept them
    assert (caption_engine.stats.kv_hits, caption_engine.stats.kv_misses) == (1, 0)
    assert (qa.stats.kv_hits, qa.stats.kv_misses) == (0, 2)
    assert ("cam", 0) in qa.kv_cache and ("cam", 1) in qa.kv_cache

    # a second question about a window the QA model has seen: no vision, no image prefill
    encoded, prefill = qa.stats.frames_encoded, qa.stats.prefill_seconds
    (again,) = await scheduler.ask([(live[1], QUESTION)], free_after=False, model="qa")
    assert again.answer == by_qa.answer
    assert (qa.stats.kv_hits, qa.stats.kv_misses) == (1, 2)
    assert (qa.stats.frames_encoded, qa.stats.prefill_seconds) == (encoded, prefill)

    # a failing QA batch fails its own questions only: the captions and the caption model's answer in that step stand
    broken = Window("_broken", 0, ())  # no frames: the engine raises on it
    scheduler.submit(live[3])
    failing = asyncio.ensure_future(scheduler.ask([(broken, QUESTION)], model="qa"))
    fine = asyncio.ensure_future(scheduler.ask([(live[2], QUESTION)], free_after=False))
    with pytest.raises(EngineFailed, match="the engine failed on this batch"):
        await asyncio.wait_for(failing, 30)
    (answer,) = await asyncio.wait_for(fine, 30)
    assert answer.answer == generate(reference_caption, live[2], QUESTION)
    assert failures == [1] and published[-1].index == 3

    # a window freed while a QA question about it still waits is not kept by that question
    few = Scheduler(caption_engine.caption, published.extend, SchedulerConfig(max_batch=1, max_wait=0.0),
                    answer_fn=caption_engine.answer, answer_fns={"qa": qa.answer}, forget_fn=forget_stream,
                    forget_window_fn=forget_window)
    waiting = [asyncio.ensure_future(few.ask([(w, QUESTION)], free_after=False, model="qa")) for w in live[4:6]]
    await asyncio.sleep(0)
    few.free_window("cam", 5)  # runs with the first plan; the question about window 5 runs in the second
    few.start()
    await asyncio.wait_for(asyncio.gather(*waiting), 30)
    await few.close()
    assert ("cam", 4) in qa.kv_cache and ("cam", 5) not in qa.kv_cache

    # a stream gone: every engine drops its caches of it
    scheduler.forget("cam")
    await scheduler.close(drain=True)
    for engine in (caption_engine, qa):
        assert not any(s == "cam" for s, _ in engine.kv_cache.windows())
        assert not any(f.key in engine.cache for w in live for f in w.frames)


# -- the daemon ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(config_path):
    """`serve()` in this loop from a streamer.toml, as `streamer serve --config` runs it."""
    config = load_config(str(config_path))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, sources=trusting_policy()))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result(Running(port, d)), stop=stop))
    done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def on_engine(daemon, fn, *args):
    return await daemon.scheduler.run_exclusive(fn, *args)


async def until(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_the_daemon_answers_with_each_streams_qa_model(tmp_path, tiny_model, qa_model, qa_model_2, clip_10s):
    toml = tmp_path / "streamer.toml"
    toml.write_text(f'[model]\nid = "{tiny_model}"\nmax_new_tokens = {TOKENS}\nthreads = 1\n'
                    f'qa_model = "{qa_model}"\nqa_models = ["{qa_model_2}"]\n[server]\nport = 0\n')
    streams = {"cam": {}, "cam2": {"qa_model": str(qa_model_2)}, "cam3": {"qa_model": str(tiny_model)}}
    async with serving(toml) as d, aiohttp.ClientSession() as http:
        daemon = d.daemon
        qa, qa2 = daemon.qa_engines[str(qa_model)], daemon.qa_engines[str(qa_model_2)]
        async with websockets.connect(d.ws + "?all=1") as ws:
            for stream_id, extra in streams.items():
                await add_stream(http, d, id=stream_id, url=str(clip_10s), history=3.0, **extra)
            # a model nobody configured: refused, nothing loaded, nothing else disturbed
            elsewhere = tmp_path / "elsewhere"
            save_git_checkpoint(elsewhere, tiny_config(), seed=3)
            async with http.post(f"{d.http}/streams", json={"id": "bad", "url": str(clip_10s), "qa_model": str(elsewhere)}) as resp:
                refused = await resp.json()
                assert resp.status == 400, refused
            assert refused["error"]["code"] == "bad_stream" and "is not one of this daemon's models" in refused["error"]["message"]
            assert "bad" not in daemon.streams and set(daemon.qa_engines) == {str(qa_model), str(qa_model_2)}
            messages = await read_messages(ws, lambda ms: all(len(captions_of(ms, s)) >= 3 for s in streams), timeout=60)

        # live captions are the caption model's, whatever model answers the stream's questions
        assert {c["model"] for c in captions_of(messages)} == {str(tiny_model)}
        entry = daemon.streams["cam2"].history.entries()[-1]
        assert entry.caption.text == await on_engine(daemon, generate, daemon.engine, entry.window, None)

        # the stream's QA model answers (over HTTP), about the newest window, as its own generate does
        async with http.post(f"{d.http}/streams/cam/ask", json={"question": QUESTION}) as resp:
            first = await resp.json()
            assert resp.status == 200, first
        window = next(e.window for e in daemon.streams["cam"].history.entries() if e.window.index == first["index"])
        assert first["model"] == str(qa_model) and first["answer"]
        assert first["answer"] == await on_engine(daemon, generate, qa, window, QUESTION)
        assert first["answer"] != await on_engine(daemon, generate, daemon.engine, window, QUESTION)
        assert ("cam", window.index) in qa.kv_cache

        # asked again about that window (`at`): the QA model's kept image keys/values, no vision, no prefill
        hits, misses, encoded = qa.stats.kv_hits, qa.stats.kv_misses, qa.stats.frames_encoded
        again = await daemon.ask("cam", QUESTION, at=(window.start + window.end) / 2)
        assert (again.index, again.answer, again.model) == (window.index, first["answer"], str(qa_model))
        assert (qa.stats.kv_hits - hits, qa.stats.kv_misses - misses, qa.stats.frames_encoded - encoded) == (1, 0, 0)

        # per stream: cam2 asks the other QA model; cam3 named the caption model, which answers from its caption's cache
        answer2 = await daemon.ask("cam2", QUESTION)
        window2 = next(e.window for e in daemon.streams["cam2"].history.entries() if e.window.index == answer2.index)
        assert answer2.model == str(qa_model_2) and answer2.answer == await on_engine(daemon, generate, qa2, window2, QUESTION)
        before = (daemon.engine.stats.kv_hits, qa.stats.questions, qa2.stats.questions)
        answer3 = await daemon.ask("cam3", QUESTION)
        assert answer3.model == str(tiny_model)
        assert (daemon.engine.stats.kv_hits, qa.stats.questions, qa2.stats.questions) == (before[0] + 1, *before[1:])

        # a watch on cam asks cam's QA model
        async with http.post(f"{d.http}/streams/cam/watches", json={"question": QUESTION, "every": "0.5s",
                                                                    "on": "/.*/", "hold": 1}) as resp:
            assert resp.status == 201, await resp.json()

        async def watch_asked() -> bool:
            async with http.get(f"{d.http}/streams/cam/watches") as resp:
                watches = (await resp.json())["watches"]
            return watches[0]["asks"] >= 1

        assert await until(watch_asked)
        async with http.get(f"{d.http}/streams/cam/watches") as resp:
            (watch,) = (await resp.json())["watches"]
        watched = next(e.window for e in daemon.streams["cam"].history.entries() if e.window.start == watch["start"])
        assert watch["answer"] == await on_engine(daemon, generate, qa, watched, QUESTION)

        # /metrics shows the QA models' engines; /readyz says ready
        async with http.get(f"{d.http}/metrics") as resp:
            metrics = await resp.text()
        samples = {(s.name, s.labels.get("model")): s.value
                   for family in text_string_to_metric_families(metrics) for s in family.samples}
        assert 1 <= samples["streamer_qa_engine_kv_hits_total", str(qa_model)] <= qa.stats.kv_hits  # the watch asks on
        assert samples["streamer_qa_engine_questions_total", str(qa_model_2)] == 1
        assert samples["streamer_engine_kv_hits_total", None] == daemon.engine.stats.kv_hits >= 1
        async with http.get(f"{d.http}/readyz") as resp:
            assert resp.status == 200
            ready = await resp.json()
        assert ready["model"] == str(tiny_model) and ready["qa_models"] == sorted([str(qa_model), str(qa_model_2)])

        # a window leaving the history is freed in the QA model's cache too; a stream gone, everywhere
        history = daemon.streams["cam"].history

        async def left_and_freed() -> bool:
            gone = all(e.window.index != window.index for e in history.entries())
            return gone and await on_engine(daemon, lambda: ("cam", window.index) not in qa.kv_cache)

        assert await until(left_and_freed, timeout=20)
        await daemon.remove_stream("cam")

        async def nothing_of_cam() -> bool:
            def check() -> bool:
                return not any(s == "cam" for e in daemon.engines for s, _ in e.kv_cache.windows()) and \
                    not any(k[0] == "cam" for e in daemon.engines for k in list(e.cache._entries))
            return await on_engine(daemon, check)

        assert await until(nothing_of_cam)
        assert daemon.streams["cam2"].history.entries()  # the other streams go on


# -- configuration and the command line ------------------------------------------------------------


def test_a_stream_may_only_name_a_configured_model_and_an_unloadable_one_stops_the_start(tmp_path, tiny_model, capsys):
    toml = tmp_path / "streamer.toml"
    toml.write_text(f'[model]\nid = "{tiny_model}"\nqa_model = "a/vqa"\n[[streams]]\nid = "cam"\nurl = "x.mp4"\n'
                    'qa_model = "b/other"\n')
    with pytest.raises(StreamerError, match=r"\[\[streams\]\] #1 \(cam\): qa_model = 'b/other' is not configured"):
        load_config(str(toml))
    toml.write_text('[model]\nqa_models = ["a", "b", "c", "d", "e"]\n')
    with pytest.raises(StreamerError, match="at most 4"):
        load_config(str(toml))

    missing = tmp_path / "no-such-model"
    code = main(["serve", "--model", str(tiny_model), "--qa-model", str(missing), "--port", "0", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"qa_model: model '{missing}'" in err and "no such local directory" in err


def test_caption_question_with_qa_model_answers_with_the_qa_model(tmp_path, tiny_model, qa_model, clip_10s):
    lines = {}
    for name, flags in (("qa", ["--model", str(tiny_model), "--qa-model", str(qa_model)]),
                        ("summary", ["--qa-model", str(qa_model), "--summary"])):
        out = tmp_path / f"{name}.jsonl"
        code = main(["caption", str(clip_10s), *flags, "--question", QUESTION, "--max-new-tokens", str(TOKENS),
                     "--threads", "1", "--no-progress", "-o", str(out)])
        assert code == 0
        lines[name] = [json.loads(line) for line in out.read_text().splitlines()]
    qa, caption_engine = load(qa_model), load(tiny_model)
    job = CaptionJob(str(clip_10s), SamplerConfig(window=3.0, frames=qa.num_frames, hop=1.0), max_new_tokens=TOKENS)
    want = [a.answer for a in answer_file(qa, job, QUESTION)]
    assert [line["answer"] for line in lines["qa"]] == want and len(want) == 8
    assert {line["model"] for line in lines["qa"]} == {str(qa_model)}
    assert want != [a.answer for a in answer_file(caption_engine, job, QUESTION)]  # not the caption model's
    (summary,) = lines["summary"]
    assert summary["model"] == str(qa_model) and summary["type"] == "answer"
    assert summary["answer"] == next(iter(answer_file(qa, dataclasses.replace(job, summary=True), QUESTION))).answer
    assert main(["caption", str(clip_10s), "--qa-model", str(qa_model), "-o", str(tmp_path / "x.vtt")]) == 2
