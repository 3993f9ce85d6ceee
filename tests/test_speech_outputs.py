"""Speech in the outputs (issue #17): speech cues in the live subtitle files (one timeline with the scene
captions, publish/subtitles.py) and on the OBS overlay (`?show=speech|scene|both`).

Real parts: the demo's scenes with espeak-ng narration muxed in (tests/support/scenes.py), captioned by the
bundled GIT model and transcribed by the bundled speech model (streamer/models/world-whisper); a real
daemon with `speech = "on"` (its live audio path), real WebSocket clients and Debian's Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from pathlib import Path

import aiohttp
import pytest
import srt
import websockets
import webvtt

from streamer.defaults import BUNDLED_MODEL
from streamer.publish.formats import render
from streamer.publish.hub import CaptionHub
from streamer.publish.subtitles import SubtitleOutputs
from streamer.speech import BUNDLED_SPEECH_MODEL
from streamer.types import Caption, SpeechCue
from tests.support.browser import chromium, chromium_missing, eventually
from tests.support.daemon import read_messages, running_daemon
from tests.support.scenes import SceneClip, demo_clip, espeak_missing

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(espeak_missing() is not None, reason=str(espeak_missing())),
    pytest.mark.skipif(not (BUNDLED_SPEECH_MODEL / "config.json").is_file(), reason="no bundled speech model"),
]

# Said in the three scenes: sentences the speech model knows, none of them a scene caption, so the
# overlay and the files can tell speech from scene.
SAID = ["fifty six seventy one", "a small white triangle is still", "ninety nine twelve"]
WINDOW, HOP = 3.0, 1.0


@pytest.fixture(scope="module")
def narrated(tmp_path_factory) -> SceneClip:
    return demo_clip(tmp_path_factory.mktemp("speech-outputs") / "narrated.mp4", 3, 6.0, narrated=True, said=SAID)


@pytest.fixture(scope="module")
def heard(narrated) -> tuple[list[Caption], list[SpeechCue]]:
    """The clip's captions (bundled GIT) and speech cues (bundled Whisper), as a live stream "cam" has them."""
    import dataclasses

    from streamer.engine import Engine, EngineConfig
    from streamer.pipeline.offline import CaptionJob, caption_file
    from streamer.pipeline.sampler import SamplerConfig
    from streamer.speech.engine import SpeechConfig, SpeechEngine
    from streamer.speech.offline import transcribe_file

    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), threads=1, max_new_tokens=20))
    job = CaptionJob(str(narrated.path), SamplerConfig(window=WINDOW, frames=engine.num_frames, hop=HOP))
    captions = [dataclasses.replace(c, stream_id="cam") for c in caption_file(engine, job)]
    speech = SpeechEngine.load(SpeechConfig(model=str(BUNDLED_SPEECH_MODEL), threads=1))
    cues = transcribe_file(speech, str(narrated.path), stream_id="cam")
    assert len(cues) == len(SAID)
    return captions, cues


def seconds(ts: str) -> float:
    h, m, s = ts.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    return [(seconds(c.start), seconds(c.end), c.text) for c in webvtt.from_string(text).captions]


def at(cues: list[tuple[float, float, str]], t: float) -> str | None:
    return next((text for start, end, text in cues if start <= t < end), None)


async def play(outputs: SubtitleOutputs, captions: list[Caption], cues: list[SpeechCue]) -> None:
    """Publish as a live stream would: each caption when its window's media has come (its end), each speech
    cue once its utterance ended and the silence after it was heard (end + 0.6 s)."""
    hub = CaptionHub()
    await outputs.start(hub)
    timeline = sorted([(c.end, 0, c) for c in captions] + [(q.end + 0.6, 1, q) for q in cues], key=lambda x: x[:2])
    for _, _, item in timeline:
        if isinstance(item, Caption):
            hub.publish_caption(item)
        else:
            hub.publish_event(item)
        await asyncio.sleep(0)
    hub.close()
    await outputs.close()


