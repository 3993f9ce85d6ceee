"""Credentials out of source URLs, and out of text that may echo them.

Source URLs reach POST responses, GET /streams, WebSocket state messages, logs
and FFmpeg's error text. An RFC 3986 parser (urlsplit) ends the authority at
the first raw `/`, `?` or `#`, so a password holding one of them lands in the
path, query or fragment and is shown. Here the userinfo ends at the LAST `@`
of the URL instead, which can swallow more than the userinfo, never less.
Where that `@` comes after a `/?#`, it may instead sit in a path, query or
fragment (?email=a@b&token=T): then what follows it is shown only if it looks
like a host and a standard parse would hide nothing there either.
Over-redaction is the price; leaking is not an option.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

__all__ = ["MASK", "UNPARSEABLE", "redact_text", "redact_url", "url_secrets"]

MASK = "***"
UNPARSEABLE = "<unparseable url>"

# Searched, not matched at the start: FFmpeg wrappers (cache:, async:, concat:) put a URL after a prefix.
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*)://")
_RTMP = frozenset({"rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpte", "rtmpts"})
# A "user name" holding one of these is really a path, a query or a mangled password: hide it all.
_NOT_A_USER = re.compile(r"[/?#@\s]")
_DELIMITERS = re.compile(r"[/?#]")
# What may follow the userinfo: a name (IDN letters too), an IPv4 address or [IPv6], an optional port.
_HOST = re.compile(r"(?:\[[^\]/?#@\s]*\]|[\w.~%-]*)(?::\d*)?(?=[/?#]|$)")
# Query keys, lowercased without `-_.` and spaces (X-Amz-Signature -> xamzsignature), whose values are secrets.
_SECRET_KEYS = frozenset({"pass", "pw", "key", "sig", "psk", "hash", "hmac", "hdnts", "hdnea"})
_SECRET_PARTS = (
    *("passw", "passphrase", "pwd", "secret", "token", "signature", "credential", "session"),
    *("auth", "jwt", "streamid", "playpath", "ticket"),
)
_SECRET_SUFFIXES = ("key", "sig")  # apikey, streamkey, accesskey; not pbkeylen (SRT key length)
# librtmp options that never hold a credential (playpath, token, conn, tcUrl and any other word may).
_PLAIN_RTMP_OPTIONS = frozenset(
    {
        *("app", "pageurl", "swfurl", "flashver", "live", "subscribe", "playlist", "swfvfy", "swfage", "swfhash"),
        *("swfsize", "start", "stop", "buffer", "timeout"),
    }
)
_SECRET_RTMP_OPTIONS = frozenset({"playpath", "token", "conn", "tcurl", "jtv", "weeb", "socks"})
# Nested scans (a userinfo that swallowed a path, an encoded URL in a value) go no deeper than this.
_MAX_DEPTH = 4
# The shortest secret that redact_text replaces wherever it appears: shorter ones are common words and digits.
MIN_SECRET = 3


def redact_url(url: str) -> str:
    """The URL with every credential replaced by `***`. Non-URLs come back unchanged; never raises."""
    try:
        out = _scan(url, [])
        # A secret that is also a host or path word (password "cam" at host "cam") would still show.
        for secret in url_secrets(url):
            out = out.replace(secret, MASK)
        return out
    except Exception:  # noqa: BLE001 - a redactor that raises would leak the URL in the traceback instead
        return UNPARSEABLE


def url_secrets(url: str) -> list[str]:
    """The secret substrings of `url`, raw and percent-decoded, at least MIN_SECRET long, longest first."""
    try:
        found: list[str] = []
        _scan(url, found)
    except Exception:  # noqa: BLE001 - same reason; redact_url then answers UNPARSEABLE
        return []
    variants = {v for s in found for v in (s, unquote(s), unquote_plus(s))}
    # All-asterisk strings would match the mask itself.
    usable = [s for s in variants if len(s) >= MIN_SECRET and s.strip("*")]
    return sorted(usable, key=lambda s: (-len(s), s))


def redact_text(text: str, url: str) -> str:
    """`text` (an FFmpeg error, a log line) with `url` (raw or decoded) and every secret in it masked."""
    try:
        safe = redact_url(url)
        if url:
            for form in sorted({url, unquote(url), unquote_plus(url)}, key=len, reverse=True):
                if form != safe:
                    text = text.replace(form, safe)
        for secret in url_secrets(url):  # FFmpeg also echoes pieces: a decoded password, a stream key
            text = text.replace(secret, MASK)
        return text
    except Exception:  # noqa: BLE001 - the text may hold the URL: drop it rather than raise
        return "<redacted>"


def _scan(url: str, secrets: list[str], *, standard: bool = False, depth: int = 0) -> str:
    """The redacted URL; appends each raw secret it hides to `secrets`.

    `standard`: parse as RFC 3986 does (the authority ends at the first `/?#`);
    used only to test the LAST-@ reading. `depth` bounds the nested scans.
    """
    match = _SCHEME.search(url)
    if match is None:
        return url  # file path, /dev/video0, lavfi: graph
    scheme = match.group(1).lower()
    head, rest = url[: match.end()], url[match.end() :]
    userinfo = ""
    at = rest.rfind("@", 0, _first(rest, "/?#") if standard else len(rest))
    if at >= 0:
        userinfo = _userinfo(head, rest[:at], secrets, depth)
        if (
            not standard
            and _DELIMITERS.search(rest[:at])
            and not (_HOST.match(rest, at + 1) and _plain_tail(url, match.end() + at, secrets, depth))
        ):
            # This @ may be in a path, query or fragment (?email=a@b&token=T, ?token=ab@cd): hide all after it too.
            secrets.append(rest[at + 1 :])
            return f"{head}{userinfo}{MASK}"
        rest = rest[at + 1 :]
    options = ""
    if scheme in _RTMP and (space := re.search(r"\s", rest)):
        # librtmp form: "rtmp://host/app playpath=KEY token=T live=1".
        rest, options = rest[: space.start()], _options(rest[space.start() :], secrets)
    host_end = _first(rest, "/?#")
    host, rest = rest[:host_end], rest[host_end:]
    path_end = _first(rest, "?#")
    path, rest = rest[:path_end], rest[path_end:]
    if scheme in _RTMP and "/" in path[1:]:
        # rtmp://host/app[/instance]/KEY[?more key]: all after the app is the stream key (Facebook's has a query).
        app, key = path[1:].split("/", 1)
        if key or rest:
            secrets.extend(s for s in (key + rest, key, key.rsplit("/", 1)[-1]) if s)
            return f"{head}{userinfo}{host}/{app}/{MASK}{options}"
    if rest.startswith("?"):
        rest = "?" + _query(rest[1:], secrets, depth)
    elif standard and rest and not path:
        # Right after the authority a `#` may be a password's (admin:p#ss@cam): read it as parameters.
        rest = "#" + _query(rest[1:], secrets, depth)
    elif len(rest) > 1:  # a fragment: never needed to open a stream, may hold a token
        secrets.append(rest[1:])
        rest = "#" + MASK
    return f"{head}{userinfo}{host}{path}{rest}{options}"


def _userinfo(head: str, userinfo: str, secrets: list[str], depth: int) -> str:
    if not userinfo:
        return "@"  # udp://@239.0.0.1:1234 names a multicast group to join: no credentials
    if _DELIMITERS.search(userinfo) and depth < _MAX_DEPTH:
        # Possibly a swallowed path or query: list its own secrets too, for redact_text (all of it is masked anyway).
        _scan(head + userinfo, secrets, depth=depth + 1)
    user, _, password = userinfo.partition(":")
    if password and not _NOT_A_USER.search(user):  # "TOKEN:@host" is a bare token too
        secrets.append(password)
        return f"{user}:{MASK}@"
    secrets.append(userinfo)  # a bare userinfo is usually a token (https://TOKEN@host)
    if password:
        secrets.append(password)
    return f"{MASK}@"


def _query(query: str, secrets: list[str], depth: int) -> str:
    """The query with secret values masked; other parameters kept byte for byte."""
    pieces = query.split("&")
    out: list[str] = []
    hiding = False
    for n, piece in enumerate(pieces):
        if hiding and "=" not in piece:
            # A piece without "=" after a secret is most likely the rest of it (a raw & in the secret).
            if piece:
                secrets.append(piece)
            out.append(MASK if piece else piece)
            continue
        hiding = False
        start = 0
        while True:
            # `;` separates parameters too, `?` starts a nested query, `#` a fragment.
            end = _first(piece, ";?#", start)
            key, eq, value = piece[start:end].partition("=")
            if eq and (_is_secret_key(key) or _hides_url(value, secrets, depth)):
                # The secret runs to the end of the piece. A `#` opening it is SRT's (streamid=#!::r=live);
                # a later one may start a fragment, so then all that follows is hidden too.
                begin = start + len(key) + 1
                in_fragment = piece.find("#", begin + 1) >= 0
                secret = "&".join([piece[begin:], *pieces[n + 1 :]]) if in_fragment else piece[begin:]
                if secret:
                    secrets.append(secret)
                out.append(piece[:begin] + (MASK if secret else ""))
                if in_fragment:
                    return "&".join(out)
                hiding = True
                break
            if end == len(piece):
                out.append(piece)
                break
            if piece[end] == "#":
                fragment = "&".join([piece[end + 1 :], *pieces[n + 1 :]])
                if fragment:
                    secrets.append(fragment)
                out.append(piece[: end + 1] + (MASK if fragment else ""))
                return "&".join(out)
            start = end + 1
    return "&".join(out)


def _plain_tail(url: str, at: int, secrets: list[str], depth: int) -> bool:
    """Whether a standard parse, which ends the authority before url[at] (an @), shows all after it as it is.

    If it hides anything there, what follows this @ is no plain host and path.
    """
    # A character the URL lacks marks the @, so that it can be found in the output.
    mark = next(c for c in map(chr, range(0xE000, 0xF900)) if c not in url)
    found: list[str] = []
    out = _scan(url[:at] + mark + url[at + 1 :], found, standard=True, depth=depth + 1)
    if out.partition(mark)[2] == url[at + 1 :]:
        return True
    secrets.extend(secret.replace(mark, "@") for secret in found)
    return False


def _options(options: str, secrets: list[str]) -> str:
    """librtmp options: only words `name=value` with a name known to hold no secret are shown."""
    words = re.split(r"(\s+)", options)
    for i, word in enumerate(words):
        if not word or word.isspace():
            continue
        key, eq, value = word.partition("=")
        if not (eq and key.lower() in _PLAIN_RTMP_OPTIONS):
            # A space inside a query value lands here too: an unknown word may be any secret.
            named = bool(eq) and key.lower() in _SECRET_RTMP_OPTIONS
            secrets.append(value if named else word)
            words[i] = f"{key}={MASK}" if named else MASK
    return "".join(words)


def _is_secret_key(raw: str) -> bool:
    key = re.sub(r"[\s._\-]", "", unquote_plus(raw)).lower()
    return key in _SECRET_KEYS or key.endswith(_SECRET_SUFFIXES) or any(part in key for part in _SECRET_PARTS)


def _hides_url(value: str, secrets: list[str], depth: int) -> bool:
    """Whether an encoded URL as a value (?next=rtsp%3A%2F%2Fu%3Ap%40h) carries credentials of its own."""
    decoded = unquote_plus(value)
    if "://" not in decoded or decoded == value:
        return False  # a raw nested URL is parsed in place: its `?` and `@` are seen by the outer scan
    if depth >= _MAX_DEPTH:
        return True  # URLs nested this deep are an attack, not a camera: hide the value
    inner: list[str] = []
    _scan(decoded, inner, depth=depth + 1)
    secrets.extend(inner)
    return bool(inner)


def _first(text: str, chars: str, start: int = 0) -> int:
    """Index of the first of `chars` in text[start:], or len(text)."""
    hits = [i for c in chars if (i := text.find(c, start)) >= 0]
    return min(hits, default=len(text))
