"""A WHIP publisher built on GStreamer's webrtcbin, for tests (a peer nobody on this project wrote).

Debian packages no `whipsink`, so this drives `webrtcbin` itself: create the
offer, POST it as application/sdp, set the answer. Run it with Debian's
/usr/bin/python3 (the gi bindings live there), not the venv:

    /usr/bin/python3 tests/support/gst_whip.py URL --source vp8|h264-file:PATH [--token T] [--setup passive]

It prints one JSON object per line on stdout: {"event": "answer", "status", "location"},
{"event": "error", "message"}, {"event": "ice", "state"}, {"event": "connection", "state"}.
After a failed POST it exits; after a pipeline error (a failed DTLS handshake) it stays.
SIGTERM: DELETE the session (its Location) and exit; SIGKILL makes it vanish as a
crashed publisher does. `WhipPublisher` (below the script part) runs it from the tests;
GST_WHIP_LOG=PATH keeps its stderr (e.g. with GST_DEBUG=webrtcbin:5,dtlsconnection:5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

GST_PYTHON = "/usr/bin/python3"

PIPELINES = {
    # live test pattern, VP8
    "vp8": "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 "
    "! videoconvert ! vp8enc deadline=1 keyframe-max-dist=30 ! rtpvp8pay pt=96 "
    "! application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000 ! webrtc.",
    # a real H.264 file, sent as it is (no re-encode), paced at real time by identity sync=true
    "h264-file": "filesrc location={path} ! qtdemux ! h264parse config-interval=-1 ! identity sync=true "
    "! rtph264pay pt=102 config-interval=-1 aggregate-mode=zero-latency "
    "! application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000 ! webrtc.",
}


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str]) -> int:  # runs under /usr/bin/python3 only
    import argparse

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstWebRTC", "1.0")
    gi.require_version("GstSdp", "1.0")
    from gi.repository import GLib, Gst, GstSdp, GstWebRTC

    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--source", default="vp8")
    parser.add_argument("--token")
    parser.add_argument("--setup", default="actpass", choices=("actpass", "passive", "active"))
    args = parser.parse_args(argv)

    Gst.init(None)
    kind, _, path = args.source.partition(":")
    pipeline = Gst.parse_launch(
        "webrtcbin name=webrtc bundle-policy=max-bundle " + PIPELINES[kind].format(path=path)
    )
    webrtc = pipeline.get_by_name("webrtc")
    # TEST ONLY: gather on loopback alone (the daemon under test answers with 127.0.0.1).
    # Keep the agent's Python wrapper alive: PyGObject sinks the (still floating) agent, and
    # letting the wrapper go would free what webrtcbin still uses.
    ice_agent = webrtc.get_property("ice-agent")
    ice_agent.emit("add-local-ip-address", "127.0.0.1")
    loop = GLib.MainLoop()
    location: list[str] = []

    def request(method: str, url: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/sdp"} if body is not None else {}
        if args.token:
            headers["Authorization"] = f"Bearer {args.token}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
        except OSError as exc:  # refused, reset, timed out
            return 0, {}, str(exc).encode()

    def fail(message: str) -> None:
        _emit(event="error", message=message)
        loop.quit()

    def on_gathered(offer) -> None:
        sdp = webrtc.get_property("local-description").sdp.as_text()
        if args.setup != "actpass":  # a publisher that insists on its DTLS role
            sdp = sdp.replace("a=setup:actpass", f"a=setup:{args.setup}")
        status, headers, body = request("POST", args.url, sdp.encode())
        where = headers.get("Location") or headers.get("location")
        _emit(event="answer", status=status, location=where, body=body.decode(errors="replace")[:500])
        if status != 201:
            return fail(f"POST answered {status}")
        location.append(urllib.parse.urljoin(args.url, where))
        _, message = GstSdp.SDPMessage.new_from_text(body.decode())
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        webrtc.emit("set-remote-description", answer, Gst.Promise.new())

    def on_offer(promise) -> None:
        promise.wait()
        reply = promise.get_reply()
        if reply is None or not reply.has_field("offer"):
            return fail(f"create-offer failed: {reply.to_string() if reply else None}")
        offer = reply.get_value("offer")
        webrtc.emit("set-local-description", offer, Gst.Promise.new())

    def on_gathering(element, _pspec) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(lambda: on_gathered(None) and False)  # no trickle: WHIP gets every candidate at once

    def on_negotiation(element) -> None:
        element.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer))

    def on_state(element, pspec) -> None:
        _emit(event=pspec.name.split("-")[0], state=element.get_property(pspec.name).value_nick)

    webrtc.connect("on-negotiation-needed", on_negotiation)
    webrtc.connect("notify::ice-gathering-state", on_gathering)
    webrtc.connect("notify::ice-connection-state", on_state)
    webrtc.connect("notify::connection-state", on_state)
    bus = pipeline.get_bus()
    bus.add_signal_watch()

    def on_error(_bus, msg) -> None:
        # Report it and stay until SIGTERM, as a browser tab does. Quitting here raced the pipeline's
        # teardown against dtlsenc's thread still holding the DTLS alert ("no shared cipher") that
        # tells the daemon why: about one run in ten the alert never left, and the daemon heard
        # nothing until its connect timeout.
        _emit(event="error", message=f"gstreamer: {msg.parse_error()[0].message}")

    bus.connect("message::error", on_error)

    def on_term() -> bool:
        if location:
            status, _, _ = request("DELETE", location[0])
            _emit(event="deleted", status=status)
        loop.quit()
        return False

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, on_term)
    pipeline.set_state(Gst.State.PLAYING)
    try:
        loop.run()
    finally:
        pipeline.set_state(Gst.State.NULL)
    del ice_agent
    return 0


# -- for the tests (venv side) --------------------------------------------------------------


def gst_webrtc_missing() -> str | None:
    """Why the GStreamer publisher cannot run here, or None."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
        "gi.require_version('GstSdp', '1.0'); from gi.repository import Gst; Gst.init(None);"
        "missing = [e for e in ('webrtcbin', 'nicesrc', 'vp8enc', 'rtpvp8pay', 'rtph264pay', 'h264parse', 'qtdemux')"
        " if Gst.ElementFactory.find(e) is None]; print(','.join(missing))"
    )
    if not os.path.exists(GST_PYTHON):
        return f"{GST_PYTHON} is missing"
    done = subprocess.run([GST_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return "GStreamer WebRTC bindings missing (deploy/apt-packages.txt): " + done.stderr.strip().splitlines()[-1]
    if done.stdout.strip():
        return f"GStreamer elements missing (deploy/apt-packages.txt): {done.stdout.strip()}"
    return None


class WhipPublisher:
    """The script above as a subprocess (made inside a running loop); `next_event()` reads
    what it prints, through a reader thread (a read cut off by a timeout would lose a line)."""

    def __init__(self, url: str, source: str = "vp8", token: str | None = None, setup: str = "actpass") -> None:
        import asyncio
        import tempfile
        import threading

        cmd = [GST_PYTHON, __file__, url, "--source", source, "--setup", setup]
        if token:
            cmd += ["--token", token]
        # stderr to a file, not a pipe: nobody reads a pipe while the publisher runs, and a full one
        # (GST_DEBUG, warnings) would block it mid-handshake. GST_WHIP_LOG=PATH keeps it for debugging.
        keep = os.environ.get("GST_WHIP_LOG")
        self._stderr = open(keep, "a+") if keep else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.seen: list[dict] = []
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def read() -> None:
            for line in self.proc.stdout:
                loop.call_soon_threadsafe(self._lines.put_nowait, line)
            loop.call_soon_threadsafe(self._lines.put_nowait, "")

        threading.Thread(target=read, name="gst-whip-stdout", daemon=True).start()

    async def next_event(self, timeout: float) -> dict:
        """The next event line (fails after `timeout` s or when the process ends)."""
        import asyncio

        line = await asyncio.wait_for(self._lines.get(), timeout)
        if not line:
            self._lines.put_nowait("")  # stays ended
            raise AssertionError(f"publisher exited {self.proc.wait(10)}: {self.stderr_tail()}")
        event = json.loads(line)
        self.seen.append(event)
        return event

    async def wait_for(self, event: str, timeout: float = 20) -> dict:
        """The next `event` (or an error event); fails after `timeout` s."""
        import asyncio
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                got = await self.next_event(max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(f"no {event!r} event within {timeout} s; saw {self.seen}") from None
            if got["event"] in (event, "error"):
                return got

    def stderr_tail(self, chars: int = 2000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    async def kill(self) -> None:
        """Vanish without a word, as a crashed publisher does."""
        import asyncio

        if self.proc.poll() is None:
            self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 10)

    async def stop(self) -> None:
        """End politely (it DELETEs its session: the daemon must be free to answer), then make sure it is gone."""
        import asyncio

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        self._stderr.close()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
