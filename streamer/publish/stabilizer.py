"""Caption stabilizer: which caption an overlay shows, so that it does not flicker.

Sans-I/O, like the sampler and the protocol: no clock, no task, no network.
`Hysteresis` is the generic rule (a value must hold `hold` updates in a row
to replace the current one, or beat it at once by `margin` in score); it
knows nothing of captions, so an on/off watch ("is there a person?", issue
#13) or a chapter marker can reuse it with booleans or labels.
`CaptionStabilizer` applies it to one stream's captions (stream keys
`stabilize`, `stabilize_windows`, `stabilize_margin`) and says, for each
caption, whether it is the shown one. The full stream of captions is still
published; only the `shown` flag (docs/protocol.md) follows the rule.
"""

from __future__ import annotations

import math
from typing import Generic, Literal, TypeVar

from streamer.types import Caption

__all__ = ["STABILIZE_MODES", "CaptionStabilizer", "Hysteresis", "StabilizeMode"]

T = TypeVar("T")

StabilizeMode = Literal["off", "hold"]
STABILIZE_MODES: tuple[str, ...] = ("off", "hold")


class Hysteresis(Generic[T]):
    """The current value of a noisy sequence, changed only when a new value earns it.

    `update(value, score)` feeds one observation and returns the current value
    afterwards. The first value becomes current at once (nothing to keep).
    A value other than the current one replaces it when

    - it has been observed `hold` times in a row (any other observation, the
      current value included, starts its count again), or
    - `margin` is set and its score is at least `margin` above the current
      value's latest score (a confident change need not wait), or
    - `patience` is set and the current value has not been observed for
      `patience` updates in a row: the newest value takes over, so a sequence
      whose values rarely repeat (free-text captions of a real model) cannot
      freeze the current one for ever.

    `hold=1` and no margin follow the input exactly. Scores are whatever the
    caller ranks by (a caption's mean log-probability); a missing or
    non-finite score never wins by margin.
    """

    def __init__(self, hold: int = 1, margin: float | None = None, patience: int | None = None) -> None:
        if isinstance(hold, bool) or not isinstance(hold, int) or hold < 1:
            raise ValueError(f"hold must be an integer >= 1, got {hold!r}")
        if margin is not None and not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"margin must be a finite number >= 0 or None, got {margin!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be an integer >= 1 or None, got {patience!r}")
        self.hold = hold
        self.margin = margin
        self.patience = patience
        self._absent = 0  # updates in a row without the current value
        self._current: T | None = None
        self._has_current = False
        self._current_score: float | None = None
        self._challenger: T | None = None
        self._count = 0  # observations of the challenger in a row
        self.changed = False  # the last update replaced the current value

    @property
    def current(self) -> T | None:
        """The current value; None before the first update."""
        return self._current

    @property
    def challenger(self) -> tuple[T, int] | None:
        """The value trying to replace the current one and how many times in a row it was seen."""
        return (self._challenger, self._count) if self._count else None  # type: ignore[return-value]

    def update(self, value: T, score: float | None = None) -> T:
        score = score if score is not None and math.isfinite(score) else None
        self.changed = False
        if not self._has_current or value == self._current:
            if not self._has_current:
                self.changed = True
            self._set(value, score)
            return value
        self._absent += 1
        if self._count and value == self._challenger:
            self._count += 1
        else:
            self._challenger, self._count = value, 1
        wins_by_margin = (self.margin is not None and score is not None and self._current_score is not None
                          and score - self._current_score >= self.margin)
        stale = self.patience is not None and self._absent >= self.patience
        if self._count >= self.hold or wins_by_margin or stale:
            self.changed = True
            self._set(value, score)
        return self._current  # type: ignore[return-value]  # set: this is not the first update

    def reset(self) -> None:
        """Forget everything: the next value becomes current at once."""
        self._current, self._has_current, self._current_score = None, False, None
        self._challenger, self._count, self._absent = None, 0, 0
        self.changed = False

    def _set(self, value: T, score: float | None) -> None:
        self._current, self._has_current, self._current_score = value, True, score
        self._challenger, self._count, self._absent = None, 0, 0


class CaptionStabilizer:
    """One stream's shown caption: `offer(caption)` returns True when that caption is the shown one.

    mode "off": every caption is shown as it comes. mode "hold": a caption
    whose text differs from the shown one is shown only once that text has
    come `windows` times in a row, or its confidence beats the shown text's
    latest confidence by `margin` (None: never by margin), or the shown text
    has not come for `patience` windows in a row (default `windows + 1`: a
    model whose captions seldom repeat word for word still moves the overlay
    on, the newest caption taking over). Captions that repeat the shown text
    are shown (they confirm it). Costs about (windows - 1) x hop of delay at
    a real change; buys an overlay that does not change on one odd window.
    """

    def __init__(self, mode: str = "off", windows: int = 2, margin: float | None = None,
                 patience: int | None | Literal["auto"] = "auto") -> None:
        if mode not in STABILIZE_MODES:
            raise ValueError(f"stabilize must be one of {', '.join(STABILIZE_MODES)}, got {mode!r}")
        self.mode = mode
        self.windows = windows
        self.margin = margin
        self.patience = windows + 1 if patience == "auto" else patience
        if mode == "hold":
            self._rule: Hysteresis[str] = Hysteresis(windows, margin, self.patience)
        else:
            self._rule = Hysteresis(1)
        self.held_back = 0  # captions not shown so far (counted for metrics and tests)

    @classmethod
    def for_stream(cls, config: object) -> CaptionStabilizer:
        """From a StreamConfig's `stabilize`, `stabilize_windows`, `stabilize_margin` (defaults where absent)."""
        return cls(getattr(config, "stabilize", "off"), getattr(config, "stabilize_windows", 2),
                   getattr(config, "stabilize_margin", None))

    @property
    def shown_text(self) -> str | None:
        return self._rule.current

    def offer(self, caption: Caption) -> bool:
        shown = self._rule.update(caption.text, caption.confidence) == caption.text
        if not shown:
            self.held_back += 1
        return shown

    def reset(self) -> None:
        """The stream's timeline broke (removed and added again): start afresh."""
        self._rule.reset()
