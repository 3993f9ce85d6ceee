"""The synthetic world, `streamer train` and `streamer eval` (small runs)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_a_new_model_can_be_built_larger_and_still_loads_and_captions(tmp_path):
    # the room a GPU run has (issue #14: 4 x 4 patches of 16 pixels see where things are coarsely)
    out = tmp_path / "wide"
    result = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(out), "--steps", "2", "--batch-size", "2",
                             "--warmup", "1", "--threads", "1", "--image-size", "48", "--patch-size", "8", "--hidden", "64",
                             "--layers", "2", "--frames", "4"], check=False, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == (48, 8, 64, 2)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_image_with_embedding"]) == (64, 2, 4)
    engine = Engine.load(EngineConfig(model=str(out), max_new_tokens=6))
    assert engine.num_frames == 4
    ((window, _),) = list(synthetic_clips(1, seed=2, frames=4, size=48))
    assert set(engine.caption([window])[0].text.split()) <= set(world_vocabulary())
    bad = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--image-size", "50"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "a multiple of --patch-size (50 / 16)" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()
    huge = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "y"), "--hidden", "65536",
                           "--image-size", "8192"], check=False, capture_output=True, text=True, timeout=60)
    assert huge.returncode == 2 and "--image-size 8192 (at most 1024), --hidden 65536 (at most 4096)" in huge.stderr
    assert not (tmp_path / "y").exists()


def _refused(out, *args: str) -> str:
    """`streamer train --out OUT ARGS` must exit 2 with a one-line reason and make no OUT; returns stderr."""
    bad = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(out), *args], check=False,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert not out.exists()
    return bad.stderr


def test_a_models_input_can_be_grown_keeping_what_it_learned(tmp_path):
    # issue #14: more patches for where things are, warm-started from a trained model rather than from nothing
    from streamer.engine.fresh import save_new_git_model
    from streamer.engine.loader import load_model
    from streamer.training.train import GROWN_POSITION_NOISE, grow_input

    small = save_new_git_model(tmp_path / "small", world_vocabulary(), seed=4, image_size=32, patch_size=16, hidden=32,
                               vision_layers=1, text_layers=1)
    loaded = load_model(str(small), "cpu", "float32")
    grown, processor = grow_input(loaded.model, loaded.image_processor, 64, seed=1)
    old = loaded.model.git.image_encoder.vision_model.embeddings.position_embedding.weight.detach()
    new = grown.git.image_encoder.vision_model.embeddings.position_embedding.weight.detach()
    assert new.shape[0] == 1 + 4 * 4 and torch.equal(new[0], old[0])
    # new patch (row, col) of the 4 x 4 grid lies in old patch (row // 2, col // 2) of the 2 x 2 one
    for row, col in itertools.product(range(4), range(4)):
        parent = old[1 + (row // 2) * 2 + col // 2]
        assert abs(float((new[1 + row * 4 + col] - parent).norm()) - GROWN_POSITION_NOISE) < 1e-4
    assert len({tuple(r.tolist()) for r in new[1:]}) == 16  # neighbours under one old patch tell apart
    kept = grown.state_dict()
    for name, weight in loaded.model.state_dict().items():  # everything else, the patch embedding included, kept
        if "vision_model.embeddings.position" not in name:
            assert torch.equal(kept[name], weight), name
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (64, 64, 64)

    out = tmp_path / "grown"
    cmd = [sys.executable, "-m", "streamer", "train", "--model", str(small), "--steps", "2", "--batch-size", "2",
           "--warmup", "1", "--threads", "1"]
    result = subprocess.run(cmd + ["--out", str(out), "--grow-image-size", "64"], check=False, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["vision_config"]["image_size"] == 64
    engine = Engine.load(EngineConfig(model=str(out), max_new_tokens=6))
    assert engine.spec.crop_hw == (64, 64) and engine.frame_short_side == 64  # decoders hand it 64-pixel frames
    ((window, _),) = list(synthetic_clips(1, seed=2, frames=engine.num_frames, size=64))
    assert set(engine.caption([window])[0].text.split()) <= set(world_vocabulary())
    # a resumed run loads its checkpoint, grown already: its learned positions are not regrown
    from streamer.training.train import _build_or_load

    trained = engine.model.git.image_encoder.vision_model.embeddings.position_embedding.weight.detach()
    again, _, _ = _build_or_load(TrainConfig(out=str(out), model=str(out), grow_image_size=64), torch.device("cpu"))
    assert torch.equal(again.git.image_encoder.vision_model.embeddings.position_embedding.weight.detach(), trained)
    for extra, message in ((["--grow-image-size", "40"], "a multiple of the model's patch size (16)"),
                           (["--grow-image-size", "2048"], "1-1024 pixels"),
                           # not silently ignored: an existing model's size is not --image-size's to change
                           (["--image-size", "128", "--layers", "4"], "--image-size --layers size a new model")):
        assert message in _refused(tmp_path / "bad", *cmd[4:], *extra)
    assert "a new one takes --image-size" in _refused(tmp_path / "bad", "--grow-image-size", "128")


def test_a_models_width_can_be_grown_and_it_still_says_what_it_said(tmp_path):
    # issue #14: more capacity for motion, warm-started from the bundled model (Net2Net widening)
    from streamer.defaults import BUNDLED_MODEL
    from streamer.engine.loader import load_model
    from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
    from streamer.training.train import _autocast, grow_width

    loaded = load_model(str(BUNDLED_MODEL), "cpu", "float32")
    old = loaded.model.eval()
    exact = grow_width(old, 256, noise=0.0).eval()
    grown = grow_width(old, 256, seed=3).eval()
    assert (grown.config.hidden_size, grown.config.vision_config.hidden_size, grown.config.num_attention_heads) == (256, 256, 8)
    assert sum(p.numel() for p in grown.parameters()) > 3.5 * sum(p.numel() for p in old.parameters())
    clips = list(synthetic_clips(12, seed=5, frames=6, size=64))
    spec = PreprocessSpec.from_processor(loaded.image_processor)
    pixels = preprocess_frames([f.image for w, _ in clips for f in w.frames], spec, torch.device("cpu"), torch.float32)
    pixels = pixels.view(len(clips), 6, *pixels.shape[1:])
    ids = torch.tensor([[loaded.tokenizer.cls_token_id]] * len(clips))
    with torch.no_grad():
        logits = old(input_ids=ids, pixel_values=pixels).logits
        assert torch.allclose(exact(input_ids=ids, pixel_values=pixels).logits, logits, atol=1e-3)  # the same function
        said = [loaded.tokenizer.decode(r, skip_special_tokens=True)
                for r in old.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=12)]
        says = [loaded.tokenizer.decode(r, skip_special_tokens=True)
                for r in grown.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=12)]
    assert says == said and sum(s == truth for s, (_, truth) in zip(said, clips)) >= 10  # right, and still right
    # the noise tells each copied unit from its copy: else they would get the same gradients for ever
    patch = grown.git.image_encoder.vision_model.embeddings.patch_embedding.weight
    assert not torch.equal(patch[:128], patch[128:])

    # --precision bf16 runs the matrix products in bf16 on the CPU too; auto leaves a CPU run in fp32
    layer = torch.nn.Linear(4, 4)
    with _autocast("bf16", torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with _autocast("auto", torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype == torch.float32

    out = tmp_path / "wide"
    cmd = [sys.executable, "-m", "streamer", "train", "--model", str(BUNDLED_MODEL), "--steps", "2", "--batch-size", "2",
           "--warmup", "1", "--threads", "1", "--precision", "bf16"]
    result = subprocess.run(cmd + ["--out", str(out), "--grow-hidden", "256"], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["vision_config"]["hidden_size"], saved["dtype"]) == (256, 256, "float32")
    engine = Engine.load(EngineConfig(model=str(out), max_new_tokens=12))
    assert set(engine.caption([clips[0][0]])[0].text.split()) <= set(world_vocabulary())
    for extra, message in ((["--grow-hidden", "200"], "a whole multiple of the model's width (128"),
                           (["--grow-hidden", "8192"], "1-4096")):
        assert message in _refused(tmp_path / "bad", *cmd[4:], *extra)
    assert "a new one takes --hidden" in _refused(tmp_path / "bad", "--grow-hidden", "256")


def test_train_refuses_flags_its_task_does_not_read(tmp_path, capsys):
    # `--task speech --data live` used to train speech as if --data were not there
    from streamer.cli import main

    speech = main(["train", "--task", "speech", "--out", str(tmp_path / "s"), "--data", "live", "--event-weight", "2"])
    assert speech == 2 and "--data --event-weight: not read by --task speech" in capsys.readouterr().err
    caption = main(["train", "--out", str(tmp_path / "c"), "--nonspeech-share", "0.2"])
    assert caption == 2 and "--nonspeech-share: not read by --task caption" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def _fingerprint(batch):
    return tuple((caption, np.stack(frames).tobytes()) for frames, caption in batch)


def test_example_workers_render_distinct_reproducible_batches_and_stop_with_the_run(tmp_path, caplog):
    # a GPU's step is short next to rendering and encoding the world's examples: workers render them
    import multiprocessing
    from functools import partial

    from streamer.training.loop import example_batches
    from streamer.training.train import synthetic_examples

    make = partial(synthetic_examples, frames=2, size=16)
    first = _fingerprint(next(example_batches(make, 5, 3, workers=2)))
    stream = example_batches(make, 5, 3, workers=2)
    batches = [_fingerprint(next(stream)) for _ in range(6)]
    del stream
    assert batches[0] == first  # same seed, same workers: the same batches, in the same order
    assert len(set(batches)) == 6  # no two workers draw the same examples
    in_process = example_batches(make, 5, 3, workers=0)
    assert _fingerprint(next(in_process)) not in batches  # the training process's own stream is another seed's

    caplog.set_level("WARNING", logger="streamer.training.train")
    out = train(TrainConfig(out=str(tmp_path / "m"), steps=6, batch_size=4, warmup=1, save_every=3, log_every=2,
                            threads=1, data_workers=2), progress=False)
    assert [r.step for r in caplog.records if hasattr(r, "loss")] == [2, 4, 6]
    assert (out / "model.safetensors").is_file()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]  # the workers stopped with the run
    bad = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data-workers", "65"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--data-workers 65: 0-64" in bad.stderr and not (tmp_path / "x").exists()


_RENDER_LOCK = threading.Lock()  # stands for any lock a library takes while rendering or encoding


def _examples_behind_the_render_lock(seed: int):
    from streamer.training.train import synthetic_examples

    with _RENDER_LOCK:
        pass
    yield from synthetic_examples(seed, frames=2, size=16)


def test_example_workers_do_not_inherit_a_lock_another_trainer_thread_holds():
    # A fork copies a lock held by another thread at that instant, held forever in the child: CI hung 300 s on
    # exactly that. Workers that start from a clean forkserver render while the trainer's thread holds it.
    from streamer.training.loop import example_batches

    released = threading.Event()
    taken = threading.Event()

    def hold() -> None:
        with _RENDER_LOCK:
            taken.set()
            released.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)
    try:
        batch = next(example_batches(_examples_behind_the_render_lock, 3, 2, workers=1))
    finally:
        released.set()
        holder.join()
    assert len(batch) == 2 and all(len(frames) == 2 for frames, _ in batch)


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


# -- the world as a live stream shows it (issue #14) and its questions (issue #13) ------------------------


def colour_pixels(frames, colour: str) -> list[int]:
    rgb = np.array(COLOURS[colour], np.uint8)
    return [int(np.all(f == rgb, axis=-1).sum()) for f in frames]


def test_a_window_is_captioned_by_what_its_frames_show():
    from streamer.training.world import NOTHING, Obj, Scene, centre_crop_view

    still = Scene((Obj("circle", "red", "big", 0.5, 0.5),), "still")
    assert still.caption_for_window(2.0, 5.0) == "a big red circle is still"
    pair = Scene((Obj("square", "blue", "small", 0.3, 0.25), Obj("square", "blue", "small", 0.3, 0.75)), "still")
    assert pair.caption_for_window(0.0, 3.0) == "two small blue squares are still"
    # an object appears at 4 s and stays: nothing before, "appears" across it, standing there after
    appears = Scene((Obj("triangle", "green", "big", 0.5, 0.5),), "appears", event_time=4.0)
    assert [appears.caption_for_window(s, s + 3) for s in (0.0, 2.0, 5.0)] == [
        NOTHING, "a big green triangle appears", "a big green triangle is still"]
    # moving right without wrapping: in view, leaving (still moving right), gone
    leaves = Scene((Obj("square", "white", "small", 0.5, 0.5, vx=0.2),), "right", wrap=False)
    assert [leaves.caption_for_window(s, s + 3) for s in (0.0, 1.5, 5.0)] == [
        "a small white square moves to the right"] * 2 + [NOTHING]
    assert max(colour_pixels([leaves.frame(t) for t in (5.25, 7.75)], "white")) == 0  # really out of the frame
    # the engine's centre crop of a 16:9 frame does not see the sides
    at_side = Scene((Obj("circle", "yellow", "small", 0.08, 0.5),), "still")
    assert at_side.caption_for_window(0.0, 3.0) == "a small yellow circle is still"
    assert at_side.caption_for_window(0.0, 3.0, **centre_crop_view(160, 90)) == NOTHING
    # played backwards
    truth = appears.truth_for_window(2.0, 5.0)
    assert truth.reversed().caption == "a big green triangle disappears" and truth.reversed().reversed() == truth


def test_live_scene_truth_agrees_with_the_pixels():
    from streamer.training.world import NOTHING, random_live_scene, window_times

    rng = np.random.default_rng(11)
    events = set()
    for _ in range(150):
        scene = random_live_scene(rng)
        start = float(rng.uniform(0.0, 5.0))
        truth = scene.truth_for_window(start, start + 3.0)
        events.add(truth.event)
        frames = [scene.frame(t) for t in window_times(start, start + 3.0)]
        shown = colour_pixels(frames, scene.objects[0].colour)
        area = (0.24 if scene.objects[0].size == "small" else 0.40) ** 2 * 64 * 64 * 0.4  # a triangle's least
        if truth.event == NOTHING:
            assert max(shown) < area * 0.3, (scene, start)  # at most a sliver at an edge
        else:
            assert max(shown) > 0, (scene, start)
        if truth.event == "appears":
            assert shown[0] == 0 and shown[-1] > 0
        if truth.event == "still" and scene.event in ("still", "appears", "disappears"):
            assert len(set(shown)) == 1  # the same picture in every frame: nothing moves
    assert events >= {"left", "right", "up", "down", "appears", "disappears", "still", NOTHING}


def _shown_fraction(scene, obj, t: float, size: int = 64) -> float:
    """How much of one object a 64x64 frame shows at time t: its pixels against those it has when drawn at the
    same sub-pixel phase well inside the frame."""
    from dataclasses import replace

    x, y = scene._position(obj, t)
    alone = replace(scene, objects=(replace(obj, x=x, y=y, vx=0.0, vy=0.0),), background="black", wrap=False)
    inside = replace(alone, objects=(replace(alone.objects[0], x=x - np.floor(x * size) / size + 0.5,
                                             y=y - np.floor(y * size) / size + 0.5),))
    return colour_pixels([alone.frame(0.0)], obj.colour)[0] / colour_pixels([inside.frame(0.0)], obj.colour)[0]


def test_window_kinds_agree_with_the_pixels():
    """`Scene.window_kind` (the live evaluation splits its score by it): an object called whole shows all of
    itself in every frame, one mostly out all of itself in at most 2 of 6, and one that wraps jumps across
    the frame between two frames."""
    from streamer.training.world import MOTIONS, WINDOW_KINDS, Obj, Scene, centre_crop_view, random_live_scene, window_times

    rng = np.random.default_rng(12)
    seen = set()
    for _ in range(300):
        scene = random_live_scene(rng)
        start = float(rng.uniform(0.0, 5.0))
        kind = scene.window_kind(start, start + 3.0)
        seen.add(kind)
        assert kind in WINDOW_KINDS
        assert (kind == scene.truth_for_window(start, start + 3.0).event) != kind.startswith("moving")
        if not kind.startswith("moving"):
            continue
        times = window_times(start, start + 3.0)
        in_view = [o for o in scene.objects if any(scene._in_view(o, t, (0.0, 0.0, 1.0, 1.0), 1.0) for t in times)]
        whole = min(sum(_shown_fraction(scene, obj, t) > 0.99 for t in times) for obj in in_view)
        # (a frame the geometry calls cut can keep every pixel: a triangle's corner between pixel centres)
        if kind == "moving: whole":
            assert whole == 6, (scene, start)
        elif kind == "moving: partly out":
            assert 3 <= whole, (scene, start)
        elif kind == "moving: mostly out":
            assert whole <= 3, (scene, start)
        elif kind == "moving: wraps":
            axis = 1 if MOTIONS[scene.event][0] else 0  # numpy's: columns for left/right
            rgb = np.array(COLOURS[scene.objects[0].colour], np.uint8)
            along = [np.nonzero(np.all(scene.frame(t) == rgb, axis=-1))[axis].mean() / 64 for t in times]
            assert any(abs(a - b) > 0.3 for a, b in itertools.pairwise(along)), (scene, start, along)
    assert seen >= {"moving: whole", "moving: partly out", "moving: mostly out", "moving: wraps", "still"}
    # a wide frame's centre crop: the same path is whole in the square frame and cut at the crop's sides
    crossing = Scene((Obj("square", "red", "small", 0.2, 0.5, 0.2, 0.0),), "right", wrap=False)
    assert crossing.window_kind(0.0, 3.0) == "moving: whole"
    assert crossing.window_kind(0.0, 3.0, **centre_crop_view(160, 90)) == "moving: partly out"


def test_questions_have_the_window_s_answers_and_yes_no_is_balanced():
    from streamer.training.world import (
        QUESTION_KINDS,
        labelled_questions,
        questions_for,
        random_live_scene,
    )

    rng = np.random.default_rng(3)
    vocab = set(world_vocabulary())
    answers: dict[str, list[str]] = {kind: [] for kind in QUESTION_KINDS}
    for _ in range(300):
        scene = random_live_scene(rng)
        truth = scene.truth_for_window(1.0, 4.0)
        asked = labelled_questions(truth, rng)
        assert [k for k, _, _ in asked] == list(QUESTION_KINDS)
        for kind, question, answer in asked:
            assert set(question.split()) | {answer} <= vocab, question
            answers[kind].append(answer)
        words = {k: a for k, _, a in asked}
        if truth.count:
            assert words["colour"] == truth.colour and words["shape"] == truth.shape
            assert words["count"] == {1: "one", 2: "two"}[truth.count]
            assert truth.caption.split()[-1] in (words["direction"], "appears", "disappears") or words["direction"] == "still"
            assert words["yes"] == "yes"
        else:
            assert words["colour"] == words["count"] == "none" and words["yes"] == "no"
        assert words["no"] == "no"
    nothing = answers["count"].count("none")
    assert answers["yes"].count("yes") == 300 - nothing and set(answers["no"]) == {"no"}  # one yes, one no per window
    assert set(answers["direction"]) == {"left", "right", "up", "down", "still", "none"}
    assert questions_for(random_scene(np.random.default_rng(1)))[0][1] in COLOURS  # a scene works too


def test_the_bundled_model_s_answer_text_checks_a_yes_no_question_word_by_word():
    """What the model learns to say after a question (train.live_world_examples): caption, "so", the
    answer; a yes/no question checks its colour and its shape against the caption before the "so", and
    the engine reads the answer after it (engine/prompts.split_answer)."""
    from streamer.engine.prompts import split_answer
    from streamer.training.world import ANSWER_MARKER, reasoned_answer, same_answer

    two_red = "two small red squares move up"
    text = reasoned_answer(two_red, "no", "is there a red circle ?")
    assert text == f"{two_red} red yes circle no so no"
    assert split_answer(text, ANSWER_MARKER) == (f"{two_red} red yes circle no", "no")
    assert reasoned_answer(two_red, "yes", "is there a red square ?").endswith("up red yes square yes so yes")
    assert reasoned_answer("nothing", "no", "is there a blue triangle ?") == "nothing blue no triangle no so no"
    # a shape is answered with the caption's own word; singular and plural name the same shape
    assert reasoned_answer(two_red, "square", "what shape are they ?") == f"{two_red} so squares"
    assert reasoned_answer("a big red circle moves up", "red", "what colour is it ?") == "a big red circle moves up so red"
    assert same_answer("squares", "square") and same_answer("square", "squares") and not same_answer("circle", "square")
    assert not same_answer("yes", "no")


def test_live_examples_go_through_h264_and_the_daemons_resize():
    from streamer.training.train import live_world_examples, random_look, render_live
    from streamer.training.world import random_live_scene

    rng = np.random.default_rng(5)
    scene = random_live_scene(rng)
    look = random_look(rng)
    decoded = render_live(scene, look, 2.0, 64)
    assert len(decoded) == int(2.0 * look.fps)
    clean = scene.frame(1.0, look.content[1], look.content[0])
    got = decoded[look.fps][1].to_ndarray(format="rgb24")
    top, left = (look.height - look.content[1]) // 2, (look.width - look.content[0]) // 2
    got = got[top : top + look.content[1], left : left + look.content[0]]
    assert 0 < np.abs(got.astype(int) - clean).mean() < 20  # lossy, still the same picture
    examples = list(itertools.islice(live_world_examples(seed=8), 200))
    shapes = {ex[0][0].shape for ex in examples}
    assert all(min(s[:2]) == 64 for s in shapes) and len(shapes) > 1  # short side 64, several aspect ratios
    questions = [ex for ex in examples if len(ex) == 4]
    assert 60 < len(questions) < 140  # about half: captions and questions trained together
    from streamer.engine.prompts import split_answer
    from streamer.training.world import ANSWER_MARKER

    for _, text, question, answer_words in questions:  # the model says what it sees, then the answer after "so"
        caption, answer = split_answer(text, ANSWER_MARKER)
        assert caption and answer and ANSWER_MARKER not in caption.split() and len(answer.split()) == 1, text
        assert answer_words == (6 if question.startswith("is there") else 2), text  # [checks], "so", the answer
    assert any(ex[1].endswith(" still") for ex in examples)  # still scenes, and objects standing after they appear


def test_the_live_share_sets_how_much_of_the_data_is_live_windows(tmp_path):
    from streamer.training.train import live_world_examples

    def frame_shapes(share: float) -> set:
        return {ex[0][0].shape for ex in itertools.islice(live_world_examples(seed=3, live_share=share), 60)}

    assert frame_shapes(0.0) == {(64, 64, 3)}  # clean clips only: square, as `streamer eval` draws them
    assert len(frame_shapes(1.0)) > 1  # live windows: several aspect ratios
    bad = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data", "live",
                          "--live-share", "1.5"], check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "a share is 0-1" in bad.stderr and not (tmp_path / "x").exists()
    over = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data", "live",
                           "--live-share", "0.6", "--edge-share", "0.5"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert over.returncode == 2 and "0-1 in all" in over.stderr and not (tmp_path / "x").exists()
    ignored = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data", "synthetic",
                              "--edge-share", "0.2"], check=False, capture_output=True, text=True, timeout=60)
    assert ignored.returncode == 2 and "would ignore them" in ignored.stderr and not (tmp_path / "x").exists()
    wraps = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(tmp_path / "x"), "--data", "live",
                            "--live-share", "0.5", "--edge-share", "0.3", "--wrap-share", "0.3"], check=False,
                           capture_output=True, text=True, timeout=60)
    assert wraps.returncode == 2 and "--wrap-share 0.3 + --cut-share 0: shares of the data" in wraps.stderr
    assert not (tmp_path / "x").exists()


def test_edge_and_placed_clips_show_what_the_bundled_model_guessed_at():
    """--edge-share: clean clips whose objects enter (more of them in the last frame than in the first) or
    leave (less) at an edge, named by the direction; --placed-share: clips of any event whose path does not
    cross the middle of the frame as `streamer eval`'s clips always do."""
    from streamer.training.train import live_world_examples
    from streamer.training.world import MOTIONS

    def captions(**shares) -> list[tuple[list, str]]:
        out = itertools.islice(live_world_examples(seed=5, live_share=0.0, **shares), 0, 160, 2)  # not the twins
        # a question's example: its caption, then what it says after it (checks, "so", the answer)
        return [(ex[0], " ".join(ex[1].split()[: len(ex[1].split()) - (ex[3] if len(ex) == 4 else 0)])) for ex in out]

    grew = 0
    for frames, caption in captions(edge_share=1.0):
        assert frames[0].shape == (64, 64, 3) and caption.split()[-1] in MOTIONS, caption
        area = colour_pixels([frames[0], frames[-1]], caption.split()[2])
        assert area[0] != area[-1], caption  # entering or leaving: the view shows more or less of it
        grew += area[-1] > area[0]
    assert 20 < grew < 60  # both, about as often
    placed = captions(placed_share=1.0)
    events = {caption.split()[-1] for _, caption in placed}
    assert events >= {"left", "right", "up", "down", "appears", "disappears"}
    crossing = 0
    for frames, caption in placed:
        event = caption.split()[-1]
        if event in MOTIONS:
            axis = 1 if event in ("left", "right") else 0
            masks = [np.all(f == np.array(COLOURS[caption.split()[2]], np.uint8), axis=-1) for f in (frames[0], frames[-1])]
            if all(m.any() for m in masks):
                ends = [(np.nonzero(m)[axis].min() + np.nonzero(m)[axis].max()) / 128 for m in masks]
                crossing += (ends[0] - 0.5) * (ends[1] - 0.5) < 0
    assert crossing < 0.5 * sum(c.split()[-1] in MOTIONS for _, c in placed)  # most paths stay on one side


