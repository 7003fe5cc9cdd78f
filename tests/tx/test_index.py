"""PairVitIndex (pair_vit/tx/index.py): threshold / top-k queries, views, pickling as HMA does, other weights."""
from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest

from pair_vit.tx import codec, hasher
from pair_vit.tx.index import PairVitIndex, merged_similarity

from .conftest import near, other_weights, signals


def answers(index: PairVitIndex, queries: list[str]) -> list:
    """Every kind of answer of `index`, as plain values."""
    def plain(matches):
        return [(m.metadata, round(m.similarity_info.distance, 5)) for m in matches]

    return [(plain(index.query(q)), plain(index.query_top_k(q, 3)), plain(index.query_threshold(q, 0.5)))
            for q in queries]


def test_empty_index_builds_and_answers_nothing(settings):
    index = PairVitIndex.build([])
    assert len(index) == 0 and index.memory_bytes() == 0
    q = signals(1)[0]
    assert index.query(q) == [] and index.query_top_k(q, 5) == [] and index.query_threshold(q, 2.0) == []


def test_threshold_and_top_k_queries(settings):
    refs = signals(50)
    index = PairVitIndex.build([(s, f"r{i}") for i, s in enumerate(refs)] + [(refs[3], "r3-again")])
    assert len(index) == 50 and index.threshold == pytest.approx(0.2)
    close, far = near(refs[3], 0.9), near(refs[3], 0.7)
    # the duplicate signal is stored once and both entries come back, at distance 1 - 0.9
    found = index.query(close)
    assert [m.metadata for m in found] == ["r3", "r3-again"]
    assert found[0].similarity_info.distance == pytest.approx(0.1, abs=2e-3)
    assert found[0].similarity_info.pretty_str() == f"{found[0].similarity_info.distance:.4f}"
    assert index.query(far) == []  # distance 0.3 > 0.2
    assert [m.metadata for m in index.query_threshold(far, 0.35)] == ["r3", "r3-again"]
    top = index.query_top_k(far, 3)
    assert [m.metadata for m in top[:2]] == ["r3", "r3-again"] and len({m.metadata for m in top}) == 4
    distances = [m.similarity_info.distance for m in top]
    assert distances == sorted(distances) and distances[-1] > 0.8  # random vectors are far apart
    assert PairVitIndex(threshold=0.5).threshold == 0.5


def test_views_are_merged_with_their_penalties(settings):
    with hasher.use(dataclasses.replace(settings, views="halves")):
        two = signals(2, views=5, seed=3)
        index = PairVitIndex.build([(two[0], "a"), (two[1], "b")])
        q = codec.decode(two[0], settings.fingerprint, 256)
        # a query that shows only the reference's left half: its whole image equals the reference's view 1
        extra = codec.decode(signals(1, 4, seed=9)[0], settings.fingerprint, 256)
        query = codec.encode(np.stack([q[1], *extra]), settings.fingerprint)
        expected = 1.0 - merged_similarity(q, codec.decode(query, settings.fingerprint, 256))
        assert expected == pytest.approx(0.1, abs=2e-3)  # the reference sub-view penalty
        top = index.query_top_k(query, 1)
        assert top[0].metadata == "a" and top[0].similarity_info.distance == pytest.approx(expected, abs=1e-4)
        assert index.memory_bytes() == 2 * 5 * (512 + 12)
    with pytest.raises(codec.SignalError, match="signal of 5 views, but this signal type packs the 'full' views"):
        index.query(query)


def test_pickled_index_gives_the_same_answers(settings):
    refs = signals(30)
    index = PairVitIndex.build([(s, f"r{i}") for i, s in enumerate(refs)])
    queries = [near(refs[i], c) for i, c in [(1, 0.95), (2, 0.75), (4, 0.5)]] + signals(2, seed=5)
    blob = io.BytesIO()
    index.serialize(blob)  # what HMA stores: pickle of the index
    blob.seek(0)
    again = PairVitIndex.deserialize(blob)
    assert answers(again, queries) == answers(index, queries)
    again.add(refs[1], "added")  # and it stays usable
    assert [m.metadata for m in again.query(queries[0])] == ["r1", "added"]
    index.dispose()


def test_index_pickled_with_other_weights_is_refused(settings):
    blob = pickle.dumps(PairVitIndex.build([(s, i) for i, s in enumerate(signals(3))]))
    with hasher.use(other_weights(settings)):
        with pytest.raises(ValueError, match="other descriptor weights"):
            pickle.loads(blob)


def test_invalid_signal_is_refused_before_anything_is_added(settings):
    index = PairVitIndex.build([(signals(1)[0], "a")])
    with pytest.raises(codec.SignalError, match="truncated"):
        index.add_all([(signals(1, seed=2)[0], "b"), (signals(1, seed=3)[0][:-8], "c")])
    assert len(index) == 1
    with pytest.raises(codec.SignalError, match="other descriptor weights"):
        index.query(signals(1, fingerprint="fedcba9876543210")[0])
