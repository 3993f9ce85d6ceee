"""`streamer serve` / `tail` / `demo` as real processes: config file, signals, clean shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import websockets

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "streamer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


async def wait_ready(port: int, timeout: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("daemon never became ready")


async def test_serve_from_config_then_sigterm_drains_and_closes_clients(tmp_path, tiny_model):
    port = free_port()
    config = tmp_path / "streamer.toml"
    config.write_text(f"""
[model]
id = "{tiny_model}"
max_new_tokens = 4

[server]
port = {port}

[limits]
max_batch = 4

[[streams]]
id = "pattern"
url = "lavfi:testsrc2=size=160x120:rate=15"
window = 1.0
hop = 0.5

[[streams]]
id = "broken"
url = "nope://camera"
""")
    proc = start("serve", "--config", str(config))
    try:
        await wait_ready(port)
        tail = start("tail", f"ws://127.0.0.1:{port}/ws", "--streams", "pattern", "--count", "3")
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?all=1") as ws:
            captions = []
            while len(captions) < 3:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["type"] == "caption":
                    captions.append(message)
            assert {c["stream_id"] for c in captions} == {"pattern"}
            out, _ = tail.communicate(timeout=60)  # tail exits by itself after --count captions
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(20) == 0
        lines = [line for line in out.splitlines() if "pattern" in line and "state" not in line]
        assert len(lines) >= 1 and "latency" in lines[0]
        stderr = proc.stderr.read()
        # the bad stream was reported, the daemon served the good one anyway
        assert "broken" in stderr and "unsupported URL scheme" in stderr
        assert "Traceback" not in stderr
        assert "shutdown cut short" not in stderr  # one signal: a full drain, nothing dropped
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_captions_a_live_scene_end_to_end(tmp_path):
    """README's main job, bounded: bundled model, live synthetic scenes, captions printed."""
    from streamer.training.world import world_vocabulary

    result = subprocess.run(
        [sys.executable, "-m", "streamer", "demo", "--port", "0", "--count", "3"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1", STREAMER_CACHE=str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    assert "# model: streamer/world-git" in result.stdout  # no hub here: the bundled model, and it says so
    scene_lines = [line for line in result.stdout.splitlines() if line.startswith("#") and " s  " in line]
    captions = [line for line in result.stdout.splitlines() if line.startswith("[demo]") and "latency" in line]
    assert len(captions) == 3 and scene_lines
    first_scene = scene_lines[0].split(" s  ", 1)[1].split()
    texts = [re.match(r"^\[demo\]\s+[\d.]+-[\d.]+\s+(.*?)\s+\(confidence", line).group(1).split() for line in captions]
    assert all(set(words) <= set(world_vocabulary()) for words in texts)
    assert texts[0][:4] == first_scene[:4]  # it names what is on screen


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server\nport = 1")
    result = subprocess.run([sys.executable, "-m", "streamer", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "config" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_clear_line(tiny_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "streamer", "serve", "--model", str(tiny_model), "--port", str(port)],
                                capture_output=True, text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


async def test_a_second_signal_skips_the_waits_but_still_flushes_the_subtitle_files(tmp_path, tiny_model):
    # A webhook endpoint that accepts connections and never answers: the first signal's drain
    # would wait its 30 s timeout for it; the second signal must end that wait at once.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port, subs = free_port(), tmp_path / "subs"
        config = tmp_path / "streamer.toml"
        config.write_text(f"""
[model]
id = "{tiny_model}"
max_new_tokens = 4

[server]
port = {port}

[[streams]]
id = "pattern"
url = "lavfi:testsrc2=size=160x120:rate=15"
window = "1s"
hop = "500ms"

[outputs]
dir = "{subs}"
formats = ["vtt"]

[[webhooks]]
url = "http://127.0.0.1:{silent.getsockname()[1]}/hook"
timeout = 30
retries = 0
""")
        proc = start("serve", "--config", str(config))
        try:
            await wait_ready(port)
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws?all=1") as ws:
                captions = 0
                while captions < 3:
                    captions += json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "caption"
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(websockets.ConnectionClosed):  # the drain reached the clients: now the sinks
                    while True:
                        await asyncio.wait_for(ws.recv(), 20)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(15) == 0
            assert time.monotonic() - started < 10  # not the webhook's 30 s timeout
            stderr = proc.stderr.read()
            assert "second signal" in stderr and "shutdown before every caption was sent" in stderr, stderr
            assert "Traceback" not in stderr, stderr
            vtt = (subs / "pattern.vtt").read_text()
            assert vtt.startswith("WEBVTT") and vtt.count("-->") >= 1 and vtt.endswith("\n\n")  # the held cue was written
        finally:
            if proc.poll() is None:
                proc.kill()
