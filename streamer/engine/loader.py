"""Finding and loading a GIT checkpoint: a local directory, the HF cache, or the hub."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, GitForCausalLM
from transformers.utils import logging as hf_logging

from streamer.defaults import BUNDLED_MODEL, BUNDLED_MODEL_NAME, DEFAULT_MODEL
from streamer.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL", "LoadedModel", "default_model", "load_model", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)


# The microsoft/git-*-vatex checkpoints were converted with transformers 4.x,
# which spelled this parameter "temperal". transformers 5 renamed it without a
# rename rule, so loading them as-is silently leaves the temporal embeddings at
# zero (frame order would no longer matter). Map the old name on load.
_KEY_MAPPING = {r"img_temperal_embedding": "img_temporal_embedding"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str  # what the user asked for (hub id or path), reported with every caption
    model: GitForCausalLM
    tokenizer: Any
    image_processor: Any
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {device}: {exc}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"--dtype {dtype}: expected one of auto, {', '.join(_DTYPES)}") from None


def _load_parts(source: str, local_only: bool, dtype: torch.dtype) -> tuple[Any, Any, Any, dict]:
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    model, info = GitForCausalLM.from_pretrained(
        source, dtype=dtype, key_mapping=_KEY_MAPPING, output_loading_info=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    return model, tokenizer, image_processor, info


def _hub_reachable(timeout: float = 2.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def default_model() -> str:
    """What no --model means: DEFAULT_MODEL when it is cached or the hub answers,
    else the small model bundled with the package (logged, never silent)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_MODEL, "config.json"), str) or _hub_reachable():
        return DEFAULT_MODEL
    if (BUNDLED_MODEL / "config.json").is_file():
        log.warning(
            "default model not available offline: using the bundled model",
            extra={"wanted": DEFAULT_MODEL, "using": BUNDLED_MODEL_NAME},
        )
        return BUNDLED_MODEL_NAME
    return DEFAULT_MODEL  # loading it will say what was tried


def load_model(name: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `name`: an existing local directory, else the HF cache, else the hub.
    None picks `default_model()`; "streamer/world-git" is the bundled model.

    Raises ModelLoadError with one line that names every place tried.
    """
    if name is None:
        name = default_model()
    if name == BUNDLED_MODEL_NAME:
        loaded = load_model(str(BUNDLED_MODEL), device, dtype)
        loaded.name = BUNDLED_MODEL_NAME
        return loaded
    if not log.isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a daemon's log
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    attempts: list[str] = []
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model {name!r}: local directory {path} has no config.json")
        candidates = [(str(path), True, f"local directory {path}")]
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {name!r}: no such local directory")
    else:
        candidates = [(name, True, "the Hugging Face cache"), (name, False, "the Hugging Face hub")]
    for source, local_only, where in candidates:
        try:
            model, tokenizer, image_processor, info = _load_parts(source, local_only, torch_dtype)
        except (OSError, ValueError) as exc:
            attempts.append(f"{where} (not there)" if local_only and where.endswith("cache") else f"{where} ({_first_line(exc)})")
            log.debug("model not loaded", extra={"model": name, "where": where}, exc_info=True)
            continue
        _check_loading_info(name, info)
        model.to(torch_device).eval()
        log.info("model loaded", extra={"model": name, "where": where, "device": str(torch_device)})
        return LoadedModel(name, model, tokenizer, image_processor, torch_device, torch_dtype)
    raise ModelLoadError(f"model {name!r} could not be loaded; tried " + "; ".join(attempts))


def _check_loading_info(name: str, info: dict) -> None:
    # A checkpoint that leaves real weights uninitialised captions garbage; say so loudly.
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ModelLoadError(
            f"model {name!r}: checkpoint lacks {len(missing)} weights (e.g. {sorted(missing)[:3]})"
        )
    unexpected = info.get("unexpected_keys", [])
    if unexpected:
        log.warning("checkpoint has unused weights", extra={"model": name, "keys": sorted(unexpected)[:5]})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
