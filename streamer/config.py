"""One schema for every setting a user or a remote caller gives: streamer.toml, CLI flags,
`POST /streams`, WHIP query parameters and the JSON caption APIs (pydantic v2).

Every model forbids unknown keys and bounds every number, so a bad value is
refused where it enters (exit 2 at startup, 400 over HTTP) with one line that
names the key, the value and what is allowed, instead of failing later inside
a running task. Durations take seconds as a number or a string with a unit
(`1.5`, `"2s"`, `"500ms"`, `"10m"`).

This module is light (no torch, no aiohttp): the CLI parses with it before
anything heavy loads.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

__all__ = [
    "ConfigError",
    "Duration",
    "STREAM_ID",
    "StreamConfig",
    "ModelSection",
    "ServerSection",
    "LimitsSection",
    "OutputsSection",
    "WebhookSection",
    "AuthSection",
    "SourcesSection",
    "BusSection",
    "FileConfig",
    "CaptionVideoRequest",
    "CaptionVideosRequest",
    "CaptionFramesRequest",
    "AskRequest",
    "WatchConfig",
    "WatchRequest",
    "MAX_QUESTION_CHARS",
    "MAX_QA_MODELS",
    "parse_duration",
    "validate",
    "describe_error",
]

STREAM_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z, not $: "abc\n" must not pass; safe in URLs and file names
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


_URL_SECRET = re.compile(r"(://)[^/@\s]*@")


class ConfigError(ValueError):
    """A setting was refused; str() is one line naming the key, the value and what is allowed."""


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string with an optional unit (ms, s, m/min, h)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as \"2s\", \"500ms\", \"10m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (try \"3s\", \"500ms\", \"1.5\", \"10m\")")
        seconds = float(match.group(1)) * _UNIT[match.group(2) or "s"]
    else:
        raise ValueError("a duration is a number of seconds or a string such as \"2s\", \"500ms\", \"10m\"")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    return seconds


def _bounded(low: float, high: float, *, low_open: bool = False):
    def check(seconds: float) -> float:
        if (seconds <= low if low_open else seconds < low) or seconds > high:
            raise ValueError(f"must be {'over' if low_open else 'at least'} {low:g} s and at most {high:g} s")
        return seconds

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _duration(low: float, high: float, *, low_open: bool = False):
    return Annotated[float, BeforeValidator(parse_duration), _bounded(low, high, low_open=low_open)]


def _stream_id(value: str) -> str:
    if not STREAM_ID.match(value):
        raise ValueError("a stream id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


StreamId = Annotated[StrictStr, AfterValidator(_stream_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


_ModelId = Annotated[StrictStr, Field(min_length=1, max_length=512)]  # a hub id, HF cache entry or local directory
MAX_QA_MODELS = 4  # [model] qa_models: each is one more model in memory


def _distinct(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("names a model twice")
    return value


class StreamConfig(_Strict):
    """What a user says about one stream ([[streams]], --stream, POST /streams, WHIP query)."""

    id: StreamId
    url: Annotated[StrictStr, Field(max_length=4096)] = ""  # empty for WHIP streams, which are pushed to us
    window: _duration(0.1, 600) = 3.0
    hop: _duration(0.1, 3600) = 1.0
    frames: Annotated[StrictInt, Field(ge=1, le=32)] | None = None  # default: what the model takes
    realtime: StrictBool = True  # files: play at real-time pace
    loop: StrictBool = False  # files: start again at the end
    rtsp_transport: Literal["tcp", "udp", "udp_multicast", "http", "https"] = "tcp"
    stall_timeout: _duration(0.5, 3600) = 5.0
    hwaccel: Annotated[StrictStr, Field(max_length=32)] | None = None  # "cuda" (NVDEC) where FFmpeg has it
    # Which caption overlays and subtitle files show (publish/stabilizer.py): "hold" keeps it until a new
    # text has come stabilize_windows windows in a row, beats it by stabilize_margin in confidence (mean
    # log-prob), or it has not come for stabilize_windows + 1 windows. Default from the live evaluation
    # (README): hold 2 cut flicker from 48 to 2 per 100 windows on the demo's scenes, at most one hop later.
    stabilize: Literal["off", "hold"] = "hold"
    stabilize_windows: Annotated[StrictInt, Field(ge=1, le=32)] = 2
    stabilize_margin: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    # How far back questions can look (`at`): the last windows' image-token caches kept per stream.
    history: _duration(0, 600) = 30.0
    # Which model answers questions about this stream (asks, watches): one the operator configured ([model]
    # qa_model, qa_models or id); none: [model] qa_model, else the caption model. Never a path loaded on demand.
    qa_model: _ModelId | None = None
    # Speech in the caption track (speech/): transcribing a microphone has privacy and legal weight and
    # costs CPU, so it is off unless the operator turns it on; "only": speech cues, no visual captions.
    speech: Literal["off", "on", "only"] = "off"

    @model_validator(mode="after")
    def _check_hwaccel(self) -> StreamConfig:
        if self.hwaccel is not None:
            from streamer.media.decode import check_hwaccel

            check_hwaccel(self.hwaccel)  # ValueError naming the valid types
        return self

    @classmethod
    def from_dict(cls, data: Any) -> StreamConfig:
        """Validate a JSON object or TOML table; raises ConfigError (a ValueError)."""
        if not isinstance(data, dict):
            raise ConfigError("a stream must be a JSON object")
        return validate(cls, data, "stream")


class ModelSection(_Strict):
    """[model]: what `EngineConfig` gets."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=512)] | None = Field(default=None, alias="id")
    device: Annotated[StrictStr, Field(pattern=r"^(auto|cpu|cuda(:\d{1,2})?|mps)$")] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=256)] = 20
    threads: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    cache_frames: Annotated[StrictInt, Field(ge=0, le=100_000)] = 512
    vision_batch: Annotated[StrictInt, Field(ge=1, le=1024)] = 32
    greedy: Literal["auto", "compact", "masked"] = "auto"
    # Image keys/values kept per captioned live window, so a question about it costs only its own tokens
    # (engine/cache.py ImageKVCache): at most this many windows and bytes for the whole daemon.
    kv_cache_windows: Annotated[StrictInt, Field(ge=0, le=100_000)] = 256
    kv_cache_bytes: Annotated[StrictInt, Field(ge=0, le=1 << 40)] = 1 << 30
    # the ONNX backends take an exported directory as `id`, or export the model once (streamer export)
    backend: Literal["torch", "onnxruntime", "openvino"] = "torch"
    # Questions: `qa_model` answers them (a VQA checkpoint such as microsoft/git-base-vqav2) instead of the
    # caption model; `qa_models`: more that streams may pick with their own `qa_model`. Each is loaded once,
    # as `id` is (same device, dtype, backend), with its own feature and image-token caches.
    qa_model: _ModelId | None = None
    qa_models: Annotated[list[_ModelId], Field(max_length=MAX_QA_MODELS), AfterValidator(_distinct)] = []
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _few_qa_models(self) -> ModelSection:
        if len(self.answer_models()) > MAX_QA_MODELS:
            raise ValueError(f"qa_model and qa_models name {len(self.answer_models())} models besides the caption "
                             f"model; at most {MAX_QA_MODELS} (each is one more model in memory)")
        return self

    def engine_options(self) -> dict[str, Any]:
        """What `EngineConfig` takes (the caption model's); a QA model's differs only in `model`."""
        return self.model_dump(exclude={"qa_model", "qa_models"})

    def answer_models(self) -> list[str]:
        """The QA models to load, the default first: each distinct id once, none that is the caption model."""
        return [m for m in dict.fromkeys([*([self.qa_model] if self.qa_model else []), *self.qa_models])
                if m != self.model]

    def askable_models(self) -> set[str]:
        """What a stream's `qa_model` may name: the QA models, and the caption model when `id` names it."""
        return set(self.answer_models()) | ({self.model} if self.model else set())


