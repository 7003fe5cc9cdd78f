"""ISC2021 / DISC21 matching-track evaluation: micro-average precision (uAP), recall at precision 0.9,
recall@1, recall@k, precision-recall curves and a per-edit-family breakdown (reading and validating the CSVs:
`pair_vit.submissions`).

A submission is a CSV `query_id,reference_id,score`; a higher score means "more likely a copy". A
prediction is *positive* iff its (query_id, reference_id) is a ground-truth pair. All predictions of all
queries are ranked together (micro averaging) and equal scores are ranked *pessimistically* (negatives
before positives), so giving many predictions the same score can never buy precision. Ground-truth pairs
that the submission never predicts cost recall: uAP divides by the number of ground-truth pairs.

Low-level functions take flat arrays (`scores`: float, shape (n,); `is_positive`: bool, shape (n,));
`evaluate` and `per_edit_breakdown` take DataFrames as returned by `read_submission` / `read_ground_truth`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from pair_vit.config import opt, to_dict
from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.submissions import (EDITS_COLUMNS, GROUND_TRUTH_COLUMNS, PAIR, SUBMISSION_COLUMNS,  # noqa: F401
                                  EvalInputError, read_edits, read_ground_truth, read_submission,
                                  validate_ground_truth, validate_submission)



# ----------------------------------------------------------------------------- metrics on arrays

def _as_arrays(scores: Any, is_positive: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_positive = np.asarray(is_positive, dtype=bool).ravel()
    if scores.shape != is_positive.shape:
        raise ValueError(f"scores {scores.shape} and is_positive {is_positive.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite numbers")
    return scores, is_positive


def _check_n_ground_truth(is_positive: np.ndarray, n_ground_truth: int) -> None:
    if n_ground_truth < int(is_positive.sum()):
        raise ValueError(f"{int(is_positive.sum())} positive predictions but only {n_ground_truth} "
                         "ground-truth pairs: are (query, reference) pairs duplicated?")


def rank_predictions(scores: Any, is_positive: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sort predictions by score, descending; within a tie negatives come first (pessimistic).

    Returns (sorted scores, sorted is_positive), both shape (n,).
    """
    scores, is_positive = _as_arrays(scores, is_positive)
    order = np.lexsort((is_positive, -scores))  # last key is primary: score desc, then False < True
    return scores[order], is_positive[order]


def micro_average_precision(scores: Any, is_positive: Any, n_ground_truth: int) -> float:
    """ISC2021 uAP: sum of the precision at the rank of every true positive, divided by `n_ground_truth`.

    scores: shape (n,), higher = more likely a copy; is_positive: shape (n,) bool; n_ground_truth: number of
    ground-truth pairs (>= is_positive.sum()). Ties are ranked negatives-first. NaN if n_ground_truth == 0.
    """
    _, positive = rank_predictions(scores, is_positive)
    _check_n_ground_truth(positive, n_ground_truth)
    if n_ground_truth == 0:
        return float("nan")
    precision_at_rank = np.cumsum(positive) / np.arange(1, positive.size + 1)
    return float(precision_at_rank[positive].sum() / n_ground_truth)


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal values in a sorted array, shape (n_groups,)."""
    if sorted_scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))


def precision_recall_curve(scores: Any, is_positive: Any,
                           n_ground_truth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operating points "predict a copy iff score >= t", one per distinct score, highest t first.

    Ties cannot be split by a threshold, so points sit only at the ends of tie groups.
    Returns (precision, recall, thresholds), each shape (n_distinct_scores,); recall is NaN if
    n_ground_truth == 0.
    """
    scores, positive = rank_predictions(scores, is_positive)
    _check_n_ground_truth(positive, n_ground_truth)
    ends = _tie_group_ends(scores)
    true_positives = np.cumsum(positive)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / n_ground_truth if n_ground_truth else np.full(ends.shape, np.nan)
    return precision, recall, scores[ends]


