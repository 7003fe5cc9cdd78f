"""Training pairs for the pair ViT: groups of look-alike photos, one shared edit chain, all ref x query pairs.

    photos = scan_photos(images, report, num_workers=2)            # usable photos + a cheap look-alike vector
    table = nearest_neighbours(photos.vectors, k=16)                # (N, k) hard-negative candidates
    groups = PairGroups(photos.paths, table, GroupSettings(group_size=4), seed=0)
    item = groups[i]              # refs (G,3,h,w), queries (G,3,h,w): query j was derived from photo j
    ref_idx, query_idx, labels = pair_indices(n_groups=8, group_size=4)   # G positives + G(G-1) negatives/group

A group is a photo and G-1 of its nearest neighbours (under the stage-1 descriptor when one is given, else a
colour/layout thumbnail), each neighbour replaced by a random photo with probability `random_fraction`. One
edit chain is sampled per group and applied to every member, so positives and negatives never differ by edit
type; donor photos for paste/collage edits come from outside the group. The references are clean views.

Item `i` depends only on (seed, i): any number of DataLoader workers or processes, and a resumed run, see
exactly the same groups. The curriculum (edit intensity, optional progressive resolution) is a function of
the training step `i // groups_per_step`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pair_vit import data
from pair_vit.pair.inputs import DEFAULT_MEAN, DEFAULT_STD, preprocess
from pair_vit.training import nearest_neighbours

log = logging.getLogger(__name__)

THUMB = 8  # side of the colour/layout thumbnail used as the cheap look-alike vector
SCAN_SIDE = 64  # images are decoded at most this big to compute it


@dataclass
class GroupSettings:
    """How groups are drawn and edited. Intensities are in [0, 1] (see `pair_vit.edits`)."""

    group_size: int = 4
    random_fraction: float = 0.25  # chance that a member is a random photo instead of a neighbour
    n_edits: tuple[int, int] = (1, 3)
    families: Sequence[str] | None = None
    family_weights: dict[str, float] | None = None  # family -> relative draw weight (1 where absent; None: uniform)
    n_donors: int = 3
    load_side: int = 256  # photos are decoded with their longest side at most this (before editing)
    half_height: int = 112  # each half of the pair image is half_height x half_height at full resolution
    intensity_start: float = 0.1  # curriculum: intensity ceiling at step 0 (and the lowest intensity drawn)
    intensity_end: float = 1.0  # ceiling once the ramp is over
    ramp_steps: int = 1000  # steps over which the ceiling rises (and the resolution grows)
    progressive_min_height: int = 0  # > 0: half height grows from this to half_height over ramp_steps
    size_multiple: int = 16  # progressive heights are multiples of this (the patch size)
    groups_per_step: int = 8  # groups in one training step, over all processes
    fixed_intensity: tuple[float, float] | None = None  # evaluation: draw from this range, no curriculum
    fine_scale: int = 0  # > 0: queries also at fine_scale x the half size (a localizing model finds boxes there)
    mean: Sequence[float] = field(default_factory=lambda: list(DEFAULT_MEAN))
    std: Sequence[float] = field(default_factory=lambda: list(DEFAULT_STD))

    def intensity_range(self, step: int) -> tuple[float, float]:
        """(lowest, highest) intensity of the groups of training step `step`."""
        if self.fixed_intensity is not None:
            return self.fixed_intensity
        frac = min(1.0, step / max(1, self.ramp_steps))
        ceiling = self.intensity_start + (self.intensity_end - self.intensity_start) * frac
        return self.intensity_start, ceiling

    def half_size(self, step: int) -> tuple[int, int]:
        """(h, w) of each half at training step `step` (progressive resolution, else constant)."""
        if self.progressive_min_height <= 0 or self.fixed_intensity is not None:
            return self.half_height, self.half_height
        frac = min(1.0, step / max(1, self.ramp_steps))
        h = self.progressive_min_height + (self.half_height - self.progressive_min_height) * frac
        h = int(h // self.size_multiple * self.size_multiple)
        h = min(self.half_height, max(self.size_multiple, h))
        return h, h


# ----------------------------------------------------------------------------- photos and neighbours


@dataclass
class Photos:
    """Usable photos: ids (N,), paths (N,), vectors (N, D) float32 L2-normalised look-alike embeddings."""

    ids: list[str]
    paths: list[Path]
    vectors: np.ndarray


def manifest_hash(images: dict[str, Path]) -> str:
    """Short hash of the (id, file size) list: changes when photos are added, removed or replaced."""
    h = hashlib.sha256()
    for image_id, path in sorted(images.items()):
        size = path.stat().st_size if path.exists() else -1
        h.update(f"{image_id}\t{size}\n".encode())
    return h.hexdigest()[:16]


def thumbnail_vector(image) -> np.ndarray:
    """A PIL image -> (THUMB*THUMB*3,) float32 colour/layout vector (the image squashed to THUMB x THUMB)."""
    from PIL import Image

    small = image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


class _ScanDataset(torch.utils.data.Dataset):
    """index -> (index, thumbnail vector or None, skip reason or None)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = data.load_image(self.paths[i], max_side=SCAN_SIDE)
        except data.ImageLoadError as err:
            return i, None, err.reason
        return i, thumbnail_vector(image), None


