"""Encoding with PyAV: RGB frames (and a mono sound track) in, an H.264 MP4 out.

For the videos the project makes itself (the synthetic world's clips, the live
evaluation's streams, the demo, test media). Blocking; the frames are in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["AAC_RATE", "write_h264"]

AAC_RATE = 44100  # the sound track's rate in the file: what players and browsers expect of AAC
_TIME_BASE = Fraction(1, 90000)  # MPEG's clock: exact for every common frame rate


def write_h264(
    path: str | Path,
    frames: Sequence[np.ndarray],
    fps: int,
    *,
    crf: int | None = None,
    bitrate: int | None = None,
    gop: int | None = None,
    bframes: int | None = None,
    preset: str = "veryfast",
    tune: str | None = "zerolatency",
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
) -> str:
    """RGB `frames` (all one size) as H.264 (libx264, yuv420p) at `fps`, frame i at i/fps s.

    `crf`: constant quality; `bitrate` (bit/s): rate-limited as a camera sends it (maxrate =
    bitrate, a one-second buffer); `gop`: a keyframe every `gop` frames; `bframes`: at most this
    many B-frames in a row (zerolatency has none already). None leaves libx264's default.
    `audio`: mono float32 at `audio_rate` Hz (the speech stage's 16 kHz), written as AAC at
    44.1 kHz after the video. Returns `path` as a string."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        options: dict[str, object] = {"preset": preset}  # PyAV passes each as a string
        if tune is not None:
            options["tune"] = tune
        if crf is not None:
            options["crf"] = str(crf)
        if bframes is not None:
            options["bf"] = str(bframes)
        if gop is not None:
            options["g"] = str(gop)
        if bitrate is not None:
            video.bit_rate = bitrate
            options["maxrate"] = options["bufsize"] = str(bitrate)
        video.options = options
        video.time_base = _TIME_BASE
        # added before the first packet is muxed: the container's header names every stream
        sound = out.add_stream("aac", rate=AAC_RATE) if audio is not None else None
        if sound is not None:
            sound.layout = "mono"
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = round(i / fps / _TIME_BASE), _TIME_BASE
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None and audio is not None:
            track = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32).reshape(1, -1), format="flt",
                                               layout="mono")
            track.sample_rate, track.pts = audio_rate, 0
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=AAC_RATE)
            for piece in resampler.resample(track) + resampler.resample(None):
                for packet in sound.encode(piece):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return str(path)
