"""Turning pair-ViT logits (and descriptor similarities) into scores comparable across queries.

uAP ranks the predictions of ALL queries together, and a user acts on a score through a threshold, so the
submission score must mean the same thing for every query:

    score = sigmoid(w_logit * logit + w_logit_margin * logit_margin + w_desc * similarity + w_margin * margin
                    + w_inliers * log1p(inliers) + w_inlier_margin * inlier_margin
                    + w_votes * log1p(votes) + w_vote_margin * vote_margin + bias)

(higher = more likely a copy).

margin = the pair's descriptor similarity minus the highest similarity among the query's OTHER shortlisted
references (> 0 only for the query's top candidate): a copy usually stands out from the rest of its shortlist,
a look-alike of many references does not. It makes a score depend on the query's shortlist, as score
normalisation does, and it raised the fused uAP (measured: docs/results.md#similarity-margin-in-the-calibration).
logit_margin = the same margin taken of the pair logit: a query with no source whose best candidate gets a high
logit from a look-alike usually has other candidates scoring nearly as high; a copy stands out (the localized
reading raises every candidate's best logit a little, so the margin keeps scores comparable across queries).
inliers = RANSAC inliers of the pair's SIFT matches (`pair_vit.match.verify`), inlier_margin = the same margin
taken of log1p(inliers); both are used only by a calibration fitted with verification.
votes = the token-recall vote score of the pair (`pair_vit.match.token_recall`: how much of the query's local
tokens found their match in that reference), vote_margin = the same margin taken of log1p(votes); used only by a
calibration fitted with token recall on. A reference the votes brought into the shortlist carries the lowest
similarity the descriptor listed, so without them the fusion cannot rank what token recall recovers.

With the identity calibration (w_logit=1, w_desc=w_margin=0, bias=0) this is the model's own probability. `fit`
learns the numbers by logistic regression on the shortlisted pairs of a labelled benchmark (the descriptor
similarity then acts as a second opinion: fusion); `cross_fit` scores each query with a fit made on the
OTHER queries, so the uAP and the precision-90 threshold it yields are honest. The fit travels with the
pair-ViT weights (checkpoint `extra["calibration"]`) and `scripts/calibrate.py` writes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pair_vit.checkpoint import load_checkpoint, save_checkpoint


def similarity_margin(query_ids: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """(N,) pairs of whole shortlists -> (N,) float64: each pair's similarity minus the best similarity among
    the other pairs of its query (0 for a query with a single pair)."""
    sim = pd.Series(np.asarray(similarity, np.float64))
    queries = pd.Series(np.asarray(query_ids))
    groups = sim.groupby(queries, sort=False)
    top = groups.transform("idxmax").to_numpy() == np.arange(len(sim))  # one top pair per query
    runner_up = sim.where(~top, -np.inf).groupby(queries, sort=False).transform("max")
    other = np.where(top, runner_up, groups.transform("max"))  # the top pair is compared with the runner-up
    return np.where(np.isfinite(other), sim - other, 0.0)


@dataclass
class Calibration:
    """score = sigmoid(w_logit * logit + w_logit_margin * logit_margin + w_desc * similarity + w_margin * margin
    + w_inliers * log1p(inliers) + w_inlier_margin * inlier_margin + w_votes * log1p(votes)
    + w_vote_margin * vote_margin + bias)."""

    w_logit: float = 1.0
    w_desc: float = 0.0
    bias: float = 0.0
    w_margin: float = 0.0  # weight of `similarity_margin` (0: not used, no query ids needed)
    w_inliers: float = 0.0  # weight of log1p(SIFT RANSAC inliers) (0: no verification needed)
    w_inlier_margin: float = 0.0  # weight of the margin of log1p(inliers) over the query's other candidates
    w_logit_margin: float = 0.0  # weight of the pair logit's margin over the query's other candidates
    w_votes: float = 0.0  # weight of log1p(token-recall votes) (0: no token recall needed)
    w_vote_margin: float = 0.0  # weight of the margin of log1p(votes) over the query's other candidates
    threshold_p90: float | None = None  # calibrated score with precision 0.90 on the benchmark it was fitted on
    fitted_on: str = ""  # what it was fitted on (benchmark, pairs, positives)

    def apply(self, logit: np.ndarray, similarity: np.ndarray, query_ids: np.ndarray | None = None,
              inliers: np.ndarray | None = None, votes: np.ndarray | None = None) -> np.ndarray:
        """(N,) logits, (N,) descriptor similarities and, if the fit uses them, the (N,) query ids of a whole
        shortlist (margins), the (N,) RANSAC inliers and the (N,) token-recall votes -> (N,) float64 scores in
        (0, 1) (float64: confident pairs would otherwise all round to exactly 1.0 and tie)."""
        used = [name for name in FEATURES if getattr(self, name)]
        columns = features(used, logit, similarity, query_ids, inliers, votes)
        z = self.bias + sum((getattr(self, name) * col for name, col in columns.items()),
                            np.zeros(len(np.asarray(logit)), np.float64))
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    @property
    def needs_inliers(self) -> bool:
        return self.w_inliers != 0.0 or self.w_inlier_margin != 0.0

    @property
    def needs_votes(self) -> bool:
        return self.w_votes != 0.0 or self.w_vote_margin != 0.0

    @property
    def fuses(self) -> bool:
        return (self.w_desc != 0.0 or self.w_margin != 0.0 or self.w_logit_margin != 0.0
                or self.needs_inliers or self.needs_votes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown calibration field(s) {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"calibration file {path}: {err}") from None


# Calibration weight of each feature
FEATURES = ("w_logit", "w_desc", "w_margin", "w_inliers", "w_inlier_margin", "w_logit_margin", "w_votes",
            "w_vote_margin")


def features(names, logit, similarity, query_ids=None, inliers=None, votes=None) -> dict[str, np.ndarray]:
    """The score features `names` (Calibration weight names, see FEATURES) of N pairs, as (N,) float64 arrays;
    a margin needs the pairs' query ids (whole shortlists), an inlier feature their RANSAC inliers, a vote
    feature their token-recall votes."""
    if query_ids is None and {"w_margin", "w_inlier_margin", "w_logit_margin", "w_vote_margin"} & set(names):
        raise ValueError("this calibration uses margins over the query's other candidates: pass the pairs' "
                         "query ids")
    if inliers is None and {"w_inliers", "w_inlier_margin"} & set(names):
        raise ValueError("this calibration uses SIFT verification: pass the pairs' RANSAC inliers "
                         "(scripts/rerank.py --verify sift)")
    if votes is None and {"w_votes", "w_vote_margin"} & set(names):
        raise ValueError("this calibration uses token-recall votes: pass the pairs' votes (--token-recall >= 1)")
    verified = None if inliers is None else np.log1p(np.asarray(inliers, np.float64))
    voted = None if votes is None else np.log1p(np.maximum(np.asarray(votes, np.float64), 0.0))
    make = {"w_logit": lambda: logit, "w_desc": lambda: similarity,
            "w_margin": lambda: similarity_margin(query_ids, similarity), "w_inliers": lambda: verified,
            "w_inlier_margin": lambda: similarity_margin(query_ids, verified),
            "w_logit_margin": lambda: similarity_margin(query_ids, logit), "w_votes": lambda: voted,
            "w_vote_margin": lambda: similarity_margin(query_ids, voted)}
    return {name: np.asarray(make[name](), np.float64) for name in names}


def fit(logit: np.ndarray, similarity: np.ndarray, labels: np.ndarray, fuse: bool = True,
        query_ids: np.ndarray | None = None, inliers: np.ndarray | None = None,
        votes: np.ndarray | None = None) -> Calibration:
    """Logistic regression of labels (1 = true copy) on the logit; with `fuse`, also on the similarity, on
    `inliers` and `votes` (log1p) if given, and with `query_ids` of whole shortlists on the margins of each (the
    logit's too)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    if labels.min(initial=1) == labels.max(initial=0):
        raise ValueError("calibration needs both true copies and non-copies among the scored pairs")
    margins, verified, voted = query_ids is not None, inliers is not None, votes is not None
    wanted = {"w_logit": True, "w_desc": fuse, "w_margin": fuse and margins, "w_inliers": fuse and verified,
              "w_inlier_margin": fuse and margins and verified, "w_logit_margin": fuse and margins,
              "w_votes": fuse and voted, "w_vote_margin": fuse and margins and voted}
    names = [name for name in FEATURES if wanted[name]]
    columns = features(names, logit, similarity, query_ids, inliers, votes)
    lr = LogisticRegression(C=100.0, max_iter=2000).fit(np.stack(list(columns.values()), axis=1), labels)
    weights = {name: float(w) for name, w in zip(columns, lr.coef_[0])}
    return Calibration(**weights, bias=float(lr.intercept_[0]),
                       fitted_on=f"{len(labels)} pairs, {int(labels.sum())} copies")


def _fold(query_id: str, folds: int) -> int:
    return int(hashlib.blake2b(str(query_id).encode(), digest_size=4).hexdigest(), 16) % folds


def cross_fit(query_ids: np.ndarray, logit: np.ndarray, similarity: np.ndarray, labels: np.ndarray,
              fuse: bool = True, folds: int = 2, margin: bool = True, inliers: np.ndarray | None = None,
              votes: np.ndarray | None = None) -> np.ndarray:
    """Scores for every pair from a calibration fitted on the other folds of queries (by a hash of the id).

    All arrays (N,); returns float64 (N,). A fold without both labels among the others falls back to the
    identity calibration for its queries."""
    query_ids = np.asarray(query_ids)
    fold = np.array([_fold(q, folds) for q in query_ids])
    out = np.empty(len(fold), np.float64)
    part = (lambda x, mask: None if x is None else np.asarray(x)[mask])  # noqa: E731
    for f in range(folds):
        test, train = fold == f, fold != f
        try:
            cal = fit(logit[train], similarity[train], labels[train], fuse, query_ids[train] if margin else None,
                      part(inliers, train), part(votes, train))
        except ValueError:
            cal = Calibration()
        out[test] = cal.apply(logit[test], similarity[test], query_ids[test], part(inliers, test), part(votes, test))
    return out


def separability(logit: np.ndarray, similarity: np.ndarray, labels: np.ndarray,
                 inliers: np.ndarray | None = None, votes: np.ndarray | None = None) -> str:
    """One line: ROC-AUC of the pair logit, the descriptor similarity (and the RANSAC inliers, the token votes)
    over the shortlisted pairs (which signal tells copies from look-alikes better, before any calibration)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if labels.min(initial=1) == labels.max(initial=0):
        return f"ROC-AUC: undefined ({len(labels)} pairs, all of one label)"
    return (f"ROC-AUC over {len(labels)} shortlisted pairs ({int(labels.sum())} copies): pair logit "
            f"{roc_auc_score(labels, logit):.4f}, descriptor similarity {roc_auc_score(labels, similarity):.4f}"
            + (f", SIFT inliers {roc_auc_score(labels, inliers):.4f}" if inliers is not None else "")
            + (f", token votes {roc_auc_score(labels, votes):.4f}" if votes is not None else ""))


def store_in_checkpoint(path: str | Path, cal: Calibration) -> None:
    """Rewrite a pair-ViT checkpoint (atomically) with `cal` as its extra["calibration"]."""
    ckpt = load_checkpoint(path, kind="pair_vit")
    extra = {**ckpt.get("extra", {}), "calibration": cal.to_dict()}
    save_checkpoint(path, kind=ckpt["kind"], model_args=ckpt["model_args"], model_state=ckpt["model_state"],
                    config=ckpt["config"], step=ckpt["step"], extra=extra)
    print(f"stored the calibration in {path}")
