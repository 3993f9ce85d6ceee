"""Convert only what the sampler will use: `SlotGate` against `WindowSampler`, first with plain
pts sequences, then with a real FrameSource playing a real H.264 file as live. Then decode only
what may be used: non-reference frames the gate rules out are skipped by the decoder, which
must change no frame the sampler is handed (real B-frame H.264, from a file and over RTSP)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.config import StreamConfig
from streamer.ingest import FrameSource, SourceSpec, SourceState
from streamer.ops.metrics import DaemonMetrics
from streamer.pipeline.runtime import StreamRuntime
from streamer.pipeline.sampler import Act, SamplerConfig, SlotGate, WindowSampler, is_tick, tick
from streamer.types import Frame, Window
from tests.support.media import moving_square, write_video

_IMG = np.zeros((2, 2, 3), np.uint8)

WindowKey = tuple[int, tuple[tuple[int, float], ...]]  # (index, ((seq, pts), ...))


def key(window: Window) -> WindowKey:
    return window.index, tuple((f.seq, f.pts) for f in window.frames)


@dataclass
class Replay:
    windows: list[WindowKey] = field(default_factory=list)
    completed_at: list[int] = field(default_factory=list)  # accepted input frames seen when each window came out
    converted: list[float] = field(default_factory=list)  # pts of the frames converted
    ticks: int = 0


def all_frames(times: Sequence[float], config: SamplerConfig) -> Replay:
    """Today: every decoded frame converted and fed to the sampler."""
    sampler, out = WindowSampler(config, "s"), Replay()
    accepted, last = 0, None
    for i, t in enumerate(times):
        if last is None or t > last:
            accepted, last = accepted + 1, t
        out.converted.append(t)
        for w in sampler.feed(Frame("s", i, t, _IMG)):
            out.windows.append(key(w))
            out.completed_at.append(accepted)
    for w in sampler.flush():
        out.windows.append(key(w))
        out.completed_at.append(accepted + 1)
    return out


def gated_frames(times: Sequence[float], config: SamplerConfig, refresh: float | None = 1.0) -> Replay:
    """What a gated source hands the sampler: converted frames and ticks, the held frame first.
    A frame keeps its input index as seq, so windows name the very frames they hold."""
    gate, sampler, out = SlotGate(config, refresh=refresh), WindowSampler(config, "s"), Replay()
    held: int | None = None
    accepted = 0

    def hand_on(frames: list[Frame], at: int) -> None:
        for f in frames:
            for w in sampler.feed(f):
                out.windows.append(key(w))
                out.completed_at.append(at)

    for i, t in enumerate(times):
        decision = gate.offer(t)
        if decision.frame is Act.DROP:
            assert decision.held is (Act.HOLD if held is not None else Act.DROP)
            continue
        accepted += 1
        ready: list[Frame] = []
        if held is None:
            assert decision.held is Act.DROP
        elif decision.held is Act.CONVERT:
            ready.append(Frame("s", held, times[held], _IMG))
            out.converted.append(times[held])
        elif decision.held is Act.TICK:
            ready.append(tick("s", held, times[held]))
            out.ticks += 1
        else:
            assert decision.held is Act.DROP
        held = None
        if decision.frame is Act.CONVERT:
            ready.append(Frame("s", i, t, _IMG))
            out.converted.append(t)
        else:
            assert decision.frame is Act.HOLD
            held = i
        assert gate.holding == (held is not None)
        hand_on(ready, accepted)
    if gate.release():  # end of the stream
        assert held is not None
        hand_on([Frame("s", held, times[held], _IMG)], accepted + 1)
        out.converted.append(times[held])
    for w in sampler.flush():
        out.windows.append(key(w))
        out.completed_at.append(accepted + 1)
    return out


def assert_same_windows(times: Sequence[float], config: SamplerConfig, refresh: float | None = 1.0) -> Replay:
    today, gated = all_frames(times, config), gated_frames(times, config, refresh)
    assert gated.windows == today.windows
    late = [g - t for g, t in zip(gated.completed_at, today.completed_at)]
    assert all(0 <= d <= 1 for d in late), f"windows completed later than one frame: {late}"
    return gated


def constant(fps: float, seconds: float, start: float = 0.0) -> list[float]:
    return [start + i / fps for i in range(int(seconds * fps))]


def vfr(n: int, seed: int, low: float = 0.005, high: float = 0.3, start: float = 3.0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.uniform(low, high, n)) + start)


def with_gaps(times: list[float], gaps: dict[int, float]) -> list[float]:
    """A stream that stops for `gaps[i]` seconds before frame i (a network outage, a motion-only camera)."""
    shift, out = 0.0, []
    for i, t in enumerate(times):
        shift += gaps.get(i, 0.0)
        out.append(t + shift)
    return out


def shuffled_a_little(times: list[float], seed: int) -> list[float]:
    """Duplicated timestamps and small steps back, as a reordering demuxer gives."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    for t in times:
        out.append(t)
        r = rng.random()
        if r < 0.05:
            out.append(t)  # duplicate
        elif r < 0.10:
            out.append(t - rng.uniform(0.001, 0.2))  # back in time
    return out