class SpeechSection(_Strict):
    """[speech]: the speech model for streams with `speech = "on" | "only"` (loaded once, when the first
    such stream starts). model: a Whisper checkpoint (hub id or local directory); none: openai/whisper-small
    when cached or reachable, else the tiny bundled streamer/world-whisper."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=512)] | None = None
    device: Annotated[StrictStr, Field(pattern=r"^(auto|cpu|cuda(:\d{1,2})?|mps)$")] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    language: Annotated[StrictStr, Field(pattern=r"^[a-z]{2,3}$")] = "en"
    batch_size: Annotated[StrictInt, Field(ge=1, le=64)] = 8  # utterances per model call
    queue: Annotated[StrictInt, Field(ge=1, le=10_000)] = 32  # utterances waiting, all streams; oldest dropped past it


class ServerSection(_Strict):
    """[server]: where and how the HTTP side listens."""

    host: Annotated[StrictStr, Field(min_length=1, max_length=255)] = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 8765
    max_body_bytes: Annotated[StrictInt, Field(ge=1024, le=1024**3)] = 32 * 1024 * 1024
    max_clips: Annotated[StrictInt, Field(ge=1, le=256)] = 16
    max_frames: Annotated[StrictInt, Field(ge=1, le=1024)] = 64
    heartbeat: _duration(1, 3600) = 20.0
    close_timeout: _duration(0, 60) = 2.0
    client_send_buffer: Annotated[StrictInt, Field(ge=4096, le=64 * 1024 * 1024)] = 256 * 1024
    allowed_origins: list[Annotated[StrictStr, Field(max_length=512)]] = []  # CORS and WebSocket Origin
    allowed_hosts: list[Annotated[StrictStr, Field(max_length=255)]] = []  # Host header; empty: any (loopback names when open)
    header_timeout: _duration(0.5, 600) = 10.0  # a request's head must arrive within this
    body_timeout: _duration(0.5, 3600) = 30.0  # and its body within this
    tls_cert: Annotated[StrictStr, Field(max_length=4096)] | None = None
    tls_key: Annotated[StrictStr, Field(max_length=4096)] | None = None


class LimitsSection(_Strict):
    """[limits]: batching, queues and the failure budgets."""

    max_batch: Annotated[StrictInt, Field(ge=1, le=256)] = 8
    max_wait: _duration(0, 5) = 0.05
    max_pending_per_stream: Annotated[StrictInt, Field(ge=1, le=64)] = 2
    pipeline: StrictBool | None = None
    ring_capacity: Annotated[StrictInt, Field(ge=2, le=4096)] = 64
    history: Annotated[StrictInt, Field(ge=0, le=1000)] = 20
    client_queue: Annotated[StrictInt, Field(ge=1, le=100_000)] = 256
    max_request_windows: Annotated[StrictInt, Field(ge=1, le=100_000)] = 256  # one-off windows waiting (HTTP APIs)
    max_failed_batches: Annotated[StrictInt, Field(ge=1, le=1000)] = 3  # in a row: the daemon reports not ready
    restart_budget: Annotated[StrictInt, Field(ge=0, le=1000)] = 5  # task restarts per restart_window
    restart_window: _duration(1, 86400) = 60.0
    max_body_bytes: Annotated[StrictInt, Field(ge=1024, le=1024**3)] | None = None  # older name: [server] max_body_bytes
    max_streams: Annotated[StrictInt, Field(ge=1, le=10_000)] = 64
    max_whip_sessions: Annotated[StrictInt, Field(ge=0, le=10_000)] = 16
    whip_connect_timeout: _duration(1, 600) = 15.0  # a WHIP session not connected by then is removed
    max_ws_clients: Annotated[StrictInt, Field(ge=1, le=100_000)] = 256
    max_ws_clients_per_address: Annotated[StrictInt, Field(ge=1, le=100_000)] = 32
    max_inflight_requests: Annotated[StrictInt, Field(ge=1, le=10_000)] = 8  # one-shot /v1/caption/* at once
    max_image_pixels: Annotated[StrictInt, Field(ge=64 * 64, le=1 << 30)] = 3840 * 2160  # per image or video frame,
    # checked before decoding and again at the size the model resizes it to
    # Watches (pipeline/watches.py): each asks a question every `every` seconds; README has what a stream carries.
    max_watches: Annotated[StrictInt, Field(ge=0, le=10_000)] = 64  # on this daemon, all streams together
    max_watches_per_stream: Annotated[StrictInt, Field(ge=0, le=1000)] = 8


class _TokenTable(_Strict):
    role: Literal["viewer", "publisher", "operator", "admin"]
    token: Annotated[StrictStr, Field(min_length=16, max_length=1024)] | None = None
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    streams: list[StreamId] | None = None


class AuthSection(_Strict):
    """[auth]: tokens with roles (see docs/SECURITY.md)."""

    tokens: list[_TokenTable] = []
    metrics_public: StrictBool = False  # GET /metrics without a token
    insecure_no_auth: StrictBool = False  # serve a non-loopback address with no tokens: for those who mean it


class SourcesSection(_Strict):
    """[sources]: what a source added over HTTP may open (config-file and CLI sources are trusted)."""

    schemes: list[Literal["rtsp", "rtsps", "http", "https", "srt", "udp"]] = ["rtsp", "rtsps", "http", "https", "srt"]
    media_dirs: list[Annotated[StrictStr, Field(min_length=1, max_length=4096)]] = []  # regular files under these
    deny_networks: list[StrictStr] | None = None  # CIDRs; None: loopback, 0.0.0.0, link-local, metadata, multicast
    allow_networks: list[StrictStr] = []  # CIDRs that win over deny_networks
    # rtsps:// (the RTSP relay is the TLS client): verify the camera's certificate and host name; off, as
    # FFmpeg's own tls_verify. tls_ca_file: PEM CAs to trust instead of the system's (needs tls_verify).
    tls_verify: StrictBool = False
    tls_ca_file: Annotated[StrictStr, Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _ca_needs_verify(self) -> SourcesSection:
        if self.tls_ca_file is not None and not self.tls_verify:
            raise ValueError("tls_ca_file is only used with tls_verify = true: set both, or neither")
        return self


def _redis_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a redis URL: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must be redis://[:password@]host:port/db (or rediss:// for TLS)")
    if not parts.hostname:
        raise ValueError("names no host: redis://[:password@]host:port/db")
    if port == 0:
        raise ValueError("port must be 1-65535")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) <= 15):
        raise ValueError("the database (the path) must be a number 0-15")
    if parts.query or parts.fragment:
        raise ValueError("takes no query or fragment: put settings in [bus]")
    return value


class BusSection(_Strict):
    """[bus]: the caption bus shared by several replicas (Redis Streams; publish/bus.py)."""

    url: Annotated[StrictStr, Field(max_length=1024), AfterValidator(_redis_url)]
    retention: Annotated[StrictInt, Field(ge=1, le=100_000_000)] = 10_000  # messages kept per stream (MAXLEN ~)
    key_prefix: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:{}-]{1,64}$")] = "streamer:"
    buffer: Annotated[StrictInt, Field(ge=1, le=10_000_000)] = 10_000  # held while Redis is unreachable; oldest dropped
    read_count: Annotated[StrictInt, Field(ge=1, le=100_000)] = 500  # entries per XREAD
    max_streams: Annotated[StrictInt, Field(ge=1, le=100_000)] = 10_000  # streams a replica follows on the bus
    connect_timeout: _duration(0.1, 60) = 2.0
    reconnect_max: _duration(0.1, 300) = 5.0  # the longest wait between reconnection attempts
    # Stream ownership (cluster/ownership.py): the stream set in Redis, one owner per stream, failover.
    ownership: StrictBool = True
    replica_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None  # default: hostname-pid
    lease_ttl: _duration(0.5, 600) = 5.0  # a dead owner's streams move within this + one window
    max_owned_streams: Annotated[StrictInt, Field(ge=0, le=100_000)] = 64  # 0: caption nothing, only serve
    request_timeout: _duration(0.1, 120) = 5.0  # requests routed to a stream's owner


OUTPUT_FORMATS = ("vtt", "srt", "jsonl")
SPEECH_OUTPUTS = ("cues", "off")  # [outputs] speech: speech cues in the subtitle files, or not


def _stream_list(value: Any) -> Any:
    if value is None or value == "*":
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError("streams must be a list of stream ids (or \"*\" for every stream)")
    return value


StreamFilter = Annotated[list[StrictStr] | None, BeforeValidator(_stream_list)]


def _formats(value: Any) -> Any:
    if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
        raise ValueError(f"formats must be a non-empty list of strings, some of {', '.join(OUTPUT_FORMATS)}")
    unknown = [f for f in value if f not in OUTPUT_FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; valid: {', '.join(OUTPUT_FORMATS)}")
    return value


def _non_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a non-empty string")
    return value


class OutputsSection(_Strict):
    """[outputs]: live subtitle files, one per stream and format."""

    dir: Annotated[StrictStr, BeforeValidator(_non_blank), Field(max_length=4096)]
    formats: Annotated[list[StrictStr], BeforeValidator(_formats)] = list(OUTPUT_FORMATS)
    streams: StreamFilter = None
    # speech cues (streams with speech on) in the same vtt/srt cues as the scene captions, and as jsonl lines
    speech: Literal["cues", "off"] = "cues"


class WebhookSection(_Strict):
    """[[webhooks]]: POST matching captions to a URL (the URL and regex are checked by WebhookSink)."""

    url: Annotated[StrictStr, Field(min_length=1, max_length=4096)]
    match: Annotated[StrictStr, Field(min_length=1, max_length=1024)] | None = None
    streams: StreamFilter = None
    only_changes: StrictBool = False
    queue_size: Annotated[StrictInt, Field(ge=1, le=100_000)] = 100
    retries: Annotated[StrictInt, Field(ge=0, le=20)] = 3
    backoff: _duration(0, 600) = 0.5
    timeout: _duration(0, 600, low_open=True) = 5.0
    types: Annotated[list[Annotated[StrictStr, Field(max_length=32)]], Field(max_length=8)] = []  # opt-in events


# -- questions and watches (issue #13) -------------------------------------------
MAX_QUESTION_CHARS = 512  # the engine's limit too (engine/prompts.py), which also checks the model's positions
_WATCH_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def _question(value: str) -> str:
    if not value.strip():
        raise ValueError("the question is empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question is {len(value)} characters long; at most {MAX_QUESTION_CHARS}")
    return value


_Question = Annotated[StrictStr, AfterValidator(_question)]


def _watch_on(value: str) -> str:
    """`on`: a word compared case-insensitively, or a regular expression written /.../ (checked here)."""
    if not value.strip():
        raise ValueError("must be a non-empty string")
    if value.startswith("/") and value.endswith("/") and len(value) >= 2:
        try:
            re.compile(value[1:-1], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


def _watch_id(value: str) -> str:
    if not _WATCH_ID.match(value):
        raise ValueError("a watch id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


class WatchRequest(_Strict):
    """`POST /streams/{id}/watches`: a question re-asked on the stream's newest window every `every`;
    the watch is on while the answer matches `on` (held for `hold` asks in a row)."""

    question: _Question
    every: _duration(0.1, 3600) = 2.0  # at least the stream's hop (checked against the stream)
    on: Annotated[StrictStr, Field(min_length=1, max_length=256), AfterValidator(_watch_on)] = "yes"
    hold: Annotated[StrictInt, Field(ge=1, le=100)] = 2
    id: Annotated[StrictStr, AfterValidator(_watch_id)] | None = None  # default: w1, w2, ...


class WatchConfig(WatchRequest):
    """[[watches]] in streamer.toml: a watch on one stream of the daemon (or of the cluster: its owner asks)."""

    stream: StreamId


class AskRequest(_Strict):
    """`POST /streams/{id}/ask`: a question about the stream's newest window, or the one at media time `at`."""

    question: _Question
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=256)] | None = None
    at: Annotated[float, Field(strict=True, allow_inf_nan=False)] | None = None


