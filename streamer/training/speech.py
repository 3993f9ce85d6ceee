"""`streamer train --task speech`: a tiny Whisper trained on synthetic speech.

Data: sentences of the synthetic world (its captions, its questions, numbers
up to ninety-nine, two captions joined by "and" / "then") spoken by Debian's
`espeak-ng` in many voices (accent x voice variant), speeds and pitches,
resampled to 16 kHz by `sox`, with noise mixed in by numpy at random SNR.
Some sentences (by a hash of their text) and some voice variants are never
trained on: the held-out figures are on those.

The model is Whisper-shaped (transformers `WhisperForConditionalGeneration`)
and small: 6 s windows at a 20 ms hop (300 log-mel frames, 150 encoder
positions), d_model 128, 3 encoder and 2 decoder layers, a byte-level BPE
tokenizer whose merges spell exactly the vocabulary's words (one token per
word). It is saved with its `WhisperProcessor`, so anything that loads a
Whisper checkpoint loads it.

The loop is the caption trainer's: AdamW, warm-up + cosine, gradient
clipping, `--out DIR/checkpoint-N` with the optimizer state every
`--save-every` steps (`--resume` continues from the newest), and a WER check
on held-out sentences at every checkpoint (`curve.jsonl`: the learning curve).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from streamer.errors import StreamerError
from streamer.training.loop import Progress, RunConfig, cosine_schedule, optimizer_step, save_checkpoint, save_training_state

__all__ = [
    "HELD_OUT_VARIANTS",
    "SAMPLE_RATE",
    "SpeechTrainConfig",
    "Utterance",
    "evaluate_wer",
    "is_held_out_sentence",
    "new_whisper_model",
    "random_sentence",
    "speech_vocabulary",
    "synthesize",
    "train_speech",
    "whisper_tokenizer",
    "word_error_rate",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 6  # the model's window: longer utterances are cut by the VAD before they reach it
HOP_LENGTH = 320  # 20 ms mel frames (Whisper's 10 ms halved: half the encoder's work on a CPU)

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# Voices: an espeak-ng English accent with a voice variant ("en-us+f3"). The
# held-out variants never speak a training sentence, in any accent.
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m4", "m5", "m7", "f1", "f2", "f3", "f5", "Alex", "Andy", "Annie", "john", "rob",
                  "steph", "max", "Lee", "edward", "linda", "Michael")
HELD_OUT_VARIANTS = ("m3", "f4", "paul", "Andrea", "david")
SPEEDS = (120, 195)  # words per minute
PITCHES = (20, 80)  # espeak-ng's 0..99


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens - 2] + ("" if ones == 0 else " " + ONES[ones])


def speech_vocabulary() -> list[str]:
    """Every word the bundled speech model can write."""
    from streamer.training.world import world_vocabulary

    return sorted(set(world_vocabulary()) | set(ONES) | set(TENS) | {"and", "then"})


def _random_caption(rng: np.random.Generator) -> str:
    from streamer.training.world import COLOURS, LIVE_EVENTS, NOTHING, SHAPES, SIZES, WindowTruth

    if rng.random() < 0.03:
        return NOTHING
    truth = WindowTruth(
        1 if rng.random() < 0.6 else 2, list(SIZES)[rng.integers(len(SIZES))], list(COLOURS)[rng.integers(len(COLOURS))],
        SHAPES[rng.integers(len(SHAPES))], LIVE_EVENTS[rng.integers(len(LIVE_EVENTS))],
    )
    return truth.caption


def random_sentence(rng: np.random.Generator) -> str:
    """A sentence of the speech vocabulary: a caption (most), a question, a number or a few, two captions."""
    from streamer.training.world import _ASK, COLOURS, SHAPES

    r = rng.random()
    if r < 0.45:
        return _random_caption(rng)
    if r < 0.60:
        if rng.random() < 0.4:
            return f"is there a {list(COLOURS)[rng.integers(len(COLOURS))]} {SHAPES[rng.integers(len(SHAPES))]}"
        kind = list(_ASK)[rng.integers(len(_ASK))]
        return _ASK[kind][rng.integers(len(_ASK[kind]))].rstrip(" ?")
    if r < 0.82:
        return " ".join(number_words(int(rng.integers(100))) for _ in range(int(rng.integers(1, 5))))
    first, second = _random_caption(rng), _random_caption(rng)
    return f"{first} {'and' if rng.random() < 0.5 else 'then'} {second}"


def is_held_out_sentence(text: str) -> bool:
    """One sentence in eight (by a stable hash of its text) is never trained on."""
    return zlib.crc32(text.encode()) % 8 == 0


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    speed: int
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


def random_voice(rng: np.random.Generator, variants: Sequence[str]) -> Voice:
    return Voice(ACCENTS[rng.integers(len(ACCENTS))], variants[int(rng.integers(len(variants)))],
                 int(rng.integers(*SPEEDS)), int(rng.integers(*PITCHES)))


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50, *, timeout: float = 20.0) -> np.ndarray:
    """`text` spoken by espeak-ng, resampled by sox: float32 mono at 16 kHz."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise StreamerError(f"{tool} not found: install it (apt-get install espeak-ng sox) to synthesise speech")
    speak = subprocess.Popen(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        raw = subprocess.run(
            ["sox", "-t", "wav", "-", "-t", "raw", "-r", str(SAMPLE_RATE), "-e", "floating-point", "-b", "32", "-c", "1", "-"],
            stdin=speak.stdout, capture_output=True, timeout=timeout, check=True,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise StreamerError(f"espeak-ng/sox failed for voice {voice!r}: {exc}") from None
    finally:
        if speak.stdout is not None:
            speak.stdout.close()
        speak.wait(timeout)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


@dataclass
class Utterance:
    text: str
    voice: str
    audio: np.ndarray  # float32, 16 kHz mono, clean (noise is added per draw)


def make_utterances(count: int, seed: int, *, variants: Sequence[str], held_out: bool, workers: int = 2) -> list[Utterance]:
    """`count` synthesized sentences that fit the model's window; `held_out`
    picks sentences from the held-out eighth, else from the rest."""
    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, Voice]] = []
    while len(jobs) < count:
        text = random_sentence(rng)
        if is_held_out_sentence(text) == held_out:
            jobs.append((text, random_voice(rng, variants)))

    def one(job: tuple[str, Voice]) -> Utterance:
        text, v = job
        return Utterance(text, v.name, synthesize(text, v.name, v.speed, v.pitch))

    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(one, jobs))
    limit = (CHUNK_SECONDS - 0.6) * SAMPLE_RATE  # room for the VAD's padding
    return [u for u in done if 0 < len(u.audio) <= limit]