def ntsc(seconds: float, start: float) -> list[float]:
    return [start + i * 1001 / 30000 for i in range(int(seconds * 30))]


SEQUENCES = {
    "30fps": constant(30, 60),
    "25fps": constant(25, 40),
    "29.97fps-late-start": ntsc(30, 1234.567),
    "60fps": constant(60, 20, start=0.5),
    "vfr-jittery": vfr(400, seed=1),
    "vfr-dense": vfr(1500, seed=2, low=0.001, high=0.06),
    "gaps": with_gaps(constant(30, 40), {50: 0.4, 200: 1.7, 400: 5.0, 401: 0.26, 700: 0.75}),
    "late-start-100s": constant(25, 30, start=100.0),
    "duplicates-out-of-order": shuffled_a_little(constant(30, 30), seed=3),
    "bursts": [b * 0.9 + k * 0.001 for b in range(40) for k in range(5)],
    "single-frame": [7.0],
}
CONFIGS = {
    "W3-N6-H1": SamplerConfig(3.0, 6, 1.0),
    "W2-N4-H0.5": SamplerConfig(2.0, 4, 0.5),
    "W10-N6-H1": SamplerConfig(10.0, 6, 1.0),  # slots 1.67 s apart: thumbnails need frames of their own
    "W1-N8-H0.25": SamplerConfig(1.0, 8, 0.25),
    "W3-N1-H3": SamplerConfig(3.0, 1, 3.0),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("times", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_gated_frames_give_the_same_windows_at_most_one_frame_later(times, config):
    assert_same_windows(times, config)
    assert_same_windows(times, config, refresh=None)


def test_a_30fps_camera_converts_two_frames_a_second_for_the_default_sampler():
    times = constant(30, 60)
    gated = assert_same_windows(times, SamplerConfig(3.0, 6, 1.0))
    # one per half-second slot, the first frame (it fixes the grid) and the last (end of stream)
    assert len(gated.converted) <= 2 * 60 + 2
    assert len(gated.converted) * 14 < len(times)
    assert gated.ticks <= 2 * 60  # at most one per slot, and they carry no image


@pytest.mark.parametrize("times", [constant(30, 30), vfr(300, seed=4), with_gaps(constant(30, 20), {100: 0.6})])
def test_a_frame_is_converted_at_least_every_refresh_seconds_for_thumbnails(times):
    gated = assert_same_windows(times, SamplerConfig(10.0, 6, 1.0), refresh=1.0)
    # the frame before a converted one was under `refresh` from the previous conversion, so two
    # conversions are at most `refresh` plus the interval that ends at the later one apart
    intervals = np.diff(times)
    for a, b in zip(gated.converted, gated.converted[1:]):
        assert b - a <= 1.0 + intervals[np.searchsorted(times, b) - 1] + 1e-9


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.one_of(st.floats(0.001, 0.5), st.sampled_from([0.0, 1 / 30, 1 / 25, -0.01, -0.3]), st.floats(0.5, 4.0)),
        min_size=1, max_size=200,
    ),
    start=st.floats(-5.0, 5000.0),
    window=st.floats(0.2, 6.0),
    frames=st.integers(1, 8),
    hop=st.floats(0.1, 3.0),
    refresh=st.sampled_from([None, 0.3, 1.0]),
)
def test_gate_matches_the_sampler_for_any_stream(steps, start, window, frames, hop, refresh):
    times = list(start + np.cumsum(steps))
    assert_same_windows(times, SamplerConfig(window, frames, hop), refresh)


