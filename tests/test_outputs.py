"""Live subtitle files: a real daemon (file played as live, looped) writing
.vtt/.srt/.jsonl through the [outputs] config, compared with what a real
WebSocket client receives; a restart appends on one timeline. Plus file
errors (a full disk, an unwritable directory) and config parsing against a
bare CaptionHub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import srt
import websockets
import webvtt

from streamer.cli.serve import load_config
from streamer.errors import StreamerError
from streamer.publish.formats import render
from streamer.publish.hub import CaptionHub
from streamer.publish.sinks import Sink, outputs_from_config
from streamer.publish.subtitles import SubtitleOutputs, caption_from_message
from streamer.publish.webhooks import WebhookSink
from streamer.types import Caption
from tests.support.daemon import Running, running_daemon
from tests.support.media import solid_frames, write_video

pytestmark = pytest.mark.timeout(90)

CAPTION_FIELDS = ("stream_id", "index", "start", "end", "text", "confidence", "model", "capture_time", "emit_time", "latency")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """4 s, 15 fps, one solid colour per second: the tiny model says different things about each."""
    frames = []
    for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)):
        frames += solid_frames(15, rgb)
    return write_video(tmp_path_factory.mktemp("outputs") / "colours.mp4", frames, fps=15)


Served = Running


def serving(model, sinks: tuple = ()):
    """`serve()` in this loop, as `streamer serve` runs it, with the given raw sink tables."""
    return running_daemon(model, sinks=sinks)


async def add_stream(served: Served, **body) -> None:
    body = {"window": 1.0, "hop": 0.5, **body}
    async with aiohttp.ClientSession() as http, http.post(f"{served.http}/streams", json=body) as resp:
        assert resp.status == 201, await resp.text()


async def collect_captions(ws, out: list[dict], stream_id: str) -> None:
    """Append every caption of `stream_id` until the server closes the connection."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "caption" and message["stream_id"] == stream_id:
                out.append(message)


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def run_daemon_once(model, out_dir: Path, clip: Path, n: int) -> list[dict]:
    """One daemon run with [outputs]: the captions a WebSocket client got, up to and through shutdown."""
    received: list[dict] = []
    sinks = (("outputs", {"dir": str(out_dir), "formats": ["vtt", "srt", "jsonl"]}),)
    async with serving(model, sinks) as served:
        async with websockets.connect(served.ws + "?all=1") as ws:
            reader = asyncio.create_task(collect_captions(ws, received, "cam"))
            await add_stream(served, id="cam", url=str(clip), loop=True)
            await wait_for(lambda: len(received) >= n, 40, f"{n} captions")
            # live: a player tailing the file already sees them (flushed as they come)
            jsonl = out_dir / "cam.jsonl"
            await wait_for(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= n, 10, "live jsonl lines")
            served.stop.set()
            await asyncio.wait_for(served.task, 30)  # drains; the sinks are closed after the daemon
            await asyncio.wait_for(reader, 10)  # closed with 1001
    return received


def ts(value: str) -> float:
    h, m, s = value.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    return [(ts(c.start), ts(c.end), c.raw_text) for c in webvtt.from_string(text).captions]


def as_caption(message: dict) -> Caption:
    caption = caption_from_message(message)
    assert caption is not None
    return caption


