"""Defaults shared by light modules (CLI parsing must not import torch)."""

from pathlib import Path

DEFAULT_MODEL = "microsoft/git-base-vatex"

# A small GIT trained on the synthetic world (streamer/world.py), shipped in the
# package: the model used when no --model is given and DEFAULT_MODEL is neither
# in the HF cache nor reachable. streamer/models/world-git/training_args.json
# records how it was trained.
BUNDLED_MODEL = Path(__file__).parent / "models" / "world-git"
BUNDLED_MODEL_NAME = "streamer/world-git"
