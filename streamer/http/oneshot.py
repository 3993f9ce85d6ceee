"""Routes: POST /v1/caption/video, /v1/caption/videos, /v1/caption/frames (base64 in, captions out).

With `question` each result also carries the model's `answer` about that clip (or frame list), its
`answer_confidence` and the `question` as the model read it (issue #13)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import itertools
import math
import time
from typing import Any

import numpy as np
from aiohttp import web

from streamer.config import CaptionFramesRequest, CaptionVideoRequest, CaptionVideosRequest, validate
from streamer.errors import VideoError
from streamer.http.common import CONFIG_KEY, daemon_of, error_response, json_body
from streamer.http.guard import refuse, requires
from streamer.media.decode import iter_frames, scaled_size
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.pipeline.scheduler import EngineFailed, SchedulerBusy
from streamer.types import Frame, Window

_REQUEST_IDS = itertools.count()  # one-off requests get stream ids of their own (feature-cache keys)
INFLIGHT_KEY: web.AppKey[list] = web.AppKey("oneshot_inflight", list)  # [requests in flight]


class TooManyPixels(ValueError):
    """An image or video frame over max_image_pixels (413), found from its header, before decoding."""


def check_pixels(width: int, height: int, short_side: int | None, limit: int, what: str) -> None:
    """Refuse sizes over `limit` pixels, as sent and as the model would resize them: a 1x20000
    image is small, but its shortest side scaled to 224 is 224x4480000."""
    scaled_w, scaled_h = scaled_size(width, height, short_side)
    if short_side and min(width, height) < short_side:  # the engine upscales small images
        factor = short_side / max(min(width, height), 1)
        scaled_w, scaled_h = int(width * factor), int(height * factor)
    if width * height > limit or scaled_w * scaled_h > limit:
        raise TooManyPixels(f"{what}: {width}x{height} is over the limit of {limit} pixels (max_image_pixels)")


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{what} must be a non-empty base64 string")
    if data.startswith("data:") and "," in data:  # data URLs from browsers
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _clip_window(data: bytes, clip_id: str, num_frames: int, short_side: int | None, max_pixels: int) -> Window:
    """One window over a whole clip: num_frames spread evenly over it."""
    try:
        container = open_input_bytes(data)
    except VideoError as exc:
        raise ValueError(f"{clip_id}: {str(exc).split(': ', 1)[-1]}") from None
    try:
        codec = container.streams.video[0].codec_context
        check_pixels(codec.width, codec.height, short_side, max_pixels, "clip")
        frames = list(iter_frames(container, clip_id, short_side=short_side))
    except VideoError as exc:
        raise ValueError(f"{clip_id}: {str(exc).split(': ', 1)[-1]}") from None
    finally:
        container.close()
    span = max(frames[-1].pts - frames[0].pts, 1e-3)
    sampler = WindowSampler(SamplerConfig(window=span, frames=num_frames, hop=span), clip_id)
    windows = [w for f in frames for w in sampler.feed(f)] + sampler.flush()
    return windows[0]


def open_input_bytes(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data))
    except av.error.FFmpegError as exc:
        raise VideoError(f"clip: not a readable video ({getattr(exc, 'strerror', None) or exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("clip: has no video stream")
    return container


async def _caption_clips(request: web.Request, clips: list[bytes], max_length: int | None,
                         question: str | None = None) -> list[dict]:
    daemon = daemon_of(request)
    engine = daemon.engine
    loop = asyncio.get_running_loop()
    windows = []
    request_id = next(_REQUEST_IDS)
    for i, data in enumerate(clips):
        # decoding is blocking work: off the loop
        windows.append(
            await loop.run_in_executor(None, _clip_window, data, f"_clip{request_id}.{i}", engine.num_frames,
                                       daemon.frame_short_side, request.app[CONFIG_KEY].max_image_pixels)
        )
    return await _results(daemon, windows, max_length, question)


async def _results(daemon, windows: list[Window], max_new_tokens: int | None, question: str | None) -> list[dict]:
    """Each window's caption, and with `question` its answer (asked alongside: one engine queue)."""
    if question is None:
        return [_api_caption(c) for c in await daemon.caption_windows(windows, max_new_tokens)]
    captions, *answers = await asyncio.gather(daemon.caption_windows(windows, max_new_tokens),
                                              *(daemon.ask_window(w, question, max_new_tokens) for w in windows))
    return [{**_api_caption(c), "question": a.question, "answer": a.answer,
             "answer_confidence": a.confidence if math.isfinite(a.confidence) else None}
            for c, a in zip(captions, answers)]


