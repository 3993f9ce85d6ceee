"""`streamer export`: ONNX graphs that pass the checker and decode exactly like the torch engine.

Real exports of real checkpoints: the tiny random-weight GIT built from a
config, the bundled world-git (trained), and under `slow` the git-base-vatex
shape with random weights (~700 MB). Token equality is checked on ONNX Runtime
(and OpenVINO where installed) against the torch engine in fp32.
"""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed (pip install 'streamer[onnx]')")
pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install 'streamer[onnx]')")

from streamer.cli import main
from streamer.defaults import BUNDLED_MODEL_NAME
from streamer.engine import Engine, EngineConfig
from streamer.engine.export import EXPORTER_VERSION, OPSET, export_model
from streamer.engine.onnx_runners import available_backends, open_runner
from streamer.training.evaluate import synthetic_clips
from streamer.types import Frame, Window
from tests.support.media import moving_square


def windows_of_squares(count: int, size: int) -> list[Window]:
    return [Window(f"s{i}", 0, tuple(Frame(f"s{i}", j, j / 6, img) for j, img in enumerate(moving_square(6, size, size, seed=i))))
            for i in range(count)]


def captions(engine: Engine, windows: list[Window]) -> list[tuple[str, float]]:
    return [(c.text, c.confidence) for c in engine.caption(windows)]


def assert_same_tokens(exported: Engine, reference: Engine, windows: list[Window]) -> None:
    got, want = captions(exported, windows), captions(reference, windows)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c for _, c in got] == pytest.approx([c for _, c in want], abs=1e-3)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("exports") / "tiny"
    assert main(["export", str(tiny_model), "--format", "onnx", "-o", str(out)]) == 0
    return out


def test_export_writes_three_checked_graphs_with_dynamic_batch_and_a_manifest(tiny_export, tiny_model):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["format"] == "streamer-git-onnx" and manifest["exporter_version"] == EXPORTER_VERSION
    assert manifest["opset"] == OPSET and manifest["precision"] == "float32"
    assert manifest["source"] == str(tiny_model.resolve()) and manifest["revision"].startswith("sha256:")
    assert {"torch", "onnx", "transformers", "streamer"} <= set(manifest["exporter"])
    assert all(n == manifest["verified"]["windows"] for n in manifest["verified"]["captions_equal_to_torch_fp32"].values())
    for graph in ("vision", "prefill", "step"):
        model = onnx.load(str(tiny_export / f"{graph}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param, f"{graph}: batch axis is fixed at {first.dim_value}"
    step = onnx.load(str(tiny_export / "step.onnx"), load_external_data=False)
    past = next(i for i in step.graph.input if i.name == "past_key.0").type.tensor_type.shape.dim
    assert past[2].dim_param  # the text length grows one token per step


@pytest.mark.parametrize("batch", [1, 5])
def test_tiny_export_decodes_the_torch_engines_tokens_at_any_batch_size(tiny_export, tiny_model, batch):
    reference = Engine.load(EngineConfig(model=str(tiny_model), max_new_tokens=10, cache_frames=0))
    runner = open_runner("onnxruntime", _manifest(tiny_export), dtype="float32", device="cpu", threads=1)
    exported = Engine(runner, EngineConfig(max_new_tokens=10, cache_frames=0))
    assert exported.num_frames == reference.num_frames and exported.eos_ids == reference.eos_ids
    windows = windows_of_squares(batch, 32)
    assert_same_tokens(exported, reference, windows)


@pytest.fixture(scope="module")
def bundled_int8(tmp_path_factory):
    return export_model(BUNDLED_MODEL_NAME, tmp_path_factory.mktemp("exports") / "world-int8", int8=True)


def test_int8_export_keeps_the_bundled_models_captions(bundled_int8):
    # Dynamic int8 for ONNX Runtime, int8 weights for OpenVINO: measured agreement with fp32
    # on held-out synthetic clips (the trained model has real margins; random weights would not)
    data = bundled_int8.data
    assert data["precision"] == "int8" and set(data["quantization"]) == {"onnxruntime", "openvino"}
    windows = [w for w, _ in synthetic_clips(32, seed=30_000, frames=6, size=64)]
    reference = Engine.load(EngineConfig(model=BUNDLED_MODEL_NAME, device="cpu", dtype="float32", threads=1))
    want = [c.text for c in reference.caption(windows)]
    for backend in available_backends():
        engine = Engine(open_runner(backend, bundled_int8, dtype="float32", device="cpu", threads=1), EngineConfig())
        assert engine.precision == "int8"
        got = [c.text for c in engine.caption(windows)]
        same = sum(a == b for a, b in zip(got, want))
        assert same / len(want) >= 0.9, (backend, [(a, b) for a, b in zip(got, want) if a != b])


def test_int8_export_stores_every_large_weight_as_int8(bundled_int8):
    for graph in ("vision", "prefill", "step"):
        ort_graph = onnx.load(str(bundled_int8.path / f"{graph}.onnx"))
        assert any(n.op_type == "MatMulInteger" for n in ort_graph.graph.node)  # onnxruntime's int8 kernels
        assert _float_matrix_bytes(ort_graph) < 50_000
        assert _float_matrix_bytes(onnx.load(str(bundled_int8.path / f"{graph}.openvino.onnx"))) < 50_000


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path, tiny_model, capsys):
    target = tmp_path / "work"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_model), "-o", str(target)]) == 2
    assert "not an export directory" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_base_vatex_shape_export_decodes_the_torch_engines_tokens(tmp_path):
    # ~700 MB of random weights in the microsoft/git-base-vatex shape: minutes on a small CPU
    from tests.support.models import base_vatex_config, save_git_checkpoint

    checkpoint = save_git_checkpoint(tmp_path / "base", base_vatex_config())
    manifest = export_model(str(checkpoint), tmp_path / "base-onnx")
    reference = Engine.load(EngineConfig(model=str(checkpoint), max_new_tokens=12, cache_frames=0))
    runner = open_runner("onnxruntime", manifest, dtype="float32", device="cpu", threads=1)
    assert_same_tokens(Engine(runner, EngineConfig(max_new_tokens=12)), reference, windows_of_squares(3, 224))


def _manifest(path):
    from streamer.engine.export import read_manifest

    return read_manifest(path)


def _float_matrix_bytes(model) -> int:
    """Bytes of float32 matrices left among the initializers (the embedding tables are Gathers, not MatMuls)."""
    from onnx import TensorProto, numpy_helper

    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer
               if i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.name not in gathered)