async def test_subtitle_files_follow_the_live_captions_and_a_restart_appends_on_one_timeline(tiny_model, colours, tmp_path):
    out = tmp_path / "subs"
    vtt_path, srt_path, jsonl_path = out / "cam.vtt", out / "cam.srt", out / "cam.jsonl"

    # -- first run -------------------------------------------------------------
    first = await run_daemon_once(tiny_model, out, colours, 8)
    vtt1, srt1, jsonl1 = vtt_path.read_text(), srt_path.read_text(), jsonl_path.read_text()
    lines1 = [json.loads(line) for line in jsonl1.splitlines()]
    # JSON Lines: the captions themselves, every one, in order (no shift on a fresh file)
    assert [{k: line[k] for k in CAPTION_FIELDS} for line in lines1] == [{k: m[k] for k in CAPTION_FIELDS} for m in first]
    assert all(line["offset"] == 0 for line in lines1)
    assert len({m["text"] for m in first}) >= 3  # the cue checks below mean something
    # WebVTT: parses, and its cues are what the timing policy makes of the captions the client saw shown
    # (the stream's stabilizer, on by default; JSON Lines has every caption and its flag)
    assert [line["shown"] for line in lines1] == [m["shown"] for m in first]
    assert vtt1.startswith("WEBVTT\n\n")
    cues1 = vtt_cues(vtt1)
    shown1 = [m for m in first if m["shown"]]
    assert cues1 == vtt_cues(render([as_caption(m) for m in shown1], "vtt"))
    starts = {round(m["start"], 3) for m in shown1}
    assert all(round(start, 3) in starts for start, _, _ in cues1)  # every cue starts at a shown caption's start
    assert cues1[-1][1] == pytest.approx(max(shown1[-1]["end"], shown1[-1]["start"] + 1.0), abs=1e-3)
    # SubRip: parses, numbered from 1, same cues
    subs1 = list(srt.parse(srt1))
    assert [s.index for s in subs1] == list(range(1, len(cues1) + 1))
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs1] == \
        [(a, b, t) for a, b, t in cues1]

    # -- restart on the same directory: the file starts at media time 0 again ----
    second = await run_daemon_once(tiny_model, out, colours, 4)
    assert second[0]["start"] < first[-1]["start"]  # the source's own clock went back
    vtt2, srt2, jsonl2 = vtt_path.read_text(), srt_path.read_text(), jsonl_path.read_text()
    # appended, never truncated
    assert vtt2.startswith(vtt1) and srt2.startswith(srt1) and jsonl2.startswith(jsonl1)
    assert vtt2.count("WEBVTT") == 1
    cues = vtt_cues(vtt2)
    assert cues[: len(cues1)] == cues1 and len(cues) > len(cues1)
    # one timeline: starts increase, no cue begins before the previous one ended
    for (s0, e0, _), (s1, e1, _) in zip(cues, cues[1:]):
        assert s1 >= e0 and s1 > s0 and e1 > s1
    # the new run starts exactly where the files ended, shifted by one offset
    floor = max(cues1[-1][1], lines1[-1]["end"])
    lines2 = [json.loads(line) for line in jsonl2.splitlines()][len(lines1):]
    offsets = {line["offset"] for line in lines2}
    assert len(offsets) == 1
    offset = offsets.pop()
    assert offset == pytest.approx(floor - second[0]["start"], abs=1e-6)
    assert [(line["index"], line["text"]) for line in lines2] == [(m["index"], m["text"]) for m in second]
    for line, m in zip(lines2, second):
        assert line["start"] == pytest.approx(m["start"] + offset) and line["end"] == pytest.approx(m["end"] + offset)
    assert cues[len(cues1)][0] == pytest.approx(floor, abs=1e-3)
    # SubRip numbering continues, same cues as the VTT
    subs = list(srt.parse(srt2))
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == [(a, b, t) for a, b, t in cues]


