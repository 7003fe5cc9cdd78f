"""Choose the token-recall settings on a benchmark: shortlist recall of each setting, overall and per edit family.

    python scripts/sweep_token_recall.py --benchmark benchmarks/tune --scales 1,2 1,2,3 --floors 0.4 0.5 \
        --candidates 3 5 --out runs/sweep_tune

The descriptor's deep list is made once (`rerank.match --descriptor-only`, cached in OUT/work), the pair model's
reference tokens, the queries' trunk readings and every query token's neighbours once per scale (at the grid's
largest neighbour count); each setting then only counts votes and merges (`token_recall.votes_of`,
`voted_shortlist`), so a grid costs little more than one run. Per setting: recall@k of
the k-candidate shortlist (what the pair stage can find at all), the share of true copies whose reference the votes
rank first, and recall@k per edit family. Written to OUT/results.{csv,md} with the command.

The queries are decoded once, at the size the largest reading needs, so a grid that adds 3 to the scales reads
the (1, 2) settings from a 480 px decode where rerank.py decodes at 320 px: their figures move by a copy or two
(tune R@20 0.960 -> 0.968 with geometry-checked votes). Compare settings within one scale set, and take a chosen
setting's figures from a run of its scales alone.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit.config import opt, save_config, truth
from pair_vit.io import write_text_atomic
from pair_vit.match.token_places import CELL, SIZES
from pair_vit.metrics import edit_families, recall_at_k


@dataclass
class TokenSweepConfig:
    """Shortlist recall of token-recall settings on a labelled benchmark."""

    benchmark: str = opt("", "benchmark folder written by scripts/make_benchmark.py")
    k: int = opt(20, "shortlist size (as rerank.py --k)")
    scales: list = opt(["1,2"], "query readings, each a comma-separated list of multiples of the pair model's half "
                                "size (1,2: 160 and 320 px)")
    floors: list = opt([0.5], "vote floors (cosine similarity a neighbour must pass)")
    neighbours: list = opt([3], "reference tokens each query token looks up")
    candidates: list = opt([5], "shortlist places given to voted references (0: the descriptor alone)")
    spreads: list = opt([0.0], "burstiness exponents: a token's votes divided by (references it votes for) ** this")
    mirrors: list = opt([False], "also vote as the query's mirror image (True/False)")
    geometry: list = opt([True], "count only votes agreeing on one placement of the reference (True/False)")
    sizes: list = opt([",".join(map(str, SIZES))], "geometry: sets of the copy's shares of the query's width and "
                                                    "height to try, each comma-separated")
    cells: list = opt([CELL], "geometry: offset cell widths, as a share of the query's side")
    min_votes: list = opt([0.0], "least vote score for a voted reference to take a place (0: any vote)")
    views: list = opt([2], "geometry: descriptor views cropped where the query's best-voted references sit, per "
                           "query (rerank.py --token-views)")
    factory: str = opt("Flat", "faiss factory of the reference-token index")
    nprobe: int = opt(16, "lists an IVF token index visits per query token")
    out: str = opt("runs/sweep_token_recall", "folder for results.csv, results.md and the cached descriptor list")


def settings_grid(cfg: TokenSweepConfig):
    """Every TokenRecallSettings of the grid (candidates 0, the descriptor alone, once)."""
    from pair_vit.match.token_recall import TokenRecallSettings

    seen = set()
    for scales, floor, neighbours, spread, mirror, geometry, sizes, cell, views, least, candidates in itertools.product(
            cfg.scales, cfg.floors, cfg.neighbours, cfg.spreads, cfg.mirrors, cfg.geometry, cfg.sizes, cfg.cells,
            cfg.views, cfg.min_votes, cfg.candidates):
        scales = tuple(int(s) for s in str(scales).split(","))
        placement = ({"sizes": tuple(float(x) for x in str(sizes).split(",")), "cell": float(cell),
                      "views": int(views)} if truth(geometry)
                     else {})  # plain votes have no placement to vary
        s = (TokenRecallSettings(int(candidates), factory=cfg.factory, nprobe=cfg.nprobe) if int(candidates) == 0
             else TokenRecallSettings(int(candidates), int(neighbours), float(floor), scales, cfg.factory, cfg.nprobe,
                                      float(spread), truth(mirror), truth(geometry), **placement,
                                      min_votes=float(least)))
        if s not in seen:
            seen.add(s)
            yield s


def run(cfg: TokenSweepConfig, command: str | None = None) -> pd.DataFrame:
    from pair_vit.match import rerank
    from pair_vit.match import token_readings
    from pair_vit.match import token_recall as tr

    if not cfg.benchmark:
        raise ValueError("--benchmark is required")
    layout, out = data.DiscLayout.from_root(cfg.benchmark), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    gt = layout.load_ground_truth()
    deep = rerank.match(rerank.RerankConfig(queries=str(layout.queries), references=str(layout.references),
                                            work_dir=str(out / "work"), k=cfg.k * rerank.TOKEN_DEPTH,
                                            descriptor_only=True, progress=False)).rows
    model = rerank.load_pair(rerank.RerankConfig())[0].eval()
    report = data.SkipReport()
    ids, tokens = token_readings.reference_tokens(model, data.list_images(layout.references), report)
    index = tr.TokenIndex.build(ids, tokens, cfg.factory)
    grid = list(settings_grid(cfg))
    every_scale = sorted({s for g in grid for s in g.scales})
    queries = data.list_images(layout.queries)
    readings = token_readings.query_readings(model, queries, every_scale, report) if every_scale else {}
    mirrored = (token_readings.query_readings(model, queries, every_scale, report, mirror=True)
                if any(g.mirror for g in grid) else {})
    families = edit_families(pd.read_csv(Path(cfg.benchmark) / "edits.csv", dtype=str),
                             set(gt.query_id[gt.reference_id.notna() & (gt.reference_id != "")]))
    half = tuple(int(x) for x in model.half_size)
    # every query token's neighbours, searched once per scale at the grid's largest neighbour count: a setting
    # then only counts votes (its scales' rows concatenated, its first `neighbours` columns)
    most = max(g.neighbours for g in grid)
    queries_read = list(readings)
    found = {(s, side): index.neighbours([tr.unit_rows(read[q][(s * half[0], s * half[1])][None])[0]
                                          for q in queries_read], most, cfg.nprobe)
             for side, read in (("as is", readings), ("mirror", mirrored)) if read for s in every_scale}
    read_views = None
    if any(g.views for g in grid):  # the descriptor and its reference index, as the deep list was made
        from pair_vit.descriptor.model import load_descriptor
        from pair_vit.match import index as ix
        from pair_vit.match.placed_views import view_reader

        rcfg = rerank.RerankConfig()
        read_views = view_reader(load_descriptor(rerank.resolve_checkpoint(rcfg))[0].eval(),
                                 ix.ReferenceIndex.load(out / "work" / "ref_index"), queries,
                                 cfg.k * rerank.TOKEN_DEPTH, rcfg, report)
    rows = [evaluate(s, index, deep, queries_read, found, gt, families, cfg.k, read_views) for s in grid]
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    command = command or "python " + " ".join(sys.argv)
    write_text_atomic(out / "results.md", f"### Token-recall settings on {cfg.benchmark}\n\n`{command}`\n\n"
                      f"{table.to_markdown(index=False, floatfmt='.3f')}\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return table


def evaluate(settings, index, deep: pd.DataFrame, query_ids: list[str], found: dict, gt: pd.DataFrame,
             families: dict[str, set[str]], k: int, read_views=None) -> dict:
    """One setting's row: recall@k of the merged shortlist, vote rank-1 rate, recall@k per edit family.
    `found`: (scale, "as is" or "mirror") -> `TokenIndex.neighbours` of every query in `query_ids` read at that
    scale, as it is or mirrored; `read_views`: `placed_views.view_reader` for settings with views."""
    from pair_vit.match import token_recall as tr

    truth = gt[gt.reference_id.notna() & (gt.reference_id != "")]
    if settings.candidates == 0:
        short = tr.merge_votes(deep, deep.iloc[:0], k, 0)
        first = float("nan")
    else:
        votes = None
        for side in ("as is", "mirror") if settings.mirror else ("as is",):
            joined = [tuple(np.concatenate([found[s, side][i][part] for s in settings.scales]) for part in range(4))
                      for i in range(len(query_ids))]
            boxes = [] if settings.views and settings.geometry and side == "as is" else None
            side_votes = tr.votes_of(joined, len(index.ids), settings, index.grid, boxes)
            votes = side_votes if votes is None else np.maximum(votes, side_votes)
            if boxes is not None:
                deep = tr.with_views(deep, read_views(dict(zip(query_ids, boxes))))
        short = tr.voted_shortlist(deep, query_ids, votes, index.ids, k, settings.candidates, index.position,
                                   settings.min_votes)
        best = dict(zip(query_ids, np.asarray(index.ids)[votes.argmax(axis=1)]))
        first = float(np.mean([best.get(q) == r for q, r in zip(truth.query_id, truth.reference_id)]))
    placed = settings.geometry and settings.candidates > 0
    found_pairs = set(zip(short.query_id, short.reference_id))
    per_query = {q: (q, r) in found_pairs for q, r in zip(truth.query_id, truth.reference_id)}
    row = {"candidates": settings.candidates, "scales": ",".join(map(str, settings.scales)) if settings.candidates
           else "", "floor": settings.floor, "neighbours": settings.neighbours, "spread": settings.spread,
           "mirror": settings.mirror, "geometry": settings.geometry, "views": settings.views if placed else 0,
           "min votes": settings.min_votes,
           "sizes": ",".join(f"{x:g}" for x in settings.sizes) if placed else "",
           "cell": settings.cell if placed else float("nan"), f"R@{k}": recall_at_k(short, gt, [k])[k],
           "votes rank-1": first}
    for name in sorted(families, key=lambda n: -len(families[n])):
        row[f"{name} ({len(families[name])})"] = float(np.mean([per_query[q] for q in families[name]]))
    return row
