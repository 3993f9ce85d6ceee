#!/usr/bin/env bash
# The main job: install, then caption a live synthetic stream end to end
# (ingest -> ring buffer -> sampler -> engine -> WebSocket) and print the captions.
# A voice (espeak-ng, installed here with sox where apt-get is available) narrates each
# scene and the speech cues are printed beside the captions; --no-speech: captions only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh --demo >&2
exec .venv/bin/streamer demo "$@"
