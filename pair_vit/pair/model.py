"""Stage 2 model: a Vision Transformer that sees a reference and a query side by side and outputs one logit.

    model = build_pair_model(default_model_args())                  # vit_tiny, conv stem, 112x224 input
    logits = model(ref, query)                                      # ref, query: (B, 3, H, W/2) -> (B,)
    probs = score_pairs(model, refs, queries, batch_size=64)        # np.float32 (N,), sigmoid probabilities
    model, meta = load_pair_model("runs/pairs/pair_vit.pt")          # a checkpoint of kind "pair_vit"

The pair image is the reference (left half) and the query (right half), each resized to H x W/2 and
concatenated along the width. A timm ViT (`num_classes=0`, its own `forward_features`/`forward_head`) embeds
it and a linear layer turns the pooled feature into the logit ("the query was derived from this reference";
higher = more likely a copy). Two additions to the plain ViT, both inside its patch embedding:

* `stem="conv"` (default) replaces the 16x16 patch projection by four 3x3 stride-2 conv-BN-ReLU layers and a
  1x1 projection (Xiao et al. 2021, "Early convolutions help transformers see better"); it yields the same
  token grid (H/16 x W/16), so the transformer is unchanged. `stem="patch"` keeps the patch projection.
* `stem="cnn"` uses a timm CNN (`stem_backbone`, default resnet10t, the stage-1 descriptor's backbone) cut at
  stride 16, plus a 1x1 projection: the same token grid again. `init_stem_from` copies a trained
  descriptor's backbone into it, so the transformer starts from copy-invariant local features instead of
  pixels (the ViT itself still has no pretrained weights; there are none offline here).
* `stem="hybrid"` (`pair_vit.pair.hybrid`) runs a pretrained CNN trunk on each image separately and a ViT over
  both token grids side by side: the same model as `cnn` computed per half, so tokens are cached per image.
* `half_marker=True` adds a learned embedding to every token: one vector for the reference half, another for
  the query half, so the model always knows which side is which (also after position-embedding resampling).

`score_pairs` is the one scoring path used by the training evaluation and by the reranker.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from pair_vit import precision
from pair_vit.pair.hybrid import HybridPairViT, trunk_input_stats
from pair_vit.pair.inputs import DEFAULT_MEAN, DEFAULT_STD, PairInputs, normalise_uint8
from pair_vit.pair.layers import CNNStem, HalfMarker, conv_stem
from pair_vit.training import warmup_cosine

KIND = "pair_vit"
STEMS = ("conv", "patch", "cnn", "hybrid")
# The released pair ViT (trained by `scripts/train_pairs.py --config pair_vit/configs/pairs.yaml`).
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "pair_vit.pt"


def default_model_args(**overrides: Any) -> dict[str, Any]:
    """The architecture arguments `build_pair_model` takes, with defaults; keyword arguments override them.

    backbone: timm model name; input_size: [H, W] of the pair image (each half is H x W/2); stem: "conv",
    "patch" or "cnn"; stem_backbone: the timm CNN of a "cnn" stem; half_marker: learned reference/query
    embedding; dynamic_size: accept other input sizes (progressive resolution; position embeddings
    resampled on the fly); token_match: "mnn" adds nearest-neighbour correspondence channels to a hybrid's
    tokens (`pair_vit.pair.hybrid.match_channels`), "none" does not; localize: a hybrid that also reads each
    query's region where the reference was found (`pair_vit.pair.localize.LocalizeSettings` as a dict; empty:
    off); backbone_kwargs: extra timm arguments
    (depth, embed_dim, num_heads, drop_path_rate, ...); mean/std: input normalisation.
    """
    args = {"backbone": "vit_tiny_patch16_224", "input_size": [112, 224], "stem": "conv",
            "stem_backbone": "resnet10t", "half_marker": True, "token_match": "none", "localize": {},
            "dynamic_size": False, "backbone_kwargs": {}, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    unknown = set(overrides) - set(args)
    if unknown:
        raise ValueError(f"unknown pair-model argument(s) {sorted(unknown)}; known: {sorted(args)}")
    args.update(copy.deepcopy(overrides))
    args["input_size"] = [int(s) for s in args["input_size"]]
    return args


# ----------------------------------------------------------------------------- model


class PairViT(PairInputs, nn.Module):
    """ViT pair classifier over the pixels of the pair image (stems conv, patch, cnn).
    forward(ref (B,3,H,W/2), query (B,3,H,W/2), ref_index=None, query_index=None) -> logits (B,) float."""

    def __init__(self, model_args: dict[str, Any], pretrained: str = ""):
        super().__init__()
        self.model_args = default_model_args(**model_args)
        args = self.model_args
        if args["stem"] not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {args['stem']!r}")
        height, width = args["input_size"]
        if width % 2:
            raise ValueError(f"the pair width must be even (two halves), got input_size {args['input_size']}")
        self.half_size = (height, width // 2)
        self.vit = _create_backbone(args, pretrained)
        embed = self.vit.patch_embed
        dim = embed.proj.out_channels
        proj = {"conv": lambda: conv_stem(embed.proj.in_channels, dim, embed.patch_size[0]),
                "cnn": lambda: CNNStem(args["stem_backbone"], dim, embed.patch_size[0]),
                "patch": lambda: embed.proj}[args["stem"]]()
        embed.proj = nn.Sequential(proj, HalfMarker(dim)) if args["half_marker"] else proj
        self.head = nn.Linear(self.vit.num_features, 1)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(Gh, Gw) of the pair's token grid."""
        patch = self.vit.patch_embed.patch_size
        return self.half_size[0] // patch[0], 2 * self.half_size[1] // patch[1]

    def forward(self, ref: torch.Tensor, query: torch.Tensor, ref_index: torch.Tensor | None = None,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        """ref, query: (B, 3, h, w) normalised images (see `preprocess`) -> (B,) logits; with indices, pair i
        is (ref[ref_index[i]], query[query_index[i]])."""
        if ref_index is not None:
            ref, query = ref[ref_index], query[query_index]
        x = torch.cat([ref, query], dim=3)  # (B, 3, h, 2w): reference left, query right
        tokens = self.vit.forward_features(x)  # (B, prefix + Gh*Gw, D)
        pooled = self.vit.forward_head(tokens, pre_logits=True)  # (B, D)
        return self.head(pooled).squeeze(1).float()

    def cnn_stem(self) -> CNNStem:
        """The CNN stem (stem="cnn" only)."""
        proj = self.vit.patch_embed.proj
        stem = proj[0] if isinstance(proj, nn.Sequential) else proj
        if not isinstance(stem, CNNStem):
            raise ValueError(f"this pair model has a {self.model_args['stem']!r} stem, not a 'cnn' one")
        return stem


def trunk_of(model: nn.Module) -> nn.Module:
    """The CNN trunk of a cnn-stem or hybrid pair model (a timm `features_only` model)."""
    return model.trunk if isinstance(model, HybridPairViT) else model.cnn_stem().trunk


def init_stem_from(model: nn.Module, path: str | Path) -> int:
    """Copy the backbone weights of descriptor checkpoint `path` into `model`'s CNN trunk (cnn or hybrid stem);
    returns the number of tensors copied. Refused (ValueError naming the file) if the backbones differ or a
    trunk weight is missing."""
    from pair_vit.checkpoint import load_checkpoint

    trunk = trunk_of(model)
    ckpt = load_checkpoint(path, kind="descriptor")
    saved = ckpt["model_args"].get("backbone")
    if saved != model.model_args["stem_backbone"]:
        raise ValueError(f"{path}: a {saved!r} descriptor cannot initialise a "
                         f"{model.model_args['stem_backbone']!r} stem")
    state = {k[len("backbone."):]: v.float() for k, v in ckpt["model_state"].items() if k.startswith("backbone.")}
    missing = [k for k in trunk.state_dict() if k not in state]
    if missing:
        raise ValueError(f"{path}: no weights for stem tensor(s) {missing[:5]}")
    trunk.load_state_dict({k: state[k] for k in trunk.state_dict()})
    return len(trunk.state_dict())


def _create_backbone(args: dict[str, Any], pretrained: str) -> nn.Module:
    """timm ViT without classifier at the pair input size; `pretrained`: "" none, a local file, or a hub id."""
    kwargs = dict(args["backbone_kwargs"])
    kwargs.update(num_classes=0, img_size=tuple(args["input_size"]))
    if args["dynamic_size"]:
        kwargs["dynamic_img_size"] = True
    if pretrained:
        kwargs["pretrained"] = True
        if Path(pretrained).is_file():
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained)}
        elif pretrained.lower() not in ("1", "true", "default"):
            kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": pretrained}
    return timm.create_model(args["backbone"], **kwargs)


