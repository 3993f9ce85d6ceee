"""Exposition output read back with prometheus_client's own parser."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.ops import metrics
from streamer.ops.metrics import CONTENT_TYPE, Registry


def parse(registry: Registry) -> dict[str, object]:
    families = {f.name: f for f in text_string_to_metric_families(registry.render())}
    return families


def samples(registry: Registry) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(registry.render()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_public_api() -> None:
    assert set(metrics.__all__) == {
        "CONTENT_TYPE", "DEFAULT_BUCKETS", "Registry", "Counter", "Gauge", "Histogram",
        "CounterChild", "GaugeChild", "HistogramChild",
    }  # fmt: skip
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_counters_gauges_with_and_without_labels() -> None:
    reg = Registry()
    frames = reg.counter("frames_decoded", "Frames decoded.", ["stream"])
    captions = reg.counter("captions_total", "Captions emitted.")
    queue = reg.gauge("queue_depth", "Windows waiting for the engine.")
    up = reg.gauge("stream_up", "1 while a stream delivers frames.", ("stream", "kind"))
    frames.labels(stream="cam1").inc()
    frames.labels(stream="cam1").inc(29)
    frames.labels(stream="cam2").inc(2.5)
    captions.inc()
    queue.set(7)
    queue.dec(2)
    queue.inc(0.5)
    up.labels(stream="cam1", kind="rtsp").set(1)
    up.labels(kind="file", stream="a.mp4").set(0)

    fams = parse(reg)
    assert fams["frames_decoded"].type == "counter"  # exposed as frames_decoded_total
    assert fams["captions"].type == "counter"
    assert fams["queue_depth"].type == "gauge"
    assert fams["queue_depth"].documentation == "Windows waiting for the engine."
    got = samples(reg)
    assert got[("frames_decoded_total", frozenset({("stream", "cam1")}))] == 30
    assert got[("frames_decoded_total", frozenset({("stream", "cam2")}))] == 2.5
    assert got[("captions_total", frozenset())] == 1
    assert got[("queue_depth", frozenset())] == 5.5
    assert got[("stream_up", frozenset({("stream", "cam1"), ("kind", "rtsp")}))] == 1
    assert got[("stream_up", frozenset({("stream", "a.mp4"), ("kind", "file")}))] == 0
    text = reg.render()
    assert "# TYPE frames_decoded_total counter\n" in text
    assert "# HELP captions_total Captions emitted.\n" in text
    assert text.endswith("\n")


def test_unlabelled_metrics_show_zero_before_first_use() -> None:
    reg = Registry()
    reg.counter("errors", "Errors.")
    reg.histogram("latency_seconds", "Latency.", buckets=(1,))
    got = samples(reg)
    assert got[("errors_total", frozenset())] == 0
    assert got[("latency_seconds_count", frozenset())] == 0
    assert got[("latency_seconds_bucket", frozenset({("le", "+Inf")}))] == 0


def test_label_values_with_quotes_backslashes_and_newlines_round_trip() -> None:
    reg = Registry()
    c = reg.counter("requests", 'Help with a \\ backslash,\na newline and "quotes".', ["path"])
    nasty = ['say "hi"', "C:\\videos\\a.mp4", "two\nlines", 'all \\ " \n', "café ✓", ""]
    for i, value in enumerate(nasty):
        c.labels(path=value).inc(i + 1)
    fams = parse(reg)
    assert fams["requests"].documentation == 'Help with a \\ backslash,\na newline and "quotes".'
    values = {s.labels["path"]: s.value for s in fams["requests"].samples}
    assert values == {v: i + 1 for i, v in enumerate(nasty)}
    # One sample per line: a newline in a value never breaks the format.
    assert len([line for line in reg.render().splitlines() if line.startswith("requests_total")]) == len(nasty)


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    reg = Registry()
    h = reg.histogram("caption_latency_seconds", "Capture to emit.", ["stream"], buckets=(0.5, 1, 2.5))
    cam = h.labels(stream="cam1")
    for v in (0.1, 0.5, 0.7, 1.0, 2.0, 3.0, 100.0):
        cam.observe(v)
    h.labels(stream="cam2").observe(0.2)

    fams = parse(reg)
    assert fams["caption_latency_seconds"].type == "histogram"
    got = samples(reg)

    def bucket(le: str, stream: str = "cam1") -> float:
        return got[("caption_latency_seconds_bucket", frozenset({("stream", stream), ("le", le)}))]

    # le is inclusive: 0.5 falls in the 0.5 bucket, 1.0 in the 1.0 bucket.
    assert [bucket(le) for le in ("0.5", "1.0", "2.5", "+Inf")] == [2, 4, 5, 7]
    assert got[("caption_latency_seconds_count", frozenset({("stream", "cam1")}))] == 7
    assert got[("caption_latency_seconds_sum", frozenset({("stream", "cam1")}))] == pytest.approx(107.3)
    assert [bucket(le, "cam2") for le in ("0.5", "1.0", "2.5", "+Inf")] == [1, 1, 1, 1]
    # Buckets appear in increasing order, +Inf last.
    lines = [line for line in reg.render().splitlines() if 'stream="cam1",le=' in line]
    assert [line.split('le="')[1].split('"')[0] for line in lines] == ["0.5", "1.0", "2.5", "+Inf"]


def test_histogram_default_buckets_and_odd_values() -> None:
    reg = Registry()
    h = reg.histogram("x_seconds", "x")
    h.observe(float("nan"))
    h.observe(-1)
    h.observe(float("inf"))
    got = samples(reg)
    les = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in got.items() if name == "x_seconds_bucket"
    )
    assert [le for le, _ in les] == [*metrics.DEFAULT_BUCKETS, math.inf]
    assert les[0][1] == 1  # -1 is in every bucket
    assert les[-1][1] == 3  # NaN and +Inf only in +Inf
    assert got[("x_seconds_count", frozenset())] == 3


def test_increments_from_many_threads_are_not_lost() -> None:
    reg = Registry()
    c = reg.counter("frames", "Frames.", ["stream"])
    h = reg.histogram("decode_seconds", "Decode time.", buckets=(0.5,))
    n, threads = 20_000, 4

    def work() -> None:
        child = c.labels(stream="cam")
        for _ in range(n):
            child.inc()
            h.observe(0.25)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for _ in range(20):
        parse(reg)  # rendering while threads write stays well-formed
    for w in workers:
        w.join()
    got = samples(reg)
    assert got[("frames_total", frozenset({("stream", "cam")}))] == n * threads
    assert got[("decode_seconds_count", frozenset())] == n * threads
    assert got[("decode_seconds_bucket", frozenset({("le", "0.5")}))] == n * threads


def test_misuse_is_reported() -> None:
    reg = Registry()
    c = reg.counter("a", "a", ["stream"])
    with pytest.raises(ValueError, match="already registered"):
        reg.counter("a_total", "again")
    with pytest.raises(ValueError, match="labels"):
        c.labels(other="x")
    with pytest.raises(ValueError, match="labels"):
        c.inc()  # labelled: needs .labels() first
    with pytest.raises(ValueError, match="only go up"):
        c.labels(stream="s").inc(-1)
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.gauge("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        reg.gauge("g", "x", ["bad-label"])
    with pytest.raises(ValueError, match="'le'"):
        reg.histogram("h", "x", ["le"])
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("h2", "x", buckets=(1, 0.5))
    assert Registry().render() == ""


def test_registries_are_independent() -> None:
    a, b = Registry(), Registry()
    a.counter("x", "x").inc()
    b.counter("x", "x")
    assert samples(a)[("x_total", frozenset())] == 1
    assert samples(b)[("x_total", frozenset())] == 0
