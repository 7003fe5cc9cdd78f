"""The descriptor track on one benchmark: PDQ, pHash and the descriptor with each normalisation inside the vectors,
scored as ISC2021's descriptor track scored (`pair_vit.match.track`): the table behind docs/results.md#descriptor-track.

    python scripts/benchmark_track.py --benchmark benchmarks/dev --train ../shared/data/train --cache runs/track_cache

Each image set (queries, references, training photos) is described once per method and weights and cached as a
descriptor file under --cache, so trying normalisation settings redoes only numpy and faiss. A setting given as
several values (`--subtract-k 1 5 10 --subtract-beta 0.2 0.35`) gives a row per combination: the tuning grid.
Training descriptors are the train side of --train, less the photos the benchmark was built from (its manifest).
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from pair_vit import cache, data
from pair_vit.config import opt, save_config
from pair_vit.descriptor import normalise as norm
from pair_vit.descriptor import track as export
from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.match import track as scorer

_N = norm.NormaliseConfig


@dataclass
class TrackBenchConfig:
    """Score PDQ, pHash and the descriptor (with each normalisation) as ISC2021's descriptor track did."""

    benchmark: str = opt("", "benchmark folder written by scripts/make_benchmark.py")
    out: str = opt("", "folder for track.csv / track.md (default: BENCHMARK/track)")
    cache: str = opt("", "folder of cached descriptor files (default: OUT/cache); share it between benchmarks")
    methods: list = opt(["pdq", "phash", "descriptor"], "descriptors to score: descriptor, pdq, phash")
    normalise: list = opt(list(norm.METHODS), "normalisations of the descriptor to score (none, subtract, stretch, "
                                              "subtract+stretch)")
    train: str = opt("", "folder of training photos for the normalisations (its --train-split side)")
    train_split: str = opt("train", "side of the fixed split of --train", choices=("train", "all"))
    train_max: int = opt(0, "at most this many training photos (0: all)")
    checkpoint: str = opt("", "descriptor checkpoint; empty: the weights shipped in the package")
    subtract_k: list = opt([_N.subtract_k], "subtract: nearest training descriptors (several values: a grid)")
    subtract_beta: list = opt([_N.subtract_beta], "subtract: weight of their mean")
    subtract_alpha: list = opt([_N.subtract_alpha], "subtract: similarity-weight exponent (0: plain mean)")
    subtract_iterations: list = opt([_N.subtract_iterations], "subtract: repetitions")
    stretch_n: list = opt([_N.stretch_n], "stretch: nearest training descriptors")
    stretch_factor: list = opt([_N.stretch_factor], "stretch: factor")
    k: int = opt(scorer.DEFAULT_K, "nearest references kept per query")
    family_k: list = opt([20, 50], "per edit family, recall@k of each normalisation's first setting (k beyond the "
                                   "track's 10: how deep a shortlist built from the vector would need to be; [] "
                                   "to skip; needs the benchmark's edits.csv)")
    batch_size: int = opt(64, "images per descriptor forward pass")
    amp: bool = opt(True, "bf16 autocast where the hardware has native bf16 (--no-amp: float32)")
    num_workers: int = opt(1, "image-decoding worker processes")
    progress: bool = opt(True, "progress bars")


def settings_grid(cfg: TrackBenchConfig, method: str) -> list[norm.NormaliseConfig]:
    """Every combination of the listed settings that normalisation `method` uses."""
    subtract = [dict(subtract_k=int(k), subtract_beta=float(b), subtract_alpha=float(a), subtract_iterations=int(i))
                for k, b, a, i in itertools.product(cfg.subtract_k, cfg.subtract_beta, cfg.subtract_alpha,
                                                    cfg.subtract_iterations)] if "subtract" in method else [{}]
    stretch = [dict(stretch_n=int(n), stretch_factor=float(f))
               for n, f in itertools.product(cfg.stretch_n, cfg.stretch_factor)] if "stretch" in method else [{}]
    return [norm.check_settings(norm.NormaliseConfig(normalise=method, **s, **t)) for s in subtract for t in stretch]


