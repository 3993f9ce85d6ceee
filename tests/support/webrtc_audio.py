"""A real WebRTC publisher with sound (aiortc): NumberedTrack video and a microphone that plays a
16 kHz track in real time (aiortc encodes it as Opus, as OBS and browsers send it)."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from streamer.speech.vad import SAMPLE_RATE
from tests.support.webrtc import AiortcPublisher

__all__ = ["AiortcAvPublisher", "PlayedTrack"]

PTIME = 0.02  # seconds per audio frame, as browsers send


class PlayedTrack(MediaStreamTrack):
    """Plays `samples` (16 kHz float32) in 20 ms frames at wall-clock pace, then silence.
    `started` is the wall time of its first sample (when the peer first asked for audio)."""

    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self.samples = np.clip(samples, -1, 1)
        self.started: float | None = None
        self._sent = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        step = int(PTIME * SAMPLE_RATE)
        if self.started is None:
            self.started = time.time()
        else:
            await asyncio.sleep(max(0.0, self.started + self._sent / SAMPLE_RATE - time.time()))
        piece = self.samples[self._sent : self._sent + step]
        piece = np.pad(piece, (0, step - len(piece)))
        frame = av.AudioFrame.from_ndarray((piece * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._sent += step
        return frame


class AiortcAvPublisher(AiortcPublisher):
    """AiortcPublisher (NumberedTrack video) with a PlayedTrack microphone beside it."""

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self.microphone = PlayedTrack(samples)
        self.pc.addTransceiver(self.microphone, direction="sendonly")
