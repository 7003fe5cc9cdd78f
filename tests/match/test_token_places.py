import numpy as np

from pair_vit.match import token_places as tp

GRID = (10, 10)


def test_query_places_centres_each_scale_row_major():
    xy = tp.query_places((1, 2), GRID)
    assert xy.shape == (100 + 400, 2)
    np.testing.assert_allclose(xy[0], [0.05, 0.05])
    np.testing.assert_allclose(xy[1], [0.15, 0.05])  # x moves first
    np.testing.assert_allclose(xy[10], [0.05, 0.15])
    np.testing.assert_allclose(xy[100], [0.025, 0.025])
    np.testing.assert_allclose(xy[-1], [0.975, 0.975])


def _one_neighbour(owner_place: list[tuple[int, int, float]]):
    """(Nq, 1) similarity, owner, place, valid for query tokens that each found one reference token."""
    sim = np.array([[s] for _, _, s in owner_place], np.float32)
    owner = np.array([[o] for o, _, _ in owner_place], np.int64)
    place = np.array([[p] for _, p, _ in owner_place], np.int64)
    return sim, owner, place, np.ones_like(sim, bool)


def test_a_pasted_copy_outvotes_a_scattered_look_alike():
    # query: 2 x 2 tokens of the 20 x 20 reading (scale 2) hold reference 0's top-left 4 tokens at half size,
    # placed at (0.5, 0.5); four other query tokens match reference 1's tokens in a scrambled layout
    xy = tp.query_places((2,), GRID)
    copy_tokens = [10 * 20 + 10, 10 * 20 + 12, 12 * 20 + 10, 12 * 20 + 12]  # query cells (10, 10), (10, 12), ...
    ref_spots = [0, 1, 10, 11]  # reference cells (0, 0), (0, 1), (1, 0), (1, 1): every 2nd query cell at size 0.5
    stray_tokens, stray_spots = [0, 19, 380, 399], [55, 3, 97, 40]
    rows = [(0, p, 0.9) for p in ref_spots] + [(1, p, 0.9) for p in stray_spots]
    sim, owner, place, valid = _one_neighbour(rows)
    tokens = np.array(copy_tokens + stray_tokens)
    votes = tp.placed_votes(sim, owner, place, valid, xy[tokens], GRID, n_refs=3, floor=0.5)
    np.testing.assert_allclose(votes[0], 4 * 0.4, rtol=1e-5)  # all four agree on one placement
    assert votes[1] < 0.4 * 2 + 1e-6  # scattered: at most two of its four land in one cell
    assert votes[2] == 0
    # the copy's tokens are as far apart in the query as in the reference (size 1): in fine cells, that size alone
    # still gathers all four votes; at a size far from it, each vote lands in a cell of its own
    fine = {"n_refs": 3, "floor": 0.5, "cell": 0.05}
    right = tp.placed_votes(sim, owner, place, valid, xy[tokens], GRID, sizes=(1.0,), **fine)
    wrong = tp.placed_votes(sim, owner, place, valid, xy[tokens], GRID, sizes=(0.35,), **fine)
    np.testing.assert_allclose([right[0], wrong[0]], [4 * 0.4, 0.4], rtol=1e-5)


def test_no_vote_below_the_floor_or_for_padding():
    sim, owner, place, valid = _one_neighbour([(0, 0, 0.4), (0, 1, 0.9)])
    valid[1] = False
    votes = tp.placed_votes(sim, owner, place, valid, tp.query_places((1,), GRID)[:2], GRID, 2, floor=0.5)
    assert not votes.any()


def test_the_winning_placement_says_where_the_copy_sits():
    # reference 0 whole at half size in the query's top-right quarter: query cell (10 + x, y) of the 20 x 20
    # reading holds reference cell (x, y); reference 1 has no vote
    xy = tp.query_places((2,), GRID)
    pairs = [(y * 20 + 10 + x, y * 10 + x) for y in range(10) for x in range(10)]
    sim, owner, place, valid = _one_neighbour([(0, spot, 0.9) for _, spot in pairs])
    boxes = np.full((2, 4), -1.0, np.float32)
    votes = tp.placed_votes(sim, owner, place, valid, xy[[q for q, _ in pairs]], GRID, 2, floor=0.5, boxes=boxes)
    assert votes[0] > 0 and votes[1] == 0
    # the box: size 0.5 (of 1, 0.7, 0.5, 0.35) at offset (0.5, 0), within half a cell (0.075) of the truth
    np.testing.assert_allclose(boxes[0], [0.5, 0.0, 1.0, 0.5], atol=tp.CELL / 2 + 1e-6)
    assert (boxes[1] == -1).all()  # unvoted: left as it was
