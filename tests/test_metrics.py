"""Tests of pair_vit.metrics: ISC2021 metrics on hand-computed cases, input validation, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pair_vit.metrics import (EvalInputError, evaluate, micro_average_precision, per_edit_breakdown,
                           precision_recall_curve, read_edits, read_ground_truth, read_submission,
                           recall_at_1, recall_at_k, recall_at_precision)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def frame(rows, columns=("query_id", "reference_id", "score")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


# ----------------------------------------------------------------------------- micro-average precision

def test_uap_perfect_ranking_is_one():
    assert micro_average_precision([0.9, 0.8, 0.1], [True, True, False], 2) == pytest.approx(1.0)


def test_uap_hand_computed_p_n_p():
    # ranked P, N, P with 3 ground-truth pairs: precision at the positives is 1/1 and 2/3;
    # the third pair is never predicted -> uAP = (1 + 2/3) / 3 = 5/9
    uap = micro_average_precision([0.7, 0.9, 0.8], [True, True, False], 3)  # input order irrelevant
    assert uap == pytest.approx((1 + 2 / 3) / 3)


def test_uap_ties_are_pessimistic():
    # one positive and one negative with the same score: ranked N then P -> precision 1/2 at the positive.
    # The optimistic order (P then N) would give 1.0.
    for labels in ([True, False], [False, True]):
        assert micro_average_precision([0.5, 0.5], labels, 1) == pytest.approx(0.5)
    assert micro_average_precision([0.6, 0.5], [True, False], 1) == pytest.approx(1.0)


def test_missing_ground_truth_pairs_lower_uap():
    # the same perfect ranking, but 4 ground-truth pairs of which only 2 are predicted
    assert micro_average_precision([0.9, 0.8], [True, True], 4) == pytest.approx(0.5)


def test_uap_empty_and_inconsistent_inputs():
    assert micro_average_precision([], [], 3) == 0.0
    assert np.isnan(micro_average_precision([], [], 0))
    with pytest.raises(ValueError, match="duplicated"):
        micro_average_precision([0.9, 0.8], [True, True], 1)
    with pytest.raises(ValueError, match="finite"):
        micro_average_precision([np.nan], [True], 1)


def _brute_force_uap(scores, labels, n_gt):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], labels[i]))  # negatives first in a tie
    tp, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            tp += 1
            total += tp / rank
    return total / n_gt


def _brute_force_recall_at_p90(scores, labels, n_gt):
    best = (0.0, None)
    for t in sorted(set(scores), reverse=True):
        chosen = [lab for s, lab in zip(scores, labels) if s >= t]
        recall = sum(chosen) / n_gt
        if sum(chosen) / len(chosen) >= 0.9 and recall > best[0]:
            best = (recall, t)
    return best


def test_matches_brute_force_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        scores = list(rng.integers(0, 6, n).astype(float))  # many ties
        labels = list(rng.random(n) < 0.85)
        n_gt = sum(labels) + int(rng.integers(0, 3))
        assert micro_average_precision(scores, labels, n_gt) == pytest.approx(
            _brute_force_uap(scores, labels, n_gt))
        recall, t = recall_at_precision(scores, labels, n_gt)
        assert (recall, t) == pytest.approx(_brute_force_recall_at_p90(scores, labels, n_gt))


# ----------------------------------------------------------------------------- recall at precision 0.9

def test_recall_at_p90_hand_case():
    # ranks 1..12 with scores 12..1, labels P*9, N, P, N; 12 ground-truth pairs.
    # rank 10: precision 9/10 = 0.9, recall 9/12; rank 11: precision 10/11 >= 0.9, recall 10/12 (best);
    # rank 12: precision 10/12 < 0.9. -> recall 10/12 at threshold score 2.
    scores = np.arange(12, 0, -1, dtype=float)
    labels = np.array([True] * 9 + [False, True, False])
    recall, threshold = recall_at_precision(scores, labels, 12)
    assert recall == pytest.approx(10 / 12)
    assert threshold == 2.0


def test_recall_at_p90_cannot_split_a_tie():
    # 9 positives at scores 10..2, then a tie at score 1 holding P, N, N; 10 ground-truth pairs.
    # Splitting the tie (P first) would give precision 1.0 at recall 1.0, but a threshold keeps all three:
    # precision 10/12 < 0.9. Best point: threshold 2, recall 0.9.
    scores = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 1]
    labels = [True] * 9 + [True, False, False]
    recall, threshold = recall_at_precision(scores, labels, 10)
    assert recall == pytest.approx(0.9)
    assert threshold == 2.0


def test_recall_at_p90_never_reached():
    assert recall_at_precision([2.0, 1.0], [False, True], 1) == (0.0, None)
    assert recall_at_precision([], [], 5) == (0.0, None)


def test_precision_recall_curve_points_at_tie_ends():
    precision, recall, thresholds = precision_recall_curve([0.9, 0.5, 0.5, 0.1], [True, True, False, False], 4)
    np.testing.assert_allclose(thresholds, [0.9, 0.5, 0.1])
    np.testing.assert_allclose(precision, [1.0, 2 / 3, 2 / 4])
    np.testing.assert_allclose(recall, [0.25, 0.5, 0.5])


# ----------------------------------------------------------------------------- recall@1

def test_recall_at_1_with_tie():
    # q1: positive and negative tied at the top -> counted wrong (pessimistic);
    # q2: positive strictly on top -> right; q3: a ground-truth query never predicted -> wrong.
    queries = ["q1", "q1", "q2", "q2"]
    scores = [0.8, 0.8, 0.9, 0.1]
    labels = [True, False, True, False]
    assert recall_at_1(queries, scores, labels, 3) == pytest.approx(1 / 3)
    assert recall_at_1(queries, [0.8, 0.7, 0.9, 0.1], labels, 3) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- DataFrame level

PRED = frame([("Q1", "R1", 0.9), ("Q2", "R2", 0.5), ("Q3", "R3", 0.8), ("Q9", "R5", 0.7), ("Q8", "R6", 0.3)])
GT = frame([("Q1", "R1"), ("Q2", "R2"), ("Q3", "R3"), ("Q8", ""), ("Q9", "")], ["query_id", "reference_id"])
EDITS = frame([("Q1", "R1", "crop;jpeg"), ("Q2", "R2", "crop"), ("Q3", "R3", "blur"),
               ("Q8", "", "jpeg"), ("Q9", "", "")], ["query_id", "reference_id", "edits"])


def test_evaluate_tables():
    # ranked 0.9 P, 0.8 P, 0.7 N, 0.5 P, 0.3 N with 3 pairs (the empty-reference GT rows are dropped):
    # uAP = (1 + 1 + 3/4) / 3; precision >= 0.9 up to recall 2/3 at threshold 0.8; every query right at rank 1
    m = evaluate(PRED, GT)
    assert m.uap == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert (m.recall_at_p90, m.threshold_at_p90) == (pytest.approx(2 / 3), 0.8)
    assert m.recall_at_1 == pytest.approx(1.0)
    assert (m.n_predictions, m.n_queries_predicted, m.n_ground_truth, m.n_true_positives) == (5, 5, 3, 3)


def test_per_edit_breakdown_includes_distractors():
    table = per_edit_breakdown(PRED, GT, EDITS).set_index("edit")
    # crop: Q1, Q2 + distractors Q8, Q9 -> 0.9 P, 0.7 N, 0.5 P, 0.3 N -> (1 + 2/3) / 2
    assert table.loc["crop", "uap"] == pytest.approx(5 / 6)
    assert table.loc["crop", ["n_queries", "n_ground_truth", "n_predictions"]].tolist() == [2, 2, 4]
    # jpeg: only Q1 is a positive query (distractor Q8's jpeg does not count) -> 0.9 P first -> 1.0
    assert table.loc["jpeg", "uap"] == pytest.approx(1.0)
    assert table.loc["jpeg", "n_queries"] == 1
    assert table.loc["blur", "uap"] == pytest.approx(1.0)
    assert list(table.index)[0] == "crop"  # hardest first
    # both crop queries predict their true reference (and nothing else): in the top 20
    assert table.loc["crop", "recall_at_20"] == 1.0
    extra = pd.concat([PRED[PRED.query_id != "Q2"], frame([("Q2", f"X{i}", 0.9 - i / 100) for i in range(20)]),
                       frame([("Q2", "R2", 0.1)])])
    ranked = per_edit_breakdown(extra, GT, EDITS, ks=(20, 21)).set_index("edit")
    assert ranked.loc["crop", "recall_at_20"] == 0.5 and ranked.loc["crop", "recall_at_21"] == 1.0


# ----------------------------------------------------------------------------- reading and validation

def test_ids_stay_strings(tmp_path):
    sub = read_submission(write(tmp_path / "s.csv", "query_id,reference_id,score\nQ000123,000456,0.5\n"))
    assert sub.query_id[0] == "Q000123" and sub.reference_id[0] == "000456"
    assert sub.score.dtype == np.float64


def test_ground_truth_empty_reference_rows_dropped(tmp_path):
    gt = read_ground_truth(write(tmp_path / "gt.csv", "query_id,reference_id\nQ1,R1\nQ2,\nQ3,R3\n"))
    assert gt.values.tolist() == [["Q1", "R1"], ["Q3", "R3"]]


def test_empty_submission_is_valid(tmp_path):
    sub = read_submission(write(tmp_path / "s.csv", "query_id,reference_id,score\n"))
    assert len(sub) == 0
    m = evaluate(sub, GT)
    assert m.uap == 0.0 and m.recall_at_1 == 0.0 and m.threshold_at_p90 is None


@pytest.mark.parametrize("body, message", [
    ("query_id,reference_id,score\nQ1,R1,0.5\nQ1,R1,0.7\n", "duplicate.*Q1.*R1"),
    ("query_id,reference_id,score\nQ1,R1,nan\n", "non-numeric score"),
    ("query_id,reference_id,score\nQ1,R1,\n", "non-numeric score"),
    ("query_id,reference_id,score\nQ1,R1,high\n", "non-numeric score"),
    ("Q1,R1,0.5\nQ2,R2,0.4\n", "missing header"),
    ("query_id,reference_id\nQ1,R1\n", r"missing column.*score"),
    ("query_id,reference_id,score\n,R1,0.5\n", "empty query_id"),
    ("", "empty"),
    ("query_id,reference_id,score\nQ1,R1,0.5,7\n", "not a valid CSV"),
    ("query_id,reference_id,score\nQ1,R1\n", "non-numeric score"),
])
def test_bad_submissions_rejected(tmp_path, body, message):
    path = write(tmp_path / "bad.csv", body)
    with pytest.raises(EvalInputError, match=message) as err:
        read_submission(path)
    assert "bad.csv" in str(err.value)


def test_missing_file_and_duplicate_ground_truth(tmp_path):
    with pytest.raises(EvalInputError, match="not found"):
        read_submission(tmp_path / "nope.csv")
    with pytest.raises(EvalInputError, match="duplicate"):
        read_ground_truth(write(tmp_path / "gt.csv", "query_id,reference_id\nQ1,R1\nQ1,R1\n"))


# ----------------------------------------------------------------------------- command line

def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def write_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    sub = tmp_path / "sub.csv"
    PRED.to_csv(sub, index=False)
    gt = tmp_path / "gt.csv"
    GT.to_csv(gt, index=False)
    edits = tmp_path / "edits.csv"
    EDITS.to_csv(edits, index=False)
    return sub, gt, edits


def test_script_prints_uap_and_writes_outputs(tmp_path):
    sub, gt, edits = write_inputs(tmp_path)
    assert read_edits(edits).edits.tolist()[-1] == ""
    png, out = tmp_path / "pr.png", tmp_path / "m" / "metrics.json"
    proc = run_script("--submission", str(sub), "--ground-truth", str(gt), "--edits", str(edits),
                      "--pr-curve", str(png), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("uAP 0.9167")
    assert "crop" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert report["metrics"]["uap"] == pytest.approx(11 / 12)
    assert {row["edit"] for row in report["per_edit"]} == {"crop", "jpeg", "blur"}


def test_script_bad_submission_exit_2(tmp_path):
    _, gt, _ = write_inputs(tmp_path)
    bad = write(tmp_path / "bad.csv", "query_id,reference_id,score\nQ1,R1,nan\n")
    proc = run_script("--submission", str(bad), "--ground-truth", str(gt))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.csv" in lines[0] and "score" in lines[0]


def test_recall_at_k():
    sub = pd.DataFrame({"query_id": ["q1", "q1", "q1", "q2", "q2"], "reference_id": ["a", "b", "c", "x", "y"],
                        "score": [0.9, 0.8, 0.7, 0.5, 0.9]})
    gt = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "reference_id": ["b", "y", "z"]})
    assert recall_at_k(sub, gt, ks=(1, 2, 5)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3),
                                           5: pytest.approx(2 / 3)}
    assert np.isnan(recall_at_k(sub, gt.iloc[:0], ks=(1,))[1])


def test_signal_rank1_by_family_hand_computed():
    from pair_vit.metrics import signal_rank1_by_family

    rows = pd.DataFrame({
        "query_id":     ["q1", "q1", "q2", "q2", "q3", "q3", "q4", "q4"],
        "reference_id": ["r1", "x",  "r2", "y",  "r3", "z",  "w",  "v"],
        # q1: a wins, b ties (not a win); q2: a loses, b wins; q3: both win; q4: a distractor (no true pair)
        "a": [2.0, 1.0, 0.0, 5.0, 3.0, 1.0, 9.0, 9.0],
        "b": [1.0, 1.0, 4.0, 0.0, 2.0, 0.0, 0.0, 0.0],
    })
    gt = pd.DataFrame({"query_id": ["q1", "q2", "q3", "q5"], "reference_id": ["r1", "r2", "r3", "r5"]})
    edits = pd.DataFrame({"query_id": ["q1", "q2", "q3", "q4", "q5"],
                          "edits": ["collage;jpeg", "collage", "crop", "blur", "collage"]})
    table = signal_rank1_by_family(rows, gt, edits, ["a", "b"]).set_index("edit")
    assert list(table.index) == ["all", "collage", "crop", "jpeg"]  # q5 was never shortlisted: not counted
    assert table.loc["all"].tolist() == [3, 2 / 3, 2 / 3]
    assert table.loc["collage"].tolist() == [2, 0.5, 0.5]
    assert table.loc["crop"].tolist() == [1, 1.0, 1.0] and table.loc["jpeg"].tolist() == [1, 1.0, 0.0]