def test_wrap_clips_jump_across_the_frame_against_their_caption():
    """--wrap-share: clean clips whose object leaves one edge and comes back at the other between two frames.
    In the pixels the jump goes against the motion (its centroid leaps across the frame the other way), while
    every step before and after the jump goes with it: the caption names the motion, not the jump."""
    from streamer.training.train import live_world_examples
    from streamer.training.world import MOTIONS

    examples = list(itertools.islice(live_world_examples(seed=7, live_share=0.0, wrap_share=1.0), 0, 120, 2))
    checked = 0
    for ex in examples:
        frames, caption = ex[0], " ".join(ex[1].split()[: len(ex[1].split()) - (ex[3] if len(ex) == 4 else 0)])
        event = caption.split()[-1]
        assert event in MOTIONS, caption
        if caption.startswith("two"):  # pairs: two centroids per frame; the single objects say it plainly
            continue
        axis, sign = (1, MOTIONS[event][0]) if event in ("left", "right") else (0, MOTIONS[event][1])
        rgb = np.array(COLOURS[caption.split()[2]], np.uint8)
        masks = [np.all(f == rgb, axis=-1) for f in frames]
        along = [np.nonzero(m)[axis].mean() / 64 if m.any() else None for m in masks]
        steps = [b - a for a, b in itertools.pairwise(along) if a is not None and b is not None]
        jumps = [step for step in steps if abs(step) > 0.4]
        assert jumps and all(np.sign(step) == -sign for step in jumps), (caption, along)  # across, the other way
        assert all(np.sign(step) != -sign for step in steps if abs(step) < 0.1), (caption, along)  # small steps: with it
        checked += 1
    assert checked > 25


