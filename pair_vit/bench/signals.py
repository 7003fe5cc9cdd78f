"""Each reranking signal's rank-1 rate per edit family, on one benchmark's shortlists (first-class figure).

    table = signal_ranks(scored, gt, edits, {"fused": fused_scores})
    # edit, n, pair logit, pair logit (whole query), pair logit (localized), descriptor, SIFT inliers, fused

A fused uAP hides a signal's blind spots wherever another signal covers them (SIFT covered the pair ViT's
collage and screenshot misses): this table shows, for the true copies that reached the shortlist, how often
each signal alone puts the true reference first (`pair_vit.metrics.signal_rank1_by_family`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from pair_vit import metrics

# shortlist column -> the signal's name in the table (higher = more likely a copy for each)
SIGNAL_COLUMNS = {"logit": "pair logit", "logit_full": "pair logit (whole query)",
                  "logit_local": "pair logit (localized)", "score": "descriptor", "inliers": "SIFT inliers"}


def signal_ranks(scored: pd.DataFrame, ground_truth: pd.DataFrame, edits: pd.DataFrame,
                 fused: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """scored: the reranked shortlist (query_id, reference_id, score, logit, logit_<view>..., inliers);
    fused: extra named (N,) scores aligned with `scored` (e.g. a cross-fitted fusion). Returns the table of
    `pair_vit.metrics.signal_rank1_by_family` over every signal present (rows: "all", then edit families)."""
    frame = scored[["query_id", "reference_id"]].copy()
    for column, name in SIGNAL_COLUMNS.items():
        if column in scored and not (column == "logit_full" and "logit_local" not in scored):
            frame[name] = scored[column].to_numpy(np.float64)
    for name, values in (fused or {}).items():
        frame[name] = np.asarray(values, np.float64)
    names = [c for c in frame.columns if c not in ("query_id", "reference_id")]
    return metrics.signal_rank1_by_family(frame, ground_truth, edits, names)


def edits_of(benchmark: str | Path) -> pd.DataFrame | None:
    """The benchmark's edits.csv (scripts/make_benchmark.py writes it), or None if it has none."""
    from pair_vit.submissions import read_edits

    path = Path(benchmark) / "edits.csv"
    return read_edits(path) if path.exists() else None
