"""Questions about a live stream from the user's side (issue #13): `POST /streams/{id}/ask`, `ask` over
WebSocket, the one-shot APIs and `streamer caption --question`, `streamer ask`, and a question routed to the
stream's owner in a cluster. A real daemon (`serve()` in-process) on the tiny GIT checkpoint over a real
clip played live: its answers are arbitrary words, but they are the model's, so they must equal what the
engine says about the same window."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys

import aiohttp
import pytest
import websockets

from streamer.cluster.requests import MAX_PAYLOAD, OwnerRequests, RequestFailed
from streamer.config import MAX_QUESTION_CHARS
from streamer.http.common import ServerConfig
from streamer.publish.bus import BusConfig
from streamer.security.auth import TokenEntry
from tests.support.daemon import add_stream, captions_of, count_for, read_messages, running_daemon

pytestmark = pytest.mark.timeout(120)

QUESTION = "what is it?"


async def engine_answer(daemon, stream_id: str, index: int, question: str = QUESTION):
    """What the engine itself says about window `index` of the stream's history (on the engine thread)."""
    window = next(e.window for e in daemon.streams[stream_id].history._entries if e.window.index == index)
    (answer,) = await daemon.scheduler.run_exclusive(daemon.engine.answer, [(window, question)])
    return window, answer