def test_cut_clips_show_still_objects_cut_by_an_edge_of_the_frame():
    """--cut-share: clean clips of still objects of which a quarter to all shows, cut by an edge of the frame
    as a wide frame's centre crop cuts them at its sides; the caption names them all, still."""
    from streamer.training.train import live_world_examples
    from streamer.training.world import Obj, Scene

    cut = 0
    for ex in itertools.islice(live_world_examples(seed=11, live_share=0.0, cut_share=1.0), 0, 160, 2):
        frames, caption = ex[0], " ".join(ex[1].split()[: len(ex[1].split()) - (ex[3] if len(ex) == 4 else 0)])
        words = caption.split()
        assert words[-1] == "still" and all(np.array_equal(frames[0], f) for f in frames[1:]), caption
        count, size, colour, shape = (1 if words[0] == "a" else 2), words[1], words[2], words[3].rstrip("s")
        whole = colour_pixels([Scene((Obj(shape, colour, size, 0.5, 0.5),), "still").frame(0.0)], colour)[0]
        mask = np.all(frames[0] == np.array(COLOURS[colour], np.uint8), axis=-1)
        shown = mask.sum() / (count * whole)
        assert 0.04 < shown < 1.1, (caption, shown)  # a quarter of a triangle: its tip (1/16); whole: +-pixels
        touches = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
        cut += touches and shown < 0.9
    assert cut > 40  # most of them cut, some whole


