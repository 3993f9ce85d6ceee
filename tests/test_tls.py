"""--tls-cert/--tls-key: a real daemon serving HTTPS and WSS with a self-signed certificate,
real HTTPS and WebSocket clients; plain HTTP to the TLS port gets nothing."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys

import aiohttp
import pytest
import websockets

from streamer.http.common import ServerConfig
from streamer.security.auth import TokenEntry
from tests.support.daemon import captions_of, read_messages, running_daemon

pytestmark = pytest.mark.timeout(120)

TOKEN = "operator-token-for-tls-0123"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tests.support.media import moving_square, write_video

    return write_video(tmp_path_factory.mktemp("tls-media") / "clip.mp4", moving_square(60, 96, 64), fps=30)


async def test_https_and_wss_with_a_self_signed_certificate(tiny_model, cert, clip):
    cert_file, key_file = cert
    config = ServerConfig(port=0, tokens=(TokenEntry.make("operator", token=TOKEN),),
                          tls_cert=str(cert_file), tls_key=str(key_file))
    trust = ssl.create_default_context(cafile=str(cert_file))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with running_daemon(tiny_model, server_config=config) as d:
        https, wss = f"https://127.0.0.1:{d.port}", f"wss://127.0.0.1:{d.port}/ws"
        async with aiohttp.ClientSession(headers=bearer, connector=aiohttp.TCPConnector(ssl=trust)) as http:
            async with http.post(f"{https}/streams", json={"id": "a", "url": str(clip), "loop": True,
                                                           "window": 1, "hop": 0.5}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.get(f"{https}/streams/a") as resp:
                assert resp.status == 200 and (await resp.json())["id"] == "a"
            async with http.get(f"{https}/streams", headers={"Authorization": ""}) as resp:
                assert resp.status == 401  # TLS changes nothing about tokens

        async with websockets.connect(f"{wss}?streams=a", ssl=trust, additional_headers=bearer) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            messages = await read_messages(ws, lambda m: len(captions_of(m, "a")) >= 1, timeout=60)
            assert captions_of(messages, "a")[0]["text"]

        # the CLI client: trusts the certificate with --cafile; without it, one clear error (no endless retries)
        for extra, code in [(["--cafile", str(cert_file)], 0), ([], 2)]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamer", "tail", wss, "--streams", "a", "--count", "1", "--token", TOKEN, *extra,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == code, err.decode()
            assert ("[a]" in out.decode()) if code == 0 else ("--cafile" in err.decode())

        # plain HTTP and ws:// to the TLS port: no answer at all
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(f"http://127.0.0.1:{d.port}/healthz", headers=bearer) as resp:
                    pytest.fail(f"plain HTTP got an answer: {resp.status}")
        with pytest.raises((websockets.InvalidMessage, OSError)):
            async with websockets.connect(f"ws://127.0.0.1:{d.port}/ws", additional_headers=bearer, open_timeout=10):
                pass
        # a client that does not trust the certificate refuses the connection (the TLS is real)
        with pytest.raises(ssl.SSLCertVerificationError):
            async with websockets.connect(wss, additional_headers=bearer, open_timeout=10):
                pass
