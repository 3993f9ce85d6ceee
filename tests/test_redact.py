"""streamer.security.redact: no credential in a source URL survives redaction."""

from __future__ import annotations

import random
import string

import pytest

from streamer.security.redact import MASK, redact_text, redact_url, url_secrets

# (url, secrets that must not survive, parts a human needs that must survive, exact result or None)
CASES = [
    # Passwords with raw delimiters: urlsplit ends the authority early and shows them.
    ("rtsp://admin:p#ss@cam/x", ["p#ss", "#ss"], ["admin", "cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa/ss@cam:554/x", ["pa/ss", "/ss@"], ["cam:554/x"], "rtsp://admin:***@cam:554/x"),
    ("rtsp://admin:pa?ss@cam/x", ["pa?ss", "?ss"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa@ss@cam/x", ["pa@ss", "@ss"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa:ss@cam/x", ["pa:ss", ":ss"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:a#b/c?d@e:f@cam/x", ["a#b", "b/c", "c?d", "d@e", "e:f"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa%23ss@cam/x", ["pa%23ss", "pa#ss"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa55%3Aw%40rd@10.0.0.5:554/h264", ["pa55"], ["10.0.0.5:554/h264"], "rtsp://admin:***@10.0.0.5:554/h264"),
    # A bare userinfo is usually a token.
    ("https://TOKEN123@host/x", ["TOKEN123"], ["host/x"], "https://***@host/x"),
    ("rtsps://tok#en/x@cam:322/s", ["tok#en", "en/x"], ["cam:322/s"], "rtsps://***@cam:322/s"),
    # Multiple @ and IPv6.
    ("rtsp://admin:p@@ss@@cam/x", ["p@@ss"], ["cam/x"], "rtsp://admin:***@cam/x"),
    ("rtsp://u:secret@[::1]:8554/x", ["secret"], ["[::1]:8554/x"], "rtsp://u:***@[::1]:8554/x"),
    ("rtsp://u:s#cr3t@[fe80::1%25eth0]/x", ["s#cr3t"], ["[fe80::1%25eth0]/x"], "rtsp://u:***@[fe80::1%25eth0]/x"),
    ("http://user:hunter2@example.com:8080/live.ts", ["hunter2"], ["example.com:8080/live.ts"], None),
    # Secret query values; the other parameters byte for byte.
    ("https://host/live.m3u8?apikey=ABC123&q=1", ["ABC123"], ["host/live.m3u8", "q=1"], "https://host/live.m3u8?apikey=***&q=1"),
    ("https://host/live.m3u8?token=abc123&q=%2Fa+b", ["abc123"], ["q=%2Fa+b"], "https://host/live.m3u8?token=***&q=%2Fa+b"),
    ("https://h/v.m3u8?API_KEY=k3yv4l&Access_Token=t0k3n", ["k3yv4l", "t0k3n"], ["h/v.m3u8"], None),
    ("https://h/x?%74oken=encodedkey&x=1", ["encodedkey"], ["x=1"], "https://h/x?%74oken=***&x=1"),
    (
        "https://b.s3.amazonaws.com/o.ts?X-Amz-Credential=AKIA%2F2024&X-Amz-Date=20240101&X-Amz-Security-Token=FwoG&X-Amz-Signature=deadbeef",
        ["AKIA", "FwoG", "deadbeef"],
        ["b.s3.amazonaws.com/o.ts", "X-Amz-Date=20240101"],
        None,
    ),
    ("https://h/x?sig=azuresig&se=2030", ["azuresig"], ["se=2030"], "https://h/x?sig=***&se=2030"),
    ("https://h/x?jwt=eyJhbGc&session=s355&auth=b4sic", ["eyJhbGc", "s355", "b4sic"], ["h/x"], None),
    ("https://h/x?token=ab&cdsecret&x=1", ["ab&cd", "cdsecret"], ["x=1"], "https://h/x?token=***&***&x=1"),
    ("https://h/x?a=1;password=semi&b=2", ["semi"], ["a=1", "b=2"], "https://h/x?a=1;password=***&b=2"),
    ("https://h/x?next=https://h2/y?token=nested1", ["nested1"], ["h2/y"], "https://h/x?next=https://h2/y?token=***"),
    ("https://h/x?next=rtsp%3A%2F%2Fu%3Apw1%40h2", ["pw1", "u%3Apw1"], ["h/x"], "https://h/x?next=***"),
    # SRT: streamid and passphrase hidden, latency and pbkeylen kept.
    (
        "srt://h:9000?streamid=x&passphrase=SECRETPW&latency=200",
        ["SECRETPW"],
        ["h:9000", "latency=200"],
        "srt://h:9000?streamid=***&passphrase=***&latency=200",
    ),
    (
        "srt://h:9000?streamid=#!::r=live/cam1,u=bob&passphrase=SECRETPW&pbkeylen=16",
        ["SECRETPW", "r=live/cam1"],
        ["pbkeylen=16"],
        "srt://h:9000?streamid=***&passphrase=***&pbkeylen=16",
    ),
    # RTMP stream keys in the path (and Facebook's, which goes on into the query).
    (
        "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl",
        ["abcd-efgh-ijkl"],
        ["a.rtmp.youtube.com/live2/"],
        "rtmp://a.rtmp.youtube.com/live2/***",
    ),
    (
        "rtmps://live-api-s.facebook.com:443/rtmp/FB-123-0-AbC?s_bl=1&a=AbyXYZ",
        ["FB-123-0-AbC", "AbyXYZ"],
        ["live-api-s.facebook.com:443/rtmp/"],
        "rtmps://live-api-s.facebook.com:443/rtmp/***",
    ),
    ("rtmpt://h/app/_definst_/K3Y9", ["K3Y9"], ["h/app/"], "rtmpt://h/app/***"),
    ("rtmpe://u:rtmppw@h:1935/live/sk_live_1", ["rtmppw", "sk_live_1"], ["h:1935/live/"], "rtmpe://u:***@h:1935/live/***"),
    ("RTMP://h/live/UPPERKEY", ["UPPERKEY"], ["h/live/"], "RTMP://h/live/***"),
    ("rtmp://h/app playpath=pl4yp4th live=1", ["pl4yp4th"], ["h/app", "live=1"], "rtmp://h/app playpath=*** live=1"),
    ("rtmp://h/live", [], ["rtmp://h/live"], "rtmp://h/live"),  # the app alone is no secret
    # Fragments are never needed to open a stream.
    ("https://h/x?a=1#access_token=fr4g", ["fr4g"], ["h/x?a=1"], "https://h/x?a=1#***"),
    ("rtsp://cam/x#t0k3n", ["t0k3n"], ["cam/x"], "rtsp://cam/x#***"),
    # An @ after the host hides too much, never too little.
    ("https://h/x?token=qsecret&email=a@b.com", ["qsecret"], ["b.com"], None),
    ("rtsp://cam/x?token=SECRETZ:z@h", ["SECRETZ"], [], None),
    # Found by the structural fuzz below: an @ after a `/?#` that is not before a host.
    ("https://h/x?token=ab@cdef&x=2", ["ab@cdef", "cdef"], [], "https://***@***"),
    ("https://h/x?email=a@b.com&token=zzz1", ["zzz1"], [], "https://***@***"),
    ("https://h/x?e=a@b.com/x&token=zz9", ["zz9"], [], None),
    ("https://h/cb#access_token=ab@cdef", ["cdef"], [], None),
    ("https://h/x?a=1#frag@c!m", ["c!m"], [], None),
    ("rtmp://h/live/ab@cdkey", ["cdkey"], [], None),
    ("srt://h:9000?streamid=#!::u=bob@corp,r=live&passphrase=SECRETPW", ["SECRETPW", "corp,r=live"], ["srt://h:"], None),
    # ...and others: a space in a query value, `#` inside a secret value, a token ending in `:`.
    ("rtmp://h/v/k?token=t x&sig=S1GVAL", ["S1GVAL"], ["rtmp://h/v/"], None),
    ("rtsp://h/x?token=t x&sig=S1GVAL", ["S1GVAL"], ["rtsp://h/x"], None),
    ("https://h/x?sig=abc#frag&x=fr4gment", ["abc#frag", "fr4gment"], ["h/x?sig="], "https://h/x?sig=***"),
    ("rtsp://T0KEN:@cam/x", ["T0KEN"], ["cam/x"], "rtsp://***@cam/x"),
    # Wrapped URLs.
    ("cache:http://u:wrapped@h/x", ["wrapped"], ["cache:http://", "h/x"], "cache:http://u:***@h/x"),
    ("concat:http://a:first1@h/1|http://c:second2@h/2", ["first1", "second2"], ["concat:http://"], None),
    # A password that is also a word of the host is hidden there too.
    ("rtsp://admin:cam@cam.local/x", ["cam"], [".local/x"], None),
    # Nothing to hide.
    ("udp://@239.0.0.1:1234", [], [], "udp://@239.0.0.1:1234"),
    ("rtsp://10.0.0.5:554/h264", [], [], "rtsp://10.0.0.5:554/h264"),
    ("srt://:9000?mode=listener&latency=120", [], [], "srt://:9000?mode=listener&latency=120"),
]

NON_URLS = [
    "/dev/video0",
    "/data/clips/cam@night #2?.mp4",
    "lavfi:testsrc2=size=320x240:rate=30",
    "avfoundation:0",
    "relative/path/to/user:pass@x.mp4",
    "",
]


@pytest.mark.parametrize(("url", "secrets", "kept", "exact"), CASES, ids=[c[0][:60] for c in CASES])
def test_redact_url(url: str, secrets: list[str], kept: list[str], exact: str | None) -> None:
    out = redact_url(url)
    for secret in secrets:
        assert secret not in out, f"{secret!r} survives in {out!r}"
    for part in kept:
        assert part in out, f"{part!r} lost in {out!r}"
    if exact is not None:
        assert out == exact
    assert redact_url(out) == out  # idempotent: safe to redact twice


@pytest.mark.parametrize("url", NON_URLS)
def test_non_urls_come_back_unchanged(url: str) -> None:
    assert redact_url(url) == url
    assert url_secrets(url) == []


@pytest.mark.parametrize("url", ["rtsp://", "rtsp://@", "rtsp://:@", "rtsp://[", "rtmp://h//", "http://u:p@", "a://b@c@d#?&=;"])
def test_odd_input_never_raises(url: str) -> None:
    assert isinstance(redact_url(url), str)
    assert isinstance(url_secrets(url), list)


def test_never_raises_on_non_strings() -> None:
    assert redact_url(None) == "<unparseable url>"  # type: ignore[arg-type]
    assert redact_text(None, "rtsp://u:pw123@h") == "<redacted>"  # type: ignore[arg-type]


def test_url_secrets_raw_and_decoded_longest_first() -> None:
    assert url_secrets("rtsp://admin:p%23ss@cam/x") == ["p%23ss", "p#ss"]
    secrets = url_secrets("srt://h:9000?streamid=stream1&passphrase=long%20secret&latency=200")
    assert secrets == ["long%20secret", "long secret", "stream1"]
    assert url_secrets("rtmp://h/live/STREAMKEY") == ["STREAMKEY"]
    assert url_secrets("rtsp://u:ab@h/x") == []  # too short to replace in free text
    assert url_secrets("rtsp://h/x") == []


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("rtsp://admin:p#ss@cam/x: Connection refused", "rtsp://admin:p#ss@cam/x"),
        ("rtsp://admin:p#ss@cam/x: Connection refused", "rtsp://admin:p%23ss@cam/x"),  # FFmpeg decoded it
        ("[Errno 111] Connection refused: 'rtsp://admin:p%23ss@cam/x'", "rtsp://admin:p%23ss@cam/x"),
        ("auth failed for user admin with password p#ss", "rtsp://admin:p%23ss@cam/x"),
        ("Server returned 403 for streamkey abcd-efgh-ijkl", "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl"),
        ("srt: passphrase SECRETPW rejected (latency=200)", "srt://h:9000?passphrase=SECRETPW&latency=200"),
    ],
)
def test_redact_text(text: str, url: str) -> None:
    out = redact_text(text, url)
    for secret in url_secrets(url) + ["p#ss"]:
        assert secret not in out, f"{secret!r} survives in {out!r}"
    assert MASK in out


def test_redact_text_keeps_the_message() -> None:
    out = redact_text("rtsp://admin:p#ss@cam/x: Connection refused", "rtsp://admin:p%23ss@cam/x")
    assert out == "rtsp://admin:***@cam/x: Connection refused"
    assert redact_text("rtsp://h/x: 404 Not Found", "rtsp://h/x") == "rtsp://h/x: 404 Not Found"
    assert redact_text("no such file", "") == "no such file"


PRINTABLE = string.digits + string.ascii_letters + string.punctuation + " "


@pytest.mark.parametrize("scheme", ["rtsp", "rtsps", "http", "srt", "rtmp"])
def test_random_passwords_never_survive(scheme: str) -> None:
    rng = random.Random(20240611)
    for _ in range(2000):
        pw = "".join(rng.choice(PRINTABLE) for _ in range(rng.randint(3, 24)))
        url = f"{scheme}://admin:{pw}@cam.local:554/stream"
        out = redact_url(url)
        assert pw not in out, (url, out)
        assert redact_text(f"{url}: Connection refused", url).count(pw) == 0


def test_random_query_secrets_never_survive() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        value = "".join(rng.choice(PRINTABLE.replace("&", "")) for _ in range(rng.randint(3, 24)))
        url = f"https://cdn.example/live.m3u8?q=1&token={value}&x=2"
        assert value not in redact_url(url), url


def test_structural_fuzz() -> None:
    """Random URLs built from parts whose secrets are known: none survives, whatever the characters."""
    rng = random.Random(1)

    def text(lo: int, hi: int, alphabet: str = PRINTABLE) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    for _ in range(5000):
        scheme = rng.choice(["rtsp", "rtsps", "http", "https", "srt", "rtmp", "rtmps", "udp"])
        secrets: list[str] = []
        url = scheme + "://"
        if (r := rng.random()) < 0.4:
            secrets.append(pw := text(3, 16))
            url += text(1, 8, string.ascii_letters) + ":" + pw + "@"
        elif r < 0.5:  # a bare token; with a ":" in it, it reads as user:password
            secrets.append(token := text(3, 16, PRINTABLE.replace(":", "")))
            url += token + "@"
        url += rng.choice(["cam.local", "10.0.0.5", "[::1]", "h"]) + rng.choice(["", ":554"])
        segments = [text(1, 6, string.ascii_letters) for _ in range(rng.randint(0, 3))]
        if scheme.startswith("rtmp") and len(segments) >= 2:
            segments[-1] = text(3, 12, string.ascii_letters + string.digits + "-_")
            secrets.append(segments[-1])
        url += "".join("/" + s for s in segments)
        params = []
        for _ in range(rng.randint(0, 4)):
            if rng.random() < 0.5:  # a raw & in a value is a separator: no parser can tell
                secrets.append(value := text(3, 12, PRINTABLE.replace("&", "")))
                params.append(rng.choice(["token", "passphrase", "apikey", "X-Amz-Signature", "sig", "streamid"]) + "=" + value)
            else:
                params.append(rng.choice(["q", "latency", "x"]) + "=" + text(1, 6, PRINTABLE.replace("&", "")))
        if params:
            url += "?" + "&".join(params)
        if rng.random() < 0.1:
            # Known limit: right after host:port, "#x@y" reads as a password's `#` (admin:1234#x@cam).
            secrets.append(fragment := text(3, 10, PRINTABLE if segments or params else PRINTABLE.replace("@", "")))
            url += "#" + fragment
        out = redact_url(url)
        message = redact_text(f"{url} failed", url)
        for secret in secrets:
            assert secret not in out, (url, out, secret)
            assert secret not in message, (url, message, secret)


SECRET_KEYS = [
    "password",
    "passwd",
    "pass",
    "pwd",
    "pw",
    "token",
    "access_token",
    "auth",
    "key",
    "apikey",
    "api_key",
    "secret",
    "sig",
    "signature",
    "streamid",
    "passphrase",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "credential",
    "session",
    "jwt",
    "stream_key",
    "psk",
    "hdnts",
]


@pytest.mark.parametrize("key", [*SECRET_KEYS, *(k.upper() for k in SECRET_KEYS)])
def test_every_secret_key_is_hidden(key: str) -> None:
    out = redact_url(f"srt://h:9000?mode=caller&{key}=V4LUE&latency=200")
    assert out == f"srt://h:9000?mode=caller&{key}=***&latency=200"


@pytest.mark.parametrize("key", ["pbkeylen", "latency", "mode", "maxbw", "transtype", "q", "rtsp_transport"])
def test_plain_keys_are_kept(key: str) -> None:
    url = f"srt://h:9000?{key}=16&x=1"
    assert redact_url(url) == url


# -- end to end: a real daemon, a real RTSP server with credentials, real FFmpeg errors --

PASSWORD = "Pw1x#Sl2y/Qu3z?Zz9xK"  # raw '#', '/', '?': an RFC 3986 parser ends the authority inside it
API_KEY = "ApiKey7f3a9c1e5b"
PASSPHRASE = "SrtPass9d8e7f6a5b"


def _secret_forms() -> list[str]:
    from urllib.parse import quote

    # the secrets as given, percent-encoded, and each piece between the delimiters
    # (what a parser that split the password would echo)
    return [PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), "Pw1x", "Sl2y", "Qu3z", "Zz9xK", API_KEY, PASSPHRASE]


def _leaks(where: str, text: str) -> list[str]:
    text = text.lower()  # a host name comes back lowercased
    return [f"{where}: {form!r}" for form in _secret_forms() if form.lower() in text]


async def test_no_secret_reaches_anything_a_user_sees(tiny_model, tmp_path, capfd):
    import asyncio
    import json
    import logging
    import socket
    from urllib.parse import quote

    import aiohttp
    import websockets

    from streamer.cli.serve import ServeConfig, serve
    from streamer.config import StreamConfig
    from streamer.engine import EngineConfig
    from streamer.http.common import ServerConfig
    from streamer.ops.logs import KeyValueFormatter
    from streamer.pipeline.daemon import DaemonConfig
    from tests.support.daemon import captions_of, read_messages, trusting_policy
    from tests.support.rtsp import RtspServer, require_rtsp_server

    require_rtsp_server()
    with socket.socket() as s:  # a port nobody listens on: connection refused, and FFmpeg says so
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out_dir = tmp_path / "subtitles"
    log_lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.setFormatter(KeyValueFormatter())
    handler.emit = lambda record: log_lines.append(handler.format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("streamer")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # -vv: every log line a user could turn on
    seen: list[str] = []  # every HTTP body and WebSocket message
    with RtspServer(user="cam", password=PASSWORD) as rtsp:
        cam = f"rtsp://cam:{quote(PASSWORD, safe='')}@127.0.0.1:{rtsp.port}/stream"
        raw = f"rtsp://cam:{PASSWORD}@127.0.0.1:{rtsp.port}/stream"
        srt = f"srt://127.0.0.1:9?passphrase={PASSPHRASE}&streamid=x"
        window = {"window": 1.0, "hop": 0.5}
        trusted = [  # streamer.toml [[streams]]: no policy, straight to FFmpeg
            {"id": "cam", "url": cam},
            {"id": "cam-raw", "url": raw},  # FFmpeg: "Invalid argument: '<the URL>'"
            {"id": "hls", "url": f"http://cam:{quote(PASSWORD, safe='')}@127.0.0.1:{dead}/live.m3u8?apikey={API_KEY}"},
            {"id": "srt", "url": srt},  # this FFmpeg has no srt: "Protocol not found: '<the URL>'"
            {"id": "bad", "url": f"nope://cam:{PASSWORD}@127.0.0.1/x?apikey={API_KEY}"},  # never starts
        ]
        config = ServeConfig(
            engine=EngineConfig(model=str(tiny_model), max_new_tokens=4),
            server=ServerConfig(port=0, sources=trusting_policy()),
            daemon=DaemonConfig(),
            streams=tuple(StreamConfig.from_dict({**s, **window}) for s in trusted),
            sinks=(("outputs", {"dir": str(out_dir), "formats": ["vtt", "srt", "jsonl"]}),),
        )
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, on_ready=lambda port, d: ready.set_result(port), stop=stop))
        try:
            done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
            base = f"http://127.0.0.1:{ready.result()}"
            async with aiohttp.ClientSession() as http, websockets.connect(f"{base.replace('http', 'ws')}/ws") as ws:
                posted = [  # POST /streams: through the source policy
                    ({"id": "post-cam", "url": f"{cam}?apikey={API_KEY}"}, 201),
                    ({"id": "post-srt", "url": srt}, 201),
                    ({"id": "post-raw", "url": raw}, 403),  # the policy cannot tell host from password
                    ({"id": "post-bare", "url": f"rtsp://{PASSWORD}@127.0.0.1:{rtsp.port}/stream"}, 403),
                ]
                for body, status in posted:
                    async with http.post(f"{base}/streams", json={**body, **window}) as resp:
                        seen.append(await resp.text())
                        assert resp.status == status, seen[-1]

                def ended(ms, stream_id):
                    return any(m["type"] == "state" and m["stream_id"] == stream_id and m["state"] in ("reconnecting", "failed")
                               for m in ms)

                broken = ["cam-raw", "hls", "srt", "post-srt", "post-cam"]
                messages = await read_messages(
                    ws, lambda ms: len(captions_of(ms, "cam")) >= 2 and all(ended(ms, s) or captions_of(ms, s) for s in broken),
                    timeout=60)
                seen.extend(json.dumps(m) for m in messages)
                details = {m["stream_id"]: m["detail"] for m in messages if m["type"] == "state" and m["state"] != "live"}
                # the errors are there to read, only masked
                assert "Invalid argument" in details["cam-raw"] and "Protocol not found" in details["srt"]
                for path in ["/streams", "/metrics", *(f"/streams/{s['id']}" for s in trusted[:4]),
                             "/streams/post-cam", "/streams/post-srt"]:
                    async with http.get(base + path) as resp:
                        assert resp.status == 200, path
                        seen.append(await resp.text())
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    stdout, stderr = capfd.readouterr()  # FFmpeg's own messages too, written by C code to fd 2
    files = sorted(out_dir.iterdir())
    assert any(f.name.startswith("cam") for f in files)
    leaks = _leaks("HTTP/WebSocket", "\n".join(seen)) + _leaks("log", "\n".join(log_lines))
    leaks += _leaks("stdout/stderr", stdout + stderr) + _leaks("file names", " ".join(f.name for f in files))
    leaks += [leak for f in files for leak in _leaks(f.name, f.read_text(encoding="utf-8"))]
    assert not leaks, leaks
    assert any("stream not started" in line and "bad" in line for line in log_lines)  # and said why
