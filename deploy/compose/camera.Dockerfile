# The sample RTSP camera of deploy/docker-compose.yml (compose/rtsp_camera.py): GStreamer's RTSP
# server from Debian. Not for production: it serves a test pattern.
FROM debian:bookworm-slim
# Debian stable's package versions only move for security fixes: not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
       gstreamer1.0-plugins-ugly \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10002 --no-create-home --shell /usr/sbin/nologin camera
COPY rtsp_camera.py /usr/local/bin/rtsp_camera.py
USER 10002
EXPOSE 8554
CMD ["python3", "/usr/local/bin/rtsp_camera.py", "8554"]
