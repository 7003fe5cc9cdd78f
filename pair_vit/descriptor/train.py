"""Self-supervised training of the stage-1 descriptor on unlabelled photos (from scratch, from ImageNet weights
or from another descriptor).

    python scripts/train_descriptor.py --train-dir /work/shared/data/train --max-steps 4000
    accelerate launch scripts/train_descriptor.py ...          # same, under accelerate (1 or more processes)

Each photo gives two views: a clean one (light crop/scale jitter of the photo) and an edited one (the
copy-edit battery, `pair_vit.edits.make_query`, with other training photos as donors for paste/collage).
The two views of a photo are positives, every other view in the batch a negative: symmetric InfoNCE over
the 2N x 2N cosine-similarity matrix at temperature ~0.05.

Edited views are pre-generated once into a cache (`views_per_photo` per photo, intensities spread over
(0, intensity_end]) under OUTPUT_DIR/cache/<hash of photos and settings>/ and reused by later runs with the
same photos and settings. Measured on the 2-core CPU: the battery costs ~5-7 ms per view (decode + edit),
i.e. ~0.4 s for a 64-photo batch against ~1 s for the forward/backward of its 128 views, so editing every
step costs ~40% of the step time while the cache costs a one-off minute or two. Training then samples, for
step s, a cached view whose intensity is at most the curriculum cap (ramping from `intensity_start` to
`intensity_end` over the first `ramp_fraction` of the steps) plus a light random crop. `views_per_photo 0`
edits on the fly instead (use `--num-workers 1` then). `edit_weights` (`--edit-weights paste_onto=3 blur=2`)
draws some edit families more often than others (`pair_vit.edits.sample_chain`), to aim training at the edits
the shortlist misses.

Hard negatives: part of every batch (`hard_fraction`) is made of groups of `group_size` look-alike photos,
nearest neighbours under a colour/layout thumbnail at first and under the model's own descriptors,
re-mined every `mine_every` steps. `memory_size` adds a cross-batch memory of recent embeddings as extra
negatives (`pair_vit.descriptor.loss`); `init_from` fine-tunes existing weights with a fresh schedule (the
shipped descriptor: configs/descriptor.yaml from scratch, then configs/descriptor_finetune.yaml).

Measured (2-core AVX512-BF16 CPU, resnet10t at 160 px, 64 photos = 128 views per step, bf16): ~0.9 steps/s
on an idle CPU; caching 3,009 photos x 8 views took ~2 min with 2 workers; re-mining takes ~10 s. Another busy
process on the 2 cores cuts 2-thread training 3-15x, while `--threads 1` keeps ~70 views/s on a shared CPU.

Every batch is a function of (seed, step, process rank) and of the saved neighbour table, so `--resume`
continues a run exactly (same max_steps) from `checkpoint.pt`; `--stop-at` ends a run early without
changing its schedule (split a long run across sessions). The loop itself is `pair_vit.training.Trainer`'s. Outputs in OUTPUT_DIR: config.yaml,
checkpoint.pt (full training state), descriptor.pt (fp16 weights, kind "descriptor"), metrics.csv,
skipped.csv (unreadable photos, if any).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pair_vit import data, training
from pair_vit.checkpoint import save_checkpoint, state_dict_to
from pair_vit.config import save_config, to_dict
from pair_vit.descriptor.config import RESUME_KEYS, TrainDescriptorConfig
from pair_vit.descriptor.data import (StepBatches, ViewCache, intensity_cap, mine_neighbours, prepare_data,
                                      step_photos, thumbnail_vectors)
from pair_vit.descriptor.loss import CrossBatchMemory, freeze_batch_norm, info_nce
from pair_vit.descriptor.model import KIND, Descriptor, DescriptorModelConfig

log = logging.getLogger(__name__)

__all__ = ["TrainDescriptorConfig", "run"]


class TrainModule(nn.Module):
    """The descriptor plus the InfoNCE temperature, wrapped together so DDP syncs both."""

    def __init__(self, descriptor: Descriptor, temperature: float, learn: bool):
        super().__init__()
        self.descriptor = descriptor
        log_t = torch.tensor(math.log(temperature))
        if learn:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.descriptor(x), self.log_temperature.exp().clamp(min=0.01, max=1.0)


def param_groups(module: TrainModule, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """AdamW groups: the backbone at lr * backbone_lr_scale (pretrained features move slower than the new
    head), the rest at lr; no weight decay on biases, norms and GeM's p."""
    backbone = {id(p) for p in module.descriptor.backbone.parameters()}
    groups: dict[tuple[float, float], list] = {}
    for p in module.parameters():
        if p.requires_grad:
            key = (lr * (backbone_lr_scale if id(p) in backbone else 1.0), weight_decay if p.ndim > 1 else 0.0)
            groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), params in groups.items()]


