"""Frame preprocessing in torch, as the checkpoint's own image processor says.

The HF image processors work per image on PIL/numpy; this does the same steps
(resize shortest edge or to a fixed size, centre crop, rescale, normalise) on a
batch of uint8 RGB frames in torch, so it runs on whatever device the model is
on. tests/test_engine.py checks it against the checkpoint's processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PreprocessSpec", "preprocess_frames"]

# PIL resampling codes -> torch interpolate modes
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class PreprocessSpec:
    shortest_edge: int | None  # resize so the short side is this (aspect kept)
    resize_hw: tuple[int, int] | None  # or resize to exactly (h, w)
    crop_hw: tuple[int, int] | None
    mode: str
    rescale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_processor(cls, proc: Any) -> PreprocessSpec:
        size = getattr(proc, "size", None) if getattr(proc, "do_resize", True) else None
        shortest = _field(size, "shortest_edge")
        h, w = _field(size, "height"), _field(size, "width")
        crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
        ch, cw = _field(crop, "height"), _field(crop, "width")
        resample = getattr(proc, "resample", 2)
        mode = _RESAMPLE.get(int(resample) if resample is not None else 2, "bilinear")
        do_norm = getattr(proc, "do_normalize", True)
        return cls(
            shortest_edge=shortest,
            resize_hw=(h, w) if shortest is None and h and w else None,
            crop_hw=(ch, cw) if ch and cw else None,
            mode=mode,
            rescale=float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None,
            mean=tuple(float(x) for x in proc.image_mean) if do_norm else None,  # type: ignore[arg-type]
            std=tuple(float(x) for x in proc.image_std) if do_norm else None,  # type: ignore[arg-type]
        )

    @property
    def short_side(self) -> int | None:
        """Short side frames can be downscaled to at decode time without losing anything."""
        if self.shortest_edge:
            return self.shortest_edge
        return None

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.crop_hw:
            return self.crop_hw
        return self._resized_hw(h, w)

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.shortest_edge:
            s = self.shortest_edge
            # transformers' get_resize_output_image_size: long side floored
            return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if self.resize_hw:
            return self.resize_hw
        return h, w


def preprocess_frames(
    images: Sequence[np.ndarray], spec: PreprocessSpec, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 H x W x 3 RGB frames -> pixel_values (B, 3, H', W') in `dtype` on `device`.

    Frames of one size are processed as one batch; uint8 travels to the device
    (4x less to copy than float), from pinned memory on CUDA.
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"frame {i}: expected H x W x 3 uint8 RGB, got {img.shape} {img.dtype}")
        by_shape.setdefault(img.shape, []).append(i)
    for idx in by_shape.values():
        batch = torch.from_numpy(np.stack([images[i] for i in idx]))
        if device.type == "cuda":
            # page-locked: the copy is a DMA that runs while the host goes on
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        pixels = _process_batch(batch, spec, dtype)
        for j, i in enumerate(idx):
            out[i] = pixels[j]
    return torch.stack(out)  # type: ignore[arg-type]


def _process_batch(batch: torch.Tensor, spec: PreprocessSpec, dtype: torch.dtype) -> torch.Tensor:
    x = batch.permute(0, 3, 1, 2).float()  # B, 3, H, W in 0..255
    h, w = x.shape[-2:]
    rh, rw = spec._resized_hw(h, w)
    if (rh, rw) != (h, w):
        antialias = spec.mode in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(rh, rw), mode=spec.mode, antialias=antialias, align_corners=None if spec.mode == "nearest" else False)
        # PIL resizes uint8 images: round and clamp the same way
        x = x.round_().clamp_(0, 255)
    if spec.crop_hw:
        ch, cw = spec.crop_hw
        if rh < ch or rw < cw:  # HF pads small images with zeros before cropping
            pad_h, pad_w = max(0, ch - rh), max(0, cw - rw)
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            rh, rw = x.shape[-2:]
        top, left = (rh - ch) // 2, (rw - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    if spec.rescale is not None:
        x = x * spec.rescale
    if spec.mean is not None and spec.std is not None:
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.to(dtype)
