"""A small untrained GIT, built locally, for when no real checkpoint is reachable.

Used by `streamer demo` so the whole pipeline runs for real on a machine with
no hub access; its captions are random words from a small vocabulary. A
trained model replaces it as the default once one ships with the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast, GitConfig, GitForCausalLM, VideoMAEImageProcessorPil

__all__ = ["ensure_untrained_model"]

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """a an the one two three some many of in on at to from with and is are was
man woman person people child dog cat car bus bike ball tree road street room table
red green blue yellow white black orange purple big small circle square shape light
moves moving walks walking runs running sits sitting stands standing plays playing
talks talking rides riding drives driving left right up down appears disappears
screen pattern colour color bars stripes scene camera video picture background""".split()

VERSION = "v1"


def cache_dir() -> Path:
    root = os.environ.get("STREAMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "streamer")
    return Path(root) / f"untrained-git-{VERSION}"


def _tokenizer() -> BertTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + sorted(set(_WORDS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def ensure_untrained_model(path: Path | None = None, seed: int = 0) -> Path:
    path = path or cache_dir()
    if (path / "config.json").is_file():
        return path
    tokenizer = _tokenizer()
    config = GitConfig(
        vision_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, vocab_size=len(tokenizer), num_image_with_embedding=6,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    with torch.no_grad():
        for p in model.git.img_temporal_embedding:
            p.normal_(0.0, 0.5)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    VideoMAEImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp)
    tmp.replace(path) if not path.exists() else None
    return path
