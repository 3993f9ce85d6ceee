"""The engine's runners for an ONNX export (export.py): ONNX Runtime and OpenVINO.

The only module that imports onnxruntime or openvino, and only when a runner
is opened, so the daemon starts and the torch backend runs without either.

Both keep per-frame features and keys/values as numpy arrays; logits go back
to the engine as CPU torch tensors (zero-copy), so the engine's greedy loop
and feature cache are the same as for torch.

- ONNX Runtime: the CPU execution provider; with a CUDA GPU (and a GPU build
  of onnxruntime) TensorRT and CUDA are tried first. fp32, or an int8 export.
- Questions (a text prefix after BOS) feed their tokens one per step through
  the step graph: the graphs need no prefix input, at a step's cost per token.
- OpenVINO on the CPU: fp32, bf16 (its inference precision hint, run on AMX
  where the CPU has it) or f16, or an int8 export. OpenVINO picks bf16 on its
  own on AMX CPUs; fp32 is asked for explicitly so that `float32` means it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from streamer.engine.export import ExportManifest, ensure_export
from streamer.engine.graphs import kv_names
from streamer.errors import ModelLoadError

__all__ = ["OpenVinoRunner", "OrtRunner", "available_backends", "load_onnx_runner", "open_runner"]

log = logging.getLogger(__name__)

_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


def available_backends() -> list[str]:
    return [b for b, module in _MODULES.items() if importlib.util.find_spec(module) is not None]


def require(backend: str) -> None:
    if importlib.util.find_spec(_MODULES[backend]) is None:
        raise ModelLoadError(f"--backend {backend}: the {_MODULES[backend]} package is not installed "
                             f"(pip install 'streamer[{_EXTRA[backend]}]')")


@dataclass
class ExportedModel:
    """The engine's view of an export: name, tokenizer, image processor (no weights in torch)."""

    name: str
    tokenizer: Any
    image_processor: Any


def load_onnx_runner(config: Any, threads: int) -> OrtRunner | OpenVinoRunner:
    """The runner for EngineConfig `config` (backend onnxruntime or openvino)."""
    require(config.backend)
    manifest = ensure_export(config.model, verify_with=config.backend)
    return open_runner(config.backend, manifest, dtype=config.dtype, device=config.device, threads=threads)


def open_runner(backend: str, manifest: ExportManifest, *, dtype: str, device: str, threads: int) -> OrtRunner | OpenVinoRunner:
    require(backend)
    if backend == "onnxruntime":
        return OrtRunner(manifest, dtype=dtype, device=device, threads=threads)
    if backend == "openvino":
        return OpenVinoRunner(manifest, dtype=dtype, device=device, threads=threads)
    raise ModelLoadError(f"--backend {backend}: not an ONNX backend")


