"""Benchmark builder: turn a folder of photos into a DISC21-style copy-detection benchmark.

Output layout (what `pair_vit.data.DiscLayout.from_root` reads back):
    OUT/references/R000000.jpg ...   untouched copies of the reference photos
    OUT/queries/Q000000.jpg ...      edited photos: positives (derived from a reference) and distractors
                                     (derived from photos that are NOT references)
    OUT/ground_truth.csv             query_id,reference_id for the positive queries only
    OUT/edits.csv                    query_id,reference_id (empty for distractors),edits,intensity
    OUT/manifest.csv                 id,role,source: which photo each image came from
    OUT/config.yaml                  the resolved BenchmarkConfig

Only photos of one side of the fixed train/dev split (`pair_vit.data.split_of`) are used, so a benchmark
built with `split="dev"` never shares a photo with training that used `split="train"` and the same split seed.
Donor photos (the second photo of paste/collage edits) are never references, so a query has exactly one
true reference. The folder is written under a temporary name and renamed at the end: a killed build leaves
no half benchmark behind.
"""
from __future__ import annotations

import logging
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pair_vit import data, demo_dir
from pair_vit.config import opt, save_config

log = logging.getLogger(__name__)

N_DONORS_PER_QUERY = 3  # second photos offered to paste/collage edits
MAX_DONOR_POOL = 500  # donors are sampled from at most this many non-reference photos


@dataclass
class BenchmarkConfig:
    """Build a copy-detection benchmark (references, edited queries, ground truth) from a folder of photos."""

    images: str = opt("", "folder of source photos, nested or not (empty: the demo photos shipped in the package)")
    out: str = opt("benchmarks/dev", "output folder; refused if it exists unless --overwrite")
    seed: int = opt(0, "seed for picking photos and edits: same seed and photos give the same benchmark")
    split: str = opt("dev", "side of the fixed train/dev split to draw photos from", choices=("dev", "train", "all"))
    split_seed: int = opt(0, "seed of the train/dev split; must match the one training used")
    dev_fraction: float = opt(0.25, "fraction of photos in the dev side of the split")
    n_references: int = opt(500, "number of reference images")
    n_queries: int = opt(500, "number of query images (positives + distractors)")
    positive_fraction: float = opt(0.5, "fraction of queries derived from a reference; the rest are distractors")
    intensity_min: float = opt(0.2, "lowest edit intensity (0 = mild, 1 = hardest); sampled uniformly per query")
    intensity_max: float = opt(1.0, "highest edit intensity")
    max_edits: int = opt(3, "each query gets a chain of 1..max_edits edits")
    query_quality: int = opt(95, "JPEG quality the queries are saved with (the chain may add its own JPEG edit)")
    workers: int = opt(2, "processes used to synthesise queries")
    overwrite: bool = opt(False, "replace an existing output folder")


@dataclass
class Plan:
    """Which photo plays which role. Paths are source photos; query sources index `references` or `distractors`."""

    references: list[Path]
    positive_sources: list[Path]  # one per positive query, each a distinct reference
    distractor_sources: list[Path]  # photos outside the reference set
    donors: list[Path]  # non-reference photos for paste/collage edits


def source_images(cfg: BenchmarkConfig) -> dict[str, Path]:
    """Photos of the configured split, id -> path."""
    folder = Path(cfg.images) if cfg.images else Path(str(demo_dir()))
    images = data.list_images(folder)
    chosen = data.split_images(images, cfg.split, seed=cfg.split_seed, dev_fraction=cfg.dev_fraction)
    log.info("%d photos in %s, %d in split %r", len(images), folder, len(chosen), cfg.split)
    return chosen


def _usable(paths: list[Path], needed: int, report: data.SkipReport) -> list[Path]:
    """The first `needed` paths that load (bad ones go to the report); fewer if the pool runs out."""
    good: list[Path] = []
    for path in paths:
        if len(good) == needed:
            break
        try:
            data.load_image(path, max_side=64)
            good.append(path)
        except data.ImageLoadError as err:
            report.add(path, err.reason)
            log.warning("skipping %s", err)
    return good


def make_plan(images: dict[str, Path], cfg: BenchmarkConfig, report: data.SkipReport) -> Plan:
    """Assign roles to photos at random (seeded); raise if there are too few usable photos."""
    n_pos = int(round(cfg.n_queries * cfg.positive_fraction))
    n_neg = cfg.n_queries - n_pos
    if not 0 <= cfg.positive_fraction <= 1 or n_pos > cfg.n_references:
        raise ValueError(f"positive_fraction={cfg.positive_fraction} needs {n_pos} positive queries but "
                         f"there are only {cfg.n_references} references (each positive has its own reference)")
    rng = np.random.default_rng(cfg.seed)
    order = [images[i] for i in rng.permutation(sorted(images))]
    needed = cfg.n_references + n_neg + 1  # +1: at least one donor outside the references
    usable = _usable(order, needed, report)
    if len(usable) < needed:
        raise ValueError(f"need {needed} usable photos ({cfg.n_references} references + {n_neg} distractors + "
                         f"1 donor) in split {cfg.split!r} but found {len(usable)} of {len(images)}; "
                         f"lower --n-references/--n-queries or use --split all")
    references = usable[: cfg.n_references]
    rest = order[order.index(usable[-1]) + 1:]  # untested photos, only ever used as donors
    non_refs = usable[cfg.n_references:] + rest
    positives = [references[i] for i in rng.choice(len(references), n_pos, replace=False)]
    return Plan(references, positives, usable[cfg.n_references:cfg.n_references + n_neg],
                non_refs[:MAX_DONOR_POOL])


