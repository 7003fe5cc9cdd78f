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
edits on the fly instead (use `--num-workers 1` then).

Hard negatives: part of every batch (`hard_fraction`) is made of groups of `group_size` look-alike photos,
nearest neighbours under a colour/layout thumbnail at first and under the model's own descriptors,
re-mined every `mine_every` steps.

Measured (2-core AVX512-BF16 CPU, resnet10t at 160 px, batch 64 photos = 128 views, bf16): ~0.94 steps/s
(120 views/s) when the CPU is otherwise idle; the cache of 3,009 photos x 8 views took ~2 min with 2 workers;
re-mining look-alikes takes ~10 s. Another busy process on the same 2 cores cuts 2-thread training by
3-15x (OpenMP threads wait on each other), while `--threads 1` keeps ~70 views/s: use it on a shared CPU.
A 300-step trial (about 5 minutes) lifted uAP on a 300/300 dev benchmark from 0.09 (random weights) to 0.26.

Every batch is a function of (seed, step, process rank) and of the saved neighbour table, so `--resume`
continues a run exactly (same max_steps) from `checkpoint.pt`; `--stop-at` ends a run early without
changing its schedule (split a long run across sessions). Outputs in OUTPUT_DIR: config.yaml,
checkpoint.pt (full training state), descriptor.pt (fp16 weights, kind "descriptor"), metrics.csv,
skipped.csv (unreadable photos, if any).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pair_vit import data
from pair_vit.checkpoint import compare_configs, load_checkpoint, save_checkpoint, state_dict_to
from pair_vit.config import opt, save_config
from pair_vit.descriptor import KIND, Descriptor, DescriptorModelConfig, normalize_uint8, to_uint8_square

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CLEAN_SCALE = 1.25  # clean photos are cached at this many times image_size, so crops keep full resolution
MODEL_KEYS = ("backbone", "embed_dim", "image_size", "gem_p", "pretrained")
DATA_KEYS = ("train_dir", "split", "split_seed", "dev_fraction", "seed", "views_per_photo", "edit_side",
             "n_edits_max", "intensity_start", "intensity_end", "ramp_fraction", "hard_fraction", "group_size",
             "neighbours", "mine_every", "jitter")
LOSS_KEYS = ("batch_size", "temperature", "learn_temperature")
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
    amp: bool = opt(True, "bf16 autocast (--no-amp: float32)")
    # data
    views_per_photo: int = opt(12, "edited views cached per photo (0: edit on the fly every step, slower)")
    edit_side: int = opt(0, "longest side photos are decoded at before editing (0: 2 x image_size)")
    n_edits_max: int = opt(3, "each edited view gets a chain of 1..n_edits_max edits")
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


# ----------------------------------------------------------------------------- edited-view cache


@dataclass
class ViewCache:
    """Cached training data: clean photos (N, C, C, 3) and edited views (N, K, S, S, 3), uint8, memory-mapped."""

    folder: Path
    ids: list[str]
    paths: list[Path]
    clean: np.ndarray
    views: np.ndarray | None
    intensity: np.ndarray | None  # (N, K)
    skipped: list[tuple[str, str]]
    manifest_hash: str


