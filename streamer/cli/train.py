"""`streamer train`: train or fine-tune a GIT captioner."""

from __future__ import annotations

import argparse

from streamer.cli.common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train or fine-tune a GIT captioner")
    tr.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    tr.add_argument("--task", default="caption", choices=["caption", "speech"],
                    help="caption: a GIT captioner; speech: a tiny Whisper on espeak-ng speech (streamer/training/speech.py)")
    tr.add_argument("--nonspeech-share", type=float, default=0.0,
                    help="--task speech: share of examples that are noise, tones or music labelled with no words")
    tr.add_argument("--model", default="new", help='"new" (a fresh small GIT with the synthetic-world vocabulary) or a GIT checkpoint')
    tr.add_argument("--data", default="synthetic",
                    help='"synthetic" (world clips), "live" (live-like world windows and questions, what the bundled '
                    'model trains on) or a JSON Lines manifest {path, start, end, caption}')
    tr.add_argument("--steps", type=positive_int, default=3000)
    tr.add_argument("--batch-size", type=positive_int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    tr.add_argument("--save-every", type=positive_int, default=500)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--data-workers", type=int, default=0, metavar="N",
                    help="processes that render caption training examples (default 0: the training process); a GPU needs "
                         "them, as the world's examples are drawn and H.264-encoded on the CPU")
    tr.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines (no terminal)")
    tr.add_argument("--world", default="full", choices=["full", "simple"],
                    help="synthetic data: the full world, or one kind of object so that only the event varies")
    tr.add_argument("--reversed-twins", action="store_true",
                    help="synthetic data: follow each clip with itself played backwards, captioned with the opposite event")
    tr.add_argument("--vision-lr-scale", type=float, default=1.0,
                    help="the vision tower's learning rate relative to --lr (fine-tuning: e.g. 0.3 keeps what it saw)")
    tr.add_argument("--question-weights", type=_question_weights, default=None, metavar="KIND=W,...",
                    help="--data live: how often each question kind is asked, relative (default: all 1; "
                         "kinds: colour, shape, count, direction, yes, no)")
    tr.add_argument("--answer-weight", type=_loss_weight, default=1.0,
                    help="--data live: loss weight of a question's answer tokens (and a yes/no question's checks) "
                         "relative to the caption's (default 1)")
    tr.add_argument("--event-weight", type=_loss_weight, default=1.0,
                    help="loss weight of a caption's last word, its event (left, up, appears, still...), "
                         "relative to the other tokens (default 1)")
    tr.add_argument("--live-share", type=_share,
                    help="--data live: share of live-like windows, the rest clean clips (default: the bundled "
                         "model's, 0.55)")
    tr.add_argument("--edge-share", type=_share, default=0.0,
                    help="--data live: share of clean clips whose objects enter or leave at an edge (default 0)")
    tr.add_argument("--placed-share", type=_share, default=0.0,
                    help="--data live: share of clean clips whose paths lie anywhere in the frame, slower (default 0)")
    tr.add_argument("--wrap-share", type=_share, default=0.0,
                    help="--data live: share of clean clips whose objects leave one edge and come back at the "
                         "other mid-window (default 0)")
    tr.add_argument("--cut-share", type=_share, default=0.0,
                    help="--data live: share of clean clips of still objects cut by an edge of the frame (default 0)")
    size = tr.add_argument_group("a new model's size (--model new; the bundled model: 64, 16, 128, 3, 6)")
    size.add_argument("--image-size", type=positive_int, help="input resolution (pixels, square; default 64)")
    size.add_argument("--patch-size", type=positive_int, help="ViT patch side (pixels; default 16)")
    size.add_argument("--hidden", type=positive_int, help="width of the vision and text transformers (default 128)")
    size.add_argument("--layers", type=positive_int, help="layers of each of the two transformers (default 3)")
    size.add_argument("--frames", type=positive_int, help="frames per window (default 6)")
    tr.add_argument("--grow-image-size", type=positive_int, default=None, metavar="PIXELS",
                    help="--model DIR: train it at this square input size (a multiple of its patch size), every weight "
                         "kept and its position table regrown, so that more patches see where things are")
    tr.add_argument("--grow-hidden", type=positive_int, default=None, metavar="WIDTH",
                    help="--model DIR: widen its two transformers to this width (a whole multiple of theirs), starting "
                         "from what the model says (each unit copied, Net2Net), for more capacity than it has")
    tr.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on a GPU, fp32 on a CPU; bf16: on a CPU too (fast where it has bf16 "
                         "matrix units, e.g. Intel AMX)")
    tr.add_argument("--fixed-positions", action="store_true",
                    help="keep the ViT position embeddings frozen (a new model gets large random ones)")
    tr.set_defaults(run=run_train, task_defaults={dest: tr.get_default(dest) for dest in _CAPTION_ONLY + _SPEECH_ONLY})