async def post_ask(http: aiohttp.ClientSession, base: str, stream_id: str, body, headers=None) -> tuple[int, dict]:
    async with http.post(f"{base}/streams/{stream_id}/ask", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_http_ask_answers_about_the_newest_window_or_the_one_at_a_media_time(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?all=1&types=answer") as opted, websockets.connect(d.ws + "?all=1") as plain:
        await add_stream(http, d, id="cam", url=str(clip_10s), history=3.0)  # window 1 s, hop 0.5 s
        seen = await read_messages(opted, count_for("cam", 6), timeout=60)
        newest_seen = captions_of(seen, "cam")[-1]

        status, got = await post_ask(http, d.http, "cam", {"question": QUESTION})
        assert status == 200, got
        assert set(got) == {"stream_id", "index", "start", "end", "question", "answer", "confidence", "model"}
        assert got["stream_id"] == "cam" and got["index"] >= newest_seen["index"] and got["question"] == QUESTION
        window, direct = await engine_answer(d.daemon, "cam", got["index"])
        assert (got["start"], got["end"]) == (window.start, window.end)  # the newest window's span
        assert got["answer"] == direct.answer and got["confidence"] == pytest.approx(direct.confidence, abs=1e-5)
        assert got["model"] == d.daemon.engine.model_name

        # `at`: the window of the history about that media time; outside the history: 409 with its span
        earlier = captions_of(seen, "cam")[-3]
        status, at = await post_ask(http, d.http, "cam", {"question": QUESTION, "at": (earlier["start"] + earlier["end"]) / 2,
                                                         "max_new_tokens": 3})
        assert status == 200, at
        assert at["start"] <= (earlier["start"] + earlier["end"]) / 2 <= at["end"]
        for outside in (0.0, 1e6):
            status, err = await post_ask(http, d.http, "cam", {"question": QUESTION, "at": outside})
            assert status == 409 and err["error"]["code"] == "out_of_history", err

        # every answer goes to the clients that opted in to `answer`, and to no one else
        events = await read_messages(opted, lambda ms: sum(m["type"] == "answer" for m in ms) >= 2, 10)
        answers = [m for m in events if m["type"] == "answer"]
        assert [a["index"] for a in answers] == [got["index"], at["index"]]
        assert answers[0]["answer"] == got["answer"] and answers[0]["request_id"] is None
        later = await read_messages(plain, lambda ms: len(captions_of(ms, "cam")) >= 12, 30)
        assert not [m for m in later if m["type"] == "answer"]


async def test_bad_questions_get_clear_errors_and_the_stream_keeps_captioning(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, websockets.connect(d.ws + "?all=1") as ws:
        await add_stream(http, d, id="cam", url=str(clip_10s))
        status, err = await post_ask(http, d.http, "cam", {"question": QUESTION})
        assert status == 409 and err["error"]["code"] == "out_of_history"  # nothing captioned yet
        assert "no captioned window" in err["error"]["message"]
        await read_messages(ws, count_for("cam", 2), timeout=60)
        for body, code in (
            ({"question": ""}, "bad_request"),
            ({"question": "   "}, "bad_request"),
            ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, "bad_request"),
            ({"question": "what " * 80}, "bad_request"),  # under 512 characters, over the model's positions
            ({"question": QUESTION, "max_new_tokens": 0}, "bad_request"),
            ({"question": QUESTION, "at": "soon"}, "bad_request"),
            ({"question": QUESTION, "colour": "red"}, "bad_request"),
            ({}, "bad_request"),
            (["what is it?"], "bad_request"),
        ):
            status, err = await post_ask(http, d.http, "cam", body)
            assert status == 400 and err["error"]["code"] == code, (body, err)
        status, err = await post_ask(http, d.http, "nope", {"question": QUESTION})
        assert status == 404 and err["error"]["code"] == "not_found"
        async with http.post(f"{d.http}/streams/cam/ask", data="question=hi",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:
            assert resp.status == 415  # only JSON: a foreign page cannot post a form here
        await read_messages(ws, count_for("cam", 4), timeout=30)  # and it goes on captioning
        assert d.daemon.streams["cam"].state == "live"


async def test_websocket_ask_round_trip_errors_and_the_in_flight_bound(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http, \
            websockets.connect(d.ws + "?streams=cam&all=1") as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await add_stream(http, d, id="cam", url=str(clip_10s), history=3.0)
        await read_messages(ws, count_for("cam", 3), timeout=60)

        await ws.send(json.dumps({"type": "ask", "request_id": "q-1", "stream_id": "cam", "question": QUESTION}))
        got = await read_messages(ws, lambda ms: any(m["type"] == "answer" for m in ms), 20)
        reply = next(m for m in got if m["type"] == "answer")  # captions may come between
        assert reply["request_id"] == "q-1" and reply["stream_id"] == "cam" and reply["v"] == 1
        _, direct = await engine_answer(d.daemon, "cam", reply["index"])
        assert reply["answer"] == direct.answer

        for message, code in (
            ({"request_id": "q-2", "stream_id": "ghost", "question": QUESTION}, "not_found"),
            ({"request_id": "q-3", "stream_id": "cam", "question": ""}, "bad_message"),
            ({"request_id": "q-4", "stream_id": "cam", "question": QUESTION, "at": 1e6}, "out_of_history"),
            ({"request_id": "q-5", "stream_id": "cam", "question": "what " * 80}, "bad_request"),
        ):
            await ws.send(json.dumps({"type": "ask", **message}))
            got = await read_messages(ws, lambda ms: any(m["type"] == "error" for m in ms), 20)
            error = next(m for m in got if m["type"] == "error")
            assert (error["code"], error["request_id"]) == (code, message["request_id"]), error

        # at most 4 questions of one connection wait at once: the burst's others are `busy`, each
        # request_id gets exactly one reply, and the connection goes on
        ids = [f"b{i}" for i in range(10)]
        for rid in ids:
            await ws.send(json.dumps({"type": "ask", "request_id": rid, "stream_id": "cam", "question": QUESTION}))
        got = await read_messages(ws, lambda ms: len([m for m in ms if m.get("request_id") in ids]) >= len(ids), 30)
        replies = {m["request_id"]: m for m in got if m.get("request_id") in ids}
        assert sorted(replies) == sorted(ids)
        busy = [r for r in replies.values() if r["type"] == "error"]
        assert busy and all(r["code"] == "busy" for r in busy)
        assert sum(r["type"] == "answer" for r in replies.values()) >= 4
        await ws.send(json.dumps({"type": "ping"}))
        await read_messages(ws, lambda ms: any(m["type"] == "pong" for m in ms), 10)


async def test_a_viewer_asks_only_about_its_own_streams(tiny_model, clip_10s):
    tokens = (TokenEntry.make("admin", token="admin-token-0123456789"),
              TokenEntry.make("viewer", token="viewer-a-token-0123456789", streams=["a"]))
    admin = {"Authorization": "Bearer admin-token-0123456789"}
    viewer = {"Authorization": "Bearer viewer-a-token-0123456789"}
    async with running_daemon(tiny_model, server_config=ServerConfig(port=0, tokens=tokens)) as d, \
            aiohttp.ClientSession(headers=admin) as http, aiohttp.ClientSession() as anonymous, \
            websockets.connect(d.ws + "?all=1", additional_headers=admin) as everything, \
            websockets.connect(d.ws + "?all=1", additional_headers=viewer) as ws:
        for sid in ("a", "b"):
            await add_stream(http, d, id=sid, url=str(clip_10s))
        await read_messages(everything, lambda ms: len(captions_of(ms, "a")) >= 2 and len(captions_of(ms, "b")) >= 2, 60)
        status, _ = await post_ask(anonymous, d.http, "a", {"question": QUESTION})
        assert status == 401
        status, got = await post_ask(anonymous, d.http, "a", {"question": QUESTION}, headers=viewer)
        assert status == 200 and got["stream_id"] == "a"
        status, err = await post_ask(anonymous, d.http, "b", {"question": QUESTION}, headers=viewer)
        assert status == 403 and err["error"]["code"] == "forbidden"
        status, _ = await post_ask(http, d.http, "b", {"question": QUESTION})
        assert status == 200  # the admin may
        await ws.send(json.dumps({"type": "ask", "request_id": "x", "stream_id": "b", "question": QUESTION}))
        got = await read_messages(ws, lambda ms: any(m["type"] == "error" for m in ms), 10)
        assert next(m for m in got if m["type"] == "error")["code"] == "not_found"  # b is not the viewer's


async def test_one_shot_apis_answer_a_question_about_each_clip(tiny_model, clip_10s):
    data = base64.b64encode(clip_10s.read_bytes()).decode()
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with http.post(f"{d.http}/v1/caption/video", json={"video": data, "question": QUESTION}) as resp:
            one = await resp.json()
            assert resp.status == 200, one
        async with http.post(f"{d.http}/v1/caption/videos", json={"videos": [data, data], "question": QUESTION}) as resp:
            two = (await resp.json())["results"]
        async with http.post(f"{d.http}/v1/caption/video", json={"video": data}) as resp:
            plain = await resp.json()
        async with http.post(f"{d.http}/v1/caption/video", json={"video": data, "question": ""}) as resp:
            assert resp.status == 400 and "question" in (await resp.json())["error"]["message"]
    assert {"caption", "confidence", "start", "end", "model", "question", "answer", "answer_confidence"} == set(one)
    assert one["question"] == QUESTION and isinstance(one["answer"], str)
    assert [r["answer"] for r in two] == [one["answer"]] * 2  # the same clip, the same answer
    assert "answer" not in plain and plain["caption"] == one["caption"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_caption_cli_answers_per_window_and_once_with_summary(tiny_model, clip_10s):
    common = ["--model", str(tiny_model), "--max-new-tokens", "3", "--no-progress", "--threads", "1"]
    per_window = run_cli("caption", str(clip_10s), "--question", QUESTION, "--window", "2s", "--hop", "2s", *common)
    assert per_window.returncode == 0, per_window.stderr
    lines = [json.loads(line) for line in per_window.stdout.splitlines()]
    assert len(lines) == 5 and all(line["type"] == "answer" and line["question"] == QUESTION for line in lines)
    assert [line["index"] for line in lines] == list(range(5)) and lines[0]["start"] >= 2.0  # media time starts at 2 s
    summary = run_cli("caption", str(clip_10s), "--question", QUESTION, "--summary", *common)
    assert summary.returncode == 0, summary.stderr
    (only,) = [json.loads(line) for line in summary.stdout.splitlines()]
    assert only["end"] - only["start"] > 7 and isinstance(only["answer"], str)  # frames spread over the 10 s clip
    refused = run_cli("caption", str(clip_10s), "--question", QUESTION, "--format", "vtt", *common)
    assert refused.returncode == 2 and "JSON Lines" in refused.stderr


async def test_streamer_ask_from_the_command_line(tiny_model, clip_10s):
    async with running_daemon(tiny_model) as d, aiohttp.ClientSession() as http:
        async with websockets.connect(d.ws + "?all=1") as ws:
            await add_stream(http, d, id="cam", url=str(clip_10s), history=5.0)
            await read_messages(ws, count_for("cam", 3), timeout=60)
        done = await asyncio.to_thread(run_cli, "ask", d.http, "cam", QUESTION, "--json")
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        _, direct = await engine_answer(d.daemon, "cam", got["index"])
        assert got["answer"] == direct.answer
        plain = await asyncio.to_thread(run_cli, "ask", d.ws, "cam", QUESTION)  # tail's ws:// URL works too
        assert plain.returncode == 0 and "window" in plain.stderr
        missing = await asyncio.to_thread(run_cli, "ask", d.http, "ghost", QUESTION)
        assert missing.returncode == 2 and "404 not_found" in missing.stderr


async def test_a_question_to_a_replica_is_answered_by_the_streams_owner(tiny_model, clip_10s, redis_server):
    bus = BusConfig(url=redis_server.url, key_prefix="ask:", reconnect_max=0.5, lease_ttl=2.0)
    async with running_daemon(tiny_model, bus=bus) as a, running_daemon(tiny_model, bus=bus) as b, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{a.http}/streams", json={"id": "cam", "url": str(clip_10s), "loop": True, "window": 1.0,
                                                          "hop": 0.5}) as resp:
            assert resp.status == 201, await resp.text()
        async with websockets.connect(a.ws + "?streams=cam&all=1") as ws:  # captions of either replica, by the bus
            await read_messages(ws, count_for("cam", 2), timeout=60)
        owner, other = (a, b) if "cam" in a.daemon.streams else (b, a)
        async with websockets.connect(other.ws + "?types=answer") as opted:
            assert json.loads(await opted.recv())["type"] == "hello"
            status, got = await post_ask(http, other.http, "cam", {"question": QUESTION})
            assert status == 200, got
            _, direct = await engine_answer(owner.daemon, "cam", got["index"])
            assert got["answer"] == direct.answer  # the owner's engine answered
            # through the bus, the answer event reaches opted-in clients of every replica
            event = next(m for m in await read_messages(opted, lambda ms: any(m["type"] == "answer" for m in ms), 15)
                         if m["type"] == "answer")
            assert event["index"] == got["index"] and event["answer"] == got["answer"]
            # the owner's errors come back as they are, over WebSocket too
            status, err = await post_ask(http, other.http, "cam", {"question": QUESTION, "at": 1e6})
            assert status == 409 and err["error"]["code"] == "out_of_history", err
            status, err = await post_ask(http, other.http, "ghost", {"question": QUESTION})
            assert status == 404 and err["error"]["code"] == "not_found", err
            await opted.send(json.dumps({"type": "ask", "request_id": "r", "stream_id": "cam", "question": QUESTION}))
            reply = next(m for m in await read_messages(opted, lambda ms: any(m.get("request_id") == "r" for m in ms), 15)
                         if m.get("request_id") == "r")
            assert reply["type"] == "answer" and reply["stream_id"] == "cam"
            # watches live on the owner: added, listed and deleted through the other replica
            async with http.post(f"{other.http}/streams/cam/watches", json={"question": QUESTION, "every": 1,
                                                                          "id": "remote"}) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers["Location"] == "/streams/cam/watches/remote"
            from streamer.pipeline.watches import watches_of

            assert [w.id for w in watches_of(owner.daemon).of_stream("cam")] == ["remote"]
            async with http.get(f"{other.http}/streams/cam/watches") as resp:
                assert [w["id"] for w in (await resp.json())["watches"]] == ["remote"]
            async with http.delete(f"{other.http}/streams/cam/watches/remote") as resp:
                assert resp.status == 204
            assert watches_of(owner.daemon).of_stream("cam") == []


async def test_owner_request_payloads_are_bounded_and_only_for_kinds_that_take_one(redis_server):
    import redis.asyncio as aioredis

    raw = aioredis.from_url(redis_server.url)

    def op(waits: float = 0.0):
        return asyncio.timeout(waits + 3)

    asker = OwnerRequests(raw, "pl:", "asker", 0.5, op)
    owner = OwnerRequests(raw, "pl:", "owner", 0.5, op)
    got: list[tuple[str, bytes]] = []

    async def echo(stream_id: str, payload: bytes) -> bytes:
        got.append((stream_id, payload))
        return payload.upper()

    async def thumbnail(stream_id: str) -> bytes:
        return b"jpeg"

    owner.handlers.update({"echo": echo, "thumbnail": thumbnail})
    owner.payload_kinds.add("echo")
    try:
        with pytest.raises(RequestFailed) as failed:
            await asker.ask("owner", "echo", "cam", b"x" * (MAX_PAYLOAD + 1))
        assert failed.value.status == 413  # refused before anything is sent
        assert await raw.xlen("pl:rq:owner") == 0
        for fields, want in (
            ({b"id": b"a" * 32, b"kind": b"echo", b"stream": b"cam", b"payload": b'{"q": 1}'}, b'ok\n{"Q": 1}'),
            ({b"id": b"b" * 32, b"kind": b"echo", b"stream": b"cam", b"payload": b"y" * (MAX_PAYLOAD + 1)}, b"413\n"),
            ({b"id": b"c" * 32, b"kind": b"thumbnail", b"stream": b"cam", b"payload": b"{}"}, b"400\n"),
            ({b"id": b"d" * 32, b"kind": b"thumbnail", b"stream": b"cam"}, b"ok\njpeg"),
        ):
            await owner.serve(fields)
            reply = await raw.lpop(f"pl:rp:{fields[b'id'].decode()}")
            assert reply.startswith(want), reply
        assert got == [("cam", b'{"q": 1}')]
    finally:
        await raw.aclose()


def test_the_question_limit_is_the_engines():
    from streamer.engine.prompts import MAX_QUESTION_CHARS as ENGINE_LIMIT

    assert MAX_QUESTION_CHARS == ENGINE_LIMIT  # config.py and the protocol refuse what the engine would
