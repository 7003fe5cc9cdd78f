"""The token recall path (pair_vit.match.token_recall): votes and merges on hand-computed cases, an index of real
tokens finding a small copy, and rerank.py using it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pair_vit.match import token_readings
from pair_vit.match import token_recall as tr


def test_token_votes_count_each_query_token_once_per_reference():
    # 2 query tokens, 3 neighbours each: (similarity, owner)
    similarity = np.array([[0.9, 0.8, 0.4], [0.7, 0.6, 0.55]], np.float32)
    owner = np.array([[0, 0, 1], [1, 2, 0]])
    valid = np.array([[True, True, True], [True, True, False]])
    votes = tr.token_votes(similarity, owner, valid, 3, floor=0.5)
    # token 0: ref 0 best 0.9 -> 0.4 (its second token there does not vote again), ref 1 0.4 < floor -> 0
    # token 1: ref 1 0.7 -> 0.2, ref 2 0.6 -> 0.1, ref 0's neighbour is padding
    np.testing.assert_allclose(votes, [0.4, 0.2, 0.1], atol=1e-6)


def test_merge_votes_gives_the_last_places_to_voted_references():
    deep = pd.DataFrame({"query_id": ["q"] * 5 + ["p"] * 2, "reference_id": ["a", "b", "c", "d", "e", "a", "b"],
                         "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 0.1]})
    voted = pd.DataFrame({"query_id": ["q", "q", "q"], "reference_id": ["a", "z", "d"], "votes": [9.0, 5.0, 1.0]})
    merged = tr.merge_votes(deep, voted, k=4, candidates=2)
    q = merged[merged.query_id == "q"]
    # 2 descriptor places (a, b), then voted z (not listed: the lowest listed similarity) and d (a is already in)
    assert q.reference_id.tolist() == ["a", "b", "z", "d"] and q.score.tolist() == [0.9, 0.8, 0.5, 0.6]
    # the descriptor keeps at least half the places: k=3 gives one to a vote
    assert tr.merge_votes(deep, voted, k=3, candidates=2).reference_id.tolist()[:3] == ["a", "b", "z"]
    p = merged[merged.query_id == "p"]  # no votes: the descriptor's order fills the places
    assert p.reference_id.tolist() == ["a", "b"]
    assert tr.merge_votes(deep, voted.iloc[:0], k=3, candidates=2).groupby("query_id").size().to_dict() == \
        {"p": 2, "q": 3}


def test_vote_shortlist_gives_every_candidate_its_votes():
    tokens = np.zeros((3, 2, 1, 1), np.float32)
    tokens[:, :, 0, 0] = [[1, 0], [0, 1], [1, 1]]  # r2 half-way between r0 and r1
    index = tr.TokenIndex.build(["r0", "r1", "r2"], tokens, "Flat")
    deep = pd.DataFrame({"query_id": ["q"] * 2 + ["u"], "reference_id": ["r1", "r2", "r1"],
                         "score": np.array([0.9, 0.8, 0.7], np.float32)})
    rows = {"q": tr.unit_rows(tokens[[0]])[0]}  # one token, identical to r0's; "u" has no tokens (unreadable)
    settings = tr.TokenRecallSettings(candidates=1, neighbours=3, geometry=False)
    out = tr.vote_shortlist(index, deep, rows, k=2, settings=settings)
    # q: r1 keeps the descriptor's place, r0 is voted in (1 - 0.5) at the lowest listed similarity; r1 is
    # orthogonal (no vote), r2 at cos 0.707 votes 0.207 but is out of the k=2 places
    assert out.values.tolist() == [["q", "r1", pytest.approx(0.9), 0.0], ["q", "r0", pytest.approx(0.8), 0.5],
                                   ["u", "r1", pytest.approx(0.7), 0.0]]


def test_top_votes_drops_references_without_votes():
    votes = np.array([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    top = tr.top_votes(["q", "p"], votes, ["a", "b", "c"], 5)
    assert top.values.tolist() == [["q", "b", 2.0], ["q", "c", 1.0]]


def test_top_votes_breaks_ties_by_reference_order():
    # a partial sort picks the best 2 of 5: of three tied at 2.0 the first two, as a full stable sort would
    votes = np.array([[1.0, 2.0, 0.0, 2.0, 2.0]], np.float32)
    assert tr.top_votes(["q"], votes, list("abcde"), 2).reference_id.tolist() == ["b", "d"]
    assert tr.top_votes(["q"], votes, list("abcde"), 9).reference_id.tolist() == ["b", "d", "e", "a"]


def test_an_index_knows_each_references_column_after_adding():
    tokens = np.ones((2, 2, 1, 1), np.float32)
    index = tr.TokenIndex.build(["r0", "r1"], tokens, "Flat")
    index.add(["r2"], tokens[:1])
    assert index.position == {"r0": 0, "r1": 1, "r2": 2}
    votes = np.array([[0.0, 0.0, 3.0]], np.float32)
    deep = pd.DataFrame({"query_id": ["q"], "reference_id": ["r1"], "score": np.array([0.9], np.float32)})
    out = tr.voted_shortlist(deep, ["q"], votes, index.ids, 2, 1, index.position)
    assert out.reference_id.tolist() == ["r1", "r2"] and out.votes.tolist() == [0.0, 3.0]


def test_a_small_copy_is_voted_for(tmp_path):
    """A reference pasted small into a collage of other photos: its tokens vote it first among look-alikes."""
    from PIL import Image

    import pair_vit
    from pair_vit import data
    from pair_vit.match import rerank
    from pair_vit.match.config import RerankConfig

    demo = sorted(data.list_images(Path(str(pair_vit.demo_dir())) / "skimage").values())
    refs = {p.stem: p for p in demo}
    target = refs["chelsea"] if "chelsea" in refs else demo[0]
    canvas = Image.new("RGB", (480, 480), "white")
    others = [p for p in demo if p != target][:3]
    for i, p in enumerate([target, *others]):
        canvas.paste(Image.open(p).convert("RGB").resize((240, 240)), ((i % 2) * 240, (i // 2) * 240))
    canvas.save(tmp_path / "collage.jpg")
    model = rerank.load_pair(RerankConfig())[0].eval()
    report = data.SkipReport()
    ids, tokens = token_readings.reference_tokens(model, refs, report)
    assert tokens.dtype == np.float16 and tokens.shape[1:] == (112, 10, 10)
    index = tr.TokenIndex.build(ids, tokens, fingerprint="shipped")
    rows = token_readings.query_rows(model, {"collage": tmp_path / "collage.jpg"}, (1, 2), report)
    assert rows["collage"].shape == (100 + 400, 112)
    votes = index.vote(list(rows.values()), tr.TokenRecallSettings(geometry=False))
    top4 = {ids[j] for j in np.argsort(-votes[0])[:4]}
    assert top4 == {p.stem for p in [target, *others]}  # the four pasted photos, none of the other demo photos
    index.save(tmp_path / "tokens")
    again = tr.TokenIndex.load(tmp_path / "tokens", expected_fingerprint="shipped")
    with pytest.raises(ValueError, match="build it again"):
        tr.TokenIndex.load(tmp_path / "tokens", expected_fingerprint="other weights")
    np.testing.assert_array_equal(again.vote(list(rows.values()), tr.TokenRecallSettings(geometry=False)), votes)
    assert again.grid == (10, 10)
    placed = again.vote(list(rows.values()), tr.TokenRecallSettings(geometry=True))  # each cell a placement
    assert {ids[j] for j in np.argsort(-placed[0])[:4]} == top4 and (placed <= votes + 1e-6).all()
    # and each of the four is placed in its own quarter of the collage (placed_views crops the query there)
    boxes: list = []
    again.vote(list(rows.values()), tr.TokenRecallSettings(views=4), boxes)
    cell = {p.stem: ((i % 2) * 0.5, (i // 2) * 0.5) for i, p in enumerate([target, *others])}
    for j, box in zip(np.argsort(-placed[0], kind="stable")[:4], boxes[0]):
        left, top = cell[ids[j]]
        np.testing.assert_allclose(box, [left, top, left + 0.5, top + 0.5], atol=0.1, err_msg=ids[j])


def test_neighbours_give_each_match_its_place_in_its_reference():
    tokens = np.random.default_rng(2).normal(size=(3, 8, 2, 3)).astype(np.float32)
    index = tr.TokenIndex.build(["a", "b", "c"], tokens, "Flat")
    sim, owner, valid, place = index.neighbours([tr.unit_rows(tokens[[1]])[0]], 1)[0]  # b's 6 tokens, row-major
    assert owner[:, 0].tolist() == [1] * 6 and place[:, 0].tolist() == list(range(6)) and valid.all()
    with pytest.raises(ValueError, match="grid"):
        index.add(["d"], tokens[:1, :, :1])
    with pytest.raises(ValueError, match="scales"):  # 6 tokens are not a query read at 1x and 2x the grid (30)
        index.vote([tr.unit_rows(tokens[[1]])[0]], tr.TokenRecallSettings(geometry=True))
    saved_before = tr.TokenIndex(index.index, index.ids, index.owner)  # an index saved before it kept its grid
    with pytest.raises(ValueError, match="build it again"):
        saved_before.vote([tr.unit_rows(tokens[[1]])[0]], tr.TokenRecallSettings(geometry=True))


def test_auto_factory_and_an_index_grown_by_add_votes_as_one_built_at_once():
    assert tr.auto_factory(1000) == "Flat" and tr.auto_factory(1_000_000) == "IVF4000,Flat"
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(12, 8, 2, 3)).astype(np.float16)
    ids = [f"r{i}" for i in range(12)]
    queries = [tr.unit_rows(tokens[[3]] + rng.normal(scale=0.1, size=(1, 8, 2, 3)))[0]]
    whole = tr.TokenIndex.build(ids, tokens, "Flat")
    grown = tr.index_from(ids, lambda part: tokens[[ids.index(i) for i in part]], "Flat", chunk=5)
    grown.add(["extra"], tokens[[0]])
    settings = tr.TokenRecallSettings(neighbours=2, floor=0.0, geometry=False)
    np.testing.assert_allclose(grown.vote(queries, settings)[:, :12], whole.vote(queries, settings), atol=1e-6)
    assert np.argmax(whole.vote(queries, settings)[0]) == 3 and grown.ids[-1] == "extra"
    ivf = tr.TokenIndex.build(ids, tokens, "IVF2,Flat")  # every list visited (settings.nprobe 8): the exact votes
    np.testing.assert_allclose(ivf.vote(queries, settings), whole.vote(queries, settings), atol=1e-5)


def test_nprobe_is_the_settings_at_each_vote():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(40, 8, 2, 2)).astype(np.float32)
    ids = [f"r{i}" for i in range(40)]
    index = tr.TokenIndex.build(ids, tokens, "IVF8,Flat")
    queries = [tr.unit_rows(tokens[[i]] + rng.normal(scale=0.3, size=(1, 8, 2, 2)))[0] for i in range(6)]
    exact = tr.TokenIndex.build(ids, tokens, "Flat").vote(queries, tr.TokenRecallSettings(floor=0.0, geometry=False))
    every = index.vote(queries, tr.TokenRecallSettings(floor=0.0, nprobe=8, geometry=False))
    np.testing.assert_allclose(every, exact, atol=1e-5)  # every list visited: exact
    one = index.vote(queries, tr.TokenRecallSettings(floor=0.0, nprobe=1, geometry=False))
    assert not np.allclose(one, exact)  # one list of eight: some neighbours missed
    assert faiss_nprobe(index) == 1


def faiss_nprobe(index: tr.TokenIndex) -> int:
    import faiss

    return faiss.extract_index_ivf(index.index).nprobe


def test_spread_divides_a_token_s_votes_by_the_references_it_votes_for():
    similarity = np.array([[0.9, 0.8, 0.7], [0.9, 0.2, 0.1]], np.float32)
    owner = np.array([[0, 1, 2], [1, 0, 2]])
    valid = np.ones((2, 3), bool)
    # token 0 votes for 3 references (0.4, 0.3, 0.2), token 1 for one (ref 1: 0.4)
    np.testing.assert_allclose(tr.token_votes(similarity, owner, valid, 3, 0.5), [0.4, 0.7, 0.2], atol=1e-6)
    np.testing.assert_allclose(tr.token_votes(similarity, owner, valid, 3, 0.5, spread=1.0),
                               [0.4 / 3, 0.3 / 3 + 0.4, 0.2 / 3], atol=1e-6)


def test_weak_votes_can_leave_the_descriptor_its_places():
    votes = np.array([[0.0, 0.5, 3.0, 0.0]], np.float32)
    deep = pd.DataFrame({"query_id": ["q"] * 3, "reference_id": ["r0", "r3", "r1"],
                         "score": np.array([0.9, 0.8, 0.7], np.float32)})
    refs = ["r0", "r1", "r2", "r3"]
    # one voted place (of k=3, the descriptor keeps at least half): r2 (3.0) takes it from the descriptor's r1
    assert tr.voted_shortlist(deep, ["q"], votes, refs, 3, 2).reference_id.tolist() == ["r0", "r3", "r2"]
    assert tr.voted_shortlist(deep, ["q"], votes, refs, 3, 2, min_votes=1.0).reference_id.tolist() == ["r0", "r3", "r2"]
    # a floor of 4: no vote is strong enough, and the descriptor keeps its own third
    assert tr.voted_shortlist(deep, ["q"], votes, refs, 3, 2, min_votes=4.0).reference_id.tolist() == ["r0", "r3", "r1"]
