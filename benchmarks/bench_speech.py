"""Speech: utterance end -> speech cue latency, with audio played as live (20 ms chunks at real-time pace).

Held-out sentences of the synthetic world spoken by espeak-ng (a voice used in training), 1-2.5 s of quiet
between them, light noise. A producer thread feeds the VAD (streamer/speech/vad.py) as a live source would;
closed segments go to a worker thread that transcribes whatever is queued as one batch
(`SpeechEngine.transcribe`). Latency is cue.emit_time - the wall time the chunk holding the last voiced
sample arrived, so it includes the VAD's wait for silence (`min_silence`). Also: CPU seconds of the VAD and of
the model per second of audio, WER of the cues, starts within 0.5 s of where the words were placed.

    python benchmarks/bench_speech.py                          # bundled world-whisper, 30 utterances, 1 thread
    python benchmarks/bench_speech.py --model PATH --utterances 50 --threads 2

Needs espeak-ng and sox (deploy/apt-packages.txt). Writes benchmarks/results/speech-latency-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info  # noqa: E402
from streamer.speech.engine import SpeechConfig, SpeechEngine  # noqa: E402
from streamer.speech.vad import SAMPLE_RATE, VadConfig, VoiceActivitySegmenter  # noqa: E402
from streamer.training.speech import (  # noqa: E402
    TRAIN_VARIANTS,
    is_held_out_sentence,
    random_sentence,
    synthesize,
    word_error_rate,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="streamer/world-whisper")
    parser.add_argument("--utterances", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    result = measure(args.model, args.utterances, args.threads)
    result["machine"] = machine_info()
    out = Path(args.out) / "speech-latency-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


def measure(model: str, count: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(42)
    engine = SpeechEngine.load(SpeechConfig(model=model, device="cpu", threads=threads))
    vad_cfg = VadConfig(max_utterance=min(VadConfig().max_utterance, engine.window_seconds - 1.0))

    pieces, truth, t = [np.zeros(SAMPLE_RATE, np.float32)], [], 1.0
    while len(truth) < count:
        text = random_sentence(rng)
        if not is_held_out_sentence(text):
            continue
        voice = f"en-us+{TRAIN_VARIANTS[int(rng.integers(len(TRAIN_VARIANTS)))]}"
        a = synthesize(text, voice, 160, 50)
        nz = np.flatnonzero(np.abs(a) > 0.01)
        a = 0.5 * a[nz[0] : nz[-1] + 1]
        if len(a) > (vad_cfg.max_utterance - 0.2) * SAMPLE_RATE:
            continue
        gap = np.zeros(int(rng.uniform(1.0, 2.5) * SAMPLE_RATE), np.float32)
        truth.append((t, t + len(a) / SAMPLE_RATE, text))
        pieces += [a, gap]
        t += (len(a) + len(gap)) / SAMPLE_RATE
    track = np.concatenate(pieces)
    track += 0.003 * rng.standard_normal(len(track)).astype(np.float32)

    segments: queue.Queue = queue.Queue()
    cues = []
    cpu = {"vad": 0.0, "asr": 0.0}


    def produce() -> None:
        vad = VoiceActivitySegmenter("live", vad_cfg)
        chunk = SAMPLE_RATE // 50
        start = time.monotonic()
        wall0 = time.time()
        for i in range(0, len(track), chunk):
            due = start + (i + chunk) / SAMPLE_RATE  # the chunk is complete (arrives) at this time
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            c0 = time.thread_time()
            for seg in vad.feed(track[i : i + chunk], i / SAMPLE_RATE, arrival=wall0 + (i + chunk) / SAMPLE_RATE):
                segments.put(seg)
            cpu["vad"] += time.thread_time() - c0
        for seg in vad.flush():
            segments.put(seg)
        segments.put(None)


    def consume() -> None:
        done = False
        while not done:
            batch = [segments.get()]
            while not segments.empty():
                batch.append(segments.get_nowait())
            if batch[-1] is None:
                done = True
                batch = batch[:-1]
            if batch:
                c0 = time.thread_time()
                cues.extend(engine.transcribe(batch))
                cpu["asr"] += time.thread_time() - c0


    threads_ = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for th in threads_:
        th.start()
    for th in threads_:
        th.join()

    lat = np.array([c.latency for c in cues])
    audio_s = len(track) / SAMPLE_RATE
    matched = []
    for s, e, text in truth:
        near = [c for c in cues if abs(c.start - s) < 0.5]
        matched.append((text, near[0].text if near else ""))
    return {
        "model": engine.name, "threads": threads, "audio_s": round(audio_s, 1), "utterances": len(truth), "cues": len(cues),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 3), "latency_p99_s": round(float(np.percentile(lat, 99)), 3),
        "latency_max_s": round(float(lat.max()), 3), "vad_min_silence_s": vad_cfg.min_silence,
        "cpu_vad_per_audio_s": round(cpu["vad"] / audio_s, 4), "cpu_asr_per_audio_s": round(cpu["asr"] / audio_s, 4),
        "wer": round(word_error_rate([m[0] for m in matched], [m[1] for m in matched]), 4),
        "starts_within_0.5s": sum(1 for s, _, _ in truth if any(abs(c.start - s) <= 0.5 for c in cues)),
    }


if __name__ == "__main__":
    raise SystemExit(main())
