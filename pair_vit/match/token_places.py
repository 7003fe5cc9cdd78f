"""Token votes that must agree on where the reference sits in the query (a Hough vote over placement and size).

    xy = query_places(scales, grid)                        # (Nq, 2) centre of each query token, in [0, 1]
    votes = placed_votes(sim, owner, place, valid, xy, grid, n_refs, floor)   # (n_refs,) higher = more of it found

Plain token votes (`token_recall.token_votes`) add up every query token that finds a reference's token, wherever the
two sit: a look-alike with the same sky, foliage or UI chrome gathers votes from all over the query. A copy pasted
into a query (a collage cell, a photo in a screenshot) keeps its layout: query place = size * reference place +
offset, one size and offset for all its tokens. Here each matched (query token, reference token) pair proposes the
offsets under a few sizes (the copy's share of the query's width and of its height, separately, since both images
are read squashed to the pair model's half size); a reference's score is the largest sum of votes that falls into
one (size, offset) cell, each query token counted once per cell. Cells are `cell` wide, and a second grid shifted
by half a cell catches placements on a border.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# the copy's width (and, separately, height) as a share of the query's: whole query down to a 3 x 3 collage cell
SIZES = (1.0, 0.7, 0.5, 0.35)
CELL = 0.15  # offset cell width, as a share of the query's side (a 160 px token is 0.1)


def query_places(scales: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """(Nq, 2) x, y centres in [0, 1] of a query's tokens read at each of `scales` x the (Gh, Gw) grid, in the order
    `token_readings.rows_of` concatenates them (scale by scale, row-major)."""
    out = []
    for s in scales:
        gh, gw = int(grid[0]) * s, int(grid[1]) * s
        y, x = np.mgrid[0:gh, 0:gw]
        out.append(np.stack([(x.ravel() + 0.5) / gw, (y.ravel() + 0.5) / gh], axis=1))
    return np.concatenate(out).astype(np.float32)


def placed_votes(similarity: np.ndarray, owner: np.ndarray, place: np.ndarray, valid: np.ndarray,
                 query_xy: np.ndarray, grid: Sequence[int], n_refs: int, floor: float,
                 sizes: Sequence[float] = SIZES, cell: float = CELL, boxes: np.ndarray | None = None) -> np.ndarray:
    """One query's placed votes.

    similarity, owner, place, valid: (Nq, k) of each query token's neighbours (cosine similarity, the reference that
    owns them, their row-major position in that reference's (Gh, Gw) `grid`, False for padding); query_xy (Nq, 2)
    (`query_places`) -> (n_refs,) float32: per reference, the largest sum of max(0, similarity - floor) over query
    tokens whose matches agree on one (width share, height share, offset) placement (0: no vote).
    `boxes`: an (n_refs, 4) float32 array to fill with where each voted reference sits in the query, as the winning
    placement's (left, top, right, bottom) in fractions of the query, clipped to it (rows of unvoted references
    are left as they are)."""
    weight = np.where(valid, np.maximum(similarity - floor, 0), 0).astype(np.float32)
    token, column = np.nonzero(weight > 0)
    out = np.zeros(n_refs, np.float32)
    if not len(token):
        return out
    w, ref, spot = weight[token, column], owner[token, column].astype(np.int64), place[token, column]
    gh, gw = int(grid[0]), int(grid[1])
    rx, ry = (spot % gw + 0.5) / gw, (spot // gw + 0.5) / gh
    qx, qy = query_xy[token, 0], query_xy[token, 1]
    side = int(np.ceil(2 / cell)) + 2  # offset cells per axis: offsets lie in (-1, 1)
    n_tokens = len(query_xy)
    for sx in sizes:
        bx = [np.floor((qx - sx * rx + 1) / cell + shift).astype(np.int64) for shift in (0.0, 0.5)]
        for sy in sizes:
            for shift, cx in zip((0.0, 0.5), bx):
                cy = np.floor((qy - sy * ry + 1) / cell + shift).astype(np.int64)
                bin_ = ref * side * side + cx * side + cy  # one (reference, offset cell) for this size
                best_per_token = max_per_key(bin_ * n_tokens + token, w)
                sums = _sum_per_key(best_per_token[0] // n_tokens, best_per_token[1])
                if boxes is not None:
                    _record_boxes(boxes, out, sums, side, (sx, sy), shift, cell)
                np.maximum.at(out, sums[0] // (side * side), sums[1])
    return out


def _record_boxes(boxes: np.ndarray, out: np.ndarray, sums: tuple[np.ndarray, np.ndarray], side: int,
                  size: tuple[float, float], shift: float, cell: float) -> None:
    """Write into `boxes` the placement of every reference whose best cell in `sums` (keys: reference * side^2 +
    x cell * side + y cell, values: vote sums) beats its best so far in `out` (called before `out` takes them)."""
    keys, values = sums
    ref = keys // (side * side)
    order = np.lexsort((values, ref))  # by reference, then vote sum: each reference's best cell comes last
    last = order[np.r_[ref[order][1:] != ref[order][:-1], True]]
    won = last[values[last] > out[ref[last]]]
    if not len(won):
        return
    cx, cy = (keys[won] % (side * side)) // side, keys[won] % side
    # a cell holds offsets in [(c - shift) * cell - 1, (c + 1 - shift) * cell - 1): the box starts mid-cell
    left = (cx - shift + 0.5) * cell - 1
    top = (cy - shift + 0.5) * cell - 1
    box = np.stack([left, top, left + size[0], top + size[1]], axis=1)
    boxes[ref[won]] = np.clip(box, 0.0, 1.0)


def max_per_key(key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, their largest value) for each distinct key."""
    keys, slot = np.unique(key, return_inverse=True)
    best = np.zeros(len(keys), np.float32)
    np.maximum.at(best, slot.ravel(), value)
    return keys, best


def _sum_per_key(key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, the sum of their values) for each distinct key."""
    keys, slot = np.unique(key, return_inverse=True)
    return keys, np.bincount(slot.ravel(), value, minlength=len(keys)).astype(np.float32)
