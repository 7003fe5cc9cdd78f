"""Descriptor views where the token votes place a copy (token_recall.with_views and vote_shortlist's reading of
the boxes; the crops themselves, descriptor.views.embed_boxes: tests/match/test_index.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pair_vit.match import token_recall as tr


def test_with_views_keeps_each_pairs_best_score_and_the_depth():
    deep = pd.DataFrame({"query_id": ["q", "q", "p", "p"], "reference_id": ["a", "b", "a", "c"],
                         "score": np.array([0.9, 0.5, 0.8, 0.7], np.float32)})
    extra = pd.DataFrame({"query_id": ["q", "q", "x"], "reference_id": ["c", "b", "a"],
                          "score": np.array([0.6, 0.4, 0.99], np.float32)})
    out = tr.with_views(deep, extra)
    # q: c (0.6) enters between a and b; b, now third, falls out of the depth of 2 the lists had
    assert out.values.tolist() == [["q", "a", pytest.approx(0.9)], ["q", "c", pytest.approx(0.6)],
                                   ["p", "a", pytest.approx(0.8)], ["p", "c", pytest.approx(0.7)]]
    assert out.score.dtype == np.float32  # a query the descriptor did not list (x) is not added
    assert tr.with_views(deep, extra.iloc[:0]) is deep


def test_vote_shortlist_reads_the_boxes_its_votes_place():
    # one reference token per 1 x 1 grid; the query's single token matches r0 (at 160 px and, scale 2, 4 more)
    tokens = np.zeros((3, 2, 1, 1), np.float32)
    tokens[:, :, 0, 0] = [[1, 0], [0, 1], [1, 1]]
    index = tr.TokenIndex.build(["r0", "r1", "r2"], tokens, "Flat")
    rows = {"q": np.tile(tr.unit_rows(tokens[[0]])[0], (5, 1))}
    deep = pd.DataFrame({"query_id": ["q", "q"], "reference_id": ["r1", "r2"],
                         "score": np.array([0.9, 0.8], np.float32)})
    seen = {}

    def read_views(boxes):
        seen.update(boxes)
        return pd.DataFrame({"query_id": ["q"], "reference_id": ["r0"], "score": np.array([0.95], np.float32)})

    settings = tr.TokenRecallSettings(candidates=1, neighbours=1, views=2)
    out = tr.vote_shortlist(index, deep, rows, 2, settings, read_views)
    assert list(seen) == ["q"] and seen["q"].shape == (1, 4)  # one voted reference: one box
    assert ((seen["q"] >= 0) & (seen["q"] <= 1)).all()
    # r0's view puts it first on the descriptor's own list (0.95), so it keeps that similarity
    assert out.reference_id.tolist() == ["r0", "r1"] and out.score.tolist()[0] == pytest.approx(0.95)
    # views off: the reader is not called
    seen.clear()
    tr.vote_shortlist(index, deep, rows, 2, tr.TokenRecallSettings(candidates=1, neighbours=1, views=0), read_views)
    assert not seen