def _as_list(batch: list) -> list:
    return batch


def scan_photos(images: dict[str, Path], report: data.SkipReport, num_workers: int = 0,
                progress: bool = False, normalise: bool = True) -> Photos:
    """Decode every photo once (small): unusable ones go to `report`; usable ones get a thumbnail vector.

    With `normalise` the vectors go through `centre_normalise` (else raw, to be normalised with other shares).
    """
    from tqdm import tqdm

    ids, paths = list(images), list(images.values())
    loader = torch.utils.data.DataLoader(_ScanDataset(paths), batch_size=32, num_workers=num_workers,
                                         collate_fn=_as_list)
    keep, vectors = [], []
    for batch in tqdm(loader, desc="scan photos", disable=not progress, leave=False):
        for i, vec, reason in batch:
            if vec is None:
                report.add(paths[i], reason)
                log.warning("skipping image %s: %s", paths[i], reason)
            else:
                keep.append(i)
                vectors.append(vec)
    vecs = np.stack(vectors) if vectors else np.zeros((0, THUMB * THUMB * 3), np.float32)
    return Photos([ids[i] for i in keep], [paths[i] for i in keep], centre_normalise(vecs) if normalise else vecs)


def centre_normalise(vectors: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32: minus the mean vector, L2-normalised, so cosine compares colour and layout."""
    if not len(vectors):
        return vectors.astype(np.float32)
    v = vectors - vectors.mean(0, keepdims=True)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def check_enough(n_usable: int, group_size: int, where: str) -> None:
    """Raise a clear error when there are too few usable photos to form one group."""
    needed = max(2, group_size)
    if n_usable < needed:
        raise ValueError(f"{where}: {n_usable} usable photo(s), need at least {needed} "
                         f"(group size {group_size}); add photos or lower --group-size")


def find_photos(images: dict[str, Path], report: data.SkipReport, gather=None, descriptor_checkpoint: str = "",
                num_workers: int = 0, amp: bool = True, device: str | torch.device = "cpu",
                progress: bool = False) -> Photos:
    """Usable photos of `images` with look-alike vectors: stage-1 descriptors if a checkpoint is given, else
    `centre_normalise`d thumbnails. Unusable photos go to `report`. Several processes: each passes its share of
    the photos and `gather` (list -> concatenated lists of all processes); all get the same result.
    """
    if descriptor_checkpoint:
        from pair_vit.descriptor.model import load_descriptor
        from pair_vit.descriptor.views import embed_folder

        model = load_descriptor(descriptor_checkpoint)[0].to(device).eval()
        ids, vectors, _ = embed_folder(model, images, 64, amp, "full", report, num_workers)
        part = Photos(ids, [images[i] for i in ids], vectors)
    else:
        part = scan_photos(images, report, num_workers, progress, normalise=False)
    parts = gather([(part.ids, part.paths, part.vectors, report.entries)]) if gather else \
        [(part.ids, part.paths, part.vectors, report.entries)]
    report.entries = list(dict.fromkeys(e for p in parts for e in p[3]))
    vectors = np.concatenate([p[2] for p in parts])
    vectors = vectors if descriptor_checkpoint else centre_normalise(vectors)
    return Photos([i for p in parts for i in p[0]], [x for p in parts for x in p[1]], vectors)


def heldout_of(image_id: str, seed: int = 0, fraction: float = 0.05) -> bool:
    """True for about `fraction` of ids (by a hash of id and seed): the held-out part of the training photos."""
    digest = hashlib.sha256(f"heldout\0{seed}\0{image_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_heldout(photos: Photos, seed: int = 0, fraction: float = 0.05) -> tuple[Photos, Photos]:
    """(training photos, held-out photos): `heldout_of` each id."""
    held = np.array([heldout_of(i, seed, fraction) for i in photos.ids], bool)
    return _subset(photos, ~held), _subset(photos, held)


def _subset(photos: Photos, mask: np.ndarray) -> Photos:
    return Photos([i for i, m in zip(photos.ids, mask) if m], [p for p, m in zip(photos.paths, mask) if m],
                  photos.vectors[mask] if len(photos.vectors) else photos.vectors)


# ----------------------------------------------------------------------------- groups


class PairGroups(torch.utils.data.Dataset):
    """Group `i` -> dict(refs (G,3,h,w), queries (G,3,h,w), ids [G], donor_ids, edits [names], intensity,
    step, skipped).

    refs[j] is the clean photo j; queries[j] is photo j after the group's edit chain. `skipped` lists
    (path, reason) of photos that failed to decode here; each was replaced by another random photo.
    Indices are unbounded (no __len__): use a sampler such as `StepSampler`.
    """

    def __init__(self, paths: Sequence[Path], neighbours: np.ndarray, settings: GroupSettings, seed: int = 0):
        check_enough(len(paths), settings.group_size, "training photos")
        self.paths, self.neighbours, self.s, self.seed = list(paths), neighbours, settings, seed
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        """The anchors of epoch `epoch`: a permutation of all photos (cached: one epoch at a time)."""
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.paths)))
        return self._epoch_order[1]

    def members(self, rng: np.random.Generator, index: int) -> list[int]:
        """Photo indices of group `index`: the anchor, then neighbours (or random photos), all distinct."""
        n, g = len(self.paths), self.s.group_size
        anchor = int(self._order(index // n)[index % n])
        pool = [int(j) for j in rng.permutation(self.neighbours[anchor])] if self.neighbours.size else []
        chosen = [anchor]
        while len(chosen) < g:
            use_random = not pool or rng.random() < self.s.random_fraction
            j = int(rng.integers(n)) if use_random else pool.pop(0)
            if j not in chosen:
                chosen.append(j)
        return chosen

    def _load(self, rng: np.random.Generator, i: int, taken: set[int], skipped: list, side: int):
        """Decode photo i; on failure record it and try random photos not in `taken`. Returns (index, image)."""
        for _ in range(100):
            try:
                return i, data.load_image(self.paths[i], max_side=side)
            except data.ImageLoadError as err:
                skipped.append((str(err.path), err.reason))
                taken.add(i)
                if len(taken) >= len(self.paths):
                    break
                while i in taken:
                    i = int(rng.integers(len(self.paths)))
        raise ValueError("too many training photos fail to decode: see the skipped-images report")

    def _donors(self, rng: np.random.Generator, members: list[int], skipped: list) -> tuple[list[str], list]:
        """Up to n_donors decoded photos from outside the group -> (ids, images)."""
        candidates = rng.permutation(len(self.paths))[: self.s.n_donors + len(members)]
        ids, images = [], []
        for j in [int(j) for j in candidates if int(j) not in members][: self.s.n_donors]:
            try:
                images.append(data.load_image(self.paths[j], max_side=self.s.load_side))
                ids.append(self.paths[j].stem)
            except data.ImageLoadError as err:
                skipped.append((str(err.path), err.reason))
        return ids, images

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 2, index])
        step = index // max(1, self.s.groups_per_step)
        skipped: list = []
        chosen = self.members(rng, index)
        members, images = [], []
        for i in chosen:
            i, image = self._load(rng, i, set(chosen) | set(members), skipped, self.s.load_side)
            members.append(i)
            images.append(image)
        lo, hi = self.s.intensity_range(step)
        intensity = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
        chain, edited, donor_ids = self._edit(rng, images, members, intensity, skipped)
        size = self.s.half_size(step)
        refs = _stack([preprocess(im, size, self.s.mean, self.s.std) for im in images])
        queries = _stack([preprocess(im, size, self.s.mean, self.s.std) for im in edited])
        fine = None
        if self.s.fine_scale:  # the same edited images, read larger: what localization crops from
            fine_size = (size[0] * self.s.fine_scale, size[1] * self.s.fine_scale)
            fine = _stack([preprocess(im, fine_size, self.s.mean, self.s.std) for im in edited])
        return {"refs": refs, "queries": queries, "queries_fine": fine, "ids": [self.paths[i].stem for i in members],
                "donor_ids": donor_ids, "edits": [e.name for e in chain], "intensity": intensity, "step": step,
                "skipped": skipped}

    def _edit(self, rng: np.random.Generator, images: list, members: list[int], intensity: float, skipped: list):
        """Sample one chain and apply it to every image -> (chain, edited images, donor ids).

        Donors are decoded only when an edit uses them. An edit that breaks on an odd photo must not stop a
        long run: the whole group then gets a new chain (3 tries, then no donor families).
        """
        from pair_vit.edits import DONOR_FAMILIES, apply_chain, sample_chain

        for attempt in range(4):
            n_donors = self.s.n_donors if attempt < 3 else 0
            chain = sample_chain(rng, intensity, self.s.n_edits, self.s.families, n_donors=n_donors,
                                 weights=self.s.family_weights)
            donor_ids, donors = [], []
            if any(e.name in DONOR_FAMILIES for e in chain):
                donor_ids, donors = self._donors(rng, members, skipped)
                if not donors:  # every candidate failed to decode
                    continue
            try:
                return chain, [apply_chain(im, chain, donors) for im in images], donor_ids
            except Exception as err:  # noqa: BLE001 - any library error inside an edit
                log.warning("edit chain %s failed (%s: %s); sampling another", [e.name for e in chain],
                            type(err).__name__, err)
        raise RuntimeError("could not apply any edit chain to a group of training photos")


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def collate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups -> refs (n*G,3,h,w), queries (n*G,3,h,w), queries_fine (n*G,3,sh,sw) or None, and per-group lists
    (ids, donor_ids, edits, ...)."""
    fine = [it.get("queries_fine") for it in items]
    return {"refs": torch.cat([it["refs"] for it in items]), "queries": torch.cat([it["queries"] for it in items]),
            "queries_fine": None if any(f is None for f in fine) else torch.cat(fine),
            "n_groups": len(items), "group_size": len(items[0]["ids"]),
            "ids": [it["ids"] for it in items], "donor_ids": [it["donor_ids"] for it in items],
            "edits": [it["edits"] for it in items],
            "intensity": [it["intensity"] for it in items], "step": items[0]["step"],
            "skipped": [s for it in items for s in it["skipped"]]}


def pair_indices(n_groups: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (reference, query) combination inside each group -> ref_idx, query_idx (P,) int64, labels (P,) float.

    P = n_groups * G * G; indices point into the collated refs/queries; label 1 iff the query was derived from
    the reference (G positives and G*(G-1) negatives per group).
    """
    g = group_size
    r, q = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    offsets = (torch.arange(n_groups) * g).view(-1, 1)
    ref_idx = (offsets + r.reshape(1, -1)).reshape(-1)
    query_idx = (offsets + q.reshape(1, -1)).reshape(-1)
    return ref_idx, query_idx, (ref_idx == query_idx).float()


# ----------------------------------------------------------------------------- sharding


class StepSampler(torch.utils.data.Sampler):
    """Group indices for steps [start_step, end_step) of process `rank` out of `world`.

    Step s uses global group indices s*per_step .. (s+1)*per_step - 1 (per_step = groups over all processes);
    process `rank` takes its contiguous slice of `per_step // world` of them, so processes never share a group.
    """

    def __init__(self, start_step: int, end_step: int, per_step: int, rank: int = 0, world: int = 1):
        if per_step % world:
            raise ValueError(f"{per_step} groups per step cannot be split evenly over {world} processes")
        self.start, self.end, self.per_step, self.rank, self.world = start_step, end_step, per_step, rank, world

    def __len__(self) -> int:
        return max(0, self.end - self.start) * (self.per_step // self.world)

    def __iter__(self) -> Iterator[int]:
        mine = self.per_step // self.world
        for step in range(self.start, self.end):
            first = step * self.per_step + self.rank * mine
            yield from range(first, first + mine)


def worker_init(worker_id: int) -> None:
    """Seed library RNGs in a DataLoader worker from torch's per-worker seed (itself from the loader's generator)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- evaluation


def fixed_groups(photos: Photos, settings: GroupSettings, neighbours: int, seed: int, indices: Sequence[int],
                 num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Groups `indices` of `photos` built once (e.g. held-out evaluation) -> refs (n*G,3,h,w), queries, n,
    queries_fine (None unless settings.fine_scale)."""
    groups = PairGroups(photos.paths, nearest_neighbours(photos.vectors, neighbours), settings, seed)
    loader = torch.utils.data.DataLoader(groups, sampler=list(indices), batch_size=max(1, len(indices)),
                                         num_workers=num_workers, collate_fn=collate_groups)
    batch = next(iter(loader))
    return batch["refs"], batch["queries"], batch["n_groups"], batch["queries_fine"]
