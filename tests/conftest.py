from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

# Hubs are unreachable on CI: fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.media import moving_square, write_video
from tests.support.models import save_git_checkpoint, tiny_config


_STREAMER_LOGGER = logging.getLogger("streamer")
_PRISTINE_LOGGER = (list(_STREAMER_LOGGER.handlers), _STREAMER_LOGGER.level, _STREAMER_LOGGER.propagate)


@pytest.fixture(autouse=True)
def _streamer_logger_as_found():
    """A test or fixture that runs the CLI in this process (`streamer.cli.main`, also from module fixtures)
    gets its `setup_logging`: a handler on the captured stderr of that moment, level WARNING and no
    propagation. Put the logger back as it was before any test ran, after every test, so that later tests'
    `caplog` sees streamer's records and nothing writes to a closed stream."""
    yield
    _STREAMER_LOGGER.handlers[:], _STREAMER_LOGGER.level, _STREAMER_LOGGER.propagate = _PRISTINE_LOGGER


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 6-frame GIT checkpoint (VATEX layout) with random weights, on disk."""
    return save_git_checkpoint(tmp_path_factory.mktemp("models") / "tiny-git", tiny_config())


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from streamer.engine import Engine, EngineConfig

    return Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=8))


@pytest.fixture(scope="session")
def clip_10s(tmp_path_factory) -> Path:
    """10 s of 30 fps video whose media time starts at 2.0 s."""
    path = tmp_path_factory.mktemp("media") / "start2.mp4"
    return write_video(path, moving_square(300, 160, 120), times=[2.0 + i / 30 for i in range(300)])


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # TEST ONLY. aioice gathers host candidates from every interface except
    # 127.0.0.1, so two peers on a machine with only loopback (CI containers)
    # never find a path. Offer 127.0.0.1 alone; real servers use real addresses.
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port (tests/support/redis.py), killed after the test."""
    from tests.support.redis import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server, see deploy/apt-packages.txt)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
