"""Tiny Prometheus metrics: counters, gauges, histograms, text exposition format 0.0.4.

No dependency. A `Registry` owns its metrics (no process-wide default
registry), and one lock per registry guards every update and `render()`:
the engine thread updates metrics while the event loop serves /metrics, and a
scrape must not see a histogram half-updated.

    registry = Registry()
    captions = registry.counter("captions", "Captions emitted.", ["stream"])
    captions.labels(stream="cam1").inc()
    latency = registry.histogram("caption_latency_seconds", "Capture to emit.", buckets=(0.5, 1, 2, 5))
    latency.observe(0.8)
    body = registry.render()  # serve with CONTENT_TYPE

Counter names get `_total` appended unless they already end in it, as the
format asks. A metric with no label names is its own (only) child, so
`counter.inc()` works directly; a labelled one needs `.labels(**kv)` first.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Registry",
    "Counter",
    "Gauge",
    "Histogram",
    "CounterChild",
    "GaugeChild",
    "HistogramChild",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_str(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in pairs) + "}"


class _Child:
    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock


class CounterChild(_Child):
    """A counter for one label set: only goes up."""

    __slots__ = ("_value",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self._value = 0.0

    def inc(self, v: float = 1) -> None:
        if v < 0:
            raise ValueError(f"counters only go up; inc({v!r})")
        with self._lock:
            self._value += v

    def _samples(self, name: str, labels: Sequence[tuple[str, str]]) -> list[str]:
        return [f"{name}{_label_str(labels)} {_format_value(self._value)}"]


class GaugeChild(_Child):
    """A gauge for one label set: a value that goes up and down."""

    __slots__ = ("_value",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self._value = 0.0

    def set(self, v: float) -> None:
        with self._lock:
            self._value = float(v)

    def inc(self, v: float = 1) -> None:
        with self._lock:
            self._value += v

    def dec(self, v: float = 1) -> None:
        with self._lock:
            self._value -= v

    def _samples(self, name: str, labels: Sequence[tuple[str, str]]) -> list[str]:
        return [f"{name}{_label_str(labels)} {_format_value(self._value)}"]


class HistogramChild(_Child):
    """A histogram for one label set."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        super().__init__(lock)
        self._bounds = bounds  # upper bounds, increasing, the last one +Inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative: one increment per observe
        self._sum = 0.0

    def observe(self, v: float) -> None:
        # First bucket with v <= le. NaN compares false with every bound: count it in +Inf only.
        i = len(self._bounds) - 1 if math.isnan(v) else bisect.bisect_left(self._bounds, v)
        with self._lock:
            self._counts[i] += 1
            self._sum += v

    def _samples(self, name: str, labels: Sequence[tuple[str, str]]) -> list[str]:
        lines = []
        cumulative = 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            lines.append(f"{name}_bucket{_label_str([*labels, ('le', _format_value(bound))])} {cumulative}")
        lines.append(f"{name}_sum{_label_str(labels)} {_format_value(self._sum)}")
        lines.append(f"{name}_count{_label_str(labels)} {cumulative}")
        return lines


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _Metric(Generic[C]):
    _type = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str], lock: threading.Lock) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = lock
        self._children: dict[tuple[str, ...], C] = {}
        for label in self.labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for metric {name!r}")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"duplicate label names for metric {name!r}: {self.labelnames}")
        if not self.labelnames:
            # Unlabelled: the metric is its own child and is exposed from the start (as 0).
            self._children[()] = self._new_child()

    def _new_child(self) -> C:
        raise NotImplementedError

    def labels(self, **kv: object) -> C:
        """The child for these label values (created on first use); values are str()-ed."""
        if set(kv) != set(self.labelnames):
            raise ValueError(f"metric {self.name!r} takes labels {list(self.labelnames)}, got {sorted(kv)}")
        key = tuple(str(kv[k]) for k in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
        return child

    def _only_child(self) -> C:
        if self.labelnames:
            raise ValueError(f"metric {self.name!r} has labels {list(self.labelnames)}: use .labels(...) first")
        return self._children[()]

    def _render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self._type}"]
        for key, child in self._children.items():
            lines.extend(child._samples(self.name, list(zip(self.labelnames, key, strict=True))))
        return lines


class Counter(_Metric[CounterChild]):
    _type = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild(self._lock)

    def inc(self, v: float = 1) -> None:
        self._only_child().inc(v)


class Gauge(_Metric[GaugeChild]):
    _type = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild(self._lock)

    def set(self, v: float) -> None:
        self._only_child().set(v)

    def inc(self, v: float = 1) -> None:
        self._only_child().inc(v)

    def dec(self, v: float = 1) -> None:
        self._only_child().dec(v)


class Histogram(_Metric[HistogramChild]):
    _type = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Iterable[str], lock: threading.Lock, buckets: Iterable[float]
    ) -> None:
        bounds = [float(b) for b in buckets]
        if any(math.isnan(b) for b in bounds) or bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name!r} buckets must be strictly increasing, got {bounds}")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        if "le" in labelnames:
            raise ValueError(f"histogram {name!r} cannot use the label name 'le'")
        super().__init__(name, help, labelnames, lock)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._lock, self._bounds)

    def observe(self, v: float) -> None:
        self._only_child().observe(v)


M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    """A set of metrics rendered together; make one per server (no global registry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        if not name.endswith("_total"):
            name += "_total"
        return self._add(Counter(self._checked(name), help, labelnames, self._lock))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(self._checked(name), help, labelnames, self._lock))

    def histogram(
        self, name: str, help: str, labelnames: Iterable[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(self._checked(name), help, labelnames, self._lock, buckets))

    def render(self) -> str:
        """The exposition text (serve with CONTENT_TYPE)."""
        with self._lock:  # a consistent snapshot: no update lands mid-render
            lines = [line for metric in self._metrics.values() for line in metric._render()]
        return "\n".join(lines) + "\n" if lines else ""

    def _checked(self, name: str) -> str:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        if name in self._metrics:
            raise ValueError(f"metric {name!r} is already registered")
        return name

    def _add(self, metric: M) -> M:
        with self._lock:
            self._metrics[metric.name] = metric
        return metric

