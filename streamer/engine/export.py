"""`streamer export`: a GIT checkpoint as three ONNX graphs plus what the engine needs.

An export directory holds

    vision.onnx     per-frame vision tower (the engine's feature cache keeps working)
    prefill.onnx    per-window decoder pass over the image tokens and BOS
    step.onnx       one token per row, with the image and text keys/values as inputs
    config.json, generation_config.json, tokenizer and preprocessor files
    manifest.json   where it came from (source, revision), exporter and opset,
                    precision, file sizes, and what the verification found

(graphs.py says what each graph computes). Every graph has a dynamic batch
axis, and step.onnx a dynamic text-length axis. An export is verified before it
is kept: the ONNX checker on every graph, then the tokens of a few synthetic
windows decoded by the exported graphs must equal the torch engine's (fp32),
and int8 exports record their caption agreement with fp32 instead.

`ensure_export` is what `--backend onnxruntime|openvino` uses: an export
directory given as the model is used as it is; any other model is exported
once into streamer's own cache (not the Hugging Face hub cache), keyed by the
model's source and revision, the exporter version and the opset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamer.defaults import BUNDLED_MODEL, BUNDLED_MODEL_NAME
from streamer.engine.graphs import PrefillGraph, StepGraph, VisionGraph, kv_names
from streamer.engine.loader import LoadedModel, default_model, load_model
from streamer.engine.runner import special_ids
from streamer.errors import ModelLoadError

__all__ = [
    "EXPORTER_VERSION",
    "OPSET",
    "ExportManifest",
    "ensure_export",
    "export_cache_dir",
    "export_model",
    "model_revision",
    "read_manifest",
]

log = logging.getLogger(__name__)

FORMAT = "streamer-git-onnx"
# Bump when graphs.py or the layout of an export changes: cached exports are keyed by it.
EXPORTER_VERSION = 1
# 23: scaled_dot_product_attention exports as ONNX's Attention op, which both
# runtimes run fused; ONNX Runtime >= 1.23 and OpenVINO >= 2025 read it.
OPSET = 23
GRAPHS = ("vision", "prefill", "step")
MANIFEST = "manifest.json"
VERIFY_WINDOWS = 4  # synthetic windows decoded by both torch and the export
VERIFY_TOKENS = 12


@dataclass(frozen=True)
class ExportManifest:
    path: Path
    data: dict[str, Any]

    @property
    def precision(self) -> str:
        return str(self.data["precision"])

    @property
    def layers(self) -> int:
        return int(self.data["shape"]["layers"])

    @property
    def name(self) -> str:
        return str(self.data["model"])

    def graph(self, name: str, backend: str = "onnxruntime") -> Path:
        """The file of graph `name` for `backend` (int8 exports keep one set per runtime)."""
        table = self.data.get(f"{backend}_graphs") or self.data["graphs"]
        return self.path / table[name]["file"]


def export_cache_dir() -> Path:
    """streamer's own cache: $STREAMER_CACHE_DIR, else $XDG_CACHE_HOME/streamer, else ~/.cache/streamer."""
    env = os.environ.get("STREAMER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "streamer"


# -- reading ----------------------------------------------------------------------
def is_export_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: str | Path) -> ExportManifest:
    """Check an export directory enough to fail with one clear line instead of a runtime's
    stack trace: manifest readable and of our format, every file there at its recorded size."""
    path = Path(path).expanduser()
    where = f"export {path}"
    if not path.is_dir():
        raise ModelLoadError(f"{where}: no such directory")
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: no {MANIFEST} (make one with `streamer export MODEL -o DIR`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{where}: {MANIFEST} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f"{where}: {MANIFEST} is not a streamer export (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("exporter_version") != EXPORTER_VERSION:
        raise ModelLoadError(
            f"{where}: made by exporter version {data.get('exporter_version')}, this streamer reads {EXPORTER_VERSION}: export it again"
        )
    try:
        files = {name: data["graphs"][name] for name in GRAPHS}
        files.update({f"openvino:{name}": data["openvino_graphs"][name] for name in GRAPHS if "openvino_graphs" in data})
        files.update({f"data:{k}": v for k, v in data.get("data_files", {}).items()})
        for entry in files.values():
            file = path / str(entry["file"])
            if "/" in str(entry["file"]) or not file.is_file():
                raise ModelLoadError(f"{where}: {entry['file']} is missing")
            if file.stat().st_size != int(entry["bytes"]):
                raise ModelLoadError(f"{where}: {entry['file']} is {file.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                     "the export is damaged, export it again")
        int(data["shape"]["layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {MANIFEST} lacks {exc}") from None
    for needed in ("config.json", "preprocessor_config.json"):
        if not (path / needed).is_file():
            raise ModelLoadError(f"{where}: {needed} is missing")
    return ExportManifest(path, data)


# -- where a model comes from --------------------------------------------------------
def model_revision(name: str | None) -> tuple[str, str, str]:
    """(name, source, revision) of a checkpoint, without loading its weights when it is
    on disk: a hub id's commit in the HF cache, else a hash of the local files."""
    if name is None:
        name = default_model()
    path = BUNDLED_MODEL if name == BUNDLED_MODEL_NAME else Path(name).expanduser()
    if path.is_dir():
        return name, str(path.resolve()), "sha256:" + _hash_checkpoint(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        load_model(name, "cpu", "float32")  # fetch it (or fail with the usual one line)
        cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        raise ModelLoadError(f"model {name!r}: not found in the Hugging Face cache after loading")
    snapshot = Path(cached).parent
    return name, name, snapshot.name  # .../snapshots/<commit>/config.json


def _hash_checkpoint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json") or p.name == "vocab.txt"))
    if not any(p.name == "config.json" for p in files):
        raise ModelLoadError(f"model {str(path)!r}: local directory {path} has no config.json")
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(source: str, revision: str, precision: str) -> str:
    ident = json.dumps({"source": source, "revision": revision, "exporter": EXPORTER_VERSION, "opset": OPSET,
                        "torch": torch.__version__, "precision": precision}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def ensure_export(model: str | None, *, verify_with: str | None = None) -> ExportManifest:
    """An export directory for `model`: the model itself when it is one, else the cached
    export of this source and revision, else a new export made now (logged: it takes a while)."""
    if model is not None and is_export_dir(Path(model).expanduser()):
        return read_manifest(model)
    if model is not None and model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model {model!r}: no such local directory")
    name, source, revision = model_revision(model)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[-60:] or "model"
    target = export_cache_dir() / "exports" / f"{slug}-{cache_key(source, revision, 'float32')}"
    if is_export_dir(target):
        try:
            return read_manifest(target)
        except ModelLoadError as exc:
            log.warning("cached export is damaged: exporting again", extra={"export": str(target), "reason": str(exc)})
            shutil.rmtree(target, ignore_errors=True)
    log.warning("exporting the model to ONNX once (a minute or more; cached for next time)",
                extra={"model": name, "revision": revision[:19], "into": str(target)})
    started = time.perf_counter()
    manifest = export_model(name, target, verify_with=verify_with)
    log.warning("export done", extra={"model": name, "seconds": round(time.perf_counter() - started, 1), "into": str(target)})
    return manifest


# -- writing ---------------------------------------------------------------------
def export_model(
    model: str | None,
    out: str | Path,
    *,
    int8: bool = False,
    verify: bool = True,
    verify_with: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Export `model` (hub id, HF cache entry, local dir, None: the default) into `out`.

    Written into a sibling temporary directory and renamed when complete and
    verified, so `out` is never half an export. Raises ModelLoadError when the
    export cannot be made or does not verify.
    """
    say = progress or (lambda msg: log.info(msg))
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not is_export_dir(out):
        raise ModelLoadError(f"export: {out} exists and is not an export directory; pick an empty or new one")
    name, source, revision = model_revision(model)
    say(f"loading {name} ({revision[:19]})")
    loaded = load_model(name, "cpu", "float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _export_into(loaded, tmp, name=name, source=source, revision=revision, say=say)
        if int8:
            say("quantizing to int8 (dynamic, weights per channel)")
            _quantize_int8(tmp, manifest)
        if verify:
            _verify(loaded, tmp, manifest, verify_with, say)
        _write_manifest(tmp, manifest)
        read_manifest(tmp)  # what a later load checks
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(out)


def _export_into(loaded: LoadedModel, out: Path, *, name: str, source: str, revision: str, say: Callable[[str], None]) -> dict:
    import onnx
    from torch.export import Dim

    model = loaded.model.eval()
    cfg = model.config
    vision = cfg.vision_config
    layers = cfg.num_hidden_layers
    frames = int(cfg.num_image_with_embedding or 1)
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    heads = cfg.num_attention_heads
    head_size = cfg.hidden_size // heads
    bos_id, eos_ids = special_ids(cfg, model.generation_config, loaded.tokenizer)
    batch = Dim("batch", min=1, max=4096)
    text = Dim("text", min=1, max=int(cfg.max_position_embeddings))
    b = 2  # example batch; dims of size 0/1 would be specialised by torch.export
    image_kv = [torch.zeros(b, heads, frames * patches, head_size) for _ in range(2 * layers)]
    past_kv = [torch.zeros(b, heads, 3, head_size) for _ in range(2 * layers)]
    specs: dict[str, tuple[Any, ...]] = {
        "vision": (VisionGraph(model), (torch.zeros(b, 3, vision.image_size, vision.image_size),), ["pixel_values"],
                   ["features"], {"pixel_values": {0: batch}}),
        "prefill": (PrefillGraph(model, bos_id), (torch.zeros(b, frames, patches, vision.hidden_size),), ["features"],
                    ["logits", *kv_names("image", layers), *kv_names("text", layers)], {"features": {0: batch}}),
        "step": (StepGraph(model), (torch.ones(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long), *image_kv, *past_kv),
                 ["ids", "position", *kv_names("image", layers), *kv_names("past", layers)],
                 ["logits", *kv_names("present", layers)],
                 {"ids": {0: batch}, "position": {0: batch},
                  "kv": tuple([{0: batch}] * (2 * layers) + [{0: batch, 2: text}] * (2 * layers))}),
    }
    graphs = {}
    for graph, (module, args, inputs, outputs, dynamic) in specs.items():
        say(f"exporting {graph} graph")
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(module.eval(), args, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)
        assert program is not None  # dynamo=True always returns the program
        file = out / f"{graph}.onnx"
        program.save(str(file))
        _fold_weight_transposes(file)
        onnx.checker.check_model(str(file), full_check=False)  # by path: models over 2 GB keep their weights outside
        graphs[graph] = {"file": file.name}
    loaded.tokenizer.save_pretrained(out)
    loaded.image_processor.save_pretrained(out)
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    from importlib.metadata import version

    return {
        "format": FORMAT,
        "exporter_version": EXPORTER_VERSION,
        "model": name,
        "source": source,
        "revision": revision,
        "precision": "float32",
        "opset": OPSET,
        "exporter": {"streamer": version("streamer"), "torch": torch.__version__, "onnx": onnx.__version__,
                     "transformers": version("transformers")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shape": {"layers": layers, "frames": frames, "patches": patches, "heads": heads, "head_size": head_size,
                  "image_size": vision.image_size, "vision_hidden": vision.hidden_size},
        "bos_id": bos_id,
        "eos_ids": sorted(eos_ids),
        "graphs": graphs,
    }


def _fold_weight_transposes(file: Path) -> None:
    """Store transposed weights. The decoder's weights are used by both its image and its
    text part, and the exporter leaves a Transpose of a shared weight unfolded: runtimes fold
    it at load, but the int8 quantizer only sees MatMuls whose weight is an initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(file))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            weight = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(weight.transpose(perm), node.output[0]))
            folded.append(node)
    if not folded:
        return
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit
    onnx.save_model(model, str(file), save_as_external_data=large, location=f"{file.name}.data" if large else None)


class _quiet_exporter:
    """torch.onnx prints its progress to stdout and onnxruntime's quantizer advice goes to
    the root logger; keep the CLI's own output clean."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")  # exporter deprecations and axis-naming notes: not the user's to act on
        self._loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for logger, level in zip(self._loggers, self._levels):
            logger.setLevel(level)
        self._warnings.__exit__(*exc)
        return self._redirect.__exit__(*exc)


def _quantize_int8(out: Path, manifest: dict) -> None:
    """int8 weights for each runtime in the form it runs fast (measured, benchmarks/README.md):

    - ONNX Runtime: dynamic quantization (onnxruntime.quantization): weights int8 per
      output channel, activations uint8 per tensor at run time, MatMulInteger kernels.
      OpenVINO runs that graph, but slower than fp32.
    - OpenVINO: int8 weights per output channel behind DequantizeLinear, which OpenVINO
      reads as compressed weights and runs with int8 (AMX/VNNI) kernels where it pays.

    No calibration set is needed for either; caption agreement is measured at export.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]
    except ImportError:
        raise ModelLoadError("export --int8 needs onnxruntime (pip install 'streamer[onnx]')") from None
    for graph in GRAPHS:
        file = out / manifest["graphs"][graph]["file"]
        openvino_file = out / f"{graph}.openvino.onnx"
        _weights_to_int8(file, openvino_file)
        manifest.setdefault("openvino_graphs", {})[graph] = {"file": openvino_file.name}
        quantized = file.with_name(f"{graph}.int8.onnx")
        with _quiet_exporter():
            quantize_dynamic(file, quantized, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             weight_type=QuantType.QInt8)
        file.unlink()
        for extra in out.glob(f"{file.name}.data"):
            extra.unlink()
        quantized.rename(file)
    manifest["precision"] = "int8"
    manifest["quantization"] = {
        "onnxruntime": "quantize_dynamic: MatMul/Gemm weights int8 per channel, activations uint8 per tensor at run time",
        "openvino": "MatMul/Gemm weights int8 per output channel (symmetric) behind DequantizeLinear",
    }


def _weights_to_int8(src: Path, dst: Path) -> None:
    """Every float MatMul/Gemm weight -> int8 per output channel + DequantizeLinear."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        weight_name = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if weight_name is not None and weight_name in inits and weight_name not in replaced:
            weight = numpy_helper.to_array(inits[weight_name])
            if weight.ndim == 2 and weight.dtype == np.float32 and weight.size >= 4096:
                trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
                axis = 0 if trans_b else 1  # the output-channel axis
                scale = np.abs(weight).max(axis=1 - axis) / 127.0
                scale[scale == 0] = 1.0
                shaped = scale[:, None] if axis == 0 else scale[None, :]
                q = np.clip(np.round(weight / shaped), -127, 127).astype(np.int8)
                graph.initializer.extend([
                    numpy_helper.from_array(q, f"{weight_name}.int8"),
                    numpy_helper.from_array(scale.astype(np.float32), f"{weight_name}.scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{weight_name}.zero"),
                ])
                nodes.append(helper.make_node("DequantizeLinear", [f"{weight_name}.int8", f"{weight_name}.scale", f"{weight_name}.zero"],
                                              [f"{weight_name}.dequantized"], axis=axis, name=f"{weight_name}.dequantize"))
                replaced[weight_name] = f"{weight_name}.dequantized"
        if weight_name is not None and weight_name in replaced:
            node.input[1] = replaced[weight_name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.save_model(model, str(dst))


def _write_manifest(out: Path, manifest: dict) -> None:
    for table in ("graphs", "openvino_graphs"):
        for entry in manifest.get(table, {}).values():
            entry["bytes"] = (out / entry["file"]).stat().st_size
    data_files = {}
    for data in sorted(out.glob("*.data")):
        data_files[data.name] = {"file": data.name, "bytes": data.stat().st_size}
    if data_files:
        manifest["data_files"] = data_files
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _verify(loaded: LoadedModel, out: Path, manifest: dict, backend: str | None, say: Callable[[str], None]) -> None:
    """Tokens of the export equal the torch engine's on a few synthetic windows (fp32), on
    `backend` or every ONNX runtime installed; int8 records its agreement instead."""
    from streamer.engine.core import Engine, EngineConfig
    from streamer.engine.onnx_runners import available_backends, open_runner
    from streamer.training.evaluate import synthetic_clips

    backends = [backend] if backend else available_backends()
    if not backends:
        raise ModelLoadError("export: verifying needs onnxruntime or openvino (pip install 'streamer[onnx]')")
    _write_manifest(out, manifest)
    size = manifest["shape"]["image_size"]
    windows = [w for w, _ in synthetic_clips(VERIFY_WINDOWS, seed=7, frames=manifest["shape"]["frames"], size=size)]
    config = EngineConfig(max_new_tokens=VERIFY_TOKENS, cache_frames=0)
    want = [c.text for c in Engine(loaded, config).caption(windows)]
    manifest["verified"] = {"windows": len(windows), "tokens": VERIFY_TOKENS, "captions_equal_to_torch_fp32": {}}
    for name in backends:
        runner = open_runner(name, read_manifest(out), dtype="float32", device="cpu", threads=torch.get_num_threads())
        got = [c.text for c in Engine(runner, config).caption(windows)]
        same = sum(a == b for a, b in zip(got, want))
        manifest["verified"]["captions_equal_to_torch_fp32"][name] = same
        say(f"verified with {name}: {same}/{len(windows)} captions equal to torch fp32")
        if manifest["precision"] == "float32" and same != len(windows):
            diff = next((a, b) for a, b in zip(got, want) if a != b)
            raise ModelLoadError(f"export: the ONNX graphs decode differently from torch on {name} ({same}/{len(windows)} equal; "
                                 f"e.g. {diff[0]!r} vs {diff[1]!r})")
