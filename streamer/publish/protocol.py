"""The WebSocket wire format, sans-I/O: encode server messages, parse client ones.

Nothing here touches a socket or a clock: the server route feeds received
text to `parse_client_message()` and sends the strings the `encode_*`
functions return. `SCHEMA` (also `docs/protocol.md`) documents every message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from streamer.types import EVENT_TYPES, Caption, StateChange, StreamEvent

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "MAX_FRAME_BYTES",
    "SERVER_NAME",
    "SCHEMA",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "Ping",
    "Ask",
    "ClientMessage",
    "parse_client_message",
    "apply_subscription",
    "caption_message",
    "event_message",
    "parse_types",
    "state_message",
    "encode",
    "encode_caption",
    "encode_gap",
    "parse_since",
    "encode_state",
    "encode_hello",
    "encode_error",
    "encode_event",
    "encode_pong",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # client messages; a subscribe list never needs more
# Larger messages are still read to the end (and answered `too_large`) up to this size; past it the
# server closes with 1009 rather than buffer a frame of any size for a client.
MAX_FRAME_BYTES = 4 * MAX_MESSAGE_BYTES


def _package_version() -> str:
    try:
        return metadata.version("streamer")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


SERVER_NAME = f"streamer/{_package_version()}"

SCHEMA = """\
# Caption WebSocket protocol, version 1

Every message is one WebSocket **text** frame holding one JSON object. Server
messages carry `"v": 1` (the protocol version) and a `"type"`. Clients may
send `"v"`; if they do it must be `1`. Unknown fields are ignored in both
directions, so new optional fields do not bump the version. Times ending in
`time` are wall-clock Unix seconds; `start`/`end` are media time in seconds.

## Connecting

`GET /ws` opens a connection. Query parameters, all optional:

- `streams`: stream ids to follow, comma-separated (`/ws?streams=cam1,cam2`).
  A bare `/ws` (or `streams=*`) follows every stream, including streams added
  later, as after `{"type": "subscribe", "streams": "*"}`. A token limited to
  some streams follows at most those.
- `all`: `1` or `true` also sends captions that repeat the text before them
  (`"stable": true`); by default they are skipped (see `caption`).
- `types`: opt-in message types to receive besides captions and states,
  comma-separated: `speech`, `answer`, `watch`, `chapter` (see Opt-in
  messages). An unknown type is refused with HTTP 400 before the upgrade.
- `token`: a viewer token, for clients that cannot send `Authorization`.
- `since` (only on a daemon with a bus, see `seq` below): a JSON object of
  stream id -> the last `seq` the client has, URL-encoded
  (`/ws?streams=cam1&since=%7B%22cam1%22%3A41%7D` for `{"cam1": 41}`). For
  each of those streams the connection starts with every message after that
  `seq`, oldest first, instead of the recent history, then goes on live
  with no message twice and none left out. If the bus no longer holds some
  of them (older than its retention), a `gap` message says which came first.
  Streams the connection does not follow are ignored. At most 1000 entries;
  a malformed `since`, or one sent to a daemon without a bus, is refused
  with HTTP 400 before the upgrade; while the bus is unreachable the upgrade
  is refused with 503 (retry later with the same `since`).

## Server to client

### `hello`
Sent once, first, on every connection.

```json
{"v": 1, "type": "hello", "streams": ["cam1", "cam2"], "history": 20, "server": "streamer/0.1.0"}
```

- `streams`: ids of the streams the server has now (sorted).
- `history`: how many recent captions per stream a subscription replays.
- `server`: `streamer/<version>`.

### `caption`
One caption for one window of one stream.

```json
{"v": 1, "type": "caption", "stream_id": "cam1", "index": 42, "start": 42.0, "end": 44.5,
 "text": "a man is riding a bike", "confidence": -0.31, "model": "microsoft/git-base-vatex",
 "capture_time": 1764050000.12, "emit_time": 1764050000.85, "latency": 0.73, "stable": false,
 "shown": true}
```

