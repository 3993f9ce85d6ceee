"""The live evaluation: its scoring on hand-made caption sequences, and a short run through the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from streamer.defaults import BUNDLED_MODEL
from streamer.training.live import (
    LIVE_KEYS,
    SCORE_KEYS,
    Segment,
    TimedCaption,
    live_evaluation,
    live_scenes,
    score_captions,
    score_runs,
    stabilized,
)

A = "a small red circle moves up"
X = "a small red circle moves down"  # A with the wrong direction
B = "two big blue squares move to the left"
C = "a big green triangle appears"

# Three 6 s scenes; 3 s windows every second, frames at slot centres: window k has frames k+0.25 .. k+2.75.
SCENES = [Segment(0.0, 6.0, A), Segment(6.0, 12.0, B), Segment(12.0, 18.0, C)]


def windows(texts: list[str]) -> list[TimedCaption]:
    return [TimedCaption(k, k + 0.25, k + 2.75, text, window=(k, k + 3.0)) for k, text in enumerate(texts)]


#          inside A          straddle  inside B          straddle  inside C
#          0  1  2  3        4  5      6  7  8  9        10 11     12 13 14 15
SEQUENCE = [A, A, X, A] + [A, B] + [B, B, B, B] + [B, C] + [B, C, C, C]


def test_scoring_of_a_hand_made_sequence():
    s = score_captions(windows(SEQUENCE), SCENES)
    assert set(s) == set(SCORE_KEYS)
    assert s["windows"] == 16 and s["inside"] == 12 and s["unscored"] == 0
    assert s["exact"] == pytest.approx(10 / 12, abs=1e-4)  # window 2 (X in A) and window 12 (B in C) wrong
    # X differs from A in the event only; B said in scene C is wrong in all but the size
    assert s["parts"] == pytest.approx({"count": 11 / 12, "size": 1.0, "colour": 11 / 12, "shape": 11 / 12,
                                        "event": 10 / 12}, abs=1e-4)
    # windows 4, 5, 10, 11 straddle a cut; either side's caption is right
    assert s["straddle"] == {"windows": 4, "accuracy": 1.0}
    # cut at 6: window 5 (last frame 7.75) is the first to say B; cut at 12: window 11 (13.75) says C
    assert s["change_delay"] == {"cuts": 2, "named": 2, "missed": 0, "mean": 1.75, "median": 1.75, "p90": 1.75,
                                 "max": 1.75}
    # A->X->A inside scene A (2) and B->C inside scene C (1); the changes that involve a straddling
    # window (A->B at 5, B->C at 11, C->B at 12) are the cuts'
    assert s["flicker"] == 3 and s["flicker_per_100"] == 18.75
    assert [w["start"] for w in s["wrong"]] == [2.25, 12.25]


def test_scores_are_split_by_kind_of_window_where_the_world_names_them():
    # scene A's windows starting before 2 s are slivers at the edge, the rest whole; B and C name no kind
    edge = replace(SCENES[0], kind=lambda start, end: "moving: mostly out" if start < 2.0 else "moving: whole")
    s = score_captions(windows(SEQUENCE), [edge, *SCENES[1:]])
    # inside A: windows 0, 1 (slivers, right) and 2, 3 (whole: X wrong in the event, A right)
    assert s["kinds"] == {"moving: mostly out": {"windows": 2, "exact": 1.0, "event": 1.0},
                          "moving: whole": {"windows": 2, "exact": 0.5, "event": 0.5}}
    assert score_captions(windows(SEQUENCE), SCENES)["kinds"] == {}  # a manifest's segments: no split


def test_the_exact_interval_resamples_scenes_not_windows():
    # the hand-made sequence: scene A 3 of 4 right, B 4 of 4, C 3 of 4
    lo, hi = score_captions(windows(SEQUENCE), SCENES)["exact_ci95"]
    assert 0.75 <= lo < 10 / 12 < hi <= 1.0
    # 4 wrong windows of 12 either way: all in one scene is less evidence than spread over three
    # (windows of one scene fail together), so its interval is wider
    spread = windows([A, A, X, X] + [A, B] + [B, B, X, B] + [B, C] + [B, C, C, C])
    clumped = windows([X, X, X, X] + [A, B] + [B, B, B, B] + [B, C] + [C, C, C, C])
    assert score_captions(spread, SCENES)["exact"] == score_captions(clumped, SCENES)["exact"] == pytest.approx(8 / 12, abs=1e-4)
    (slo, shi), (clo, chi) = score_captions(spread, SCENES)["exact_ci95"], score_captions(clumped, SCENES)["exact_ci95"]
    assert chi - clo > shi - slo
    assert score_captions(windows([A] * 16), SCENES[:1])["exact_ci95"] is None  # one scene: no interval
    # two cells of a live evaluation play the same scenes: they are resampled together, not as new evidence
    def cell() -> list[Segment]:
        return [replace(seg, scene=n) for n, seg in enumerate(SCENES)]

    as_new = score_runs([(clumped, SCENES), (clumped, list(map(replace, SCENES)))])["exact_ci95"]
    as_same = score_runs([(clumped, cell()), (clumped, cell())])["exact_ci95"]
    assert as_same[1] - as_same[0] > as_new[1] - as_new[0]


def test_a_cut_never_named_is_missed_and_a_scene_that_changes_is_not_flicker():
    # scene C is never named: its cut is missed, not given a delay
    s = score_captions(windows([A] * 6 + [B] * 6 + [B] * 4), SCENES)
    assert s["change_delay"]["cuts"] == 2 and s["change_delay"]["named"] == 1 and s["change_delay"]["missed"] == 1
    assert s["flicker"] == 0
    # what one scene shows changes at 3 s (its object appears, then stands still): following it is no flicker
    still = "a big green triangle is still"
    changing = Segment(0.0, 9.0, C, truth=lambda start, end: C if start < 3.0 else still)
    caps = windows([C, C, C, still, still, still, still])
    s = score_captions(caps, [changing])
    assert s["exact"] == 1.0 and s["flicker"] == 0
    assert score_captions(windows([C, still, C, still, still, still, still]), [changing])["flicker"] == 2


def test_stabilized_captions_trade_flicker_for_delay():
    shown = [c.text for c in stabilized(windows(SEQUENCE), "hold", windows=2)]
    assert shown == [A] * 6 + [B] * 8 + [C] * 2
    s = score_captions(stabilized(windows(SEQUENCE), "hold", windows=2), SCENES)
    assert s["flicker"] == 0  # the late change to C (window 14) is still the one cut 12 explains
    # one hop later at cut 6 (window 6 instead of 5); at cut 12 the odd B in window 12 restarts the count
    assert s["change_delay"]["max"] == 4.75 and s["change_delay"]["median"] == pytest.approx((2.75 + 4.75) / 2)
    assert [c.text for c in stabilized(windows(SEQUENCE), "hold", windows=1)] == SEQUENCE


def test_live_scenes_are_seeded_and_cover_the_stream():
    a, b = live_scenes(5, 6, 6.0), live_scenes(5, 6, 6.0)
    assert [s.caption for s, _ in a] == [s.caption for s, _ in b]
    assert all(4.5 <= seconds <= 7.5 for _, seconds in a)  # +-25 %: cuts fall at every phase of the hop
    assert len({round(seconds % 1.0, 2) for _, seconds in a}) > 1


# The bundled model on the demo's scenes (seed 20000, 8 scenes of 6 s, 128x128 at 15 fps), measured when it shipped
# (stage 6, the card): exact 96.9% off / 87.5% with hold 2; flicker 4.3 off / 0.0 with hold 2; change delay max
# 2.73 s off / 4.73 s with hold 2 (stage 5: the same but 3.73 s with hold 2; stage 4: 93.8% / 84.4%, 8.7 / 2.2,
# 2.73 / 5.73 s). A broken live path (frames, resize, timing) falls far below these.
DEMO_EXACT_FLOOR = {"off": 0.9, "hold": 0.8}
DEMO_HOLD_FLICKER_CEILING = 3.0
DEMO_DELAY_CEILING = {"off": 3.0 + 1.0, "hold": 5.0}  # off: the #14 target, window + hop


@pytest.fixture(scope="module")
def demo_run():
    return live_evaluation(str(BUNDLED_MODEL), scene_set="demo", scenes=8, sweep=[(1, None), (3, None)],
                           max_new_tokens=12)


def test_a_live_evaluation_through_the_daemon(demo_run):
    r = demo_run
    assert tuple(r) == LIVE_KEYS
    assert r["truth"] == "Scene.caption_for_window" and r["source"] == "synthetic:demo"
    (cell,) = r["cells"]
    # every window of the 48 s stream reached the engine and was scored: nothing dropped on the way
    assert cell["windows_dropped"] == cell["frames_dropped"] == cell["windows_skipped"] == 0
    assert cell["windows"] == r["off"]["windows"] == 46  # (48 - 3) / 1 + 1
    for key in ("off", "hold"):
        assert tuple(r[key]) == SCORE_KEYS
        assert r[key]["inside"] + r[key]["straddle"]["windows"] + r[key]["unscored"] == cell["windows"]
        # every window inside a scene has its kind (the demo's scenes only move)
        assert sum(k["windows"] for k in r[key]["kinds"].values()) == r[key]["inside"]
        assert all(name.startswith("moving") for name in r[key]["kinds"])
        delay = r[key]["change_delay"]
        assert delay["cuts"] == 7 and delay["named"] + delay["missed"] == 7
        if delay["max"] is not None:  # a window names the new scene only once it holds frames of it
            assert 0 < delay["max"] <= 6.0 + 3.0
    # stabilizer with one window = off; three never flicker more than off
    one, three = r["sweep"]
    assert one["flicker_per_100"] == r["off"]["flicker_per_100"] and one["exact"] == r["off"]["exact"]
    assert three["flicker_per_100"] <= r["off"]["flicker_per_100"]
    json.dumps(r, allow_nan=False)  # JSON as it is


def test_the_bundled_model_holds_its_live_figures(demo_run):
    print(json.dumps({k: demo_run[k] for k in ("off", "hold")}, indent=1))
    for key, floor in DEMO_EXACT_FLOOR.items():
        assert demo_run[key]["exact"] >= floor, (key, demo_run[key]["wrong"])
    assert demo_run["hold"]["flicker_per_100"] <= DEMO_HOLD_FLICKER_CEILING
    for key, ceiling in DEMO_DELAY_CEILING.items():  # media time, from the cut to the first window naming the new scene
        assert demo_run[key]["change_delay"]["max"] <= ceiling, (key, demo_run[key]["change_delay"])


def test_eval_live_command_writes_the_json(tmp_path):
    out = tmp_path / "live.json"
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "eval", "--live", "--model", str(BUNDLED_MODEL), "--scenes", "3",
         "--scene-seconds", "4", "--seed", "7", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert tuple(report) == LIVE_KEYS and report["seed"] == 7 and report["scenes"] == 3
    assert report["source"] == "synthetic:random" and report["off"]["windows"] >= 5
    # the default is a matrix (two frame rates x a square and a wide frame), scored together, with an interval
    assert [c["name"] for c in report["cells"]] == ["128x128@15", "160x90@15", "128x128@30", "160x90@30"]
    lo, hi = report["off"]["exact_ci95"]
    assert lo <= report["off"]["exact"] <= hi
    assert "stabilizer off: exact" in result.stdout and "flicker" in result.stdout and "% over scenes)" in result.stdout


def test_a_users_manifest_of_timed_captions_is_scored_the_same_way(tmp_path):
    from streamer.training.live import LiveCell, _render, encode_h264
    from streamer.training.world import MOTIONS

    playlist = live_scenes(3, 2, 5.0, jitter=0.0, events=tuple(MOTIONS))
    frames, spans = _render(playlist, LiveCell(15, 128, 128))
    encode_h264(tmp_path / "mine.mp4", frames, 15, 200_000)
    rows = [{"path": "mine.mp4", "start": start, "end": end, "caption": scene.caption} for scene, start, end in spans]
    (tmp_path / "cuts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = live_evaluation(str(BUNDLED_MODEL), manifest=str(tmp_path / "cuts.jsonl"), coco=False, max_new_tokens=12)
    assert tuple(r) == LIVE_KEYS and r["source"] == "manifest" and r["truth"] == "manifest" and r["scenes"] == 2
    assert r["cells"][0]["name"] == "mine.mp4" and r["off"]["windows"] == 8  # (10 - 3) / 1 + 1
    assert r["off"]["change_delay"]["cuts"] == 1 and r["off"]["inside"] == 6
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "end": 6.0}) + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="overlap"):
        live_evaluation(str(BUNDLED_MODEL), manifest=str(tmp_path / "bad.jsonl"))
