"""`streamer tail` as a real process against a real daemon that wants tokens."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import pytest

from streamer.http.common import ServerConfig
from streamer.security.auth import TokenEntry
from tests.support.daemon import add_stream, running_daemon

pytestmark = pytest.mark.timeout(120)

OPERATOR = "operator-token-for-tail-0123"
VIEWER = "viewer-token-for-tail-0123456"
PUBLISHER = "publisher-token-for-tail-01"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tests.support.media import moving_square, write_video

    return write_video(tmp_path_factory.mktemp("tail") / "clip.mp4", moving_square(60, 96, 64), fps=30)


async def run_tail(*args: str, token_env: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_TOKEN"}
    if token_env is not None:
        env["STREAMER_TOKEN"] = token_env
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "tail", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"streamer tail {' '.join(args)} did not exit within {timeout} s") from None
    return proc.returncode, out.decode(), err.decode()


async def test_tail_sends_its_token_as_a_bearer_header(tiny_model, clip):
    tokens = (TokenEntry.make("operator", token=OPERATOR), TokenEntry.make("viewer", token=VIEWER, streams=["a"]),
              TokenEntry.make("publisher", token=PUBLISHER))
    async with running_daemon(tiny_model, server_config=ServerConfig(port=0, tokens=tokens)) as d, \
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {OPERATOR}"}) as http:
        await add_stream(http, d, id="a", url=str(clip), loop=True)

        # no token: one clear line and a non-zero exit, not a traceback or an endless retry
        code, out, err = await run_tail(d.ws, "--count", "1")
        assert code != 0 and out == ""
        assert "401" in err and "--token" in err and "STREAMER_TOKEN" in err and "Traceback" not in err

        # a wrong token: refused, and the token is not echoed
        code, _, err = await run_tail(d.ws, "--count", "1", "--token", "wrong-token-0123456789abc")
        assert code != 0 and "refused the token" in err and "wrong-token" not in err

        # a token whose role may not read captions (publisher): 403
        code, _, err = await run_tail(d.ws, "--count", "1", "--token", PUBLISHER)
        assert code != 0 and "403" in err and PUBLISHER not in err

        # --token, then STREAMER_TOKEN: captions
        for args, env in [(("--token", VIEWER), None), ((), VIEWER)]:
            code, out, err = await run_tail(d.ws, "--streams", "a", "--count", "2", *args, token_env=env)
            assert code == 0, err
            captions = [line for line in out.splitlines() if line.startswith("[a]") and "latency" in line]
            assert len(captions) == 2, out
