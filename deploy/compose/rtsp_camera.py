"""A sample RTSP camera for deploy/docker-compose.yml: GStreamer's RTSP server (Debian packages).

Serves rtsp://0.0.0.0:8554/live, a live 320x240 15 fps H.264 test pattern (a ball moving across
the frame), to any number of clients. No mediamtx: its binary cannot be fetched in every build
environment, and GStreamer's server is what the test suite uses too (tests/support/rtsp.py).
"""

import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

LAUNCH = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def main() -> int:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("0.0.0.0")
    server.set_service(sys.argv[1] if len(sys.argv) > 1 else "8554")
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(LAUNCH)
    factory.set_shared(True)  # one encoder for every client, as a camera has
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print("rtsp_camera: cannot listen", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print(f"rtsp_camera: serving rtsp://0.0.0.0:{server.get_bound_port()}/live", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
