"""Live ingest: sources (RTSP, files as live, devices, lavfi, network URLs) and WHIP."""

from .source import FrameSource, SourceKind, SourceSpec, SourceSpecError, SourceStats, detect_kind, redact_url
from .state import Backoff, SourceState
from .whip import WhipError, WhipSession

__all__ = [
    "Backoff",
    "FrameSource",
    "SourceKind",
    "SourceSpec",
    "SourceSpecError",
    "SourceState",
    "SourceStats",
    "WhipError",
    "WhipSession",
    "detect_kind",
    "redact_url",
]