class _OnnxRunner:
    backend = ""

    def __init__(self, manifest: ExportManifest) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        self.manifest = manifest
        path = str(manifest.path)
        try:
            self.model_config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"export {path}: its config, tokenizer or preprocessor could not be read ({exc})") from None
        self.info = ExportedModel(manifest.name, tokenizer, processor)
        self.layers = manifest.layers
        self.bos_id = int(manifest.data["bos_id"])
        self.eos_ids = {int(e) for e in manifest.data["eos_ids"]}
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._image_names = kv_names("image", self.layers)
        self._past_names = kv_names("past", self.layers)

    # the state: (image keys/values, text keys/values), 2 * layers arrays each, batch first
    def stack(self, rows: list[list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.stack(frames) for frames in rows])

    def keep_rows(self, state: Any, rows: list[int]) -> Any:
        index = np.asarray(rows)
        image, text = state
        return [np.ascontiguousarray(a[index]) for a in image], [np.ascontiguousarray(a[index]) for a in text]

    def encode(self, pixels: torch.Tensor) -> Sequence[np.ndarray]:
        (features,) = self._run("vision", {"pixel_values": pixels.float().numpy()})
        return list(features)

    def prefill(self, features: np.ndarray) -> tuple[torch.Tensor, Any]:
        logits, *kv = self._run("prefill", {"features": features})
        n = 2 * self.layers
        return torch.from_numpy(logits), (kv[:n], kv[n:])

    def step(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        image, text = state
        ids_np = ids.numpy().astype(np.int64, copy=False)
        feeds = {"ids": ids_np, "position": np.full_like(ids_np, position)}
        feeds.update(zip(self._image_names, image))
        feeds.update(zip(self._past_names, text))
        logits, *present = self._run("step", feeds)
        return torch.from_numpy(logits), (image, present)

    def extend(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        # the step graph takes one token per row: feed a prefix token by token
        logits = None
        for offset in range(ids.shape[1]):
            logits, state = self.step(ids[:, offset : offset + 1].contiguous(), position + offset, state)
        if logits is None:
            raise ValueError("extend needs at least one token per row")
        return logits, state

    def split_rows(self, logits: torch.Tensor, state: Any, rows: list[int]) -> list[Any]:
        image, text = state
        return [(logits[r : r + 1].clone(), ([a[r : r + 1].copy() for a in image], [a[r : r + 1].copy() for a in text]))
                for r in rows]

    def join_rows(self, rows: Sequence[Any]) -> tuple[torch.Tensor, Any]:
        if len(rows) == 1:
            return rows[0]
        logits = torch.cat([logits for logits, _ in rows])
        image = [np.concatenate([row[1][0][i] for row in rows]) for i in range(len(rows[0][1][0]))]
        text = [np.concatenate([row[1][1][i] for row in rows]) for i in range(len(rows[0][1][1]))]
        return logits, (image, text)

    def row_nbytes(self, row: Any) -> int:
        logits, (image, text) = row
        return int(logits.nbytes) + sum(int(a.nbytes) for a in (*image, *text))

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class OrtRunner(_OnnxRunner):
    backend = "onnxruntime"

    def __init__(self, manifest: ExportManifest, *, dtype: str, device: str, threads: int) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        super().__init__(manifest)
        if dtype not in ("auto", "float32"):
            raise ModelLoadError(f"--backend onnxruntime runs the export's own precision ({manifest.precision}); "
                                 f"--dtype {dtype} is for torch and openvino (int8: `streamer export --int8`)")
        self.precision = manifest.precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its warnings about unused initialisers are noise here
        self.providers = _ort_providers(ort, device)
        self.sessions = {}
        for graph in ("vision", "prefill", "step"):
            try:
                self.sessions[graph] = ort.InferenceSession(str(manifest.graph(graph)), options, providers=self.providers)
            except Exception as exc:  # noqa: BLE001 (onnxruntime's pybind errors share no base but Exception)
                raise ModelLoadError(f"export {manifest.path}: onnxruntime could not load {graph}.onnx ({_first_line(exc)})") from None
        used = self.sessions["prefill"].get_providers()
        log.info("onnxruntime backend ready", extra={"export": str(manifest.path), "providers": used, "precision": self.precision})

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feeds)


def _ort_providers(ort, device: str) -> list[str]:
    """CPU unless a CUDA GPU is wanted and this onnxruntime build has the GPU providers
    (TensorRT first, then CUDA; CPU stays as the fallback for any op they lack)."""
    available = ort.get_available_providers()
    wants_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ModelLoadError(f"--device {device}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if wants_gpu and p in available]
    return chosen + ["CPUExecutionProvider"]


class OpenVinoRunner(_OnnxRunner):
    backend = "openvino"
    _PRECISIONS: ClassVar[dict[str, str]] = {"auto": "f32", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}

    def __init__(self, manifest: ExportManifest, *, dtype: str, device: str, threads: int) -> None:
        import openvino as ov  # type: ignore[import-untyped]

        super().__init__(manifest)
        if device not in ("auto", "cpu"):
            raise ModelLoadError(f"--backend openvino runs on the CPU here; --device {device} is for torch and onnxruntime")
        if dtype not in self._PRECISIONS:
            raise ModelLoadError(f"--dtype {dtype}: openvino takes auto, float32, bfloat16 or float16")
        hint = self._PRECISIONS[dtype]
        if manifest.precision == "int8":
            self.precision = "int8" if hint == "f32" else f"int8+{hint}"
        else:
            self.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[hint]
        core = ov.Core()
        properties = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # a shared host: do not pin threads to cores others use
        }
        # bf16/f16: keys and values cross between the graphs in the inference precision: half
        # of what every decode step reads, and no per-step conversion (measured: f16 keys under
        # a bf16 hint spent a third of each step in a reference Convert kernel)
        self.kv_type = {"bf16": ov.Type.bf16, "f16": ov.Type.f16}.get(hint)
        self.requests = {}
        for graph in ("vision", "prefill", "step"):
            try:
                model = self._with_kv_type(core.read_model(str(manifest.graph(graph, "openvino"))))
                compiled = core.compile_model(model, "CPU", properties)
            except RuntimeError as exc:
                raise ModelLoadError(f"export {manifest.path}: openvino could not load {graph}.onnx ({_first_line(exc)})") from None
            self.requests[graph] = (compiled.create_infer_request(), compiled.outputs)
        log.info("openvino backend ready", extra={"export": str(manifest.path), "precision": self.precision})

    def _with_kv_type(self, model: Any) -> Any:
        if self.kv_type is None:
            return model
        from openvino.preprocess import PrePostProcessor  # type: ignore[import-untyped]

        ppp = PrePostProcessor(model)
        kv_prefixes = ("image_", "text_", "past_", "present_")
        for i, port in enumerate(model.inputs):
            if port.get_any_name().startswith(kv_prefixes):
                ppp.input(i).tensor().set_element_type(self.kv_type)
        for i, port in enumerate(model.outputs):
            if port.get_any_name().startswith(kv_prefixes):
                ppp.output(i).tensor().set_element_type(self.kv_type)
        return ppp.build()

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request, outputs = self.requests[graph]
        # share_inputs: the image keys/values (tens of MB per row) are read in place on every
        # step; outputs are copied, since the next call of the same request overwrites them
        result = request.infer(feeds, share_inputs=True)
        return [result[o] for o in outputs]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