def recall_at_precision(scores: Any, is_positive: Any, n_ground_truth: int,
                        min_precision: float = 0.9) -> tuple[float, float | None]:
    """Largest recall among the `precision_recall_curve` points with precision >= `min_precision`.

    Returns (recall, threshold t of that point); (0.0, None) if no point reaches `min_precision`.
    Of equal-recall points the highest threshold is kept.
    """
    precision, recall, thresholds = precision_recall_curve(scores, is_positive, n_ground_truth)
    ok = np.flatnonzero(precision >= min_precision - 1e-12)
    if n_ground_truth == 0 or ok.size == 0:
        return (0.0 if n_ground_truth else float("nan")), None
    best = ok[np.argmax(recall[ok])]  # argmax returns the first, i.e. highest-threshold, maximum
    return float(recall[best]), float(thresholds[best])


def recall_at_1(query_ids: Any, scores: Any, is_positive: Any, n_ground_truth_queries: int) -> float:
    """Fraction of ground-truth queries whose top-scored prediction is a correct pair.

    query_ids, scores, is_positive: shape (n,). A tie at the top of a query's list counts as wrong if it
    holds any negative (pessimistic). n_ground_truth_queries: queries with >= 1 ground-truth pair.
    """
    scores, positive = _as_arrays(scores, is_positive)
    if n_ground_truth_queries == 0:
        return float("nan")
    if scores.size == 0:
        return 0.0
    codes = pd.factorize(np.asarray(query_ids).ravel())[0]
    order = np.lexsort((positive, -scores, codes))  # per query: score desc, negatives first
    sorted_codes = codes[order]
    first = order[np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]]
    return float(positive[first].sum() / n_ground_truth_queries)


# ----------------------------------------------------------------------------- metrics on tables

@dataclass
class Metrics:
    """Matching-track metrics of one submission. Recalls are fractions of ground-truth pairs (queries for
    recall@1); threshold_at_p90 is the score t of "copy iff score >= t" (None if precision 0.9 is never met)."""
    uap: float
    recall_at_p90: float
    threshold_at_p90: float | None
    recall_at_1: float
    n_predictions: int
    n_queries_predicted: int
    n_ground_truth: int
    n_ground_truth_queries: int
    n_true_positives: int  # ground-truth pairs present anywhere in the submission (caps recall)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(dataclasses.asdict(self))


def label_predictions(predictions: pd.DataFrame, ground_truth: pd.DataFrame) -> np.ndarray:
    """Bool array, shape (len(predictions),): is each (query_id, reference_id) a ground-truth pair?"""
    if len(predictions) == 0 or len(ground_truth) == 0:
        return np.zeros(len(predictions), dtype=bool)
    keys = pd.MultiIndex.from_frame(predictions[PAIR])
    return np.asarray(keys.isin(pd.MultiIndex.from_frame(ground_truth[PAIR])), dtype=bool)


def _summarize(pred: pd.DataFrame, positive: np.ndarray, n_gt: int, n_gt_queries: int) -> Metrics:
    recall_p90, threshold = recall_at_precision(pred.score, positive, n_gt)
    return Metrics(
        uap=micro_average_precision(pred.score, positive, n_gt),
        recall_at_p90=recall_p90, threshold_at_p90=threshold,
        recall_at_1=recall_at_1(pred.query_id, pred.score, positive, n_gt_queries),
        n_predictions=len(pred), n_queries_predicted=int(pred.query_id.nunique()),
        n_ground_truth=n_gt, n_ground_truth_queries=n_gt_queries, n_true_positives=int(positive.sum()))


def evaluate(predictions: pd.DataFrame, ground_truth: pd.DataFrame) -> Metrics:
    """All matching-track metrics of `predictions` (query_id, reference_id, score) against ground-truth pairs."""
    pred = validate_submission(predictions, "predictions")
    gt = validate_ground_truth(ground_truth)
    return _summarize(pred, label_predictions(pred, gt), len(gt), int(gt.query_id.nunique()))


