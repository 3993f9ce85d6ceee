"""Per-frame vision features, computed once and shared by every window that holds the frame."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from streamer.types import FrameKey

__all__ = ["FeatureCache"]


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
