"""Descriptor views where the token votes place a copy: the query cropped at its best-voted references' placement.

    read = view_reader(descriptor, ref_index, paths, depth, cfg, report)    # {query id: (m, 4) boxes} -> rows
    shortlist = token_recall.vote_shortlist(token_index, deep, rows, k, settings, read)

The region proposals (`pair_vit.descriptor.regions`) look for straight edges and find a box around a pasted photo
or a collage cell for about a third of queries. Geometry-checked token votes (`pair_vit.match.token_places`) say
where a voted reference sits in the query whatever its edges; even when a look-alike wins the vote it usually sits
where the copy is. The descriptor reads the query cropped there as one more sub-view (`TokenRecallSettings.views`
boxes a query), searched and penalised as the other sub-views, so the true reference can enter the descriptor's
list before the votes take their places. Measured: docs/results.md#placed-views.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit.descriptor.views import embed_boxes
from pair_vit.match import index as ix


def view_reader(descriptor, ref_index: ix.ReferenceIndex, paths: Mapping[str, Path], depth: int, cfg,
                report: data.SkipReport) -> Callable[[dict[str, np.ndarray]], pd.DataFrame]:
    """{query id: (m, 4) boxes} -> query_id, reference_id, score: the `depth` best references of each query's
    boxed views, each view's similarity lowered by `cfg.subview_penalty` (as every query sub-view's) and
    reference sub-views' by `cfg.reference_penalty`. `cfg`: a RerankConfig or DetectorConfig."""
    def read(boxes: dict[str, np.ndarray]) -> pd.DataFrame:
        ids, vectors, owner = embed_boxes(descriptor, {q: paths[q] for q in boxes if q in paths}, boxes,
                                          cfg.batch_size, cfg.amp, report)
        found = ix.search_views(ref_index, ids, vectors, owner, depth, subview_penalty=0.0,
                                reference_penalty=cfg.reference_penalty)
        # every boxed view is a sub-view (search_views spares the first view of a query: its whole image)
        return found.assign(score=found.score - np.float32(cfg.subview_penalty))

    return read
