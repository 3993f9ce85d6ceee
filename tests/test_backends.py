"""--backend onnxruntime|openvino: the bundled model's captions equal torch fp32's, through
the real Engine and Scheduler (feature cache, batching, pipelined prepare/finish).

The export is made on first use into streamer's own cache (STREAMER_CACHE_DIR,
shared by this session's tests) exactly as a user's first `--backend` run does.
A backend whose package is not installed is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the [onnx] extra is not installed (pip install 'streamer[onnx]')")

from streamer.defaults import BUNDLED_MODEL, BUNDLED_MODEL_NAME
from streamer.engine import Engine, EngineConfig
from streamer.engine.export import cache_key, ensure_export, model_revision, read_manifest
from streamer.errors import ModelLoadError, StreamerError
from streamer.pipeline.sampler import SamplerConfig, WindowSampler
from streamer.pipeline.scheduler import Scheduler, SchedulerConfig
from streamer.training.world import random_scene
from streamer.types import Caption, Frame, Window


def installed(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install 'streamer[{'onnx' if module == 'onnxruntime' else module}]')")


BACKENDS = [pytest.param("onnxruntime", marks=installed("onnxruntime")), pytest.param("openvino", marks=installed("openvino"))]


@pytest.fixture(scope="session")
def streamer_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "streamer-cache"


@pytest.fixture(autouse=True)
def use_streamer_cache(monkeypatch, streamer_cache):
    monkeypatch.setenv("STREAMER_CACHE_DIR", str(streamer_cache))


@pytest.fixture(scope="module")
def bundled_export(streamer_cache):
    """The bundled model exported on first use, as `--backend` does (once per test session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMER_CACHE_DIR", str(streamer_cache))
        return ensure_export(BUNDLED_MODEL_NAME)


def live_windows(streams: int = 4, seconds: float = 8.0, fps: float = 2.0) -> list[Window]:
    """Synthetic-world scenes as live streams: 3 s windows of 6 frames every 1 s, so
    consecutive windows share frames (the feature cache is in play), in arrival order."""
    rng = np.random.default_rng(41)
    out: list[Window] = []
    for k in range(streams):
        scene = random_scene(rng, duration=seconds)
        sampler = WindowSampler(SamplerConfig(window=3.0, frames=6, hop=1.0), f"cam{k}")
        for i in range(int(seconds * fps)):
            out += sampler.feed(Frame(f"cam{k}", i, i / fps, scene.frame(i / fps, 64, 64)))
    return sorted(out, key=lambda w: (w.index, w.stream_id))


async def caption_live(engine: Engine, windows: list[Window]) -> list[Caption]:
    published: list[Caption] = []
    scheduler = Scheduler(engine.caption, published.extend, SchedulerConfig(max_batch=4, max_wait=0.0, max_pending_per_stream=64),
                          pipeline=(engine.prepare, engine.finish), forget_fn=engine.forget_stream)
    scheduler.start()
    for w in windows:
        scheduler.submit(w)
    await asyncio.wait_for(scheduler.close(drain=True), 120)
    return sorted(published, key=lambda c: (c.index, c.stream_id))


@pytest.fixture(scope="module")
def windows():
    return live_windows()


@pytest.fixture(scope="module")
def torch_captions(windows):
    engine = Engine.load(EngineConfig(model=BUNDLED_MODEL_NAME, device="cpu", dtype="float32", threads=1))
    return asyncio.run(caption_live(engine, windows))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_backend_captions_live_windows_exactly_like_torch_fp32(bundled_export, windows, torch_captions, backend):
    engine = Engine.load(EngineConfig(model=BUNDLED_MODEL_NAME, backend=backend, dtype="float32", threads=1))
    assert (engine.backend, engine.precision, engine.model_name) == (backend, "float32", BUNDLED_MODEL_NAME)
    got = await caption_live(engine, windows)
    assert [(c.stream_id, c.index) for c in got] == [(c.stream_id, c.index) for c in torch_captions]
    assert [c.text for c in got] == [c.text for c in torch_captions]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in torch_captions], abs=1e-3)
    assert len({c.text for c in got}) > 3  # the scenes really differ
    # the feature cache works the same: frames shared by overlapping windows were encoded once
    assert engine.stats.frames_encoded < 6 * len(windows) // 2
    assert engine.stats.frames_reused + engine.stats.frames_encoded == 6 * len(windows)


@installed("openvino")
async def test_openvino_bf16_keeps_the_fp32_captions(bundled_export, windows, torch_captions):
    engine = Engine.load(EngineConfig(model=str(bundled_export.path), backend="openvino", dtype="bfloat16", threads=1))
    assert engine.precision == "bfloat16"
    got = await caption_live(engine, windows)
    same = sum(a.text == b.text for a, b in zip(got, torch_captions))
    assert same / len(got) >= 0.95


