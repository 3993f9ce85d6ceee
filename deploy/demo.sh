#!/usr/bin/env bash
# The main job: install, then caption a live synthetic stream end to end
# (ingest -> ring buffer -> sampler -> engine -> WebSocket) and print the captions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh >&2
exec .venv/bin/streamer demo "$@"
