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

`token_match="mnn"` adds correspondence channels to every token before the projection (`match_channels`): its
cosine similarity to its nearest neighbour among the other image's tokens, the margin over the second nearest,
whether the two are mutual nearest neighbours, and where in the other image that neighbour sits. Counting mutual
nearest neighbours between frozen ImageNet tokens already separates copies from look-alikes without training;
these channels hand the transformer that evidence, and the positions let its attention check that the matches
agree geometrically (a copy's matches move together; a look-alike's scatter).
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from pair_vit.pair.inputs import PairInputs
from pair_vit.pair.layers import HalfMarker
from pair_vit.pair.localize import LocalizeSettings, local_tokens

TOKEN_STRIDE = 16
TOKEN_MATCH = ("none", "mnn")
MATCH_CHANNELS = 5  # nearest similarity, margin over the second, mutual flag, neighbour's x and y


def trunk_stage(backbone: str, stride: int = TOKEN_STRIDE) -> tuple[int, int]:
    """(index of the last stride-`stride` feature stage of timm CNN `backbone`, its channels)."""
    probe = timm.create_model(backbone, pretrained=False, features_only=True)
    stages = [i for i, r in enumerate(probe.feature_info.reduction()) if r == stride]
    if not stages:
        raise ValueError(f"backbone {backbone!r} has no stride-{stride} stage "
                         f"(strides {probe.feature_info.reduction()})")
    return stages[-1], probe.feature_info.channels()[stages[-1]]


def create_trunk(backbone: str, stride: int = TOKEN_STRIDE) -> nn.Module:
    """timm CNN `backbone` cut at its last stride-`stride` stage: (B, 3, H, W) -> [(B, C, H/stride, W/stride)]."""
    stage, _ = trunk_stage(backbone, stride)
    return timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(stage,))


