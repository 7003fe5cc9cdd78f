"""A second recall path for copies that fill a small part of the query: the query's local tokens vote for references.

    index = TokenIndex.build(ref_ids, ref_tokens)            # (N, C, Gh, Gw) trunk tokens of the pair ViT, per reference
    votes = index.vote(query_tokens, settings)               # [(Nq, C) tokens of each query] -> (Q, R) vote scores
    shortlist = merge_votes(deep, top_votes, k, settings.candidates)   # the descriptor's k, some voted in

The global descriptor sees a collage cell, a photo inside a screenshot or a paste as a small part of one image, and
misses it when the rest of the query dominates the vector: on dev, every shortlist miss is such a copy. The pair
ViT's trunk (frozen ImageNet EfficientNet-Lite0 at stride 16) describes each 16 x 16 patch on its own, and the
localize stage already matches those tokens (`pair_vit.pair.localize`). Here, as ASMK / HOW-style local retrieval
does, every token of the query (read at the pair model's half size and at `scales` x it: 10 x 10 and 20 x 20
tokens at 160 px) looks up its `neighbours` nearest reference tokens (cosine, a faiss index over all references'
tokens); each neighbour above `floor` votes `similarity - floor` for its reference, a query token at most once per
reference (its best token there). With `geometry` (the default), a reference counts only the votes of query
tokens whose matches agree on one placement of it in the query (`pair_vit.match.token_places`), so a look-alike
whose sky or foliage matches all over the query gathers less. The references with the most votes that the
descriptor did not shortlist take the last `candidates` places of the k-candidate shortlist. Before they do, with
`views`, the descriptor reads the query cropped where its best-voted references sit (`vote_shortlist`'s
`read_views`, `pair_vit.match.placed_views`; merged by `with_views`). The query's and the references' tokens come
from `pair_vit.match.token_readings`.

Memory: C floats per reference token (Lite0: 112 x 10 x 10 tokens per reference at 160 px, 44.8 KB float32 in a
Flat index); `factory="IVF{n},SQ8"` (112 bytes + an 8-byte id per token, 12 KB per reference) kept the same recall
at 3,700 references; a PQ factory (`IVF4096,PQ16`: 2.4 KB per reference) was not measured. Settings and
measurements: docs/results.md#token-recall.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.match.token_places import CELL, SIZES, max_per_key

META_FILE = "token_index.json"
FLAT_ROWS = 250_000  # "auto": an exact (Flat) index up to this many reference tokens (2,500 references at 160 px)
TRAIN_PER_LIST = 64  # "auto" IVF: training tokens per inverted list
# inverted lists an IVF token index visits per query token; 8 found the same shortlists as 16 and as an exact index
# at 3,700 references (docs/results.md#token-recall-at-scale) for about half the search time
NPROBE = 8


def auto_factory(rows: int) -> str:
    """The faiss factory "auto" picks for `rows` reference tokens: exact up to FLAT_ROWS, then an inverted file of
    4 sqrt(rows) lists (4,000 at a million tokens), searched in NPROBE lists (costs: docs/results.md#token-recall)."""
    return "Flat" if rows <= FLAT_ROWS else f"IVF{int(4 * np.sqrt(rows))},Flat"


@dataclass(frozen=True)
class TokenRecallSettings:
    """How query tokens vote (`vote`) and how many voted references join the shortlist (`merge_votes`)."""

    candidates: int = 5  # places of the k-candidate shortlist given to voted references (0: the path is off)
    neighbours: int = 3  # reference tokens each query token looks up
    floor: float = 0.5  # a neighbour votes (similarity - floor) if its cosine similarity is above this
    scales: tuple[int, ...] = (1, 2)  # the query is read at these multiples of the pair model's half size
    factory: str = "auto"  # faiss index of reference tokens (inner product on unit vectors): see auto_factory
    nprobe: int = NPROBE  # inverted lists an IVF index visits per query token (set at each vote)
    spread: float = 0.0  # a token's votes are divided by (references it votes for) ** spread (0: plain sums)
    # the query also votes as its mirror image, each reference keeping the better of the two: read by the sweep only
    # (scripts/sweep_token_recall.py --mirrors; no gain on tune), not by rerank.py or CopyDetector
    mirror: bool = False
    geometry: bool = True  # only votes that agree on one placement of the reference in the query add up (token_places)
    sizes: tuple[float, ...] = SIZES  # geometry: the copy's shares of the query's width (and height) tried
    cell: float = CELL  # geometry: offset cell width, as a share of the query's side
    # geometry: the descriptor also reads the query cropped where its `views` best-voted references sit (a
    # proposal of where a copy is), those views joining its list before the votes are merged (`vote_shortlist`)
    views: int = 2
    # a voted reference takes one of the `candidates` places only with at least this vote score, so weak votes leave
    # the descriptor its own candidates: read by the sweep only (scripts/sweep_token_recall.py --min-votes)
    min_votes: float = 0.0


def settings_of(cfg) -> TokenRecallSettings:
    """The settings of a RerankConfig or DetectorConfig (its token_recall, token_factory, token_nprobe,
    token_geometry and token_views); the rest keep their defaults."""
    return TokenRecallSettings(candidates=cfg.token_recall, factory=cfg.token_factory, nprobe=cfg.token_nprobe,
                               geometry=cfg.token_geometry, views=cfg.token_views if cfg.token_geometry else 0)


class TokenIndex:
    """Unit-normalised reference tokens in a faiss index, each row owned by one reference."""

    def __init__(self, index, ids: list[str], owner: np.ndarray, fingerprint: str = "",
                 grid: Sequence[int] | None = None):
        self.index, self.ids, self.owner, self.fingerprint = index, list(ids), owner.astype(np.int64), fingerprint
        self.grid = tuple(int(g) for g in grid) if grid is not None else None  # (Gh, Gw) tokens of each reference
        # each reference's first row (its rows are contiguous): a neighbour's place in its grid is row - first
        self.first = np.searchsorted(self.owner, np.arange(len(self.ids)))
        self.position = {r: j for j, r in enumerate(self.ids)}  # reference id -> its column of `vote`'s scores

    @classmethod
    def build(cls, ids: Sequence[str], tokens: np.ndarray, factory: str = "auto", fingerprint: str = "",
              total_rows: int = 0) -> "TokenIndex":
        """ids (N,), tokens (N, C, Gh, Gw) of each reference (any float dtype) -> the index of N * Gh * Gw rows.
        factory "auto": `auto_factory(total_rows or N * Gh * Gw)`; an IVF index is trained on these tokens (at
        most TRAIN_PER_LIST per list, a seeded sample), so pass enough of them when more are `add`ed later. How
        many lists a search visits is the caller's at each search (`neighbours`, `TokenRecallSettings.nprobe`)."""
        import faiss

        flat = unit_rows(tokens).reshape(-1, tokens.shape[1])
        if factory == "auto":
            factory = auto_factory(total_rows or len(flat))
        index = faiss.index_factory(flat.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            lists = faiss.extract_index_ivf(index).nlist
            sample = np.random.default_rng(0).permutation(len(flat))[:TRAIN_PER_LIST * lists]
            index.train(flat[np.sort(sample)])
        out = cls(index, [], np.zeros(0, np.int64), fingerprint, tokens.shape[2:])
        out._add_rows(list(ids), flat, tokens.shape[2] * tokens.shape[3])
        return out

    def add(self, ids: Sequence[str], tokens: np.ndarray) -> None:
        """Add references: ids (N,), tokens (N, C, Gh, Gw)."""
        if len(ids) and self.grid is not None and tuple(tokens.shape[2:]) != self.grid:
            raise ValueError(f"tokens of a {tuple(tokens.shape[2:])} grid cannot join an index of {self.grid} grids")
        if len(ids):
            self._add_rows(list(ids), unit_rows(tokens).reshape(-1, tokens.shape[1]), tokens.shape[2] * tokens.shape[3])

    def _add_rows(self, ids: list[str], flat: np.ndarray, per_ref: int) -> None:
        self.first = np.concatenate([self.first, len(self.owner) + per_ref * np.arange(len(ids))])
        self.index.add(flat)
        self.owner = np.concatenate([self.owner, np.repeat(np.arange(len(self.ids), len(self.ids) + len(ids)), per_ref)])
        self.position.update((r, len(self.ids) + j) for j, r in enumerate(ids))
        self.ids += ids

    def __len__(self) -> int:
        return len(self.ids)

    def neighbours(self, query_tokens: list[np.ndarray], k: int, nprobe: int = NPROBE) -> list[tuple]:
        """query_tokens: per query, (Nq, C) unit tokens -> per query (similarity (Nq, k) float32, owner (Nq, k) int64:
        the reference of each neighbour, valid (Nq, k) bool: False for padding, place (Nq, k) int64: the neighbour's
        row-major position in its reference's grid), the k nearest reference tokens of every query token (an IVF
        index visits `nprobe` lists)."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = nprobe
        out = []
        for tokens in query_tokens:
            sim, rows = self.index.search(np.ascontiguousarray(tokens, np.float32), min(k, self.index.ntotal))
            owner = self.owner[np.maximum(rows, 0)]
            out.append((sim, owner, rows >= 0, np.maximum(rows, 0) - self.first[owner]))
        return out

    def vote(self, query_tokens: list[np.ndarray], settings: TokenRecallSettings,
             boxes: list | None = None) -> np.ndarray:
        """query_tokens: per query, (Nq, C) unit tokens (`unit_rows` of each scale, concatenated) -> (Q, N) float32
        vote scores (higher = more of the query found in that reference; 0: no vote). `boxes`: see `votes_of`."""
        found = self.neighbours(query_tokens, settings.neighbours, settings.nprobe)
        return votes_of(found, len(self.ids), settings, self.grid, boxes)

    def save(self, folder: str | Path) -> None:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "tokens.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        with atomic_path(folder / "owner.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, self.owner)
        write_text_atomic(folder / META_FILE, json.dumps({"ids": self.ids, "fingerprint": self.fingerprint,
                                                                 "grid": self.grid}))

    @classmethod
    def load(cls, folder: str | Path, expected_fingerprint: str | None = None) -> "TokenIndex":
        """The index saved in `folder`; a ValueError if it was built from another pair model's tokens than
        `expected_fingerprint` (the tokens of other weights do not match a query's)."""
        import faiss

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise ValueError(f"the token index in {folder} holds tokens of pair weights {meta['fingerprint']!r}, not "
                             f"{expected_fingerprint!r}: build it again from the references")
        return cls(faiss.read_index(str(folder / "tokens.faiss")), meta["ids"], np.load(folder / "owner.npy"),
                   meta["fingerprint"], meta.get("grid"))


def unit_rows(tokens) -> np.ndarray:
    """(N, C, Gh, Gw) tokens (numpy or torch, any float dtype) -> (N, Gh * Gw, C) float32 unit vectors."""
    array = np.asarray(tokens.float() if hasattr(tokens, "float") else tokens, np.float32)
    rows = array.reshape(array.shape[0], array.shape[1], -1).transpose(0, 2, 1)
    return np.ascontiguousarray(rows / np.maximum(np.linalg.norm(rows, axis=2, keepdims=True), 1e-12))


def votes_of(found: list[tuple], n_refs: int, settings: TokenRecallSettings,
             grid: Sequence[int] | None = None, boxes: list | None = None) -> np.ndarray:
    """`TokenIndex.neighbours` of Q queries -> (Q, n_refs) float32 votes (`token_votes` with the settings' floor and
    spread, over the first `settings.neighbours` neighbours; `token_places.placed_votes` if `settings.geometry`, which
    needs the references' token `grid` (Gh, Gw), the query's readings being `settings.scales` x that grid).
    `boxes` (geometry only): a list to append, per query, the (m, 4) float32 placements (left, top, right, bottom,
    fractions of the query) of its `settings.views` best-voted references, best first (m < views when fewer
    have votes)."""
    from pair_vit.match import token_places

    out = np.zeros((len(found), n_refs), np.float32)
    placed = np.zeros((n_refs, 4), np.float32) if boxes is not None and settings.geometry else None
    n = settings.neighbours
    if settings.geometry and grid is None:
        raise ValueError("geometry-checked votes need the references' token grid, which this token index was saved "
                         "without: build it again from the references (or vote with geometry=False)")
    xy = token_places.query_places(settings.scales, grid) if settings.geometry else None
    for q, (sim, owner, valid, place) in enumerate(found):
        if settings.geometry:
            if len(sim) != len(xy):
                raise ValueError(f"geometry-checked votes need each query read at scales {settings.scales} of the "
                                 f"{grid} grid ({len(xy)} tokens), not {len(sim)} tokens")
            out[q] = token_places.placed_votes(sim[:, :n], owner[:, :n], place[:, :n], valid[:, :n], xy, grid, n_refs,
                                               settings.floor, settings.sizes, settings.cell, placed)
            if placed is not None:
                best = [j for j in _best(out[q], settings.views) if out[q, j] > 0]
                boxes.append(placed[best].copy())
        else:
            out[q] = token_votes(sim[:, :n], owner[:, :n], valid[:, :n], n_refs, settings.floor, settings.spread)
    return out


def token_votes(similarity: np.ndarray, owner: np.ndarray, valid: np.ndarray, n_refs: int,
                floor: float, spread: float = 0.0) -> np.ndarray:
    """One query's votes: similarity, owner, valid (Nq, k) of each query token's neighbours (their cosine
    similarity, the reference that owns them, False for padding) -> (n_refs,) float32: per reference, the sum over
    query tokens of max(0, best similarity to that reference's tokens among the neighbours - floor), each token's
    votes divided by (the number of references it votes for) ** `spread` (a token that matches many references,
    such as flat sky or UI chrome, says little about any one of them: inter-image burstiness)."""
    weight = np.where(valid, np.maximum(similarity - floor, 0), 0).astype(np.float32).ravel()
    token = np.repeat(np.arange(similarity.shape[0], dtype=np.int64), similarity.shape[1])
    key = token * n_refs + owner.ravel().astype(np.int64)  # one (query token, reference) pair per key
    pairs, best = max_per_key(key, weight)  # a query token votes once per reference: its best neighbour there
    if spread:
        voter = pairs // n_refs
        counts = np.bincount(voter[best > 0], minlength=similarity.shape[0]).astype(np.float32)
        best = best / np.maximum(counts[voter], 1.0) ** np.float32(spread)
    out = np.zeros(n_refs, np.float32)
    np.add.at(out, pairs % n_refs, best)
    return out


def top_votes(query_ids: Sequence[str], votes: np.ndarray, ref_ids: Sequence[str], n: int) -> pd.DataFrame:
    """(Q, R) vote scores -> query_id, reference_id, votes: each query's n best-voted references with votes > 0
    (ties: the earlier reference first)."""
    rows = []
    for q, scores in zip(query_ids, votes):
        best = _best(scores, n)
        rows += [(q, ref_ids[j], float(scores[j])) for j in best if scores[j] > 0]
    return pd.DataFrame(rows, columns=["query_id", "reference_id", "votes"])


def _best(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest of (R,) scores, largest first, ties in position order: a partial sort, so a query
    costs O(R) and not O(R log R) against a large collection."""
    if n < len(scores):
        kth = np.partition(-scores, n - 1)[n - 1]
        head = np.flatnonzero(-scores <= kth)  # the n best and any ties with the n-th, in position order
    else:
        head = np.arange(len(scores))
    return head[np.argsort(-scores[head], kind="stable")][:n]


def merge_votes(deep: pd.DataFrame, voted: pd.DataFrame, k: int, candidates: int) -> pd.DataFrame:
    """The shortlist: per query, its k - n best references by descriptor similarity (`deep`: query_id,
    reference_id, score, deeper than k), n = min(candidates, k // 2) so the descriptor keeps at least half the
    places, then voted references (`voted`: query_id, reference_id, votes, best first) not already in, then the
    next descriptor ones, up to k. A voted reference keeps its descriptor similarity from `deep`, or the lowest
    similarity `deep` holds for the query if it is not there (the descriptor found it less similar than every
    reference it listed)."""
    candidates = min(candidates, k // 2)
    extra: dict[str, list[str]] = {}
    for q, r in zip(voted.query_id, voted.reference_id):
        extra.setdefault(q, []).append(r)
    order = deep.sort_values("score", ascending=False, kind="stable")
    listed: dict[str, list[tuple[str, float]]] = {}
    for q, r, s in zip(order.query_id, order.reference_id, order.score):
        listed.setdefault(q, []).append((r, s))
    out_q, out_r, out_s = [], [], []
    for q in deep.query_id.unique():  # in order of first appearance, as a groupby without sorting
        rows = listed[q]
        score = dict(rows)
        chosen = [r for r, _ in rows[:max(k - candidates, 0)]]
        seen = set(chosen)
        for r in extra.get(q, ()):
            if len(chosen) >= k:
                break
            if r not in seen:
                chosen.append(r)
                seen.add(r)
        chosen += [r for r, _ in rows if r not in seen][:k - len(chosen)]
        floor = min(s for _, s in rows)
        out_q += [q] * len(chosen)
        out_r += chosen
        out_s += [score.get(r, floor) for r in chosen]
    if not out_q:
        return deep.iloc[:0]
    return pd.DataFrame({"query_id": out_q, "reference_id": out_r,
                         "score": np.asarray(out_s, dtype=deep.score.dtype)})


def index_from(ids: list[str], read, factory: str = "auto", chunk: int = 256) -> TokenIndex:
    """The index of references `ids`, their tokens read `chunk` at a time by `read(ids) -> (N, C, Gh, Gw)` (e.g. from
    a saved collection), the first part large enough to train an "auto" IVF index of up to 4,096 lists."""
    first = read(ids[:1])
    per_ref = first.shape[2] * first.shape[3]
    head = max(chunk, -(-TRAIN_PER_LIST * 4096 // per_ref))
    index = TokenIndex.build(ids[:head], read(ids[:head]), factory, total_rows=len(ids) * per_ref)
    for start in range(head, len(ids), chunk):
        index.add(ids[start:start + chunk], read(ids[start:start + chunk]))
    return index


def vote_shortlist(index: TokenIndex, deep: pd.DataFrame, rows: dict[str, np.ndarray], k: int,
                   settings: TokenRecallSettings, read_views: Callable | None = None) -> pd.DataFrame:
    """The k-candidate shortlist of the queries in `rows` (id -> (Nq, C) unit tokens, `query_rows`) from their
    `deep` descriptor lists, the last `settings.candidates` places given to the best-voted references.

    With `settings.views` and `read_views` ({query id: (m, 4) boxes} -> the descriptor's rows for the queries
    cropped at those boxes: query_id, reference_id, score, e.g. `pair_vit.match.index.search_views` of
    `pair_vit.descriptor.views.embed_boxes`), the descriptor first reads each query where its best-voted
    references sit, and those rows join `deep` (best similarity per pair) before the votes are merged.

    Columns: query_id, reference_id, score (descriptor similarity), votes (every candidate's vote score, 0 where
    none of the query's tokens voted for it: a calibration feature, `pair_vit.match.calibration`). A query
    without tokens (unreadable here) keeps its descriptor list with votes 0."""
    votes, boxes = place_votes(index, rows, settings, read_views is not None)
    if boxes:
        deep = with_views(deep, read_views(boxes))
    return voted_shortlist(deep, list(rows), votes, index.ids, k, settings.candidates, index.position,
                           settings.min_votes)


def place_votes(index: TokenIndex, rows: dict[str, np.ndarray], settings: TokenRecallSettings,
                placing: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The (Q, R) votes of the queries in `rows` (`TokenIndex.vote`) and, with `placing`, `settings.views` and
    geometry, {query id: (m, 4) boxes}: where its `settings.views` best-voted references sit (left, top, right,
    bottom in fractions of the query), for the descriptor to read (`vote_shortlist`'s `read_views`, or
    `pair_vit.descriptor.views.embed_folder(boxes=)` in the same pass as the query's own views); {} otherwise."""
    boxes: list | None = [] if placing and settings.views and settings.geometry else None
    votes = index.vote(list(rows.values()), settings, boxes)
    return votes, (dict(zip(rows, boxes)) if boxes is not None else {})


def with_views(deep: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """`deep` (query_id, reference_id, score) with the rows of `extra` (the same columns, from more views of the
    same queries): each pair's best score, each query's list best first (ties: reference id) and as long as its
    longest (`deep`'s depth), queries in `deep`'s order. Plain dicts, not a pandas groupby: a CopyDetector match
    is one query, where pandas' fixed costs would dominate."""
    if not len(extra):
        return deep
    best: dict[str, dict[str, float]] = {}
    for q, r, score in zip(deep.query_id, deep.reference_id, deep.score.tolist()):
        mine = best.setdefault(q, {})
        mine[r] = max(score, mine.get(r, score))
    depth = max(len(mine) for mine in best.values())
    for q, r, score in zip(extra.query_id, extra.reference_id, extra.score.tolist()):
        mine = best.get(q)
        if mine is not None:  # a query the descriptor did not list is not added
            mine[r] = max(score, mine.get(r, score))
    rows = [(q, r, score) for q, mine in best.items()
            for r, score in sorted(mine.items(), key=lambda item: (-item[1], item[0]))[:depth]]
    return pd.DataFrame(rows, columns=["query_id", "reference_id", "score"]).astype({"score": deep.score.dtype})


def voted_shortlist(deep: pd.DataFrame, query_ids: list[str], votes: np.ndarray, ref_ids: Sequence[str], k: int,
                    candidates: int, position: Mapping[str, int] | None = None,
                    min_votes: float = 0.0) -> pd.DataFrame:
    """`vote_shortlist` from the (Q, R) votes of `query_ids` over references `ref_ids` (`TokenIndex.vote`);
    `position`: reference id -> its column of `votes` (`TokenIndex.position`; made from `ref_ids` if not given,
    which costs O(R) a call); only references with at least `min_votes` (and more than 0) take voted places."""
    voted = top_votes(query_ids, votes, ref_ids, candidates + k)
    if min_votes > 0:
        voted = voted[voted.votes >= min_votes]
    merged = merge_votes(deep, voted, k, candidates)
    if position is None:
        position = {r: j for j, r in enumerate(ref_ids)}
    row_of = {q: i for i, q in enumerate(query_ids)}
    found = np.zeros(len(merged), np.float32)
    for n, (q, r) in enumerate(zip(merged.query_id, merged.reference_id)):
        i, j = row_of.get(q), position.get(r)
        if i is not None and j is not None:
            found[n] = votes[i, j]
    return merged.assign(votes=found)