def freeze_early(backbone: nn.Module, stride: int) -> list[nn.Module]:
    """Freeze the parameters of timm `backbone` that compute its features up to feature stride `stride` (the stem
    and first stages, by timm's `feature_info`: generic low-level features that fine-tuning need not move, and
    whose backward pass at high resolution costs most). Returns the frozen modules, to keep in eval mode (their
    batch-norm statistics stay); [] for stride 0."""
    names = [f["module"] for f in getattr(backbone, "feature_info", []) if f["reduction"] <= stride]
    if not names:
        return []
    params = list(backbone.named_parameters())
    last = max(i for i, (name, _) in enumerate(params) if name.startswith(names[-1] + "."))
    for _, p in params[:last + 1]:
        p.requires_grad_(False)
    return [m for m in backbone.modules() if any(True for _ in m.parameters())
            and not any(p.requires_grad for p in m.parameters())]


# ----------------------------------------------------------------------------- setting up


def check_config(cfg: TrainDescriptorConfig) -> None:
    cfg.model_config()  # validates the model fields
    problems = [msg for bad, msg in [
        (cfg.max_steps < 1, "max_steps must be >= 1"), (cfg.stop_at < 0, "stop_at must be >= 0"),
        (cfg.batch_size < 2, "batch_size must be >= 2 (negatives come from the batch)"),
        (cfg.temperature <= 0, "temperature must be > 0"), (cfg.memory_size < 0, "memory_size must be >= 0"),
        (cfg.views_per_photo < 0, "views_per_photo must be >= 0"),
        (not 0 <= cfg.intensity_start <= cfg.intensity_end <= 1, "need 0 <= intensity_start <= intensity_end <= 1"),
        (not 0 <= cfg.hard_fraction <= 1, "hard_fraction must be in [0, 1]"),
        (cfg.group_size < 1, "group_size must be >= 1"), (not 0 <= cfg.jitter < 0.9, "jitter must be in [0, 0.9)"),
        (cfg.checkpoint_every < 1, "checkpoint_every must be >= 1"),
        (cfg.log_every < 1, "log_every must be >= 1"), (cfg.neighbours < 1, "neighbours must be >= 1")] if bad]
    if cfg.pretrained == "imagenet" and cfg.input_stats != "backbone":
        problems.append("--pretrained imagenet needs --input-stats backbone (the weights expect their own input "
                        "statistics)")
    if problems:
        raise ValueError("; ".join(problems))
    from pair_vit.edits import parse_weights  # heavy import, needed by the run anyway

    parse_weights(cfg.edit_weights)  # a typo fails here, not in the cache workers


def resume_state(cfg: TrainDescriptorConfig, acc) -> dict | None:
    """The checkpoint to continue from (None: a fresh run); refused if model/data settings differ."""
    path, ckpt = training.prepare_output(cfg.output_dir, cfg.resume, cfg.overwrite, KIND, acc, ["descriptor.pt"])
    if ckpt is not None:
        training.refuse_resume(path, training.config_diffs(ckpt, cfg, RESUME_KEYS))
    return ckpt