def test_only_the_answer_counts_in_the_loss_and_it_can_weigh_more():
    from streamer.engine.fresh import new_git_model, word_tokenizer
    from streamer.training.train import _text_batch, weighted_text_loss

    tok = word_tokenizer(world_vocabulary())
    frames = [np.zeros((64, 64, 3), np.uint8)] * 6
    batch = [(frames, "a big red circle is still so red", "what colour is it ?", 2), (frames, "a big red circle is still")]
    enc, labels, weights = _text_batch(tok, batch, torch.device("cpu"))
    words = tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert words[:15] == ["[CLS]", "what", "colour", "is", "it", "?", "a", "big", "red", "circle", "is", "still", "so",
                          "red", "[SEP]"]
    assert labels[0].tolist()[:6] == [-100] * 6 and labels[0, 13] == tok.convert_tokens_to_ids("red")
    assert (labels[1, : enc.attention_mask[1].sum()] == enc.input_ids[1, : enc.attention_mask[1].sum()]).all()
    assert weights is None  # weight 1: the model's own loss
    _, _, weights = _text_batch(tok, batch, torch.device("cpu"), answer_weight=5.0)
    assert weights[0].tolist()[:15] == [1.0] * 12 + [5.0, 5.0, 1.0] and (weights[1] == 1).all()  # "so red" weigh 5
    # the event word ("still") of the caption weighs `event_weight`, in a caption and inside an answer's text
    _, _, weights = _text_batch(tok, batch, torch.device("cpu"), answer_weight=5.0, event_weight=3.0)
    assert weights[0].tolist()[:15] == [1.0] * 11 + [3.0, 5.0, 5.0, 1.0]
    assert weights[1].tolist()[:8] == [1.0] * 6 + [3.0, 1.0]  # [CLS] a big red circle is still [SEP]
    # a manifest's empty caption has no event word: nothing to weigh, nothing to fail on
    _, _, weights = _text_batch(tok, [(frames, "")], torch.device("cpu"), event_weight=3.0)
    assert (weights == 1).all()
    # the weighted loss is GIT's own loss when every weight is 1, and follows the weights otherwise
    model, _ = new_git_model(tok, seed=0, text_layers=1, image_size=64, patch_size=16)
    pixels = torch.rand(2, 6, 3, 64, 64)
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, labels=labels)
    assert torch.allclose(weighted_text_loss(out.logits, labels, torch.ones(labels.shape)), out.loss, atol=1e-5)
    only_answer = torch.zeros(labels.shape)
    only_answer[0, 13] = 1.0  # the answer token "red" alone
    logp = torch.log_softmax(out.logits[0, -labels.shape[1] + 12], -1)[labels[0, 13]]
    assert torch.allclose(weighted_text_loss(out.logits, labels, only_answer), -logp, atol=1e-5)


