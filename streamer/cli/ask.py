"""`streamer ask URL STREAM "question"`: ask a running daemon about a live stream (POST /streams/{id}/ask)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import quote

from streamer.cli.common import run_async
from streamer.cli.tail import TOKEN_ENV
from streamer.errors import StreamerError
from streamer.security.redact import redact_url

__all__ = ["add_parser", "ask", "run_ask"]


async def ask(url: str, stream: str, question: str, *, at: float | None = None, max_new_tokens: int | None = None,
              token: str | None = None, cafile: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """The daemon's answer as a dict (stream_id, index, start, end, question, answer, confidence, model).
    Raises StreamerError with the daemon's own error message."""
    import ssl

    import aiohttp

    base = url.rstrip("/")
    if base.startswith(("ws://", "wss://")):  # the URL `streamer tail` takes works too
        base = "http" + base[2:].removesuffix("/ws")
    if not base.startswith(("http://", "https://")):
        raise StreamerError(f"{redact_url(url)}: not an http:// or https:// URL")
    body: dict[str, Any] = {"question": question}
    if at is not None:
        body["at"] = at
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ssl_context: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
    target = f"{base}/streams/{quote(stream, safe='')}/ask"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.post(target, json=body, headers=headers, ssl=ssl_context) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            if resp.status != 200:
                error = data.get("error", {}) if isinstance(data, dict) else {}
                hint = f" (pass --token TOKEN or set {TOKEN_ENV})" if resp.status == 401 and not token else ""
                raise StreamerError(f"{redact_url(base)}: {resp.status} {error.get('code', resp.reason)}: "
                                    f"{error.get('message', 'no answer')}{hint}")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise StreamerError(f"{redact_url(base)}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or "answer" not in data:
        raise StreamerError(f"{redact_url(base)}: the daemon's reply is not an answer")
    return data


def run_ask(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    result: dict[str, Any] = {}

    async def go() -> None:
        result.update(await ask(args.url, args.stream, args.question, at=args.at, max_new_tokens=args.max_new_tokens,
                                token=token, cafile=args.cafile))

    run_async(go())
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["answer"])
        print(f"# stream {result.get('stream_id')} window {result.get('index')} "
              f"({result.get('start')}-{result.get('end')} s), confidence {result.get('confidence')}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a running daemon a question about a live stream")
    p.add_argument("url", help="the daemon, e.g. http://127.0.0.1:8765")
    p.add_argument("stream", help="stream id")
    p.add_argument("question")
    p.add_argument("--at", type=float, default=None, help="media time (seconds) within the stream's history; default: now")
    p.add_argument("--max-new-tokens", type=int, default=None, help="the answer's token limit (1-256)")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.add_argument("--token", help=f"a viewer (or higher) token, sent as a Bearer header (default: ${TOKEN_ENV})")
    p.add_argument("--cafile", help="PEM file of the CA (or self-signed certificate) to trust for https://")
    p.set_defaults(run=run_ask)
