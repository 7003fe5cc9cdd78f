"""The calibrate stage: fit the score calibration of a pair ViT on a labelled benchmark.

    python scripts/calibrate.py --benchmark benchmarks/dev [--write-checkpoint]

It runs the matcher (`pair_vit.match.rerank`, uncalibrated) over the benchmark's queries and references with
the options shared with `scripts/rerank.py`, cross-fits the calibration for honest figures (uAP, recall and
the score threshold at precision 90), fits it on every pair and writes it as JSON (and into the checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pair_vit import data
from pair_vit import metrics as evaluation
from pair_vit.config import options_of, opt
from pair_vit.io import write_text_atomic
from pair_vit.match import rerank
from pair_vit.match.calibration import Calibration, cross_fit, fit, separability, store_in_checkpoint

# Options that mean the same thing here as in scripts/rerank.py: the calibration is fitted on the scores the
# matcher produces with these settings, so they are RerankConfig's own fields (help, default, choices).
SHARED = ("k", "checkpoint", "descriptor_checkpoint", "pair_views", "views", "subview_penalty", "reference_views",
          "reference_penalty", "token_recall", "verify")

CalibrateConfig = dataclasses.make_dataclass("CalibrateConfig", [
    ("benchmark", str, opt("", "benchmark folder written by scripts/make_benchmark.py (photos NOT trained on)")),
    *options_of(rerank.RerankConfig, SHARED),
    ("fuse", bool, opt(True, "fuse the descriptor similarity into the score (--no-fuse: logit only)")),
    ("margin", bool, opt(True, "with --fuse, also the similarity margin to the query's best other candidate")),
    # off: the votes gained nothing once the logit, similarity and inliers are in (tune 0.943 -> 0.939, dev 0.893 ->
    # 0.892 cross-fitted; docs/results.md#token-recall)
    ("votes", bool, opt(False, "with --fuse and --token-recall, also the token-recall votes and their margin")),
    ("out", str, opt("", "calibration JSON to write (default: BENCHMARK/calibration.json)")),
    ("write_checkpoint", bool, opt(False, "also store the fit in the pair-ViT checkpoint (extra['calibration']), "
                                          "where scripts/rerank.py picks it up by default")),
], namespace={"__doc__": "Fit the score calibration of a pair ViT on a labelled benchmark (and report its "
                         "precision-90 threshold)."})
CalibrateConfig.__module__ = __name__


def rerank_config(cfg: CalibrateConfig, layout: data.DiscLayout, out: Path) -> rerank.RerankConfig:
    """The uncalibrated matching run whose scores the calibration is fitted on."""
    return rerank.RerankConfig(queries=str(layout.queries), references=str(layout.references),
                               work_dir=str(out) + ".work", calibration="none",
                               **{name: getattr(cfg, name) for name in SHARED})


def run(cfg: CalibrateConfig) -> Calibration:
    """Score the benchmark's shortlist, cross-fit for honest figures, fit on everything, write the JSON."""
    if not cfg.benchmark:
        raise ValueError("--benchmark is required")
    layout = data.DiscLayout.from_root(cfg.benchmark)
    out = Path(cfg.out) if cfg.out else Path(cfg.benchmark) / "calibration.json"
    rows, gt = rerank.match(rerank_config(cfg, layout, out)).rows, layout.load_ground_truth()
    labels = evaluation.label_predictions(rows, gt)
    logit, sim, queries = rows.logit.to_numpy(), rows.score.to_numpy(), rows.query_id.to_numpy()
    inliers = rows.inliers.to_numpy() if cfg.verify != "none" else None
    votes = rows.votes.to_numpy() if cfg.votes and cfg.fuse and "votes" in rows else None
    honest = evaluation.evaluate(rows[["query_id", "reference_id"]].assign(
        score=cross_fit(queries, logit, sim, labels, cfg.fuse, margin=cfg.margin, inliers=inliers, votes=votes)), gt)
    plain = evaluation.evaluate(rows[["query_id", "reference_id"]].assign(score=Calibration().apply(logit, sim)), gt)
    cal = fit(logit, sim, labels, cfg.fuse, queries if cfg.margin else None, inliers, votes)
    cal.threshold_p90 = honest.threshold_at_p90
    cal.fitted_on = (f"{cfg.benchmark}: {cal.fitted_on}; k={cfg.k}, views {cfg.views} (sub-view penalty "
                     f"{cfg.subview_penalty:g}), reference views {cfg.reference_views} (penalty "
                     f"{cfg.reference_penalty:g}), token recall {cfg.token_recall}, pair views {list(cfg.pair_views)}, "
                     f"verify {cfg.verify}")
    write_text_atomic(out, json.dumps(cal.to_dict(), indent=2) + "\n")
    print(f"{separability(logit, sim, labels, inliers, votes)}\n"
          f"sigmoid(logit): uAP {plain.uap:.4f}, recall@P90 {plain.recall_at_p90:.4f}\n"
          f"calibrated{' + fused' if cfg.fuse else ''} (2-fold cross-fit): uAP {honest.uap:.4f}, recall@P90 "
          f"{honest.recall_at_p90:.4f}, threshold@P90 {honest.threshold_at_p90}\n"
          f"fit on all: {cal}\nwritten {out}")
    if cfg.write_checkpoint:
        store_in_checkpoint(cfg.checkpoint or str(rerank.SHIPPED_WEIGHTS), cal)
    return cal
