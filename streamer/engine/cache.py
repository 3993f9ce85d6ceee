"""What the engine keeps to avoid recomputing: per-frame vision features (shared by every window
that holds the frame) and per-window image-token keys/values (shared by its caption and questions)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from streamer.types import FrameKey

__all__ = ["FeatureCache", "ImageKVCache"]


class FeatureCache:
    """LRU map from frame key to the vision tower's output for that frame
    (a torch tensor, or a numpy array for the ONNX backends).

    Bounded by entry count; a miss only costs a re-encode, never a wrong
    result. Values are treated as read-only by callers (GIT adds the temporal
    embedding in place in its own forward: we never hand cached tensors to it).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._entries: OrderedDict[FrameKey, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: FrameKey) -> bool:
        return key in self._entries

    def get(self, key: FrameKey) -> Any | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: FrameKey, value: Any) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def drop_stream(self, stream_id: str) -> None:
        for key in [k for k in self._entries if k[0] == stream_id]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


class ImageKVCache:
    """Per window: the state a prefill leaves (BOS's logits, every decoder layer's keys and
    values over the window's image tokens, BOS's text keys/values), one row of the runner's
    `split_rows`.

    GIT's image tokens never attend to text, so this row is the same for the caption and for
    every question about the window: a question about a window kept here runs only its own
    tokens. Keyed by (stream_id, index) and valid only for the very Window object it was made
    from (a re-added stream's window 0 is another window). LRU, bounded by entries and by bytes
    (an image part is large: 43.6 MB per window on git-base in float32, 0.3 MB on the bundled
    model); a row larger than the byte bound is not kept. A miss costs a recompute, never a
    wrong answer.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("image-token cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], tuple[Any, Any, int]] = OrderedDict()  # key -> (window, row, bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._entries

    def windows(self) -> list[tuple[str, int]]:
        """(stream_id, index) of the windows kept, least recently used first."""
        return list(self._entries)

    def get(self, window: Any) -> Any | None:
        key = (window.stream_id, window.index)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not window:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, window: Any, row: Any, nbytes: int) -> None:
        key = (window.stream_id, window.index)
        self.drop(*key)
        if self.max_entries == 0 or nbytes > self.max_bytes:
            return
        self._entries[key] = (window, row, nbytes)
        self.bytes += nbytes
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, _, freed) = self._entries.popitem(last=False)
            self.bytes -= freed

    def drop(self, stream_id: str, index: int) -> None:
        entry = self._entries.pop((stream_id, index), None)
        if entry is not None:
            self.bytes -= entry[2]

    def drop_stream(self, stream_id: str) -> None:
        for key in [k for k in self._entries if k[0] == stream_id]:
            self.drop(*key)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
