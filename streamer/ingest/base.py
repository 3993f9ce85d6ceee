"""What every live source is to the pipeline: one `Source` interface (as aiortc has one track
interface), and the state reporting FrameSource and WhipSession share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from streamer.ingest.state import SourceState

__all__ = ["Source", "StateReporter", "OnState"]

OnState = Callable[[str, SourceState, "str | None"], None]

# How loud each state is in the log: a failure or a stall is what an operator looks for.
_LEVELS = {
    SourceState.FAILED: logging.ERROR,
    SourceState.STALLED: logging.WARNING,
    SourceState.LIVE: logging.INFO,
    SourceState.RECONNECTING: logging.INFO,
}


class Source(Protocol):
    """A live source of frames for one stream (FrameSource: pulled with PyAV; WhipSession: pushed over WebRTC)."""

    stream_id: str

    @property
    def state(self) -> SourceState: ...

    @property
    def detail(self) -> str | None: ...

    @property
    def stats(self) -> Any: ...  # SourceStats

    async def close(self) -> None: ...  # idempotent


class StateReporter:
    """State, detail and the `on_state` callback, changed on the event loop only.

    Each change is logged once (level by state) and handed to `on_state`; a
    callback that raises is logged and does not stop the source. Once the
    source is closing, only `_emit` (its owner's last word) changes state."""

    _state: SourceState = SourceState.STOPPED
    _detail: str | None = None
    _closing: bool = False
    _on_state: OnState | None = None
    stream_id: str

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def detail(self) -> str | None:
        """Why the source is in its state (error text, retry schedule); never holds credentials."""
        return self._detail

    def _log_fields(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: SourceState, detail: str | None) -> None:
        if self._closing or (state is self._state and detail == self._detail):
            return
        self._emit(state, detail)

    def _emit(self, state: SourceState, detail: str | None) -> None:
        self._state, self._detail = state, detail
        extra = {"stream": self.stream_id, "state": state.value, "detail": detail, **self._log_fields()}
        logging.getLogger(type(self).__module__).log(_LEVELS.get(state, logging.DEBUG), "source %s", state.value, extra=extra)
        if self._on_state is not None:
            try:
                self._on_state(self.stream_id, state, detail)
            except Exception:
                logging.getLogger(__name__).exception("on_state callback failed", extra={"stream": self.stream_id})