class FileConfig(_Strict):
    """streamer.toml as a whole."""

    model: ModelSection = ModelSection()
    speech: SpeechSection = SpeechSection()
    server: ServerSection = ServerSection()
    limits: LimitsSection = LimitsSection()
    streams: list[StreamConfig] = []
    auth: AuthSection = AuthSection()
    sources: SourcesSection = SourcesSection()
    bus: BusSection | None = None  # none: one daemon on its own
    # checked table by table in publish/sinks.py (errors name "[outputs]" / "[[webhooks]] #N")
    outputs: Any = None
    webhooks: Any = None
    watches: list[WatchConfig] = []  # [[watches]]: questions re-asked on a live stream (pipeline/watches.py)


# -- JSON caption APIs --------------------------------------------------------
_TokenLimit = Annotated[StrictInt, Field(ge=1, le=256)]


class _CaptionRequest(_Strict):
    # `max_length` is the seed's name, kept as an alias; `max_new_tokens` is the name everywhere else.
    max_new_tokens: _TokenLimit | None = Field(default=None, validation_alias="max_length")
    question: _Question | None = None  # each window's result then carries `answer` (issue #13)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _one_token_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_length" in data and "max_new_tokens" in data:
            raise ValueError("give max_new_tokens or its older name max_length, not both")
        if isinstance(data, dict) and "max_new_tokens" in data:
            data = {**data, "max_length": data["max_new_tokens"]}
            del data["max_new_tokens"]
        return data


