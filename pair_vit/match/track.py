"""Scoring descriptor-track submissions as ISC2021 scored them: two descriptor files (`pair_vit.descriptor.track`
layout) in, exact Euclidean k-nearest-neighbour search of every query vector over all reference vectors, the
neighbours as predictions, micro-AP and recall@P90 with `pair_vit.metrics`.

    python scripts/score_descriptors.py --query-descriptors OUT/query.h5 --reference-descriptors OUT/reference.h5 \
        --ground-truth GT.csv [--k 10] [--output sub.csv]
    python scripts/score_descriptors.py --query-descriptors ... --reference-descriptors ... --benchmark B/

The score of a pair is minus its squared Euclidean distance (higher = more likely a copy), exactly as the
challenge's reference code (isc/descriptor_matching.py, knn_match_and_make_predictions: faiss METRIC_L2, which
returns squared distances, negated); it ranks pairs as minus the distance does. For L2-normalised descriptors
it is 2 cosine - 2; for PDQ / pHash bits written as 0/1 floats, minus the Hamming distance. No score is
post-processed: normalisation must live in the vectors (`pair_vit.descriptor.normalise`).

`--benchmark B` (or `--queries` / `--references`) also checks the files' ids against the image folders: an id
that is not an image, or an image with neither a vector nor a place in the file's skipped list, is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit import metrics as evaluation
from pair_vit.config import opt, to_dict
from pair_vit.descriptor.track import Descriptors, check_ids, check_sides, read_descriptors
from pair_vit.io import atomic_path, write_text_atomic

# neighbours kept per query: the track's cap was 500,000 predictions for its 50,000 queries, 10 per query
DEFAULT_K = 10


def knn_l2(query: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search: for each query vector (Nq, D), its k' = min(k, Nr) nearest reference vectors (Nr, D) by
    Euclidean distance. Returns (squared distances (Nq, k') float32 ascending, reference indices (Nq, k'))."""
    import faiss

    query = np.ascontiguousarray(query, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(reference))
    if len(query) == 0 or k == 0:
        return np.zeros((len(query), k), np.float32), np.zeros((len(query), k), np.int64)
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference)
    return index.search(query, k)


def track_predictions(query: Descriptors, reference: Descriptors, k: int = DEFAULT_K) -> pd.DataFrame:
    """Predictions of a descriptor-track submission: each query's k nearest references, as query_id,
    reference_id, score = -(squared Euclidean distance), best first within each query."""
    check_sides(query, reference, "the query descriptors", "the reference descriptors")
    dist, idx = knn_l2(query.vectors, reference.vectors, k)
    ref_ids = np.asarray(reference.ids, dtype=object)
    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query.ids, dtype=object), idx.shape[1]),
        "reference_id": ref_ids[idx.reshape(-1)] if idx.size else np.array([], dtype=object),
        "score": -dist.reshape(-1).astype(np.float64),
    })


@dataclass
class TrackScore:
    """A scored descriptor-track submission: the metrics and R@k (fraction of ground-truth pairs whose reference
    is among the query's k neighbours)."""

    metrics: evaluation.Metrics
    recall_at_k: float
    k: int

    def line(self) -> str:
        return evaluation.format_metrics(self.metrics) + f"\nR@{self.k} {self.recall_at_k:.4f}"


def score_predictions(predictions: pd.DataFrame, ground_truth: pd.DataFrame, k: int) -> TrackScore:
    """uAP, recall@P90, recall@1 (`pair_vit.metrics.evaluate`) and R@k of track predictions."""
    recall = evaluation.recall_at_k(predictions, ground_truth, [k])[k]
    return TrackScore(evaluation.evaluate(predictions, ground_truth), recall, k)


# ----------------------------------------------------------------------------- command line


@dataclass
class ScoreConfig:
    """Score a descriptor-track submission (query and reference HDF5 files) as ISC2021 did."""

    query_descriptors: str = opt("", "HDF5 file of the query vectors (scripts/export_descriptors.py writes one)")
    reference_descriptors: str = opt("", "HDF5 file of the reference vectors")
    ground_truth: str = opt("", "ground-truth CSV query_id,reference_id (default: the --benchmark's)")
    benchmark: str = opt("", "benchmark folder: its ground truth, and its image folders to check the files' ids")
    queries: str = opt("", "query image folder to check the query file's ids against (default: the benchmark's)")
    references: str = opt("", "reference image folder to check the reference file's ids against")
    k: int = opt(DEFAULT_K, "nearest references kept per query (exact Euclidean search)")
    output: str = opt("", "optional submission CSV query_id,reference_id,score (score = -squared distance)")
    metrics_output: str = opt("", "optional JSON file with the metrics")
    pr_curve: str = opt("", "optional precision-recall curve PNG")
    overwrite: bool = opt(False, "replace an existing --output")


def _check_folders(cfg: ScoreConfig, query: Descriptors, reference: Descriptors) -> None:
    layout = data.DiscLayout.from_root(cfg.benchmark) if cfg.benchmark else None
    folders = {"query": cfg.queries or (layout.queries if layout else ""),
               "reference": cfg.references or (layout.references if layout else "")}
    for (side, folder), d, path in zip(folders.items(), (query, reference),
                                       (cfg.query_descriptors, cfg.reference_descriptors)):
        if folder:
            check_ids(d, data.list_images(folder), path, f"{folder} ({side} images)")


def _ground_truth(cfg: ScoreConfig) -> pd.DataFrame | None:
    if cfg.ground_truth:
        return evaluation.read_ground_truth(cfg.ground_truth)
    if cfg.benchmark:
        layout = data.DiscLayout.from_root(cfg.benchmark)
        return evaluation.validate_ground_truth(layout.load_ground_truth()) if layout.ground_truth else None
    return None


def run(cfg: ScoreConfig) -> TrackScore | None:
    """Read and check both files, search, write the optional submission; print and return the metrics (None
    without ground truth)."""
    if not (cfg.query_descriptors and cfg.reference_descriptors):
        raise ValueError("--query-descriptors and --reference-descriptors are required")
    if cfg.output and Path(cfg.output).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists; pass --overwrite to replace it")
    query, reference = read_descriptors(cfg.query_descriptors), read_descriptors(cfg.reference_descriptors)
    check_sides(query, reference, cfg.query_descriptors, cfg.reference_descriptors)
    _check_folders(cfg, query, reference)
    gt = _ground_truth(cfg)
    predictions = evaluation.validate_submission(track_predictions(query, reference, cfg.k), "predictions")
    if cfg.output:
        with atomic_path(cfg.output) as tmp:
            predictions.to_csv(tmp, index=False, float_format="%.6f")
    print(f"descriptor track: {len(query.ids)} queries, {len(reference.ids)} references, {query.dim} dimensions, "
          f"k={cfg.k}: {len(predictions)} predictions" + (f" -> {cfg.output}" if cfg.output else ""))
    if gt is None:
        return None
    scored = score_predictions(predictions, gt, cfg.k)
    print(scored.line())
    if cfg.pr_curve:
        precision, recall, _ = evaluation.precision_recall_curve(
            predictions.score, evaluation.label_predictions(predictions, gt), len(gt))
        evaluation.write_pr_curve(cfg.pr_curve, precision, recall, title=f"uAP {scored.metrics.uap:.4f}")
    if cfg.metrics_output:
        report = {"metrics": scored.metrics.to_dict(), f"recall_at_{cfg.k}": scored.recall_at_k,
                  "config": to_dict(cfg)}
        write_text_atomic(cfg.metrics_output, json.dumps(report, indent=2) + "\n")
    return scored