def recall_at_k(submission: pd.DataFrame, ground_truth: pd.DataFrame,
                ks: Iterable[int] = (1, 5, 10, 20, 50)) -> dict[int, float]:
    """Fraction of ground-truth (query, reference) pairs whose reference is among the query's k
    highest-scoring predictions, for each k (ties keep submission order). NaN without ground truth."""
    ks = [int(k) for k in ks]
    gt = ground_truth[["query_id", "reference_id"]].astype(str)
    gt = gt[gt.reference_id != ""].drop_duplicates()
    if len(gt) == 0:
        return {k: float("nan") for k in ks}
    sub = submission[["query_id", "reference_id", "score"]].copy()
    sub[["query_id", "reference_id"]] = sub[["query_id", "reference_id"]].astype(str)
    sub = sub.sort_values(["query_id", "score"], ascending=[True, False], kind="stable")
    sub["rank"] = sub.groupby("query_id").cumcount() + 1
    sub = sub.drop_duplicates(["query_id", "reference_id"])  # keep the best rank of a repeated pair
    ranks = gt.merge(sub, on=["query_id", "reference_id"], how="left")["rank"].to_numpy(dtype=np.float64)
    return {k: float(np.mean(np.nan_to_num(ranks, nan=np.inf) <= k)) for k in ks}


def edit_families(edits: pd.DataFrame, positive_queries: set[str]) -> dict[str, set[str]]:
    """Edit family name -> ids of the positive queries whose edit chain contains it."""
    families: dict[str, set[str]] = {}
    for query_id, chain in zip(edits.query_id, edits.edits.fillna("")):
        if query_id in positive_queries:
            for name in filter(None, (s.strip() for s in str(chain).split(";"))):
                families.setdefault(name, set()).add(query_id)
    return families


def per_edit_breakdown(predictions: pd.DataFrame, ground_truth: pd.DataFrame,
                       edits: pd.DataFrame, ks: Iterable[int] = (20, 50)) -> pd.DataFrame:
    """Metrics per edit family, hardest (lowest uAP) first.

    For family F the metrics use the predictions of the positive queries whose chain contains F PLUS the
    predictions of every distractor query (a query with no ground-truth pair). The distractors are what
    make precision drop: without them every family would look nearly perfect. n_queries / n_ground_truth
    count F's positive queries / pairs. Columns: edit, n_queries, n_ground_truth, n_predictions, uap,
    recall_at_p90, threshold_at_p90, recall_at_1, and recall_at_<k> for each of `ks` (`recall_at_k` over F's
    positive queries alone: is the true reference among a query's k best, e.g. in a shortlist of k).
    """
    pred = validate_submission(predictions, "predictions")
    gt = validate_ground_truth(ground_truth)
    positive = label_predictions(pred, gt)
    distractor = ~pred.query_id.isin(set(gt.query_id)).to_numpy()
    rows = []
    for name, queries in edit_families(edits, set(gt.query_id)).items():
        keep = pred.query_id.isin(queries).to_numpy() | distractor
        m = _summarize(pred[keep], positive[keep], int(gt.query_id.isin(queries).sum()), len(queries))
        found = recall_at_k(pred[pred.query_id.isin(queries)], gt[gt.query_id.isin(queries)], ks)
        rows.append({"edit": name, "n_queries": len(queries), **dataclasses.asdict(m),
                     **{f"recall_at_{k}": r for k, r in found.items()}})
    columns = ["edit", "n_queries", "n_ground_truth", "n_predictions", "uap", "recall_at_p90",
               "threshold_at_p90", "recall_at_1", *(f"recall_at_{int(k)}" for k in ks)]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["uap", "edit"], kind="stable").reset_index(drop=True)


