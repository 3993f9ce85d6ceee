"""The engine on real (tiny, random-weight) GIT checkpoints loaded via from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.engine import Engine, EngineConfig
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.errors import ModelLoadError
from streamer.media.decode import iter_frames, open_input
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.types import Frame, Window
from tests.support.media import moving_square, solid_frames
from tests.support.models import save_git_checkpoint, tiny_config


def frames_of(images, stream="s", fps=6.0, first_seq=0):
    return [Frame(stream, first_seq + i, i / fps, img) for i, img in enumerate(images)]


def windows_of(frames, window=3.0, n=6, hop=1.0):
    sampler = WindowSampler(SamplerConfig(window, n, hop), frames[0].stream_id)
    out = [w for f in frames for w in sampler.feed(f)]
    return out + sampler.flush()


def hf_generate(engine, images, max_new_tokens):
    """The HF-example path: the checkpoint's own processor + model.generate."""
    pixels = engine.loaded.image_processor(images=list(images), return_tensors="pt").pixel_values
    out = engine.model.generate(
        pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )
    new = out.sequences[0, 1:]
    logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
    return new.tolist(), float(np.mean(logps))


def test_caption_matches_transformers_generate_token_for_token(tiny_engine):
    # frames already at the model's input size, so both paths see the same pixels
    images = moving_square(6, 32, 32, seed=3)
    window = Window("s", 0, tuple(frames_of(images)))
    (caption,) = tiny_engine.caption([window])
    tokens, mean_logp = hf_generate(tiny_engine, images, max_new_tokens=8)
    assert caption.text == " ".join(tiny_engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True).split())
    assert caption.confidence == pytest.approx(mean_logp, abs=1e-4)
    assert caption.confidence <= 0


def test_each_frame_is_encoded_once_and_reuse_changes_nothing(tiny_model):
    images = moving_square(60, 64, 48, seed=5)  # 10 s at 6 fps
    frames = frames_of(images)
    windows = windows_of(frames)  # 3 s / 6 frames / 1 s hop
    assert len(windows) == 8
    cached = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    uncached = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6, cache_frames=0))
    # one window at a time, as a live stream delivers them
    with_reuse = [cached.caption([w])[0] for w in windows]
    without = [uncached.caption([w])[0] for w in windows]
    assert [c.text for c in with_reuse] == [c.text for c in without]
    assert [c.confidence for c in with_reuse] == pytest.approx([c.confidence for c in without], abs=1e-5)
    assert uncached.stats.frames_encoded == 6 * len(windows)
    assert cached.stats.frames_encoded == 6 + 2 * (len(windows) - 1)  # 2 new frames per 1 s hop
    # 2.4x over 8 windows; the steady state is 3x (6 frames per window down to 2)
    assert uncached.stats.frames_encoded / cached.stats.frames_encoded == pytest.approx(2.4)


def test_cached_features_are_not_modified_by_use(tiny_engine):
    window = Window("t", 0, tuple(frames_of(moving_square(6, seed=9), stream="t")))
    first = tiny_engine.caption([window])[0]
    again = tiny_engine.caption([window])[0]  # served entirely from the cache
    assert (again.text, again.confidence) == (first.text, pytest.approx(first.confidence, abs=1e-6))


def test_a_window_gives_the_same_caption_alone_and_inside_a_batch(tiny_model):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=10, cache_frames=0))
    windows = [
        Window(f"cam{i}", 0, tuple(frames_of(moving_square(6, 48 + 8 * i, 40 + 4 * i, seed=i), stream=f"cam{i}")))
        for i in range(5)
    ]
    alone = [engine.caption([w])[0] for w in windows]
    together = engine.caption(windows)
    assert [c.stream_id for c in together] == [w.stream_id for w in windows]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.confidence for c in together] == pytest.approx([c.confidence for c in alone], abs=1e-4)
    assert len({c.text for c in together}) > 1  # the windows really differ


