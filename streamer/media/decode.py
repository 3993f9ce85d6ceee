"""Decoding with PyAV: a container in, Frames (RGB, media-time pts) out.

Blocking code: callers run it in a thread (offline captioning does so
directly; live ingest runs one decode thread per source).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import av
import av.container
import numpy as np

from streamer.errors import VideoError
from streamer.types import Frame

__all__ = ["check_hwaccel", "hardware_decoding", "open_input", "iter_frames", "video_duration", "probe_media_span", "scaled_size", "describe"]

log = logging.getLogger(__name__)

# A named pipe with no writer blocks FFmpeg's open() (and a silent one its read()) in a system call
# that no timeout or interrupt reaches: the first data must come within this (or `timeout`'s open part).
PIPE_OPEN_TIMEOUT = 10.0
_PIPE_TICK = 0.2  # how often a wait on a pipe looks at `cancelled`


def open_input(
    url: str,
    *,
    format: str | None = None,
    options: Mapping[str, str] | None = None,
    timeout: float | tuple[float, float] | None = None,
    hwaccel: str | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> av.container.InputContainer:
    """Open a file, device or network URL that has a video stream, or raise VideoError.

    `hwaccel` ("cuda" for NVDEC, "vaapi", ...) decodes on that device where
    FFmpeg can open it, else in software (said once in the log). A FIFO or
    character device (not a camera opened with `format`) is read here, not by
    FFmpeg: its open waits at most PIPE_OPEN_TIMEOUT for data, and every wait
    ends early once `cancelled()` is true (then reads see end of input).
    """
    is_url = "://" in url or format is not None
    if not is_url and not os.path.exists(url):
        raise VideoError(f"{url}: no such file")
    if not is_url and os.path.isdir(url):
        raise VideoError(f"{url}: is a directory, not a video file")
    target: str | _Pipe = url
    if not is_url and _is_pipe(url):
        wait = (timeout[0] if isinstance(timeout, tuple) else timeout) or PIPE_OPEN_TIMEOUT
        target = _Pipe.open(url, wait, cancelled)
    try:
        try:
            extra = {"hwaccel": _hwaccel(hwaccel)} if hwaccel and hardware_decoding(hwaccel) else {}
            container = av.open(target, format=format, options=dict(options or {}), timeout=timeout, **extra)
        except av.error.EOFError as exc:
            raise VideoError(f"{url}: is empty (no video frames)") from exc
        except av.error.FFmpegError as exc:
            raise VideoError(f"{url}: cannot open ({_ffmpeg_reason(exc)})") from exc
        except OSError as exc:  # PyAV maps some failures onto the builtin OSError family
            raise VideoError(f"{url}: cannot open ({exc.strerror or exc})") from exc
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            container.close()
            raise VideoError(f"{url}: has no video stream (contains {', '.join(kinds)})")
    except BaseException:
        if isinstance(target, _Pipe):
            target.close()  # now, not when the traceback lets go of it
        raise
    return container


def _is_pipe(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


class _Pipe:
    """A FIFO or character device, read for FFmpeg through PyAV's file-object I/O.

    Opened O_NONBLOCK (never waits for a writer) and polled in ticks, so a decode
    thread neither hangs in open() until a writer appears nor in read() while it is
    silent, and leaves promptly once `cancelled()`. The fd closes with the object,
    which the container holds (PyAV never calls close() on a file object).
    """

    def __init__(self, path: str, fd: int, cancelled: Callable[[], bool] | None) -> None:
        self.name = path
        self._fd: int | None = fd
        self._cancelled = cancelled
        self._poll = select.poll()  # not select(): a busy daemon's fds may pass FD_SETSIZE
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(cls, path: str, wait: float, cancelled: Callable[[], bool] | None) -> _Pipe:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise VideoError(f"{path}: cannot open ({exc.strerror or exc})") from exc
        pipe = cls(path, fd, cancelled)
        # Linux: no POLLIN/POLLHUP until a writer has written, or come and gone.
        if not pipe._wait(time.monotonic() + wait):
            pipe.close()
            if cancelled is not None and cancelled():
                raise VideoError(f"{path}: stopped while waiting for a writer")
            raise VideoError(f"{path}: cannot open (a pipe or device with no data within {wait:g} s: is anything writing to it?)")
        return pipe

    def _wait(self, deadline: float | None) -> bool:
        """True once there is data or end of input; False when cancelled or at the deadline."""
        while self._fd is not None and not (self._cancelled is not None and self._cancelled()):
            tick = _PIPE_TICK if deadline is None else min(_PIPE_TICK, deadline - time.monotonic())
            if tick <= 0:
                return False
            if self._poll.poll(tick * 1000):
                return True
        return False

    def read(self, size: int) -> bytes:
        while self._wait(None) and self._fd is not None:
            try:
                return os.read(self._fd, size)  # b"": every writer has gone, end of input
            except BlockingIOError:  # another reader of the same FIFO took the data
                continue
        self.close()
        return b""  # cancelled: FFmpeg sees end of input and the decode loop winds down

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def check_hwaccel(device_type: str) -> str:
    """The name if FFmpeg knows such a device type (cuda, vaapi, qsv, ...), else ValueError."""
    from av.codec.hwaccel import HWDeviceType

    known = [m.name for m in HWDeviceType if m.name != "none"]
    if device_type not in known:
        raise ValueError(f"hwaccel {device_type!r}: expected one of {', '.join(known)}")
    return device_type


@functools.cache
def hardware_decoding(device_type: str) -> bool:
    """Whether FFmpeg can open a `device_type` decoding device here (probed once)."""
    try:
        _hwaccel(device_type).create(av.Codec("h264", "r"))
        return True
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        log.warning("hardware decoding unavailable: decoding in software",
                    extra={"hwaccel": device_type, "reason": str(exc)})
        return False


def _hwaccel(device_type: str):
    from av.codec.hwaccel import HWAccel

    # frames come back to host memory: the engine wants RGB arrays; codecs the
    # device cannot decode fall back to software inside FFmpeg
    return HWAccel(device_type=device_type, allow_software_fallback=True)


def _ffmpeg_reason(exc: av.error.FFmpegError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Size with the shorter side at most `short_side`, aspect kept; never upscales.

    Same arithmetic as transformers' shortest-edge resize (long side floored),
    so frames scaled here need no second resize in the engine.
    """
    if not short_side or min(width, height) <= short_side:
        return width, height
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def iter_frames(
    container: av.container.InputContainer,
    stream_id: str,
    *,
    short_side: int | None = None,
    first_seq: int = 0,
    pts_offset: float = 0.0,
) -> Iterator[Frame]:
    """Decode the first video stream into Frames.

    `short_side` downscales early (swscale bilinear) so a 1080p source costs
    what the model needs, not 6 MB a frame. Frames whose timestamp goes
    backwards are dropped: pts stay strictly increasing. A stream that breaks
    part-way (truncated file) ends with a warning after the frames that did
    decode; a stream that yields no frame at all raises VideoError.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads in the codec
    rate = float(stream.average_rate or stream.guessed_rate or 30)
    seq = first_seq
    last_pts: float | None = None
    try:
        for av_frame in container.decode(stream):
            pts = av_frame.time
            if pts is None:  # some live demuxers omit it on the first frames
                pts = (last_pts + 1.0 / rate) if last_pts is not None else 0.0
            pts += pts_offset
            if last_pts is not None and pts <= last_pts:
                continue
            yield Frame(stream_id, seq, pts, to_rgb(av_frame, short_side), time.time())
            seq += 1
            last_pts = pts
    except av.error.FFmpegError as exc:
        if seq == first_seq:
            raise VideoError(f"{container.name}: cannot decode video ({_ffmpeg_reason(exc)})") from exc
        log.warning(
            "video ended early",
            extra={"source": container.name, "frames": seq - first_seq, "reason": _ffmpeg_reason(exc)},
        )
    if seq == first_seq:
        raise VideoError(f"{container.name}: contains no decodable video frames")


def video_duration(container: av.container.InputContainer) -> float | None:
    """Media duration of the first video stream in seconds, from metadata, if known."""
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def probe_media_span(url: str) -> tuple[float, float] | None:
    """(first pts, last pts + duration) of the video stream, by demuxing without decoding."""
    container = open_input(url)
    try:
        stream = container.streams.video[0]
        first: float | None = None
        end: float | None = None
        for packet in container.demux(stream):
            if packet.pts is None or packet.time_base is None:
                continue
            t = float(packet.pts * packet.time_base)
            dur = float(packet.duration * packet.time_base) if packet.duration else 0.0
            first = t if first is None else min(first, t)
            end = t + dur if end is None else max(end, t + dur)
    except av.error.FFmpegError:
        pass  # a truncated tail: the span up to the break is what decodes
    finally:
        container.close()
    if first is None or end is None:
        return None
    return first, end


def describe(container: av.container.InputContainer) -> dict[str, Any]:
    stream = container.streams.video[0]
    return {
        "codec": stream.codec_context.name,
        "width": stream.codec_context.width,
        "height": stream.codec_context.height,
        "rate": float(stream.average_rate) if stream.average_rate else None,
    }


def to_rgb(av_frame: av.VideoFrame, short_side: int | None) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, scaled (bilinear) so its short side is `short_side`
    (the model's input size: less to copy and preprocess), contiguous for torch."""
    width, height = scaled_size(av_frame.width, av_frame.height, short_side)
    image = av_frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BILINEAR")
    return np.ascontiguousarray(image)
