"""The daemon's lifecycle: bound before the model loads, supervised tasks, honest /readyz and /healthz.

Faults are injected into our own code (a scheduler step or an engine call that
raises), since a real one cannot be provoked on demand; everything else is
real: the tiny GIT checkpoint, files played as live, HTTP and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from streamer.cli.serve import ServeConfig, serve
from streamer.engine import Engine, EngineConfig
from streamer.errors import StreamerError
from streamer.http.common import ServerConfig
from streamer.pipeline.daemon import DaemonConfig
from tests.support.daemon import add_stream, count_for, read_messages, running_daemon
from tests.support.media import moving_square, write_video

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("lifecycle") / "clip.mp4", moving_square(30, 64, 64), fps=15)


async def _get(http, url):
    async with http.get(url) as resp:
        return resp.status, await resp.json()


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _sample(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_port_answers_while_the_model_loads(tiny_model, monkeypatch):
    gate = threading.Event()  # holds the (real) model load in its thread until the test has looked
    real_load = Engine.load.__func__

    def slow_load(cls, config):
        assert gate.wait(30)
        return real_load(cls, config)

    monkeypatch.setattr(Engine, "load", classmethod(slow_load))
    listening: asyncio.Future = asyncio.get_running_loop().create_future()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    config = ServeConfig(engine=EngineConfig(model=str(tiny_model), max_new_tokens=4), server=ServerConfig(port=0),
                         daemon=DaemonConfig())
    task = asyncio.create_task(serve(config, stop=stop, on_listening=listening.set_result,
                                     on_ready=lambda port, d: ready.set_result(port)))
    port = await asyncio.wait_for(listening, 30)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        assert await _get(http, f"{base}/healthz") == (200, {"status": "ok"})
        assert await _get(http, f"{base}/readyz") == (503, {"status": "starting", "reason": "loading model"})
        async with http.post(f"{base}/streams", json={"id": "a", "url": "x.mp4"}) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "starting"
        async with http.get(f"{base}/metrics") as resp:  # scrapable during the load: process metrics at least
            assert resp.status == 200 and _sample(await resp.text(), "process_resident_memory_bytes") > 0
        gate.set()
        await asyncio.wait_for(ready, 60)
        status, body = await _get(http, f"{base}/readyz")
        assert status == 200 and body["status"] == "ready"
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_a_dead_scheduler_turns_readyz_503_and_is_restarted(tiny_model, clip):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        daemon = d.daemon
        planner = daemon.scheduler.planner
        real_next_batch = planner.next_batch
        died = asyncio.Event()
        broken = True

        def next_batch():
            if broken:
                died.set()
                raise RuntimeError("injected scheduler fault")
            return real_next_batch()

        planner.next_batch = next_batch  # the fault: the scheduler loop itself raises
        async with websockets.connect(d.ws + "?streams=cam&all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await asyncio.wait_for(died.wait(), 20)
            status, body = await _get(http, f"{d.http}/readyz")
            assert status == 503 and body["status"] == "not_ready"
            assert "scheduler" in body["reason"] and "injected scheduler fault" in body["reason"], body
            assert (await _get(http, f"{d.http}/healthz"))[0] == 200  # still recoverable: alive
            broken = False
            await read_messages(ws, count_for("cam", 2), 30)  # restarted: captions flow again
        status, body = await _get(http, f"{d.http}/readyz")
        assert status == 200, body
        async with http.get(f"{d.http}/metrics") as resp:
            assert _sample(await resp.text(), "streamer_task_restarts_total", task="scheduler") >= 1


async def test_a_spent_restart_budget_fails_healthz_and_serve_exits_with_an_error(tiny_model, clip):
    config = DaemonConfig(restart_budget=1)
    with pytest.raises(StreamerError, match="task scheduler kept failing"):
        async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http:

            def next_batch():
                raise RuntimeError("injected scheduler fault")

            d.daemon.scheduler.planner.next_batch = next_batch
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await asyncio.wait_for(d.daemon.fatal.wait(), 30)
            status, body = await _get(http, f"{d.http}/healthz")
            assert status == 503 and "kept failing" in body["reason"], body


async def test_failing_engine_batches_are_counted_and_make_the_daemon_not_ready(tiny_model, clip):
    async with running_daemon(tiny_model, daemon_config=DaemonConfig(max_failed_batches=2)) as d, \
            aiohttp.ClientSession() as http:
        engine = d.daemon.engine
        failures = 0
        failed_twice = asyncio.Event()
        loop = asyncio.get_running_loop()

        def broken_prepare(windows, **options):  # engine thread
            nonlocal failures
            failures += 1
            if failures >= 3:  # the 2nd failure has been counted once the 3rd batch starts
                loop.call_soon_threadsafe(failed_twice.set)
            raise RuntimeError("injected engine fault")

        engine.prepare = broken_prepare
        async with websockets.connect(d.ws + "?streams=cam&all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip), loop=True)
            await asyncio.wait_for(failed_twice.wait(), 20)
            status, body = await _get(http, f"{d.http}/readyz")
            assert status == 503 and "engine batches failed in a row" in body["reason"], body
            async with http.get(f"{d.http}/metrics") as resp:
                assert _sample(await resp.text(), "streamer_batches_failed_total") >= 2
            async with http.post(f"{d.http}/v1/caption/frames", json={"frames": [_png()]}) as resp:
                body = await resp.json()  # a one-off request on a failing engine: a clear error, not a hang or a bare 500
                assert resp.status == 500 and body["error"]["code"] == "engine_failed", body
            del engine.prepare  # the class's real method again
            await read_messages(ws, count_for("cam", 1), 30)
        assert (await _get(http, f"{d.http}/readyz"))[0] == 200
