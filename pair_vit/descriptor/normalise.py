"""Score normalisation folded into the vectors, for the descriptor track (which allows no post-processing of scores).

Both kinds use the descriptors of training photos, the "negatives" (photos outside the benchmark: the train side
of the split, never dev-side photos, and on a benchmark built from training photos not its own sources;
`training_images` picks them, less a benchmark's `benchmark_sources`):

    subtract  ISC2021 descriptor track, 1st place (lyakaap, "negative embedding subtraction", arXiv:2112.04323).
              Every query AND reference vector x becomes
                  x <- l2normalise(x - beta * sum_i w_i n_i / sum_i w_i)
              over its k nearest negatives n_i (by cosine s_i), w_i = max(s_i, 0) ** alpha (alpha 0: their
              plain mean, as lyakaap; alpha 1: weighted by similarity, as Meta's VSC2022 baseline), repeated
              `iterations` times. Two look-alike photos share their nearest negatives, so subtracting them removes
              what the two have in common with many photos and their cosine drops; a copy shares much more with
              its reference than that and stays close.
    stretch   ISC2021 descriptor track, 3rd place (VisionForce, "descriptor stretching"). Every query vector q
              (unit) is scaled by a_q = factor * (mean cosine of q to its n nearest negatives); references
              unchanged. To a unit reference at cosine c the squared distance becomes (a_q - c)^2 + 1 - c^2
              instead of 2 - 2c: the order of one query's references is unchanged, but a query that resembles
              many photos (a_q > 1) is moved away from every reference, so its look-alike matches fall in the
              global ranking that micro-AP scores. It is a query normalisation: the score-level version is
              `pair_vit.match.index.normalise_scores`.

Both keep the dimension (<= 256, the track's limit). `normalise` applies "subtract", "stretch" or both (subtract
first; the stretch factor is computed from the query as embedded, against the negatives as embedded). Whole
images only: the track gives one vector per image, so the multi-view queries of the matching track do not apply.
Defaults chosen on the tuning benchmark (measured: docs/results.md#descriptor-track).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pair_vit import data
from pair_vit.config import opt

METHODS = ("none", "subtract", "stretch", "subtract+stretch")
# a stretch factor below this (a query whose nearest negatives are at cosine <= 0) is raised to it: a factor
# <= 0 would flip or erase the query
MIN_STRETCH = 1e-3


@dataclass
class NormaliseConfig:
    """How descriptors are normalised inside the vectors (see `pair_vit.descriptor.normalise`)."""

    normalise: str = opt("none", "normalisation inside the vectors, from the descriptors of training photos: "
                                 "none, subtract (negative embedding subtraction, queries and references), "
                                 "stretch (queries scaled by their similarity to training photos), or both",
                         choices=METHODS)
    subtract_k: int = opt(20, "subtract: nearest training descriptors of each vector")
    subtract_beta: float = opt(0.35, "subtract: weight of their mean")
    subtract_alpha: float = opt(0.0, "subtract: weights max(similarity, 0) ** alpha (0: plain mean)")
    subtract_iterations: int = opt(1, "subtract: times the subtraction is repeated")
    stretch_n: int = opt(3, "stretch: nearest training descriptors whose mean similarity sets the factor")
    stretch_factor: float = opt(1.5, "stretch: query scale = factor * that mean similarity")


def check_settings(cfg: NormaliseConfig) -> NormaliseConfig:
    if cfg.normalise not in METHODS:
        raise ValueError(f"unknown normalisation {cfg.normalise!r}; choose from {list(METHODS)}")
    if cfg.subtract_k < 1 or cfg.stretch_n < 1 or cfg.subtract_iterations < 1:
        raise ValueError("--subtract-k, --stretch-n and --subtract-iterations must be >= 1")
    if cfg.subtract_beta < 0 or cfg.subtract_alpha < 0 or cfg.stretch_factor <= 0:
        raise ValueError("--subtract-beta and --subtract-alpha must be >= 0, --stretch-factor > 0")
    return cfg


def _unit(vectors: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of `vectors` L2-normalised; a row that vanished keeps its `fallback` row instead."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    ok = norms > 1e-6
    return np.where(ok, vectors / np.where(ok, norms, 1.0), fallback).astype(np.float32)


def nearest_negatives(vectors: np.ndarray, negatives: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: (similarities (N, k'), indices (N, k')) of the k' = min(k, M) nearest of
    the negatives (M, D) for each of the vectors (N, D), best first."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    negatives = np.ascontiguousarray(negatives, dtype=np.float32)
    if len(negatives) == 0:
        raise ValueError("no training descriptors to normalise with")
    if negatives.shape[1] != vectors.shape[1]:
        raise ValueError(f"training descriptors have dimension {negatives.shape[1]}, the vectors "
                         f"{vectors.shape[1]}: they must come from the same descriptor")
    k = min(k, len(negatives))
    if len(vectors) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(negatives)
    return index.search(vectors, k)


def subtract_negatives(vectors: np.ndarray, negatives: np.ndarray, k: int = 10, beta: float = 0.35,
                       alpha: float = 0.0, iterations: int = 1) -> np.ndarray:
    """Negative embedding subtraction: (N, D) unit vectors -> (N, D) float32 unit vectors, each minus `beta` x
    the (max(sim, 0) ** alpha weighted) mean of its `k` nearest `negatives` (M, D), re-normalised; `iterations`
    times (each searches the negatives again with the new vectors)."""
    out = np.asarray(vectors, dtype=np.float32).copy()
    negatives = np.asarray(negatives, dtype=np.float32)
    for _ in range(iterations):
        sims, idx = nearest_negatives(out, negatives, k)
        weights = np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)
        total = weights.sum(axis=1, keepdims=True)
        weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 1.0 / sims.shape[1])
        mean = np.einsum("nk,nkd->nd", weights, negatives[idx])
        out = _unit(out - beta * mean, out)
    return out


def stretch_factors(vectors: np.ndarray, negatives: np.ndarray, n: int = 5, factor: float = 2.5) -> np.ndarray:
    """(N,) query scales: `factor` x the mean cosine of each vector (N, D) to its `n` nearest negatives (M, D),
    at least MIN_STRETCH."""
    sims, _ = nearest_negatives(vectors, negatives, n)
    return np.maximum(factor * sims.mean(axis=1), MIN_STRETCH).astype(np.float32)


def normalise(query: np.ndarray, reference: np.ndarray, negatives: np.ndarray | None,
              cfg: NormaliseConfig) -> tuple[np.ndarray, np.ndarray]:
    """(query (Nq, D), reference (Nr, D)) -> both normalised as `cfg.normalise` says, float32, same shapes.
    `negatives` (M, D): descriptors of training photos (required unless cfg.normalise is "none")."""
    check_settings(cfg)
    query, reference = np.asarray(query, np.float32), np.asarray(reference, np.float32)
    if cfg.normalise == "none":
        return query, reference
    if negatives is None or len(negatives) == 0:
        raise ValueError(f"normalisation {cfg.normalise!r} needs descriptors of training photos (--train)")
    new_query, new_reference = query, reference
    if "subtract" in cfg.normalise:
        sub = dict(k=cfg.subtract_k, beta=cfg.subtract_beta, alpha=cfg.subtract_alpha,
                   iterations=cfg.subtract_iterations)
        new_query = subtract_negatives(query, negatives, **sub)
        new_reference = subtract_negatives(reference, negatives, **sub)
    if "stretch" in cfg.normalise:
        new_query = new_query * stretch_factors(query, negatives, cfg.stretch_n, cfg.stretch_factor)[:, None]
    return new_query.astype(np.float32), new_reference.astype(np.float32)


# ----------------------------------------------------------------------------- the training photos


def benchmark_sources(benchmark: str | Path) -> set[str]:
    """Ids (file stems) of the photos a benchmark was built from (its manifest.csv `source` column; empty if it
    has none): they must not serve as training descriptors when it is scored."""
    import pandas as pd

    manifest = Path(benchmark) / "manifest.csv"
    if not manifest.is_file():
        return set()
    sources = pd.read_csv(manifest, dtype=str, keep_default_na=False).get("source", pd.Series([], dtype=str))
    return {Path(s).stem for s in sources if s}


def training_images(folder: str | Path, split: str = "train", exclude: Iterable[str] = (),
                    limit: int = 0) -> dict[str, Path]:
    """The photos of `folder` on `split` of the fixed split, less the ids in `exclude`, the first `limit` by id."""
    images = data.split_images(data.list_images(folder), split)
    exclude = set(exclude)
    ids = [i for i in sorted(images) if i not in exclude]
    return {i: images[i] for i in (ids[:limit] if limit else ids)}
