"""What a backend does for the engine: encode frames, prefill, step.

The engine (core.py) owns everything that does not depend on the backend:
the feature cache, batching, greedy decoding, captions and stats. A runner
does the three model calls of graphs.py on its own runtime and hands logits
back as CPU or device torch tensors, so one greedy loop serves every backend.

The state after `prefill` (BOS's logits, the image keys/values and BOS's text
keys/values) depends on the window only, so a runner splits it into rows the
engine keeps per window (the image-token cache, cache.py) and joins rows of
any windows back into a batch: a question about a window already captioned
starts from its row and runs only its own tokens (`extend`, then `step`).

Runners: TorchRunner here; OrtRunner and OpenVinoRunner in onnx_runners.py
(imported only when picked, so the daemon starts without onnxruntime or
openvino installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from streamer.engine.graphs import causal_text_mask, image_keys_values, image_tokens, text_forward
from streamer.engine.loader import LoadedModel

__all__ = ["ModelInfo", "Runner", "TorchRunner", "special_ids"]


class ModelInfo(Protocol):
    """What the engine needs besides the computation itself."""

    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def image_processor(self) -> Any: ...


class Runner(Protocol):
    backend: str  # torch | onnxruntime | openvino

    @property
    def info(self) -> ModelInfo: ...

    model_config: Any  # transformers.GitConfig
    device: torch.device  # where preprocessing runs and logits come back
    dtype: torch.dtype  # of the pixels handed to `encode`
    precision: str  # what the computation runs in: float32, bfloat16, int8, ...
    bos_id: int
    eos_ids: set[int]

    def encode(self, pixels: torch.Tensor) -> Sequence[Any]:
        """(b, 3, H, W) pixels -> b per-frame features (cacheable, read-only)."""
        ...

    def stack(self, rows: list[list[Any]]) -> Any:
        """Per-frame features of B windows -> one (B, F, P+1, Dv) batch."""
        ...

    def prefill(self, features: Any) -> tuple[torch.Tensor, Any]:
        """Logits of the first token (B, V), and the decoding state."""
        ...

    def step(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row at `position`: logits of the next, and the new state."""
        ...

    def keep_rows(self, state: Any, rows: list[int]) -> Any:
        """The state of only these rows (rows that finished leave the batch)."""
        ...

    def extend(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed k tokens per row (B, k) at positions position..position+k-1 (a text prefix):
        logits after the last, and the new state."""
        ...

    def split_rows(self, logits: torch.Tensor, state: Any, rows: list[int]) -> list[Any]:
        """Copies of these rows of a prefill's output, one per window (kept in the image-token cache)."""
        ...

    def join_rows(self, rows: Sequence[Any]) -> tuple[torch.Tensor, Any]:
        """Rows of `split_rows` (of any batches) -> (logits, state) of one batch, as `prefill` returns it."""
        ...

    def row_nbytes(self, row: Any) -> int:
        """Memory held by one row."""
        ...


class TorchRunner:
    """graphs.py's functions on the loaded transformers model (CPU or CUDA, any dtype)."""

    backend = "torch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = self.info = loaded
        self.model = loaded.model
        self.model_config = loaded.model.config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.precision = str(loaded.dtype).removeprefix("torch.")
        self.bos_id, self.eos_ids = special_ids(self.model_config, self.model.generation_config, loaded.tokenizer)

    def encode(self, pixels: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.model.git.image_encoder(pixel_values=pixels).last_hidden_state.unbind(0)

    def stack(self, rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(frames) for frames in rows])

    def prefill(self, features: torch.Tensor) -> tuple[torch.Tensor, Any]:
        image_k, image_v = image_keys_values(self.model, image_tokens(self.model, features))
        bos = torch.full((features.shape[0], 1), self.bos_id, dtype=torch.long, device=features.device)
        logits, text_k, text_v = text_forward(self.model, bos, torch.zeros_like(bos), image_k, image_v, None, None)
        return logits, (image_k, image_v, text_k, text_v)

    def step(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        image_k, image_v, text_k, text_v = state
        pos = torch.full_like(ids, position)
        logits, text_k, text_v = text_forward(self.model, ids, pos, image_k, image_v, text_k, text_v)
        return logits, (image_k, image_v, text_k, text_v)

    def keep_rows(self, state: Any, rows: list[int]) -> Any:
        index = torch.tensor(rows, device=self.device)
        return tuple([t.index_select(0, index) for t in part] for part in state)

    def extend(self, ids: torch.Tensor, position: int, state: Any) -> tuple[torch.Tensor, Any]:
        if ids.shape[1] == 1:
            return self.step(ids, position, state)
        image_k, image_v, text_k, text_v = state
        new = ids.shape[1]
        positions = torch.arange(position, position + new, device=ids.device).expand(ids.shape[0], new)
        mask = causal_text_mask(new, position + new, image_k[0].dtype, ids.device)
        logits, text_k, text_v = text_forward(self.model, ids, positions, image_k, image_v, text_k, text_v, mask)
        return logits, (image_k, image_v, text_k, text_v)

    def split_rows(self, logits: torch.Tensor, state: Any, rows: list[int]) -> list[Any]:
        # clones: a row must not hold its whole batch's tensors alive (the cache counts its bytes)
        return [(logits[r : r + 1].clone(), tuple([t[r : r + 1].clone() for t in part] for part in state)) for r in rows]

    def join_rows(self, rows: Sequence[Any]) -> tuple[torch.Tensor, Any]:
        if len(rows) == 1:
            return rows[0]  # decoding only reads a state, never writes into it
        logits = torch.cat([logits for logits, _ in rows])
        parts = len(rows[0][1])
        state = tuple([torch.cat([row[1][p][i] for row in rows]) for i in range(len(rows[0][1][p]))] for p in range(parts))
        return logits, state

    def row_nbytes(self, row: Any) -> int:
        logits, state = row
        return logits.nbytes + sum(t.nbytes for part in state for t in part)



def special_ids(model_config: Any, generation_config: Any, tokenizer: Any) -> tuple[int, set[int]]:
    """(BOS id, EOS ids): the generation config's, else the model config's, else the tokenizer's."""
    gen = generation_config
    bos = _first_id(getattr(gen, "bos_token_id", None), model_config.bos_token_id, tokenizer.cls_token_id)
    eos = _first_id(getattr(gen, "eos_token_id", None), model_config.eos_token_id, tokenizer.sep_token_id)
    return int(bos), {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _first_id(*candidates):
    for c in candidates:
        if c is not None:
            return c
    raise ValueError("model config names no special token id")
