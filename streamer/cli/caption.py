"""`streamer caption VIDEO`: captions for a file (vtt, srt, jsonl, text)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from streamer.cli.common import (
    add_model_options,
    hwaccel_arg,
    parse_duration,
    positive_int,
)

log = logging.getLogger("streamer.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    cap = sub.add_parser("caption", help="caption a video file")
    cap.add_argument("video")
    add_model_options(cap)
    cap.add_argument("--window", type=parse_duration, default=3.0, help="seconds of video per caption (default 3s)")
    cap.add_argument("--frames", type=positive_int, default=None, help="frames per window (default: the model's)")
    cap.add_argument("--hop", type=parse_duration, default=1.0, help="seconds between captions (default 1s)")
    cap.add_argument("--summary", action="store_true", help="one caption for the whole video (with --question: one answer)")
    cap.add_argument("--question", default=None,
                     help='ask this about each window instead of captioning it: {"type": "answer", ...} JSON Lines')
    cap.add_argument("--qa-model", default=None,
                     help="with --question: the model that answers (e.g. a VQA checkpoint such as microsoft/git-base-vqav2; "
                     "hub id, HF cache entry or local directory), loaded as --model would be (default: --model)")
    cap.add_argument("--format", default=None, choices=["vtt", "srt", "jsonl", "text"], help="default vtt (jsonl with --speech)")
    cap.add_argument("--speech", action="store_true",
                     help='also transcribe the audio: {"type": "speech", ...} JSON Lines beside the captions, which are kept')
    cap.add_argument("--speech-model", default=None,
                     help="Whisper checkpoint: hub id, HF cache entry or local directory (default: openai/whisper-small "
                     "when cached or reachable, else the bundled streamer/world-whisper)")
    cap.add_argument("--chapters", action="store_true",
                     help="the file's chapters (scenes) instead of its captions: JSON Lines, or --format vtt for a "
                     "WebVTT chapters track")
    cap.add_argument("--batch-size", type=positive_int, default=8)
    cap.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    cap.add_argument("--no-progress", action="store_true")
    cap.add_argument("--hwaccel", type=hwaccel_arg, default=None, help="decode on this FFmpeg hardware device, e.g. cuda (NVDEC); software where unavailable")
    cap.set_defaults(run=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    from streamer.engine import Engine, EngineConfig
    from streamer.errors import ModelLoadError
    from streamer.media.decode import open_input
    from streamer.ops.progress import Progress
    from streamer.pipeline.offline import CaptionJob, caption_file
    from streamer.pipeline.sampler import SamplerConfig
    from streamer.publish.formats import CaptionWriter

    open_input(args.video).close()  # a bad file fails before the model loads
    if args.chapters:
        _check_chapters(args)
    fmt = args.format or ("jsonl" if args.speech or args.question is not None else "vtt")
    if args.question is not None and fmt != "jsonl":
        from streamer.errors import StreamerError

        raise StreamerError("--question writes JSON Lines (one answer per window): use --format jsonl (or leave it out)")
    if args.qa_model is not None and args.question is None:
        from streamer.errors import StreamerError

        raise StreamerError("--qa-model answers --question: give a --question (or leave --qa-model out)")
    speech = _speech_cues(args, fmt) if args.speech else []
    # With --question only answers are written: the answering model (--qa-model, else --model) is the only one loaded.
    model = args.qa_model if args.qa_model is not None else args.model
    try:
        engine = Engine.load(
            EngineConfig(model=model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                         threads=args.threads, backend=args.backend)
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"--qa-model: {exc}" if args.qa_model is not None else str(exc)) from None
    frames = args.frames or engine.num_frames
    if frames != engine.num_frames:
        log.warning("model takes a fixed frame count; windows are resampled", extra={"frames": frames, "model_frames": engine.num_frames})
    job = CaptionJob(
        video=args.video,
        sampler=SamplerConfig(window=args.window, frames=frames, hop=args.hop),
        summary=args.summary,
        batch_size=args.batch_size,
        hwaccel=args.hwaccel,
    )
    if args.chapters:
        return _chapters(args, engine, job)
    if args.question is not None:
        return _answer(args, engine, job, speech)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    progress = Progress(enabled=not args.no_progress, label=args.video)
    count = 0
    try:
        writer = CaptionWriter(fmt, out, min_duration=args.hop)
        for caption in caption_file(engine, job, on_progress=progress.update):
            while speech and speech[0].start <= caption.start:  # one timeline: lines in media-time order
                out.write(json.dumps(speech.pop(0).to_dict(), ensure_ascii=False) + "\n")
            writer.write(caption)
            count += 1
        for cue in speech:
            out.write(json.dumps(cue.to_dict(), ensure_ascii=False) + "\n")
        writer.close()
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    log.info("captioned", extra={"video": args.video, "captions": count})
    return 0


def _answer(args: argparse.Namespace, engine, job, speech: list) -> int:
    """--question: the answer about each window (one for the whole clip with --summary), as JSON Lines."""
    from streamer.errors import StreamerError
    from streamer.ops.progress import Progress
    from streamer.pipeline.offline import answer_file

    try:
        question = engine.check_question(args.question, args.max_new_tokens)
    except ValueError as exc:
        raise StreamerError(f"--question: {exc}") from None
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115 -- closed below
    progress = Progress(enabled=not args.no_progress, label=args.video)
    try:
        for answer in answer_file(engine, job, question, on_progress=progress.update):
            while speech and speech[0].start <= answer.start:
                out.write(json.dumps(speech.pop(0).to_dict(), ensure_ascii=False) + "\n")
            line = {k: v for k, v in answer.to_dict().items() if k not in ("request_id", "emit_time")}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        for cue in speech:
            out.write(json.dumps(cue.to_dict(), ensure_ascii=False) + "\n")
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    return 0


def _check_chapters(args: argparse.Namespace) -> None:
    from streamer.errors import StreamerError

    clash = [flag for flag, on in (("--summary", args.summary), ("--question", args.question is not None),
                                   ("--speech", args.speech)) if on]
    if clash:
        raise StreamerError(f"--chapters cuts the captions of every window into chapters: not with {', '.join(clash)}")
    if args.format not in (None, "jsonl", "vtt"):
        raise StreamerError("--chapters writes JSON Lines or a WebVTT chapters track: use --format jsonl or vtt")


def _chapters(args: argparse.Namespace, engine, job) -> int:
    """--chapters: the captions of every window cut into chapters (publish/chapters.py), written once each closes."""
    import time
    from dataclasses import replace

    from streamer.ops.progress import Progress
    from streamer.pipeline.offline import caption_file
    from streamer.publish.chapters import Chapterer, chapter_cue, chapter_dict

    vtt = args.format == "vtt"
    rule = Chapterer(args.video)  # the captions' stream_id
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115 -- closed below
    progress = Progress(enabled=not args.no_progress, label=args.video)
    count = 0

    def write(chapters) -> None:
        nonlocal count
        for chapter in chapters:
            count += 1
            if vtt:
                chapter_cue(chapter, out)
            else:
                line = chapter_dict(replace(chapter, emit_time=time.time()))
                del line["open"]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()

    try:
        if vtt:
            out.write("WEBVTT\n\n")
        for caption in caption_file(engine, job, on_progress=progress.update):
            write(rule.feed(caption))
        write(rule.flush())
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    log.info("chapters", extra={"video": args.video, "chapters": count})
    return 0


def _speech_cues(args: argparse.Namespace, fmt: str) -> list:
    """The file's speech cues in media-time order; none (with a note) for a file without audio."""
    from streamer.errors import StreamerError
    from streamer.speech.audio import has_audio

    if fmt != "jsonl":
        raise StreamerError("--speech writes JSON Lines beside the captions: use --format jsonl (or leave --format out)")
    if not has_audio(args.video):
        log.warning("no audio stream: no speech cues, captions only", extra={"video": args.video})
        return []
    from streamer.speech.engine import SpeechConfig, SpeechEngine
    from streamer.speech.offline import transcribe_file

    engine = SpeechEngine.load(SpeechConfig(model=args.speech_model, device=args.device, dtype=args.dtype, threads=args.threads))
    cues = transcribe_file(engine, args.video, stream_id=args.video)  # the captions' stream_id
    log.info("speech transcribed", extra={"video": args.video, "cues": len(cues), "model": engine.name})
    return sorted(cues, key=lambda c: c.start)