def check_photos(ckpt: dict | None, cache: ViewCache, out: Path) -> None:
    """A resumed run must train on the same usable photos as the saved one."""
    if ckpt is None:
        return
    saved = ckpt["extra"].get("manifest_hash")
    if saved != cache.manifest_hash:
        training.refuse_resume(out / "checkpoint.pt", [f"usable training photos: manifest saved {saved}, "
                                                       f"now {cache.manifest_hash}"])


# ----------------------------------------------------------------------------- the trainer


class DescriptorTrainer(training.Trainer):
    """InfoNCE steps over cached edited views, look-alikes re-mined every mine_every steps."""

    kind, unit = KIND, "images"

    def __init__(self, cfg: TrainDescriptorConfig, acc, cache: ViewCache):
        torch.manual_seed(cfg.seed)
        module = TrainModule(Descriptor(cfg.model_config(), pretrained=cfg.pretrained), cfg.temperature,
                             cfg.learn_temperature)
        self.frozen = freeze_early(module.descriptor.backbone, cfg.freeze_stride)
        optimizer = torch.optim.AdamW(param_groups(module, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale))
        super().__init__(cfg, acc, module, optimizer, training.make_scheduler(optimizer, cfg))
        self.cache = cache
        self.memory = CrossBatchMemory(cfg.memory_size, cfg.embed_dim)  # recent embeddings as extra negatives
        self.table, self.mined_at = np.zeros((len(cache.ids), 0), np.int64), -1

    def start(self, ckpt: dict | None) -> None:
        """Restore a saved run, or initialise: fine-tuning weights and the first look-alike table."""
        cfg, descriptor = self.cfg, self.net()
        if ckpt is not None:
            self.restore(ckpt)
            self.acc.print(f"resuming {self.out / 'checkpoint.pt'} at step {self.step}")
        else:
            if cfg.init_from:  # a checkpoint written before an architecture argument existed had its default
                training.init_from(descriptor, cfg.init_from, KIND, asdict(cfg.model_config()),
                                   asdict(DescriptorModelConfig()))
            if cfg.init_from or cfg.pretrained:
                # look-alikes under the starting model, not colour thumbnails: it already knows better
                self.table, self.mined_at = mine_neighbours(descriptor, self.cache, cfg), 0
            else:
                self.table = training.nearest_neighbours(thumbnail_vectors(self.cache), cfg.neighbours)

    def net(self) -> Descriptor:
        return self.unwrapped().descriptor

    def restore(self, ckpt: dict) -> None:
        super().restore(ckpt)
        extra = ckpt["extra"]
        if "memory" in extra:
            self.memory.load_state_dict(extra["memory"])
        self.unwrapped().log_temperature.data.copy_(extra["log_temperature"])
        self.table, self.mined_at = extra["neighbours"].numpy(), int(extra["mined_at"])

    def extra_state(self) -> dict[str, Any]:
        return {"neighbours": torch.from_numpy(self.table), "mined_at": self.mined_at,
                "manifest_hash": self.cache.manifest_hash, "cache_key": self.cache.folder.name,
                "log_temperature": self.unwrapped().log_temperature.detach().clone(),
                "n_photos": len(self.cache.ids), "memory": self.memory.state_dict()}

    def mine_if_due(self) -> None:
        """Every mine_every steps, the main process re-mines look-alikes with the model; all get its table."""
        cfg, step = self.cfg, self.step
        if cfg.mine_every and step > 0 and step % cfg.mine_every == 0 and self.mined_at != step:
            mined = mine_neighbours(self.net(), self.cache, cfg) if self.main else None
            self.table, self.mined_at = training.broadcast(self.acc, mined), step

    def batches(self, stop: int):
        """The views of each step up to `stop`, in segments between two re-minings of the look-alikes."""
        cfg = self.cfg
        while self.step < stop:
            self.mine_if_due()
            end = min(stop, (self.step // cfg.mine_every + 1) * cfg.mine_every) if cfg.mine_every else stop
            yield from torch.utils.data.DataLoader(
                StepBatches(self.cache, self.table, cfg, self.step, end, self.acc.process_index), batch_size=None,
                shuffle=False, num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None)

    def loss(self, x: torch.Tensor):
        """InfoNCE over the step's views `x` (2 per photo) -> (loss, accuracy and temperature, views)."""
        cfg, acc = self.cfg, self.acc
        for m in self.frozen:
            m.eval()
        if self.memory.size:
            freeze_batch_norm(self.model)
        with self.autocast():
            z, temperature = self.model(x.to(acc.device))
        photos = None
        if self.memory.size:
            photos = torch.as_tensor(step_photos(len(self.cache.ids), self.table, cfg, self.step, acc.process_index))
        loss, accuracy = info_nce(z, temperature, photos, self.memory)
        if photos is not None:
            self.memory.push(z, photos)
        return loss, {"accuracy": accuracy, "temperature": temperature}, len(x)

    def log_fields(self, step: int) -> dict[str, Any]:
        return {"intensity_cap": round(intensity_cap(self.cfg, step), 3)}

    def save_descriptor(self) -> None:
        """descriptor.pt: the finished descriptor's fp16 weights (main process)."""
        if self.main:
            save_checkpoint(self.out / "descriptor.pt", kind=KIND, model_args=self.net().model_args,
                            model_state=state_dict_to(self.net().state_dict(), torch.float16),
                            config=to_dict(self.cfg), step=self.step,
                            extra={"manifest_hash": self.cache.manifest_hash, "n_photos": len(self.cache.ids),
                                   "final": self.last})


def run(cfg: TrainDescriptorConfig) -> dict[str, Any]:
    """Train a descriptor as `cfg` says (see the module docstring); returns a summary dict."""
    check_config(cfg)
    acc = training.start_accelerator()
    training.set_torch_threads(cfg.threads, acc.num_processes)
    out = Path(cfg.output_dir)
    ckpt = resume_state(cfg, acc)
    cache, report = prepare_data(cfg, acc, out)
    check_photos(ckpt, cache, out)
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
        if len(report):
            report.write_csv(out / "skipped.csv")
    trainer = DescriptorTrainer(cfg, acc, cache)
    trainer.start(ckpt)
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    acc.print(f"training on {len(cache.ids)} photos ({len(report)} skipped), {acc.num_processes} process(es), "
              f"{2 * min(cfg.batch_size, len(cache.ids))} views per step and process, "
              f"steps {trainer.step} -> {stop} of {cfg.max_steps}")
    t0, step0 = time.perf_counter(), trainer.step
    trainer.loop(stop)
    trainer.save()
    if trainer.step >= cfg.max_steps:
        trainer.save_descriptor()
    acc.wait_for_everyone()
    return summary(trainer, report, step0, time.perf_counter() - t0)


def summary(trainer: DescriptorTrainer, report: data.SkipReport, step0: int, elapsed: float) -> dict[str, Any]:
    """Print the one summary line (main process) and return the summary dict."""
    step, last = trainer.step, trainer.last
    trainer.acc.print(f"descriptor: steps {step0} -> {step} of {trainer.cfg.max_steps} in {elapsed:.0f} s "
                      f"({(step - step0) / max(elapsed, 1e-9):.2f} steps/s incl. setup)"
                      + (f", loss {last['loss']:.4f}, top-1 view accuracy {last['accuracy']:.3f}" if last else "")
                      + f"; outputs in {trainer.out}" + (f"; {report.summary()}" if len(report) else ""))
    return {"step": step, "output_dir": str(trainer.out), "skipped": len(report), "last": last}
