"""Training data of the stage-1 descriptor (`pair_vit.descriptor.train`): the edited-view cache, the batch
of every step, and the look-alike tables hard negatives are drawn from.

    cache, report = prepare_data(cfg, acc, out)          # the training photos' cache, built if missing:
    folder = build_cache(items, cfg, root, progress)     #   once per photo set and settings, reused afterwards
    cache = open_cache(folder)                           #   memory-mapped clean photos and edited views
    table = training.nearest_neighbours(thumbnail_vectors(cache), cfg.neighbours)  # look-alikes, later `mine_neighbours`
    batches = StepBatches(cache, table, cfg, first, stop, rank)   # item j: the (2B, 3, S, S) views of step first+j

The batch of a step is a function of (seed, step, process rank) and of the look-alike table only.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pair_vit import data, training
from pair_vit.descriptor.config import TrainDescriptorConfig
from pair_vit.descriptor.model import Descriptor, normalize_uint8, to_uint8_square

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CLEAN_SCALE = 1.25  # clean photos are cached at this many times image_size, so crops keep full resolution


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


def cache_key(items: list[tuple[str, Path]], cfg: TrainDescriptorConfig) -> str:
    h = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in ("image_size", "views_per_photo", "edit_side", "n_edits_max",
                                             "intensity_end", "seed")}
    if cfg.edit_weights:  # only when set, so caches made before the setting existed keep their keys
        settings["edit_weights"] = sorted(cfg.edit_weights)
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
    weights = edits.parse_weights(cfg.edit_weights)
    for j in range(k):
        for attempt in range(3):
            chain = edits.sample_chain(np.random.default_rng([cfg.seed, i, j, attempt]), float(intensity[j]),
                                       (1, cfg.n_edits_max), n_donors=len(donors), weights=weights)
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

    folder = root / cache_key(items, cfg)
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


# ----------------------------------------------------------------------------- training photos


def training_images(cfg: TrainDescriptorConfig) -> tuple[Path, list[tuple[str, Path]]]:
    """(folder, [(id, path)]) of the configured side of the train/dev split."""
    import pair_vit

    folder = Path(cfg.train_dir) if cfg.train_dir else Path(str(pair_vit.demo_dir()))
    images = data.list_images(folder)
    chosen = data.split_images(images, cfg.split, seed=cfg.split_seed, dev_fraction=cfg.dev_fraction)
    if len(chosen) < 2:
        raise ValueError(f"need at least 2 training images, found {len(chosen)} in split {cfg.split!r} of "
                         f"{folder} ({len(images)} images in the folder)")
    return folder, list(chosen.items())


def prepare_data(cfg: TrainDescriptorConfig, acc, out: Path) -> tuple[ViewCache, data.SkipReport]:
    """The view cache of the training photos (built by the main process if missing) and its skipped photos."""
    folder, items = training_images(cfg)
    root = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    error = None
    if acc.is_main_process:  # one process builds the cache, the others wait for it
        try:
            build_cache(items, cfg, root, cfg.progress)
        except (OSError, ValueError) as err:
            error = str(err)
    error = training.broadcast(acc, error)
    if error:
        raise ValueError(error)
    cache = open_cache(root / cache_key(items, cfg))
    report = data.SkipReport()
    for path, reason in cache.skipped:
        report.add(path, reason)
    if len(cache.ids) < 2:
        raise ValueError(f"need at least 2 usable training images, found {len(cache.ids)} of {len(items)} in "
                         f"split {cfg.split!r} of {folder}; {report.summary()}")
    return cache, report


# ----------------------------------------------------------------------------- batches


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


def _step_rng(cfg: TrainDescriptorConfig, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 777, step, rank])


def step_photos(n: int, table: np.ndarray, cfg: TrainDescriptorConfig, step: int, rank: int) -> list[int]:
    """The photo rows of the batch `StepBatches` makes for (step, rank), in batch order."""
    return pick_photos(_step_rng(cfg, step, rank), n, cfg.batch_size, table, cfg)


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

    @functools.cached_property
    def _edit_weights(self) -> dict[str, float]:
        from pair_vit import edits  # heavy (AugLy/albumentations): only the on-the-fly path needs it

        return edits.parse_weights(self.cfg.edit_weights)

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
        rng = _step_rng(cfg, step, self.rank)
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
                                        n_edits=(1, self.cfg.n_edits_max),
                                        weights=self._edit_weights)
        except Exception:
            query = image
        return to_uint8_square(query, self.cfg.image_size)


# ----------------------------------------------------------------------------- mining look-alikes with the model


def mine_neighbours(descriptor: Descriptor, cache: ViewCache, cfg: TrainDescriptorConfig) -> np.ndarray:
    """Look-alike table from the model's own descriptors of the clean photos (eval mode, bf16 if amp)."""
    from pair_vit.descriptor.model import embed

    chunks = []
    for start in range(0, len(cache.ids), 256):
        rows = range(start, min(start + 256, len(cache.ids)))
        clean = torch.from_numpy(np.stack([cache.clean[i] for i in rows])).permute(0, 3, 1, 2).float()
        x = F.interpolate(clean, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        chunks.append(embed(descriptor, normalize_uint8(x.clamp_(0, 255)), batch_size=64, amp=cfg.amp))
    return training.nearest_neighbours(np.concatenate(chunks), cfg.neighbours)
