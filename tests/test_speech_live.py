"""Speech on live streams: real audio through real peers into the daemon, speech cues out over WebSocket.

Real parts: espeak-ng narration placed at known times and muxed with H.264 by PyAV (AAC, MP2, PCM),
files played as live, GStreamer's RTSP server sending video and AAC audio, an aiortc WHIP publisher
sending Opus, PyAV decoding and resampling, the energy VAD, the bundled tiny Whisper
(streamer/models/world-whisper), the real daemon and hub, a real WebSocket client. The caption model is
the tests' tiny random GIT: its captions are nonsense, but how many arrive and when is what counts here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import websockets
from aiortc import RTCSessionDescription

from streamer.config import StreamConfig
from streamer.ingest import FrameSource, SourceSpec
from streamer.pipeline.daemon import DaemonConfig
from streamer.pipeline.speech import SpeechSettings
from streamer.speech import BUNDLED_SPEECH_MODEL, BUNDLED_SPEECH_MODEL_NAME
from streamer.speech.vad import SAMPLE_RATE
from tests.support.daemon import add_stream, running_daemon
from tests.support.speech_media import (
    espeak_missing,
    narration,
    tone,
    write_av,
    write_rate_change_ts,
    write_unknown_audio_codec,
)

pytestmark = [
    pytest.mark.skipif(espeak_missing() is not None, reason=espeak_missing() or ""),
    pytest.mark.skipif(not (BUNDLED_SPEECH_MODEL / "config.json").is_file(), reason="the bundled speech model is missing"),
]

# Held-out sentences (never trained on) in voices the model trained with, at known media times.
NARRATION = [(3.5, "a big red circle moves to the left", "en-us+m1"), (8.0, "fifty six seventy one", "en-gb+f3")]
CLIP_SECONDS = 11.0
# The model card: held-out WER 3.9% (seen voices, noise); 0 errors on tests/test_speech.py's clip. One
# wrong word in these 11 is 9%: the bound allows that, not two.
WER_BOUND = 0.15
PLACE_TOLERANCE = 0.5  # a cue starts within this of where its words were placed (seconds of media time)
LATENCY_BOUND = 2.0  # utterance end -> cue, the p99 target, for each cue here


def speech_settings(**kw) -> SpeechSettings:
    return SpeechSettings(model=BUNDLED_SPEECH_MODEL_NAME, **kw)


@pytest.fixture(scope="module")
def narrated(tmp_path_factory) -> tuple[Path, list[tuple[float, float, str]]]:
    track, placed = narration(CLIP_SECONDS, NARRATION)
    return write_av(tmp_path_factory.mktemp("speech-live") / "narrated.mp4", CLIP_SECONDS, track), placed


class Inbox:
    """Every message of a WebSocket, read in the background; `until(cond)` waits for a condition."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
                self._new.set()
        except websockets.ConnectionClosed:  # the test is over (or failed): nothing more to read
            pass

    async def until(self, cond, timeout: float, what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while not cond(self.messages):
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                states = [(m["stream_id"], m["state"], m["detail"]) for m in self.messages if m["type"] == "state"][-8:]
                speech = [(m["stream_id"], m["text"]) for m in self.speech()]
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; speech {speech}; states {states}") from None
        return self.messages

    def speech(self, stream_id: str | None = None) -> list[dict]:
        return [m for m in self.messages if m["type"] == "speech" and stream_id in (None, m["stream_id"])]

    def captions(self, stream_id: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == "caption" and m["stream_id"] == stream_id]

    def states(self, stream_id: str) -> list[str]:
        return [m["state"] for m in self.messages if m["type"] == "state" and m["stream_id"] == stream_id]

    def close(self) -> None:
        self._task.cancel()


def stopped(*stream_ids: str):
    return lambda ms: all(any(m["type"] == "state" and m["stream_id"] == s and m["state"] == "stopped" for m in ms)
                          for s in stream_ids)


async def settle(d, inbox: Inbox, *stream_ids: str) -> None:
    """Wait until each (finished) stream's utterances were all transcribed and its cues reached the client."""
    for sid in stream_ids:
        speech = d.daemon.streams[sid].speech
        await asyncio.wait_for(speech.settled(), 30)
    counts = {sid: d.daemon.streams[sid].speech.cues for sid in stream_ids}
    await inbox.until(lambda ms: all(len(inbox.speech(s)) >= n for s, n in counts.items()), 10, f"cues {counts}")


@contextlib.asynccontextmanager
async def played_through(tiny_model, clip: Path, settings: SpeechSettings, stream_id: str = "cam", **stream):
    """A daemon with speech `settings`, after it played `clip` once, as fast as it decodes, as
    `stream_id` (`stream`: the stream's other settings): it stopped with a caption at least and, where
    speech is on, every cue reached the client. Yields (the daemon, an HTTP session, the inbox)."""
    async with running_daemon(tiny_model, daemon_config=DaemonConfig(speech=settings)) as d, \
            aiohttp.ClientSession() as http, websockets.connect(d.ws + "?all=1&types=speech") as ws:
        inbox = Inbox(ws)
        try:
            await add_stream(http, d, id=stream_id, url=str(clip), realtime=False, **stream)
            await inbox.until(lambda ms: stopped(stream_id)(ms) and len(inbox.captions(stream_id)) >= 1, 30,
                              "a caption")
            if stream.get("speech") == "on":
                await settle(d, inbox, stream_id)
            yield d, http, inbox
        finally:
            inbox.close()


def check_cues(cues: list[dict], placed: list[tuple[float, float, str]], offset: float = 0.0) -> None:
    """The right words, each starting within PLACE_TOLERANCE of where they were placed (+ `offset`)."""
    from streamer.training.speech import word_error_rate

    texts = [c["text"] for c in cues]
    assert len(cues) == len(placed), texts
    wer = word_error_rate([text for _, _, text in placed], texts)
    assert wer <= WER_BOUND, (wer, texts)
    for cue, (start, end, _) in zip(cues, placed):
        assert abs(cue["start"] - (start + offset)) <= PLACE_TOLERANCE, (cue, start + offset)
        assert cue["start"] < cue["end"] and abs(cue["end"] - (end + offset)) <= 0.8, (cue, end + offset)
        assert cue["model"] == BUNDLED_SPEECH_MODEL_NAME and cue["confidence"] <= 0


def check_caption_rate(captions: list[dict], seconds: float, hop: float, live_from: float = 0.0) -> None:
    """Captions came at their normal rate: about one per hop over the media the stream played."""
    expected = (seconds - live_from - 1.0) / hop  # windows of 1 s
    assert len(captions) >= 0.7 * expected, (len(captions), expected)
    ends = sorted(c["end"] for c in captions)
    assert max(b - a for a, b in itertools.pairwise(ends)) <= 4 * hop, ends


# -- files played as live -----------------------------------------------------------------


async def test_live_file_gets_speech_cues_with_the_words_where_they_were_said_and_captions_go_on(tiny_model, narrated):
    """speech = "on" beside a stream of the same file with speech = "only": both get the same cues on the
    file's media clock within the latency target; "on" keeps its caption rate, "only" has no captions.
    Removing a stream frees its speech."""
    path, placed = narrated
    config = DaemonConfig(speech=speech_settings())
    async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?all=1&types=speech") as ws:
        inbox = Inbox(ws)
        await add_stream(http, d, id="on", url=str(path), realtime=True, speech="on")
        await add_stream(http, d, id="only", url=str(path), realtime=True, speech="only")
        await inbox.until(stopped("on", "only"), CLIP_SECONDS + 15, "the files' end")
        await settle(d, inbox, "on", "only")

        for sid in ("on", "only"):
            cues = inbox.speech(sid)
            check_cues(cues, placed)  # the file's clock: media time = file time
            assert all(c["latency"] <= LATENCY_BOUND for c in cues), [c["latency"] for c in cues]
            assert "failed" not in inbox.states(sid)
        check_caption_rate(inbox.captions("on"), CLIP_SECONDS, hop=0.5)
        assert inbox.captions("only") == []
        only = d.daemon.streams["only"]
        assert only.windows == 0 and only.ring.latest is not None  # thumbnails still, no windows
        assert only.source.stats.unconverted > 5 * only.source.stats.frames  # ~1 frame a second converted
        # The same moment carries the same media time in both tracks: a caption's window spans its cue.
        first = inbox.speech("on")[0]
        assert any(c["start"] <= first["start"] <= c["end"] for c in inbox.captions("on"))

        async with http.get(f"{d.http}/streams/on") as resp:
            speech = (await resp.json())["speech_status"]
        assert speech["cues"] == len(placed) and speech["segments"] == len(placed) and speech["error"] is None
        assert speech["audio_seconds"] == pytest.approx(CLIP_SECONDS, abs=0.2) and speech["audio_dropped"] == 0
        async with http.get(f"{d.http}/metrics") as resp:
            metrics = await resp.text()
        assert f'streamer_speech_cues_total{{stream="on"}} {float(len(placed))}' in metrics

        # Removing a stream ends its audio task and frees its segmenter; its series go.
        on = d.daemon.streams["on"].speech
        async with http.delete(f"{d.http}/streams/on") as resp:
            assert resp.status == 204
        assert on.task is None and on.segmenter is None and "on" not in d.daemon.speech.streams
        assert d.daemon.speech.worker.waiting("on") == 0
        async with http.get(f"{d.http}/metrics") as resp:
            assert 'streamer_speech_cues_total{stream="on"}' not in await resp.text()
        inbox.close()


# -- RTSP with sound ----------------------------------------------------------------------


async def test_rtsp_stream_with_audio_gets_speech_cues_on_the_video_clock(tiny_model, narrated):
    """GStreamer's RTSP server sends the file's H.264 and AAC (RTP, RTCP): the cues carry the words
    at the media time they were placed (RTSP media time here is the file's time), captions go on."""
    from tests.support.rtsp import RtspServer, require_rtsp_server

    require_rtsp_server()
    path, placed = narrated
    config = DaemonConfig(speech=speech_settings())
    with RtspServer(file=path, audio=True) as server:
        async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http, \
                websockets.connect(d.ws + "?streams=cam&all=1&types=speech") as ws:
            inbox = Inbox(ws)
            await add_stream(http, d, id="cam", url=server.url, speech="on")
            await inbox.until(lambda ms: len(inbox.speech("cam")) >= len(placed), CLIP_SECONDS + 20, "two cues")
            cues = inbox.speech("cam")
            check_cues(cues, placed)
            assert all(c["latency"] <= LATENCY_BOUND for c in cues), [c["latency"] for c in cues]
            captions = inbox.captions("cam")
            first = min(c["start"] for c in captions)  # RTSP clients join a second or two into the file
            check_caption_rate([c for c in captions if c["end"] <= cues[-1]["end"]], cues[-1]["end"], 0.5, first)
            assert d.daemon.streams["cam"].source.stats.audio_errors == 0
            inbox.close()


# -- WHIP with a microphone ------------------------------------------------------------------


async def test_whip_publisher_with_a_microphone_gets_speech_cues(tiny_model, loopback_ice, caplog):
    """An aiortc publisher sends video and Opus audio; the audio is placed on the video's clock by
    arrival (aiortc starts each track's RTP time at its own 0). Beside it, a publisher without a
    microphone on a stream with speech on: said once, captioned as ever."""
    from tests.support.webrtc import AiortcPublisher
    from tests.support.webrtc_audio import AiortcAvPublisher

    caplog.set_level(logging.INFO)
    lines = [(1.5, "a small white triangle is still", "en-gb-x-rp+m4"), (5.0, "fifty six seventy one", "en-gb+f3")]
    track, placed = narration(8.0, lines)
    config = DaemonConfig(speech=speech_settings())
    async with running_daemon(tiny_model, daemon_config=config) as d, \
            websockets.connect(d.ws + "?streams=mic,cam&all=1&types=speech") as ws:
        inbox = Inbox(ws)
        publisher, silent = AiortcAvPublisher(track), AiortcPublisher()
        try:
            # The publisher asks for its microphone to be transcribed: POST /whip/{id}?speech=on.
            async with aiohttp.ClientSession() as http:
                for pub, sid in ((publisher, "mic"), (silent, "cam")):
                    async with http.post(f"{d.http}/whip/{sid}?window=1&hop=0.5&speech=on", data=await pub.offer(),
                                         headers={"Content-Type": "application/sdp"}) as resp:
                        assert resp.status == 201, await resp.text()
                        answer = await resp.text()
                    await pub.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await inbox.until(lambda ms: len(inbox.speech("mic")) >= len(placed), 30, "two cues")
            # Media time 0 is the first video frame; the microphone started within a frame of it.
            check_cues(inbox.speech("mic"), placed)
            assert len(inbox.captions("mic")) >= 6 and len(inbox.captions("cam")) >= 6
            assert d.daemon.streams["mic"].source.stats.audio_seconds > 5
            assert inbox.speech("cam") == [] and d.daemon.streams["cam"].state == "live"
            assert sum("publisher sends no audio" in r.getMessage() for r in caplog.records) == 1
        finally:
            await publisher.close()
            await silent.close()
            inbox.close()


# -- what must give no cues, and bad audio ---------------------------------------------------


async def test_no_cues_from_silence_or_a_tone_and_bad_or_missing_audio_never_touches_video(tiny_model, tmp_path, caplog):
    """Six streams of 5 s played as live at once: silence, a pure tone, no audio track, corrupt AAC packets,
    an audio codec FFmpeg does not know, and MP2 audio whose sample rate changes from 48 to 16 kHz
    mid-stream (with words in each half). None fails or loses captions against the mute control; each
    problem is logged once; only the words give cues, at their time."""
    caplog.set_level(logging.INFO)
    seconds = 6.0
    words, placed = narration(seconds, [(0.8, "a big red circle moves to the left", "en-us+m1"),
                                        (4.0, "fifty six seventy one", "en-gb+f3")], noise=0.002)
    files = {
        "silence": write_av(tmp_path / "silence.mp4", seconds, np.zeros(int(seconds * SAMPLE_RATE), np.float32)),
        "tone": write_av(tmp_path / "tone.mp4", seconds, tone(seconds)),
        "mute": write_av(tmp_path / "mute.mp4", seconds, None),
        "corrupt": write_av(tmp_path / "corrupt.mp4", seconds, words, corrupt_every=7),
        "unknown": write_unknown_audio_codec(tmp_path / "unknown.mkv", seconds),
        "rates": write_rate_change_ts(tmp_path / "rates.ts", words),
    }
    config = DaemonConfig(speech=speech_settings())
    async with running_daemon(tiny_model, daemon_config=config) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?all=1&types=speech") as ws:
        inbox = Inbox(ws)
        for sid, path in files.items():
            await add_stream(http, d, id=sid, url=str(path), realtime=True, speech="on", window=1.0, hop=1.0)
        await inbox.until(stopped(*files), seconds + 20, "every file's end")
        await settle(d, inbox, *files)

        mute = len(inbox.captions("mute"))
        assert mute >= 3
        for sid in files:
            assert inbox.states(sid)[-1] == "stopped" and "failed" not in inbox.states(sid), (sid, inbox.states(sid))
            assert len(inbox.captions(sid)) >= mute - 1, (sid, len(inbox.captions(sid)), mute)
        stats = {sid: d.daemon.streams[sid].source.stats for sid in files}
        for sid in ("silence", "tone"):
            assert inbox.speech(sid) == [] and d.daemon.streams[sid].speech.segments == 0
            assert stats[sid].audio_seconds == pytest.approx(seconds, abs=0.2)  # heard, and nothing said
        assert inbox.speech("mute") == [] and stats["mute"].audio_errors == 0
        assert inbox.speech("unknown") == [] and stats["unknown"].audio_errors == 1
        assert stats["corrupt"].audio_errors >= 5  # every 7th packet
        assert stats["rates"].audio_seconds == pytest.approx(seconds, abs=0.2)  # each half at its own rate
        check_cues(inbox.speech("rates"), placed)  # the words after the change are where they were said
        assert inbox.speech("corrupt"), "words between the damaged packets still come through"

        def logged(text: str) -> int:
            return sum(text in r.getMessage() for r in caplog.records)

        assert logged("no audio stream") == 1
        assert logged("audio codec cannot be decoded") == 1
        assert logged("audio packet undecodable") == 1
        assert logged("audio format changed mid-stream") == 1
        inbox.close()


async def test_speech_off_decodes_no_audio(tiny_model, narrated):
    path, _ = narrated
    assert SourceSpec("a", "rtsp://127.0.0.1:1/x").av_options()["allowed_media_types"] == "video"  # not even received
    assert SourceSpec("a", "rtsp://127.0.0.1:1/x", audio=True).av_options()["allowed_media_types"] == "video+audio"
    async with played_through(tiny_model, path, speech_settings(), "quiet") as (d, http, inbox):  # speech: off
        rt = d.daemon.streams["quiet"]
        assert rt.speech is None and rt.source.audio is None and rt.source.stats.audio_seconds == 0
        assert not d.daemon.speech.worker.started  # no stream wanted speech: the model was never loaded
        assert inbox.speech() == [] and inbox.captions("quiet")
        async with http.get(f"{d.http}/streams/quiet") as resp:
            described = await resp.json()
        assert described["speech"] == "off" and "speech_status" not in described


# -- failures of the speech model --------------------------------------------------------------


def _mismatched_whisper(path: Path) -> Path:
    """A Whisper whose feature extractor makes 64 mel bins for a model that takes 80: it loads, and
    every batch raises in the model (a checkpoint put together from the wrong parts)."""
    from streamer.training.speech import new_whisper_model

    model, processor = new_whisper_model(d_model=64, encoder_layers=1, decoder_layers=1, heads=2, chunk_seconds=6,
                                         hop_length=320, seed=3)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    saved = path / "processor_config.json"
    config = json.loads(saved.read_text())
    config["feature_extractor"]["feature_size"] = 64
    saved.write_text(json.dumps(config))
    return path


async def test_failing_speech_batches_and_a_missing_model_are_logged_once_counted_and_spare_video(
        tiny_model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    words, _ = narration(6.0, [(0.5, "a big red circle", "en-us+m1"), (3.0, "fifty six", "en-gb+f3"),
                               (4.8, "one two", "en-us+m1")])
    clip = write_av(tmp_path / "words.mp4", 6.0, words)
    broken = _mismatched_whisper(tmp_path / "broken-whisper")
    async with played_through(tiny_model, clip, SpeechSettings(model=str(broken), batch_size=1), speech="on") \
            as (d, http, inbox):
        speech = d.daemon.streams["cam"].speech
        assert speech.segments == 3 and speech.failed == 3 and inbox.speech() == []
        assert sum("speech batch failed" in r.getMessage() for r in caplog.records) == 1
        async with http.get(f"{d.http}/metrics") as resp:
            assert "streamer_speech_batches_failed_total 3.0" in await resp.text()
        async with http.get(f"{d.http}/streams/cam") as resp:
            described = await resp.json()
        assert described["speech_status"]["error"].startswith("speech batch failed") and described["captions"] >= 1
        assert "failed" not in inbox.states("cam")
        assert d.daemon.readiness() == (True, "ready")  # speech failing does not take the daemon out

    async with played_through(tiny_model, clip, SpeechSettings(model=str(tmp_path / "no-such-model")), speech="on") \
            as (d, http, inbox):
        speech = d.daemon.streams["cam"].speech
        assert speech.segments == 3 and speech.dropped == 3
        assert sum("speech model could not be loaded" in r.getMessage() for r in caplog.records) == 1
        async with http.get(f"{d.http}/streams/cam") as resp:
            assert "no-such-model" in (await resp.json())["speech_status"]["error"]
        async with http.get(f"{d.http}/metrics") as resp:
            assert 'streamer_speech_segments_dropped_total{stream="cam"} 3.0' in await resp.text()


# -- the media clock across file loops ------------------------------------------------------------


async def test_audio_follows_the_video_timeline_across_file_loops(tmp_path):
    """A looping file restarts its clock each pass; video pts go on (source.py's timeline shift) and the
    audio takes the very same shift, so each pass's sound sits with that pass's frames."""
    seconds = 2.5
    beep = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    beep[SAMPLE_RATE : SAMPLE_RATE + SAMPLE_RATE // 4] = tone(0.25, 1000)  # at 1.0 s of each pass
    clip = write_av(tmp_path / "beep.mp4", seconds, beep, fps=10)
    frames = []
    source = FrameSource(SourceSpec("loop", str(clip), realtime=False, loop=True, audio=True), frames.append)
    chunks = []
    await source.start()
    try:
        while sum(1 for c in chunks if c is not None) == 0 or max(c.end for c in chunks if c) < 3 * seconds:
            chunks += await asyncio.wait_for(source.audio.get(), 10)
    finally:
        await source.stop()
    audio = [c for c in chunks if c is not None]
    assert all(b.pts >= a.end - 1e-6 for a, b in itertools.pairwise(audio)), "audio never goes back"
    track = np.concatenate([c.samples for c in audio])
    times = np.concatenate([c.pts + np.arange(len(c.samples)) / SAMPLE_RATE for c in audio])
    loud = times[np.abs(track) > 0.2]
    per_pass = int(seconds * 10)  # frames of one pass (10 fps, every frame handed on without a gate)
    for k in range(2):
        start = frames[k * per_pass].pts  # where the video's pass k begins on the timeline
        beeps = loud[(loud >= start) & (loud < start + seconds)]
        assert len(beeps), f"no beep in pass {k}"
        assert beeps.min() == pytest.approx(start + 1.0, abs=0.06), (k, start, beeps.min())


async def test_chromium_fake_microphone_over_webrtc_gets_speech_cues(tiny_model, loopback_ice, tmp_path):
    """Chromium's own WebRTC stack (Opus from its audio pipeline) with a fake microphone playing a WAV."""
    from tests.support.browser import chromium, chromium_missing, page_server
    from tests.support.browser_audio import OFFER_PAGE, write_wav

    why = chromium_missing()
    if why:
        pytest.skip(f"headless Chromium cannot run: {why}")
    lines = [(1.5, "a small white triangle is still", "en-gb-x-rp+m4"), (5.0, "fifty six seventy one", "en-gb+f3")]
    track, placed = narration(8.0, lines)
    wav = write_wav(tmp_path / "narration.wav", track)
    config = DaemonConfig(speech=speech_settings())
    async with page_server(OFFER_PAGE) as page_port, running_daemon(tiny_model, daemon_config=config) as d, \
            chromium(microphone=wav) as browser, websockets.connect(d.ws + "?streams=web&all=1&types=speech") as ws:
        inbox = Inbox(ws)
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{page_port}/")
        offer = await page.evaluate("offer()")
        assert "m=audio" in offer and "opus" in offer.lower()
        _, answer = await d.daemon.add_whip_stream(StreamConfig(id="web", window=1.0, hop=0.5, speech="on"), offer)
        await page.evaluate("answer", answer)
        await inbox.until(lambda ms: len(inbox.speech("web")) >= len(placed), 40, "two cues")
        from streamer.training.speech import word_error_rate

        cues = inbox.speech("web")
        assert word_error_rate([t for _, _, t in placed], [c["text"] for c in cues]) <= WER_BOUND, cues
        # Chromium's microphone starts with its capture, not with the first video frame: compare spacing.
        assert abs((cues[1]["start"] - cues[0]["start"]) - (placed[1][0] - placed[0][0])) <= PLACE_TOLERANCE, cues
        assert inbox.captions("web")
        inbox.close()


# -- the bounded queues ---------------------------------------------------------------------


async def test_audio_and_utterance_queues_drop_the_oldest_and_count_it():
    """Both hand-overs are bounded: audio waiting for the segmenter (per stream, by seconds) and
    utterances waiting for the model (all streams): the newest wins, and every drop is counted."""
    from streamer.ingest.audio import AudioChunk, AudioQueue
    from streamer.pipeline.speech import SpeechWorker
    from streamer.speech.vad import SpeechSegment

    queue = AudioQueue("cam", max_seconds=1.0)
    for i in range(30):  # 3 s of 0.1 s chunks while nobody reads
        queue.put(AudioChunk(np.zeros(SAMPLE_RATE // 10, np.float32), i / 10, 0.0))
    queue.end()
    items = await queue.get()
    assert items[-1] is None and [round(c.pts, 1) for c in items[:-1]] == [round(2.0 + i / 10, 1) for i in range(10)]
    assert queue.stats.dropped == pytest.approx(2.0) and queue.stats.seconds == pytest.approx(3.0)

    dropped: list[tuple[list[int], str]] = []
    worker = SpeechWorker(SpeechSettings(queue=2), load=lambda s: None, on_result=lambda *a: None,
                          on_dropped=lambda segs, why: dropped.append(([s.index for s in segs], why)),
                          on_loaded=lambda *a: None)  # never started: only its queue is exercised
    for i in range(4):
        worker.submit(SpeechSegment("cam", i, float(i), i + 0.5, np.zeros(800, np.float32)))
    assert dropped == [([0], "behind"), ([1], "behind")] and worker.waiting("cam") == 2
    await worker.close(drain=False)
    assert dropped[-1] == ([2, 3], "closing")