def save_utterances(path: Path, utterances: list[Utterance]) -> None:
    lengths = np.array([len(u.audio) for u in utterances])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, audio=np.concatenate([u.audio for u in utterances]).astype(np.float16), lengths=lengths,
             texts=np.array([u.text for u in utterances]), voices=np.array([u.voice for u in utterances]))
    tmp.rename(path)


def load_utterances(path: Path) -> list[Utterance]:
    data = np.load(path)
    ends = np.cumsum(data["lengths"])
    audio = data["audio"].astype(np.float32)
    return [Utterance(str(t), str(v), audio[e - n : e])
            for t, v, n, e in zip(data["texts"], data["voices"], data["lengths"], ends)]


def cached_utterances(path: Path, count: int, seed: int, **kw) -> list[Utterance]:
    if path.is_file():
        return load_utterances(path)
    started = time.monotonic()
    utterances = make_utterances(count, seed, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_utterances(path, utterances)
    log.warning("speech synthesised", extra={"file": str(path), "utterances": len(utterances),
                                             "seconds": round(time.monotonic() - started, 1)})
    return utterances


# ---- noise -----------------------------------------------------------------

def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    noise = np.fft.irfft(spectrum / f ** (exponent / 2), n)
    return (noise / (noise.std() + 1e-9)).astype(np.float32)


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    base = 50.0 if rng.random() < 0.5 else 60.0
    wave = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    wave = wave + 0.3 * rng.standard_normal(n)
    return (wave / (wave.std() + 1e-9)).astype(np.float32)


def noisy(
    audio: np.ndarray, rng: np.random.Generator, *, snr_db: tuple[float, float] = (5.0, 35.0), noise_share: float = 0.85
) -> np.ndarray:
    """A draw of one utterance as a microphone and the VAD would hand it over:
    0.05-0.5 s of room before and after, random level, and (`noise_share` of
    the time) noise of a random colour (white, pink, brown, mains hum) at a random SNR."""
    lead, trail = (int(rng.uniform(0.05, 0.5) * SAMPLE_RATE) for _ in range(2))
    out = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(trail, np.float32)])
    out *= rng.uniform(0.1, 1.0) / (np.abs(audio).max() + 1e-9)
    if rng.random() < noise_share:
        kind = rng.random()
        noise = _hum(rng, len(out)) if kind < 0.15 else _coloured_noise(rng, len(out), float(rng.choice([0.0, 1.0, 2.0])))
        speech = out[lead : lead + len(audio)]
        speech_rms = float(np.sqrt(np.mean(speech**2)))
        out += noise * speech_rms / 10 ** (rng.uniform(*snr_db) / 20)
    return np.clip(out, -1.0, 1.0)


