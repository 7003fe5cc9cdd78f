"""Self-supervised training of the stage-1 descriptor from scratch on unlabelled photos.

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
negatives (`pair_vit.descriptor_loss`); `init_from` fine-tunes existing weights with a fresh schedule (the
shipped descriptor: configs/descriptor.yaml from scratch, then configs/descriptor_finetune.yaml).

Measured (2-core AVX512-BF16 CPU, resnet10t at 160 px, 64 photos = 128 views per step, bf16): ~0.9 steps/s
on an idle CPU; caching 3,009 photos x 8 views took ~2 min with 2 workers; re-mining takes ~10 s. Another busy
process on the 2 cores cuts 2-thread training 3-15x, while `--threads 1` keeps ~70 views/s on a shared CPU.

Every batch is a function of (seed, step, process rank) and of the saved neighbour table, so `--resume`
continues a run exactly (same max_steps) from `checkpoint.pt`; `--stop-at` ends a run early without
changing its schedule (split a long run across sessions). Outputs in OUTPUT_DIR: config.yaml,
checkpoint.pt (full training state), descriptor.pt (fp16 weights, kind "descriptor"), metrics.csv,
skipped.csv (unreadable photos, if any).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pair_vit import data, precision, training
from pair_vit.checkpoint import save_checkpoint, state_dict_to
from pair_vit.config import opt, save_config, to_dict
from pair_vit.descriptor import KIND, Descriptor, DescriptorModelConfig
from pair_vit.descriptor_loss import CrossBatchMemory, freeze_batch_norm, info_nce
from pair_vit.descriptor_data import (StepBatches, ViewCache, intensity_cap, mine_neighbours, prepare_data,
                                      step_photos, thumbnail_vectors)

log = logging.getLogger(__name__)

MODEL_KEYS = ("backbone", "embed_dim", "image_size", "gem_p", "pretrained")
DATA_KEYS = ("train_dir", "split", "split_seed", "dev_fraction", "seed", "views_per_photo", "edit_side",
             "n_edits_max", "edit_weights", "intensity_start", "intensity_end", "ramp_fraction", "hard_fraction",
             "group_size", "neighbours", "mine_every", "jitter")
LOSS_KEYS = ("batch_size", "temperature", "learn_temperature", "memory_size", "init_from")
# A resumed run must match the saved one in these; lr, max_steps, checkpointing, workers... may change.
RESUME_KEYS = MODEL_KEYS + DATA_KEYS + LOSS_KEYS


@dataclass
class TrainDescriptorConfig:
    """Train the stage-1 global descriptor (self-supervised, from scratch) on a folder of photos."""

    train_dir: str = opt("", "folder of training photos, nested or not (empty: the demo photos shipped in the package)")
    split: str = opt("train", "side of the fixed train/dev split to train on", choices=("train", "dev", "all"))
    split_seed: int = opt(0, "seed of the train/dev split; must match the benchmark's")
    dev_fraction: float = opt(0.25, "fraction of photos in the dev side of the split")
    output_dir: str = opt("runs/descriptor", "run folder: config.yaml, checkpoint.pt, descriptor.pt, metrics.csv")
    cache_dir: str = opt("", "folder of edited-view caches (empty: OUTPUT_DIR/cache); shareable between runs")
    overwrite: bool = opt(False, "start afresh even if OUTPUT_DIR holds a checkpoint")
    resume: bool = opt(False, "continue from OUTPUT_DIR/checkpoint.pt (refused if model/data settings differ)")
    # model
    backbone: str = opt("resnet10t", "timm backbone name")
    embed_dim: int = opt(256, "descriptor dimension (<= 256)")
    image_size: int = opt(160, "input side in pixels (images are square-resized)")
    gem_p: float = opt(3.0, "initial GeM pooling exponent (learned)")
    pretrained: str = opt("", "timm hub name or local weights file for the backbone (needs a hub; empty: scratch)")
    init_from: str = opt("", "start from this descriptor checkpoint's weights with a fresh schedule (fine-tuning; "
                             "model settings must match)")
    # optimisation
    max_steps: int = opt(4000, "optimisation steps; the LR schedule and curriculum are laid out over them")
    stop_at: int = opt(0, "stop (with a checkpoint) after this many steps without changing the schedule; 0: max_steps")
    batch_size: int = opt(64, "photos per step and process; each gives 2 views")
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases, norms, GeM p)")
    warmup_steps: int = opt(150, "linear warm-up steps, then cosine decay to 1% of lr")
    grad_clip: float = opt(2.0, "clip the gradient norm to this (0: off)")
    temperature: float = opt(0.05, "InfoNCE temperature (initial value if learned)")
    learn_temperature: bool = opt(False, "learn the temperature")
    memory_size: int = opt(0, "cross-batch memory: this many recent view embeddings are extra negatives (0: off)")
    amp: bool = opt(True, "bf16 autocast where the hardware has native bf16, else float32 "
                          "(pair_vit.precision; --no-amp: always float32)")
    # data
    views_per_photo: int = opt(12, "edited views cached per photo (0: edit on the fly every step, slower)")
    edit_side: int = opt(0, "longest side photos are decoded at before editing (0: 2 x image_size)")
    n_edits_max: int = opt(3, "each edited view gets a chain of 1..n_edits_max edits")
    edit_weights: list[str] = opt([], "FAMILY=WEIGHT ...: draw these edit families more (or less) often than "
                                      "the others (weight 1); empty: uniform")
    intensity_start: float = opt(0.3, "edit-intensity cap at step 0 (0 mild .. 1 hardest)")
    intensity_end: float = opt(1.0, "edit-intensity cap at the end of the ramp")
    ramp_fraction: float = opt(0.5, "fraction of max_steps over which the cap ramps up")
    hard_fraction: float = opt(0.5, "fraction of each batch made of groups of look-alike photos")
    group_size: int = opt(4, "photos per look-alike group")
    neighbours: int = opt(10, "look-alike candidates kept per photo")
    mine_every: int = opt(500, "re-mine look-alikes with the model every this many steps (0: thumbnails only)")
    jitter: float = opt(0.15, "random crops keep at least 1 - jitter of each side")
    cache_workers: int = opt(2, "processes generating the edited-view cache")
    num_workers: int = opt(0, "DataLoader workers assembling batches (0: in the training process)")
    # bookkeeping
    checkpoint_every: int = opt(250, "write checkpoint.pt every this many steps")
    log_every: int = opt(20, "log loss/accuracy/throughput every this many steps")
    seed: int = opt(0, "seed for initialisation, cached edits and batches")
    threads: int = opt(0, "torch threads per process (0: torch's default); 1 is faster when other jobs share the CPU")
    progress: bool = opt(True, "show a progress bar")

    def model_config(self) -> DescriptorModelConfig:
        return DescriptorModelConfig(self.backbone, self.embed_dim, self.image_size, self.gem_p)



# ----------------------------------------------------------------------------- model, loss, schedule


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- setting up


def _check_config(cfg: TrainDescriptorConfig) -> None:
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
    if problems:
        raise ValueError("; ".join(problems))
    from pair_vit.edits import parse_weights  # heavy import, needed by the run anyway

    parse_weights(cfg.edit_weights)  # a typo fails here, not in the cache workers


def _resume_state(cfg: TrainDescriptorConfig, out: Path) -> dict | None:
    """The checkpoint to continue from (None: a fresh run); refused if model/data settings differ."""
    path = out / "checkpoint.pt"
    ckpt = training.checkpoint_to_resume(path, cfg.resume, cfg.overwrite, KIND)
    if ckpt is not None:
        training.refuse_resume(path, training.config_diffs(ckpt, cfg, RESUME_KEYS))
    return ckpt


def _check_photos(ckpt: dict | None, cache: ViewCache, out: Path) -> None:
    """A resumed run must train on the same usable photos as the saved one."""
    if ckpt is None:
        return
    saved = ckpt["extra"].get("manifest_hash")
    if saved != cache.manifest_hash:
        training.refuse_resume(out / "checkpoint.pt", [f"usable training photos: manifest saved {saved}, "
                                                       f"now {cache.manifest_hash}"])


def _restore(ckpt: dict, module: TrainModule, optimizer, scheduler,
             memory: CrossBatchMemory) -> tuple[int, int, np.ndarray]:
    """Load weights, temperature, optimiser, schedule, memory and torch RNG -> (step, step mined at, look-alikes)."""
    extra = ckpt["extra"]
    if "memory" in extra:
        memory.load_state_dict(extra["memory"])
    module.descriptor.load_state_dict(ckpt["model_state"])
    module.log_temperature.data.copy_(extra["log_temperature"])
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    training.set_rng_states(extra["rng"])
    return int(ckpt["step"]), int(extra["mined_at"]), extra["neighbours"].numpy()


def _start(cfg: TrainDescriptorConfig, acc, cache: ViewCache, ckpt: dict | None) -> _Run:
    """Seeded model, optimiser and LR schedule (restored from `ckpt` if given), prepared by accelerate."""
    torch.manual_seed(cfg.seed)
    module = TrainModule(Descriptor(cfg.model_config(), pretrained=cfg.pretrained), cfg.temperature,
                         cfg.learn_temperature)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr)
    # Not given to accelerator.prepare: its wrapper steps the schedule once per process per step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training.warmup_cosine(s, cfg.warmup_steps, cfg.max_steps))
    step, mined_at, memory = 0, -1, CrossBatchMemory(cfg.memory_size, cfg.embed_dim)
    if ckpt is not None:
        step, mined_at, table = _restore(ckpt, module, optimizer, scheduler, memory)
        acc.print(f"resuming {Path(cfg.output_dir) / 'checkpoint.pt'} at step {step}")
    elif cfg.init_from:
        training.init_from(module.descriptor, cfg.init_from, KIND, asdict(cfg.model_config()))
        # look-alikes under the starting model, not colour thumbnails: it already knows better
        table, mined_at = mine_neighbours(module.descriptor, cache, cfg), 0
    else:
        table = training.nearest_neighbours(thumbnail_vectors(cache), cfg.neighbours)
    model, optimizer = acc.prepare(module, optimizer)
    return _Run(cfg, acc, model, optimizer, scheduler, cache, table, mined_at, step, memory)


# ----------------------------------------------------------------------------- the training loop


@dataclass
class _Run:
    """What the loop updates and saves: the prepared model and optimiser, the look-alike table, the step."""

    cfg: TrainDescriptorConfig
    acc: Any
    model: nn.Module  # a TrainModule, wrapped by accelerate
    optimizer: Any
    scheduler: Any
    cache: ViewCache
    table: np.ndarray
    mined_at: int
    step: int
    memory: CrossBatchMemory  # recent embeddings as extra negatives (size 0: off); per process
    last: dict[str, Any] = field(default_factory=dict)  # the last logged metrics

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def mine_if_due(self) -> None:
        """Every mine_every steps, the main process re-mines look-alikes with the model; all get its table."""
        cfg, acc, step = self.cfg, self.acc, self.step
        if cfg.mine_every and step > 0 and step % cfg.mine_every == 0 and self.mined_at != step:
            mined = mine_neighbours(acc.unwrap_model(self.model).descriptor, self.cache, cfg) if self.main else None
            self.table, self.mined_at = training.broadcast(acc, mined), step

    def batches(self, stop: int) -> torch.utils.data.DataLoader:
        """The batches of the steps from now to the next re-mining (or to `stop`)."""
        cfg, step = self.cfg, self.step
        end = min(stop, (step // cfg.mine_every + 1) * cfg.mine_every) if cfg.mine_every else stop
        return torch.utils.data.DataLoader(
            StepBatches(self.cache, self.table, cfg, step, end, self.acc.process_index), batch_size=None,
            shuffle=False, num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None)

    def optimise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on the views `x` -> (loss, top-1 view accuracy, temperature)."""
        cfg, acc = self.cfg, self.acc
        self.model.train()
        if self.memory.size:
            freeze_batch_norm(self.model)
        with precision.autocast(acc.device, cfg.amp):
            z, temperature = self.model(x.to(acc.device))
        photos = None
        if self.memory.size:
            photos = torch.as_tensor(step_photos(len(self.cache.ids), self.table, cfg, self.step, acc.process_index))
        loss, accuracy = info_nce(z, temperature, photos, self.memory)
        if photos is not None:
            self.memory.push(z, photos)
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss, accuracy, temperature

    def log(self, window: torch.Tensor, since: float, temperature: torch.Tensor, bar) -> None:
        """Means of the window's (loss sum, accuracy sum, steps) over processes -> metrics.csv, bar and log."""
        cfg, step = self.cfg, self.step
        mean = self.acc.reduce(window.clone(), reduction="mean")
        dt = time.perf_counter() - since
        n_photos, world = len(self.cache.ids), self.acc.num_processes
        self.last = {"step": step, "loss": round(float(mean[0] / mean[2]), 5),
                     "accuracy": round(float(mean[1] / mean[2]), 4),
                     "lr": round(self.scheduler.get_last_lr()[0], 7), "temperature": round(float(temperature), 4),
                     "intensity_cap": round(intensity_cap(cfg, step), 3),
                     "steps_per_s": round(float(window[2]) / dt, 3),
                     "images_per_s": round(float(window[2]) * 2 * min(cfg.batch_size, n_photos) * world / dt, 1)}
        if self.main:
            last = self.last
            training.append_metrics(self.out / "metrics.csv", last)
            bar.set_postfix(loss=last["loss"], acc=last["accuracy"])
            if not cfg.progress:
                log.info("step %d/%d loss %.4f acc %.3f lr %.2e cap %.2f %.2f steps/s", step, cfg.max_steps,
                         last["loss"], last["accuracy"], last["lr"], last["intensity_cap"], last["steps_per_s"])

    def save(self) -> None:
        """checkpoint.pt with everything --resume needs (written by the main process)."""
        self.acc.wait_for_everyone()
        if self.main:
            unwrapped = self.acc.unwrap_model(self.model)
            extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": training.rng_states(("torch",)), "neighbours": torch.from_numpy(self.table),
                     "mined_at": self.mined_at, "manifest_hash": self.cache.manifest_hash,
                     "cache_key": self.cache.folder.name, "log_temperature": unwrapped.log_temperature.detach().clone(),
                     "n_photos": len(self.cache.ids), "memory": self.memory.state_dict()}
            save_checkpoint(self.out / "checkpoint.pt", kind=KIND, model_args=asdict(self.cfg.model_config()),
                            model_state=unwrapped.descriptor.state_dict(), config=to_dict(self.cfg), step=self.step,
                            extra=extra)
        self.acc.wait_for_everyone()

    def save_descriptor(self) -> None:
        """descriptor.pt: the finished descriptor's fp16 weights (main process)."""
        if self.main:
            unwrapped = self.acc.unwrap_model(self.model)
            save_checkpoint(self.out / "descriptor.pt", kind=KIND, model_args=asdict(self.cfg.model_config()),
                            model_state=state_dict_to(unwrapped.descriptor.state_dict(), torch.float16),
                            config=to_dict(self.cfg), step=self.step,
                            extra={"manifest_hash": self.cache.manifest_hash, "n_photos": len(self.cache.ids),
                                   "final": self.last})


