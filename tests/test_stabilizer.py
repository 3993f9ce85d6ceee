"""The caption stabilizer: the hysteresis rule on plain data, and a real daemon whose WebSocket
clients and subtitle files follow the captions it shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math

import pytest
import websockets

from streamer.config import ConfigError, StreamConfig
from streamer.defaults import BUNDLED_MODEL
from streamer.publish.formats import render
from streamer.publish.hub import CaptionHub
from streamer.publish.stabilizer import CaptionStabilizer, Hysteresis
from streamer.publish.subtitles import caption_from_message
from streamer.types import Caption

pytestmark = pytest.mark.timeout(120)


def feed(rule: Hysteresis, values, scores=None) -> list:
    scores = scores or [None] * len(values)
    return [rule.update(v, s) for v, s in zip(values, scores)]


# -- the rule -------------------------------------------------------------------------------------------


def test_a_new_value_must_hold_k_times_in_a_row():
    rule: Hysteresis[str] = Hysteresis(hold=2)
    assert feed(rule, ["a", "a", "x", "a", "b", "b", "b"]) == ["a", "a", "a", "a", "a", "b", "b"]
    # an interruption starts the challenger's count again, the current value's too
    rule = Hysteresis(hold=3)
    assert feed(rule, ["a", "b", "b", "a", "b", "b", "c", "b", "b", "b"]) == ["a"] * 9 + ["b"]


def test_the_first_value_shows_at_once_and_hold_one_follows_the_input():
    rule: Hysteresis[str] = Hysteresis(hold=5)
    assert rule.current is None
    assert rule.update("a") == "a" and rule.changed
    values = ["a", "b", "c", "c", "a"]
    assert feed(Hysteresis(hold=1), values) == values


def test_a_confident_newcomer_wins_by_margin_and_a_missing_score_never_does():
    rule: Hysteresis[str] = Hysteresis(hold=3, margin=0.5)
    assert feed(rule, ["a", "b", "c"], [-1.0, -0.9, -0.4]) == ["a", "a", "c"]  # 0.1 better: no; 0.6 better: yes
    rule = Hysteresis(hold=3, margin=0.5)
    assert feed(rule, ["a", "b", "c"], [-1.0, math.nan, None]) == ["a", "a", "a"]


def test_patience_moves_on_when_the_current_value_stops_coming():
    # free-text captions that never repeat word for word must not freeze the overlay
    assert feed(Hysteresis(hold=2), ["a", "b", "c", "d", "e"]) == ["a"] * 5
    assert feed(Hysteresis(hold=2, patience=3), ["a", "b", "c", "d", "e", "f"]) == ["a", "a", "a", "d", "d", "d"]


def test_an_on_off_watch_reuses_it_and_hears_of_each_change_once():
    # issue #13's watches: "is there a person?" per window, debounced
    watch: Hysteresis[bool] = Hysteresis(hold=3)
    changes = []
    for seen in [False, False, True, False, True, True, True, True, False, False, False]:
        watch.update(seen)
        if watch.changed:
            changes.append(watch.current)
    assert changes == [False, True, False]
    assert watch.challenger is None


@pytest.mark.parametrize("kwargs", [{"hold": 0}, {"hold": True}, {"hold": 2.5}, {"margin": -1.0},
                                    {"margin": math.inf}, {"patience": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Hysteresis(**kwargs)


def caption(index: int, text: str, confidence: float = -0.1) -> Caption:
    return Caption("cam", index, index * 1.0, index * 1.0 + 2.5, text, confidence, "m", 0.0, 0.0)


def test_caption_stabilizer_flags_the_shown_captions():
    texts = ["a dog", "a dog", "a cat", "a dog", "a cow", "a cow", "a cow"]
    off = CaptionStabilizer("off")
    assert [off.offer(caption(i, t)) for i, t in enumerate(texts)] == [True] * 7
    hold = CaptionStabilizer("hold", windows=2)
    assert [hold.offer(caption(i, t)) for i, t in enumerate(texts)] == [True, True, False, True, False, True, True]
    assert hold.shown_text == "a cow" and hold.held_back == 2
    with pytest.raises(ValueError, match="stabilize"):
        CaptionStabilizer("sometimes")


def test_stream_keys_configure_it_and_bad_values_are_refused_with_the_key():
    config = StreamConfig.from_dict({"id": "cam", "url": "rtsp://h/x", "stabilize": "hold", "stabilize_windows": 3,
                                     "stabilize_margin": 0.5})
    rule = CaptionStabilizer.for_stream(config)
    assert (rule.mode, rule.windows, rule.margin, rule.patience) == ("hold", 3, 0.5, 4)
    assert StreamConfig.from_dict({"id": "cam", "url": "rtsp://h/x"}).stabilize == "hold"  # the measured default
    for bad in ({"stabilize": "sometimes"}, {"stabilize_windows": 0}, {"stabilize_margin": -1},
                {"stabilize_windows": "2"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            StreamConfig.from_dict({"id": "cam", "url": "rtsp://h/x", **bad})


async def test_a_caption_that_becomes_shown_reaches_clients_that_skip_repeats():
    hub = CaptionHub()
    changes = hub.subscribe(None)  # only_changes, as a bare /ws
    everything = hub.subscribe(None, only_changes=False)
    for i, (text, shown) in enumerate([("a dog", True), ("a cat", False), ("a cat", True), ("a cat", True)]):
        hub.publish_caption(caption(i, text), shown=shown)
    got = [(m.data["text"], m.data["shown"], m.data["stable"]) for m in [await changes.get() for _ in range(changes.pending)]]
    assert got == [("a dog", True, False), ("a cat", False, False), ("a cat", True, False)]  # the last is a repeat
    assert everything.pending == 4


# -- through a real daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory) -> str:
    """Two 5 s scenes the bundled model knows: around the cut it says mixed things for a few windows."""
    from streamer.training.live import LiveCell, _render, encode_h264, live_scenes
    from streamer.training.world import MOTIONS

    frames, _ = _render(live_scenes(1, 2, 5.0, jitter=0.0, events=tuple(MOTIONS)), LiveCell(15, 128, 128))
    return encode_h264(tmp_path_factory.mktemp("stab") / "two-scenes.mp4", frames, 15, 400_000)


async def collect(ws, out: list[dict]) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            out.append(json.loads(raw))


async def test_a_daemon_flags_shown_captions_and_subtitle_files_follow_them(two_scenes, tmp_path):
    from tests.support.daemon import add_stream, running_daemon

    out = tmp_path / "subs"
    sinks = (("outputs", {"dir": str(out), "formats": ["vtt", "jsonl"]}),)
    everything: list[dict] = []
    changes: list[dict] = []
    async with running_daemon(BUNDLED_MODEL, max_new_tokens=12, sinks=sinks) as d:
        import aiohttp

        async with websockets.connect(d.ws + "?streams=cam&all=1") as ws_all, \
                websockets.connect(d.ws + "?streams=cam") as ws_changes, aiohttp.ClientSession() as http:
            readers = [asyncio.create_task(collect(ws_all, everything)), asyncio.create_task(collect(ws_changes, changes))]
            await add_stream(http, d, id="cam", url=two_scenes, window=3.0, hop=0.5, stabilize="hold",
                             stabilize_windows=2)
            deadline = asyncio.get_running_loop().time() + 60
            while not any(m.get("type") == "state" and m.get("state") == "stopped" for m in everything):
                assert asyncio.get_running_loop().time() < deadline, "the 10 s file did not play to its end"
                await asyncio.sleep(0.1)
            d.stop.set()
            await asyncio.wait_for(d.task, 30)  # drains; the subtitle files are closed after the daemon
            await asyncio.wait_for(asyncio.gather(*readers), 10)
    caps = [m for m in everything if m["type"] == "caption"]
    assert len(caps) >= 10
    # the flags are the rule applied to the captions in order: the daemon adds nothing and hides nothing
    rule = CaptionStabilizer("hold", windows=2)
    assert [m["shown"] for m in caps] == [rule.offer(caption_from_message(m)) for m in caps]
    assert any(not m["shown"] for m in caps), [m["text"] for m in caps]  # the odd windows at the cut were held back
    # a client that skips repeats still gets every caption that changed text or became shown
    assert [m["index"] for m in changes if m["type"] == "caption"] == [m["index"] for m in caps if not m["stable"]]
    # WebVTT follows the shown captions; JSON Lines keeps every caption with its flag
    shown = [caption_from_message(m) for m in caps if m["shown"]]
    assert (out / "cam.vtt").read_text() == render(shown, "vtt")
    lines = [json.loads(line) for line in (out / "cam.jsonl").read_text().splitlines()]
    assert [(line["index"], line["text"], line["shown"]) for line in lines] == \
        [(m["index"], m["text"], m["shown"]) for m in caps]
