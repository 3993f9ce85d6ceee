"""What every command shares: option types, the model options, running a coroutine on uvloop."""

from __future__ import annotations

import argparse
import asyncio

__all__ = ["parse_duration", "positive_int", "hwaccel_arg", "add_model_options", "run_async"]

def parse_duration(text: str) -> float:
    """'3s', '1.5', '500ms', '2m' -> seconds (the config schema's duration type, positive)."""
    from streamer.config import parse_duration as seconds_of

    try:
        seconds = seconds_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def hwaccel_arg(text: str) -> str:
    from streamer.media.decode import check_hwaccel

    try:
        return check_hwaccel(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    from streamer.defaults import BUNDLED_MODEL_NAME, DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=None,
        help=f"hub id, HF cache entry or local directory (default: {DEFAULT_MODEL} when cached or reachable, "
        f"else the bundled {BUNDLED_MODEL_NAME})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-new-tokens", type=positive_int, default=20, help="caption length limit in tokens")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores but one)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino"],
                   help="torch (default), or an ONNX export run by ONNX Runtime or OpenVINO: --model is then an exported "
                   "directory (`streamer export`), or any model, exported once into streamer's cache")


def run_async(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)