def test_a_tick_never_fills_a_slot_even_after_frames_were_lost():
    """Under overload a converted frame can be lost and leave a tick nearest a centre: the sampler
    takes the real neighbour, and a window with no image for a slot is not emitted at all."""
    sampler = WindowSampler(SamplerConfig(1.0, 2, 1.0), "s")
    fed = [Frame("s", 0, 0.0, _IMG), tick("s", 1, 0.26), tick("s", 2, 0.74), tick("s", 3, 0.8),
           Frame("s", 4, 1.2, _IMG), Frame("s", 5, 1.75, _IMG), Frame("s", 6, 2.3, _IMG)]
    windows = [w for f in fed for w in sampler.feed(f)]
    assert sampler.skipped == 1  # window 0: slot 1 (centre 0.75) had only ticks around it
    assert [w.index for w in windows] == [1]
    assert not any(is_tick(f) for w in windows for f in w.frames)
    assert is_tick(tick("s", 0, 1.0)) and not is_tick(fed[0])


def test_bad_refresh_is_rejected():
    with pytest.raises(ValueError, match="refresh"):
        SlotGate(SamplerConfig(), refresh=0)


def test_ticks_move_the_sampler_but_never_become_the_thumbnail():
    metrics = DaemonMetrics(s.value for s in SourceState)
    rt = StreamRuntime(StreamConfig(id="cam", url="x.mp4"), frames=6, ring_capacity=8, submit=lambda w: None,
                       publish_state=lambda *a: None, metrics=metrics, spawn=lambda name, fn: None)  # type: ignore[arg-type,return-value]
    real = Frame("cam", 0, 0.0, _IMG)
    rt.on_frame(real)
    rt.on_frame(tick("cam", 1, 0.03))
    assert rt.ring.latest is real and len(rt.ring) == 2
    assert metrics.frames.labels(stream="cam")._value.get() == 1


# -- a real FrameSource on a real H.264 file ---------------------------------------------------------


class Consumer:
    """What the daemon's runtime does with a source's frames: a sampler per stream."""

    def __init__(self, config: SamplerConfig, windows_wanted: int | None = None) -> None:
        self.sampler = WindowSampler(config, "f")
        self.frames: list[Frame] = []
        self.windows: list[Window] = []
        self._wanted = windows_wanted
        self.enough = asyncio.Event()  # windows_wanted windows came out
        self.ended = asyncio.Event()  # the source reached a final state

    def on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.windows.extend(self.sampler.feed(frame))
        if self._wanted is not None and len(self.windows) >= self._wanted:
            self.enough.set()

    def on_state(self, stream_id: str, state: SourceState, detail: str | None) -> None:
        if state.final:
            self.ended.set()

    def keys(self) -> list[tuple[int, tuple[float, ...]]]:
        return [(w.index, tuple(f.pts for f in w.frames)) for w in self.windows]


