"""Start, kill, pause and restart a real RTSP server (tests/support/rtsp_server.py).

The server runs under Debian's /usr/bin/python3, which has the GStreamer gi
bindings (the venv does not). Tests call `require_rtsp_server()` first: it
skips with the reason when the packages in deploy/apt-packages.txt are missing.

    with RtspServer(pattern=True) as server:
        url = server.url          # rtsp://127.0.0.1:PORT/stream (rtsps:// with tls_cert=PEM)
        server.kill()             # crash it
        server.restart_same_port()

    with RtspServer(file="narrated.mp4", audio=True) as server:   # its H.264 and AAC, played once
        ...
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
_CHECK = "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"

__all__ = ["RtspServer", "rtsp_server_unavailable", "require_rtsp_server"]


@functools.cache
def rtsp_server_unavailable() -> str | None:
    """Why a test RTSP server cannot run here, or None if it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found (the GStreamer RTSP server runs under the system Python)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", _CHECK], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"GStreamer RTSP server bindings missing ({last}); apt-get install the packages in deploy/apt-packages.txt"
    return None


def require_rtsp_server() -> None:
    import pytest

    reason = rtsp_server_unavailable()
    if reason:
        pytest.skip(reason)


class RtspServer:
    """A gst-rtsp-server subprocess serving one mount on 127.0.0.1: a live test pattern, or a file
    (looped; with `audio`, its video and AAC audio played once)."""

    def __init__(
        self,
        *,
        file: str | Path | None = None,
        audio: bool = False,
        path: str = "/stream",
        user: str | None = None,
        password: str | None = None,
        digest: bool = False,
        tls_cert: str | Path | None = None,
        fps: int = 30,
        width: int = 320,
        height: int = 240,
        ready_timeout: float = 15.0,
    ) -> None:
        if audio and file is None:
            raise ValueError("audio=True serves a file's sound: give file=")
        self.file = Path(file) if file is not None else None
        self.audio = audio  # the file's AAC beside its video, played once (a camera with a microphone)
        self.path = path if path.startswith("/") else "/" + path
        self.user = user
        self.password = password
        self.digest = digest
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None  # PEM, certificate and key: rtsps://
        self.fps, self.width, self.height = fps, width, height
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        """The stream URL, with credentials when the server has them."""
        return self.url_with(self.user, self.password)

    def url_with(self, user: str | None, password: str | None) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        auth = ""
        if user is not None:
            auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "") + "@"
        return f"{'rtsps' if self.tls_cert else 'rtsp'}://{auth}127.0.0.1:{self.port}{self.path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, port: int = 0) -> RtspServer:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("server already running")
        args = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(port), "--path", self.path]
        if self.file is not None:
            args += ["--file", str(self.file)] + (["--audio"] if self.audio else [])
        else:
            args += ["--pattern", "--fps", str(self.fps), "--width", str(self.width), "--height", str(self.height)]
        if self.user is not None:
            args += ["--user", self.user, "--password", self.password or ""] + (["--digest"] if self.digest else [])
        if self.tls_cert is not None:
            args += ["--tls-cert", str(self.tls_cert)]
        # Own process group: a kill reaches the server and nothing of ours.
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self._proc = proc
        line = self._read_line(proc)
        try:
            self.port = int(line)
        except ValueError:
            self.stop()
            raise RuntimeError(f"RTSP server did not start: {line!r} {self._stderr(proc)}") from None
        return self

    def _read_line(self, proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                return proc.stdout.readline().strip()
            if proc.poll() is not None:
                return ""
        return ""

    @staticmethod
    def _stderr(proc: subprocess.Popen[str]) -> str:
        try:
            _, err = proc.communicate(timeout=2)
        except (subprocess.TimeoutExpired, ValueError):
            return ""
        return (err or "").strip()[-500:]

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers) and reap. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def kill(self) -> None:
        """Crash the server (SIGKILL): clients see their connection drop."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but go silent (a hung camera)."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    def restart_same_port(self, attempts: int = 20) -> RtspServer:
        """Stop (if running) and start again on the same port; retries while the port is busy."""
        port = self.port
        if port is None:
            raise RuntimeError("server never started")
        self.stop()
        for _ in range(attempts):
            try:
                return self.start(port)
            except RuntimeError:
                time.sleep(0.1)
        raise RuntimeError(f"cannot restart the RTSP server on port {port}")

    def __enter__(self) -> RtspServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

