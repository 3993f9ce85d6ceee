"""Speech: voice-activity segments of 16 kHz audio, transcribed by a Whisper checkpoint.

`vad.py` is pure numpy (no torch): sources and tests import it freely. The
engine (`streamer.speech.engine`) imports torch and transformers: import it
where speech is actually on.
"""

from pathlib import Path

__all__ = ["BUNDLED_SPEECH_MODEL", "BUNDLED_SPEECH_MODEL_NAME", "DEFAULT_SPEECH_MODEL"]

DEFAULT_SPEECH_MODEL = "openai/whisper-small"

# A tiny Whisper trained on espeak-ng speech of the synthetic world (streamer/training/speech.py),
# shipped in the package: used when no speech model is named and DEFAULT_SPEECH_MODEL is neither
# cached nor reachable. Its README.md says what it knows and how well.
BUNDLED_SPEECH_MODEL = Path(__file__).parent.parent / "models" / "world-whisper"
BUNDLED_SPEECH_MODEL_NAME = "streamer/world-whisper"