async def test_subtitle_files_carry_what_was_said_on_the_scene_timeline(heard, tmp_path):
    captions, cues = heard
    outputs = SubtitleOutputs(tmp_path, formats=["vtt", "srt", "jsonl"])  # speech = "cues", the default
    assert outputs.types == {"speech"}
    await play(outputs, captions, cues)
    merged = vtt_cues((tmp_path / "cam.vtt").read_text())
    scene_only = vtt_cues(render(captions, "vtt"))  # what the files held before speech (stabilizer off here)
    # one timeline: in order, never overlapping, every cue with its text
    for (s0, e0, _), (s1, e1, _) in itertools.pairwise(merged):
        assert s0 < e0 <= s1 < e1
    assert merged[0][0] == scene_only[0][0] and merged[-1][1] == scene_only[-1][1]
    # inside each utterance: what was said, then the scene caption of that moment in brackets on its own line
    for cue in cues:
        for t in (cue.start + 0.05, (cue.start + cue.end) / 2, cue.end - 0.05):
            assert at(merged, t) == f"{cue.text}\n[{at(scene_only, t)}]", t
    # and outside them, the scene captions as they were
    for t in [x / 10 for x in range(int(scene_only[-1][1] * 10))]:
        if not any(q.start <= t < q.end for q in cues):
            assert at(merged, t) == at(scene_only, t), t
    # what was said is what the speech model heard: the words, within the bounds of tests/test_speech.py
    from streamer.training.speech import word_error_rate

    assert word_error_rate(SAID, [q.text for q in cues]) <= 0.15, [q.text for q in cues]
    # SubRip: the same cues, numbered from 1
    subs = list(srt.parse((tmp_path / "cam.srt").read_text()))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == [
        (i, pytest.approx(a, abs=1e-3), pytest.approx(b, abs=1e-3), text) for i, (a, b, text) in enumerate(merged, 1)]
    # JSON Lines: every caption, and one line per speech cue, as the `speech` message has it
    lines = [json.loads(line) for line in (tmp_path / "cam.jsonl").read_text().splitlines()]
    spoken = [line for line in lines if line.get("type") == "speech"]
    assert [{k: v for k, v in line.items() if k != "offset"} for line in spoken] == [
        {**q.to_dict(), "latency": pytest.approx(q.to_dict()["latency"])} for q in cues]
    assert len(lines) == len(captions) + len(cues) and outputs.speech_late == 0


