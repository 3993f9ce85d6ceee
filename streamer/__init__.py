"""streamer: live video in, timestamped captions out.

Heavy pieces (torch, transformers) load only when the engine is used.
"""

from streamer.errors import ModelLoadError, StreamerError, VideoError
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.types import Caption, Frame, Window

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
