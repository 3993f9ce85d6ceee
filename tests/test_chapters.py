"""Chapters (publish/chapters.py): the demo's synthetic scenes, with cuts at known times, captioned by the
bundled model (streamer/models/world-git): offline through `streamer caption --chapters`, and live through a
real daemon that publishes `chapter` events to an opted-in WebSocket client, serves GET
/streams/{id}/chapters (JSON and WebVTT) and writes a live `{id}.chapters.vtt` beside the subtitles."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time

import aiohttp
import pytest
import websockets
import webvtt

from streamer.defaults import BUNDLED_MODEL
from streamer.http.common import ServerConfig
from streamer.pipeline.daemon import DaemonConfig
from streamer.pipeline.scheduler import SchedulerConfig
from streamer.publish.chapters import Chapterer, similarity
from streamer.security.auth import TokenEntry
from streamer.types import Caption
from tests.support.daemon import add_to_cluster, read_messages, running_daemon, trusting_policy
from tests.support.scenes import SceneClip, bundled_captions, demo_clip, names_colour_and_shape

pytestmark = pytest.mark.timeout(180)

WINDOW, HOP = 3.0, 1.0
ADMIN, VIEWER, OTHER = "admin-token-0123456789", "viewer-cam-token-0123456789", "viewer-other-token-0123456789"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> SceneClip:
    """The demo's four scenes, 6 s each: cuts at 6, 12 and 18 s."""
    return demo_clip(tmp_path_factory.mktemp("chapters") / "scenes.mp4", 4, 6.0)


@pytest.fixture(scope="module")
def captions(scenes) -> list[Caption]:
    """The bundled model's captions of every window (3 s windows every second)."""
    return bundled_captions(scenes.path, WINDOW, HOP)


def assert_scene_chapters(chapters: list[dict], clip: SceneClip) -> None:
    """One chapter per scene, each boundary within one hop of its cut, titles naming each scene."""
    assert len(chapters) == len(clip.scenes), [(c["start"], c["title"]) for c in chapters]
    for chapter, cut in zip(chapters[1:], clip.cuts):
        assert abs(chapter["start"] - cut) <= HOP + 1e-6, (chapter, cut)
    for chapter, (caption, _, _) in zip(chapters, clip.scenes):
        assert names_colour_and_shape(chapter["title"], caption), (chapter["title"], caption)
    for before, after in itertools.pairwise(chapters):
        assert before["end"] == after["start"] and after["index"] == before["index"] + 1  # contiguous, numbered
    assert chapters[0]["index"] == 0 and chapters[-1]["end"] >= clip.scenes[-1][2] - WINDOW


def cues_of(text: str) -> list[tuple[float, float, str]]:
    def seconds(ts: str) -> float:
        h, m, s = ts.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    return [(seconds(c.start), seconds(c.end), c.text) for c in webvtt.from_string(text).captions]


def run(captions: list[Caption]) -> list[dict]:
    rule = Chapterer("cam")
    chapters = [c for caption in captions for c in rule.feed(caption)] + rule.flush()
    return [dataclasses.asdict(c) for c in chapters]


# -- offline ------------------------------------------------------------------------------------------------


