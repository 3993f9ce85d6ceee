"""`streamer export MODEL --format onnx -o DIR [--int8]`: ONNX graphs for the ONNX backends."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a model to ONNX for --backend onnxruntime|openvino")
    ex.add_argument("model", help="hub id, HF cache entry, local directory, or streamer/world-git (the bundled model)")
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the only format for now)")
    ex.add_argument("-o", "--output", required=True, help="directory to write (new or empty, or an earlier export to replace)")
    ex.add_argument("--int8", action="store_true",
                    help="int8 weights (dynamic quantization for onnxruntime, compressed weights for openvino); "
                    "caption agreement with fp32 is measured and recorded in manifest.json")
    ex.add_argument("--no-verify", action="store_true", help="skip decoding a few windows with the export and torch to compare")
    ex.add_argument("--threads", type=int, default=None, help="torch CPU threads while exporting")
    ex.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from streamer.engine.export import export_model

    if args.threads:
        torch.set_num_threads(args.threads)

    def say(message: str) -> None:
        print(f"streamer export: {message}", file=sys.stderr, flush=True)

    manifest = export_model(args.model, args.output, int8=args.int8, verify=not args.no_verify, progress=say)
    data = manifest.data
    print(f"exported {data['model']} ({data['revision'][:19]}) to {manifest.path}: {data['precision']}, opset {data['opset']}")
    print(f"use it with: streamer caption VIDEO --backend onnxruntime --model {manifest.path}   (or --backend openvino)")
    return 0