def non_speech(rng: np.random.Generator) -> np.ndarray:
    """0.5-5 s of sound that is not speech and should transcribe to nothing: noise of
    a random colour, mains hum, steady tones or chords, note sequences (music-like:
    harmonic notes with decaying envelopes), or clicks; at a random level."""
    n = int(rng.uniform(0.5, 5.0) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    kind = int(rng.integers(5))
    if kind == 0:
        out = _coloured_noise(rng, n, float(rng.uniform(0.0, 2.0)))
    elif kind == 1:
        out = _hum(rng, n)
    elif kind == 2:  # a tone or a chord
        out = np.sum([np.sin(2 * np.pi * rng.uniform(80, 3000) * t) for _ in range(int(rng.integers(1, 4)))], axis=0)
    elif kind == 3:  # notes: fundamentals 100-1000 Hz with harmonics, each decaying, sometimes overlapping
        out = np.zeros(n)
        pos = 0
        while pos < n:
            length = int(rng.uniform(0.1, 0.6) * SAMPLE_RATE)
            tt = np.arange(min(length * 2, n - pos)) / SAMPLE_RATE
            f0 = rng.uniform(100, 1000)
            note = sum(np.sin(2 * np.pi * f0 * k * tt) / k ** rng.uniform(1, 2) for k in range(1, 6))
            out[pos : pos + len(tt)] += note * np.exp(-tt * rng.uniform(2, 10))
            pos += length
    else:  # clicks
        out = np.zeros(n)
        for i in rng.integers(0, n, int(rng.integers(2, 20))):
            out[i : i + 40] += rng.standard_normal(min(40, n - i)) * np.exp(-np.arange(min(40, n - i)) / 8)
    out = np.asarray(out, dtype=np.float32)
    return (out * rng.uniform(0.05, 0.9) / (np.abs(out).max() + 1e-9)).astype(np.float32)


# ---- tokenizer and model ------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                  "<|nocaptions|>", "<|notimestamps|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level BPE's base vocabulary is)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def whisper_tokenizer(words: Iterable[str]):
    """A WhisperTokenizer whose merges build each word (with its leading space)
    into one token, over the full byte alphabet (any text still encodes).

    Every merge's left side is a word prefix that starts with the space mark,
    so the merges of one word can never fire inside another."""
    from transformers import WhisperTokenizer

    space = _byte_alphabet()[ord(" ")]
    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        piece = space
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=64, pad_token="<|endoftext|>",
                            additional_special_tokens=SPECIAL_TOKENS[1:])


