"""Progress for long work: a bar on a terminal, a log line now and then otherwise."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, *, enabled: bool = True, label: str = "", unit: str = "s", log_every: float = 10.0) -> None:
        self.label, self.unit, self.log_every = label, unit, log_every
        self._bar = None
        self._last_log = time.monotonic()
        self._done = 0.0
        self.enabled = enabled
        self._tty = enabled and sys.stderr.isatty()

    def update(self, done: float, total: float | None) -> None:
        if not self.enabled:
            return
        self._done = done
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=round(total, 1) if total else None, unit=self.unit, desc=self.label, leave=False)
            self._bar.n = round(min(done, total) if total else done, 1)
            self._bar.refresh()
        elif time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            log.info("progress", extra={"task": self.label, "done": round(done, 1), "total": total})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