- `stream_id` (string), `index` (integer, per-stream window counter).
- `start`, `end` (number): media time of the window's first and last frame.
- `text` (string): the caption; may be empty.
- `confidence` (number or null): mean log-probability of the generated tokens
  (<= 0); null if it was not finite.
- `model` (string): the model that wrote it.
- `capture_time` (number): when the newest frame of the window arrived.
- `emit_time` (number): when the caption was produced.
- `latency` (number): `emit_time - capture_time`, at least 0, in seconds.
- `stable` (bool): true when `text` (and `shown`) equals the previous caption
  of the same stream. Subscriptions skip a stable caption when the client
  already has its text, so most clients never see `"stable": true` live; a
  replayed history may start with one.
- `shown` (bool): true when this is the caption to display now. With the
  stream's `stabilize = "hold"` (the default), a caption whose text differs
  from the one on display is `"shown": false` until that text has come
  `stabilize_windows` windows in a row (2 by default), beats the displayed
  text's confidence by `stabilize_margin`, or the displayed text has not come
  for `stabilize_windows + 1` windows; the caption that does it is the first
  `"shown": true` with the new text. Overlays and subtitle files (vtt, srt)
  follow the shown captions and keep the last shown text through unshown
  ones; every caption is still sent, so a client that wants the raw stream
  ignores the field. Always true with `stabilize = "off"`.

- `seq` (integer, only when the daemon runs with a bus, `[bus]` in its
  config): the message's sequence number in its stream, 1, 2, 3, ... over
  every caption and state of that stream, the same on every replica. Keep
  the last one per stream to resume with `since`. Skipped repeats (`stable`)
  and, after the bus lost its data, a `gap` leave holes; with `all=1` the
  numbers a client sees are consecutive unless a `gap` says otherwise.

Captions of one stream arrive in `index` order. On subscribing, the client
first gets the recent history of the streams it asked for (up to `history`
captions per stream and each stream's latest `state`, merged by time), then
live messages.

### `state`
A stream changed state. `state` is one of:

- `connecting`: first attempt to open the source, nothing received yet;
- `live`: frames are flowing;
- `stalled`: connected, but no frame for the stream's `stall_timeout`;
- `reconnecting`: the connection was lost (or never made); waiting to retry;
- `failed`: gave up (an error that retrying cannot fix);
- `stopped`: stopped by its owner (`detail` "removed" after a DELETE), or a
  file played to its end.

For a WHIP stream, `stalled` means the publisher sent no video for
`stall_timeout` (it may have vanished); `failed` says which layer gave up
(`"ICE failed: ..."`, `"DTLS failed as server: ..."`); a new publish to a
stopped, failed or stalled WHIP stream sends `stopped` with `detail`
`"replaced by a new WHIP session (was stalled)"`, then the new session's
`connecting` and `live`.

```json
{"v": 1, "type": "state", "stream_id": "cam1", "state": "stalled", "detail": "no frames for 5 s", "time": 1764050001.0}
```

- `stream_id` (string), `state` (string), `detail` (string or null),
  `time` (number, when the state changed).
- `seq` (integer, only with a bus): as in `caption`, in the same sequence.

### `gap`
Only with a bus, for a `since` older than what the bus keeps: the messages
numbered `from_seq` to `to_seq` of the stream are gone (trimmed past the
bus's `retention`, or lost by the bus). The messages after it follow:
`{"v": 1, "type": "gap", "stream_id": "cam1", "from_seq": 42, "to_seq": 180}`.

- `stream_id` (string), `from_seq`, `to_seq` (integers, inclusive).

### Opt-in messages
A connection gets these only for the types it asked for (`types` in the URL
or in `subscribe`), so a client written for the messages above sees nothing
new. They are live only: not replayed from the history to a new connection
(with a bus, a `since` resume includes them). Numbers that are not finite
are sent as `null`, as in `caption`.

`speech`: what was said in one utterance of a stream with speech turned on
(`start`/`end`: media time the voice began and ended, on the same clock as
the captions; `latency`: end of the utterance to the cue, seconds):

```json
{"v": 1, "type": "speech", "stream_id": "cam1", "start": 12.4, "end": 14.1, "text": "two red circles move up", "confidence": -0.12, "model": "world-whisper", "capture_time": 1764050014.3, "emit_time": 1764050014.8, "latency": 0.5}
```

`answer`: the answer to a question about one window (`index`, `start`,
`end`) of a stream, asked by any client (`POST /streams/{id}/ask`, or `ask`
below); `request_id` echoes the asker's (null for answers asked over HTTP).
The connection that sent an `ask` gets its answer whether or not it opted in;
if it did opt in to `answer` it sees it a second time among everyone's
answers:

```json
{"v": 1, "type": "answer", "stream_id": "cam1", "index": 41, "start": 40.0, "end": 43.0, "question": "what colour is it ?", "answer": "red", "confidence": -0.05, "model": "world-git", "request_id": "q1", "emit_time": 1764050043.4}
```

`watch`: a watch's state changed and held for its `hold` asks (`state`
`on` while the answer to its question matches, `off` when it no longer
does; `start`/`end`: the window that settled it):

```json
{"v": 1, "type": "watch", "watch_id": "w1", "stream_id": "cam1", "question": "is there a red circle ?", "state": "on", "answer": "yes", "start": 61.0, "end": 64.0, "emit_time": 1764050064.6}
```

`chapter`: a chapter of the stream's caption timeline closed (`index` from
0 per stream; `title` names the scene):