def _loop(run: _Run, stop: int, bar) -> None:
    """Steps up to `stop`: look-alikes re-mined when due, metrics every log_every steps, checkpoints."""
    cfg = run.cfg
    window, since = torch.zeros(3), time.perf_counter()  # loss sum, accuracy sum, steps
    while run.step < stop:
        run.mine_if_due()
        for x in run.batches(stop):
            loss, accuracy, temperature = run.optimise(x)
            window += torch.tensor([loss.item(), accuracy.item(), 1.0])
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == stop:
                run.log(window, since, temperature, bar)
                window.zero_()
                since = time.perf_counter()
            if run.step % cfg.checkpoint_every == 0 and run.step < stop:
                run.save()


def train(cfg: TrainDescriptorConfig) -> dict[str, Any]:
    """Train a descriptor as `cfg` says (see the module docstring); returns a summary dict."""
    from tqdm import tqdm

    _check_config(cfg)
    training.set_torch_threads(cfg.threads)
    acc = training.start_accelerator()
    out = Path(cfg.output_dir)
    ckpt = _resume_state(cfg, out)
    cache, report = prepare_data(cfg, acc, out)
    _check_photos(ckpt, cache, out)
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
        if len(report):
            report.write_csv(out / "skipped.csv")
    run = _start(cfg, acc, cache, ckpt)
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    acc.print(f"training on {len(cache.ids)} photos ({len(report)} skipped), {acc.num_processes} process(es), "
              f"{2 * min(cfg.batch_size, len(cache.ids))} views per step and process, "
              f"steps {run.step} -> {stop} of {cfg.max_steps}")
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="descriptor", disable=not (run.main and cfg.progress),
               dynamic_ncols=True)
    t0, step0 = time.perf_counter(), run.step
    _loop(run, stop, bar)
    bar.close()
    run.save()
    if run.step >= cfg.max_steps:
        run.save_descriptor()
    acc.wait_for_everyone()
    return _summary(run, report, step0, time.perf_counter() - t0)


def _summary(run: _Run, report: data.SkipReport, step0: int, elapsed: float) -> dict[str, Any]:
    """Print the one summary line (main process) and return the summary dict."""
    step, last = run.step, run.last
    run.acc.print(f"descriptor: steps {step0} -> {step} of {run.cfg.max_steps} in {elapsed:.0f} s "
                  f"({(step - step0) / max(elapsed, 1e-9):.2f} steps/s incl. setup)"
                  + (f", loss {last['loss']:.4f}, top-1 view accuracy {last['accuracy']:.3f}" if last else "")
                  + f"; outputs in {run.out}" + (f"; {report.summary()}" if len(report) else ""))
    return {"step": step, "output_dir": str(run.out), "skipped": len(report), "last": last}
