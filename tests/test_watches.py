"""Watches (issue #13): a question re-asked on a live stream, an event when its answer starts or stops
matching. The pure rule; `[[watches]]` and the HTTP API on a real daemon (`serve()` in-process, the tiny
GIT checkpoint, a real clip played live) with real WebSocket clients, a real webhook receiver and
/metrics; and, on the bundled model once it answers questions, a real RTSP stream whose scene changes
at a known time."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import time

import aiohttp
import numpy as np
import pytest
import websockets
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from streamer.cli.serve import load_config, serve
from streamer.errors import StreamerError
from streamer.http.common import ServerConfig
from streamer.pipeline.daemon import DaemonConfig
from streamer.pipeline.scheduler import SchedulerConfig
from streamer.pipeline.watches import WatchRule, matcher, watches_of
from streamer.security.auth import TokenEntry
from tests.support.daemon import add_stream, captions_of, count_for, read_messages, running_daemon, trusting_policy
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.timeout(120)

QUESTION = "what is it?"
EVERYTHING = "/.*/"  # a regex every answer matches: the watch must turn on once and stay on


# -- the rule -----------------------------------------------------------------------------
def test_a_watch_turns_on_after_hold_matching_answers_and_never_on_one_odd_answer():
    rule = WatchRule("yes", hold=2)
    assert rule.state == "off"
    seen = [rule.observe(a) for a in ["no", "YES", "no", " Yes ", "yes", "yes", "no", "yes", "no", "no", "yes"]]
    assert seen == [None, None, None, None, "on", None, None, None, None, "off", None]
    one = WatchRule("yes", hold=1)
    assert [one.observe(a) for a in ["yes", "yes", "no"]] == ["on", None, "off"]
    rule.reset()
    assert rule.state == "off" and rule.observe("yes") is None


def test_on_is_a_word_or_a_regex():
    assert matcher("Red")(" red ") and not matcher("red")("a red circle")
    assert matcher("/red|blue/")("a Blue square") and not matcher("/^red$/")("a red circle")
    assert matcher("/")("/") and not matcher("/")("x")  # a lone slash is a word


# -- [[watches]] in the config file ------------------------------------------------------
def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "streamer.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


STREAM = '[[streams]]\nid = "cam"\nurl = "{url}"\nwindow = 1\nhop = 0.5\n'


@pytest.mark.parametrize(("watches", "limits", "error"), [
    ('[[watches]]\nstream = "cam"\nquestion = "q"\nevery = "200ms"\n', "", "below stream 'cam''s hop"),
    ('[[watches]]\nstream = "cam"\nquestion = "q"\non = "/(/"\n', "", "not a valid regular expression"),
    ('[[watches]]\nstream = "cam"\nquestion = ""\n', "", "the question is empty"),
    ('[[watches]]\nstream = "cam"\nquestion = "q"\nid = "a"\n' * 2, "", "two watches with id 'a'"),
    ('[[watches]]\nstream = "cam"\nquestion = "q"\n' * 3, "[limits]\nmax_watches_per_stream = 2\n", "max_watches_per_stream"),
    ('[[watches]]\nstream = "x"\nquestion = "q"\n[[watches]]\nstream = "y"\nquestion = "q"\n',
     "[limits]\nmax_watches = 1\n", "max_watches = 1"),
    ('[[watches]]\nstream = "cam"\nquestion = "q"\nwhen = "now"\n', "", "unknown field 'watches.0.when'"),
])
def test_bad_watches_in_the_config_stop_startup_with_one_line(tmp_path, watches, limits, error):
    with pytest.raises(StreamerError) as refused:
        load_config(_toml(tmp_path, STREAM.format(url="x.mp4") + limits + watches))
    assert error in str(refused.value), str(refused.value)


@contextlib.asynccontextmanager
async def served(config):
    """`serve()` of a loaded config in this loop (as tests/support/daemon.py does for running_daemon)."""
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, port=0, sources=trusting_policy()))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result((port, d)), stop=stop))
    done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    port, daemon = ready.result()
    try:
        yield f"http://127.0.0.1:{port}", daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def metric(daemon, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(daemon.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def test_config_watches_follow_their_stream_and_a_failing_ask_is_logged_once(tiny_model, clip_10s, tmp_path, caplog):
    text = (f'[model]\nid = "{tiny_model}"\nmax_new_tokens = 3\n' + STREAM.format(url=clip_10s) + 'loop = true\n'
            '[[watches]]\nstream = "cam"\nquestion = "what is it?"\nevery = "0.5s"\non = "/.*/"\nhold = 2\nid = "door"\n'
            '[[watches]]\nstream = "later"\nquestion = "what is it?"\n')
    config = load_config(_toml(tmp_path, text))
    # every one-off request refused by the scheduler (a real SchedulerBusy): the watch's asks fail
    config = dataclasses.replace(config, daemon=DaemonConfig(scheduler=SchedulerConfig(max_request_windows=0)))
    caplog.set_level(logging.WARNING, logger="streamer.pipeline.watches")
    async with served(config) as (base, daemon), aiohttp.ClientSession() as http:
        async with websockets.connect(base.replace("http", "ws") + "/ws?all=1") as ws:
            watches = watches_of(daemon)
            assert sorted((w.stream_id, w.id, w.origin) for w in watches.all()) == [("cam", "door", "config"),
                                                                                    ("later", "w1", "config")]
            await read_messages(ws, count_for("cam", 8), timeout=60)
        door = watches.get("cam", "door")
        assert door is not None and door.failures >= 3 and door.asks == 0 and door.rule.state == "off"
        assert metric(daemon, "streamer_watch_asks_total", stream="cam", watch="door", result="failed") == door.failures
        said = [r for r in caplog.records if r.getMessage().startswith("watch ask failed")]
        assert len(said) == 1 and "SchedulerBusy" in said[0].__dict__["error"]  # once, with its reason
        async with http.get(f"{base}/streams/cam/watches") as resp:
            (listed,) = (await resp.json())["watches"]
        assert listed["id"] == "door" and "SchedulerBusy" in listed["error"] and listed["origin"] == "config"
        async with http.get(f"{base}/streams/later/watches") as resp:  # waits for its stream, idle
            assert resp.status == 200 and (await resp.json())["watches"][0]["asks"] == 0


# -- over HTTP ------------------------------------------------------------------------------
async def test_a_watch_turns_on_once_reaches_clients_webhooks_and_metrics_and_delete_stops_it(tiny_model, clip_10s):
    receiver = await Receiver().start()
    sinks = (("webhooks", [{"url": receiver.url("watch"), "types": ["watch"]}, {"url": receiver.url("plain")}]),)
    try:
        async with running_daemon(tiny_model, sinks=sinks) as d, aiohttp.ClientSession() as http, \
                websockets.connect(d.ws + "?all=1&types=watch") as opted, websockets.connect(d.ws + "?all=1") as plain:
            await add_stream(http, d, id="cam", url=str(clip_10s), loop=True)  # window 1 s, hop 0.5 s
            async with http.post(f"{d.http}/streams/cam/watches",
                                 json={"question": QUESTION, "every": "0.5s", "on": EVERYTHING, "hold": 2}) as resp:
                created = await resp.json()
                assert resp.status == 201, created
            assert resp.headers["Location"] == f"/streams/cam/watches/{created['id']}"
            assert created["state"] == "off" and created["every"] == 0.5 and created["origin"] == "http"
            got = await read_messages(opted, lambda ms: any(m["type"] == "watch" for m in ms), 30)
            (event,) = [m for m in got if m["type"] == "watch"]
            assert event["state"] == "on" and event["watch_id"] == created["id"] and event["stream_id"] == "cam"
            assert event["question"] == QUESTION and event["end"] > event["start"]
            watch = watches_of(d.daemon).get("cam", created["id"])
            assert watch.asks >= 2  # hold = 2: on at the second matching answer (the rule's test: exactly)
            # the answer is the model's about that window
            entry = next(e for e in d.daemon.streams["cam"].history._entries if e.window.end == event["end"])
            (direct,) = await d.daemon.scheduler.run_exclusive(d.daemon.engine.answer, [(entry.window, QUESTION)])
            assert event["answer"] == direct.answer

            # no flapping: many more asks, no more events
            more = await read_messages(opted, count_for("cam", 10), timeout=30)
            assert not [m for m in more if m["type"] == "watch"] and watch.asks >= 6
            async with asyncio.timeout(10):  # captions come to it too: until the watch event has
                while not any(h["type"] == "watch" for h in receiver.got.get("watch", [])):
                    await receiver.wait_for("watch", len(receiver.got.get("watch", [])) + 1, timeout=10)
            assert [(h["type"], h["state"]) for h in receiver.got["watch"] if h["type"] != "caption"] == [("watch", "on")]
            assert all(h["type"] == "caption" for h in receiver.got.get("plain", []))
            assert not [m for m in await read_messages(plain, count_for("cam", 3), 20) if m["type"] == "watch"]
            async with http.get(f"{d.http}/metrics") as resp:
                text = await resp.text()
            labels = f'stream="cam",watch="{created["id"]}"'
            assert f"streamer_watch_state{{{labels}}} 1.0" in text
            assert f"streamer_watch_changes_total{{{labels}}} 1.0" in text
            async with http.get(f"{d.http}/streams/cam/watches") as resp:
                (listed,) = (await resp.json())["watches"]
            assert listed["state"] == "on" and listed["asks"] >= 6 and listed["failures"] == 0

            async with http.delete(f"{d.http}/streams/cam/watches/{created['id']}") as resp:
                assert resp.status == 204
            await read_messages(opted, count_for("cam", 1), timeout=30)  # an ask already under way may end
            asked = metric(d.daemon, "streamer_questions_total", result="answered")
            await read_messages(opted, count_for("cam", 6), timeout=30)  # six more windows: no question asked
            assert metric(d.daemon, "streamer_questions_total", result="answered") == asked
            async with http.get(f"{d.http}/streams/cam/watches") as resp:
                assert (await resp.json())["watches"] == []
            assert metric(d.daemon, "streamer_watch_state", stream="cam", watch=created["id"]) is None
            async with http.delete(f"{d.http}/streams/cam/watches/{created['id']}") as resp:
                assert resp.status == 404
    finally:
        await receiver.stop()


async def test_bad_watches_get_clear_4xx_and_nothing_else_is_disturbed(tiny_model, clip_10s):
    tokens = (TokenEntry.make("admin", token="admin-token-0123456789"),
              TokenEntry.make("viewer", token="viewer-token-0123456789"))
    admin = {"Authorization": "Bearer admin-token-0123456789"}
    viewer = {"Authorization": "Bearer viewer-token-0123456789"}
    async with running_daemon(tiny_model, server_config=ServerConfig(port=0, tokens=tokens)) as d, \
            aiohttp.ClientSession(headers=admin) as http, aiohttp.ClientSession(headers=viewer) as as_viewer, \
            websockets.connect(d.ws + "?all=1", additional_headers=viewer) as ws:
        await add_stream(http, d, id="cam", url=str(clip_10s), loop=True)
        url = f"{d.http}/streams/cam/watches"
        async with as_viewer.post(url, json={"question": QUESTION}) as resp:
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
        for body, status, code in (
            ({"question": QUESTION, "every": "0.2s"}, 400, "every_below_hop"),
            ({"question": ""}, 400, "bad_request"),
            ({"question": "what " * 80}, 400, "bad_request"),  # too many tokens for the model
            ({"question": QUESTION, "on": "/([a-z]/"}, 400, "bad_request"),
            ({"question": QUESTION, "hold": 0}, 400, "bad_request"),
            ({"question": QUESTION, "every": "forever"}, 400, "bad_request"),
            ({"question": QUESTION, "id": "../x"}, 400, "bad_request"),
            ({"question": QUESTION, "stream": "other"}, 400, "bad_request"),
            ("is anyone there?", 400, "bad_request"),
        ):
            async with http.post(url, json=body) as resp:
                got = await resp.json()
                assert (resp.status, got["error"]["code"]) == (status, code), (body, got)
        async with http.post(f"{d.http}/streams/ghost/watches", json={"question": QUESTION}) as resp:
            assert resp.status == 404
        async with as_viewer.get(f"{d.http}/streams/ghost/watches") as resp:
            assert resp.status == 404
        for i in range(8):  # [limits] max_watches_per_stream (8 by default)
            async with http.post(url, json={"question": QUESTION, "every": 5, "id": f"k{i}"}) as resp:
                assert resp.status == 201, await resp.text()
        async with http.post(url, json={"question": QUESTION, "id": "k0"}) as resp:
            assert resp.status == 429  # the limit comes first: nothing is replaced either
        async with http.post(url, json={"question": QUESTION}) as resp:
            over = await resp.json()
            assert resp.status == 429 and over["error"]["code"] == "max_watches_per_stream"
        async with http.delete(f"{url}/k0") as resp:
            assert resp.status == 204
        async with http.post(url, json={"question": QUESTION, "id": "k1"}) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "exists"
        async with as_viewer.delete(f"{url}/k1") as resp:
            assert resp.status == 403
        async with as_viewer.get(url) as resp:  # a viewer may list them
            assert resp.status == 200 and len((await resp.json())["watches"]) == 7
        await read_messages(ws, count_for("cam", 4), timeout=30)  # the stream captions on
        assert d.daemon.readiness() == (True, "ready")


async def test_an_http_watch_dies_with_its_stream(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?all=1&types=watch") as ws:
        await add_stream(http, d, id="cam", url=str(clip_10s), loop=True)
        async with http.post(f"{d.http}/streams/cam/watches", json={"question": QUESTION, "on": EVERYTHING,
                                                                  "hold": 1, "every": 0.5}) as resp:
            assert resp.status == 201
        await read_messages(ws, lambda ms: any(m["type"] == "watch" for m in ms), 30)
        async with http.delete(f"{d.http}/streams/cam") as resp:
            assert resp.status == 204
        async with http.get(f"{d.http}/streams/cam/watches") as resp:
            assert resp.status == 404  # no stream, no watch
        assert watches_of(d.daemon).all() == []
        assert metric(d.daemon, "streamer_watch_state", stream="cam", watch="w1") is None
        # a new stream of that id starts without it
        await add_stream(http, d, id="cam", url=str(clip_10s))
        async with http.get(f"{d.http}/streams/cam/watches") as resp:
            assert (await resp.json())["watches"] == []


# -- semantics, on the bundled model over a real RTSP stream ----------------------------------
def _answers_questions() -> bool:
    from streamer.defaults import BUNDLED_MODEL

    vocab = json.loads((BUNDLED_MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    return "?" in vocab


SCENE_SECONDS = 9.0


def _scenes():
    from streamer.training.world import Obj, Scene

    # A: no red circle (two blue squares, grey background); B: a red circle (black background), so a
    # thumbnail's brightness tells which scene is on the wire without the model.
    before = Scene((Obj("square", "blue", "small", 0.25, 0.08, vy=0.09), Obj("square", "blue", "small", 0.75, 0.08, vy=0.09)),
                   "down", "gray")
    after = Scene((Obj("circle", "red", "big", 0.8, 0.5, vx=-0.09),), "left", "black")
    return before, after


EXPECTED = {  # question -> (answer before the change, after it): the world's own labels (checked below)
    "what colour is it ?": ("blue", "red"),
    "how many are there ?": ("two", "one"),
    "is there a red circle ?": ("no", "yes"),
}
WATCH_QUESTION, WATCH_ON = "is there a red circle ?", "yes"  # the watch


def test_the_scenes_answer_what_the_semantic_test_expects():
    from streamer.training.world import labelled_questions

    before, after = _scenes()
    for scene, column in ((before, 0), (after, 1)):
        truth = {kind: answer for kind, _, answer in labelled_questions(scene)}
        red_circle = "yes" if {(o.colour, o.shape) for o in scene.objects} == {("red", "circle")} else "no"
        assert (truth["colour"], truth["count"], red_circle) == tuple(EXPECTED[q][column] for q in EXPECTED)


async def _cut_time(http: aiohttp.ClientSession, url: str) -> float:
    """Wall-clock time the daemon's newest decoded frame first shows scene B (black; scene A is grey)."""
    while True:
        async with http.get(url) as resp:
            if resp.status == 200:
                image = np.asarray(Image.open(io.BytesIO(await resp.read())).convert("L"), dtype=np.float32)
                if image.mean() < 40:
                    return time.time()
        await asyncio.sleep(0.05)  # polling the daemon's frames: the ground truth, not the model