def correspondence_scores(ref: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training-free pair scores from (B, C, Gh, Gw) tokens of each side -> name: (B,) float (higher = more
    likely a copy): "mutual", the share of reference tokens that are mutual nearest neighbours of a query token;
    "similarity", the mean over reference tokens of the cosine similarity to their nearest query token;
    "confident_mutual", the share that are mutual neighbours with a similarity above 0.5."""
    r, _ = match_channels(ref, query)
    best, mutual = r[:, 0].flatten(1), r[:, 2].flatten(1)
    return {"mutual": mutual.mean(1), "similarity": best.mean(1),
            "confident_mutual": (mutual * (best > 0.5)).mean(1)}


def match_channels(ref: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, Gh, Gw) tokens of each side -> (B, MATCH_CHANNELS, Gh, Gw) correspondence channels of each side.

    Per token: cosine similarity to its nearest token in the other image, that minus the second nearest's,
    1 where the two are mutual nearest neighbours (else 0), and the neighbour's x and y (its centre, the grid
    spanning [-1, 1])."""
    b, _, gh, gw = ref.shape
    r = nn.functional.normalize(ref.float().flatten(2), dim=1)  # (B, C, N)
    q = nn.functional.normalize(query.float().flatten(2), dim=1)
    sim = r.transpose(1, 2) @ q  # (B, N_ref, N_query) cosine similarities
    grid = _grid_coordinates(gh, gw, sim.device)  # (N, 2) x, y
    top_r, top_q = sim.topk(2, dim=2), sim.topk(2, dim=1)
    nn_of_ref, nn_of_query = top_r.indices[..., 0], top_q.indices[:, 0]  # (B, N) indices into the other side
    mutual_ref = torch.gather(nn_of_query, 1, nn_of_ref) == torch.arange(gh * gw, device=sim.device)
    mutual_query = torch.gather(nn_of_ref, 1, nn_of_query) == torch.arange(gh * gw, device=sim.device)
    ref_ch = _channels(top_r.values[..., 0], top_r.values[..., 1], mutual_ref, grid[nn_of_ref])
    query_ch = _channels(top_q.values[:, 0], top_q.values[:, 1], mutual_query, grid[nn_of_query])
    return ref_ch.view(b, MATCH_CHANNELS, gh, gw), query_ch.view(b, MATCH_CHANNELS, gh, gw)


def _grid_coordinates(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    """(gh * gw, 2) x and y of each token's centre (row-major), the grid spanning [-1, 1]."""
    def centres(n: int) -> torch.Tensor:
        return (torch.arange(n, device=device) + 0.5) * (2 / n) - 1

    ys, xs = torch.meshgrid(centres(gh), centres(gw), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def _channels(best: torch.Tensor, second: torch.Tensor, mutual: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B, N) best and second similarities, (B, N) mutual flags, (B, N, 2) positions -> (B, 5, N)."""
    return torch.cat([torch.stack([best, best - second, mutual.float()], dim=1), where.transpose(1, 2)], dim=1)


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
        self.trunk = create_trunk(args["stem_backbone"])
        channels = self.trunk.feature_info.channels()[-1]
        self.trunk.to(memory_format=torch.channels_last)  # much faster convolutions on CPU under bf16
        self.grid = (height // TOKEN_STRIDE, self.half_size[1] // TOKEN_STRIDE)  # tokens per half (Gh, Gw)
        if args["token_match"] not in TOKEN_MATCH:
            raise ValueError(f"token_match must be one of {TOKEN_MATCH}, got {args['token_match']!r}")
        self.use_match = args["token_match"] == "mnn"
        self.localize = LocalizeSettings.from_args(args.get("localize"))  # None: the whole query only
        self.vit = self._create_vit(args, channels + MATCH_CHANNELS * self.use_match, pretrained)
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
        if self.use_match:
            ref_match, query_match = match_channels(ref_tokens, query_tokens)
            ref_tokens = torch.cat([ref_tokens.float(), ref_match], dim=1)
            query_tokens = torch.cat([query_tokens.float(), query_match], dim=1)
        # reference left, query right (references may come float16 from a store, queries bf16 under autocast)
        x = torch.cat([ref_tokens.float(), query_tokens.float()], dim=3).to(self.head.weight.dtype)
        features = self.vit.forward_features(x)  # (B, prefix + Gh*2Gw, D)
        pooled = self.vit.forward_head(features, pre_logits=True)  # (B, D)
        return self.head(pooled).squeeze(1).float()

    def forward(self, ref: torch.Tensor, query: torch.Tensor, ref_index: torch.Tensor | None = None,
                query_index: torch.Tensor | None = None, query_fine: torch.Tensor | None = None):
        """Logits (B,) of the whole query; with `query_fine` (Q, 3, sH, sW/2: the queries read at the localize
        scale) a localizing model returns (logits (B, 2): whole query, localized region; found (B,) bool)."""
        ref_tokens, query_tokens = self.tokens(ref), self.tokens(query)
        if ref_index is None:
            ref_index = query_index = torch.arange(len(ref_tokens), device=ref_tokens.device)
        ref_tokens = ref_tokens[ref_index]
        full = self.forward_tokens(ref_tokens, query_tokens[query_index])
        if query_fine is None or self.localize is None:
            return full
        return self.forward_local(ref_tokens, query_fine, self.tokens(query_fine), query_index, full)

    def forward_local(self, ref_tokens: torch.Tensor, fine_images: torch.Tensor, fine_tokens: torch.Tensor,
                      query_index: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, Gh, Gw) reference tokens of B pairs, the (Q, 3, sH, sW) fine query images and their tokens,
        (B,) query index, (B,) whole-query logits -> (logits (B, 2): whole query, localized region; found (B,)).
        A pair whose box was not found keeps its whole-query logit as its local one."""
        crops, _, found = local_tokens(self, ref_tokens, fine_images, fine_tokens, query_index, self.localize)
        picked = found.nonzero().squeeze(1)
        local = full
        if len(picked):
            local = full.index_put((picked,), self.forward_tokens(ref_tokens[picked], crops))
        return torch.stack([full, local], dim=1), found