def _cache_key(items: list[tuple[str, Path]], cfg: TrainDescriptorConfig) -> str:
    h = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in ("image_size", "views_per_photo", "edit_side", "n_edits_max",
                                             "intensity_end", "seed")}
    h.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for image_id, path in items:
        st = path.stat()
        h.update(f"{image_id}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _edit_side(cfg: TrainDescriptorConfig) -> int:
    return cfg.edit_side or 2 * cfg.image_size


def _make_views(i: int, path: Path, donor_paths: list[Path], cfg: TrainDescriptorConfig):
    """Worker: one photo -> (i, clean (C,C,3), views (K,S,S,3), intensities (K,), skip reason, failed edits)."""
    from pair_vit import edits  # heavy (AugLy/albumentations): imported where it is used

    try:
        image = data.load_image(path, max_side=_edit_side(cfg))
    except data.ImageLoadError as err:
        return i, None, None, None, err.reason, []
    side, k = cfg.image_size, cfg.views_per_photo
    clean = to_uint8_square(image, round(side * CLEAN_SCALE))
    donors = [im for _, im in data.load_images(donor_paths, data.SkipReport(), max_side=_edit_side(cfg))]
    views = np.zeros((k, side, side, 3), np.uint8)
    rng = np.random.default_rng([cfg.seed, i])
    # Stratified intensities: view j lies in [j/K, (j+1)/K) * intensity_end, so every cap finds some view.
    intensity = ((np.arange(k) + rng.uniform(size=k)) / max(k, 1) * cfg.intensity_end).astype(np.float32)
    failures: list[str] = []
    for j in range(k):
        for attempt in range(3):
            chain = edits.sample_chain(np.random.default_rng([cfg.seed, i, j, attempt]), float(intensity[j]),
                                       (1, cfg.n_edits_max), n_donors=len(donors))
            try:
                views[j] = to_uint8_square(edits.apply_chain(image, chain, donors), side)
                break
            except Exception as err:  # an edit that breaks on an odd photo must not stop a long run
                names = "+".join(e.name for e in chain)
                failures.append(f"{path.name} [{names}]: {type(err).__name__}: {str(err)[:120]}")
        else:
            views[j], intensity[j] = to_uint8_square(image, side), 0.0
    return i, clean, views, intensity, None, failures


def _run_parallel(tasks, workers: int):
    if workers <= 1:
        yield from (_make_views(*t) for t in tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_star_make_views, tasks, chunksize=4)


def _star_make_views(task):
    return _make_views(*task)


def build_cache(items: list[tuple[str, Path]], cfg: TrainDescriptorConfig, root: Path, progress: bool) -> Path:
    """Generate the cache for `items` (id, path) under root/<key> unless it exists; returns its folder."""
    from tqdm import tqdm

    folder = root / _cache_key(items, cfg)
    if (folder / "meta.json").is_file():
        log.info("using cached views in %s", folder)
        return folder
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # leftover of a killed build
    partial.mkdir(parents=True)
    n, k, side = len(items), cfg.views_per_photo, cfg.image_size
    c = round(side * CLEAN_SCALE)
    clean = np.lib.format.open_memmap(partial / "clean.npy", "w+", np.uint8, (n, c, c, 3))
    views = np.lib.format.open_memmap(partial / "views.npy", "w+", np.uint8, (n, k, side, side, 3)) if k else None
    intensity = np.zeros((n, k), np.float32)
    rng = np.random.default_rng([cfg.seed, 12345])
    tasks = []
    for i, (_, path) in enumerate(items):
        others = [j for j in rng.choice(n, size=min(n, 3), replace=False) if j != i][:2] if k else []
        tasks.append((i, path, [items[j][1] for j in others], cfg))
    ok, skipped, failures = [], [], []
    bar = tqdm(_run_parallel(tasks, cfg.cache_workers), total=n, desc="caching views", disable=not progress)
    for i, clean_i, views_i, intensity_i, reason, fails in bar:
        if reason is not None:
            skipped.append((str(items[i][1]), reason))
            log.warning("skipping training image %s: %s", items[i][1], reason)
            continue
        clean[i] = clean_i
        if k:
            views[i], intensity[i] = views_i, intensity_i
        ok.append(i)
        failures += fails
    clean.flush()
    if views is not None:
        views.flush()
    del clean, views
    np.save(partial / "intensity.npy", intensity)
    if failures:
        log.warning("%d edit chains raised and were re-sampled (or replaced by the clean photo); first ones: %s",
                    len(failures), " | ".join(failures[:3]))
    meta = {"version": CACHE_VERSION, "rows": ok, "ids": [items[i][0] for i in ok],
            "paths": [str(items[i][1]) for i in ok], "sizes": [items[i][1].stat().st_size for i in ok],
            "skipped": skipped, "n_edit_failures": len(failures), "edit_failures": failures[:200],
            "views_per_photo": k, "image_size": side}
    (partial / "meta.json").write_text(json.dumps(meta))
    partial.rename(folder)
    return folder


def open_cache(folder: Path) -> ViewCache:
    meta = json.loads((folder / "meta.json").read_text())
    rows = np.asarray(meta["rows"], dtype=np.int64)
    clean = np.load(folder / "clean.npy", mmap_mode="r")
    views = np.load(folder / "views.npy", mmap_mode="r") if meta["views_per_photo"] else None
    intensity = np.load(folder / "intensity.npy")[rows] if meta["views_per_photo"] else None
    h = hashlib.sha256("".join(f"{i}\0{s}\n" for i, s in zip(meta["ids"], meta["sizes"])).encode()).hexdigest()
    # Rows of unreadable photos stay in the arrays as zeros; `rows` maps usable photo -> array row.
    return ViewCache(folder, meta["ids"], [Path(p) for p in meta["paths"]], _Rows(clean, rows),
                     _Rows(views, rows) if views is not None else None, intensity,
                     [tuple(s) for s in meta["skipped"]], h[:16])


class _Rows:
    """Index a memory-mapped array through a row map (usable photo index -> array row)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.array[(self.rows[idx[0]],) + idx[1:]]
        return self.array[self.rows[idx]]

    def __len__(self) -> int:
        return len(self.rows)


# ----------------------------------------------------------------------------- batches


def knn(vectors: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(N, k) indices of each row's nearest other rows by dot product (vectors unit-norm)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = len(x)
    k = max(1, min(k, n - 1))
    out = []
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -math.inf
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy().astype(np.int64)


def thumbnail_vectors(cache: ViewCache, side: int = 8) -> np.ndarray:
    """Cheap look-alike vectors: a side x side colour thumbnail of each clean photo, centred and unit-norm."""
    out = []
    for start in range(0, len(cache.ids), 256):
        batch = torch.from_numpy(np.stack([cache.clean[i] for i in range(start, min(start + 256, len(cache.ids)))]))
        thumbs = F.adaptive_avg_pool2d(batch.permute(0, 3, 1, 2).float(), side).flatten(1)
        out.append(thumbs - thumbs.mean(dim=1, keepdim=True))
    return F.normalize(torch.cat(out), dim=1).numpy()


def intensity_cap(cfg: TrainDescriptorConfig, step: int) -> float:
    ramp = max(1.0, cfg.ramp_fraction * cfg.max_steps)
    return cfg.intensity_start + (cfg.intensity_end - cfg.intensity_start) * min(1.0, step / ramp)


def pick_photos(rng: np.random.Generator, n: int, batch: int, table: np.ndarray,
                cfg: TrainDescriptorConfig) -> list[int]:
    """`batch` distinct photos: groups of look-alikes (anchor + its neighbours) first, then random ones."""
    batch = min(batch, n)
    chosen: dict[int, None] = {}
    n_groups = int(round(cfg.hard_fraction * batch / max(1, cfg.group_size))) if cfg.group_size > 1 else 0
    for _ in range(n_groups):
        if len(chosen) >= batch:
            break
        anchor = int(rng.integers(n))
        chosen.setdefault(anchor)
        for j in rng.permutation(table[anchor])[: cfg.group_size - 1]:
            if len(chosen) < batch:
                chosen.setdefault(int(j))
    rest = [i for i in rng.permutation(n)[: batch + len(chosen)] if i not in chosen]
    for i in rest[: batch - len(chosen)]:
        chosen.setdefault(int(i))
    return list(chosen)


def _random_crop(img: torch.Tensor, rng: np.random.Generator, keep: float, out: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, out, out) float in [0, 255]: a random crop keeping >= `keep` of each side."""
    _, h, w = img.shape
    ch, cw = (max(1, round(s * rng.uniform(keep, 1.0))) for s in (h, w))
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = img[:, top:top + ch, left:left + cw].float()[None]
    return F.interpolate(crop, size=(out, out), mode="bilinear", antialias=True, align_corners=False)[0]


class StepBatches(torch.utils.data.Dataset):
    """Item j = the batch of step `first + j`: (2B, 3, S, S) normalised views, clean ones first."""

    def __init__(self, cache: ViewCache, table: np.ndarray, cfg: TrainDescriptorConfig, first: int, stop: int,
                 rank: int):
        self.cache, self.table, self.cfg, self.first, self.stop, self.rank = cache, table, cfg, first, stop, rank

    def __len__(self) -> int:
        return max(0, self.stop - self.first)

    def __getitem__(self, j: int) -> torch.Tensor:
        # Many tiny per-image ops: extra threads only add synchronisation, and on a busy CPU they stall
        # (measured: 0.13 s per 64-photo batch on 1 thread, 0.3-2 s on 2 threads while another job runs).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._batch(self.first + j)
        finally:
            torch.set_num_threads(threads)

    def _batch(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 777, step, self.rank])
        photos = pick_photos(rng, len(self.cache.ids), cfg.batch_size, self.table, cfg)
        cap = intensity_cap(cfg, step)
        side, keep = cfg.image_size, 1.0 - cfg.jitter
        clean, edited = [], []
        for b, i in enumerate(photos):
            photo = torch.from_numpy(np.array(self.cache.clean[i])).permute(2, 0, 1)
            clean.append(_random_crop(photo, rng, keep, side))
            view = self._edited(i, photos[(b + 1) % len(photos)], cap, rng, step)
            edited.append(_random_crop(torch.from_numpy(view).permute(2, 0, 1), rng, 1.0 - cfg.jitter / 2, side))
        x = torch.stack(clean + edited).clamp_(0, 255)
        return normalize_uint8(x).contiguous(memory_format=torch.channels_last)

    def _edited(self, i: int, donor: int, cap: float, rng: np.random.Generator, step: int) -> np.ndarray:
        if self.cache.views is not None:
            allowed = np.flatnonzero(self.cache.intensity[i] <= cap)
            j = int(rng.choice(allowed)) if len(allowed) else int(np.argmin(self.cache.intensity[i]))
            return np.array(self.cache.views[i, j])
        return self._edit_now(i, donor, cap, rng)

    def _edit_now(self, i: int, donor: int, cap: float, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        from pair_vit import edits

        try:
            image = data.load_image(self.cache.paths[i], max_side=_edit_side(self.cfg))
        except data.ImageLoadError:
            image = Image.fromarray(np.array(self.cache.clean[i]))
        donors = [Image.fromarray(np.array(self.cache.clean[donor]))] if donor != i else []
        try:
            query, _ = edits.make_query(image, rng, intensity=float(rng.uniform(0, cap)), donors=donors,
                                        n_edits=(1, self.cfg.n_edits_max))
        except Exception:
            query = image
        return to_uint8_square(query, self.cfg.image_size)


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


def info_nce(z: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over (2B, D) unit vectors whose rows i and i+B are positives; (loss, top-1 accuracy)."""
    n = z.shape[0] // 2
    sim = (z.float() @ z.float().T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    accuracy = (sim.argmax(dim=1) == target).float().mean()
    return loss, accuracy


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainDescriptorConfig, step: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.01 at max_steps (`step` = steps already done)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

def mine_neighbours(descriptor: Descriptor, cache: ViewCache, cfg: TrainDescriptorConfig) -> np.ndarray:
    """Look-alike table from the model's own descriptors of the clean photos (eval mode, bf16 if amp)."""
    from pair_vit.descriptor import embed

    chunks = []
    for start in range(0, len(cache.ids), 256):
        rows = range(start, min(start + 256, len(cache.ids)))
        clean = torch.from_numpy(np.stack([cache.clean[i] for i in rows])).permute(0, 3, 1, 2).float()
        x = F.interpolate(clean, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        chunks.append(embed(descriptor, normalize_uint8(x.clamp_(0, 255)), batch_size=64, amp=cfg.amp))
    return knn(np.concatenate(chunks), cfg.neighbours)


# ----------------------------------------------------------------------------- the training loop


def _training_images(cfg: TrainDescriptorConfig) -> tuple[Path, list[tuple[str, Path]]]:
    import pair_vit

    folder = Path(cfg.train_dir) if cfg.train_dir else Path(str(pair_vit.demo_dir()))
    images = data.list_images(folder)
    chosen = data.split_images(images, cfg.split, seed=cfg.split_seed, dev_fraction=cfg.dev_fraction)
    if len(chosen) < 2:
        raise ValueError(f"need at least 2 training images, found {len(chosen)} in split {cfg.split!r} of "
                         f"{folder} ({len(images)} images in the folder)")
    return folder, list(chosen.items())


def _check_config(cfg: TrainDescriptorConfig) -> None:
    cfg.model_config()  # validates the model fields
    problems = [msg for bad, msg in [
        (cfg.max_steps < 1, "max_steps must be >= 1"), (cfg.stop_at < 0, "stop_at must be >= 0"),
        (cfg.batch_size < 2, "batch_size must be >= 2 (negatives come from the batch)"),
        (cfg.temperature <= 0, "temperature must be > 0"), (cfg.views_per_photo < 0, "views_per_photo must be >= 0"),
        (not 0 <= cfg.intensity_start <= cfg.intensity_end <= 1, "need 0 <= intensity_start <= intensity_end <= 1"),
        (not 0 <= cfg.hard_fraction <= 1, "hard_fraction must be in [0, 1]"),
        (cfg.group_size < 1, "group_size must be >= 1"), (not 0 <= cfg.jitter < 0.9, "jitter must be in [0, 0.9)"),
        (cfg.checkpoint_every < 1, "checkpoint_every must be >= 1"),
        (cfg.log_every < 1, "log_every must be >= 1"), (cfg.neighbours < 1, "neighbours must be >= 1")] if bad]
    if problems:
        raise ValueError("; ".join(problems))


def _resume_state(cfg: TrainDescriptorConfig, out: Path) -> dict | None:
    path = out / "checkpoint.pt"
    if not cfg.resume:
        if path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{path} exists: pass --resume to continue that run or --overwrite to start afresh")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} not found")
    ckpt = load_checkpoint(path, kind=KIND)
    diffs = compare_configs(ckpt["config"], asdict(cfg), RESUME_KEYS)
    if diffs:
        raise ValueError(f"cannot resume from {path}: settings differ from the saved run: {'; '.join(diffs)}. "
                         f"Use the saved values, or start a new run with another --output-dir")
    return ckpt


def _broadcast(acc, value: Any) -> Any:
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _prepare_data(cfg: TrainDescriptorConfig, acc, out: Path) -> tuple[ViewCache, data.SkipReport]:
    folder, items = _training_images(cfg)
    root = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    error = None
    if acc.is_main_process:  # one process builds the cache, the others wait for it
        try:
            build_cache(items, cfg, root, cfg.progress)
        except (OSError, ValueError) as err:
            error = str(err)
    error = _broadcast(acc, error)
    if error:
        raise ValueError(error)
    cache = open_cache(root / _cache_key(items, cfg))
    report = data.SkipReport()
    for path, reason in cache.skipped:
        report.add(path, reason)
    if len(cache.ids) < 2:
        raise ValueError(f"need at least 2 usable training images, found {len(cache.ids)} of {len(items)} in "
                         f"split {cfg.split!r} of {folder}; {report.summary()}")
    return cache, report


def train(cfg: TrainDescriptorConfig) -> dict[str, Any]:
    """Train a descriptor as `cfg` says (see the module docstring); returns a summary dict."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from tqdm import tqdm

    from pair_vit.config import to_dict

    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))])
    main = acc.is_main_process
    if not main:
        logging.getLogger("pair_vit").setLevel(logging.ERROR)
    out = Path(cfg.output_dir)
    ckpt = _resume_state(cfg, out)
    cache, report = _prepare_data(cfg, acc, out)
    if ckpt is not None and ckpt["extra"].get("manifest_hash") != cache.manifest_hash:
        raise ValueError(f"cannot resume from {out / 'checkpoint.pt'}: the usable training photos differ from the "
                         f"saved run's (manifest {ckpt['extra'].get('manifest_hash')} vs {cache.manifest_hash})")
    if main:
        save_config(cfg, out / "config.yaml")
        if len(report):
            report.write_csv(out / "skipped.csv")

    torch.manual_seed(cfg.seed)
    module = TrainModule(Descriptor(cfg.model_config(), pretrained=cfg.pretrained), cfg.temperature,
                         cfg.learn_temperature)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr)
    # Not given to accelerator.prepare: its wrapper steps the schedule once per process per step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    step, mined_at = 0, -1
    if ckpt is not None:
        extra = ckpt["extra"]
        module.descriptor.load_state_dict(ckpt["model_state"])
        module.log_temperature.data.copy_(extra["log_temperature"])
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"]["torch"])
        table, mined_at, step = extra["neighbours"].numpy(), int(extra["mined_at"]), int(ckpt["step"])
        acc.print(f"resuming {out / 'checkpoint.pt'} at step {step}")
    else:
        table = knn(thumbnail_vectors(cache), cfg.neighbours)
    model, optimizer = acc.prepare(module, optimizer)
    n_photos, world = len(cache.ids), acc.num_processes
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    acc.print(f"training on {n_photos} photos ({len(report)} skipped), {world} process(es), "
              f"{2 * min(cfg.batch_size, n_photos)} views per step and process, "
              f"steps {step} -> {stop} of {cfg.max_steps}")

    def save() -> None:
        acc.wait_for_everyone()
        if main:
            unwrapped = acc.unwrap_model(model)
            extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": {"torch": torch.get_rng_state()}, "neighbours": torch.from_numpy(table),
                     "mined_at": mined_at, "manifest_hash": cache.manifest_hash, "cache_key": cache.folder.name,
                     "log_temperature": unwrapped.log_temperature.detach().clone(), "n_photos": n_photos}
            save_checkpoint(out / "checkpoint.pt", kind=KIND, model_args=asdict(cfg.model_config()),
                            model_state=unwrapped.descriptor.state_dict(), config=to_dict(cfg), step=step, extra=extra)
        acc.wait_for_everyone()

    bar = tqdm(total=cfg.max_steps, initial=step, desc="descriptor", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    log_file = _MetricsLog(out / "metrics.csv") if main else None
    t0, step0 = time.perf_counter(), step
    window = torch.zeros(3)  # loss sum, accuracy sum, steps
    t_window, last = time.perf_counter(), {}
    while step < stop:
        if cfg.mine_every and step > 0 and step % cfg.mine_every == 0 and mined_at != step:
            table = _broadcast(acc, mine_neighbours(acc.unwrap_model(model).descriptor, cache, cfg) if main else None)
            mined_at = step
        seg_end = min(stop, (step // cfg.mine_every + 1) * cfg.mine_every) if cfg.mine_every else stop
        loader = torch.utils.data.DataLoader(
            StepBatches(cache, table, cfg, step, seg_end, acc.process_index), batch_size=None, shuffle=False,
            num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None)
        for x in loader:
            model.train()
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                z, temperature = model(x.to(acc.device))
            loss, accuracy = info_nce(z, temperature)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            window += torch.tensor([loss.item(), accuracy.item(), 1.0])
            bar.update(1)
            if step % cfg.log_every == 0 or step == stop:
                mean = acc.reduce(window.clone(), reduction="mean")
                dt = time.perf_counter() - t_window
                last = {"step": step, "loss": round(float(mean[0] / mean[2]), 5),
                        "accuracy": round(float(mean[1] / mean[2]), 4),
                        "lr": round(scheduler.get_last_lr()[0], 7), "temperature": round(float(temperature), 4),
                        "intensity_cap": round(intensity_cap(cfg, step), 3),
                        "steps_per_s": round(float(window[2]) / dt, 3),
                        "images_per_s": round(float(window[2]) * 2 * min(cfg.batch_size, n_photos) * world / dt, 1)}
                if main:
                    log_file.write(last)
                    bar.set_postfix(loss=last["loss"], acc=last["accuracy"])
                    if not cfg.progress:
                        log.info("step %d/%d loss %.4f acc %.3f lr %.2e cap %.2f %.2f steps/s", step,
                                 cfg.max_steps, last["loss"], last["accuracy"], last["lr"], last["intensity_cap"],
                                 last["steps_per_s"])
                window.zero_()
                t_window = time.perf_counter()
            if step % cfg.checkpoint_every == 0 and step < stop:
                save()
    bar.close()
    save()
    if step >= cfg.max_steps and main:
        unwrapped = acc.unwrap_model(model)
        save_checkpoint(out / "descriptor.pt", kind=KIND, model_args=asdict(cfg.model_config()),
                        model_state=state_dict_to(unwrapped.descriptor.state_dict(), torch.float16),
                        config=to_dict(cfg), step=step,
                        extra={"manifest_hash": cache.manifest_hash, "n_photos": n_photos, "final": last})
    acc.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    done = step - step0
    acc.print(f"descriptor: steps {step0} -> {step} of {cfg.max_steps} in {elapsed:.0f} s "
              f"({done / max(elapsed, 1e-9):.2f} steps/s incl. setup)"
              + (f", loss {last['loss']:.4f}, top-1 view accuracy {last['accuracy']:.3f}" if last else "")
              + f"; outputs in {out}" + (f"; {report.summary()}" if len(report) else ""))
    return {"step": step, "output_dir": str(out), "skipped": len(report), "last": last}


class _MetricsLog:
    """Append-only CSV of the logged metrics (a resumed run appends to it)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
