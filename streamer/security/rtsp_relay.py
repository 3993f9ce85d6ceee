"""An in-process relay that every `rtsp://` and `rtsps://` source added over HTTP goes through.

FFmpeg follows an RTSP server's `3xx` answer by itself, inside the open call,
and no option turns that off (checked with FFmpeg 8.1: a `302` to 127.0.0.1
made it send `OPTIONS` there). So for untrusted sources the daemon makes the
connection itself: it resolves the camera's name, checks every address with
the NetworkPolicy and connects to a checked IP (never to the name again, so
DNS rebinding cannot swap it); FFmpeg is given `rtsp://[creds@]127.0.0.1:PORT/path?query`
instead, a one-shot loopback port that accepts exactly one client and then
stops listening. Credentials, path and query are kept byte for byte and the
client's bytes are forwarded untouched, so digest authentication still works
(both sides hash the URI in the request line, which FFmpeg wrote).

The server-to-client direction is parsed as FFmpeg parses it (libavformat/rtsp.c
`ff_rtsp_read_reply`, `ff_rtsp_skip_packet`): interleaved frames (`$`, channel,
16-bit length, payload) pass; every message head is read line by line and a
`3xx` status, a `Location` header or a `REDIRECT` request cuts the connection
before its last line reaches FFmpeg. What the parser cannot be sure FFmpeg
reads the same way (a frame inside a head, a frame too short for FFmpeg's
reader, a status that is not three digits, oversized heads or bodies) is cut
too. FFmpeg must use TCP interleaved transport only (`ffmpeg_options`): with
UDP it would send packets to addresses the server names.

A local process that connects to the one-shot port before FFmpeg does (it
would have to guess the port within milliseconds) gets a connection to the
checked camera, which it could reach itself, and FFmpeg's open fails and is
retried.

For `rtsps://` the relay is the TLS client: it connects to the checked IP with
TLS (SNI: the URL's host name) and FFmpeg speaks plain RTSP to the loopback port
(`rtsp://`, same whitelist), so the same parser reads every answer. Certificates
are not verified by default, as FFmpeg's own `tls_verify` (0) does not; with
`[sources] tls_verify = true` they are (system CAs, or `tls_ca_file`), host name
included. A handshake that fails is a refusal ('tls'): a certificate that does
not verify ends the stream, any other TLS failure is retried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import secrets
import ssl
from collections.abc import Callable
from typing import Self
from urllib.parse import urlsplit

from streamer.security.network import NetworkPolicy
from streamer.security.redact import redact_url

__all__ = ["RELAY_PROTOCOLS", "RelayRefused", "RelaySession", "RtspRelay", "ServerStream", "TlsFailed", "TlsRefused",
           "ffmpeg_options", "relay_url", "tls_context", "transport_words"]

log = logging.getLogger(__name__)

# TCP interleaved only: no `udp`/`rtp` (UDP transport sends to addresses the server names),
# no `http` (tunnelling opens further connections), no `tls`.
RELAY_PROTOCOLS = "rtsp,tcp"
# Query words FFmpeg's RTSP demuxer reads as transport options (?udp, ?http...): they would
# add a transport the relay cannot inspect (`?tcp` is harmless).
TRANSPORT_WORDS = frozenset({"udp", "multicast", "http", "https"})

MAX_HEAD = 16 * 1024  # one message head; FFmpeg reads heads without any bound
MAX_BODY = 256 * 1024  # one message body (an SDP is a few KiB)
_LINE = 4095  # FFmpeg keeps the first 4095 bytes of a line (char buf[4096]) and drops the rest
_MIN_FRAME = 8  # ff_rtsp_tcp_read_packet does not skip shorter frames: it reads their payload as text
_CHUNK = 64 * 1024
_STATUS = re.compile(rb"\d{3}")
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def ffmpeg_options() -> dict[str, str]:
    """PyAV options for an `rtsp://` source opened through the relay: TCP interleaved, nothing else."""
    return {
        "protocol_whitelist": RELAY_PROTOCOLS,
        "rtsp_transport": "tcp",  # the only lower transport: FFmpeg never tries UDP or HTTP tunnelling
        "rtsp_flags": "prefer_tcp",  # replaces any other flags (listen: server mode)
    }


def relay_url(url: str, port: int) -> str:
    """`url` as `rtsp://` to 127.0.0.1:`port` (the relay does any TLS); userinfo, path, query kept as written."""
    parts = urlsplit(url)
    start = url.index("://") + 3
    if url[start : start + len(parts.netloc)] != parts.netloc:
        raise ValueError("the URL's authority cannot be located")
    userinfo, at, _ = parts.netloc.rpartition("@")
    return "rtsp://" + (userinfo + at) + f"127.0.0.1:{port}" + url[start + len(parts.netloc) :]


def tls_context(verify: bool = False, ca_file: str | None = None) -> ssl.SSLContext:
    """The relay's TLS client side for rtsps://. Not verifying is FFmpeg's default (`tls_verify` 0);
    `verify` checks the chain (the system's CAs, or only those in `ca_file`) and the URL's host name.
    Raises ValueError when `ca_file` cannot be loaded."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file is None:
        return ssl.create_default_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, host name included
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls_ca_file {ca_file!r} cannot be loaded: {_ssl_reason(exc)}") from None
    return context


def _ssl_reason(exc: OSError) -> str:
    """One readable line for a TLS error ('certificate verify failed: self-signed certificate')."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    text = exc.strerror if isinstance(exc.strerror, str) else str(exc)
    return re.sub(r"^\[[A-Z0-9]+: [A-Z0-9_]+\] | \(_ssl\.c:\d+\)$", "", text) or type(exc).__name__


def transport_words(url: str) -> list[str]:
    """The query words of `url` that FFmpeg would read as RTSP transport options."""
    _, sep, query = url.rpartition("?")  # FFmpeg reads options after the last '?', split at '&'
    return [word for word in query.split("&") if word in TRANSPORT_WORDS] if sep else []


class TlsRefused(ValueError):
    """The camera's certificate did not verify (tls_verify = true): retrying cannot help, so a ValueError."""


class TlsFailed(ConnectionError):
    """Another TLS handshake failure (alert, version, reset): retried like an unreachable camera."""


class RelayRefused(Exception):
    """The server sent something the relay will not pass on; `kind`: 'redirect' or 'protocol'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _strtol_int(text: bytes) -> int:
    """C `(int)strtol(text, NULL, 10)` on LP64, as FFmpeg assigns Content-Length."""
    match = _STRTOL.match(text)
    if match is None:
        return 0
    value = max(-(2**63), min(2**63 - 1, int(match.group(1))))
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _words(line: bytes) -> list[bytes]:
    """The first two words as FFmpeg's get_word splits them (at spaces and tabs)."""
    return re.split(rb"[ \t]+", line.strip(b" \t"), maxsplit=2)[:2]


class ServerStream:
    """The server-to-client byte stream of RTSP over TCP, read as FFmpeg reads it.

    `feed(data)` raises RelayRefused when `data` completes something FFmpeg must
    not see; the caller then drops `data` and cuts the connection. No I/O here.
    """

    def __init__(self) -> None:
        self._skip = 0  # payload or body bytes still to pass
        self._frame: bytearray | None = None  # the 3 bytes after '$' (channel, length) as they come
        self._line = bytearray()  # the current line as FFmpeg stores it ('\r' dropped, 4095 bytes at most)
        self._lines: list[bytes] = []  # completed lines of the current head
        self._head_bytes = 0
        self.messages = 0  # message heads seen

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            if self._frame is not None:
                take = min(3 - len(self._frame), n - i)
                self._frame += data[i : i + take]
                i += take
                if len(self._frame) == 3:
                    length = int.from_bytes(self._frame[1:3], "big")
                    self._frame = None
                    if length < _MIN_FRAME:
                        raise RelayRefused("protocol", f"an interleaved frame of {length} bytes (FFmpeg would read it as RTSP text)")
                    self._skip = length
                continue
            byte = data[i]
            i += 1
            self._head_bytes += 1
            if self._head_bytes > MAX_HEAD:
                raise RelayRefused("protocol", f"an RTSP message head larger than {MAX_HEAD} bytes")
            if byte == 0x0A:  # '\n' ends a line, with or without '\r'
                self._end_line()
            elif byte == 0x24 and not self._line:  # '$' before anything stored on a line: FFmpeg reads a frame
                if self._lines:
                    raise RelayRefused("protocol", "an interleaved frame inside an RTSP message head")
                self._frame = bytearray()
                self._head_bytes = 0
            elif byte != 0x0D and len(self._line) < _LINE:  # FFmpeg drops every '\r' and what overflows
                self._line.append(byte)

    def _end_line(self) -> None:
        line = bytes(self._line).split(b"\0", 1)[0]  # FFmpeg uses it as a C string
        self._line.clear()
        if line:
            self._lines.append(line)
            return
        lines, self._lines = self._lines, []  # an empty line ends the head
        self._head_bytes = 0
        if lines:
            self.messages += 1
            self._skip = self._check(lines)

    @staticmethod
    def _check(lines: list[bytes]) -> int:
        """Refuse a redirecting or unclear head; else the body length FFmpeg will read."""
        words = _words(lines[0])
        if words[0].startswith(b"RTSP/"):  # a reply (strncmp: case-sensitive)
            status = words[1] if len(words) > 1 else b""
            if not _STATUS.fullmatch(status):
                raise RelayRefused("protocol", f"an RTSP status that is not three digits: {status[:20]!r}")
            if status.startswith(b"3"):
                where = next((_location(line) for line in lines[1:] if _is_location(line)), "none")
                raise RelayRefused("redirect", f"RTSP redirect refused: the server answered {status.decode()} (Location {where})")
        elif words[0].upper() == b"REDIRECT":  # a server request (RTSP 1.0 section 10.10)
            raise RelayRefused("redirect", "RTSP redirect refused: the server sent a REDIRECT request")
        length = 0
        for line in lines[1:]:
            if _is_location(line):
                raise RelayRefused("redirect", f"RTSP redirect refused: the server sent a Location header ({_location(line)})")
            if line[:15].lower() == b"content-length:":
                length = _strtol_int(line[15:])  # the last one wins, as in FFmpeg
        if length > MAX_BODY:
            raise RelayRefused("protocol", f"an RTSP body of {length} bytes (more than {MAX_BODY})")
        return max(length, 0)


def _is_location(line: bytes) -> bool:
    # FFmpeg matches "Location:" at the start; anything close to it is refused as well.
    return line.lstrip(b" \t").lower().startswith(b"location")


def _location(line: bytes) -> str:
    """The redirect target for messages: decoded safely, credentials hidden, bounded."""
    value = line.partition(b":")[2].strip(b" \t").decode("latin-1")
    value = "".join(c if c.isprintable() else "?" for c in value)
    return redact_url(value)[:160] or "empty"


class RelaySession:
    """One relayed connection: a checked upstream socket and a one-shot loopback port for FFmpeg.

    `url` is what FFmpeg opens. `refused` is set (before the connection is cut)
    when the server sent something the relay would not pass. `close()` may be
    called from any thread.
    """

    def __init__(self, relay: RtspRelay, url: str, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self._relay = relay
        self._original = url
        self._upstream_reader, self._upstream = upstream
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = relay.loop.create_future()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.url = ""
        self.refused: str | None = None
        self.stray_clients = 0  # connections refused because they were not the first, or not from 127.0.0.1

    async def _listen(self) -> None:
        # backlog 1: the port exists for one client only.
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0, backlog=1, limit=_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = relay_url(self._original, self.port)
        self._task = self._relay.loop.create_task(self._run(), name=f"rtsp-relay:{self.port}")

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._accepted.done() or not peer or peer[0] != "127.0.0.1":
            self.stray_clients += 1
            writer.close()
            return
        if self._server is not None:
            self._server.close()  # one-shot: nothing else on the host can connect to this port now
        self._accepted.set_result((reader, writer))

    def close(self) -> None:
        """End this connection (both sockets, the listening port). Thread-safe, idempotent."""
        try:
            self._relay.loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:
            pass  # the loop is closed: its sockets are gone with it

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        self._cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        client: asyncio.StreamWriter | None = None
        try:
            try:
                async with asyncio.timeout(self._relay.accept_timeout):
                    reader, client = await self._accepted
            except TimeoutError:
                log.info("rtsp relay: FFmpeg never connected", extra={"port": self.port})
                return
            await self._relay_both(reader, client)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a peer went away or stayed silent; FFmpeg sees the connection end
        except asyncio.CancelledError:
            pass  # close(): the source's connection is over, or the daemon stops
        except Exception:
            log.exception("rtsp relay: connection failed")
        finally:
            if self._server is not None:
                self._server.close()
            if not self._accepted.done():
                self._accepted.cancel()
            for writer in (client, self._upstream):
                if writer is not None:
                    writer.close()
            self._relay._sessions.discard(self)

    async def _relay_both(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        scanner = ServerStream()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, check: Callable[[bytes], None] | None) -> None:
            idle = self._relay.idle_timeout
            while True:
                try:
                    async with asyncio.timeout(idle):
                        data = await src.read(_CHUNK)
                except TimeoutError:
                    if loop.time() - last[0] < idle:
                        continue  # the other direction is busy
                    raise
                if not data:
                    return
                last[0] = loop.time()
                if check is not None:
                    check(data)  # raises before any byte of a refused head's last line is written
                dst.write(data)
                await dst.drain()  # bounded: never buffer more than the slower peer takes

        up = asyncio.ensure_future(pump(reader, self._upstream, None))
        down = asyncio.ensure_future(pump(self._upstream_reader, client, scanner.feed))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            results = await asyncio.gather(up, down, return_exceptions=True)
        for result in results:
            if isinstance(result, RelayRefused):
                self.refused = str(result)  # before the sockets close: the decode thread reads it after FFmpeg fails
                self._relay._refuse(result.kind, str(result))
            elif isinstance(result, Exception) and not isinstance(result, (ConnectionError, TimeoutError)):
                raise result


class RtspRelay:
    """Opens relayed RTSP connections (`connect`, from decode threads) and closes them all at shutdown.

    Counters: `connections` (upstream connections made after a destination check) and
    `refused` (connections cut for what the server sent, and rtsps:// handshakes that failed);
    `on_refused(kind, reason)` is called once for each, kind 'redirect', 'protocol' or 'tls'.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        *,
        connect_timeout: float = 10.0,
        accept_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_sessions: int = 256,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.accept_timeout = accept_timeout
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.on_refused = on_refused
        self.connections = 0
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[RelaySession] = set()
        self._closed = False
        self.id = secrets.token_hex(4)  # names this relay in logs

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the RTSP relay is not started")
        return self._loop

    @property
    def sessions(self) -> int:
        """Relayed connections open now."""
        return len(self._sessions)

    @property
    def ports(self) -> tuple[int, ...]:
        """The loopback ports of the relayed connections open now."""
        return tuple(s.port for s in self._sessions)

    async def start(self) -> None:
        if self._loop is not None or self._closed:
            raise RuntimeError("RtspRelay.start() may be called once")
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Close every relayed connection; later connects fail. Idempotent."""
        self._closed = True
        await asyncio.gather(*(s.aclose() for s in list(self._sessions)), return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self, url: str, host: str, port: int, tls: ssl.SSLContext | None = None) -> RelaySession:
        """From a decode thread: check `host`, connect to it, and return the session whose `url` FFmpeg opens.

        `tls`: connect with TLS (rtsps://), SNI and host name check against `host`.
        Raises DestinationRefused or TlsRefused (ValueErrors) when the policy refuses the destination
        or its certificate does not verify, ConnectionError (TlsFailed included) when it cannot be
        reached or the relay is not running.
        """
        try:
            future = asyncio.run_coroutine_threadsafe(self.open(url, host, port, tls), self.loop)
        except RuntimeError:
            raise ConnectionError("the RTSP relay is not running") from None
        try:
            # The coroutine bounds itself (resolve and connect timeouts); this is a backstop.
            return future.result(timeout=2 * self.connect_timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ConnectionError(f"cannot connect to {host}:{port} (the relay did not answer)") from None
        except concurrent.futures.CancelledError:
            raise ConnectionError("the RTSP relay is shutting down") from None

    async def open(self, url: str, host: str, port: int, tls: ssl.SSLContext | None = None) -> RelaySession:
        """`connect` on the loop."""
        if self._closed:
            raise ConnectionError("the RTSP relay is shutting down")
        if len(self._sessions) >= self.max_sessions:
            raise ConnectionError(f"too many relayed RTSP connections ({self.max_sessions})")
        addresses = await self.policy.aresolve(host, port, timeout=self.connect_timeout)
        upstream = await self._connect(host, port, addresses, tls)
        self.connections += 1
        session = RelaySession(self, url, upstream)
        try:
            await session._listen()
        except BaseException:
            upstream[1].close()
            raise
        self._sessions.add(session)
        return session

    async def _connect(
        self, host: str, port: int, addresses: list[str], tls: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        errors: list[str] = []
        tls_errors: list[str] = []
        unverified = False
        for address in addresses:  # every one was checked; connect to the IP, never to the name again
            try:
                async with asyncio.timeout(self.connect_timeout):  # TCP and TLS handshake together
                    if tls is None:
                        return await asyncio.open_connection(address, port, limit=_CHUNK)
                    # SNI and the certificate's name check use the URL's host, never the address.
                    return await asyncio.open_connection(address, port, limit=_CHUNK, ssl=tls, server_hostname=host)
            except TimeoutError:
                errors.append(f"{address}: no {'TLS ' if tls else ''}answer within {self.connect_timeout:g} s")
            except ssl.SSLError as exc:
                unverified = unverified or isinstance(exc, ssl.SSLCertVerificationError)
                tls_errors.append(_ssl_reason(exc) if address == host else f"{address}: {_ssl_reason(exc)}")
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
        if tls_errors:
            message = f"TLS to camera failed: {host}:{port}: {'; '.join(tls_errors + errors)}"
            self._refuse("tls", message)
            raise (TlsRefused if unverified else TlsFailed)(message)
        raise ConnectionError(f"cannot connect to {host}:{port} ({'; '.join(errors)})")

    def _refuse(self, kind: str, reason: str) -> None:
        self.refused += 1
        log.warning("rtsp relay refused", extra={"kind": kind, "reason": reason})
        if self.on_refused is not None:
            try:
                self.on_refused(kind, reason)
            except Exception:
                log.exception("rtsp relay: on_refused callback failed")

