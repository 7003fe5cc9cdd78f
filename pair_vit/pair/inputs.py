"""What a pair model reads: images resized to its half size and normalised, as tensors.

    x = preprocess(pil_image, (112, 112))          # (3, 112, 112) float32, normalised
    x = normalise_uint8(uint8_batch)                # (B, 3, h, w) uint8 -> float32, normalised the same way
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_MEAN = (0.5, 0.5, 0.5)  # timm's augreg ViTs and TF EfficientNet-Lite are trained with mean = std = 0.5
DEFAULT_STD = (0.5, 0.5, 0.5)


def preprocess(image: Image.Image, size: Sequence[int] = (112, 112), mean: Sequence[float] = DEFAULT_MEAN,
               std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """Resize a PIL image to `size` (h, w), ignoring its aspect ratio -> (3, h, w) float32, normalised."""
    h, w = int(size[0]), int(size[1])
    image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    # numpy, not torch: on a few busy cores torch's thread pool costs more than the arithmetic on one image.
    scale = np.float32(1 / 255) / np.asarray(std, np.float32)
    x = np.asarray(image, dtype=np.float32) * scale - np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalise_uint8(x: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN,
                    std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """(B, 3, h, w) uint8 images at the model's half size -> float32, normalised as `preprocess` does. The
    reranker keeps decoded images as uint8 (4x less memory) and normalises them batch by batch."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


class PairInputs:
    """Mixin of the pair models: `preprocess` at the model's own half size and normalisation."""

    half_size: tuple[int, int]
    model_args: dict

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> (3, H, W/2) float tensor at this model's half size and normalisation."""
        return preprocess(image, self.half_size, self.model_args["mean"], self.model_args["std"])
