"""New (untrained) GIT models with a small word vocabulary, for training from scratch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertTokenizerFast,
    GitConfig,
    GitForCausalLM,
    VideoMAEImageProcessorPil,
)

__all__ = ["new_git_model", "save_new_git_model", "word_tokenizer"]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(words: Iterable[str]) -> BertTokenizerFast:
    """A BERT-style (GIT's family) tokenizer whose vocabulary is exactly these words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]"
    )


def new_git_model(
    tokenizer: BertTokenizerFast,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    frames: int = 6,
    hidden: int = 128,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    fixed_positions: bool = False,
) -> tuple[GitForCausalLM, VideoMAEImageProcessorPil]:
    config = GitConfig(
        vision_config={
            "hidden_size": hidden, "intermediate_size": hidden * 4, "num_hidden_layers": vision_layers,
            "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size,
        },
        hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=text_layers, num_attention_heads=heads,
        max_position_embeddings=64, vocab_size=len(tokenizer), num_image_with_embedding=frames,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    with torch.no_grad():
        for p in model.git.img_temporal_embedding:
            p.normal_(0.0, 0.02)  # zeros would start training blind to frame order
        if fixed_positions:
            # Random unit vectors x 8 (near-orthogonal: every patch tells apart), for
            # training with them frozen: a tower trained from scratch otherwise
            # learns to drop where things are (streamer/models/world-git/README.md).
            table = model.git.image_encoder.vision_model.embeddings.position_embedding.weight
            pos = torch.randn(table.shape[0] - 1, table.shape[1])
            table[1:] = pos / pos.norm(dim=1, keepdim=True) * 8.0
            table[0] = 0.0
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return model, processor


def save_new_git_model(path: Path, words: Iterable[str], seed: int = 0, **kw) -> Path:
    tokenizer = word_tokenizer(words)
    model, processor = new_git_model(tokenizer, seed=seed, **kw)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path
