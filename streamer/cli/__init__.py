"""Command line: one module per command (`caption`, `train`, `eval`, `serve`, `tail`, `ask`, `demo`, `export`).

Each command module has `add_parser(subparsers)` and its `run_*` function; a
command imports torch (through the engine) only when it runs, so `--help` and
argument errors stay fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from streamer.cli import ask, caption, demo, evaluate, export, serve, tail, train
from streamer.cli.common import parse_duration
from streamer.errors import StreamerError
from streamer.ops.logs import setup_logging

__all__ = ["main", "build_parser", "parse_duration"]

log = logging.getLogger("streamer.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Real-time video captioning.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (caption, train, evaluate, serve, tail, ask, demo, export):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `streamer caption x.mp4 | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