def test_rows_that_finish_early_leave_the_batch_without_changing_others(tiny_model):
    # max_new_tokens large enough that some rows hit [SEP] and drop out of the batch
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=40, cache_frames=0))
    windows = [Window(f"s{i}", 0, tuple(frames_of(moving_square(6, seed=20 + i), stream=f"s{i}"))) for i in range(6)]
    together = engine.caption(windows)
    alone = [engine.caption([w])[0] for w in windows]
    assert [c.text for c in together] == [c.text for c in alone]


def test_masked_greedy_gives_the_same_tokens_as_the_compact_loop(tiny_model):
    # masked is the GPU loop (finished rows stay in the batch, no per-token host read);
    # it must caption exactly like the CPU loop, including rows that stop early
    compact = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=40, cache_frames=0, greedy="compact"))
    masked = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=40, cache_frames=0, greedy="masked"))
    assert compact.greedy == "compact" and masked.greedy == "masked"
    windows = [Window(f"s{i}", 0, tuple(frames_of(moving_square(6, seed=20 + i), stream=f"s{i}"))) for i in range(6)]
    a, b = compact.caption(windows), masked.caption(windows)
    assert [c.text for c in b] == [c.text for c in a]
    assert [c.confidence for c in b] == pytest.approx([c.confidence for c in a], abs=1e-4)
    lengths = {len(c.text.split()) for c in a}
    assert len(lengths) > 1  # some rows really finished before others


def test_masked_greedy_matches_transformers_generate(tiny_model):
    engine = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=8, greedy="masked"))
    images = moving_square(6, 32, 32, seed=3)
    (caption,) = engine.caption([Window("s", 0, tuple(frames_of(images)))])
    tokens, mean_logp = hf_generate(engine, images, max_new_tokens=8)
    assert caption.text == " ".join(engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True).split())
    assert caption.confidence == pytest.approx(mean_logp, abs=1e-4)


def test_masked_greedy_stops_soon_after_every_row_has_finished():
    from streamer.defaults import BUNDLED_MODEL
    from streamer.training.evaluate import synthetic_clips

    engine = Engine.load(EngineConfig(model=str(BUNDLED_MODEL), max_new_tokens=40, greedy="masked", sync_every=4))
    windows = [w for w, _ in synthetic_clips(8, seed=3, frames=6, size=64)]
    captions = engine.caption(windows)
    longest = max(len(c.text.split()) for c in captions) + 1  # + [SEP]
    steps = engine.stats.tokens_generated / len(windows)
    assert longest <= steps < longest + 4  # looked every 4 tokens, not run to 40


def test_preparing_the_next_batch_before_finishing_this_one_changes_nothing(tiny_model):
    # the scheduler's pipelined order: prepare(k+1), then finish(k)
    frames = frames_of(moving_square(60, 64, 48, seed=5))
    windows = windows_of(frames)
    batches = [windows[i : i + 3] for i in range(0, len(windows), 3)]
    plain = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    piped = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=6))
    expected = [c.text for b in batches for c in plain.caption(b)]
    got, prepared = [], piped.prepare(batches[0])
    for nxt in batches[1:]:
        ahead = piped.prepare(nxt)
        got += [c.text for c in piped.finish(prepared)]
        prepared = ahead
    got += [c.text for c in piped.finish(prepared)]
    assert got == expected
    assert piped.stats.frames_encoded == plain.stats.frames_encoded == 6 + 2 * (len(windows) - 1)


def test_captions_carry_the_windows_media_time(tiny_engine):
    frames = [Frame("cam", i, 50.0 + i / 6, img) for i, img in enumerate(moving_square(24, seed=2))]
    windows = windows_of(frames)
    captions = tiny_engine.caption(windows)
    for w, c in zip(windows, captions):
        assert (c.stream_id, c.index, c.start, c.end) == (w.stream_id, w.index, w.frames[0].pts, w.frames[-1].pts)
        assert c.model == tiny_engine.model_name


def test_frame_order_matters_because_temporal_embeddings_are_loaded(tiny_engine):
    frames = frames_of(moving_square(6, seed=4), stream="order")
    forward = tiny_engine.caption([Window("order", 0, tuple(frames))])[0]
    backward = tiny_engine.caption([Window("order", 1, tuple(reversed(frames)))])[0]
    assert forward.confidence != pytest.approx(backward.confidence, abs=1e-6)