```json
{"v": 1, "type": "chapter", "stream_id": "cam1", "index": 3, "start": 96.0, "end": 130.5, "title": "two small red triangles move down", "emit_time": 1764050131.0}
```

`GET /streams/{id}/chapters` lists the same objects (oldest first; while live
the last has `"open": true`). With several replicas, a replica that has just
taken a stream over reads its chapters back from the bus first (well under a
second per stream at the default retention): meanwhile that route waits up to
3 s, then answers `503 {"error": {"code": "chapters_restoring", ...}}` with
`Retry-After: 1`. No `chapter` message is sent twice across a takeover.

### `error`
A client message was rejected and ignored; the connection stays open.

```json
{"v": 1, "type": "error", "code": "bad_message", "message": "'streams' must be a list of strings or \\"*\\""}
```

- `code` (string), one of:
  - `too_large`: the message was over 65536 bytes (up to 262144: a larger
    one is not read, the server closes with 1009, see Closing).
  - `bad_json`: not UTF-8, not JSON, or not a JSON object.
  - `bad_message`: a field is missing or has the wrong type.
  - `unknown_type`: `type` names no client message.
  - `unsupported_version`: `v` was sent and is not `1`.
  - `bad_request`: well-formed but cannot be done (see `unsubscribe`), or a
    question the model cannot read (too many tokens for its positions).
  - for `ask` only: `not_found` (no such stream, or not one this token
    covers), `out_of_history` (nothing captioned yet, or `at` outside the
    stream's history: `message` says the span it holds), `busy` (this
    connection already has 4 questions waiting, or the engine has too much
    one-off work: ask again shortly), `engine_failed` (the engine raised on
    the batch; logged and counted), `unavailable` (the daemon is starting or
    stopping, or the stream's owner in a cluster cannot be reached).
- `message` (string): one line for humans.
- `request_id` (string, only for errors about an `ask` that had one): the
  `ask`'s `request_id`.

### `pong`
The answer to `ping`.

```json
{"v": 1, "type": "pong"}
```

## Client to server

### `subscribe`
```json
{"type": "subscribe", "streams": ["cam1", "cam2"]}
{"type": "subscribe", "streams": "*"}
```

Adds the listed streams to the connection's subscription; `"*"` subscribes to
every stream, including streams added later. A connection starts with the
streams of its URL (every stream for a bare `/ws`, see Connecting). Newly
added streams replay their history.

`types` (optional, a list) adds opt-in message types (Opt-in messages);
with `types`, `streams` may be left out to change only the types:
`{"type": "subscribe", "types": ["speech", "watch"]}`. An unknown type is
rejected with `bad_message`.

### `unsubscribe`
```json
{"type": "unsubscribe", "streams": ["cam2"]}
{"type": "unsubscribe", "streams": "*"}
```

Removes the listed streams; `"*"` removes all. While subscribed to `"*"`, a
list is rejected with `bad_request` (subscribe to a list first). `types`
(optional) removes opt-in types, as in `subscribe`.

### `ping`
```json
{"type": "ping"}
```

The server answers `pong`.

### `ask`
A question about a stream (issue #13): the newest captioned window, or the
window of the stream's recent history (its `history` setting, 30 s by
default) that holds media time `at`.

```json
{"type": "ask", "request_id": "q1", "stream_id": "cam1", "question": "what colour is it ?", "at": 40.5, "max_new_tokens": 8}
```

- `request_id` (string, 1-128 characters): echoed in the reply.
- `stream_id` (string): a stream this connection's token covers (it need
  not be subscribed to it).
