#!/usr/bin/env bash
# Install everything the tests need (real RTSP server, browser, test wheels), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