def signal_rank1_by_family(rows: pd.DataFrame, ground_truth: pd.DataFrame, edits: pd.DataFrame,
                           signals: Sequence[str]) -> pd.DataFrame:
    """How often each signal ranks the true reference first among its query's shortlisted candidates, per edit
    family: a fused uAP hides a signal's blind spots whenever another signal covers them.

    rows: the shortlist (query_id, reference_id and one column per name in `signals`, higher = more likely a
    copy). Only true copies whose reference is in the shortlist count. Rank-1 means strictly above every other
    candidate of the query (a tie is not a win: SIFT's zero-inlier ties would otherwise count). A query counts
    in every family of its chain, and in the "all" row once. Columns: edit, n (true copies shortlisted), then
    the rank-1 fraction of each signal; rows: "all" first, then families by n, largest first.
    """
    gt = validate_ground_truth(ground_truth)
    truth = set(zip(gt.query_id, gt.reference_id))
    is_true = np.array([pair in truth for pair in zip(rows.query_id, rows.reference_id)], bool)
    wins = {}
    for name in signals:
        values = rows[name].to_numpy(np.float64)
        best_other = pd.Series(np.where(is_true, -np.inf, values)).groupby(rows.query_id.to_numpy()).transform("max")
        wins[name] = pd.Series(values[is_true] > best_other.to_numpy()[is_true],
                               index=rows.query_id.to_numpy()[is_true])
    shortlisted = set(rows.query_id[is_true])
    families = {"all": shortlisted, **{f: q & shortlisted for f, q in edit_families(edits, shortlisted).items()}}
    out = [{"edit": f, "n": len(q), **{s: float(wins[s][wins[s].index.isin(q)].mean()) if q else float("nan")
                                       for s in signals}} for f, q in families.items()]
    table = pd.DataFrame(out, columns=["edit", "n", *signals])
    return pd.concat([table.iloc[:1], table.iloc[1:].sort_values(["n", "edit"], ascending=[False, True])],
                     ignore_index=True)


# ----------------------------------------------------------------------------- reporting

def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_metrics(m: Metrics) -> str:
    """Two lines; the first starts with 'uAP <value>'."""
    p90 = f"(threshold {m.threshold_at_p90:.4g})" if m.threshold_at_p90 is not None else "(never reaches P90)"
    max_recall = m.n_true_positives / m.n_ground_truth if m.n_ground_truth else float("nan")
    return (f"uAP {m.uap:.4f}  recall@P90 {m.recall_at_p90:.4f} {p90}  recall@1 {m.recall_at_1:.4f}  "
            f"predictions {m.n_predictions}  ground-truth pairs {m.n_ground_truth}\n"
            f"queries predicted {m.n_queries_predicted}  ground-truth queries {m.n_ground_truth_queries}  "
            f"ground-truth pairs predicted {m.n_true_positives} (max recall {max_recall:.4f})")


def write_pr_curve(path: str | Path, precision: np.ndarray, recall: np.ndarray, title: str = "") -> None:
    """Save a precision-recall plot as PNG (atomically). precision, recall: shape (n_points,)."""
    # A bare Figure (no pyplot) selects no backend, so notebooks keep their inline plots.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(recall, precision, marker="." if len(recall) < 50 else None)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# ----------------------------------------------------------------------------- command line

@dataclass
class EvalConfig:
    """Score a DISC21-style matching submission against ground truth (uAP, recall@P90, recall@1)."""
    submission: str = opt("", "submission CSV query_id,reference_id,score (higher score = more likely a copy)")
    ground_truth: str = opt("", "ground-truth CSV query_id,reference_id (empty reference_id rows ignored)")
    edits: str = opt("", "optional edits CSV query_id,reference_id,edits for a per-edit-family breakdown")
    pr_curve: str = opt("", "optional path of a precision-recall curve PNG")
    output: str = opt("", "optional path of a JSON file with the metrics")


def run(cfg: EvalConfig) -> Metrics:
    """Read, evaluate, print (first line: 'uAP ...'), and write the optional table, curve and JSON."""
    if not cfg.submission or not cfg.ground_truth:
        raise EvalInputError("both --submission and --ground-truth are required")
    pred, gt = read_submission(cfg.submission), read_ground_truth(cfg.ground_truth)
    metrics = evaluate(pred, gt)
    print(format_metrics(metrics))
    table = per_edit_breakdown(pred, gt, read_edits(cfg.edits)) if cfg.edits else None
    if table is not None:
        print("\nper edit family (each with all distractor queries' predictions):")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if cfg.pr_curve:
        precision, recall, _ = precision_recall_curve(pred.score, label_predictions(pred, gt), len(gt))
        write_pr_curve(cfg.pr_curve, precision, recall, title=f"uAP {metrics.uap:.4f}")
    if cfg.output:
        report = {"metrics": metrics.to_dict(), "config": to_dict(cfg),
                  "per_edit": [] if table is None else _json_safe(table.to_dict("records"))}
        write_text_atomic(cfg.output, json.dumps(report, indent=2) + "\n")
    return metrics
