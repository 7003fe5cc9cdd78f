"""Local verification of shortlisted pairs: SIFT keypoints, Lowe's ratio test, RANSAC affine inliers.

    rows, n = verify_shortlist(shortlist, queries, references, report, cache_dir="sub.csv.work/verify")
    # rows: query_id, reference_id, inliers (int, higher = more likely a copy)

A copy shares many keypoints with its reference in one geometric arrangement (a crop, a rotation, a paste
is an affine map of the reference), a look-alike photo shares few: the count of RANSAC inliers is a
signal neither the global descriptor nor the pair ViT gives. It is a calibration feature
(`pair_vit.match.calibration`: log1p(inliers) and its margin over the query's other candidates), not a score of
its own. Adding it raised the fused uAP sharply, at a cost per query comparable to pair scoring (measured:
docs/results.md#sift-verification-gain-and-cost).

Keypoints come from `pair_vit.baselines.sift_features` (RootSIFT), 800 per image at a longest side of 512
px (the SIFT peer: 400 at 384 px); reference keypoints stay in a bounded cache across chunks. Work is
chunked, resumable and shared between processes as pair scoring is (`pair_vit.cache`). Queries are matched
three times: as they are, photometrically inverted and mirrored (`QUERY_VARIANTS`), and the pair keeps the
largest inlier count: inversion turns every gradient around and mirroring reverses the descriptor layout, so the SIFT
descriptors of an inverted or mirrored copy match nothing of its reference. Each variant raised the fused
uAP; a fourth, mirrored and inverted, did not help and was not kept (measured:
docs/results.md#sift-query-variants).

Matches are one-to-one (of the query keypoints matched to the same reference keypoint only the closest
counts) and the geometric model is affine, not the SIFT peer's homography: look-alike photos and repeated
patterns otherwise gather dozens of "inliers" on a few keypoints or in a degenerate homography. Chosen on a
tuning benchmark built from training photos (`make_benchmark.py --split train --seed 1`) and confirmed on the
dev benchmark (measured: docs/results.md#sift-matching-one-to-one-affine).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pair_vit import data
from pair_vit.baselines import ransac_inliers, sift_features
from pair_vit.cache import ImageCache, run_chunks

VERIFIERS = ("sift", "none")
# Images are decoded at this longest side and give at most N_FEATURES keypoints: more of both than the SIFT
# peer (384 px / 400) raised the fused uAP on both benchmarks for a slower match (measured:
# docs/results.md#sift-image-size-and-keypoints).
SIFT_SIDE = 512
N_FEATURES = 800
# What the inlier counts mean; part of the cache key of `scripts/rerank.py`'s verification stage, so
# counts from another method are never read back.
# Query variants matched against each reference (references are matched as they are).
QUERY_VARIANTS = ("original", "inverted", "mirrored")
_VARIANTS = {"original": lambda im: im, "inverted": lambda im: ImageOps.invert(im.convert("RGB")),
             "mirrored": ImageOps.mirror}
METHOD = f"rootsift-{SIFT_SIDE}px-{N_FEATURES}kp-one-to-one-affine-ransac, query {'+'.join(QUERY_VARIANTS)}"


def keypoints(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(xy float32 (n, 2), RootSIFT float16 (n, 128)) of an image. float16 halves the memory of a large
    reference cache; matching converts back to float32."""
    xy, desc = sift_features(image, max_side=SIFT_SIDE, n_features=N_FEATURES)
    return xy, desc.astype(np.float16)


class KeypointCache(ImageCache):
    """SIFT keypoints of decoded images: a list of `keypoints`, one per variant of the image (names in
    `_VARIANTS`; queries use `QUERY_VARIANTS`), or None if unreadable. A variant of a cached image takes up
    to 200 KB (800 keypoints), so the default capacity holds about 400 MB of references."""

    def __init__(self, paths: Mapping[str, Path], report: data.SkipReport, capacity: int = 2000,
                 variants: Sequence[str] = ("original",)):
        super().__init__(paths, report, capacity=capacity, load_side=SIFT_SIDE)
        unknown = set(variants) - set(_VARIANTS)
        if unknown:
            raise ValueError(f"unknown image variants {sorted(unknown)}; choose from {list(_VARIANTS)}")
        self.variants = tuple(variants)

    def convert(self, image: Image.Image):
        return [keypoints(_VARIANTS[v](image)) for v in self.variants]


def _float32(variants) -> list:
    return [(xy, desc.astype(np.float32)) for xy, desc in variants]


def _inliers(query_variants, ref_variants) -> int:
    """Most RANSAC inliers over every (query variant, reference variant) pair of keypoint sets."""
    queries, refs = _float32(query_variants), _float32(ref_variants)  # once each, not once per combination
    return max(ransac_inliers(a, b, one_to_one=True, model="affine") for a in queries for b in refs)


def verify_chunk(rows: pd.DataFrame, query_cache: KeypointCache, ref_cache: KeypointCache) -> pd.DataFrame:
    """query_id, reference_id, inliers (int) for the pairs of `rows` whose two images could be read."""
    q_feats = {q: query_cache.get(q) for q in rows.query_id.unique()}
    readable = [q_feats[q] is not None and ref_cache.get(r) is not None
                for q, r in zip(rows.query_id, rows.reference_id)]
    keep = rows.loc[readable, ["query_id", "reference_id"]].reset_index(drop=True)
    counts = [_inliers(q_feats[q], ref_cache.get(r)) for q, r in zip(keep.query_id, keep.reference_id)]
    return keep.assign(inliers=np.asarray(counts, dtype=np.int64))


def verify_shortlist(shortlist: pd.DataFrame, queries: Mapping[str, Path], references: Mapping[str, Path],
                     report: data.SkipReport, cache_dir: str | Path | None = None, chunk_queries: int = 32,
                     rank: int = 0, world: int = 1, progress: bool = False,
                     on_chunk: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, int]:
    """RANSAC inliers for this process's chunks of `shortlist` (query_id, reference_id, ...).

    Returns (query_id, reference_id, inliers, see `verify_chunk`; number of pairs verified by this call, i.e. not read
    back from `cache_dir`). Unreadable images go to `report` and their pairs get no row."""
    q_cache = KeypointCache(queries, report, capacity=max(1, chunk_queries), variants=QUERY_VARIANTS)
    r_cache = KeypointCache(references, report)
    empty = shortlist.iloc[:0][["query_id", "reference_id"]].assign(inliers=np.zeros(0, np.int64))
    return run_chunks(shortlist, lambda part: verify_chunk(part, q_cache, r_cache), empty, cache_dir,
                      chunk_queries, rank, world, desc="verification", progress=progress, on_chunk=on_chunk)
