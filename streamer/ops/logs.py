"""Structured, quiet-by-default logging: one `key=value` line per event on stderr."""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={json.dumps(value, default=str)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(verbosity: int = 0) -> None:
    """0: warnings and errors only; 1: info; 2+: debug. Libraries stay at warning."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("streamer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # transformers and huggingface_hub are chatty about progress bars and retries
    for name in ("transformers", "huggingface_hub", "httpx", "aioice", "aiortc", "websockets", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.ERROR if verbosity < 2 else logging.INFO)