def test_checkpoint_with_the_old_temporal_embedding_name_loads_fully(tmp_path, tiny_model):
    old = save_git_checkpoint(tmp_path / "old-names", tiny_config(), old_temporal_names=True)
    new_engine = Engine.load(EngineConfig(model=str(tiny_model)))
    old_engine = Engine.load(EngineConfig(model=str(old)))
    for a, b in zip(old_engine.model.git.img_temporal_embedding, new_engine.model.git.img_temporal_embedding):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_single_image_checkpoints_caption_one_frame(tmp_path):
    path = save_git_checkpoint(tmp_path / "image-git", tiny_config(frames=None))
    engine = Engine.load(EngineConfig(model=str(path), max_new_tokens=5))
    assert engine.num_frames == 1
    frames = frames_of(moving_square(6, seed=1))
    (caption,) = engine.caption([Window("s", 0, tuple(frames))])  # spread-sampled to 1 frame
    assert caption.text


@pytest.mark.parametrize("shape", [(120, 160), (160, 120), (32, 32), (20, 24), (1080 // 8, 1920 // 8)])
def test_preprocessing_matches_the_checkpoints_image_processor(tiny_engine, shape):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(3)]
    ours = preprocess_frames(images, tiny_engine.spec, torch.device("cpu"), torch.float32)
    theirs = tiny_engine.loaded.image_processor(images=images, return_tensors="pt").pixel_values[0]
    assert ours.shape == theirs.shape
    # identical up to the odd uint8 rounding step between PIL's and torch's bilinear
    assert (ours - theirs).abs().mean() < 0.01
    assert (ours - theirs).abs().max() <= 2 * 2 / 255 + 1e-6


def test_vatex_preprocessing_is_rgb_with_mean_and_std_one_half():
    from transformers import VideoMAEImageProcessorPil

    proc = VideoMAEImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    spec = PreprocessSpec.from_processor(proc)
    assert spec.shortest_edge == 224 and spec.crop_hw == (224, 224) and spec.mode == "bilinear"
    red = solid_frames(1, (255, 0, 0), 320, 240)
    pixels = preprocess_frames(red, spec, torch.device("cpu"), torch.float32)
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels[0, 0], torch.ones(224, 224))  # R -> +1
    assert torch.allclose(pixels[0, 1:], -torch.ones(2, 224, 224))  # G, B -> -1


def test_frames_downscaled_at_decode_caption_like_full_resolution(tmp_path, tiny_engine):
    from tests.support.media import write_video

    path = write_video(tmp_path / "big.mp4", moving_square(6, 640, 480, seed=8))
    full = [f.image for f in iter_frames(open_input(str(path)), "s")]
    small = [f.image for f in iter_frames(open_input(str(path)), "s", short_side=tiny_engine.frame_short_side)]
    assert min(small[0].shape[:2]) == tiny_engine.frame_short_side
    a = preprocess_frames(full, tiny_engine.spec, torch.device("cpu"), torch.float32)
    b = preprocess_frames(small, tiny_engine.spec, torch.device("cpu"), torch.float32)
    assert (a - b).abs().mean() < 0.05  # swscale vs torch antialiased bilinear


def test_missing_local_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local directory"):
        Engine.load(EngineConfig(model="./definitely/not/here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        Engine.load(EngineConfig(model=str(tmp_path / "empty")))


def test_unreachable_hub_model_names_every_place_tried():
    with pytest.raises(ModelLoadError) as err:
        Engine.load(EngineConfig(model="nobody/no-such-git-model"))
    message = str(err.value)
    assert "nobody/no-such-git-model" in message
    assert "Hugging Face cache" in message and "Hugging Face hub" in message
    assert "\n" not in message


def test_bad_device_and_dtype_are_clear_errors(tiny_model):
    with pytest.raises(ModelLoadError, match="dtype"):
        Engine.load(EngineConfig(model=str(tiny_model), dtype="float8"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            Engine.load(EngineConfig(model=str(tiny_model), device="cuda"))
