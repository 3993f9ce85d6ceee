"""Route: GET /streams/{id}/chapters: a stream's chapters (publish/chapters.py), JSON or WebVTT.

`?format=json` (default): a JSON list, oldest first, of the chapters kept for the stream (the last
1000 closed ones, then the open one with `"open": true`; its end is the newest caption's). Each item
has the `chapter` message's fields (docs/protocol.md). `?format=vtt`: the same as a WebVTT chapters
track, for `<track kind="chapters" src="/streams/cam/chapters?format=vtt">`.

The replica that captions a stream keeps its chapters: with stream ownership on the bus, another
replica asks the owner (cluster `ask_owner`, as for thumbnails). A replica that takes a stream over
goes on with the chapters its old owner published (read back from the bus, publish/chapters.py);
while it reads them (under a second for one stream, docs/scale.md) a request waits, up to `_SETTLE` s, then 503
`chapters_restoring`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from streamer.http.common import cluster_of, daemon_of, error_response
from streamer.http.guard import requires
from streamer.pipeline.daemon import StreamNotFound
from streamer.publish.chapters import ChapterSink, chapters_json, chapters_vtt
from streamer.types import Chapter

__all__ = ["CHAPTERS_KEY", "attach", "get_chapters", "owner_handler"]

CHAPTERS_KEY: web.AppKey[ChapterSink] = web.AppKey("chapters", ChapterSink)
_FORMATS = ("json", "vtt")
_FIELDS = ("stream_id", "index", "start", "end", "title")
_SETTLE = 3.0  # seconds a request waits for the chapters of a stream just taken over


def attach(app: web.Application, sink: ChapterSink) -> None:
    """Serve `sink`'s chapters from `app` (before the app starts)."""
    app[CHAPTERS_KEY] = sink


def _listing(sink: ChapterSink, stream_id: str) -> list[dict[str, Any]]:
    return chapters_json(sink.chapters(stream_id), sink.open_chapter(stream_id))


@requires("viewer", stream="id")
async def get_chapters(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    fmt = request.query.get("format", "json")
    if fmt not in _FORMATS:
        return error_response(400, "bad_format", f"format must be one of {', '.join(_FORMATS)}")
    sink = request.app.get(CHAPTERS_KEY)
    daemon = daemon_of(request)
    if stream_id in daemon.streams:
        if sink is None:
            return error_response(404, "no_chapters", "this server keeps no chapters")
        if not await sink.settled(stream_id, _SETTLE):
            return _restoring_response()
        listing = _listing(sink, stream_id)
    else:
        cluster = cluster_of(request)
        if cluster is None:
            return error_response(404, "not_found", f"no stream {stream_id!r}")
        from streamer.cluster import RequestFailed

        try:  # captioned by another replica: its owner has the chapters
            listing = _parse(await cluster.ask_owner(stream_id, "chapters"), stream_id)
        except RequestFailed as exc:
            if exc.code == "chapters_restoring":
                return _restoring_response()
            return error_response(exc.status, exc.code, exc.message)
    headers = {"Cache-Control": "no-store"}
    if fmt == "vtt":
        chapters = [Chapter(**{k: item[k] for k in _FIELDS}) for item in listing]
        return web.Response(text=chapters_vtt(chapters), content_type="text/vtt", charset="utf-8", headers=headers)
    return web.json_response(listing, headers=headers)


def _restoring_response() -> web.Response:
    response = error_response(503, "chapters_restoring", _RESTORING)
    response.headers["Retry-After"] = "1"
    return response


_RESTORING = "the stream was just taken over: its chapters are still being read back from the bus"


def _parse(body: bytes, stream_id: str) -> list[dict[str, Any]]:
    """An owner's answer, checked: from Redis, hostile until proven otherwise."""
    from streamer.cluster import RequestFailed

    try:
        listing = json.loads(body)
        ok = isinstance(listing, list) and all(
            isinstance(item, dict) and item.get("stream_id") == stream_id and isinstance(item.get("index"), int)
            and all(isinstance(item.get(k), (int, float)) and not isinstance(item.get(k), bool) for k in ("start", "end"))
            and isinstance(item.get("title"), str)
            for item in listing)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise RequestFailed(502, "bad_answer", "the stream's owner answered with something that is not a chapter list")
    return listing


def owner_handler(daemon: Any, sink: ChapterSink):
    """The cluster request `chapters`: this replica's chapters of a stream it captions."""

    async def chapters_of(stream_id: str) -> bytes:
        from streamer.cluster import RequestFailed

        try:
            daemon.get(stream_id)
        except StreamNotFound:
            raise RequestFailed(404, "not_found", f"no stream {stream_id!r}") from None
        if not await sink.settled(stream_id, _SETTLE):
            raise RequestFailed(503, "chapters_restoring", _RESTORING)
        return json.dumps(_listing(sink, stream_id)).encode()

    return chapters_of