def new_whisper_model(
    tokenizer=None, *, d_model: int = 128, encoder_layers: int = 3, decoder_layers: int = 2, heads: int = 4,
    chunk_seconds: int = CHUNK_SECONDS, hop_length: int = HOP_LENGTH, seed: int = 0,
):
    """A randomly initialised Whisper with its processor (feature extractor + tokenizer)."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tokenizer = tokenizer if tokenizer is not None else whisper_tokenizer(speech_vocabulary())
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=hop_length,
                                       chunk_length=chunk_seconds, n_fft=400)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=d_model, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, max_source_positions=features.nb_max_frames // 2,
        max_target_positions=64, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"], suppress_tokens=None, begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    # English-only shape (as whisper-tiny.en): the prompt is <|startoftranscript|><|notimestamps|>
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=False, max_length=64,
        # No begin_suppress_tokens (OpenAI's checkpoints suppress end-of-text first): an empty
        # transcript is this model's answer to a sound without speech (`nonspeech_share`).
        suppress_tokens=[],
    )
    return model, WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


# ---- evaluation -------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: word edits (substitutions + insertions + deletions) / reference words."""
    edits = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = _words(ref), _words(hyp)
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        edits += row[-1]
        total += len(r)
    return edits / max(total, 1)


@torch.no_grad()
def transcribe_arrays(model, processor, audios: Sequence[np.ndarray], batch_size: int = 32) -> list[str]:
    out: list[str] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(audios), batch_size):
        feats = processor.feature_extractor(list(audios[i : i + batch_size]), sampling_rate=SAMPLE_RATE,
                                            return_tensors="pt").input_features.to(model.device, model.dtype)
        ids = model.generate(feats)
        out.extend(t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def evaluate_wer(model, processor, utterances: Sequence[Utterance], seed: int = 0) -> dict:
    """WER on noisy draws of `utterances` (the same draws for the same seed), and a few examples."""
    rng = np.random.default_rng(seed)
    audios = [noisy(u.audio, rng) for u in utterances]
    hyps = transcribe_arrays(model, processor, audios)
    refs = [u.text for u in utterances]
    exact = sum(_words(r) == _words(h) for r, h in zip(refs, hyps))
    errors = [{"ref": r, "hyp": h, "voice": u.voice} for r, h, u in zip(refs, hyps, utterances) if _words(r) != _words(h)]
    return {"wer": round(word_error_rate(refs, hyps), 4), "sentence_exact": round(exact / max(len(refs), 1), 4),
            "utterances": len(refs), "errors": errors[:8]}


def evaluate_non_speech(model, processor, count: int, seed: int = 0) -> float:
    """Share of `count` non-speech sounds (`non_speech`, held-out draws) the model writes words for."""
    rng = np.random.default_rng(10_000 + seed)
    hyps = transcribe_arrays(model, processor, [non_speech(rng) for _ in range(count)])
    return round(sum(bool(_words(h)) for h in hyps) / max(count, 1), 4)


# ---- training -----------------------------------------------------------------------

@dataclass(frozen=True)
class SpeechTrainConfig(RunConfig):
    """A speech run (`streamer train --task speech`): RunConfig's fields ("model": "new" or a Whisper
    checkpoint directory), then its data."""

    steps: int = 5000
    train_utterances: int = 12_000  # clean clips synthesised once (cached in OUT/data); noise is new every draw
    eval_utterances: int = 96  # per held-out set at each checkpoint (the final check uses 4x as many)
    data_dir: str | None = None  # where the synthesised clips are cached (default OUT/data)
    # share of a batch that is sound without speech (noise, hum, tones, notes, clicks), labelled with no words:
    # the model learns to say nothing where the VAD let a non-speech sound through
    nonspeech_share: float = 0.0


def _eval_sets(data: Path, count: int, seed: int) -> dict[str, list[Utterance]]:
    return {
        "seen_voices": cached_utterances(data / f"eval-seen-{count}.npz", count, seed + 1,
                                         variants=TRAIN_VARIANTS, held_out=True),
        "unseen_voices": cached_utterances(data / f"eval-unseen-{count}.npz", count, seed + 2,
                                           variants=HELD_OUT_VARIANTS, held_out=True),
    }


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and (p / "training_state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return found[-1] if found else None


def _load(path: str | Path, device: torch.device):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
    model.to(device)  # type: ignore[arg-type]
    return model, WhisperProcessor.from_pretrained(path, local_files_only=True)


def train_speech(config: SpeechTrainConfig, *, progress: bool = True) -> Path:
    from streamer.engine.loader import resolve_device

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = Path(config.data_dir) if config.data_dir else out / "data"
    train_set = cached_utterances(data / f"train-{config.train_utterances}-seed{config.seed}.npz", config.train_utterances,
                                  config.seed, variants=TRAIN_VARIANTS, held_out=False)
    eval_sets = _eval_sets(data, config.eval_utterances, config.seed + 1000)

    start_step, state = 0, None
    resume_from = _latest_checkpoint(out) if config.resume else None
    if resume_from is not None:
        model, processor = _load(resume_from, device)
        state = torch.load(resume_from / "training_state.pt", weights_only=False)
        start_step = state["step"]
    elif config.model == "new":
        model, processor = new_whisper_model(seed=config.seed)
        model = model.to(device)
    else:
        model, processor = _load(config.model, device)
    model.train()
    tokenizer, features = processor.tokenizer, processor.feature_extractor

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )

    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    rng = np.random.default_rng(config.seed + start_step)
    shown = Progress(config.steps, start_step, show=progress, desc="train speech", log_every=config.log_every, log=log)
    for step in range(start_step, config.steps):
        picks = rng.integers(len(train_set), size=config.batch_size)
        silent = rng.random(config.batch_size) < config.nonspeech_share
        audios = [non_speech(rng) if quiet else noisy(train_set[i].audio, rng) for i, quiet in zip(picks, silent)]
        feats = features(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(device)
        texts = ["" if quiet else " " + train_set[i].text for i, quiet in zip(picks, silent)]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        labels = enc.input_ids[:, 1:].masked_fill(enc.attention_mask[:, 1:] == 0, -100).to(device)  # the model adds <|startoftranscript|>
        loss = model(input_features=feats, labels=labels).loss
        done = step + 1
        shown.update(done, optimizer_step(loss, model, optimizer, scheduler), float(scheduler.get_last_lr()[0]))
        if done % config.save_every == 0 and done < config.steps:
            point = {"step": done, "loss": round(shown.ema_loss or 0.0, 4), "elapsed_s": shown.elapsed}
            for name, utterances in eval_sets.items():
                point[name] = evaluate_wer(model, processor, utterances, seed=config.seed)["wer"]
            point["nonspeech_words"] = evaluate_non_speech(model, processor, config.eval_utterances, seed=config.seed)
            with (out / "curve.jsonl").open("a") as f:
                f.write(json.dumps(point) + "\n")
            log.warning("checkpoint", extra=point)
            save_checkpoint(out, done, partial(_save, model=model, processor=processor, config=config, step=done,
                                               optimizer=optimizer, scheduler=scheduler))
    shown.close()
    model.eval()
    _save(out, model, processor, config, config.steps, None, None)
    final_sets = _eval_sets(data, 4 * config.eval_utterances, config.seed + 2000)
    report: dict = {name: evaluate_wer(model, processor, utterances, seed=config.seed + 1)
                    for name, utterances in final_sets.items()}
    report["nonspeech_words"] = evaluate_non_speech(model, processor, 4 * config.eval_utterances, seed=config.seed + 1)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    log.warning("held-out WER", extra={name: r["wer"] if isinstance(r, dict) else r for name, r in report.items()})
    return out


def _save(path: Path, model, processor, config: SpeechTrainConfig, step: int, optimizer, scheduler) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    record = {**asdict(replace(config)), "step": step, "command": " ".join(sys.argv),
              "model_shape": {"d_model": model.config.d_model, "encoder_layers": model.config.encoder_layers,
                              "decoder_layers": model.config.decoder_layers}}
    (path / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
    save_training_state(path, step, optimizer, scheduler)
