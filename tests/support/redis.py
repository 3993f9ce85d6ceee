"""A real redis-server on a free loopback port, for the caption bus and lease tests."""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["RedisServer"]


class RedisServer:
    """`redis-server` on 127.0.0.1, no persistence (a restart loses everything, the worst case)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             # small stream nodes, so that MAXLEN ~ trims at a few entries (the gap test)
             "--stream-node-max-entries", "4", "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        for line in self.proc.stdout:  # its own word that it listens
            if "Ready to accept connections" in line:
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None