def make_caption(stream_id: str, index: int, start: float, text: str) -> Caption:
    now = time.time()
    return Caption(stream_id, index, start, start + 0.9, text, -0.5, "test-model", now - 0.1, now)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def recorded(name: str):
    handler = Records()
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def publish_all(hub: CaptionHub, captions) -> None:
    for caption in captions:
        hub.publish_caption(caption)
        await asyncio.sleep(0)  # let the sinks' consumers run, as between engine batches


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_or_unwritable_dir_is_logged_once_per_stream_and_nothing_stalls(tmp_path):
    out = tmp_path / "subs"
    out.mkdir()
    (out / "full.vtt").symlink_to("/dev/full")  # every write: ENOSPC, like a full disk
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the directory should be")
    hub = CaptionHub()
    good = SubtitleOutputs(out)
    bad = SubtitleOutputs(blocked / "subs", streams=["ok"])
    watcher = hub.subscribe(None, only_changes=False, replay=False)  # e.g. a WebSocket client
    with recorded("streamer.publish.subtitles") as records:
        await good.start(hub)
        await bad.start(hub)
        captions = [make_caption(sid, i, i * 0.5, f"{sid} caption {i}") for i in range(20) for sid in ("ok", "full")]
        started = time.monotonic()
        await publish_all(hub, captions)
        assert time.monotonic() - started < 1.0
        got = [json.loads((await watcher.get()).encoded) for _ in captions]  # nobody waited for the disk
        assert [(m["stream_id"], m["index"]) for m in got] == [(c.stream_id, c.index) for c in captions]
        hub.close()
        await good.close()
        await bad.close()
        await good.close()  # idempotent
    errors = [r for r in records if r.levelno >= logging.ERROR]
    # one line per failing stream (full: its .vtt; ok in the blocked dir: all three files), with a traceback
    assert sorted((r.stream, r.path.rsplit("/", 1)[-1]) for r in errors) == [("full", "full.vtt"), ("ok", "ok.vtt")]
    assert all(r.exc_info for r in errors)
    assert good.errors >= 1 and bad.errors >= 1
    # the other files of the same stream, and the other stream, are complete
    assert len((out / "full.jsonl").read_text().splitlines()) == 20
    assert [s.content for s in srt.parse((out / "full.srt").read_text())] == [f"full caption {i}" for i in range(20)]
    assert [c[2] for c in vtt_cues((out / "ok.vtt").read_text())] == [f"ok caption {i}" for i in range(20)]


async def test_a_stream_added_again_continues_its_timeline_and_a_cut_file_is_repaired(tmp_path):
    out = tmp_path / "subs"
    out.mkdir()
    # a previous run that died mid-write: the last cue has no blank line after it
    (out / "cam.vtt").write_text("WEBVTT\n\n00:00:01.000 --> 00:00:03.000\nold cue")
    (out / "cam.srt").write_text("1\n00:00:01,000 --> 00:00:03,000\nold cue\n")
    (out / "cam.jsonl").write_text('{"stream_id": "cam", "index": 3, "start": 1.0, "end": 2.5, "text": "old cue"}')
    hub = CaptionHub()
    outputs = SubtitleOutputs(out, formats=["vtt", "srt", "jsonl"])
    await outputs.start(hub)
    await publish_all(hub, [make_caption("cam", i, 0.5 + i * 0.5, f"run one {i}") for i in range(3)])
    # the stream is removed and added again: its media time and window index start over
    await publish_all(hub, [make_caption("cam", i, 0.5 + i * 0.5, f"run two {i}") for i in range(2)])
    hub.close()
    await outputs.close()
    cues = vtt_cues((out / "cam.vtt").read_text())
    assert cues == [
        (1.0, 3.0, "old cue"),
        (3.0, 3.5, "run one 0"), (3.5, 4.0, "run one 1"), (4.0, 5.0, "run one 2"),  # shifted by 2.5
        (5.0, 5.5, "run two 0"), (5.5, 6.5, "run two 1"),  # after the held cue's end: shifted by 4.5
    ]
    subs = list(srt.parse((out / "cam.srt").read_text()))
    assert [(s.index, s.start, s.content) for s in subs][-2:] == [
        (5, timedelta(seconds=5), "run two 0"), (6, timedelta(seconds=5.5), "run two 1")]
    lines = [json.loads(line) for line in (out / "cam.jsonl").read_text().splitlines()]
    assert [(line["text"], line.get("offset")) for line in lines] == [
        ("old cue", None), ("run one 0", 2.5), ("run one 1", 2.5), ("run one 2", 2.5),
        ("run two 0", 4.5), ("run two 1", 4.5)]