async def wait(event: asyncio.Event, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


@pytest.mark.timeout(60)
async def test_file_played_as_live_converts_a_fraction_and_gives_the_same_windows(tmp_path):
    fps, seconds = 30, 6
    clip = write_video(tmp_path / "live.mp4", moving_square(fps * seconds, 320, 240),
                       times=[5.0 + i / fps for i in range(fps * seconds)])  # does not start at 0
    config = SamplerConfig(3.0, 6, 1.0)
    spec = SourceSpec("f", str(clip), realtime=True, short_side=120)
    every, gated = Consumer(config), Consumer(config)
    # The two play side by side, in real time: the same decoded frames, converted or not.
    async with FrameSource(spec, every.on_frame, every.on_state), \
            FrameSource(spec, gated.on_frame, gated.on_state, gate=SlotGate(config)) as source:
        await wait(every.ended, 30, "the ungated source to reach the end of the file")
        await wait(gated.ended, 30, "the gated source to reach the end of the file")
        stats = source.stats

    decoded = fps * seconds
    assert len(every.frames) == decoded
    assert every.keys() and gated.keys() == every.keys()
    assert [f.pts for w in gated.windows for f in w.frames] == [f.pts for w in every.windows for f in w.frames]
    converted = [f for f in gated.frames if not is_tick(f)]
    assert stats.frames == len(converted) and stats.frames + stats.unconverted == decoded
    # 2 a second for the half-second slots, the first frame and the held last one
    assert len(converted) <= 2 * seconds + 2
    assert all(f.image.shape == (120, 160, 3) for f in converted)
    pts = [f.pts for f in gated.frames]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    gaps = np.diff([f.pts for f in converted])
    assert gaps.max() <= 1.0 + 1 / fps + 1e-6  # the thumbnail is never more than about a second old
    # windows come out no later than one frame after today's: compare the arrival of their newest frame
    for a, b in zip(every.windows, gated.windows):
        assert b.capture_time - a.capture_time < 0.5


@pytest.mark.timeout(60)
async def test_looping_file_keeps_the_same_windows_across_passes(tmp_path):
    """Every pass over the file is a new connection with pts carried on (as after a reconnect):
    the held frame is converted at the end of each pass, and the windows stay the same."""
    clip = write_video(tmp_path / "loop.mp4", moving_square(30), fps=30)  # 1 s
    config = SamplerConfig(3.0, 6, 1.0)
    spec = SourceSpec("f", str(clip), realtime=False, loop=True, short_side=64)
    wanted = 12
    every, gated = Consumer(config, wanted), Consumer(config, wanted)
    async with FrameSource(spec, every.on_frame, every.on_state):
        await wait(every.enough, 30, f"{wanted} windows without the gate")
    async with FrameSource(spec, gated.on_frame, gated.on_state, gate=SlotGate(config)) as source:
        await wait(gated.enough, 30, f"{wanted} windows with the gate")
        stats = source.stats
    assert gated.keys()[:wanted] == every.keys()[:wanted]
    assert stats.reconnects == 0 and stats.unconverted > 4 * stats.frames


# -- letting the decoder skip non-reference frames no slot can take ---------------------------------


def skipped_by_a_source(times: Sequence[float], config: SamplerConfig, nonref: Sequence[bool],
                        refresh: float | None = 1.0) -> list[int]:
    """The frames a source lets the decoder skip: non-reference ones that `SlotGate.needless` rules
    out. Decided as late as a source ever could (just before the frame's turn, the gate as far
    along as it gets: the most skipping) with the neighbours a source can be sure of: the last
    frame kept before it, and the next reference frame after it (in decode order a B-frame comes
    after the reference frame that follows it)."""
    gate, skipped, kept_before = SlotGate(config, refresh=refresh), [], None
    for i, t in enumerate(times):
        after = next((times[j] for j in range(i + 1, len(times)) if not nonref[j]), None)
        if nonref[i] and kept_before is not None and after is not None and gate.needless(t, kept_before, after):
            skipped.append(i)
            continue
        gate.offer(t)
        kept_before = t
    return skipped


def by_pts(replay: Replay) -> tuple[list[tuple[int, tuple[float, ...]]], list[float]]:
    """Windows (index, pts of their frames) and the pts converted: what the sampler is handed, minus seq."""
    return [(index, tuple(p for _, p in frames)) for index, frames in replay.windows], replay.converted


def assert_skipping_changes_nothing(times: Sequence[float], config: SamplerConfig, nonref: Sequence[bool],
                                    refresh: float | None = 1.0) -> int:
    skipped = set(skipped_by_a_source(times, config, nonref, refresh))
    assert all(nonref[i] for i in skipped)
    kept = [t for i, t in enumerate(times) if i not in skipped]
    assert by_pts(gated_frames(kept, config, refresh)) == by_pts(gated_frames(times, config, refresh))
    return len(skipped)


def b_frames(n: int, run: int = 3) -> list[bool]:
    """x264's default pattern (3 B-frames, b-pyramid): P b B b P ...; the middle B is a reference."""
    return [i % (run + 1) in (1, 3) for i in range(n)]


INCREASING = {name: times for name, times in SEQUENCES.items() if all(b > a for a, b in itertools.pairwise(times))}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("times", INCREASING.values(), ids=INCREASING.keys())
def test_skipping_non_reference_frames_the_gate_rules_out_changes_no_window_and_no_conversion(times, config):
    for refresh in (1.0, None):
        assert_skipping_changes_nothing(times, config, b_frames(len(times)), refresh)
        assert_skipping_changes_nothing(times, config, [i > 0 for i in range(len(times))], refresh)  # all non-ref


def test_a_30fps_stream_with_b_frames_skips_most_of_its_non_reference_frames():
    times = constant(30, 60)
    nonref = b_frames(len(times))
    skipped = assert_skipping_changes_nothing(times, SamplerConfig(3.0, 6, 1.0), nonref)
    assert skipped > 0.8 * sum(nonref)  # only those next to a slot centre (2 a second) must be decoded


def test_without_non_reference_frames_or_a_known_neighbour_nothing_is_skipped():
    times = constant(30, 10)
    assert skipped_by_a_source(times, SamplerConfig(), [False] * len(times)) == []
    gate = SlotGate(SamplerConfig())
    assert not gate.needless(0.5, 0.4, 0.6)  # no frame offered yet: no grid
    gate.offer(0.0)
    assert not gate.needless(0.1, 0.1, 0.2) and not gate.needless(0.3, 0.2, 0.25)  # not between its neighbours
    assert not gate.needless(0.25, 0.2, 0.3)  # slot 0's centre (0.25) is its own pts
    assert gate.needless(0.1, 0.0667, 0.1333)
    assert not gate.needless(1.05, 0.0, 1.1)  # far from the last conversion (0.0): due as the thumbnail
    assert SlotGate(SamplerConfig(), refresh=None).needless(0.1, 0.0667, 0.1333) is False  # nothing offered


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.one_of(st.floats(0.001, 0.5), st.sampled_from([1 / 30, 1 / 25]), st.floats(0.5, 3.0)),
                   min_size=1, max_size=150),
    nonref_bits=st.lists(st.booleans(), min_size=150, max_size=150),
    start=st.floats(-5.0, 5000.0),
    window=st.floats(0.2, 6.0),
    frames=st.integers(1, 8),
    hop=st.floats(0.1, 3.0),
    refresh=st.sampled_from([None, 0.3, 1.0]),
)
def test_skipping_changes_nothing_for_any_stream(steps, nonref_bits, start, window, frames, hop, refresh):
    times = list(start + np.cumsum(steps))
    if any(b <= a for a, b in itertools.pairwise(times)):
        return  # float rounding at large starts: equal pts are not this property's business
    assert_skipping_changes_nothing(times, SamplerConfig(window, frames, hop), nonref_bits[:len(times)], refresh)


