"""The descriptor trainer's options (`scripts/train_descriptor.py`): the shared training options of
`pair_vit.training.TrainConfig` with the descriptor's defaults, and its own model, loss and data options."""
from __future__ import annotations

from dataclasses import dataclass

from pair_vit.config import opt, option_like
from pair_vit.descriptor.model import INPUT_STATS, DescriptorModelConfig
from pair_vit.training import RESUME_KEYS as SHARED_RESUME_KEYS
from pair_vit.training import TrainConfig

MODEL_KEYS = ("backbone", "embed_dim", "image_size", "gem_p", "input_stats", "pretrained")
DATA_KEYS = ("views_per_photo", "edit_side", "n_edits_max", "edit_weights", "hard_fraction", "mine_every", "jitter")
LOSS_KEYS = ("freeze_stride", "batch_size", "temperature", "learn_temperature", "memory_size")
# A resumed run must match the saved one in these; lr, max_steps, checkpointing, workers... may change.
RESUME_KEYS = tuple(dict.fromkeys(SHARED_RESUME_KEYS + MODEL_KEYS + DATA_KEYS + LOSS_KEYS))


@dataclass
class TrainDescriptorConfig(TrainConfig):
    """Train the stage-1 global descriptor (self-supervised) on a folder of photos."""

    # the shared options, with this trainer's defaults
    output_dir: str = option_like(TrainConfig, "output_dir", "runs/descriptor")
    backbone: str = option_like(TrainConfig, "backbone", "resnet10t")
    max_steps: int = option_like(TrainConfig, "max_steps", 4000)
    lr: float = option_like(TrainConfig, "lr", 2e-3)
    warmup_steps: int = option_like(TrainConfig, "warmup_steps", 150)
    grad_clip: float = option_like(TrainConfig, "grad_clip", 2.0)
    intensity_start: float = option_like(TrainConfig, "intensity_start", 0.3)
    neighbours: int = option_like(TrainConfig, "neighbours", 10)
    num_workers: int = option_like(TrainConfig, "num_workers", 0)
    log_every: int = option_like(TrainConfig, "log_every", 20)
    # model
    embed_dim: int = opt(256, "descriptor dimension (<= 256)")
    image_size: int = opt(160, "input side in pixels (images are square-resized)")
    gem_p: float = opt(3.0, "initial GeM pooling exponent (learned)")
    input_stats: str = opt("imagenet", "statistics the backbone takes its inputs in: imagenet, or backbone (its "
                                       "own: use with --pretrained imagenet)", choices=INPUT_STATS)
    backbone_lr_scale: float = opt(1.0, "learning rate of the backbone as a fraction of --lr (the GeM and "
                                        "projection head get --lr)")
    freeze_stride: int = opt(0, "backbone layers up to this feature stride keep their starting weights and "
                                "batch-norm statistics (e.g. 8 with --pretrained imagenet; 0: all trained)")
    # loss
    batch_size: int = opt(64, "photos per step and process; each gives 2 views")
    temperature: float = opt(0.05, "InfoNCE temperature (initial value if learned)")
    learn_temperature: bool = opt(False, "learn the temperature")
    memory_size: int = opt(0, "cross-batch memory: this many recent view embeddings are extra negatives (0: off)")
    # data
    cache_dir: str = opt("", "folder of edited-view caches (empty: OUTPUT_DIR/cache); shareable between runs")
    views_per_photo: int = opt(12, "edited views cached per photo (0: edit on the fly every step, slower)")
    edit_side: int = opt(0, "longest side photos are decoded at before editing (0: 2 x image_size)")
    n_edits_max: int = opt(3, "each edited view gets a chain of 1..n_edits_max edits")
    edit_weights: list[str] = opt([], "FAMILY=WEIGHT ...: draw these edit families more (or less) often than "
                                      "the others (weight 1); empty: uniform")
    hard_fraction: float = opt(0.5, "fraction of each batch made of groups of look-alike photos")
    mine_every: int = opt(500, "re-mine look-alikes with the model every this many steps (0: thumbnails only)")
    jitter: float = opt(0.15, "random crops keep at least 1 - jitter of each side")
    cache_workers: int = opt(2, "processes generating the edited-view cache")

    def model_config(self) -> DescriptorModelConfig:
        return DescriptorModelConfig(self.backbone, self.embed_dim, self.image_size, self.gem_p, self.input_stats)
