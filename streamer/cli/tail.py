"""`streamer tail`: print live captions from a running daemon."""

from __future__ import annotations

import argparse
import json
import sys

from streamer.cli.common import run_async
from streamer.errors import StreamerError


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


async def tail(url: str, streams: str | None, as_json: bool, limit: int | None = None, changes_only: bool = False) -> None:
    import websockets

    query = [f"streams={streams}"] if streams else []
    if not changes_only:
        query.append("all=1")  # a log shows every window, repeats included
    if query:
        url = f"{url}{'&' if '?' in url else '?'}{'&'.join(query)}"
    count = 0
    async for ws in websockets.connect(url, open_timeout=10):  # reconnects by itself
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


def run_tail(args: argparse.Namespace) -> int:
    try:
        run_async(tail(args.url, args.streams, args.json, args.count, args.changes_only))
    except OSError as exc:
        raise StreamerError(f"{args.url}: {exc}") from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    tl = sub.add_parser("tail", help="print live captions from a running daemon")
    tl.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/ws")
    tl.add_argument("--streams", help="comma-separated stream ids (default: all)")
    tl.add_argument("--json", action="store_true", help="print raw JSON messages")
    tl.add_argument("--count", type=int, default=None, help="exit after this many captions")
    tl.add_argument("--changes-only", action="store_true", help="skip captions identical to the previous one")
    tl.set_defaults(run=run_tail)