def build_pair_model(model_args: dict[str, Any] | None = None, pretrained: str = "") -> nn.Module:
    """A pair model from `model_args` (see `default_model_args`): a `HybridPairViT` for stem="hybrid", else a
    `PairViT`; `pretrained` initialises the ViT backbone (a local file or a hub id; pixel stems only)."""
    args = default_model_args(**(model_args or {}))
    if args["stem"] not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {args['stem']!r}")
    if args["token_match"] != "none" and args["stem"] != "hybrid":
        raise ValueError(f"token_match={args['token_match']!r} needs the hybrid stem (tokens per image), "
                         f"not stem={args['stem']!r}")
    if args["localize"] and args["stem"] != "hybrid":
        raise ValueError(f"localize needs the hybrid stem (tokens per image), not stem={args['stem']!r}")
    return HybridPairViT(args, pretrained) if args["stem"] == "hybrid" else PairViT(args, pretrained)


def stem_input_stats(stem: str, stem_backbone: str) -> dict[str, list[float]]:
    """model_args mean/std for a stem: a CNN trunk takes its inputs normalised as it was trained (timm's
    pretrained_cfg of the backbone: ImageNet statistics for resnet10t, 0.5 for TF EfficientNet-Lite); the
    pixel stems keep the default."""
    if stem not in ("cnn", "hybrid"):
        return {}
    mean, std = trunk_input_stats(stem_backbone)
    return {"mean": mean, "std": std}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                   min_ratio: float = 0.01, stem_lr_scale: float = 1.0):
    """AdamW (weight decay on matrices and conv kernels only, not on norms, biases, embeddings) and a LambdaLR:
    linear warmup over `warmup` steps, then cosine from `lr` down to `min_ratio * lr` at step `total`.
    A cnn stem's trunk learns at `stem_lr_scale * lr`: initialised from a trained descriptor, it should be
    adapted, not overwritten by the early, noisy gradients of a random transformer."""
    has_trunk = model.model_args["stem"] in ("cnn", "hybrid")
    trunk_ids = {id(p) for p in trunk_of(model).parameters()} if has_trunk else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a frozen trunk
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "reg_token", "embed.embed"))
        groups.setdefault((id(p) in trunk_ids, skip), []).append(p)
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if skip else weight_decay,
                                    "lr": lr * (stem_lr_scale if trunk else 1.0)}
                                   for (trunk, skip), params in sorted(groups.items())], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
    return optimizer, schedule


