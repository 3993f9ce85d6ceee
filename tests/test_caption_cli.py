"""`streamer caption` end to end: real files made here, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import srt
import webvtt

from streamer.pipeline.offline import CaptionJob, caption_file
from streamer.pipeline.sampler import SamplerConfig
from tests.support.media import moving_square, truncate, write_audio_only, write_video


def streamer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_vtt_cues_are_media_aligned_for_a_file_starting_at_2s(tmp_path, tiny_model, clip_10s):
    out = tmp_path / "c.vtt"
    result = streamer("caption", str(clip_10s), "--model", str(tiny_model), "--format", "vtt",
                      "--max-new-tokens", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    cues = list(webvtt.read(str(out)))
    assert cues, "no cues"
    starts = [c.start_in_seconds for c in cues]
    assert starts == sorted(starts)
    assert 2.0 <= starts[0] < 2.5  # media time, not 0
    assert cues[-1].end_in_seconds <= 12.0 + 1.0
    for a, b in zip(cues, cues[1:]):
        assert a.end_in_seconds <= b.start_in_seconds  # no overlap
    assert result.stdout == ""  # the file got the output, stdout nothing


def test_every_window_is_captioned_once_in_order(tiny_engine, clip_10s):
    job = CaptionJob(str(clip_10s), SamplerConfig(window=3.0, frames=6, hop=1.0), batch_size=3)
    captions = list(caption_file(tiny_engine, job))
    assert [c.index for c in captions] == list(range(8))  # windows starting at 2..9 s
    assert [round(c.start - captions[0].start, 3) for c in captions] == [float(k) for k in range(8)]
    assert all(2.0 <= c.start < c.end <= 12.0 for c in captions)


def test_variable_frame_rate_file_uses_real_frame_times(tmp_path, tiny_engine):
    times, t = [], 1.0
    for i in range(120):
        times.append(round(t, 4))
        t += 1 / 30 if (i // 20) % 2 == 0 else 1 / 5  # bursts of 30 fps and 5 fps
    path = write_video(tmp_path / "vfr.mkv", moving_square(len(times)), times=times)
    job = CaptionJob(str(path), SamplerConfig(window=2.0, frames=6, hop=1.0))
    captions = list(caption_file(tiny_engine, job))
    assert captions
    for c in captions:  # every caption's times are the pts of real frames
        assert min(abs(c.start - x) for x in times) < 1e-3
        assert min(abs(c.end - x) for x in times) < 1e-3


def test_summary_is_one_caption_spread_over_the_whole_video(tiny_engine, clip_10s):
    job = CaptionJob(str(clip_10s), SamplerConfig(window=3.0, frames=6, hop=1.0), summary=True)
    (caption,) = list(caption_file(tiny_engine, job))
    assert caption.start < 3.0 and caption.end > 11.0  # frames from the first and last seconds


def test_window_longer_than_the_video_gives_one_caption_of_all_of_it(tmp_path, tiny_engine, caplog):
    path = write_video(tmp_path / "short.mp4", moving_square(45))  # 1.5 s
    job = CaptionJob(str(path), SamplerConfig(window=10.0, frames=6, hop=1.0))
    (caption,) = list(caption_file(tiny_engine, job))
    assert caption.start < 0.2 and caption.end > 1.2
    assert "window longer than the video" in caplog.text


@pytest.mark.parametrize("fmt", ["srt", "jsonl", "text"])
def test_other_formats(tmp_path, tiny_model, clip_10s, fmt):
    result = streamer("caption", str(clip_10s), "--model", str(tiny_model), "--format", fmt,
                      "--max-new-tokens", "3", "--window", "2s", "--hop", "2s")
    assert result.returncode == 0, result.stderr
    if fmt == "srt":
        subs = list(srt.parse(result.stdout))
        assert subs and subs[0].start.total_seconds() >= 2.0
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(rows) == 5  # windows at 2, 4, 6, 8, 10 s
        assert [r["index"] for r in rows] == list(range(5))
        assert all(r["model"] == str(tiny_model) and r["confidence"] <= 0 for r in rows)
    else:
        assert result.stdout.strip()


def _empty_video(path: Path) -> Path:
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    out.start_encoding()
    out.close()
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "garbage.mp4").write_bytes(b"\x00not a video" * 100) and d / "garbage.mp4", "cannot open"),
        (lambda d: write_audio_only(d / "audio.m4a"), "has no video stream"),
        (lambda d: _empty_video(d / "empty.mkv"), "no video frames"),
        (lambda d: d, "is a directory"),
    ],
    ids=["missing", "corrupt", "audio-only", "zero-length", "directory"],
)
def test_bad_video_is_one_clear_line_and_exit_2(tmp_path, tiny_model, make, expected):
    path = make(tmp_path)
    result = streamer("caption", str(path), "--model", str(tiny_model))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_truncated_file_captions_what_decodes(tmp_path, tiny_engine, caplog):
    full = write_video(tmp_path / "full.mkv", moving_square(150, 160, 120))  # 5 s
    cut = truncate(full, tmp_path / "cut.mkv", 0.6)
    job = CaptionJob(str(cut), SamplerConfig(window=1.0, frames=6, hop=1.0))
    captions = list(caption_file(tiny_engine, job))
    assert 1 <= len(captions) < 5
    assert all(c.end < 5.0 for c in captions)


def test_unknown_model_is_one_clear_line(clip_10s):
    result = streamer("caption", str(clip_10s), "--model", "nobody/missing-model")
    assert result.returncode == 2
    assert "nobody/missing-model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args", [["--window", "0s"], ["--hop", "abc"], ["--frames", "0"], ["--format", "docx"], ["--hwaccel", "nvdec"]]
)
def test_bad_options_are_rejected_before_any_work(clip_10s, args):
    result = streamer("caption", str(clip_10s), *args)
    assert result.returncode == 2 and "error" in result.stderr


def test_hardware_decoding_request_captions_the_same_with_or_without_the_device(tmp_path, tiny_model, clip_10s):
    # --hwaccel cuda: NVDEC where FFmpeg can open a CUDA device; here (no GPU) the
    # decoder says once that it falls back to software, and nothing else changes.
    from streamer.media.decode import hardware_decoding

    outputs = {}
    for name, extra in (("software", []), ("hwaccel", ["--hwaccel", "cuda"])):
        out = tmp_path / f"{name}.jsonl"
        result = streamer("caption", str(clip_10s), "--model", str(tiny_model), "--format", "jsonl",
                          "--max-new-tokens", "4", "--no-progress", "-o", str(out), *extra)
        assert result.returncode == 0, result.stderr
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
        if name == "hwaccel" and not hardware_decoding("cuda"):
            assert result.stderr.count("hardware decoding unavailable") == 1, result.stderr
    strip = lambda rows: [(r["start"], r["end"], r["text"]) for r in rows]  # noqa: E731
    assert strip(outputs["hwaccel"]) == strip(outputs["software"]) and outputs["software"]
