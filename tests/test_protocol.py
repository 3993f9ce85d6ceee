"""The wire format with plain data: what encoders produce, what the parser accepts and rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from streamer.publish import protocol
from streamer.publish.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SCHEMA,
    Ask,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    apply_subscription,
    encode,
    encode_caption,
    encode_error,
    encode_event,
    encode_hello,
    encode_pong,
    encode_state,
    event_message,
    parse_client_message,
)
from streamer.types import Answer, Caption, Chapter, SpeechCue, WatchEvent

CAPTION = Caption(
    stream_id="cam1",
    index=7,
    start=7.0,
    end=9.5,
    text="a man is riding a bike",
    confidence=-0.31,
    model="microsoft/git-base-vatex",
    capture_time=1764050000.25,
    emit_time=1764050001.0,
)


def test_public_api() -> None:
    assert set(protocol.__all__) == {
        "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "MAX_FRAME_BYTES", "SERVER_NAME", "SCHEMA", "ProtocolError",
        "Subscribe", "Unsubscribe", "Ping", "ClientMessage", "parse_client_message",
        "apply_subscription", "caption_message", "state_message", "encode",
        "encode_caption", "encode_state", "encode_hello", "encode_error", "encode_pong",
        "encode_gap", "parse_since", "event_message", "parse_types", "Ask", "encode_event",
    }  # fmt: skip
    assert PROTOCOL_VERSION == 1


def test_caption_message_has_every_caption_field_stable_and_shown() -> None:
    for stable in (False, True):
        text = encode_caption(CAPTION, stable)
        assert isinstance(text, str)
        msg = json.loads(text)
        assert msg == {"v": 1, "type": "caption", **CAPTION.to_dict(), "stable": stable, "shown": True}
    assert json.loads(encode_caption(CAPTION, False, shown=False))["shown"] is False
    assert set(json.loads(encode_caption(CAPTION, False))) == {
        "v", "type", "stream_id", "index", "start", "end", "text", "confidence", "model",
        "capture_time", "emit_time", "latency", "stable", "shown",
    }  # fmt: skip
    assert json.loads(encode_caption(CAPTION, False))["latency"] == 0.75


def test_caption_message_is_strict_json_even_for_non_finite_confidence() -> None:
    bad = Caption("s", 0, 0.0, 1.0, "x", float("-inf"), "m")
    text = encode_caption(bad, False)
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["confidence"] is None


def test_caption_text_keeps_unicode_and_quotes() -> None:
    c = Caption("s", 0, 0.0, 1.0, 'un café "au lait"\n', -0.1, "m")
    assert json.loads(encode_caption(c, False))["text"] == 'un café "au lait"\n'


def test_state_hello_error_pong_messages() -> None:
    assert json.loads(encode_state("cam1", "stalled", "no frames for 5 s", 1764050001.0)) == {
        "v": 1, "type": "state", "stream_id": "cam1", "state": "stalled", "detail": "no frames for 5 s",
        "time": 1764050001.0,
    }  # fmt: skip
    assert json.loads(encode_state("cam1", "running", None, 5.0))["detail"] is None
    hello = json.loads(encode_hello(["b", "a"], 20))
    assert hello == {"v": 1, "type": "hello", "streams": ["a", "b"], "history": 20, "server": hello["server"]}
    assert re.fullmatch(r"streamer/\S+", hello["server"])
    assert json.loads(encode_hello([], 5, server="streamer/9.9"))["server"] == "streamer/9.9"
    assert json.loads(encode_error("bad_json", "nope")) == {"v": 1, "type": "error", "code": "bad_json", "message": "nope"}
    assert json.loads(encode_pong()) == {"v": 1, "type": "pong"}


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"type": "subscribe", "streams": ["a", "b", "a"]}', Subscribe(frozenset({"a", "b"}))),
        ('{"type": "subscribe", "streams": "*"}', Subscribe(None)),
        ('{"type": "subscribe", "streams": []}', Subscribe(frozenset())),
        ('{"type": "unsubscribe", "streams": ["b"]}', Unsubscribe(frozenset({"b"}))),
        ('{"type": "unsubscribe", "streams": "*"}', Unsubscribe(None)),
        ('{"type": "ping"}', Ping()),
        ('{"v": 1, "type": "ping", "id": 12, "future_field": [1, 2]}', Ping()),
        (b'{"type": "subscribe", "streams": ["caf\xc3\xa9"]}', Subscribe(frozenset({"café"}))),
        ('{"type": "ask", "request_id": "q1", "stream_id": "cam1", "question": "what colour is it ?"}',
         Ask("q1", "cam1", "what colour is it ?")),
        ('{"type": "ask", "request_id": "7", "stream_id": "c", "question": "q", "at": 3, "max_new_tokens": 8}',
         Ask("7", "c", "q", 3.0, 8)),
    ],
)
def test_valid_client_messages(frame: str | bytes, expected: object) -> None:
    assert parse_client_message(frame) == expected


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("", "bad_json"),
        ('["subscribe"]', "bad_json"),
        ("null", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        ("{}", "bad_message"),
        ('{"type": 3}', "bad_message"),
        ('{"type": "subscribe"}', "bad_message"),
        ('{"type": "subscribe", "streams": "a"}', "bad_message"),
        ('{"type": "subscribe", "streams": ["a", 2]}', "bad_message"),
        ('{"type": "subscribe", "streams": [""]}', "bad_message"),
        ('{"type": "unsubscribe", "streams": {"a": 1}}', "bad_message"),
        ('{"type": "publish", "streams": []}', "unknown_type"),
        ('{"type": "pong"}', "unknown_type"),
        ('{"v": 2, "type": "ping"}', "unsupported_version"),
        ('{"v": true, "type": "ping"}', "unsupported_version"),
        ('{"type": "ask", "stream_id": "c", "question": "q"}', "bad_message"),
        ('{"type": "ask", "request_id": "", "stream_id": "c", "question": "q"}', "bad_message"),
        ('{"type": "ask", "request_id": 5, "stream_id": "c", "question": "q"}', "bad_message"),
    ],
)
def test_invalid_client_messages(frame: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(frame)
    assert info.value.code == code
    assert info.value.message
    # The error goes straight back to the client.
    assert json.loads(encode_error(info.value.code, info.value.message))["code"] == code


@pytest.mark.parametrize(
    "fields",
    [
        {"stream_id": "../etc", "question": "q"},
        {"question": "q"},
        {"stream_id": "c", "question": "   "},
        {"stream_id": "c", "question": ["q"]},
        {"stream_id": "c", "question": "q" * 513},
        {"stream_id": "c", "question": "q", "at": True},
        {"stream_id": "c", "question": "q", "at": "3"},
        {"stream_id": "c", "question": "q", "max_new_tokens": 0},
        {"stream_id": "c", "question": "q", "max_new_tokens": 2.5},
    ],
)
def test_a_bad_ask_is_refused_with_its_request_id(fields: dict) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(json.dumps({"type": "ask", "request_id": "r9", **fields}))
    assert info.value.code == "bad_message" and info.value.request_id == "r9"
    error = json.loads(encode_error(info.value.code, info.value.message, info.value.request_id))
    assert error["request_id"] == "r9" and error["type"] == "error"
    with pytest.raises(ProtocolError, match="non-finite|JSON|finite"):  # NaN is not JSON a client may send
        parse_client_message('{"type": "ask", "request_id": "r", "stream_id": "c", "question": "q", "at": NaN}')


def test_the_answer_to_an_ask_is_the_answer_message() -> None:
    answer = Answer("cam1", 41, 40.0, 43.0, "what colour is it ?", "red", float("-inf"), "m", "q1", 2.0)
    sent = json.loads(encode_event(answer))
    assert sent["type"] == "answer" and sent["request_id"] == "q1" and sent["confidence"] is None
    assert sent == {"v": 1, **answer.to_dict(), "confidence": None}


def test_oversized_messages_are_rejected_by_bytes_not_characters() -> None:
    def frame(name: str) -> str:
        return json.dumps({"type": "subscribe", "streams": [name]}, ensure_ascii=False)

    overhead = len(frame(""))
    fits = frame("x" * (MAX_MESSAGE_BYTES - overhead))
    assert len(fits.encode()) == MAX_MESSAGE_BYTES
    assert isinstance(parse_client_message(fits), Subscribe)
    assert isinstance(parse_client_message(fits.encode()), Subscribe)
    for too_big in (frame("x" * (MAX_MESSAGE_BYTES - overhead + 1)), frame("é" * (MAX_MESSAGE_BYTES // 2))):
        # The second one is under the limit in characters, over it in UTF-8 bytes.
        for data in (too_big, too_big.encode()):
            with pytest.raises(ProtocolError) as info:
                parse_client_message(data)
            assert info.value.code == "too_large"
    with pytest.raises(ProtocolError, match="too_large"):
        parse_client_message("[" * (10 * MAX_MESSAGE_BYTES))


def test_subscription_filter_semantics() -> None:
    ab = frozenset({"a", "b"})
    s = apply_subscription(frozenset(), Subscribe(ab))
    assert s == ab
    assert apply_subscription(s, Subscribe(frozenset({"c"}))) == {"a", "b", "c"}
    assert apply_subscription(s, Unsubscribe(frozenset({"a", "z"}))) == {"b"}
    assert apply_subscription(s, Subscribe(None)) is None
    assert apply_subscription(None, Subscribe(frozenset({"a"}))) is None
    assert apply_subscription(None, Unsubscribe(None)) == frozenset()
    with pytest.raises(ProtocolError) as info:
        apply_subscription(None, Unsubscribe(frozenset({"a"})))
    assert info.value.code == "bad_request"


def _schema_examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", SCHEMA, flags=re.DOTALL)
    examples = []
    for block in blocks:
        # One object per block, except client blocks that list alternatives one per line.
        try:
            examples.append(json.loads(block))
        except json.JSONDecodeError:
            examples.extend(json.loads(line) for line in block.splitlines() if line.strip())
    return examples


def test_schema_examples_match_what_the_code_sends_and_accepts() -> None:
    examples = _schema_examples()
    server = {e["type"]: e for e in examples if "v" in e}
    client = [e for e in examples if "v" not in e]
    produced = {
        "hello": encode_hello(["cam1"], 20),
        "caption": encode_caption(CAPTION, False),
        "state": encode_state("cam1", "stalled", None, 1.0),
        "error": encode_error("bad_message", "x"),
        "pong": encode_pong(),
        # opt-in messages: built from the records the daemon publishes
        "speech": encode(event_message(SpeechCue("cam1", 12.4, 14.1, "two red circles move up", -0.12, "m", 1.0, 1.5))),
        "answer": encode(event_message(Answer("cam1", 41, 40.0, 43.0, "what colour is it ?", "red", -0.05, "m", "q1", 2.0))),
        "watch": encode(event_message(WatchEvent("w1", "cam1", "is there a red circle ?", "on", "yes", 61.0, 64.0, 3.0))),
        "chapter": encode(event_message(Chapter("cam1", 3, 96.0, 130.5, "two small red triangles move down", 4.0))),
    }
    assert set(server) == set(produced)
    for kind, text in produced.items():
        assert set(server[kind]) == set(json.loads(text)), kind  # same fields, documented
    assert {e["type"] for e in client} == {"subscribe", "unsubscribe", "ping", "ask"}
    for example in client:
        parse_client_message(json.dumps(example))


def test_schema_documents_every_error_code() -> None:
    codes = {"too_large", "bad_json", "bad_message", "unknown_type", "unsupported_version", "bad_request",
             "not_found", "out_of_history", "busy", "engine_failed", "unavailable"}
    for code in codes:
        assert f"`{code}`" in SCHEMA


def test_docs_protocol_md_is_the_schema() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
    assert SCHEMA in doc.read_text(encoding="utf-8"), "regenerate docs/protocol.md from streamer.publish.protocol.SCHEMA"
