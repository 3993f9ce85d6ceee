"""What a source added over HTTP may open.

Sources named in streamer.toml or on the command line are the operator's and
trusted. A URL that arrives over HTTP is not: by default it may only be a
network URL (rtsp, rtsps, http(s), srt; udp if allowed) to an address the
network policy allows, or a regular file under a configured media directory.
No `lavfi:` graphs (they read and write files), no devices, no listen modes.
Each allowed URL is opened with an FFmpeg `protocol_whitelist` for its scheme,
so a playlist or SDP cannot pull in `file:`, `concat:` or another protocol.
http(s) goes through the egress proxy and rtsp(s) through the RTSP relay, which
check every connection FFmpeg makes (redirects included) and connect to the
checked address themselves (the relay speaks TLS to rtsps:// cameras itself).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from streamer.security.network import NetworkPolicy
from streamer.security.redact import redact_url

if TYPE_CHECKING:
    import ssl

    from streamer.security.rtsp_relay import RelaySession, RtspRelay

__all__ = ["SourceRefused", "SourcePolicy", "CheckedSource", "PROTOCOLS"]

# FFmpeg protocols each scheme needs, and no more.
PROTOCOLS = {
    "rtsp": "rtsp,rtp,srtp,udp,tcp",
    "rtsps": "rtsp,rtsps,rtp,srtp,udp,tcp,tls",
    "http": "http,https,tls,tcp,httpproxy,crypto",
    "https": "http,https,tls,tcp,httpproxy,crypto",
    "srt": "srt",
    "udp": "udp,rtp",
    "file": "file",
}
_ENCODE = " (percent-encode '/', '?', '#' and '@' in user names and passwords)"
# Query options that turn a client protocol into a server (FFmpeg reads them from the URL).
_LISTEN_OPTIONS = {"listen", "mode", "listen_timeout"}


class SourceRefused(ValueError):
    """A URL the source policy does not allow over HTTP; str() says why in one line."""


@dataclass(frozen=True)
class CheckedSource:
    """A URL the policy allowed: what to open and how."""

    url: str
    ffmpeg_options: dict[str, str]
    # Run in the decode thread before every (re)connect: resolves the host again and checks
    # every address, so a name that later resolves to loopback is refused then.
    check_destination: Callable[[], None] | None = None
    # rtsp:// and rtsps:// only: run in the decode thread for every (re)connect instead of the check above;
    # checks and connects to the destination itself and returns what FFmpeg opens (a loopback relay).
    relay: Callable[[], RelaySession] | None = None


@dataclass(frozen=True)
class SourcePolicy:
    schemes: frozenset[str] = frozenset({"rtsp", "rtsps", "http", "https", "srt"})
    media_dirs: tuple[str, ...] = ()
    # Fail closed: the default checks destinations; None (no checks) only where a caller says so.
    network: NetworkPolicy | None = field(default_factory=NetworkPolicy)
    # The egress proxy's URL once serve() started it (set once, at startup); http(s) need it.
    _proxy: list[str] = field(default_factory=list, compare=False, repr=False)
    # The RTSP relay once serve() started it; rtsp:// needs it (FFmpeg follows RTSP redirects itself).
    _relay: list[RtspRelay] = field(default_factory=list, compare=False, repr=False)
    # rtsps:// (the relay is the TLS client): verify the camera's certificate and name? False is
    # FFmpeg's own default (tls_verify 0). tls_ca_file: the CAs to trust instead of the system's.
    tls_verify: bool = False
    tls_ca_file: str | None = None
    _tls: list[ssl.SSLContext] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tls_ca_file is not None and not self.tls_verify:
            raise ValueError("tls_ca_file is only used with tls_verify = true")
        if self.tls_ca_file is not None:
            from streamer.security.rtsp_relay import tls_context

            self._tls[:] = [tls_context(True, self.tls_ca_file)]  # a bad file fails at startup, not per stream

    def _tls_context(self) -> ssl.SSLContext:
        if not self._tls:  # built once, when the first rtsps:// source needs it
            from streamer.security.rtsp_relay import tls_context

            self._tls[:] = [tls_context(self.tls_verify, self.tls_ca_file)]
        return self._tls[0]

    def attach_proxy(self, url: str) -> None:
        self._proxy[:] = [url]

    def attach_relay(self, relay: RtspRelay) -> None:
        self._relay[:] = [relay]

    @property
    def relay(self) -> RtspRelay | None:
        """The RTSP relay rtsp:// sources go through, once serve() started it."""
        return self._relay[0] if self._relay else None

    def check(self, url: str) -> CheckedSource:
        if not isinstance(url, str) or not url.strip():
            raise SourceRefused("a pulled stream needs a 'url'")
        if any(ord(c) < 0x20 or c == "\x7f" for c in url):
            raise SourceRefused("the url contains control characters")
        if "://" not in url:
            return self._file(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            # Not the parser's message: it quotes the "port" or "host" it found, which may be
            # a piece of a password holding a raw '/', '?' or '#' (rtsp://u:p#ss@cam).
            raise SourceRefused(f"{redact_url(url)}: malformed URL: the host or port cannot be parsed{_ENCODE}") from None
        scheme = parts.scheme.lower()
        if scheme == "file":
            return self._file(parts.path)
        if scheme not in self.schemes:
            allowed = ", ".join(sorted(self.schemes)) or "none"
            raise SourceRefused(f"{scheme!r} URLs may not be added over HTTP (allowed: {allowed}; "
                                "the operator can name other sources in streamer.toml)")
        if not parts.hostname:
            raise SourceRefused(f"{redact_url(url)}: no host")
        if parts.hostname.lower() not in redact_url(url).lower():
            # The host found here is part of what redaction hides (rtsp://tok#en@cam/s: host 'tok'): the
            # URL means two things, and the host would reach messages and logs. Refuse, without naming it.
            raise SourceRefused(f"{redact_url(url)}: the host cannot be told apart from the credentials{_ENCODE}")
        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() in _LISTEN_OPTIONS:
                raise SourceRefused(f"{redact_url(url)}: option {key!r} (server/listen modes) is not allowed over HTTP")
        if scheme == "udp" and parts.hostname in ("", "0.0.0.0", "::"):
            raise SourceRefused("udp sources must name the sender's address")
        options = {"protocol_whitelist": PROTOCOLS[scheme]}
        check: Callable[[], None] | None = None
        if self.network is not None:
            host, default_port = parts.hostname, {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}.get(scheme, 0)
            network = self.network
            try:
                network.resolve(host, port or default_port)  # refused now, with a clear 4xx, not later in a thread
            except ValueError as exc:
                raise SourceRefused(str(exc)) from None

            def check_again() -> None:
                network.resolve(host, port or default_port)

            check = check_again

            if scheme in ("http", "https"):
                proxy = self._proxy[0] if self._proxy else None
                if proxy is None:
                    raise SourceRefused("http(s) sources are not available: the egress proxy is not running")
                from streamer.security.egress import ffmpeg_options

                try:
                    options = ffmpeg_options(proxy)
                except RuntimeError as exc:  # no_proxy in the environment would let FFmpeg go around the proxy
                    raise SourceRefused(f"http(s) sources are not available: {exc}") from None
                check = None  # the proxy checks every connection FFmpeg makes, redirects included
            elif scheme in ("rtsp", "rtsps"):
                return self._relayed(url, host, port or default_port, scheme)
        return CheckedSource(url, options, check)

    def _relayed(self, url: str, host: str, port: int, scheme: str) -> CheckedSource:
        """rtsp(s):// through the relay: the daemon connects (with TLS for rtsps), checks what the server
        answers, refuses redirects; FFmpeg speaks plain RTSP to the relay."""
        relay = self._relay[0] if self._relay else None
        if relay is None:
            raise SourceRefused(f"{scheme} sources are not available: the RTSP relay is not running")
        tls = self._tls_context() if scheme == "rtsps" else None
        from streamer.security.rtsp_relay import ffmpeg_options, transport_words

        words = transport_words(url)
        if words:
            raise SourceRefused(f"{redact_url(url)}: FFmpeg transport option {words[0]!r} is not allowed over HTTP "
                                "(sources added over HTTP use RTSP over TCP)")

        def connect() -> RelaySession:
            return relay.connect(url, host, port, tls)

        return CheckedSource(url, ffmpeg_options(), relay=connect)

    def _file(self, path: str) -> CheckedSource:
        if path.startswith("lavfi:"):
            raise SourceRefused("lavfi: graphs may not be added over HTTP (they can read and write files)")
        if path.startswith(("/dev/", "avfoundation:", "dshow:")):
            raise SourceRefused("devices may not be added over HTTP")
        if not self.media_dirs:
            raise SourceRefused("local files may not be added over HTTP (no [sources] media_dirs configured)")
        real = os.path.realpath(path)  # follows symlinks and '..': what would really be opened
        for root in self.media_dirs:
            root_real = os.path.realpath(root)
            if os.path.commonpath([real, root_real]) == root_real:
                break
        else:
            raise SourceRefused(f"{os.path.basename(path) or path}: not under a configured media directory")
        try:
            info = os.stat(real)
        except OSError:
            raise SourceRefused(f"{os.path.basename(path)}: no such file in the media directories") from None
        if not stat.S_ISREG(info.st_mode):
            raise SourceRefused(f"{os.path.basename(path)}: not a regular file")
        return CheckedSource(real, {"protocol_whitelist": PROTOCOLS["file"]})