- `question` (string): 1-512 characters, not blank.
- `at` (number, optional): media time in seconds; default the newest window.
- `max_new_tokens` (integer 1-256, optional): the answer's token limit.

The reply comes later, when the engine has answered (other messages may come
between): an `answer` message (see Opt-in messages) with the same
`request_id`, or an `error` with the `request_id` and one of the codes above.
At most 4 questions per connection wait at once; a fifth gets `busy`.

## Closing

The server closes a connection with:

- 1008 (policy violation), reason `slow consumer`: the client does not read.
  Either `client_queue` messages (256 by default) wait for it, or it missed a
  ping (below) while messages to it were waiting: queued, in the server's send
  buffer, or held back by the kernel because the client's TCP receive window
  is full (Linux).
- 1011 (internal error), reason `ping timeout`: it missed a ping and nothing
  was waiting for it: a dead or hung client whose receive buffer had room.
- 1009 (message too big): a client message over 262144 bytes.
- 1001 (going away), reason `server shutdown`: the server stops (clients first
  get the messages already queued for them).

The heartbeat: the server sends a WebSocket ping `heartbeat` seconds (20 by
default) after the client's last pong and expects the pong within
`heartbeat / 2`. Only a pong that echoes the server's ping counts: TCP
delivers in order, so it proves the client read everything sent before. The
client's own frames (its pings, subscriptions) do not count. So a client that
stops reading is closed at most 1.5 x `heartbeat` (30 s by default) after its
last pong, sooner if its queue fills first. Which fires first: at a few
captions per second the ping does, and the code says whether captions were
stuck (1008) or not (1011); under bursts (many streams, a history replay,
`all=1`) the queue limit can. A client that cannot take the close frame
within `close_timeout` (2 s) has its TCP connection dropped; one that resumes
reading in time gets the messages sent before the close frame, then the frame.
"""


class ProtocolError(Exception):
    """A client message was rejected; `code` and `message` (and an `ask`'s `request_id`) go into an `error` reply."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Subscribe:
    streams: frozenset[str] | None  # None: every stream ("*")
    types: frozenset[str] | None = None  # event types to add; None: not given


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    streams: frozenset[str] | None  # None: every stream ("*")
    types: frozenset[str] | None = None  # event types to remove; None: not given


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Ask:
    """A question about a stream's newest window (or the one at media time `at`); answered later."""

    request_id: str
    stream_id: str
    question: str
    at: float | None = None
    max_new_tokens: int | None = None


ClientMessage = Subscribe | Unsubscribe | Ping | Ask

MAX_REQUEST_ID_CHARS = 128


def _streams_field(data: dict[str, Any]) -> frozenset[str] | None:
    if "streams" not in data and "types" in data:
        return frozenset()  # only the types change
    streams = data.get("streams")
    if streams == "*":
        return None
    if not isinstance(streams, list) or not all(isinstance(s, str) and s for s in streams):
        raise ProtocolError("bad_message", "'streams' must be a list of non-empty strings or \"*\"")
    return frozenset(streams)


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client frame; raise ProtocolError (to send back as `error`) if it is not valid."""
    # Check the character count first so a huge frame is never encoded.
    if len(text) > MAX_MESSAGE_BYTES or (
        isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES
    ):
        raise ProtocolError("too_large", f"message is over the limit of {MAX_MESSAGE_BYTES} bytes")
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_json", "message is not valid UTF-8") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("bad_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "message must be a JSON object")
    if "v" in data and (data["v"] != PROTOCOL_VERSION or isinstance(data["v"], bool)):
        raise ProtocolError("unsupported_version", f"protocol version {data['v']!r} is not supported; use {PROTOCOL_VERSION}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "'type' must be a string")
    if kind == "subscribe":
        return Subscribe(_streams_field(data), _types_field(data))
    if kind == "unsubscribe":
        return Unsubscribe(_streams_field(data), _types_field(data))
    if kind == "ping":
        return Ping()
    if kind == "ask":
        return _ask(data)
    raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected subscribe, unsubscribe, ping or ask")


def _ask(data: dict[str, Any]) -> Ask:
    from streamer.config import MAX_QUESTION_CHARS, STREAM_ID  # light module, as in parse_since

    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ProtocolError("bad_message", f"'request_id' must be a string of 1-{MAX_REQUEST_ID_CHARS} characters")

    def bad(message: str) -> ProtocolError:
        return ProtocolError("bad_message", message, request_id)

    stream_id, question = data.get("stream_id"), data.get("question")
    if not isinstance(stream_id, str) or not STREAM_ID.match(stream_id):
        raise bad("'stream_id' must be a stream id")
    if not isinstance(question, str) or not question.strip():
        raise bad("'question' must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise bad(f"'question' is {len(question)} characters long; at most {MAX_QUESTION_CHARS}")
    at = data.get("at")
    if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)):
        raise bad("'at' must be a finite number (media seconds)")
    limit = data.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 256):
        raise bad("'max_new_tokens' must be an integer from 1 to 256")
    return Ask(request_id, stream_id, question, None if at is None else float(at), limit)


def _types_field(data: dict[str, Any]) -> frozenset[str] | None:
    if "types" not in data:
        return None
    types = data["types"]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ProtocolError("bad_message", "'types' must be a list of strings")
    return parse_types(types)


def parse_types(types: Iterable[str]) -> frozenset[str]:
    """Opt-in event types (a `types` field or the `types` query); raises ProtocolError for unknown ones."""
    kept = frozenset(t.strip() for t in types if t.strip())
    unknown = sorted(kept - set(EVENT_TYPES))
    if unknown:
        raise ProtocolError("bad_message", f"unknown message types {', '.join(repr(t[:40]) for t in unknown[:5])} in "
                                           f"'types'; the opt-in types are {', '.join(EVENT_TYPES)}")
    return kept


def apply_subscription(
    current: frozenset[str] | None, message: Subscribe | Unsubscribe
) -> frozenset[str] | None:
    """The stream filter after `message` (None: every stream), as SCHEMA describes.

    A connection starts with `frozenset()`. Raises ProtocolError("bad_request")
    for unsubscribing a list while subscribed to "*".
    """
    if message.streams is not None and not message.streams:
        return current  # only `types` changed (or an empty list: nothing to do)
    if isinstance(message, Subscribe):
        if current is None or message.streams is None:
            return None
        return current | message.streams
    if message.streams is None:
        return frozenset()
    if current is None:
        raise ProtocolError("bad_request", "subscribed to \"*\": unsubscribe \"*\" or subscribe to a list of streams first")
    return current - message.streams


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN/Infinity; browsers' JSON.parse rejects them.
    return value if math.isfinite(value) else None


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def caption_message(caption: Caption, stable: bool, shown: bool = True) -> dict[str, Any]:
    """The `caption` message as a JSON-ready dict (non-finite numbers as None)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "caption"}
    msg.update(caption.to_dict())
    for key in ("start", "end", "confidence", "capture_time", "emit_time", "latency"):
        msg[key] = _finite_or_none(msg[key])
    msg["stable"] = bool(stable)
    msg["shown"] = bool(shown)
    return msg