def test_caption_chapters_cuts_a_file_at_its_scene_cuts(scenes, tmp_path):
    from streamer.cli import main

    base = ["caption", str(scenes.path), "--chapters", "--model", str(BUNDLED_MODEL), "--threads", "1", "--no-progress",
            "--max-new-tokens", "20"]
    assert main([*base, "-o", str(tmp_path / "chapters.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "chapters.jsonl").read_text().splitlines()]
    assert {line["type"] for line in lines} == {"chapter"} and {line["stream_id"] for line in lines} == {str(scenes.path)}
    assert_scene_chapters(lines, scenes)
    # the same chapters as a WebVTT chapters track
    assert main([*base, "--format", "vtt", "-o", str(tmp_path / "chapters.vtt")]) == 0
    assert cues_of((tmp_path / "chapters.vtt").read_text()) == [
        (pytest.approx(c["start"], abs=1e-3), pytest.approx(c["end"], abs=1e-3), c["title"]) for c in lines]


def test_caption_chapters_refuses_what_it_cannot_do(scenes, capsys):
    from streamer.cli import main

    assert main(["caption", str(scenes.path), "--chapters", "--format", "srt"]) == 2
    assert "--format jsonl or vtt" in capsys.readouterr().err
    assert main(["caption", str(scenes.path), "--chapters", "--summary"]) == 2
    assert "not with --summary" in capsys.readouterr().err


def test_a_flicker_inside_a_scene_does_not_cut_a_chapter_but_a_lasting_change_does(captions, scenes):
    chapters = run(captions)
    assert_scene_chapters(chapters, scenes)
    foreign = "two big blue squares move up"  # nothing like any scene of the clip
    assert all(similarity(foreign, caption) < 0.6 for caption, _, _ in scenes.scenes)

    def with_foreign(indices) -> list[Caption]:
        return [dataclasses.replace(c, text=foreign) if i in indices else c for i, c in enumerate(captions)]

    inside = {k: [i for i, c in enumerate(captions) if start <= c.start and c.end < end]  # windows wholly in scene k
              for k, (_, start, end) in enumerate(scenes.scenes)}
    for i in sorted(i for window in inside.values() for i in window):
        assert len(run(with_foreign({i}))) <= len(chapters), f"one odd window ({i}) cut a chapter"
    # a scene the model names right in all its windows (which one depends on the model: the bundled
    # model's slow scenes sometimes say "still" once, and that window next to an odd one is a change)
    k = next(k for k, window in inside.items()
             if len(window) >= 3 and all(captions[i].text == scenes.scenes[k][0] for i in window))
    # One odd window anywhere in it but its last: the same chapters, within a hop. The last inside window is
    # followed by windows that straddle the cut and may name the next scene already (stage 5 of the bundled
    # model names 36% of straddling windows): an odd window there is the first of a lasting change, the cut
    # seen one window early, and no rule can tell it from one.
    for i in inside[k][:-1]:
        assert_scene_chapters(run(with_foreign({i})), scenes)
    # the whole scene saying something else is a lasting change: its chapter is titled by it
    lasting = run(with_foreign(set(inside[k])))
    _, start, end = scenes.scenes[k]
    assert len(lasting) == len(chapters) and lasting[k]["title"] == foreign
    assert abs(lasting[k]["start"] - start) <= HOP and abs(lasting[k]["end"] - end) <= HOP


def test_the_rule_starts_afresh_when_a_stream_starts_over_and_keeps_counting():
    rule = Chapterer("cam", hold=2, smooth=1)
    texts = ["a big red circle moves up"] * 3 + ["two small blue squares move down"] * 3
    closed = [c for i, t in enumerate(texts) for c in rule.feed(Caption("cam", i, float(i), i + 3.0, t, -0.1, "m"))]
    assert [(c.index, c.start, c.title) for c in closed] == [(0, 0.0, "a big red circle moves up")]
    assert closed[0].end == pytest.approx(4.0)  # halfway between the centres of windows 2 (3.5) and 3 (4.5)
    # the stream was removed and added again: its index and media time start over
    again = rule.feed(Caption("cam", 0, 0.0, 3.0, "a small green triangle moves to the left", -0.1, "m"))
    assert [(c.index, c.start, c.end, c.title) for c in again] == [(1, 4.0, 8.0, "two small blue squares move down")]
    assert [(c.index, c.start) for c in rule.flush()] == [(2, 0.0)]


# -- live ---------------------------------------------------------------------------------------------------


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_live_stream_publishes_chapter_events_serves_them_and_writes_chapters_vtt(scenes, tmp_path):
    out = tmp_path / "subs"
    server = ServerConfig(port=0, sources=trusting_policy(), tokens=(
        TokenEntry.make("admin", token=ADMIN), TokenEntry.make("viewer", token=VIEWER, streams=["cam"]),
        TokenEntry.make("viewer", token=OTHER, streams=["other"])))
    # every window captioned (a file read as fast as it decodes), as `streamer eval --live` plays it
    config = DaemonConfig(scheduler=SchedulerConfig(max_pending_per_stream=1000), ring_capacity=4096)
    async with running_daemon(BUNDLED_MODEL, daemon_config=config, server_config=server, max_new_tokens=20,
                              sinks=(("outputs", {"dir": str(out)}),)) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?types=chapter", additional_headers=auth(VIEWER)) as ws, \
                websockets.connect(d.ws, additional_headers=auth(VIEWER)) as plain:
            for sock in (ws, plain):
                assert json.loads(await sock.recv())["type"] == "hello"
            body = {"id": "cam", "url": str(scenes.path), "window": WINDOW, "hop": HOP, "realtime": False}
            async with http.post(f"{d.http}/streams", json=body, headers=auth(ADMIN)) as resp:
                assert resp.status == 201, await resp.text()

            def chapters_in(ms):
                return [m for m in ms if m["type"] == "chapter"]

            got = await read_messages(ws, lambda ms: len(chapters_in(ms)) >= len(scenes.scenes), 90)
            events = chapters_in(got)
            assert_scene_chapters(events, scenes)
            assert all(m["stream_id"] == "cam" and m["emit_time"] > 0 for m in events)
            # the last chapter closed when the file ended, after its `stopped`
            assert [m["state"] for m in got if m["type"] == "state"][-1] == "stopped"
            plain_got = await read_messages(plain, lambda ms: any(m["type"] == "state" and m["state"] == "stopped"
                                                                  for m in ms), 30)
            assert not chapters_in(plain_got)  # a client that did not ask sees no chapter

        url = f"{d.http}/streams/cam/chapters"
        async with http.get(url, headers=auth(VIEWER)) as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            listing = await resp.json()
        assert [{k: v for k, v in c.items() if k != "open"} for c in listing] == [
            {**m, "start": round(m["start"], 3), "end": round(m["end"], 3)} for m in (
                {k: v for k, v in e.items() if k != "v"} for e in events)]
        assert not any(c["open"] for c in listing)  # the file ended: nothing is open
        async with http.get(url + "?format=vtt", headers=auth(VIEWER)) as resp:
            assert resp.status == 200 and resp.content_type == "text/vtt"
            track = cues_of(await resp.text())
        assert track == [(pytest.approx(c["start"], abs=1e-3), pytest.approx(c["end"], abs=1e-3), c["title"])
                         for c in listing]
        # the live file beside the subtitle files (a fresh directory: no shift)
        path = out / "cam.chapters.vtt"
        deadline = time.monotonic() + 10
        while not (path.exists() and len(cues_of(path.read_text())) >= len(listing)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert cues_of(path.read_text()) == track
        assert (out / "cam.vtt").exists()
        # who may read them, and bad requests
        for headers, status in ((auth(OTHER), 403), ({}, 401)):
            async with http.get(url, headers=headers) as resp:
                assert resp.status == status
        async with http.get(url + "?format=xml", headers=auth(VIEWER)) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_format"
        async with http.get(f"{d.http}/streams/nope/chapters", headers=auth(ADMIN)) as resp:
            assert resp.status == 404


async def test_a_replica_that_does_not_own_the_stream_serves_its_owners_chapters(scenes, redis_server):
    from streamer.publish.bus import BusConfig

    bus = BusConfig(url=redis_server.url, key_prefix="chapters:", reconnect_max=0.5, lease_ttl=2.0)
    async with running_daemon(BUNDLED_MODEL, bus=bus, max_new_tokens=20) as a, \
            running_daemon(BUNDLED_MODEL, bus=bus, max_new_tokens=20) as b, aiohttp.ClientSession() as http:
        owner, other = await add_to_cluster(http, a, b, id="cam", url=str(scenes.path), window=WINDOW, hop=HOP, loop=True)

        async def listing(replica) -> list[dict]:
            async with http.get(f"{replica.http}/streams/cam/chapters") as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        deadline = time.monotonic() + 30
        while not (got := await listing(other)):  # the open chapter shows once the first caption is in
            assert time.monotonic() < deadline, "no chapter"
            await asyncio.sleep(0.2)
        assert got[-1]["open"] and got[-1]["stream_id"] == "cam" and got[-1]["title"]
        mine = await listing(owner)
        assert [c for c in mine if not c["open"]] == [c for c in got if not c["open"]] or len(mine) > len(got)
        async with http.get(f"{other.http}/streams/cam/chapters?format=vtt") as resp:
            assert resp.status == 200 and (await resp.text()).startswith("WEBVTT")
        async with http.get(f"{other.http}/streams/nope/chapters") as resp:
            assert resp.status == 404


async def test_chapter_files_are_appended_on_one_timeline(tmp_path):
    """The chapters file follows the subtitle files' rules: appended, `WEBVTT` once, a restart's
    chapters shifted to start where the file ended, a cut-off last line repaired."""
    from streamer.publish.hub import CaptionHub
    from streamer.publish.subtitles import SubtitleOutputs
    from streamer.types import Chapter

    out = tmp_path / "subs"
    out.mkdir()
    (out / "cam.chapters.vtt").write_text("WEBVTT\n\n00:00:00.000 --> 00:00:05.000\nold chapter")  # cut off

    async def one_run(chapters: list[Chapter], captions: list[Caption]) -> None:
        hub = CaptionHub()
        outputs = SubtitleOutputs(out, formats=["vtt"])
        await outputs.start(hub)
        for caption in captions:
            hub.publish_caption(caption)
            await asyncio.sleep(0)
        for chapter in chapters:
            outputs.submit_chapter(chapter)
        hub.close()
        await outputs.close()

    caps = [Caption("cam", i, float(i), i + 1.0, "a big red circle moves up", -0.1, "m") for i in range(4)]
    await one_run([Chapter("cam", 0, 0.0, 2.5, "a <big> red circle"), Chapter("cam", 1, 2.5, 4.0, "more")], caps)
    cues = cues_of((out / "cam.chapters.vtt").read_text())
    assert (out / "cam.chapters.vtt").read_text().count("WEBVTT") == 1
    assert cues == [(0.0, 5.0, "old chapter"), (5.0, 7.5, "a &lt;big&gt; red circle"), (7.5, 9.0, "more")]