@pytest.mark.timeout(240)
@pytest.mark.skipif(not _answers_questions(), reason="the bundled model has no question vocabulary (not trained on "
                    "questions yet: streamer/models/world-git/README.md)")
async def test_questions_and_a_watch_follow_a_scene_change_on_a_live_rtsp_stream(tmp_path):
    from streamer.defaults import BUNDLED_MODEL
    from streamer.training.world import render_video, write_video
    from tests.support.rtsp import RtspServer, require_rtsp_server

    require_rtsp_server()
    before, after = _scenes()
    video = write_video(str(tmp_path / "scenes.mp4"), render_video([(before, SCENE_SECONDS), (after, SCENE_SECONDS)],
                                                                   fps=15, height=128, width=128))
    window, hop, every, hold = 3.0, 0.5, 0.5, 2
    with RtspServer(file=video) as rtsp:
        async with running_daemon(BUNDLED_MODEL, max_new_tokens=16) as d, aiohttp.ClientSession() as http, \
                websockets.connect(d.ws + "?streams=scene&all=1&types=watch") as ws:
            await add_stream(http, d, id="scene", url=rtsp.url, window=window, hop=hop)
            async with http.post(f"{d.http}/streams/scene/watches", json={
                    "question": WATCH_QUESTION, "every": every, "on": WATCH_ON, "hold": hold}) as resp:
                assert resp.status == 201, await resp.text()
            cut = asyncio.create_task(_cut_time(http, f"{d.http}/streams/scene/thumbnail.jpg"))
            try:
                messages = await read_messages(ws, lambda ms: cut.done() and any(
                    c["capture_time"] > cut.result() + window + 4 for c in captions_of(ms)), 60)
            finally:
                cut.cancel()
            cut_wall = cut.result()
            caps = captions_of(messages)
            # wall -> media time: live pacing, so media time runs with wall time from a caption's newest frame
            near = min(caps, key=lambda c: abs(c["capture_time"] - cut_wall))
            cut_media = near["end"] + (cut_wall - near["capture_time"])
            answers = {}
            for question in EXPECTED:
                got = []
                for at in (cut_media - window / 2 - 1.0, cut_media + window / 2 + 1.0):  # windows wholly in A, in B
                    async with http.post(f"{d.http}/streams/scene/ask", json={"question": question, "at": at}) as resp:
                        body = await resp.json()
                        assert resp.status == 200, body
                    got.append(body["answer"])
                answers[question] = tuple(got)
            watch_events = [m for m in messages if m["type"] == "watch"]
    print(f"answers before/after the change: {answers}; watch events: {watch_events}")
    assert answers == EXPECTED
    # the watch turned on once, after the change, within a bounded delay in media time, and did not flap
    assert [e["state"] for e in watch_events] == ["on"], watch_events
    delay = watch_events[0]["end"] - cut_media
    print(f"watch on {delay:.2f} s of media time after the change (window {window} s, every {every} s, hold {hold})")
    assert 0 < delay <= window + (hold + 1) * every
