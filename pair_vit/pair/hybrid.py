"""The hybrid pair ViT: a pretrained CNN trunk reads each image on its own, a transformer reads both token grids.

    model = build_pair_model(default_model_args(stem="hybrid", stem_backbone="tf_efficientnet_lite0"))
    t = model.tokens(images)                      # (B, 3, H, W/2) -> (B, C, H/16, W/32): per image, cacheable
    logits = model.forward_tokens(t_ref, t_query)  # (B,) logits: the transformer alone
    logits = model(ref, query)                    # both at once, as `PairViT` (higher = more likely a copy)

This is the ViT paper's hybrid on the pair image [reference | query]: the patch embedding is a CNN feature map
at stride 16. The CNN (a timm model cut at its stride-16 stage, `features_only`) runs per half, so no receptive
field crosses the seam and a reference's tokens serve every query that shortlists it. The transformer is a
timm ViT built over the trunk's feature grid with patch size 1: its patch projection is the hybrid's 1x1
projection of the C trunk channels, followed by the half marker; timm adds the position embeddings and the class
token. The trunk starts from ImageNet weights (`pair_vit.pretrained`) or a descriptor's backbone and is
frozen (`freeze_trunk`) or fine-tuned, as the training config says.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from pair_vit.pair.inputs import PairInputs
from pair_vit.pair.layers import HalfMarker

TOKEN_STRIDE = 16


def trunk_stage(backbone: str, stride: int = TOKEN_STRIDE) -> tuple[int, int]:
    """(index of the last stride-`stride` feature stage of timm CNN `backbone`, its channels)."""
    probe = timm.create_model(backbone, pretrained=False, features_only=True)
    stages = [i for i, r in enumerate(probe.feature_info.reduction()) if r == stride]
    if not stages:
        raise ValueError(f"backbone {backbone!r} has no stride-{stride} stage "
                         f"(strides {probe.feature_info.reduction()})")
    return stages[-1], probe.feature_info.channels()[stages[-1]]


def trunk_input_stats(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) the timm CNN `backbone` takes its inputs normalised with (its pretrained_cfg)."""
    cfg = timm.create_model(backbone, pretrained=False, features_only=True).pretrained_cfg
    return list(cfg["mean"]), list(cfg["std"])


class HybridPairViT(PairInputs, nn.Module):
    """forward(ref (B,3,H,W/2), query (B,3,H,W/2), ref_index=None, query_index=None) -> logits (B,) float.

    With indices, pair i is (ref[ref_index[i]], query[query_index[i]]): each image goes through the trunk once
    however many pairs it is in (a training group of G references and G queries gives G*G pairs)."""

    def __init__(self, model_args: dict[str, Any], pretrained: str = ""):
        super().__init__()
        self.model_args = args = model_args
        height, width = args["input_size"]
        self.half_size = (height, width // 2)
        if height % TOKEN_STRIDE or self.half_size[1] % TOKEN_STRIDE:
            raise ValueError(f"a hybrid pair model needs halves of multiples of {TOKEN_STRIDE} px, "
                             f"got input_size {args['input_size']}")
        stage, channels = trunk_stage(args["stem_backbone"])
        self.trunk = timm.create_model(args["stem_backbone"], pretrained=False, features_only=True,
                                       out_indices=(stage,))
        self.trunk.to(memory_format=torch.channels_last)  # much faster convolutions on CPU under bf16
        self.grid = (height // TOKEN_STRIDE, self.half_size[1] // TOKEN_STRIDE)  # tokens per half (Gh, Gw)
        self.vit = self._create_vit(args, channels, pretrained)
        if args["half_marker"]:
            embed = self.vit.patch_embed
            embed.proj = nn.Sequential(embed.proj, HalfMarker(embed.proj.out_channels))
        self.head = nn.Linear(self.vit.num_features, 1)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    def _create_vit(self, args: dict[str, Any], channels: int, pretrained: str) -> nn.Module:
        kwargs = {**args["backbone_kwargs"], "num_classes": 0, "patch_size": 1, "in_chans": channels,
                  "img_size": (self.grid[0], 2 * self.grid[1])}
        if args["dynamic_size"]:
            kwargs["dynamic_img_size"] = True
        if pretrained:
            raise ValueError("a hybrid pair model's transformer has no pretrained weights offline; "
                             "initialise its trunk instead (stem_pretrained / stem_from)")
        return timm.create_model(args["backbone"], **kwargs)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(Gh, Gw) of the pair's token grid: both halves side by side."""
        return self.grid[0], 2 * self.grid[1]

    @property
    def trunk_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.trunk.parameters())

    def freeze_trunk(self) -> None:
        """Fixed pretrained features: no gradients, batch-norm statistics kept (the trunk stays in eval mode)."""
        self.trunk.requires_grad_(False)
        self.trunk.eval()

    def train(self, mode: bool = True) -> "HybridPairViT":
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()
        return self

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W/2) normalised images -> (B, C, Gh, Gw) trunk features: an image's tokens, before the
        projection (cache these: they do not depend on the other image of the pair)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.trunk_frozen):
            return self.trunk(images.contiguous(memory_format=torch.channels_last))[-1].contiguous()

    def forward_tokens(self, ref_tokens: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, Gh, Gw) tokens of each side -> (B,) logits (higher = more likely a copy)."""
        x = torch.cat([ref_tokens, query_tokens], dim=3).to(self.head.weight.dtype)  # reference left, query right
        features = self.vit.forward_features(x)  # (B, prefix + Gh*2Gw, D)
        pooled = self.vit.forward_head(features, pre_logits=True)  # (B, D)
        return self.head(pooled).squeeze(1).float()

    def forward(self, ref: torch.Tensor, query: torch.Tensor, ref_index: torch.Tensor | None = None,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        ref_tokens, query_tokens = self.tokens(ref), self.tokens(query)
        if ref_index is not None:
            ref_tokens, query_tokens = ref_tokens[ref_index], query_tokens[query_index]
        return self.forward_tokens(ref_tokens, query_tokens)
