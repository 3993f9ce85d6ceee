"""A real RTSP server for tests (GStreamer's gst-rtsp-server).

Run it with Debian's /usr/bin/python3, where the gi bindings live, not with the
project venv. Prints the bound port on stdout once it accepts connections, then
serves until SIGTERM/SIGINT.

    /usr/bin/python3 tests/support/rtsp_server.py --pattern --port 0 --path /stream
    /usr/bin/python3 tests/support/rtsp_server.py --file clip.mp4 --user u --password p
    /usr/bin/python3 tests/support/rtsp_server.py --pattern --tls-cert cert-and-key.pem   # rtsps://
    /usr/bin/python3 tests/support/rtsp_server.py --file narrated.mp4 --audio   # video and AAC audio

--file loops the clip by seeking back at its end, which restarts the RTP
timestamps within the session (clients see time jump back). Clips much shorter
than 2 s stop after the first pass. --file --audio serves the file's AAC too and
plays it once from the first client's PLAY (a camera with a microphone).
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gio", "2.0")
gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gio, GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

# x264 tuned for latency: no B-frames, a keyframe every second so a client that
# joins (or rejoins) mid-stream decodes within a second.
ENCODER = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=800"


def launch_line(args: argparse.Namespace) -> str:
    if args.file:
        # The file's own H.264 is re-packetised, not re-encoded.
        video = "h264parse name=parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=1"
        if not args.audio:
            return f'( filesrc location="{args.file}" ! qtdemux name=demux ! {video} )'
        # And its AAC as it is (RFC 3640, mpeg4-generic); a queue per branch so neither stalls the demuxer.
        return (
            f'( filesrc location="{args.file}" ! qtdemux name=demux demux.video_0 ! queue ! {video} '
            "demux.audio_0 ! queue ! aacparse ! rtpmp4gpay name=pay1 pt=97 )"
        )
    return (
        f"( videotestsrc is-live=true pattern={args.pattern_name} "
        f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
        f"! {ENCODER.format(fps=args.fps)} ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def _loop_file(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
    """Play the file forever: swallow EOS at the parser, seek back to the start."""
    pipeline = media.get_element()
    parse = pipeline.get_by_name("parse")
    demux = pipeline.get_by_name("demux")

    def rewind() -> bool:
        demux.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0)
        return False

    def on_event(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        if info.get_event().type == Gst.EventType.EOS:
            GLib.idle_add(rewind)
            return Gst.PadProbeReturn.DROP
        return Gst.PadProbeReturn.OK

    parse.get_static_pad("src").add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, on_event)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pattern", action="store_true", help="live videotestsrc")
    source.add_argument("--file", help="an .mp4 with H.264 video")
    parser.add_argument("--audio", action="store_true", help="with --file: its AAC audio too, played once")
    parser.add_argument("--pattern-name", default="ball", help="videotestsrc pattern (ball moves every frame)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--path", default="/stream")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--digest", action="store_true", help="digest authentication instead of basic")
    parser.add_argument("--tls-cert", help="PEM file with certificate and key: serve RTSP over TLS (rtsps://)")
    args = parser.parse_args()
    if args.audio and not args.file:
        parser.error("--audio needs --file")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args))
    factory.set_shared(True)  # one pipeline for all clients, like a camera
    if args.file and not args.audio:
        factory.connect("media-configure", _loop_file)

    if args.user is not None or args.tls_cert:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        if args.tls_cert:  # GstRtspServer speaks TLS on every connection once its auth has a certificate
            auth.set_tls_certificate(Gio.TlsCertificate.new_from_file(args.tls_cert))
        if args.user is None:
            auth.set_default_token(token)  # TLS without credentials: everyone may play
        elif args.digest:  # the client hashes the URI of its request line: a relay must not rewrite it
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
            auth.add_digest(args.user, args.password or "", token)
        else:
            basic = GstRtspServer.RTSPAuth.make_basic(args.user, args.password or "")
            auth.add_basic(basic, token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(
            Gst.Structure.new_from_string(
                "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )
        )
        factory.set_permissions(permissions)

    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print("cannot bind RTSP server", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print(server.get_bound_port(), flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