# ----------------------------------------------------------------------------- inputs


def _as_batch(model: PairViT, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """PIL images or (3, h, w) tensors, or an (n, 3, h, w) float (normalised) or uint8 tensor
    -> (n, 3, h, w) normalised float tensor."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return normalise_uint8(images, model.model_args["mean"], model.model_args["std"])
        return images
    return torch.stack([model.preprocess(im) if isinstance(im, Image.Image) else im for im in images])


def _forward_pairs(model: PairViT, refs, queries, batch_size: int, amp: bool) -> torch.Tensor:
    """Logits (N,) float32 on the CPU of refs[i] vs queries[i], batch by batch, in eval mode (restored after)."""
    if len(refs) != len(queries):
        raise ValueError(f"{len(refs)} references but {len(queries)} queries: pairs must line up")
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper scores with its module
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), precision.autocast(device, amp):
            for start in range(0, len(refs), batch_size):
                r = _as_batch(model, refs[start:start + batch_size]).to(device)
                q = _as_batch(model, queries[start:start + batch_size]).to(device)
                out.append(model(r, q).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def pair_logits(model: PairViT, refs: Sequence[Any] | torch.Tensor, queries: Sequence[Any] | torch.Tensor,
                batch_size: int = 64, amp: bool = True) -> np.ndarray:
    """Logit that queries[i] was derived from refs[i] (higher = more likely a copy) -> np.float32 (N,).
    Inputs as for `score_pairs`, plus uint8 (N, 3, H, W/2) tensors (see `normalise_uint8`)."""
    return _forward_pairs(model, refs, queries, batch_size, amp).numpy().astype(np.float32)


def score_pairs(model: PairViT, refs: Sequence[Any] | torch.Tensor, queries: Sequence[Any] | torch.Tensor,
                batch_size: int = 64, amp: bool = True) -> np.ndarray:
    """Probability that queries[i] was derived from refs[i], for every i -> np.float32 (N,) in [0, 1].

    refs, queries: N PIL images (preprocessed here, batch by batch) or (3, H, W/2) tensors from `preprocess`,
    or (N, 3, H, W/2) tensors. `amp`: bf16 autocast where native (`pair_vit.precision`). The model is scored
    in eval mode and put back as it was.
    """
    return torch.sigmoid(_forward_pairs(model, refs, queries, batch_size, amp)).numpy().astype(np.float32)


def pair_metrics(probs: np.ndarray, labels: np.ndarray, group_size: int) -> dict[str, float]:
    """Accuracy at 0.5, ROC-AUC, micro-AP and in-group rank-1 of the scored pairs of whole groups.

    probs, labels: (n_groups * G * G,) laid out by `pair_vit.pair.data.pair_indices` (reference-major within
    a group); rank-1: fraction of queries whose own reference scores highest in their group.
    """
    from sklearn.metrics import roc_auc_score

    from pair_vit.metrics import micro_average_precision

    g = group_size
    per_query = probs.reshape(-1, g, g)  # (groups, ref, query)
    positive = labels > 0.5
    return {"accuracy": float(((probs > 0.5) == positive).mean()),
            "auc": float(roc_auc_score(positive, probs)) if 0 < positive.sum() < len(positive) else float("nan"),
            "ap": micro_average_precision(probs, positive, int(positive.sum())),
            "rank1": float((per_query.argmax(axis=1) == np.arange(g)).mean()), "pairs": int(len(labels))}


# ----------------------------------------------------------------------------- checkpoints


def load_pair_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PairViT, dict[str, Any]]:
    """Load a pair-ViT checkpoint (kind "pair_vit": training `checkpoint.pt` or final `pair_vit.pt`).

    Returns (model in eval mode, float32 weights, on `device`; the checkpoint's metadata: everything but the
    weights and optimiser state). A checkpoint of another kind is refused by `load_checkpoint`.
    """
    from pair_vit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, kind=KIND)
    try:
        model = build_pair_model(ckpt["model_args"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()})
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: weights do not fit model_args {ckpt['model_args']}: "
                         f"{str(err).splitlines()[0]}") from None
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state", "extra")}
    meta["extra"] = {k: v for k, v in (ckpt.get("extra") or {}).items() if k not in ("optimizer", "scheduler", "rng")}
    return model.to(device).eval(), meta


def save_pair_model(path: str | Path, model: PairViT, *, config: dict[str, Any], step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Weights-only checkpoint (kind "pair_vit", float16 weights): what the reranker loads. Atomic."""
    from pair_vit.checkpoint import save_checkpoint, state_dict_to

    save_checkpoint(path, kind=KIND, model_args=model.model_args, model_state=state_dict_to(model.state_dict(),
                    torch.float16), config=config, step=step, extra=extra)
