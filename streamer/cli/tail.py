"""`streamer tail`: print live captions from a running daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from streamer.cli.common import run_async
from streamer.errors import StreamerError
from streamer.security.redact import redact_url

TOKEN_ENV = "STREAMER_TOKEN"


def format_caption_line(message: dict) -> str | None:
    kind = message.get("type")
    if kind == "caption":
        conf = message.get("confidence")
        conf_text = "n/a" if conf is None else f"{conf:.2f}"
        return (
            f"[{message['stream_id']}] {message['start']:9.2f}-{message['end']:<9.2f} "
            f"{message['text']}  (confidence {conf_text}, latency {message['latency']:.2f} s)"
        )
    if kind == "state":
        detail = f": {message['detail']}" if message.get("detail") else ""
        return f"[{message['stream_id']}] state {message['state']}{detail}"
    return None


async def tail(
    url: str, streams: str | None, as_json: bool, limit: int | None = None, changes_only: bool = False,
    *, token: str | None = None, cafile: str | None = None,
) -> None:
    """Print captions until `limit`; reconnects by itself. `token` goes in an Authorization header
    (never in the URL, where proxies and logs would keep it)."""
    import ssl

    import websockets

    query = [f"streams={streams}"] if streams else []
    if not changes_only:
        query.append("all=1")  # a log shows every window, repeats included
    if query:
        url = f"{url}{'&' if '?' in url else '?'}{'&'.join(query)}"
    headers = {"Authorization": f"Bearer {token}"} if token else None
    extra: dict[str, Any] = {"ssl": ssl.create_default_context(cafile=cafile)} if cafile and url.startswith("wss:") else {}
    count = 0
    try:
        # Reconnects by itself on network errors and 5xx; a 4xx ends here (retrying cannot help).
        async for ws in websockets.connect(url, open_timeout=10, additional_headers=headers,
                                           process_exception=_retryable, **extra):
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("type") == "hello":
                        continue
                    line = raw if as_json else format_caption_line(message)
                    if line:
                        print(line, flush=True)
                    if message.get("type") == "caption":
                        count += 1
                        if limit and count >= limit:
                            return
            except websockets.ConnectionClosed as exc:
                print(f"# disconnected ({exc.rcvd.code if exc.rcvd else 'no close frame'}); reconnecting", file=sys.stderr)
                continue
    except websockets.InvalidStatus as exc:
        raise StreamerError(_refusal(redact_url(url), exc.response.status_code, token)) from None
    except websockets.InvalidURI:
        raise StreamerError(f"{redact_url(url)}: not a ws:// or wss:// URL") from None


def _retryable(exc: Exception) -> Exception | None:
    import ssl

    from websockets.client import process_exception

    if isinstance(exc, ssl.SSLError):  # a certificate the client does not trust stays untrusted
        return exc
    return process_exception(exc)


def _refusal(url: str, status: int, token: str | None) -> str:
    if status == 401 and not token:
        return f"{url}: the daemon wants a token (401): pass --token TOKEN or set {TOKEN_ENV}"
    if status == 401:
        return f"{url}: the daemon refused the token (401): check --token / {TOKEN_ENV}"
    if status == 403:
        return f"{url}: refused (403): this token may not read these streams, or the daemon refuses this Origin/Host"
    if status == 429:
        return f"{url}: the daemon has too many WebSocket clients (429); try again later"
    return f"{url}: the daemon answered HTTP {status} instead of opening a WebSocket"


def run_tail(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        run_async(tail(args.url, args.streams, args.json, args.count, args.changes_only, token=token, cafile=args.cafile))
    except OSError as exc:  # ssl.SSLError too
        hint = " (for a self-signed certificate: --cafile CERT.pem)" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else ""
        raise StreamerError(f"{redact_url(args.url)}: {exc}{hint}") from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    tl = sub.add_parser("tail", help="print live captions from a running daemon")
    tl.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/ws")
    tl.add_argument("--streams", help="comma-separated stream ids (default: all)")
    tl.add_argument("--json", action="store_true", help="print raw JSON messages")
    tl.add_argument("--count", type=int, default=None, help="exit after this many captions")
    tl.add_argument("--changes-only", action="store_true", help="skip captions identical to the previous one")
    tl.add_argument("--token", help=f"a viewer (or higher) token, sent as a Bearer header (default: ${TOKEN_ENV})")
    tl.add_argument("--cafile", help="PEM file of the CA (or self-signed certificate) to trust for wss://")
    tl.set_defaults(run=run_tail)