def settings_label(s: norm.NormaliseConfig) -> str:
    parts = []
    if "subtract" in s.normalise:
        parts.append(f"k={s.subtract_k} beta={s.subtract_beta:g} alpha={s.subtract_alpha:g} "
                     f"iterations={s.subtract_iterations}")
    if "stretch" in s.normalise:
        parts.append(f"n={s.stretch_n} factor={s.stretch_factor:g}")
    return "; ".join(parts)


class DescriptorCache:
    """Descriptor files of image sets under `folder`, keyed by the images (ids, sizes, times), the method and,
    for the descriptor, its weights and precision: a set is described once."""

    def __init__(self, folder: Path, cfg: TrackBenchConfig):
        self.folder, self.cfg, self._model = folder, cfg, None

    def model(self):
        if self._model is None:
            self._model = export.load_model(self.cfg.checkpoint)
        return self._model

    def get(self, name: str, images: Mapping[str, Path], method: str) -> export.Descriptors:
        key = {"images": cache.listing(images), "method": method}
        if method == "descriptor":
            from pair_vit.descriptor.views import model_fingerprint

            key.update(weights=model_fingerprint(self.model()), amp=self.cfg.amp)
        path = self.folder / f"{name}.{method}.{cache.digest(key)}.h5"
        if path.is_file():
            return export.read_descriptors(path)
        model = self.model() if method == "descriptor" else None
        found = export.describe(images, method, model, self.cfg.batch_size, self.cfg.amp, self.cfg.num_workers,
                                progress=self.cfg.progress and name)
        export.write_descriptors(path, found)
        return found


def _row(method: str, settings: norm.NormaliseConfig | None, fn: Callable[[], pd.DataFrame], gt: pd.DataFrame,
         k: int, n_train: int) -> dict:
    start = time.perf_counter()
    predictions = fn()
    seconds = time.perf_counter() - start
    scored = scorer.score_predictions(predictions, gt, k)
    m = scored.metrics
    return {"method": method, "normalise": settings.normalise if settings else "none",
            "settings": settings_label(settings) if settings else "", "uAP": m.uap, "recall@P90": m.recall_at_p90,
            "recall@1": m.recall_at_1, f"R@{k}": scored.recall_at_k, "n_train": n_train,
            "seconds": seconds}


def _descriptor_rows(cfg: TrackBenchConfig, sides: dict[str, export.Descriptors], negatives, gt) -> list[dict]:
    rows = []
    q, r = sides["query"], sides["reference"]
    for method in cfg.normalise:
        for s in settings_grid(cfg, method):
            def predict(s=s):
                vq, vr = norm.normalise(q.vectors, r.vectors, negatives, s)
                return scorer.track_predictions(export.Descriptors(q.ids, vq), export.Descriptors(r.ids, vr), cfg.k)
            rows.append(_row("descriptor", s, predict, gt, cfg.k, 0 if method == "none" else len(negatives)))
            print(f"descriptor {method} {rows[-1]['settings']}: uAP {rows[-1]['uAP']:.4f}", flush=True)
    return rows


def sides_of(store: DescriptorCache, images: dict, bench_name: str, method: str) -> dict[str, export.Descriptors]:
    return {side: store.get(f"{bench_name}-{side}", found, method) for side, found in images.items()}