def test_widening_the_vocabulary_keeps_what_known_words_learned():
    from streamer.engine.fresh import new_git_model, word_tokenizer
    from streamer.training.train import widen_vocabulary

    old_tok = word_tokenizer(["a", "red", "circle", "moves", "left"])
    model, _ = new_git_model(old_tok, seed=3, text_layers=1, vision_layers=1)
    model.eval()
    pixels = torch.randn(1, 6, 3, 64, 64)
    ids = old_tok("a red circle", return_tensors="pt").input_ids
    before = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    model, new_tok = widen_vocabulary(model, old_tok, world_vocabulary())
    assert set(world_vocabulary()) <= set(new_tok.get_vocab()) and model.config.vocab_size == len(new_tok)
    new_ids = new_tok("a red circle", return_tensors="pt").input_ids
    after = model(input_ids=new_ids, pixel_values=pixels).logits[0, -1]
    for word in ("a", "red", "circle", "moves", "left"):  # same scores for the words it knew
        assert torch.allclose(before[old_tok.convert_tokens_to_ids(word)], after[new_tok.convert_tokens_to_ids(word)], atol=1e-5)
    new_words = [new_tok.convert_tokens_to_ids(w) for w in ("yes", "still", "colour")]
    assert after[new_words].max() < after[new_tok.convert_tokens_to_ids("moves")] + 5  # new words start unlikely-ish