_Base64 = Annotated[StrictStr, Field(min_length=1)]


class CaptionVideoRequest(_CaptionRequest):
    video: _Base64


class CaptionVideosRequest(_CaptionRequest):
    videos: Annotated[list[_Base64], Field(min_length=1)]


class CaptionFramesRequest(_CaptionRequest):
    frames: Annotated[list[_Base64], Field(min_length=1)]


# -- errors ----------------------------------------------------------------------
def describe_error(exc: ValidationError, where: str = "", table: str = "") -> str:
    """One line for the first error, such as `limits.max_batch = '8': Input should be a valid integer`.

    `where` names the thing validated ("stream"), for messages about it as a
    whole; `table` prefixes keys of a config table ("[outputs]")."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    key = f"{table} {loc}" if table else loc
    if err["type"] == "missing":
        return f"{where + ' ' if where else ''}{key}: required"
    if err["type"] == "extra_forbidden":
        if table:
            return f"{table}: unknown key(s) {loc}"
        return f"unknown {where + ' ' if where else ''}field {loc!r}"
    if not loc:  # a check across fields: the message names what it is about
        prefix = table or where
        return f"{prefix}: {msg}" if prefix else msg
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    value = err.get("input")
    if isinstance(value, (dict, list)):
        return f"{key}: {msg}{more}"
    if isinstance(value, str):
        value = _URL_SECRET.sub(r"\1***@", value)  # a redis:// or rtsp:// password never reaches a log
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{key} = {shown}: {msg}{more}"


def validate(model: type[BaseModel], data: Any, where: str = "", table: str = ""):
    """`model.model_validate(data)`, raising ConfigError with one line instead of ValidationError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, where, table)) from None
    except ValueError as exc:  # raised outside a field (e.g. hwaccel check)
        raise ConfigError(f"{table or where}: {exc}".lstrip(": ")) from None
