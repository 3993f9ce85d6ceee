"""Voice activity: 16 kHz mono chunks with media timestamps in, utterance segments out.

Sans-I/O and pure numpy: a file reader, a live audio ring or a test feeds
`VoiceActivitySegmenter.feed(samples, pts, arrival)` and gets back the
utterances that closed. Silence costs nothing downstream: only segments reach
the speech model.

A 20 ms frame counts as voiced when its speech-band (100-4000 Hz) energy is
well above an adaptive noise floor (and above an absolute floor) and its
spectrum is not a single line: a pure tone or a steady hum has most of its
energy in a few FFT bins, voice never does. An utterance starts after
`min_speech` of voiced frames (short clicks never do), ends after
`min_silence` without voice, and is cut at `max_utterance` (the model's
window); each segment carries `pre_roll` / `post_roll` of audio around it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SpeechSegment", "VadConfig", "VoiceActivitySegmenter"]

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class VadConfig:
    frame_ms: int = 20
    margin_db: float = 8.0  # above the noise floor to start an utterance (half of it keeps one going)
    min_level_db: float = -55.0  # dBFS of the speech band: quieter is silence whatever the floor
    max_tonality: float = 0.85  # share of a frame's band energy in its strongest line (+-1 bin)
    min_speech: float = 0.2  # seconds of voiced frames before an utterance starts
    min_silence: float = 0.45  # seconds without voice that end an utterance
    pre_roll: float = 0.2
    post_roll: float = 0.2
    max_utterance: float = 5.0  # seconds of voice; longer speech is cut into pieces this long
    min_voiced_share: float = 0.3  # an utterance whose frames are mostly unvoiced is dropped (a burst of noise)

    def __post_init__(self) -> None:
        if not 5 <= self.frame_ms <= 50:
            raise ValueError(f"frame_ms: expected 5..50, got {self.frame_ms}")
        if not (self.min_speech > 0 and self.min_silence > 0 and self.max_utterance > self.min_speech):
            raise ValueError("vad: need min_speech > 0, min_silence > 0, max_utterance > min_speech")


@dataclass(frozen=True, eq=False)
class SpeechSegment:
    """One utterance: its audio (with the pre/post roll) and where it sits in media time."""

    stream_id: str
    index: int  # per-stream counter
    start: float  # media time of the first voiced frame, seconds
    end: float  # media time where voice ended, seconds
    audio: np.ndarray = field(repr=False)  # float32 16 kHz mono, start - pre_roll .. end + post_roll
    capture_time: float = 0.0  # wall clock: the chunk holding the last voiced frame arrived


class VoiceActivitySegmenter:
    """Feed chunks in media order; get closed utterances back. Not thread-safe (one per stream)."""

    def __init__(self, stream_id: str, config: VadConfig | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"sample_rate: the segmenter takes {SAMPLE_RATE} Hz audio, got {sample_rate}")
        self.stream_id = stream_id
        self.config = config or VadConfig()
        self._frame = SAMPLE_RATE * self.config.frame_ms // 1000
        self._frame_s = self._frame / SAMPLE_RATE
        self._window = np.hanning(self._frame).astype(np.float32)
        freqs = np.fft.rfftfreq(self._frame, 1 / SAMPLE_RATE)
        self._band = (freqs >= 100) & (freqs <= 4000)
        self._pending = np.zeros(0, np.float32)  # samples not yet a whole frame
        self._pending_pts: float | None = None  # media time of _pending[0]
        self._floor_db: float | None = None
        self._history: deque[np.ndarray] = deque()  # recent frames, for the pre-roll
        self._history_max = max(1, round((self.config.pre_roll + self.config.min_speech) / self._frame_s) + 1)
        self._index = 0
        # current utterance
        self._frames: list[np.ndarray] = []
        self._start: float | None = None  # media time of the utterance's first voiced frame
        self._first_pts: float = 0.0  # media time of _frames[0]
        self._last_voiced: float = 0.0  # media end of the last voiced frame
        self._last_voiced_arrival = 0.0
        self._voiced = 0
        self._silent_run = 0
        self._onset: deque[bool] = deque(maxlen=max(1, round(self.config.min_speech / self._frame_s)))

    @property
    def in_utterance(self) -> bool:
        return self._start is not None

    def feed(self, samples: np.ndarray, pts: float, arrival: float = 0.0) -> list[SpeechSegment]:
        """Take a chunk (float32 in -1..1) whose first sample is at media time `pts`."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._pending_pts is None or len(self._pending) == 0:
            self._pending_pts = pts
            self._pending = samples
        else:
            expected = self._pending_pts + len(self._pending) / SAMPLE_RATE
            if abs(pts - expected) > 0.1:  # a jump in the timeline (seek, reconnect): restart framing there
                closed = self.flush()
                self._pending_pts, self._pending = pts, samples
                return closed + self._run(arrival)
            self._pending = np.concatenate([self._pending, samples])
        return self._run(arrival)

    def flush(self) -> list[SpeechSegment]:
        """End of input: close the open utterance, if any."""
        closed = self._close() if self.in_utterance else None
        out = [closed] if closed is not None else []
        self._pending = np.zeros(0, np.float32)
        self._pending_pts = None
        self._history.clear()
        self._onset.clear()
        return out

    # ---- internals ----

    def _run(self, arrival: float) -> list[SpeechSegment]:
        n = len(self._pending) // self._frame
        if n == 0:
            return []
        assert self._pending_pts is not None
        frames = self._pending[: n * self._frame].reshape(n, self._frame)
        base = self._pending_pts
        self._pending = self._pending[n * self._frame :]
        self._pending_pts = base + n * self._frame_s
        above, tonal = self._classify(frames)
        out: list[SpeechSegment] = []
        hold = self.config.margin_db / 2  # hysteresis: inside an utterance, quieter voice keeps it going
        for i in range(n):
            voiced = bool(above[i] > (hold if self.in_utterance else self.config.margin_db) and not tonal[i])
            seg = self._step(frames[i], voiced, base + i * self._frame_s, arrival)
            if seg is not None:
                out.append(seg)
        return out

    def _classify(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per frame: dB above the noise floor (-inf below the absolute floor) and whether it is a single line."""
        spectrum = np.abs(np.fft.rfft(frames * self._window, axis=1)) ** 2
        band = spectrum[:, self._band]
        energy = band.sum(axis=1) + 1e-12
        # dBFS-ish: a full-scale sine in the band reads about 0
        level_db = 10 * np.log10(energy / (self._window**2).sum() / (self._frame / 2) + 1e-12)
        peak = np.argmax(band, axis=1)
        padded = np.pad(band, ((0, 0), (1, 1)))
        rows = np.arange(len(band))
        line = padded[rows, peak] + padded[rows, peak + 1] + padded[rows, peak + 2]
        tonal = line / energy > self.config.max_tonality
        above = np.full(len(frames), -np.inf)
        for i, db in enumerate(level_db):
            floor = self._floor_db if self._floor_db is not None else db
            if db > self.config.min_level_db:
                above[i] = db - floor
            # The floor follows quiet frames fast and loud ones slowly (a steady noise
            # becomes the floor in seconds; speech never does: it pauses).
            if self._floor_db is None:
                self._floor_db = float(db)
            elif db < self._floor_db:
                self._floor_db = float(0.7 * self._floor_db + 0.3 * db)
            else:
                self._floor_db = float(self._floor_db + min(db - self._floor_db, 0.05))
        return above, tonal

    def _step(self, frame: np.ndarray, voiced: bool, pts: float, arrival: float) -> SpeechSegment | None:
        cfg = self.config
        if not self.in_utterance:
            self._history.append(frame)
            if len(self._history) > self._history_max:
                self._history.popleft()
            self._onset.append(voiced)
            if voiced and sum(self._onset) >= max(1, int(0.6 * self._onset.maxlen)):  # type: ignore[operator]
                # Voice for most of the last `min_speech`: an utterance began where that run began.
                run = len(self._onset)
                first_voiced = next(i for i, v in enumerate(self._onset) if v)
                roll = round(cfg.pre_roll / self._frame_s)
                keep = min(len(self._history), run - first_voiced + roll)
                self._frames = list(self._history)[-keep:]
                self._first_pts = pts - (keep - 1) * self._frame_s
                self._start = pts - (run - 1 - first_voiced) * self._frame_s
                self._voiced = sum(self._onset)
                self._silent_run = 0
                self._last_voiced, self._last_voiced_arrival = pts + self._frame_s, arrival
                self._history.clear()
                self._onset.clear()
            return None
        self._frames.append(frame)
        if voiced:
            self._voiced += 1
            self._silent_run = 0
            self._last_voiced, self._last_voiced_arrival = pts + self._frame_s, arrival
        else:
            self._silent_run += 1
        assert self._start is not None
        if self._silent_run * self._frame_s >= cfg.min_silence:
            return self._close()
        if self._last_voiced - self._start >= cfg.max_utterance:
            return self._close(cut=True)
        return None

    def _close(self, cut: bool = False) -> SpeechSegment | None:
        cfg = self.config
        assert self._start is not None
        post = round(cfg.post_roll / self._frame_s)
        voiced_end = round((self._last_voiced - self._first_pts) / self._frame_s)
        frames = self._frames[: voiced_end + (0 if cut else post)]
        audio = np.concatenate(frames) if frames else np.zeros(0, np.float32)
        span = max(self._last_voiced - self._start, 1e-6)
        segment = None
        if self._voiced * self._frame_s >= cfg.min_voiced_share * span:
            segment = SpeechSegment(self.stream_id, self._index, round(self._start, 3), round(self._last_voiced, 3),
                                    audio, self._last_voiced_arrival)
            self._index += 1
        tail = self._frames[voiced_end:] if not cut else []
        self._frames, self._start, self._voiced, self._silent_run = [], None, 0, 0
        self._history.clear()
        self._history.extend(tail[-self._history_max :])
        return segment