def test_an_answer_is_read_after_the_models_marker():
    from streamer.engine.prompts import answer_marker, split_answer

    assert split_answer("a big red circle moves up so red", "so") == ("a big red circle moves up", "red")
    assert split_answer("two small blue squares move left so two", "so")[1] == "two"
    assert split_answer("a big red circle moves up", "so") == ("a big red circle moves up", "")  # ran out of tokens
    assert split_answer("  yes  ", None) == ("", "yes")  # a hub VQA checkpoint: the whole text is the answer

    class Config:
        answer_marker = "so"

    assert answer_marker(Config()) == "so" and answer_marker(object()) is None


def test_the_motion_probe_s_windows_show_what_they_are_named_for():
    """benchmarks/probe_motion.py draws the conclusions of the model card's motion probes: its centre windows
    cross the middle, its side windows stay on one side, its edge windows show an object that enters (more of
    it in the last frame than the first) or leaves (less), its wrap windows leap across the frame once against
    the motion, and each truth names the way the pixels move."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_motion", Path(__file__).parents[1] / "benchmarks" / "probe_motion.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for name in probe.PROBES:
        for frames, truth, where, _ in probe.probe_windows(name, 60, seed=3, size=64):
            words = truth.split()
            event, colour = words[-1], words[2]
            axis = 1 if event in ("left", "right") else 0  # numpy's: columns for left/right
            mask = [np.all(f == np.array(COLOURS[colour], np.uint8), axis=-1) for f in frames]
            area = [int(m.sum()) for m in mask]
            if name == "edge":
                assert (area[-1] > area[0]) == (where == "enters"), (truth, where, area)
                continue
            along = [(np.nonzero(m)[axis].min() + np.nonzero(m)[axis].max()) / 2 / 64 for m in mask]  # box centre
            sign = 1 if event in ("right", "down") else -1
            if name == "wrap":  # one leap across the frame against the motion, early, mid-window or late
                leaps = [n for n, (a, b) in enumerate(itertools.pairwise(along)) if sign * (b - a) < -0.4]
                assert len(leaps) == 1 or (len(leaps) == 2 and where == "jumps early"), (truth, along)
                assert where == ("jumps early" if leaps[0] < 2 else "jumps mid-window" if leaps[0] == 2 else "jumps late")
                continue
            assert all(sign * (b - a) > 0 for a, b in itertools.pairwise(along)), (truth, along)
            if name == "centre":
                assert along[0] < 0.5 < along[-1] or along[-1] < 0.5 < along[0]
            else:
                assert (min(along) > 0.5 or max(along) < 0.5) and (min(along) > 0.5) == (where == "high side")