def write_b_frame_video(path, frames: Sequence[np.ndarray], fps: int = 30):
    """Real H.264 with B-frames as many encoders make it: libx264 veryfast's defaults (3 B-frames,
    b-pyramid, adaptive), a keyframe every 2 s."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(2 * fps), "bf": "3"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def non_reference_frames(path) -> int:
    """How many frames the decoder itself skips with skip_frame=NONREF everywhere."""
    import av

    with av.open(str(path)) as container:
        total = container.streams.video[0].frames
        container.streams.video[0].codec_context.skip_frame = "NONREF"
        return total - sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def b_frame_clip(tmp_path_factory) -> str:
    """6 s of 30 fps H.264 with B-frames (180 frames)."""
    return str(write_b_frame_video(tmp_path_factory.mktemp("bframes") / "b.mp4", moving_square(180, 320, 240, seed=5)))


async def play(spec: SourceSpec, config: SamplerConfig, skip_nonref: bool, windows_wanted: int | None = None):
    consumer, states = Consumer(config, windows_wanted), []

    def on_state(stream_id: str, state: SourceState, detail: str | None) -> None:
        states.append(state)
        consumer.on_state(stream_id, state, detail)

    async with FrameSource(spec, consumer.on_frame, on_state, gate=SlotGate(config), skip_nonref=skip_nonref) as source:
        await wait(consumer.ended if windows_wanted is None else consumer.enough, 30, "the frames")
        stats = source.stats
    return consumer, stats, states


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config", [SamplerConfig(3.0, 6, 1.0), SamplerConfig(1.0, 8, 0.25)], ids=["W3-N6-H1", "W1-N8-H0.25"])
async def test_b_frame_file_skipping_non_reference_frames_hands_the_sampler_the_very_same_frames(b_frame_clip, config):
    """A real H.264 file with B-frames, decoded with frame threads: the frames converted (pixels and
    pts) and the windows are identical with and without the skipping, and the counters add up."""
    spec = SourceSpec("f", b_frame_clip, realtime=False, short_side=120)
    full, full_stats, _ = await play(spec, config, skip_nonref=False)
    skipping, stats, states = await play(spec, config, skip_nonref=True)

    total, nonref = 180, non_reference_frames(b_frame_clip)
    assert nonref > total // 3  # the clip has what this is about
    converted = [f for f in skipping.frames if not is_tick(f)]
    expected = [f for f in full.frames if not is_tick(f)]
    assert [f.pts for f in converted] == [f.pts for f in expected]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(converted, expected))
    assert skipping.keys() == full.keys() and len(full.keys()) >= 3
    assert full_stats.skipped == 0 and full_stats.frames + full_stats.unconverted == total
    assert stats.frames == full_stats.frames and stats.frames + stats.unconverted + stats.skipped == total
    assert 0.6 * nonref <= stats.skipped <= nonref  # most non-reference frames are never decoded
    assert SourceState.STOPPED in states and SourceState.FAILED not in states


@pytest.mark.timeout(60)
async def test_b_frames_over_rtsp_are_skipped_live_without_a_stall_and_the_counters_add_up(b_frame_clip):
    """The same clip from a real RTSP server (slice threads, live reads): frames are skipped, the
    watchdog (stall_timeout 1.5 s: the first frame alone takes ~1 s to come) never calls the stream
    stalled, and every frame is counted once."""
    from tests.support.rtsp import RtspServer, require_rtsp_server

    require_rtsp_server()
    config = SamplerConfig(1.0, 4, 0.5)
    with RtspServer(file=b_frame_clip) as server:
        spec = SourceSpec("r", server.url, short_side=120, stall_timeout=1.5)
        consumer, stats, states = await play(spec, config, skip_nonref=True, windows_wanted=5)
    assert SourceState.STALLED not in states and SourceState.RECONNECTING not in states, states
    pts = [f.pts for f in consumer.frames]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    assert stats.skipped > 0.25 * (stats.frames + stats.unconverted + stats.skipped)
    # every frame of the span is counted once: converted, left unconverted, or skipped (30 fps)
    span_frames = round((pts[-1] - pts[0]) * 30) + 1
    # (a few more decoded past the last frame handed on, before the source stopped)
    assert 0 <= stats.frames + stats.unconverted + stats.skipped - span_frames <= 5