def test_sinks_from_config_tables_and_clear_errors(tmp_path):
    from streamer.publish import sinks as sinks_module
    from streamer.publish import subtitles as outputs
    from streamer.publish import webhooks

    assert set(outputs.__all__) == {"OUTPUT_FORMATS", "SubtitleOutputs", "caption_from_message"}
    assert set(webhooks.__all__) == {"WebhookSink"}
    assert set(sinks_module.__all__) == {"Sink", "outputs_from_config", "close_sinks"}
    sinks = outputs_from_config({
        "model": {"id": "x"},
        "outputs": {"dir": str(tmp_path), "formats": ["vtt", "jsonl"], "streams": ["lobby"]},
        "webhooks": [{"url": "http://127.0.0.1:9/hook", "match": "person|car", "retries": 1, "backoff": 1, "timeout": 2}],
    })
    assert [type(s) for s in sinks] == [SubtitleOutputs, WebhookSink]
    assert all(isinstance(s, Sink) for s in sinks)
    assert sinks[0].formats == ("vtt", "jsonl") and sinks[0].streams == {"lobby"}
    hook = sinks[1]
    assert hook.pattern.search("A PERSON") and hook.retries == 1 and hook.backoff == 1.0 and hook.timeout == 2.0
    assert outputs_from_config({}) == []
    for data, message in [
        ({"outputs": {"formats": ["vtt"]}}, "[outputs] dir"),
        ({"outputs": {"dir": "x", "formats": ["vtt", "mp4"]}}, "unknown format(s) 'mp4'"),
        ({"outputs": {"dir": "x", "format": ["vtt"]}}, "unknown key(s) format"),
        ({"outputs": {"dir": "x", "streams": "lobby"}}, "streams must be a list"),
        ({"webhooks": {"url": "http://h/"}}, "write [[webhooks]]"),
        ({"webhooks": [{"match": "x"}]}, "[[webhooks]] #1 url: required"),
        ({"webhooks": [{"url": "http://h/"}, {"url": "ftp://h/"}]}, "[[webhooks]] #2: webhook url must be http(s)"),
        ({"webhooks": [{"url": "http://h/", "match": "("}]}, "not a valid regular expression"),
        ({"webhooks": [{"url": "http://h/", "retries": -1}]}, "retries = -1: Input should be greater than or equal to 0"),
        ({"webhooks": [{"url": "http://h/", "timeout": "soon"}]}, "timeout = 'soon': not a duration"),
        ({"webhooks": [{"url": "http://h/", "timeout": 0}]}, "timeout = 0: must be over 0 s"),
    ]:
        with pytest.raises(ValueError) as info:
            outputs_from_config(data)
        assert message in str(info.value), (message, str(info.value))


def test_load_config_keeps_the_sink_tables(tmp_path):
    path = tmp_path / "streamer.toml"
    path.write_text(f"""
[outputs]
dir = "{tmp_path / 'subs'}"
formats = ["vtt", "srt"]

[[webhooks]]
url = "http://127.0.0.1:9/a"

[[webhooks]]
url = "http://127.0.0.1:9/b"
match = "person"
streams = ["lobby"]
""")
    config = load_config(str(path))
    assert dict(config.sinks) == {
        "outputs": {"dir": str(tmp_path / "subs"), "formats": ["vtt", "srt"]},
        "webhooks": [{"url": "http://127.0.0.1:9/a"}, {"url": "http://127.0.0.1:9/b", "match": "person", "streams": ["lobby"]}],
    }
    assert load_config(None).sinks == ()
    path.write_text('[outputs]\ndir = "x"\nformats = ["vtt", "ass"]\n')
    with pytest.raises(StreamerError, match=r"\[outputs\] formats: unknown format"):
        load_config(str(path))
