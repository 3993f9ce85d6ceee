"""GIT split into the three pieces every backend runs: vision, prefill, step.

The torch backend calls these functions directly and `streamer export` traces
the same modules to ONNX, so every backend computes the same thing.

    vision   pixel_values (b, 3, H, W) -> features (b, P+1, Dv), one frame per row:
             frames are encoded on their own, so the engine's FeatureCache serves
             a frame shared by overlapping windows.
    prefill  features (B, F, P+1, Dv) -> logits of the first token (B, V), the
             image keys/values of every decoder layer (B, H, N, d), N = F*(P+1),
             and BOS's text keys/values (B, H, 1, d).
    step     ids (B, 1), position (B, 1), image keys/values, text keys/values
             (B, H, t, d) -> logits (B, V), text keys/values (B, H, t+1, d).

A text prefix (a question after [CLS]) is fed after BOS: `text_forward` takes
k tokens per row at once with a causal `text_mask` (the torch backend's
`extend`), or one per step through the unchanged step graph (the ONNX ones).

GIT's attention mask lets image tokens see only each other, and text tokens
see every image token and the text before them. So the decoder splits into an
image part that does not depend on the text at all (plain unmasked attention,
computed once per window) and a text part whose queries attend to
[image keys, text keys]. The softmax over that concatenation is taken over
the concatenated scores and applied to the two value sets separately, so the
~1200 cached image positions are never copied while decoding. The last
layer's image tokens feed nothing but their keys and values, so their
attention and MLP are skipped (a sixth of the prefill on the base shape).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PrefillGraph", "StepGraph", "VisionGraph", "causal_text_mask", "image_keys_values", "kv_names", "text_forward",
]


def kv_names(prefix: str, layers: int) -> list[str]:
    """Flat names of per-layer key/value tensors: prefix_key.0, ..., prefix_value.0, ..."""
    return [f"{prefix}_key.{i}" for i in range(layers)] + [f"{prefix}_value.{i}" for i in range(layers)]


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)


def _merge(attn, context: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = context.shape
    return context.transpose(1, 2).reshape(b, n, attn.all_head_size)


def image_tokens(model, features: torch.Tensor) -> torch.Tensor:
    """(B, F, P+1, Dv) per-frame vision features -> (B, F*(P+1), D) decoder inputs:
    each frame slot's temporal embedding, then the visual projection."""
    git = model.git
    b, frames, patches, width = features.shape
    if model.config.num_image_with_embedding is not None:
        temporal = torch.cat([p for p in git.img_temporal_embedding[:frames]], dim=0)  # (F, 1, Dv)
        features = features + temporal.unsqueeze(0)
    return git.visual_projection(features.reshape(b, frames * patches, width))


def image_keys_values(model, hidden: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The image part of the decoder: keys and values of every layer."""
    layers = model.git.encoder.layer
    keys, values = [], []
    for index, layer in enumerate(layers):
        attn = layer.attention.self
        k, v = _heads(attn, attn.key(hidden)), _heads(attn, attn.value(hidden))
        keys.append(k)
        values.append(v)
        if index == len(layers) - 1:
            break  # the last layer's image outputs feed nothing
        q = _heads(attn, attn.query(hidden))
        context = _merge(attn, F.scaled_dot_product_attention(q, k, v))
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return keys, values


def text_forward(
    model,
    ids: torch.Tensor,
    position: torch.Tensor,
    image_keys: list[torch.Tensor],
    image_values: list[torch.Tensor],
    past_keys: list[torch.Tensor] | None,
    past_values: list[torch.Tensor] | None,
    text_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Text tokens through the decoder: logits of the token after the last one, and
    the text keys/values with these tokens' appended. One token per row needs no
    mask (it sees all text before it); k tokens at once need `causal_text_mask`."""
    hidden = model.git.embeddings(input_ids=ids, position_ids=position)
    keys, values = [], []
    for index, layer in enumerate(model.git.encoder.layer):
        attn = layer.attention.self
        q = _heads(attn, attn.query(hidden))
        k, v = _heads(attn, attn.key(hidden)), _heads(attn, attn.value(hidden))
        if past_keys is not None and past_values is not None:
            k = torch.cat([past_keys[index], k], dim=2)
            v = torch.cat([past_values[index], v], dim=2)
        keys.append(k)
        values.append(v)
        image_k, image_v = image_keys[index], image_values[index]
        scale = 1.0 / math.sqrt(attn.attention_head_size)
        text_scores = q @ k.transpose(-1, -2)
        if text_mask is not None:
            text_scores = text_scores + text_mask
        scores = torch.cat([q @ image_k.transpose(-1, -2), text_scores], dim=-1) * scale
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        n_img = image_k.shape[2]
        context = probs[..., :n_img] @ image_v + probs[..., n_img:] @ v
        attended = layer.attention.output(_merge(attn, context), hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return model.output(hidden[:, -1]), keys, values


def causal_text_mask(new: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(new, total) additive mask for `new` tokens appended after `total - new` text tokens:
    each sees the text before it and itself, never a later one (image tokens are always seen)."""
    past = total - new
    later = torch.arange(total, device=device)[None, :] > (past + torch.arange(new, device=device))[:, None]
    return torch.zeros(new, total, dtype=dtype, device=device).masked_fill(later, torch.finfo(dtype).min)


class VisionGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model.git.image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixel_values).last_hidden_state


class PrefillGraph(nn.Module):
    """features -> (logits, image keys..., image values..., text keys..., text values...)."""

    def __init__(self, model, bos_id: int) -> None:
        super().__init__()
        self.model = model
        self.bos_id = bos_id

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = image_tokens(self.model, features)
        image_k, image_v = image_keys_values(self.model, image)
        bos = torch.full((features.shape[0], 1), self.bos_id, dtype=torch.long, device=features.device)
        logits, text_k, text_v = text_forward(self.model, bos, torch.zeros_like(bos), image_k, image_v, None, None)
        return (logits, *image_k, *image_v, *text_k, *text_v)


class StepGraph(nn.Module):
    """(ids, position, image keys..., image values..., past keys..., past values...) -> (logits, keys..., values...)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.layers = len(model.git.encoder.layer)

    def forward(self, ids: torch.Tensor, position: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.layers
        image_k, image_v, past_k, past_v = (list(kv[i * n : (i + 1) * n]) for i in range(4))
        logits, text_k, text_v = text_forward(self.model, ids, position, image_k, image_v, past_k, past_v)
        return (logits, *text_k, *text_v)