def _bounded(handler):
    """At most max_inflight_requests one-shot requests decode and wait at once (429 beyond):
    their decoding shares the thread pool with live work."""

    @functools.wraps(handler)
    async def bounded(request: web.Request) -> web.Response:
        inflight = request.app[INFLIGHT_KEY]
        limit = request.app[CONFIG_KEY].max_inflight_requests
        if inflight[0] >= limit:
            return refuse(request, 429, "max_inflight_requests", f"at the limit of {limit} one-shot requests at once")
        inflight[0] += 1
        try:
            return await handler(request)
        finally:
            inflight[0] -= 1

    return bounded


def _api_caption(c) -> dict:
    return {"caption": c.text, "confidence": c.confidence, "start": c.start, "end": c.end, "model": c.model}


def _request(model, body: Any):
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return validate(model, body)  # ConfigError (a ValueError): one line naming the field


@requires("operator")
@_bounded
async def caption_video(request: web.Request) -> web.Response:
    body = await json_body(request)
    try:
        req = _request(CaptionVideoRequest, body)
        (result,) = await _caption_clips(request, [_b64(req.video, "video")], req.max_new_tokens, req.question)
    except TooManyPixels as exc:
        return refuse(request, 413, "too_many_pixels", str(exc))
    except ValueError as exc:
        return error_response(400, "bad_request", str(exc))
    except SchedulerBusy as exc:
        return error_response(503, "busy", str(exc))
    except EngineFailed as exc:
        return error_response(500, "engine_failed", str(exc))
    return web.json_response(result)


@requires("operator")
@_bounded
async def caption_videos(request: web.Request) -> web.Response:
    body = await json_body(request)
    limit = request.app[CONFIG_KEY].max_clips
    try:
        req = _request(CaptionVideosRequest, body)
        if len(req.videos) > limit:
            raise ValueError(f"at most {limit} videos per request")
        clips = [_b64(v, f"videos[{i}]") for i, v in enumerate(req.videos)]
        results = await _caption_clips(request, clips, req.max_new_tokens, req.question)
    except TooManyPixels as exc:
        return refuse(request, 413, "too_many_pixels", str(exc))
    except ValueError as exc:
        return error_response(400, "bad_request", str(exc))
    except SchedulerBusy as exc:
        return error_response(503, "busy", str(exc))
    except EngineFailed as exc:
        return error_response(500, "engine_failed", str(exc))
    return web.json_response({"results": results})


def _decode_image(data: bytes, what: str, short_side: int | None, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            check_pixels(img.width, img.height, short_side, max_pixels, what)
            return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"{what}: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what} is not a readable image ({exc})") from None


@requires("operator")
@_bounded
async def caption_frames(request: web.Request) -> web.Response:
    body = await json_body(request)
    daemon = daemon_of(request)
    limit = request.app[CONFIG_KEY].max_frames
    try:
        req = _request(CaptionFramesRequest, body)
        if len(req.frames) > limit:
            raise ValueError(f"at most {limit} frames per request")
        loop = asyncio.get_running_loop()
        images = [
            await loop.run_in_executor(None, _decode_image, _b64(f, f"frames[{i}]"), f"frames[{i}]",
                                       daemon.frame_short_side, request.app[CONFIG_KEY].max_image_pixels)
            for i, f in enumerate(req.frames)
        ]
        now, stream_id = time.time(), f"_frames{next(_REQUEST_IDS)}"
        frames = tuple(Frame(stream_id, i, float(i), img, now) for i, img in enumerate(images))
        (result,) = await _results(daemon, [Window(stream_id, 0, frames)], req.max_new_tokens, req.question)
    except TooManyPixels as exc:
        return refuse(request, 413, "too_many_pixels", str(exc))
    except ValueError as exc:
        return error_response(400, "bad_request", str(exc))
    except SchedulerBusy as exc:
        return error_response(503, "busy", str(exc))
    except EngineFailed as exc:
        return error_response(500, "engine_failed", str(exc))
    return web.json_response(result)
