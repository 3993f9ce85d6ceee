"""`streamer serve`, `streamer tail` and `streamer demo` (the live daemon)."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
