"""Audio from a media file: PyAV decode, resampled to 16 kHz mono float32, with media timestamps.

Blocking code (run it in a thread where an event loop is involved). The
timestamps are the container's, the clock video frames carry
(media/decode.py uses `frame.time` too), so a speech cue and a caption of the
same moment carry the same media time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import av
import numpy as np

from streamer.errors import VideoError
from streamer.speech.vad import SAMPLE_RATE

__all__ = ["AudioChunk", "has_audio", "iter_audio"]

log = logging.getLogger(__name__)

AudioChunk = tuple[np.ndarray, float]  # (float32 mono 16 kHz samples, media time of the first one)


def has_audio(path: str) -> bool:
    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot open ({exc})") from exc


def iter_audio(path: str, *, max_bad_packets: int = 100) -> Iterator[AudioChunk]:
    """The first audio stream of `path` as 16 kHz mono chunks. A file without
    audio yields nothing. Undecodable packets are skipped (logged once, with
    the count at the end); more than `max_bad_packets` of them end the audio."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot open ({exc})") from exc
    with container:
        if not container.streams.audio:
            return
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        next_time: float | None = None  # media time right after the last sample handed out
        bad = 0
        setup: tuple[int, str, str] | None = None  # (rate, layout, sample format) the resampler was set up for

        def emit(frames) -> Iterator[AudioChunk]:
            nonlocal next_time
            for out in frames:
                samples = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                if not len(samples):
                    continue
                start = out.time if out.time is not None else (next_time or 0.0)
                yield samples, float(start)
                next_time = float(start) + len(samples) / SAMPLE_RATE

        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                bad += 1
                if bad == 1:
                    log.warning("audio packet undecodable, skipped", extra={"path": path, "reason": str(exc)[:200]})
                if bad > max_bad_packets:
                    log.warning("too many bad audio packets: audio ends here", extra={"path": path, "bad": bad})
                    return
                continue
            for frame in decoded:
                shape = (frame.sample_rate, frame.layout.name, frame.format.name)
                if setup is not None and shape != setup:
                    # PyAV's resampler would go on converting at the first frame's rate (wrong speed and times)
                    log.warning("audio format changed mid-stream: resampling anew",
                                extra={"path": path, "was": list(setup), "now": list(shape)})
                    yield from emit(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                setup = shape
                yield from emit(resampler.resample(frame))
        yield from emit(resampler.resample(None))
        if bad:
            log.warning("audio packets skipped", extra={"path": path, "bad": bad})