@installed("onnxruntime")
def test_first_use_exports_once_and_later_loads_reuse_it(bundled_export, streamer_cache):
    entries = sorted((streamer_cache / "exports").iterdir())
    assert bundled_export.path in entries
    assert bundled_export.data["revision"] == model_revision(BUNDLED_MODEL_NAME)[2]
    written = (bundled_export.path / "manifest.json").stat().st_mtime_ns
    for backend in ("onnxruntime", "openvino") if importlib.util.find_spec("openvino") else ("onnxruntime",):
        engine = Engine.load(EngineConfig(model=BUNDLED_MODEL_NAME, backend=backend, threads=1))
        assert engine.runner.manifest.path == bundled_export.path  # type: ignore[attr-defined]
    assert sorted((streamer_cache / "exports").iterdir()) == entries  # nothing exported again
    assert (bundled_export.path / "manifest.json").stat().st_mtime_ns == written


@installed("onnxruntime")
def test_first_use_says_that_it_exports(tmp_path, monkeypatch, caplog):
    # one warning line before the minute-long export, one after (the daemon's log shows both)
    monkeypatch.setenv("STREAMER_CACHE_DIR", str(tmp_path / "cache"))
    logger = logging.getLogger("streamer.engine.export")
    logger.addHandler(caplog.handler)  # the CLI's setup_logging may have stopped propagation
    try:
        ensure_export(BUNDLED_MODEL_NAME, verify_with="onnxruntime")
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records if r.name == "streamer.engine.export"]
    assert messages[0].startswith("exporting the model to ONNX once") and messages[-1] == "export done"


def test_the_cache_key_follows_the_checkpoints_revision(tmp_path):
    copy = shutil.copytree(BUNDLED_MODEL, tmp_path / "world-git")
    _, source, revision = model_revision(str(copy))
    assert revision == model_revision(BUNDLED_MODEL_NAME)[2]  # same weights, same revision
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6  # a different model from here on
    (copy / "config.json").write_text(json.dumps(config))
    changed = model_revision(str(copy))[2]
    assert changed != revision
    assert cache_key(source, changed, "float32") != cache_key(source, revision, "float32")


@pytest.fixture
def export_copy(bundled_export, tmp_path):
    return shutil.copytree(bundled_export.path, tmp_path / "export")


@installed("onnxruntime")
def test_a_damaged_export_is_one_clear_error(export_copy):
    def load():
        Engine.load(EngineConfig(model=str(export_copy), backend="onnxruntime", threads=1))

    prefill = export_copy / "prefill.onnx"
    data = prefill.read_bytes()
    prefill.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="prefill.onnx is .* bytes, the manifest says .*damaged"):
        load()
    prefill.write_bytes(b"\0" * len(data))  # right size, not a model
    with pytest.raises(ModelLoadError, match="onnxruntime could not load prefill.onnx"):
        load()
    (export_copy / "step.onnx").unlink()
    with pytest.raises(ModelLoadError, match="step.onnx is missing"):
        load()
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest.json is unreadable"):
        load()


@installed("onnxruntime")
def test_an_export_from_another_exporter_version_asks_to_export_again(export_copy):
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["exporter_version"] = 0
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="export it again"):
        read_manifest(export_copy)


def test_missing_export_dir_and_unknown_backend_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local directory"):
        Engine.load(EngineConfig(model="./not/an/export", backend="onnxruntime"))
    with pytest.raises(ModelLoadError, match="expected one of torch, onnxruntime, openvino"):
        Engine.load(EngineConfig(model=BUNDLED_MODEL_NAME, backend="tensorflow"))


@installed("onnxruntime")
def test_onnxruntime_refuses_a_dtype_it_does_not_run(bundled_export):
    with pytest.raises(ModelLoadError, match="--dtype bfloat16 is for torch and openvino"):
        Engine.load(EngineConfig(model=str(bundled_export.path), backend="onnxruntime", dtype="bfloat16"))


@installed("onnxruntime")
def test_caption_cli_with_an_onnx_backend_writes_the_torch_captions(bundled_export, tmp_path):
    from streamer.cli import main
    from tests.support.media import write_video

    scene = random_scene(np.random.default_rng(5), duration=6.0)
    video = write_video(tmp_path / "scene.mp4", [scene.frame(i / 10, 64, 64) for i in range(60)], fps=10)
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.jsonl"
        model = BUNDLED_MODEL_NAME if backend == "torch" else str(bundled_export.path)
        assert main(["caption", str(video), "--backend", backend, "--model", model, "--format", "jsonl",
                     "--no-progress", "--threads", "1", "-o", str(out)]) == 0
        outputs[backend] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert outputs["onnxruntime"] == outputs["torch"] and len(outputs["torch"]) >= 3


def test_model_backend_in_the_config_file_reaches_the_engine(tmp_path):
    from streamer.cli.serve import load_config

    path = tmp_path / "streamer.toml"
    path.write_text('[model]\nid = "streamer/world-git"\nbackend = "openvino"\ndtype = "bfloat16"\n')
    assert load_config(str(path)).engine.backend == "openvino"
    path.write_text('[model]\nbackend = "tensorrt"\n')
    with pytest.raises(StreamerError, match="backend"):
        load_config(str(path))
