"""What the signal type reads about the shipped descriptor: its fingerprint, its views, and the descriptor-only
calibration that gives the match distance its meaning.

The calibration is `pair_vit.match.calibration.Calibration` fitted on ONE feature, the merged descriptor
similarity s of a (reference, query) pair (cosine, higher = more likely a copy):

    P(copy) = sigmoid(w * s + bias)        distance = 1 - s        (lower distance = more likely a copy)

Its precision-90 cut is the probability at which the dev benchmark's matches reached precision 0.90, found by
cross-fitting (each query scored by a fit made on the other queries, as `scripts/calibrate.py` does); the
default distance threshold of the signal type is that cut expressed as a distance. It is written to
`pair_vit/weights/tx_calibration.json` by `scripts/bench_tx.py --write-calibration` (the exact command is
recorded in the file and in docs/threatexchange.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pair_vit import metrics
from pair_vit.descriptor.model import SHIPPED_WEIGHTS
from pair_vit.io import write_text_atomic
from pair_vit.match.calibration import Calibration, cross_fit, fit

CALIBRATION_FILE = SHIPPED_WEIGHTS.parent / "tx_calibration.json"


@dataclass
class TxCalibration:
    """The signal type's settings for one set of descriptor weights (what tx_calibration.json holds)."""

    fingerprint: str  # pair_vit.descriptor.views.model_fingerprint of the weights the signals come from
    dim: int  # descriptor dimensions per view
    views: str  # views packed into one signal (pair_vit.descriptor.views: "full" or "halves")
    query_penalty: float  # subtracted from the similarity of a query's sub-views before merging views
    reference_penalty: float  # the same, for the sub-views of an indexed (reference) signal
    calibration: dict[str, Any]  # Calibration.to_dict() fitted on the merged similarity (w_logit weighs it)
    similarity_p90: float  # merged similarity at the cross-fitted precision-90 cut
    fitted_on: str = ""
    command: str = ""
    examples: list[str] = field(default_factory=list)  # signals of demo photos (SignalType.get_examples)

    @property
    def distance_threshold(self) -> float:
        """Default match distance: a pair with distance <= this is reported (precision 90 on dev)."""
        return 1.0 - self.similarity_p90

    def probability(self, distance: float | np.ndarray) -> np.ndarray:
        """Distance(s) -> calibrated probability of a copy (float64, same shape)."""
        similarity = 1.0 - np.asarray(distance, np.float64)
        flat = similarity.reshape(-1)
        return Calibration.from_dict(self.calibration).apply(flat, flat).reshape(similarity.shape)

    @classmethod
    def read(cls, path: str | Path = CALIBRATION_FILE) -> "TxCalibration":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"pair-vit ThreatExchange calibration {path}: {err} (written by "
                             f"scripts/bench_tx.py --write-calibration)") from None

    def write(self, path: str | Path = CALIBRATION_FILE) -> None:
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def fit_similarity(query_ids: np.ndarray, similarity: np.ndarray, labels: np.ndarray,
                   n_ground_truth: int) -> tuple[Calibration, float, float]:
    """Descriptor-only calibration of N scored (query, reference) pairs.

    query_ids, similarity, labels: (N,) (labels: 1 = true copy); n_ground_truth: copies in the benchmark
    (recall's denominator). Returns (the fit on all pairs, the merged similarity at the cross-fitted precision-90
    cut, the cross-fitted recall at that cut). The cut is found on honest (cross-fitted) probabilities, then mapped back
    to a similarity through the fit on all pairs, as `pair_vit.match.calibrate` does for the reranker.
    """
    similarity = np.asarray(similarity, np.float64)
    # The similarity is the only feature: it goes in as the "logit", fusion off.
    honest = cross_fit(np.asarray(query_ids), similarity, similarity, np.asarray(labels), fuse=False, margin=False)
    recall, cut = metrics.recall_at_precision(honest, labels, n_ground_truth)
    cal = fit(similarity, similarity, labels, fuse=False)
    cal.threshold_p90 = cut
    if cut is None:
        raise ValueError("descriptor-only matches never reach precision 0.90 on this benchmark")
    z = math.log(cut / (1.0 - cut)) if 0.0 < cut < 1.0 else math.copysign(60.0, cut - 0.5)
    similarity_cut = (z - cal.bias) / cal.w_logit
    return cal, float(similarity_cut), float(recall)
