"""Errors users see. Each carries one line that says what went wrong and what was tried."""

from __future__ import annotations

__all__ = ["StreamerError", "VideoError", "ModelLoadError"]


class StreamerError(Exception):
    """Base class: the CLI prints str(error) as one line and exits non-zero."""


class VideoError(StreamerError):
    """A video or stream could not be opened or decoded."""


class ModelLoadError(StreamerError):
    """A model could not be found or loaded."""
