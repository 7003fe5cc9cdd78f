"""Calibration of pair logits (+ descriptor similarity) into scores comparable across queries."""
import json

import numpy as np
import pytest

from pair_vit.match import calibration
from pair_vit.match.calibration import Calibration, cross_fit, fit, similarity_margin


def test_identity_is_the_sigmoid_of_the_logit():
    logit = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(Calibration().apply(logit, np.array([0.9, 0.1, 0.5])), 1 / (1 + np.exp(-logit)),
                               rtol=1e-6)
    assert not Calibration().fuses


def test_apply_by_hand_and_extremes():
    cal = Calibration(w_logit=2.0, w_desc=1.0, bias=-1.0)
    assert cal.apply(np.array([0.5]), np.array([1.0]))[0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    out = cal.apply(np.array([1e6, -1e6]), np.array([0.0, 0.0]))
    assert np.isfinite(out).all() and out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.0)


def synthetic(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    logit = rng.normal(0, 1, n) + 3 * labels   # informative
    similarity = rng.normal(0.3, 0.1, n) + 0.3 * labels  # informative too
    return np.array([f"Q{i // 5}" for i in range(n)]), logit, similarity, labels


def test_fit_learns_positive_weights_and_fusion_helps():
    from pair_vit.metrics import micro_average_precision

    _, logit, sim, labels = synthetic()
    fused, plain = fit(logit, sim, labels), fit(logit, sim, labels, fuse=False)
    assert fused.w_logit > 0 and fused.w_desc > 0 and plain.w_desc == 0.0
    ap = lambda cal: micro_average_precision(cal.apply(logit, sim), labels, int(labels.sum()))  # noqa: E731
    assert ap(fused) > ap(plain)
    assert "400 pairs" in fused.fitted_on


def test_margin_is_learned_and_needs_query_ids():
    from pair_vit.metrics import micro_average_precision

    rng = np.random.default_rng(1)
    q = np.repeat([f"Q{i}" for i in range(100)], 5)
    labels = np.zeros(500, bool)
    labels[::10] = True  # every other query's first pair is its copy
    base = np.repeat(rng.normal(0.5, 0.15, 100), 5)  # query-level offset: raw similarity misleads across queries
    sim = base + rng.normal(0, 0.02, 500) + 0.1 * labels
    logit = rng.normal(0, 1, 500)
    with_margin, without = fit(logit, sim, labels, query_ids=q), fit(logit, sim, labels)
    assert with_margin.w_margin > 0 and without.w_margin == 0.0 and with_margin.fuses
    ap = lambda s: micro_average_precision(s, labels, int(labels.sum()))  # noqa: E731
    assert ap(with_margin.apply(logit, sim, q)) > ap(without.apply(logit, sim)) + 0.1
    with pytest.raises(ValueError, match="query ids"):
        with_margin.apply(logit, sim)
    assert Calibration.from_dict(with_margin.to_dict()) == with_margin
    assert Calibration.from_dict({"w_logit": 1.0, "w_desc": 2.0, "bias": 0.0}).w_margin == 0.0  # older fits


def test_fit_needs_both_labels():
    with pytest.raises(ValueError, match="both"):
        fit(np.zeros(3), np.zeros(3), np.zeros(3))


def test_cross_fit_scores_each_query_with_the_other_folds():
    q, logit, sim, labels = synthetic()
    scores = cross_fit(q, logit, sim, labels)
    assert scores.shape == logit.shape and ((scores > 0) & (scores < 1)).all()
    # all rows of a query share a fold: no query is scored by a fit that saw it
    one_query = q == "Q3"
    again = cross_fit(q, logit, sim, labels)
    np.testing.assert_array_equal(scores[one_query], again[one_query])


def test_round_trip_and_bad_files(tmp_path):
    cal = Calibration(1.5, 0.5, -2.0, threshold_p90=0.7, fitted_on="dev")
    assert Calibration.from_dict(cal.to_dict()) == cal
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_dict()))
    assert Calibration.read(path) == cal
    path.write_text('{"w_logit": 1, "temperature": 2}')
    with pytest.raises(ValueError, match="temperature"):
        Calibration.read(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="cal.json"):
        Calibration.read(path)


def test_separability_by_hand():
    labels = np.array([1, 0, 0, 1])
    logit = np.array([3.0, 1.0, 2.0, 0.0])  # copies rank 1st and 4th: 2 of 4 copy/non-copy pairs ordered
    sim = np.array([0.9, 0.1, 0.2, 0.8])  # both copies above both non-copies
    line = calibration.separability(logit, sim, labels)
    assert "4 shortlisted pairs (2 copies)" in line
    assert "pair logit 0.5000" in line and "descriptor similarity 1.0000" in line
    assert "undefined" in calibration.separability(logit, sim, np.zeros(4))


