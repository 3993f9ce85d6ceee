"""Training examples per second: rendered by the training process, against `--data-workers N` processes.

`streamer train --data live` draws each example from the synthetic world, renders it at a camera's size,
encodes it with libx264 and decodes it back (streamer/training/train.py, `live_world_examples`): CPU work
that on a GPU takes longer than the model's step. This measures what `example_batches` delivers, batches of
32 at the bundled model's input size, with 0 workers (the baseline: the training process renders them) and
with each worker count asked for, in one run on one machine. The training step itself is not included.

    python benchmarks/bench_train_data.py                       # workers 1,2 (this 2-core box); 40 batches each
    python benchmarks/bench_train_data.py --workers 1,2,4,8,15 --batches 100 --size 128

Writes benchmarks/results/train-data-cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import log, machine_info, save_result  # noqa: E402
from streamer.training.loop import example_batches  # noqa: E402
from streamer.training.train import live_world_examples  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def examples_per_second(workers: int, batches: int, batch_size: int, size: int, seed: int) -> float:
    make = partial(live_world_examples, frames=6, size=size, short_side=size)
    stream = example_batches(make, seed, batch_size, workers)
    for _ in range(max(2, 2 * workers)):  # start-up (worker processes, first scenes) is not the rate
        next(stream)
    began = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - began)
    del stream
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare with 0, comma-separated")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="model input (the bundled model: 64)")
    parser.add_argument("--seed", type=int, default=900)
    parser.add_argument("--out", default=str(RESULTS / "train-data-cpu.json"))
    args = parser.parse_args()
    counts = [0, *sorted({int(w) for w in args.workers.split(",") if int(w) > 0})]
    rows = []
    for workers in counts:
        rate = examples_per_second(workers, args.batches, args.batch_size, args.size, args.seed)
        rows.append({"workers": workers, "examples_per_second": round(rate, 1)})
        log(f"{workers} workers: {rate:.1f} examples/s")
    base = rows[0]["examples_per_second"]
    for row in rows:
        row["vs_in_process"] = round(row["examples_per_second"] / base, 2)
    result = {"what": "streamer train --data live: examples rendered per second (batches of "
                      f"{args.batch_size}, input {args.size} px), in the training process (0) vs worker processes",
              "machine": machine_info(), "batches": args.batches, "rows": rows}

    def draw(ax) -> None:
        ax.bar([str(r["workers"]) for r in rows], [r["examples_per_second"] for r in rows])
        ax.set_xlabel("--data-workers")
        ax.set_ylabel("examples / s")

    save_result(Path(args.out), result, draw)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
