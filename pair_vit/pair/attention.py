"""Where the pair ViT looks: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    result = pair_rollout(model, reference, query)      # PIL images -> PairRollout
    result.probability                                  # float: sigmoid(logit), float32 forward (no autocast)
    result.grid                                         # (Gh, Gw) in [0, 1]; 112x224 input -> 7 x 14 tokens
    result.reference, result.query                      # (Gh, Gw/2) each: left (reference) and right (query) half
    rgb = overlay(pair_image(model, reference, query, height=224), result.grid)   # (H, W, 3) uint8

Rollout: for every block l, A_l = softmax attention averaged over heads, (N, N) over N = prefix + Gh*Gw tokens.
The residual connection around attention is modelled as 0.5 A_l + 0.5 I (rows still sum to 1), and the layers
are composed, R = Â_L ... Â_1. Row 0 of R (the class token, which the head reads when `global_pool == "token"`)
restricted to the patch columns says how much of each input patch flows into the pooled feature; a model
pooled by averaging the patch tokens uses the mean of the patch rows instead. Maps are divided by their
maximum over the whole pair, so the two halves are comparable and 0.5 means "half the flow of the top patch".

Attention weights are recomputed from each block's qkv projection in a forward hook (timm's fused
`scaled_dot_product_attention` never materialises them); the hooks are removed on exit and nothing else of the
model changes. Rollout ignores the MLPs, the value vectors and the head, and is not class-specific: it shows
where information is mixed from, not what pushes the score up or down.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass
class PairRollout:
    """Rollout of one (reference, query) pair: `grid` (Gh, Gw) float32 in [0, 1] over the pair's token grid."""

    probability: float
    grid: np.ndarray

    @property
    def reference(self) -> np.ndarray:
        """(Gh, Gw/2): the left half of the grid (the reference)."""
        return self.grid[:, : self.grid.shape[1] // 2]

    @property
    def query(self) -> np.ndarray:
        """(Gh, Gw/2): the right half of the grid (the query)."""
        return self.grid[:, self.grid.shape[1] // 2:]


def _attention_modules(vit: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [block.attn for block in getattr(vit, "blocks", [])]
    if not mods or not all(hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "scale") for m in mods):
        raise TypeError(f"{type(vit).__name__} has no timm ViT blocks with qkv attention")
    return mods


def _softmax_attention(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's Attention computes before multiplying by v: x (B, N, C) -> (B, heads, N, N) float32."""
    b, n, _ = x.shape
    qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
    return ((q * module.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@contextmanager
def capture_attention(vit: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass of `vit` (a timm ViT) appends each block's attention weights,
    (B, heads, N, N) float32, to the yielded list, first block first. Hooks are removed on exit."""
    maps: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if len(args) > 1 or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError("attention rollout does not support attention masks")
        maps.append(_softmax_attention(module, args[0] if args else kwargs["x"]).detach())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _attention_modules(vit)]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1, pool: str = "token",
                      residual: bool = True) -> torch.Tensor:
    """Attention flow from the input patches to the pooled feature.

    attentions: one tensor per layer, first layer first, (B, heads, N, N) (averaged over heads here) or
    (B, N, N); rows are softmax distributions. `pool`: "token" reads row 0 (the class token), "avg" the mean
    of the patch rows. Returns (B, N - num_prefix_tokens) float32, not normalised (each row sums to <= 1).
    """
    if pool not in ("token", "avg"):
        raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
    joint = None
    for a in attentions:
        a = a.float().mean(dim=1) if a.dim() == 4 else a.float()
        if residual:
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint  # the later layer acts on the mix of the earlier ones
    if joint is None:
        raise ValueError("no attention maps to roll out")
    rows = joint[:, 0] if pool == "token" else joint[:, num_prefix_tokens:].mean(dim=1)
    return rows[:, num_prefix_tokens:]


def _normalise(values: np.ndarray) -> np.ndarray:
    top = float(values.max())
    return (values / top if top > 0 else np.zeros_like(values)).astype(np.float32)


@torch.no_grad()
def pair_rollout(model: torch.nn.Module, reference: Image.Image, query: Image.Image,
                 residual: bool = True) -> PairRollout:
    """Score one (reference, query) pair of PIL images and roll out the pair ViT's attention (float32, eval mode;
    the model's training mode is restored). Returns a PairRollout with grid (H/16, W/16) in [0, 1]."""
    model = getattr(model, "module", model)
    vit = model.vit
    was_training = model.training
    model.eval()
    try:
        ref, qry = model.preprocess(reference)[None], model.preprocess(query)[None]
        with capture_attention(vit) as maps:
            logit = model(ref, qry)
    finally:
        model.train(was_training)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    pool = "token" if getattr(vit, "global_pool", "token") == "token" else "avg"
    flow = attention_rollout(maps, prefix, pool, residual)[0].cpu().numpy()
    gh, gw = model.token_grid
    if gh * gw != flow.size:
        raise ValueError(f"{flow.size} patch tokens do not form the expected {gh} x {gw} grid")
    return PairRollout(float(torch.sigmoid(logit.float())[0]), _normalise(flow.reshape(gh, gw)))


def pair_image(model: torch.nn.Module, reference: Image.Image, query: Image.Image,
               height: int | None = None) -> Image.Image:
    """The pair as the model sees it (before normalisation): reference left, query right, each resized to the
    model's half aspect ratio (ignoring the images' own), `height` pixels high (default: the model's input)."""
    h, w = getattr(model, "module", model).half_size
    size = (int(round(w * (height or h) / h)), int(height or h))
    pair = Image.new("RGB", (2 * size[0], size[1]))
    pair.paste(reference.convert("RGB").resize(size, Image.Resampling.BILINEAR), (0, 0))
    pair.paste(query.convert("RGB").resize(size, Image.Resampling.BILINEAR), (size[0], 0))
    return pair


def overlay(image: Image.Image | np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "inferno",
            smooth: bool = True) -> np.ndarray:
    """`heat` (Gh, Gw) in [0, 1] upsampled to the image (bilinear if `smooth`, else blocky token cells),
    coloured with `cmap` and blended over `image` (PIL or (H, W, 3) uint8): -> (H, W, 3) uint8."""
    import matplotlib

    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    up = Image.fromarray(np.clip(heat, 0, 1).astype(np.float32)).resize(base.shape[1::-1], resample)
    colour = matplotlib.colormaps[cmap](np.asarray(up))[..., :3] * 255
    return np.clip((1 - alpha) * base + alpha * colour, 0, 255).astype(np.uint8)
