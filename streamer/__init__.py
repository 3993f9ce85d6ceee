"""streamer: live video in, timestamped captions out.

Heavy pieces (torch, transformers) load only when the engine is used.
"""

from .errors import ModelLoadError, StreamerError, VideoError
from .sampler import SamplerConfig, WindowSampler
from .types import Caption, Frame, Window

__version__ = "0.1.0"

__all__ = [
    "Caption",
    "Frame",
    "ModelLoadError",
    "SamplerConfig",
    "StreamerError",
    "VideoError",
    "Window",
    "WindowSampler",
    "__version__",
]
