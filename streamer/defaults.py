"""Defaults shared by light modules (CLI parsing must not import torch)."""

DEFAULT_MODEL = "microsoft/git-base-vatex"
