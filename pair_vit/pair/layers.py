"""Layers of the pair models' patch embeddings: the half marker, the conv stem and the CNN stem."""
from __future__ import annotations

import numpy as np
import timm
import torch
from torch import nn

class HalfMarker(nn.Module):
    """Adds `embed[:, :, 0]` to the token columns of the left (reference) half and `embed[:, :, 1]` to the right.

    x: (B, D, Gh, Gw) token grid (NCHW, before timm flattens it) -> same shape.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, dim, 1, 2))
        nn.init.trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = (torch.arange(x.shape[-1], device=x.device) >= x.shape[-1] // 2).long()  # (Gw,) 0 left, 1 right
        return x + self.embed[:, :, :, side].to(x.dtype)


def conv_stem(in_chans: int, dim: int, patch: int = 16) -> nn.Sequential:
    """log2(patch) 3x3 stride-2 conv-BN-ReLU layers (widths doubling up to `dim`) and a 1x1 projection to `dim`.

    (B, in_chans, H, W) -> (B, dim, H/patch, W/patch): the token grid of a `patch` x `patch` patch embedding.
    """
    n_layers = int(round(np.log2(patch)))
    if 2 ** n_layers != patch:
        raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch}")
    layers: list[nn.Module] = []
    width, channels = max(16, dim // 2 ** (n_layers - 1)), in_chans
    for _ in range(n_layers):
        out = min(width, dim)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        channels, width = out, width * 2
    layers.append(nn.Conv2d(channels, dim, 1))
    return nn.Sequential(*layers)


class CNNStem(nn.Module):
    """A timm CNN truncated at its stride-`patch` stage, then a 1x1 projection to `dim`.

    (B, 3, H, W) -> (B, dim, H/patch, W/patch). The trunk keeps timm's module names, so the weights of a
    full model of the same backbone (e.g. the stage-1 descriptor's) load into it by name.
    """

    def __init__(self, backbone: str, dim: int, patch: int = 16):
        super().__init__()
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        stages = [i for i, r in enumerate(probe.feature_info.reduction()) if r == patch]
        if not stages:
            raise ValueError(f"stem backbone {backbone!r} has no stride-{patch} stage "
                             f"(strides {probe.feature_info.reduction()})")
        self.trunk = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(stages[-1],))
        self.proj = nn.Conv2d(self.trunk.feature_info.channels()[-1], dim, 1)
        # channels_last: much faster convolutions on CPU under bf16 autocast (see pair_vit.descriptor.model)
        self.trunk.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x.contiguous(memory_format=torch.channels_last))[-1]
        return self.proj(features).contiguous()
