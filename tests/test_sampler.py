"""The sliding-window sampler, fed plain data (no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.types import Frame

_IMG = np.zeros((2, 2, 3), np.uint8)


def frames_at(times, stream="s"):
    return [Frame(stream, i, t, _IMG) for i, t in enumerate(times)]


def run(sampler, frames):
    out = []
    for f in frames:
        out.extend(sampler.feed(f))
    out.extend(sampler.flush())
    return out


def test_windows_cover_w_seconds_every_hop_and_share_frames():
    cfg = SamplerConfig(window=3.0, frames=6, hop=1.0)
    windows = run(WindowSampler(cfg, "cam"), frames_at([i / 30 for i in range(300)], "cam"))
    # 10 s of video, 3 s windows every 1 s: windows start at 0..7
    assert len(windows) == 8
    for k, w in enumerate(windows):
        assert w.stream_id == "cam" and w.index == k
        times = [f.pts for f in w.frames]
        assert len(times) == 6
        # one frame per half-second slot, at the slot centre (to the nearest frame)
        assert times == pytest.approx([k + 0.25 + 0.5 * j for j in range(6)], abs=1 / 60 + 1e-9)
    for a, b in zip(windows, windows[1:]):
        # the 4 newest frames of a window are the 4 oldest of the next: the same objects
        assert all(x is y for x, y in zip(a.frames[2:], b.frames[:4]))


def test_stream_that_does_not_start_at_zero_keeps_its_media_time():
    windows = run(WindowSampler(SamplerConfig(3.0, 6, 1.0)), frames_at([100.0 + i / 25 for i in range(250)]))
    assert windows[0].start == pytest.approx(100.25, abs=0.02)
    assert [round(w.start - windows[0].start, 3) for w in windows] == [float(k) for k in range(len(windows))]


def test_variable_frame_rate_picks_the_frame_nearest_each_slot():
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.005, 0.3, 200)) + 3.0
    frames = frames_at(times)
    windows = run(WindowSampler(SamplerConfig(2.0, 4, 0.5)), frames)
    assert windows
    t0 = times[0]
    for w in windows:
        first_slot = round(w.index * 0.5 / 0.5)
        for j, f in enumerate(w.frames):
            centre = t0 + (first_slot + j + 0.5) * 0.5
            best = min(np.abs(times - centre))
            assert abs(f.pts - centre) == pytest.approx(best)


def test_memory_stays_bounded_on_a_long_stream():
    sampler = WindowSampler(SamplerConfig(3.0, 6, 1.0))
    emitted = 0
    for f in frames_at([i / 30 for i in range(30 * 600)]):  # 10 minutes at 30 fps
        emitted += len(sampler.feed(f))
        assert sampler.retained_frames <= 6 + 1
    assert emitted == 598


def test_time_going_backwards_is_dropped_not_propagated():
    sampler = WindowSampler(SamplerConfig(1.0, 2, 1.0))
    frames = frames_at([0.0, 0.1, 0.2, 0.15, 0.2, 0.6, 1.1, 1.6, 2.1])
    windows = run(sampler, frames)
    for w in windows:
        pts = [f.pts for f in w.frames]
        assert pts == sorted(pts)
        assert 0.15 not in pts


def test_stream_shorter_than_one_window_yields_one_window_at_flush():
    sampler = WindowSampler(SamplerConfig(10.0, 6, 1.0))
    frames = frames_at([i / 10 for i in range(20)])  # 2 s of a 10 s window
    assert all(sampler.feed(f) == [] for f in frames)
    (window,) = sampler.flush()
    # slot centres at 0.83 s, 2.5 s, ...: the first is sampled, the rest fall back to the last frame
    assert window.frames[0].pts == 0.8 and window.frames[-1] is frames[-1]
    assert sampler.flush() == []


def test_flush_after_complete_windows_adds_nothing():
    sampler = WindowSampler(SamplerConfig(1.0, 2, 1.0))
    assert run(sampler, frames_at([i / 10 for i in range(35)]))[-1].index == 2


@pytest.mark.parametrize(
    "kwargs", [dict(window=0), dict(window=-1), dict(hop=0), dict(frames=0), dict(window=float("inf"))]
)
def test_bad_config_is_rejected_with_the_field_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplerConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(0.001, 0.5), min_size=1, max_size=120),
    window=st.floats(0.2, 4.0),
    frames=st.integers(1, 8),
    hop=st.floats(0.1, 2.0),
)
def test_properties_hold_for_any_stream(gaps, window, frames, hop):
    times = list(np.cumsum(gaps) + 7.0)
    windows = run(WindowSampler(SamplerConfig(window, frames, hop)), frames_at(times))
    assert len(windows) >= 1  # something, even for a tiny stream
    for w in windows:
        assert len(w.frames) == frames
        pts = [f.pts for f in w.frames]
        assert pts == sorted(pts) and times[0] <= pts[0] and pts[-1] <= times[-1]
    starts = [w.start for w in windows]
    assert starts == sorted(starts)
    assert [w.index for w in windows] == list(range(len(windows)))
