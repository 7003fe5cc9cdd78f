"""The query side of `CopyDetector.match`: rerank.py's stages without their caches, over a saved collection.

    images = query_images(detector.pair, paths, report)                  # one decoder for token recall and pair ViT
    found = shortlist(detector, paths, report, seconds, images, readings)    # descriptor (+ token votes) candidates
    rows = rescore(detector, found, report, seconds, images, readings)       # + logit_<view>, logit, inliers

`detector` is a `CopyDetector`: its settings (`DetectorConfig`), models, faiss index, reference store and token
index (`CopyDetector.token_index`). `seconds` takes each stage's wall time; `readings` (query id -> {(h, w): trunk
tokens}) carries token recall's trunk passes to the pair stage when the call is small enough to keep them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit.cache import run_chunks
from pair_vit.match import index as ix
from pair_vit.match import rerank

QUERY_WORKERS_FROM = 64  # fewer queries are decoded in this process (a worker costs more than it saves)
# A match of up to this many queries decodes each once for token recall and the pair stage, and the pair stage
# reuses token recall's trunk passes (~0.4 MB a query kept for the call); a larger one reads them again.
SHARED_READINGS = 256


def query_images(pair, paths: dict[str, Path], report: data.SkipReport):
    """The pair stage's decoder of these queries (`TensorCache`), which token recall decodes with too."""
    from pair_vit.pair.scoring import TensorCache, load_side

    half = pair.half_size
    return TensorCache(paths, half, report, capacity=0, load_side=load_side(half),
                       keep_decoded=len(paths) if len(paths) <= SHARED_READINGS else 0)


def shortlist(detector: Any, paths: dict[str, Path], report: data.SkipReport, seconds: dict, images,
              readings: dict) -> pd.DataFrame:
    """rerank.shortlist_stage without its cache: the best `shortlist` references of every query (query_id,
    reference_id, score: descriptor similarity, higher = more alike). With token recall the queries' trunk tokens
    vote first (and go into `readings` when the call is small enough to keep them), and the descriptor reads the
    boxes the votes place in the same pass as the query's own views. rerank.py reads them in a second pass after
    its cached descriptor stage: the same crops, the same shortlist, one forward pass fewer here."""
    from pair_vit.match import token_recall as tr

    s = detector.settings
    voting = s.token_recall and detector.pair_layout.kind == "tokens"  # the pixel pair ViT has no tokens to vote
    settings = tr.settings_of(s)
    index = detector.token_index(settings) if voting else None
    voted, votes, boxes = (_votes(detector.pair, index, settings, paths, report, seconds, images, readings, s)
                           if voting else ([], None, {}))
    start = time.perf_counter()
    workers = s.num_workers if len(paths) >= QUERY_WORKERS_FROM else 0
    q_ids, q_vectors, owner = ix.embed_folder(detector.descriptor, paths, s.batch_size, s.amp, s.views, report,
                                              workers, progress=s.progress and "queries", boxes=boxes)
    depth = s.shortlist * rerank.TOKEN_DEPTH if voting else s.shortlist
    found = ix.search_views(detector.index, q_ids, q_vectors, owner, depth, subview_penalty=s.subview_penalty,
                            reference_penalty=s.reference_penalty)
    if voting and len(found):
        found = tr.voted_shortlist(found, voted, votes, index.ids, s.shortlist, settings.candidates, index.position,
                                   settings.min_votes)
    seconds["shortlist"] = time.perf_counter() - start
    return found


def _votes(pair, index, settings, paths: dict[str, Path], report: data.SkipReport, seconds: dict, images,
           readings: dict, s) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Token recall's reading of the queries against `index` (the collection's `TokenIndex`): (query ids read, their
    (Q, R) votes, {query id: (m, 4) boxes} where the votes place their best-voted references). A query that cannot
    be read has no votes; `report` lists it once, though the descriptor stage finds it unreadable too."""
    from pair_vit.match import token_readings
    from pair_vit.match import token_recall as tr

    start = time.perf_counter()
    read = token_readings.query_readings(pair, paths, settings.scales, report, s.batch_size, s.amp,
                                         images if images.keep_decoded else None)
    rows = token_readings.rows_of(read)
    votes, boxes = tr.place_votes(index, rows, settings)
    if images.keep_decoded:
        readings.update(read)
    seconds["token_recall"] = time.perf_counter() - start
    return list(rows), votes, boxes


def rescore(detector: Any, found: pd.DataFrame, report: data.SkipReport, seconds: dict, queries,
            readings: dict) -> pd.DataFrame:
    """rerank.pair_stage and verify_stage without their caches, the references read from the store, the queries
    decoded by `queries` (a `TensorCache`) and their trunk tokens taken from `readings` where there. Returns the
    shortlisted pairs both images of which could be read, with logit_<view>, logit and (unless verify is none)
    inliers."""
    from pair_vit.match.verify import QUERY_VARIANTS, KeypointCache, verify_chunk
    from pair_vit.pair.scoring import expand_views, score_chunk

    s, start, store = detector.settings, time.perf_counter(), detector.store
    views = expand_views(s.pair_views)

    def references(part: pd.DataFrame):  # id -> stored tokens (a hybrid model) or pixels
        return store.pair_inputs(part.reference_id.unique(), detector.pair_layout)

    empty = found.iloc[:0].assign(**{f"logit_{v}": [] for v in views}, logit=[])
    scored, _ = run_chunks(found, lambda part: score_chunk(detector.pair, part, views, queries, references(part),
                                                           s.batch_size, s.amp, readings),
                           empty, None, s.chunk_queries)
    seconds["pair"] = time.perf_counter() - start
    if s.verify == "none":
        return scored
    start = time.perf_counter()
    query_kps = KeypointCache(queries.paths, report, capacity=max(1, s.chunk_queries), variants=QUERY_VARIANTS)
    empty = found.iloc[:0][["query_id", "reference_id"]].assign(inliers=np.zeros(0, np.int64))
    verified, _ = run_chunks(found, lambda part: verify_chunk(
        part, query_kps, store.keypoints(part.reference_id.unique())), empty, None, s.chunk_queries)
    seconds["verify"] = time.perf_counter() - start
    return scored.merge(verified, on=["query_id", "reference_id"], how="inner", validate="one_to_one")
