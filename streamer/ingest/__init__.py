"""Live ingest: sources (RTSP, files as live, devices, lavfi, network URLs) and WHIP,
both behind one `Source` interface."""

from streamer.ingest.base import Source
from streamer.ingest.source import (
    FrameSource,
    SourceKind,
    SourceSpec,
    SourceSpecError,
    SourceStats,
    detect_kind,
    redact_url,
)
from streamer.ingest.state import Backoff, SourceState
from streamer.ingest.whip import WhipError, WhipSession

__all__ = [
    "Backoff",
    "FrameSource",
    "Source",
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
