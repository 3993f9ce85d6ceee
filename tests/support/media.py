"""Synthetic test videos, encoded for real with PyAV (libx264 by default)."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def moving_square(n: int, width: int = 160, height: int = 120, seed: int = 0) -> list[np.ndarray]:
    """A coloured square sliding across a gradient: every frame differs."""
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    base[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    side = max(8, height // 4)
    frames = []
    for i in range(n):
        img = base.copy()
        x = int((i * 3) % max(1, width - side))
        y = (height - side) // 2
        img[y : y + side, x : x + side] = colour
        frames.append(img)
    return frames


def solid_frames(n: int, rgb: tuple[int, int, int], width: int = 160, height: int = 120) -> list[np.ndarray]:
    img = np.empty((height, width, 3), np.uint8)
    img[...] = rgb
    return [img.copy() for _ in range(n)]


def write_video(
    path: str | Path,
    frames: Sequence[np.ndarray],
    *,
    fps: int = 30,
    times: Sequence[float] | None = None,
    codec: str = "libx264",
    audio: bool = False,
) -> Path:
    """Encode RGB frames. `times` (seconds, increasing) gives each frame's pts:
    use it for variable frame rate and for files that do not start at 0."""
    path = Path(path)
    tb = Fraction(1, 90000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        h, w = frames[0].shape[:2]
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = tb
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        astream = out.add_stream("aac", rate=16000) if audio else None
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            t = times[i] if times is not None else i / fps
            frame.pts = round(t / tb)
            frame.time_base = tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            _write_tone(out, astream, seconds=len(frames) / fps)
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    path = Path(path)
    with av.open(str(path), "w") as out:
        astream = out.add_stream("aac", rate=16000)
        _write_tone(out, astream, seconds)
    return path


def _write_tone(out, astream, seconds: float) -> None:
    rate = 16000
    samples = (np.sin(np.arange(int(rate * seconds)) * 2 * np.pi * 440 / rate) * 0.2).astype(np.float32)
    chunk = 1024
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk][None, :]
        af = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
        af.sample_rate = rate
        af.pts = start
        for packet in astream.encode(af):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def truncate(src: str | Path, dst: str | Path, fraction: float) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)