def _family_table(cfg: TrackBenchConfig, sides: dict[str, export.Descriptors], negatives, gt: pd.DataFrame,
                  out: Path, command: str) -> pd.DataFrame | None:
    """OUT/track_families.{csv,md}: per edit family, recall@k (cfg.family_k) of the descriptor under each
    normalisation's first setting, searched as the track searches (exact, Euclidean), k nearest kept."""
    from pair_vit import metrics
    from pair_vit.bench.signals import edits_of

    edits = edits_of(cfg.benchmark)
    if edits is None:
        return None
    q, r, ks = sides["query"], sides["reference"], [int(k) for k in cfg.family_k]
    columns = {}
    for method in cfg.normalise:
        s = settings_grid(cfg, method)[0]
        vq, vr = norm.normalise(q.vectors, r.vectors, negatives, s) if method != "none" else (q.vectors, r.vectors)
        pred = scorer.track_predictions(export.Descriptors(q.ids, vq), export.Descriptors(r.ids, vr), max(ks))
        every = metrics.recall_at_k(pred, gt, ks)
        table = metrics.per_edit_breakdown(pred, gt, edits, ks).set_index("edit")
        for k in ks:
            columns[f"{method} R@{k}"] = pd.concat([pd.Series({"all": every[k]}), table[f"recall_at_{k}"]])
        columns["n"] = pd.concat([pd.Series({"all": int(gt.query_id.nunique())}), table["n_queries"]])
    families = pd.DataFrame(columns).rename_axis("edit").reset_index()
    families = families[["edit", "n"] + [c for c in families.columns if c not in ("edit", "n")]]
    with atomic_path(out / "track_families.csv") as tmp:
        families.to_csv(tmp, index=False)
    write_text_atomic(out / "track_families.md", f"### Descriptor track per edit family on {cfg.benchmark}\n\n"
                      f"`{command}`\n\n{families.to_markdown(index=False, floatfmt='.3f')}\n")
    return families


def run(cfg: TrackBenchConfig, command: str | None = None) -> pd.DataFrame:
    """Write OUT/track.{csv,md}: one row per descriptor, normalisation and setting; return the table."""
    command = command or "python " + " ".join(sys.argv)
    if not cfg.benchmark:
        raise ValueError("--benchmark is required (a folder written by scripts/make_benchmark.py)")
    unknown = sorted(set(cfg.methods) - set(export.METHODS)) + sorted(set(cfg.normalise) - set(norm.METHODS))
    if unknown:
        raise ValueError(f"unknown method or normalisation {unknown}; methods {list(export.METHODS)}, "
                         f"normalisations {list(norm.METHODS)}")
    layout = data.DiscLayout.from_root(cfg.benchmark)
    gt = layout.load_ground_truth()
    out = Path(cfg.out) if cfg.out else Path(cfg.benchmark) / "track"
    store = DescriptorCache(Path(cfg.cache) if cfg.cache else out / "cache", cfg)
    save_config(cfg, out / "config.yaml")
    images = {"query": layout.query_images(), "reference": layout.reference_images()}
    bench_name = Path(cfg.benchmark).resolve().name
    rows = []
    for method in cfg.methods:
        sides = sides_of(store, images, bench_name, method)
        if method == "descriptor":
            descriptor_sides = sides  # the per-family table reuses them
        if method != "descriptor":
            rows.append(_row(method, None, lambda s=sides: scorer.track_predictions(s["query"], s["reference"], cfg.k),
                             gt, cfg.k, 0))
            print(f"{method}: uAP {rows[-1]['uAP']:.4f}", flush=True)
            continue
        negatives = None
        if set(cfg.normalise) - {"none"}:
            if not cfg.train:
                raise ValueError("the normalisations need --train (a folder of training photos)")
            train = store.get(f"train-{cfg.train_split}", norm.training_images(cfg.train, cfg.train_split), method)
            exclude = norm.benchmark_sources(cfg.benchmark)
            keep = [i for i, t in enumerate(train.ids) if t not in exclude][: cfg.train_max or None]
            negatives = train.vectors[keep]
        rows += _descriptor_rows(cfg, sides, negatives, gt)
    if "descriptor" in cfg.methods and cfg.family_k:
        _family_table(cfg, descriptor_sides, negatives, gt, out, command)
    table = pd.DataFrame(rows)
    with atomic_path(out / "track.csv") as tmp:
        table.to_csv(tmp, index=False)
    md = (f"### Descriptor track on {cfg.benchmark}\n\n`{command}`\n\n"
          f"{table.to_markdown(index=False, floatfmt='.3f')}\n")
    write_text_atomic(out / "track.md", md)
    print(md)
    return table