@dataclass
class QueryTask:
    index: int
    source: Path
    donors: list[Path]
    seed: tuple[int, int]
    intensity: float
    max_edits: int


def _synthesise(task: QueryTask):
    """Worker: load one source (and its donors), edit it. Returns (index, image, edit names) or (index, None, reason)."""
    from pair_vit import edits  # imported in the worker: AugLy/albumentations are heavy

    try:
        image = data.load_image(task.source)
    except data.ImageLoadError as err:
        return task.index, None, err.reason
    donors = [img for _, img in data.load_images(task.donors, data.SkipReport(), max_side=512)]
    rng = np.random.default_rng(list(task.seed))
    query, names = edits.make_query(image, rng, intensity=task.intensity, donors=donors,
                                    n_edits=(1, task.max_edits))
    return task.index, query, names


def make_tasks(plan: Plan, cfg: BenchmarkConfig) -> list[QueryTask]:
    """One task per query, each with its own seed so results do not depend on worker scheduling."""
    rng = np.random.default_rng([cfg.seed, 1])
    sources = plan.positive_sources + plan.distractor_sources
    tasks = []
    for i, src in enumerate(sources):
        pool = [d for d in rng.choice(len(plan.donors), min(len(plan.donors), N_DONORS_PER_QUERY + 1),
                                      replace=False)]
        donors = [plan.donors[j] for j in pool if plan.donors[j] != src][:N_DONORS_PER_QUERY]
        intensity = float(rng.uniform(cfg.intensity_min, cfg.intensity_max))
        tasks.append(QueryTask(i, src, donors, (cfg.seed, i), intensity, cfg.max_edits))
    return tasks


def _run_tasks(tasks: list[QueryTask], workers: int):
    if workers <= 1:
        yield from map(_synthesise, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(_synthesise, tasks, chunksize=4)


def _write_references(plan: Plan, tmp: Path) -> dict[Path, str]:
    """Copy reference photos byte for byte under DISC21-style ids; returns source -> reference id."""
    (tmp / "references").mkdir(parents=True)
    ref_ids = {}
    for i, src in enumerate(plan.references):
        ref_ids[src] = f"R{i:06d}"
        shutil.copyfile(src, tmp / "references" / f"R{i:06d}{src.suffix.lower()}")
    return ref_ids


def _write_queries(tasks, plan, ref_ids, cfg, tmp: Path, report: data.SkipReport) -> list[dict]:
    """Synthesise and save queries under shuffled ids so positives and distractors interleave."""
    from tqdm import tqdm

    (tmp / "queries").mkdir(parents=True)
    query_ids = np.random.default_rng([cfg.seed, 2]).permutation(len(tasks))
    n_pos = len(plan.positive_sources)
    rows = []
    for index, image, names in tqdm(_run_tasks(tasks, cfg.workers), total=len(tasks), desc="queries"):
        task = tasks[index]
        if image is None:
            report.add(task.source, names)
            continue
        qid = f"Q{query_ids[index]:06d}"
        image.save(tmp / "queries" / f"{qid}.jpg", quality=cfg.query_quality)
        ref = ref_ids[task.source] if index < n_pos else ""
        rows.append({"query_id": qid, "reference_id": ref, "edits": ";".join(names),
                     "intensity": round(task.intensity, 3), "source": str(task.source)})
    return sorted(rows, key=lambda r: r["query_id"])


def _write_tables(rows: list[dict], ref_ids: dict[Path, str], tmp: Path, root: Path) -> None:
    edits_df = pd.DataFrame(rows, columns=["query_id", "reference_id", "edits", "intensity", "source"])
    edits_df.drop(columns="source").to_csv(tmp / "edits.csv", index=False)
    edits_df.loc[edits_df.reference_id != "", ["query_id", "reference_id"]].to_csv(
        tmp / "ground_truth.csv", index=False)
    manifest = [{"id": rid, "role": "reference", "source": _rel(src, root)} for src, rid in ref_ids.items()]
    manifest += [{"id": r["query_id"], "role": "query", "source": _rel(Path(r["source"]), root)} for r in rows]
    pd.DataFrame(manifest).sort_values("id").to_csv(tmp / "manifest.csv", index=False)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _prepare_out(cfg: BenchmarkConfig) -> tuple[Path, Path]:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of a killed build
    tmp.mkdir(parents=True)
    return out, tmp


def run(cfg: BenchmarkConfig) -> data.DiscLayout:
    """Build the benchmark described by `cfg` and return its layout."""
    report = data.SkipReport()
    images = source_images(cfg)
    plan = make_plan(images, cfg, report)
    out, tmp = _prepare_out(cfg)
    root = Path(cfg.images) if cfg.images else Path(str(demo_dir()))
    ref_ids = _write_references(plan, tmp)
    rows = _write_queries(make_tasks(plan, cfg), plan, ref_ids, cfg, tmp, report)
    _write_tables(rows, ref_ids, tmp, root)
    save_config(cfg, tmp / "config.yaml")
    if len(report):
        report.write_csv(tmp / "skipped.csv")
        log.warning(report.summary())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    n_pos = sum(r["reference_id"] != "" for r in rows)
    print(f"benchmark {out}: {len(ref_ids)} references, {len(rows)} queries "
          f"({n_pos} positives, {len(rows) - n_pos} distractors), {len(report)} photos skipped")
    return data.DiscLayout.from_root(out)
