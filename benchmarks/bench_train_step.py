"""One training step (forward, backward, AdamW) in fp32 against bf16 autocast, on this CPU, in one run.

`streamer train --precision bf16` runs the model under bf16 autocast on the CPU too (weights and optimizer
stay fp32). Where the CPU has bf16 matrix units (Intel AMX, AVX512-BF16) the matrix products run there;
elsewhere oneDNN emulates them and bf16 can be slower: this measures which, for the bundled model and for
it widened (`--grow-hidden`), on one batch of the bundled model's training data (`--data live`, rendered
once; the step's cost does not depend on what the frames show). The data's rendering is not included:
benchmarks/bench_train_data.py measures it.

    python benchmarks/bench_train_step.py                     # widths 128 (as shipped) and 256; 12 steps each
    python benchmarks/bench_train_step.py --widths 128,256,512 --steps 20

Writes benchmarks/results/train-step-cpu.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import cpu_flags, log, machine_info, save_result
from streamer.defaults import BUNDLED_MODEL
from streamer.engine.loader import load_model
from streamer.engine.preprocess import PreprocessSpec, preprocess_frames
from streamer.training.train import _autocast, _text_batch, grow_width, live_world_examples

RESULTS = Path(__file__).parent / "results"


def step_seconds(model, pixels, enc, labels, weights, steps: int, bf16: bool) -> float:
    """Median seconds of a training step, after one step of warm-up."""
    from streamer.training.train import weighted_text_loss

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # a tiny rate: the model barely changes across runs
    autocast = _autocast("bf16" if bf16 else "fp32", torch.device("cpu"))  # what `--precision` makes of it
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        with autocast:
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels).logits
            loss = weighted_text_loss(logits, labels, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="128,256", help="model widths (128: as shipped; more: --grow-hidden)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=900)
    parser.add_argument("--out", default=str(RESULTS / "train-step-cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(str(BUNDLED_MODEL), "cpu", "float32")
    spec = PreprocessSpec.from_processor(loaded.image_processor)
    frames = int(loaded.model.config.num_image_with_embedding)
    batch = list(itertools.islice(live_world_examples(args.seed, frames=frames, size=64, short_side=64), args.batch_size))
    pixels = preprocess_frames([img for ex in batch for img in ex[0]], spec, torch.device("cpu"), torch.float32)
    pixels = pixels.view(len(batch), frames, *pixels.shape[1:])
    enc, labels, weights = _text_batch(loaded.tokenizer, batch, torch.device("cpu"), answer_weight=8.0)
    if weights is None:
        weights = torch.ones(labels.shape)
    rows = []
    for width in sorted({int(w) for w in args.widths.split(",")}):
        model = loaded.model if width == loaded.model.config.hidden_size else grow_width(loaded.model, width)
        fp32 = step_seconds(model, pixels, enc, labels, weights, args.steps, bf16=False)
        bf16 = step_seconds(model, pixels, enc, labels, weights, args.steps, bf16=True)
        rows.append({"hidden": width, "parameters": sum(p.numel() for p in model.parameters()),
                     "fp32_step_s": round(fp32, 4), "bf16_step_s": round(bf16, 4), "bf16_speedup": round(fp32 / bf16, 2)})
        log(f"width {width}: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s a step ({fp32 / bf16:.2f}x)")
    result = {"what": f"streamer train: one step (forward, backward, AdamW) on a batch of {args.batch_size} live "
                      "examples, fp32 vs bf16 autocast, median of "
                      f"{args.steps} steps", "machine": machine_info(cpu_flags=cpu_flags()), "rows": rows}

    def draw(ax) -> None:
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["fp32_step_s"] for r in rows], 0.4, label="fp32")
        ax.bar([i + 0.2 for i in x], [r["bf16_step_s"] for r in rows], 0.4, label="bf16 autocast")
        ax.set_xticks(list(x), [f"width {r['hidden']}" for r in rows])
        ax.set_ylabel("seconds / step")
        ax.legend()

    save_result(Path(args.out), result, draw)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