async def test_speech_off_leaves_the_files_as_they_were(heard, tmp_path):
    from streamer.publish.sinks import outputs_from_config

    captions, cues = heard
    [outputs] = outputs_from_config({"outputs": {"dir": str(tmp_path), "speech": "off"}})
    assert isinstance(outputs, SubtitleOutputs) and outputs.types == frozenset()
    await play(outputs, captions, cues)
    assert (tmp_path / "cam.vtt").read_text() == render(captions, "vtt")
    assert not any('"speech"' in line for line in (tmp_path / "cam.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match=r"\[outputs\] speech"):
        outputs_from_config({"outputs": {"dir": str(tmp_path), "speech": "subtitles"}})


async def test_a_cue_later_than_the_file_is_cut_to_fit_counted_and_said_once(heard, tmp_path, caplog):
    """Before a stream's first cue nothing is held back: an utterance that began before the last cue written
    is cut to start there; one that ended before it is dropped. Both counted, one warning per stream."""
    captions, cues = heard
    first = [c for c in captions if c.start < 10.0]
    # with no speech yet, the file's cues are final up to the last change of caption text: an utterance that
    # starts before it comes too late (where that is depends on the model's captions, so it is read from them)
    past = [c.start for before, c in itertools.pairwise(first) if c.text != before.text][-1]
    assert past > cues[0].end
    outputs = SubtitleOutputs(tmp_path, formats=["vtt"])
    hub = CaptionHub()
    await outputs.start(hub)
    with caplog.at_level(logging.WARNING, logger="streamer.publish.subtitles"):
        for caption in first:
            hub.publish_caption(caption)
            await asyncio.sleep(0)
        hub.publish_event(cues[0])  # 0.5-2.1 s: the file is past it
        hub.publish_event(SpeechCue("cam", past - 1.0, past + 2.0, "a big red circle moves to the left", -0.1, "m", 1.0,
                                    1.5))
        await asyncio.sleep(0)  # the sink takes them (a hub closed with messages queued drops them)
        hub.close()
        await outputs.close()
    merged = vtt_cues((tmp_path / "cam.vtt").read_text())
    assert outputs.speech_late == 2
    assert not any(cues[0].text in text for _, _, text in merged)
    late = [(a, b) for a, b, text in merged if text.startswith("a big red circle moves to the left")]
    assert late and late[0][0] == pytest.approx(past, abs=1e-3) and late[-1][1] == pytest.approx(past + 2.0, abs=1e-3)
    assert sum("cut to fit" in r.getMessage() for r in caplog.records) == 1


async def test_a_live_stream_with_speech_writes_what_was_said_into_its_files(narrated, tmp_path):
    """Through the daemon's own audio path (`speech = "on"`): the file played as a live source, in real time
    (read faster than that, its captions would run ahead of its speech by more than a live stream's)."""
    async with running_daemon(BUNDLED_MODEL, max_new_tokens=20,
                              sinks=(("outputs", {"dir": str(tmp_path)}),)) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?types=speech") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            body = {"id": "cam", "url": str(narrated.path), "window": WINDOW, "hop": HOP, "speech": "on"}
            async with http.post(f"{d.http}/streams", json=body) as resp:
                assert resp.status == 201, await resp.text()
            got = await read_messages(ws, lambda ms: len([m for m in ms if m["type"] == "speech"]) >= len(SAID) and
                                      any(m["type"] == "state" and m["state"] == "stopped" for m in ms), 60)
        spoken = [m for m in got if m["type"] == "speech"]
        d.stop.set()  # the end of the file: every window is captioned before the daemon stops
        await asyncio.wait_for(d.task, 30)  # the files are flushed when the daemon has drained
    merged = vtt_cues((tmp_path / "cam.vtt").read_text())
    for cue in spoken:
        text = at(merged, (cue["start"] + cue["end"]) / 2)
        assert text is not None and text.startswith(cue["text"] + "\n[") and text.endswith("]"), (cue, text)
    lines = [json.loads(line) for line in (tmp_path / "cam.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines if line.get("type") == "speech"] == [m["text"] for m in spoken]


# -- the overlay ------------------------------------------------------------------------------------------------


@pytest.fixture
async def browser():
    if chromium_missing():
        pytest.skip(str(chromium_missing()))
    async with chromium() as b:
        yield b


async def texts(page) -> dict:
    return await page.evaluate("""() => ({caption: document.getElementById('caption').textContent,
        scene: document.getElementById('scene').textContent, speech: document.body.dataset.speech || null,
        state: document.body.dataset.state})""")


class Log:
    """Every message a WebSocket client of the daemon gets (here: captions and speech), in the background."""

    def __init__(self, url: str) -> None:
        self.url, self.messages = url, []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Log:  # noqa: PYI034
        ready = asyncio.Event()

        async def run() -> None:
            async with websockets.connect(self.url) as ws:
                async for raw in ws:
                    self.messages.append(json.loads(raw))
                    ready.set()

        self._task = asyncio.create_task(run())
        await asyncio.wait_for(ready.wait(), 10)  # hello
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await self._task

    def texts(self, kind: str) -> set[str]:
        return {m["text"] for m in self.messages if m["type"] == kind}


async def test_the_overlay_shows_what_is_said_and_the_scene_as_asked(narrated, browser):
    async with running_daemon(BUNDLED_MODEL, max_new_tokens=20) as d, aiohttp.ClientSession() as http, \
            Log(d.ws + "?streams=cam&types=speech&all=1") as log:
        pages = {}
        for show in ("auto", "both", "scene"):  # auto: no `show` in the query
            page = await browser.new_page(viewport={"width": 960, "height": 540})
            errors: list[str] = []
            page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
            await page.goto(f"{d.http}/overlay/cam?fade=0" + ("" if show == "auto" else f"&show={show}"))
            pages[show] = (page, errors)
        for page, _ in pages.values():
            await eventually(lambda page=page: _connected(page), 10, "the overlay to connect")
        # played in real time: the overlays see captions and cues as they come, as a viewer would
        body = {"id": "cam", "url": str(narrated.path), "window": WINDOW, "hop": HOP, "speech": "on"}
        async with http.post(f"{d.http}/streams", json=body) as resp:
            assert resp.status == 201, await resp.text()

        async def shows(page, kind: str, field: str = "caption"):
            now = await texts(page)
            return now if now[field] and now[field] in log.texts(kind) else None

        # before any speech, the default overlay shows the scene
        await eventually(lambda: shows(pages["auto"][0], "caption"), 20, "the default overlay to show a caption")
        await eventually(lambda: _said(log), 20, "a speech cue")
        auto = await eventually(lambda: shows(pages["auto"][0], "speech"), 10, "the default overlay to show speech")
        assert auto["speech"] == "yes" and auto["scene"] == ""  # from the first cue on, what is said replaces the scene
        await eventually(lambda: shows(pages["both"][0], "speech"), 10, "show=both to show speech")
        await eventually(lambda: shows(pages["both"][0], "caption", "scene"), 10, "show=both to show the scene below")
        # a caption after the cue does not take the speech's place on the default overlay
        count = len([m for m in log.messages if m["type"] == "caption"])
        await eventually(lambda: _more(log, count + 2), 10, "two more captions")
        assert await shows(pages["auto"][0], "speech"), await texts(pages["auto"][0])
        scene = await texts(pages["scene"][0])  # show=scene: no speech at all
        assert scene["caption"] in log.texts("caption") and scene["speech"] is None and scene["scene"] == ""
        artifacts = Path(__file__).resolve().parent.parent / "artifacts"
        artifacts.mkdir(exist_ok=True)
        for show, (page, errors) in pages.items():
            assert not errors, (show, errors)
            await page.screenshot(path=str(artifacts / f"overlay-speech-{show}.png"))


async def _said(log: Log) -> set[str]:
    return log.texts("speech")


async def _more(log: Log, n: int) -> bool:
    return len([m for m in log.messages if m["type"] == "caption"]) >= n


async def _connected(page) -> bool:
    return (await texts(page))["state"] == "connected"
