"""The synthetic world, `streamer train` and `streamer eval` (small runs)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from streamer.engine import Engine, EngineConfig
from streamer.training.evaluate import synthetic_clips
from streamer.training.train import TrainConfig, train
from streamer.training.world import (
    COLOURS,
    MOTIONS,
    clip,
    random_scene,
    world_vocabulary,
)
from tests.support.media import moving_square, write_video


def centroid_x(img: np.ndarray, rgb) -> float:
    ys, xs = np.nonzero(np.all(img == np.array(rgb, np.uint8), axis=-1))
    return float(xs.mean())


def test_world_is_deterministic_and_captions_use_its_vocabulary():
    a = [random_scene(np.random.default_rng(5)) for _ in range(1)][0]
    b = [random_scene(np.random.default_rng(5)) for _ in range(1)][0]
    assert a.caption == b.caption
    assert all(np.array_equal(x, y) for x, y in zip(clip(a), clip(b)))
    rng = np.random.default_rng(0)
    vocab = set(world_vocabulary())
    captions = {random_scene(rng).caption for _ in range(400)}
    assert all(set(c.split()) <= vocab for c in captions)
    assert len(captions) > 100  # a world, not a handful of sentences


def test_direction_is_only_visible_in_frame_order():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = random_scene(rng, events=("left", "right"))
        if len(scene.objects) != 1:
            continue
        frames = clip(scene, start=0.0)
        rgb = COLOURS[scene.objects[0].colour]
        xs = [centroid_x(f, rgb) for f in frames]
        moving_right = xs[-1] > xs[0]
        assert moving_right == (scene.event == "right"), (scene.caption, xs)
        # reversed frames show the opposite motion: a pipeline that reorders frames says the wrong thing
        assert (centroid_x(frames[0], rgb) < centroid_x(frames[-1], rgb)) != (xs[::-1][-1] > xs[::-1][0])
    assert set(MOTIONS) == {"left", "right", "up", "down"}


def test_reversed_twins_show_the_opposite_event():
    # `--reversed-twins` pairs each clip with itself backwards, captioned with the
    # opposite event: the world must really show that event in the reversed frames
    from streamer.training.train import synthetic_examples

    examples = synthetic_examples(seed=4, reversed_twins=True)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up",
                "appears": "disappears", "disappears": "appears", "appear": "disappear", "disappear": "appear"}
    for _ in range(60):
        (frames, caption), (backwards, twin) = next(examples), next(examples)
        assert [f.tobytes() for f in backwards] == [f.tobytes() for f in reversed(frames)]
        words = caption.split()
        assert twin.split()[-1] == opposite[words[-1]] and twin.split()[:4] == words[:4]
        rgb = np.array(COLOURS[words[2]], np.uint8)
        if words[-1] in ("left", "right") and words[0] == "a":
            xs = [centroid_x(f, rgb) for f in backwards]
            assert (xs[-1] > xs[0]) == (twin.split()[-1] == "right")
        if words[-1] in ("appear", "appears"):  # backwards, the object is there first and then gone
            shown = [np.all(f == rgb, axis=-1).sum() for f in backwards]
            assert shown[0] > 0 and shown[-1] == 0


def test_simple_world_varies_only_the_event():
    from streamer.training.train import synthetic_examples

    captions = [c for _, c in itertools.islice(synthetic_examples(seed=2, world="simple"), 200)]
    assert {" ".join(c.split()[1:4]) for c in captions} == {"big white square", "big white squares"}
    assert len({c.split()[-1].removesuffix("s") for c in captions}) == 6  # every event


def test_fixed_positions_stay_fixed_through_training(tmp_path):
    out = tmp_path / "fixed"
    train(TrainConfig(out=str(out), steps=6, batch_size=4, warmup=1, threads=1, fixed_positions=True,
                      reversed_twins=True, world="simple"), progress=False)
    engine = Engine.load(EngineConfig(model=str(out), max_new_tokens=4))
    table = engine.model.git.image_encoder.vision_model.embeddings.position_embedding.weight
    assert torch.allclose(table[1:].norm(dim=1), torch.full((table.shape[0] - 1,), 8.0))  # as made, never updated
    assert set(world_vocabulary()) <= set(engine.loaded.tokenizer.get_vocab())  # the simple world keeps every word


def test_training_lowers_the_loss_and_the_result_loads(tmp_path, caplog):
    out = tmp_path / "model"
    caplog.set_level("WARNING", logger="streamer.training.train")
    train(TrainConfig(out=str(out), steps=12, batch_size=8, warmup=2, save_every=6, log_every=3, threads=1), progress=False)
    losses = [r.loss for r in caplog.records if hasattr(r, "loss")]
    assert losses[-1] < losses[0]
    args = json.loads((out / "training_args.json").read_text())
    assert args["seed"] == 0 and args["steps"] == 12 and args["step"] == 12
    assert not list(out.glob("checkpoint-*"))  # cleaned up after the final save
    engine = Engine.load(EngineConfig(model=str(out), max_new_tokens=10))
    ((window, _),) = list(synthetic_clips(1, seed=1, frames=engine.num_frames, size=64))
    (caption,) = engine.caption([window])
    assert set(caption.text.split()) <= set(world_vocabulary())


def test_a_killed_training_run_resumes_from_its_newest_checkpoint(tmp_path):
    out = tmp_path / "m"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "streamer", "train", "--out", str(out), "--batch-size", "4", "--warmup", "1",
           "--threads", "1", "--save-every", "2", "--log-every", "1"]
    run = subprocess.Popen(cmd + ["--steps", "1000"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoint-4" / "training_state.pt").exists():
            assert time.monotonic() < deadline and run.poll() is None, "no checkpoint written"
            time.sleep(0.2)
        time.sleep(0.5)  # let the save finish
    finally:
        run.kill()
        run.wait()
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "training_state.pt").exists())
    total = newest + 10
    resumed = subprocess.run(cmd + ["--steps", str(total), "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    steps = [int(line.split("step=")[1].split()[0]) for line in resumed.stderr.splitlines() if "step=" in line]
    assert steps[0] == newest + 1 and steps[-1] == total  # picked up after the newest checkpoint, not from 0
    assert json.loads((out / "training_args.json").read_text())["step"] == total


def test_manifest_training_reads_user_clips(tmp_path):
    a = write_video(tmp_path / "a.mp4", moving_square(45, 96, 64, seed=1), fps=15)
    b = write_video(tmp_path / "b.mp4", moving_square(45, 96, 64, seed=2), fps=15)
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(
        json.dumps({"path": a.name, "start": 0.0, "end": 2.5, "caption": "a square moves to the right"}) + "\n"
        + json.dumps({"path": b.name, "start": 0.5, "end": 2.9, "caption": "a square moves"}) + "\n"
    )
    out = train(TrainConfig(out=str(tmp_path / "m"), data=str(manifest), steps=3, batch_size=2, warmup=1, threads=1), progress=False)
    assert (out / "model.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4", "start": 2, "end": 1, "caption": "x"}\n')
    result = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data", str(bad),
                             "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "bad.jsonl:1" in result.stderr and "Traceback" not in result.stderr