def _question_weights(text: str) -> tuple[tuple[str, float], ...]:
    from streamer.training.world import QUESTION_KINDS

    weights = []
    for part in text.split(","):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in QUESTION_KINDS:
            raise argparse.ArgumentTypeError(f"unknown question kind {kind!r}; kinds: {', '.join(QUESTION_KINDS)}")
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight is a number (KIND=W)") from None
        if not weight >= 0 or weight > 1000:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight is 0-1000")
        weights.append((kind, weight))
    return tuple(weights)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number") from None


def _loss_weight(text: str) -> float:
    weight = _number(text)
    if not 0 < weight <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a weight is above 0 and at most 100")
    return weight


def _share(text: str) -> float:
    share = _number(text)
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a share is 0-1")
    return share


_NEW_MODEL_SIZES = ("image_size", "patch_size", "hidden", "layers", "frames")  # TrainConfig's fields
# Flags only one task reads: the other task would ignore them without a word, so it refuses them.
_CAPTION_ONLY = ("data", "data_workers", "world", "reversed_twins", "vision_lr_scale", "question_weights", "answer_weight",
                 "event_weight", "live_share", "edge_share", "placed_share", "wrap_share", "cut_share",
                 *_NEW_MODEL_SIZES, "grow_image_size", "grow_hidden", "precision", "fixed_positions")
_SPEECH_ONLY = ("nonspeech_share",)


def _flags(dests) -> str:
    return " ".join(f"--{dest.replace('_', '-')}" for dest in dests)  # argparse dests as the user typed them


def run_train(args: argparse.Namespace) -> int:
    from streamer.errors import StreamerError

    unread = [dest for dest in (_CAPTION_ONLY if args.task == "speech" else _SPEECH_ONLY)
              if getattr(args, dest) != args.task_defaults[dest]]
    if unread:
        raise StreamerError(f"{_flags(unread)}: not read by --task {args.task}")
    if args.task == "speech":
        return run_train_speech(args)
    from streamer.training.train import TrainConfig, train

    sizes = {key: getattr(args, key) for key in _NEW_MODEL_SIZES if getattr(args, key) is not None}
    if sizes and args.model != "new":
        raise StreamerError(f"{_flags(sizes)} size a new model (--model new); an existing model keeps its size "
                            "(its input can grow: --grow-image-size, its width: --grow-hidden)")
    config = TrainConfig(
        out=args.out, model=args.model, data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, seed=args.seed, device=args.device, save_every=args.save_every, resume=args.resume,
        threads=args.threads, log_every=args.log_every, world=args.world, reversed_twins=args.reversed_twins,
        fixed_positions=args.fixed_positions, vision_lr_scale=args.vision_lr_scale, answer_weight=args.answer_weight,
        event_weight=args.event_weight, grow_image_size=args.grow_image_size, data_workers=args.data_workers,
        grow_hidden=args.grow_hidden, precision=args.precision, edge_share=args.edge_share,
        placed_share=args.placed_share, wrap_share=args.wrap_share, cut_share=args.cut_share,
        **sizes, **({"live_share": args.live_share} if args.live_share is not None else {}),
        **({"question_weights": args.question_weights} if args.question_weights else {}),
    )
    out = train(config)
    print(f"model saved to {out}; use it with: streamer caption VIDEO --model {out}")
    return 0


def run_train_speech(args: argparse.Namespace) -> int:
    from streamer.training.speech import SpeechTrainConfig, train_speech

    config = SpeechTrainConfig(
        out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        seed=args.seed, device=args.device, save_every=args.save_every, resume=args.resume, threads=args.threads,
        log_every=args.log_every, nonspeech_share=args.nonspeech_share,
    )
    out = train_speech(config)
    print(f"speech model saved to {out}; use it with: streamer caption VIDEO --speech --speech-model {out}")
    return 0