def event_message(event: StreamEvent) -> dict[str, Any]:
    """An opt-in event message (answer, watch, chapter, speech) as a JSON-ready dict."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION}
    msg.update(event.to_dict())
    for key, value in msg.items():
        if isinstance(value, float):
            msg[key] = _finite_or_none(value)
    return msg


def state_message(change: StateChange) -> dict[str, Any]:
    """The `state` message as a JSON-ready dict."""
    return {
        "v": PROTOCOL_VERSION,
        "type": "state",
        "stream_id": change.stream_id,
        "state": change.state,
        "detail": change.detail,
        "time": _finite_or_none(change.time),
    }


def encode(message: dict[str, Any]) -> str:
    """One server message as the text of a WebSocket frame."""
    return _dumps(message)


def encode_caption(caption: Caption, stable: bool, shown: bool = True) -> str:
    return _dumps(caption_message(caption, stable, shown))


def encode_state(stream_id: str, state: str, detail: str | None, time: float) -> str:
    return _dumps(state_message(StateChange(stream_id, state, detail, time)))


def encode_hello(streams: Iterable[str], history: int, server: str = SERVER_NAME) -> str:
    return _dumps(
        {"v": PROTOCOL_VERSION, "type": "hello", "streams": sorted(streams), "history": history, "server": server}
    )


def encode_error(code: str, message: str, request_id: str | None = None) -> str:
    error: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "error", "code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return _dumps(error)


def encode_event(event: StreamEvent) -> str:
    """An event message (e.g. the `answer` to a connection's own `ask`) as the text of a frame."""
    return _dumps(event_message(event))


def encode_gap(stream_id: str, from_seq: int, to_seq: int) -> str:
    return _dumps({"v": PROTOCOL_VERSION, "type": "gap", "stream_id": stream_id, "from_seq": from_seq, "to_seq": to_seq})


MAX_SINCE_STREAMS = 1000
_MAX_SEQ = 2**62  # far beyond any real sequence; keeps `seq + 1` an exact Redis stream id


def parse_since(text: str) -> dict[str, int]:
    """The `since` query parameter: a JSON object of stream id -> last seq (>= 0); ProtocolError if not."""
    from streamer.config import STREAM_ID  # light module; imported here to keep this one dependency-free

    try:
        data = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_request", "'since' must be a JSON object of stream id -> last seq") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "'since' must be a JSON object of stream id -> last seq")
    if len(data) > MAX_SINCE_STREAMS:
        raise ProtocolError("bad_request", f"'since' names more than {MAX_SINCE_STREAMS} streams")
    out: dict[str, int] = {}
    for sid, seq in data.items():
        if not STREAM_ID.match(sid):
            raise ProtocolError("bad_request", "'since' keys must be stream ids")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < _MAX_SEQ:
            raise ProtocolError("bad_request", f"'since' values must be integers >= 0 (stream {sid!r})")
        out[sid] = seq
    return out


def encode_pong() -> str:
    return _dumps({"v": PROTOCOL_VERSION, "type": "pong"})
