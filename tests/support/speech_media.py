"""Test media with sound: espeak-ng narration placed at known times, muxed with H.264 by PyAV.

Audio and video are written interleaved in time order (as a camera's or an encoder's output is),
so a file played as live delivers each second's sound with that second's frames.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from streamer.speech.vad import SAMPLE_RATE
from tests.support.media import moving_square

__all__ = ["espeak_missing", "narration", "speak", "tone", "write_av", "write_rate_change_ts", "write_unknown_audio_codec"]


def espeak_missing() -> str | None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: apt-get install espeak-ng sox (deploy/apt-packages.txt)"
    return None


def speak(text: str, voice: str) -> np.ndarray:
    """`text` in `voice`, the words only (espeak-ng pads with its own silence), 16 kHz float32."""
    from streamer.training.speech import synthesize

    audio = synthesize(text, voice, 160, 50)
    voiced = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[voiced[0] : voiced[-1] + 1]


def narration(seconds: float, lines: Sequence[tuple[float, str, str]], *, level: float = 0.5,
              noise: float = 0.003, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """A `seconds` long 16 kHz track with each (start, text, voice) spoken at its start, over a quiet
    room's noise. Returns the track and where each line's words are: (start, end, text)."""
    track = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    placed = []
    for start, text, voice in lines:
        words = level * speak(text, voice)
        i = int(start * SAMPLE_RATE)
        track[i : i + len(words)] += words[: len(track) - i]
        placed.append((start, start + len(words) / SAMPLE_RATE, text))
    track += noise * np.random.default_rng(seed).standard_normal(len(track)).astype(np.float32)
    return track, placed


def tone(seconds: float, hz: float = 440.0, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_av(path: str | Path, seconds: float, track: np.ndarray | None, *, fps: int = 15, width: int = 128,
             height: int = 96, audio_codec: str = "aac", audio_rate: int = 44100, corrupt_every: int = 0,
             video_start: float = 0.0, audio_start: float = 0.0, fmt: str | None = None, seed: int = 0) -> Path:
    """H.264 frames (a moving square) and `track` (16 kHz float32, None: no audio stream) encoded as
    `audio_codec` at `audio_rate`, interleaved. `corrupt_every`: every n-th audio packet's payload
    is replaced with random bytes (as a damaged file or a lossy link delivers it)."""
    path = Path(path)
    frames = moving_square(int(seconds * fps), width, height, seed=seed)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(fps)}
        audio = None
        pieces: list[av.AudioFrame] = []
        if track is not None:
            audio = out.add_stream(audio_codec, rate=audio_rate)
            audio.layout = "mono"
            src = av.AudioFrame.from_ndarray(track.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
            src.sample_rate, src.pts, src.time_base = SAMPLE_RATE, 0, Fraction(1, SAMPLE_RATE)
            fmt_name = audio.codec_context.codec.audio_formats[0].name
            size = audio.codec_context.frame_size or 1024
            resampler = av.AudioResampler(format=fmt_name, layout="mono", rate=audio_rate, frame_size=size)
            pieces = resampler.resample(src) + resampler.resample(None)
        packets_out = 0

        def mux_audio(packets) -> None:
            nonlocal packets_out
            for packet in packets:
                packets_out += 1
                if corrupt_every and packets_out % corrupt_every == 0:
                    bad = av.Packet(rng.integers(0, 256, max(8, packet.size), dtype=np.uint8).tobytes())
                    bad.pts, bad.dts, bad.duration, bad.time_base = packet.pts, packet.dts, packet.duration, packet.time_base
                    bad.stream = packet.stream
                    packet = bad
                out.mux(packet)

        start_offset = round(audio_start * audio_rate)
        next_piece = 0
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = round(video_start * fps) + i  # 1/fps: each muxer picks its own time base from it
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                out.mux(packet)
            while audio is not None and next_piece < len(pieces) and pieces[next_piece].pts <= (i + 1) / fps * audio_rate:
                piece = pieces[next_piece]
                piece.pts = piece.pts + start_offset
                mux_audio(audio.encode(piece))
                next_piece += 1
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            for piece in pieces[next_piece:]:
                piece.pts = piece.pts + start_offset
                mux_audio(audio.encode(piece))
            mux_audio(audio.encode())
    return path


def write_rate_change_ts(path: str | Path, track: np.ndarray, *, fps: int = 15, first_rate: int = 48000,
                         second_rate: int = 16000) -> Path:
    """MPEG-TS whose audio (MP2) changes sample rate halfway while the video and the clock go on: two
    recordings joined, as a broadcast switching programmes. `track` is 16 kHz float32."""
    path = Path(path)
    seconds = len(track) / SAMPLE_RATE
    half = seconds / 2
    parts = []
    for n, (rate, start) in enumerate(((first_rate, 0.0), (second_rate, half))):
        part = path.with_name(f"{path.stem}.part{n}.ts")
        samples = track[int(start * SAMPLE_RATE) : int((start + half) * SAMPLE_RATE)]
        write_av(part, half, samples, fps=fps, audio_codec="mp2", audio_rate=rate, video_start=start,
                 audio_start=start, fmt="mpegts", seed=n)
        parts.append(part.read_bytes())
        part.unlink()
    path.write_bytes(b"".join(parts))
    return path


def write_unknown_audio_codec(path: str | Path, seconds: float, *, fps: int = 15) -> Path:
    """Matroska with H.264 video and an audio track in a codec FFmpeg does not know (a PCM track
    whose codec id is renamed): the demuxer sees an audio stream it cannot decode."""
    path = Path(path)
    raw = path.with_suffix(".tmp.mkv")
    write_av(raw, seconds, np.zeros(int(seconds * SAMPLE_RATE), np.float32), fps=fps, audio_codec="pcm_s16le",
             audio_rate=SAMPLE_RATE, fmt="matroska")
    data = raw.read_bytes()
    raw.unlink()
    assert data.count(b"A_PCM/INT/LIT") == 1
    path.write_bytes(data.replace(b"A_PCM/INT/LIT", b"A_ZZZ/INT/LIT"))  # same length: the file stays valid
    return path
