"""The bundled model over a real RTSP stream: it describes what is on screen,
and follows a scene change within a bounded delay."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
import websockets

from streamer.defaults import BUNDLED_MODEL
from streamer.world import Obj, Scene, render_video, write_video
from tests.support.rtsp import RtspServer, require_rtsp_server
from tests.test_daemon import add_stream, captions_of, read_messages, running_daemon

pytestmark = pytest.mark.timeout(180)

SCENE_SECONDS = 6.0
# Within the world's speeds (0.45-0.7 of the frame per 3 s window), and slow
# enough that nothing wraps around the frame edge within a scene.
SCENE_A = Scene((Obj("circle", "red", "big", 0.95, 0.5, vx=-0.15),), "left", "black")
SCENE_B = Scene((Obj("square", "blue", "small", 0.25, 0.05, vy=0.15), Obj("square", "blue", "small", 0.75, 0.05, vy=0.15)),
                "down", "gray")


def test_the_scenes_say_what_the_test_expects():
    assert SCENE_A.caption == "a big red circle moves to the left"
    assert SCENE_B.caption == "two small blue squares move down"


async def test_captions_follow_a_scene_change_on_a_live_rtsp_stream(tmp_path):
    require_rtsp_server()
    video = write_video(
        str(tmp_path / "scenes.mp4"),
        render_video([(SCENE_A, SCENE_SECONDS), (SCENE_B, SCENE_SECONDS)], fps=15, height=128, width=128),
    )
    with RtspServer(file=video) as rtsp:
        async with running_daemon(BUNDLED_MODEL, max_new_tokens=12) as d, aiohttp.ClientSession() as http:
            async with websockets.connect(d.ws + "?streams=scene&all=1") as ws:
                await add_stream(http, d, id="scene", url=rtsp.url, window=3.0, hop=0.5)
                # captions until the stream is well into the second scene
                messages = await read_messages(
                    ws, lambda ms: (caps := captions_of(ms)) and caps[-1]["start"] - caps[0]["start"] > 8.0, 60
                )
    caps = captions_of(messages)
    t0 = caps[0]["start"] - 0.25  # first caption's first frame sits at the centre of slot 0
    change = t0 + SCENE_SECONDS
    in_a = [c for c in caps if c["end"] < change]
    in_b = [c for c in caps if c["start"] >= change]
    assert len(in_a) >= 4 and len(in_b) >= 2
    right_a = sum(c["text"] == SCENE_A.caption for c in in_a) / len(in_a)
    assert right_a >= 0.75, [c["text"] for c in in_a]
    first_b = next(c for c in caps if c["text"] == SCENE_B.caption)
    delay_media = first_b["end"] - change  # media seconds of scene B seen before it was named
    delay_wall = delay_media + first_b["latency"]
    print(f"scene change: named after {delay_media:.2f} s of media, {delay_wall:.2f} s with latency; "
          f"scene A right {right_a:.0%}")
    assert 0 < delay_media <= 3.5  # within about one window of the cut
    assert all(c["text"] == SCENE_B.caption for c in in_b)