def test_inlier_terms_by_hand():
    cal = Calibration(w_logit=1.0, w_desc=0.0, bias=-2.0, w_inliers=0.5, w_inlier_margin=1.0)
    q = np.array(["A", "A", "B"])
    inliers = np.array([np.e - 1, 0.0, np.e ** 2 - 1])  # log1p: 1, 0, 2
    # z = logit - 2 + 0.5 log1p(inliers) + margin of log1p(inliers) within the query (A: +1, -1; B alone: 0)
    expected_z = np.array([0.0 - 2 + 0.5 + 1, 0.0 - 2 + 0.0 - 1, 1.0 - 2 + 1.0 + 0])
    out = cal.apply(np.array([0.0, 0.0, 1.0]), np.zeros(3), q, inliers)
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-expected_z)), rtol=1e-9)
    assert cal.needs_inliers and cal.fuses and not Calibration().needs_inliers
    with pytest.raises(ValueError, match="SIFT verification"):
        cal.apply(np.zeros(3), np.zeros(3), q)
    with pytest.raises(ValueError, match="query ids"):
        cal.apply(np.zeros(3), np.zeros(3), None, inliers)


def test_inliers_are_learned_and_cross_fitted():
    from pair_vit.metrics import micro_average_precision

    q, _, sim, labels = synthetic()
    rng = np.random.default_rng(2)
    logit = rng.normal(0, 1, len(labels))  # an uninformative pair model: the similarity and inliers must carry it
    inliers = np.where(labels, rng.integers(5, 200, len(labels)), rng.integers(0, 12, len(labels)))
    with_inl = fit(logit, sim, labels, query_ids=q, inliers=inliers)
    assert with_inl.w_inliers > 0 and fit(logit, sim, labels, query_ids=q).w_inliers == 0.0
    ap = lambda s: micro_average_precision(s, labels, int(labels.sum()))  # noqa: E731
    honest = cross_fit(q, logit, sim, labels, inliers=inliers)
    assert ap(honest) > ap(cross_fit(q, logit, sim, labels)) + 0.02
    assert Calibration.from_dict(with_inl.to_dict()) == with_inl
    line = calibration.separability(logit, sim, labels, inliers)
    assert "SIFT inliers" in line


def test_similarity_margin_by_hand():
    q = np.array(["a", "a", "a", "b", "c", "c"])
    sim = np.array([0.9, 0.5, 0.7, 0.3, 0.6, 0.6])
    # a: top 0.9 vs runner-up 0.7; the others vs the top. b: alone. c: a tie, nobody stands out
    np.testing.assert_allclose(similarity_margin(q, sim), [0.2, -0.4, -0.2, 0.0, 0.0, 0.0], atol=1e-12)


def test_vote_terms_by_hand_and_learned():
    from pair_vit.metrics import micro_average_precision

    cal = Calibration(w_logit=0.0, bias=-1.0, w_votes=2.0, w_vote_margin=1.0)
    q = np.array(["A", "A", "B"])
    votes = np.array([np.e - 1, 0.0, -3.0])  # log1p: 1, 0; a negative vote counts as none
    # z = -1 + 2 log1p(votes) + margin of log1p(votes) within the query (A: +1, -1; B alone: 0)
    expected_z = np.array([-1 + 2 + 1, -1 + 0 - 1, -1 + 0 + 0])
    np.testing.assert_allclose(cal.apply(np.zeros(3), np.zeros(3), q, votes=votes), 1 / (1 + np.exp(-expected_z)))
    assert cal.needs_votes and cal.fuses and not cal.needs_inliers and not Calibration().needs_votes
    with pytest.raises(ValueError, match="token-recall votes"):
        cal.apply(np.zeros(3), np.zeros(3), q)
    q, _, sim, labels = synthetic()
    rng = np.random.default_rng(3)
    logit = rng.normal(0, 1, len(labels))  # an uninformative pair model: the votes must carry it
    votes = np.where(labels, rng.uniform(2, 30, len(labels)), rng.uniform(0, 3, len(labels)))
    fitted = fit(logit, sim, labels, query_ids=q, votes=votes)
    assert fitted.w_votes > 0 and fit(logit, sim, labels, query_ids=q).w_votes == 0.0
    ap = lambda s: micro_average_precision(s, labels, int(labels.sum()))  # noqa: E731
    assert ap(cross_fit(q, logit, sim, labels, votes=votes)) > ap(cross_fit(q, logit, sim, labels)) + 0.02
    assert "token votes" in calibration.separability(logit, sim, labels, votes=votes)


def test_settings_that_drop_a_feature_the_calibration_weighs_are_refused():
    from pair_vit.match.rerank import check_calibration

    check_calibration(Calibration(w_votes=1.0, w_inliers=1.0), "sift", 3)
    with pytest.raises(ValueError, match="token-recall votes"):
        check_calibration(Calibration(w_votes=1.0), "sift", 0)
    with pytest.raises(ValueError, match="SIFT verification"):
        check_calibration(Calibration(w_inliers=1.0), "none", 3)
