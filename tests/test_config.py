"""One schema for config files, flags and request bodies: bad values are refused where they
enter, with one line naming the key and the value, and nothing else is disturbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aiohttp
import pytest

from streamer.config import (
    CaptionVideoRequest,
    ConfigError,
    FileConfig,
    StreamConfig,
    parse_duration,
    validate,
)
from tests.support.daemon import add_stream, running_daemon

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("text, seconds", [(1.5, 1.5), (2, 2.0), ("1.5", 1.5), ("2s", 2.0), ("500ms", 0.5),
                                            ("10m", 600.0), ("2min", 120.0), (" 3 s ", 3.0), ("1h", 3600.0)])
def test_one_duration_type_takes_seconds_or_a_unit(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "1e-9", "-1", "3 weeks", True, None, [1], float("inf")])
def test_a_bad_duration_is_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# Each of these was accepted at c81686b and then blocked the loop, never captioned, or gave a 500.
BAD_STREAMS = [
    ({"hop": 1e-9}, "hop = 1e-09"),
    ({"window": 1e-6}, "window = 1e-06"),
    ({"frames": 10**12}, "frames = 1000000000000"),
    ({"frames": 6.5}, "frames = 6.5"),
    ({"hop": 1e308}, "hop = 1e+308"),
    ({"url": 5}, "url = 5"),
    ({"stall_timeout": "soon"}, "stall_timeout = 'soon'"),
    ({"stall_timeout": 0.01}, "stall_timeout = 0.01"),
    ({"loop": "false"}, "loop = 'false'"),
    ({"realtime": 1}, "realtime = 1"),
    ({"rtsp_transport": "carrier-pigeon"}, "rtsp_transport = 'carrier-pigeon'"),
    ({"hwaccel": "nvdec"}, "hwaccel 'nvdec'"),
    ({"colour": "red"}, "unknown stream field 'colour'"),
    ({"id": "../etc"}, "id = '../etc'"),
]


@pytest.mark.parametrize("extra, message", BAD_STREAMS)
def test_bad_stream_values_are_one_line_naming_key_and_value(extra, message):
    with pytest.raises(ConfigError) as info:
        StreamConfig.from_dict({"id": "cam", "url": "rtsp://127.0.0.1/x", **extra})
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_stream_durations_take_units_and_the_schema_is_frozen():
    config = StreamConfig.from_dict({"id": "cam", "url": "x.mp4", "window": "2s", "hop": "500ms", "stall_timeout": "1m"})
    assert (config.window, config.hop, config.stall_timeout) == (2.0, 0.5, 60.0)
    with pytest.raises(ValueError):
        config.hop = 0.001  # type: ignore[misc]


def test_caption_requests_take_max_new_tokens_and_the_older_max_length():
    assert validate(CaptionVideoRequest, {"video": "QUJD", "max_new_tokens": 5}).max_new_tokens == 5
    assert validate(CaptionVideoRequest, {"video": "QUJD", "max_length": 7}).max_new_tokens == 7
    for body, message in [({"video": "QUJD", "max_length": 5, "max_new_tokens": 5}, "not both"),
                          ({"video": "QUJD", "max_new_tokens": 0}, "max_length = 0"),
                          ({"video": "QUJD", "max_new_tokens": 10**9}, "less than or equal to 256"),
                          ({"video": 5}, "video = 5"), ({"videoo": "QUJD"}, "video: required")]:
        with pytest.raises(ConfigError) as info:
            validate(CaptionVideoRequest, body)
        assert message in str(info.value), str(info.value)


def test_file_config_bounds_every_limit():
    for data, message in [({"limits": {"max_batch": "8"}}, "limits.max_batch = '8'"),
                          ({"limits": {"max_batch": 0}}, "limits.max_batch = 0"),
                          ({"limits": {"max_wait": "1h"}}, "limits.max_wait = '1h'"),
                          ({"server": {"port": 70000}}, "server.port = 70000"),
                          ({"model": {"dtype": "int3"}}, "model.dtype = 'int3'"),
                          ({"model": {"max_new_tokens": 100000}}, "model.max_new_tokens = 100000"),
                          ({"streams": [{"id": "a", "hop": 0}]}, "streams.0.hop = 0"),
                          ({"limit": {}}, "unknown field 'limit'")]:
        with pytest.raises(ConfigError) as info:
            validate(FileConfig, data)
        assert message in str(info.value), str(info.value)


def _serve(tmp_path, toml: str, *flags: str) -> subprocess.CompletedProcess:
    path = tmp_path / "streamer.toml"
    path.write_text(toml)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "streamer", "serve", "--config", str(path), *flags],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("toml, flags, message", [
    ('[limits]\nmax_batch = "8"\n', (), "limits.max_batch = '8'"),
    ('[[streams]]\nid = "cam"\nurl = "x.mp4"\nhop = "1e-9"\n', (), "streams.0.hop = '1e-9'"),
    ("[server]\nport = 8765\n", ("--port", "99999"), "server.port = 99999"),
    ("", ("--stream", "bad id!=x.mp4"), "--stream 'bad id!=x.mp4'"),
    ("", ("--max-new-tokens", "100000"), "model.max_new_tokens = 100000"),
])
def test_serve_refuses_a_bad_config_at_startup_with_exit_2_and_one_line(tmp_path, toml, flags, message):
    proc = _serve(tmp_path, toml, *flags)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


async def test_post_streams_refuses_out_of_bounds_values_and_keeps_serving(tiny_model, tmp_path):
    from tests.support.media import moving_square, write_video

    clip = write_video(tmp_path / "clip.mp4", moving_square(20, 64, 64), fps=10)
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        for extra, message in BAD_STREAMS:
            body = {"id": "bad", "url": str(clip), **extra}
            async with http.post(f"{d.http}/streams", json=body) as resp:
                data = await resp.json()
                assert resp.status == 400 and message in data["error"]["message"], (extra, data)
        deep = "[" * 100_000 + "]" * 100_000
        async with http.post(f"{d.http}/streams", data=deep, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and "nested too deeply" in (await resp.json())["error"]["message"]
        async with http.post(f"{d.http}/v1/caption/video", json={"video": "QUJD", "max_new_tokens": "x"}) as resp:
            assert resp.status == 400 and "max_length = 'x'" in (await resp.json())["error"]["message"]
        async with http.post(f"{d.http}/whip/w1?hop=1e-9", data="v=0", headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400 and "hop = '1e-9'" in (await resp.json())["error"]["message"]
        # nothing was created, the daemon still answers, and a good stream with units still works
        async with http.get(f"{d.http}/streams") as resp:
            assert (await resp.json())["streams"] == []
        async with http.get(f"{d.http}/healthz") as resp:
            assert resp.status == 200
        created = await add_stream(http, d, id="good", url=str(clip), window="1s", hop="500ms", loop=True)
        assert (created["window"], created["hop"]) == (1.0, 0.5)
        assert json.dumps(created)  # the description is plain JSON


def test_sink_tables_use_the_same_schema_and_duration_type():
    from streamer.publish.sinks import outputs_from_config

    (hook,) = outputs_from_config({"webhooks": [{"url": "http://127.0.0.1:9/h", "backoff": "250ms", "timeout": "2s"}]})
    assert (hook.backoff, hook.timeout) == (0.25, 2.0)
    for data, message in [({"outputs": {"dir": " "}}, "[outputs] dir = ' ': must be a non-empty string"),
                          ({"webhooks": [{"url": "http://h/", "queue_size": 10**9}]}, "[[webhooks]] #1 queue_size = 1000000000"),
                          ({"webhooks": [{"url": "http://h/", "only_changes": "yes"}]}, "[[webhooks]] #1 only_changes = 'yes'")]:
        with pytest.raises(ValueError) as info:
            outputs_from_config(data)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
