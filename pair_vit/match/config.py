"""The matching run's options (`scripts/rerank.py`): `RerankConfig`, also the source of the options that
`scripts/calibrate.py` shares with it (`pair_vit.match.calibrate`)."""
from __future__ import annotations

from dataclasses import dataclass

from pair_vit.config import opt
from pair_vit.descriptor.views import REFERENCE_SUBVIEW_PENALTY, REFERENCE_VIEWS, SUBVIEW_PENALTY, VIEWS
from pair_vit.match.verify import VERIFIERS
from pair_vit.pair.scoring import PAIR_VIEWS, VIEW_GROUPS

CALIBRATIONS = ("checkpoint", "none")


@dataclass
class RerankConfig:
    """Match query images against reference images and write a submission CSV (query_id,reference_id,score)."""

    queries: str = opt("", "folder of query images (nested or not; id = file stem)")
    references: str = opt("", "folder of reference images")
    output: str = opt("", "submission CSV to write")
    descriptor_only: bool = opt(False, "submit the descriptor shortlist itself (stage 1, no pair-ViT reranking)")
    k: int = opt(20, "shortlist size: candidate references per query (each one is pair-scored)")
    max_per_query: int = opt(0, "at most this many rows per query in the submission (0: k)")
    checkpoint: str = opt("", "pair-ViT checkpoint; empty: the weights shipped in the package "
                              "(pair_vit/weights/pair_vit.pt)")
    descriptor_checkpoint: str = opt("", "descriptor checkpoint; empty: the weights shipped in the package "
                                         "(pair_vit/weights/descriptor.pt)")
    pair_views: list = opt(["full"], f"query views scored by the pair ViT, max logit kept: {list(PAIR_VIEWS)} or "
                                     f"the groups {list(VIEW_GROUPS)}")
    verify: str = opt("sift", "local verification of every shortlisted pair, fused into the score by the "
                              "calibration: sift (RANSAC inliers of SIFT matches of the query, its inverse and "
                              "its mirror image) or none (needs a calibration fitted without it)", choices=VERIFIERS)
    calibration: str = opt("checkpoint", "score calibration: checkpoint (the fit stored with the pair weights; "
                                         "plain sigmoid if none), none (sigmoid of the pair logit), or a JSON "
                                         "file written by scripts/calibrate.py")
    index: str = opt("", "folder of a reference index to reuse and extend (created if absent); empty: one "
                         "inside the work folder")
    work_dir: str = opt("", "folder for resumable intermediate results (default: OUTPUT.work)")
    factory: str = opt("Flat", "faiss index_factory string for a new reference index: Flat (exact), "
                               "IVF{nlist},PQ{m}, HNSW32, ...")
    nprobe: int = opt(16, "IVF lists visited per query (IVF factories only)")
    # regions: best uAP and shortlist recall of the query-view settings on the dev benchmark, for little more
    # time per query than halves (measured: docs/results.md#query-views)
    views: str = opt("regions", "descriptor query views: full (1 descriptor per query), halves (5), grid (14), "
                                "regions (halves + up to 6 proposed collage cells / pasted photos); merged by max "
                                "similarity", choices=VIEWS)
    subview_penalty: float = opt(SUBVIEW_PENALTY, "subtracted from the similarity of every query view but the "
                                                     "whole image before views are merged (0: plain max)")
    # halves: catches queries that are tight crops of a reference (higher shortlist recall than full), for 5x
    # the reference embedding work and index size; penalty: pair_vit.descriptor.views.REFERENCE_SUBVIEW_PENALTY
    # (measured: docs/results.md#reference-views-and-their-penalty)
    reference_views: str = opt("halves", "views each reference is indexed as: full (1 vector per reference), "
                                         "halves (5: + left, right, top, bottom halves; for queries that are "
                                         "crops of a reference), grid (14)", choices=REFERENCE_VIEWS)
    reference_penalty: float = opt(REFERENCE_SUBVIEW_PENALTY, "subtracted from the similarity of every "
                                   "reference view but the whole image before views are merged")
    # a second recall path for copies filling a small part of the query (pair_vit.match.token_recall). 5 places with
    # token_geometry: chosen on the tuning benchmark (shortlist R@20 0.948 -> 0.972, default uAP 0.935 -> 0.949;
    # 3 places with plain votes, the first default: 0.960 and 0.943; docs/results.md#token-geometry)
    token_recall: int = opt(5, "places of the k-candidate shortlist given to references the query's local "
                               "pair-ViT tokens vote for (0: the descriptor shortlist alone)")
    token_factory: str = opt("auto", "faiss index_factory string for the reference-token index (--token-recall): "
                                     "auto (Flat up to 250,000 tokens, then IVF), Flat, IVF{nlist},Flat, "
                                     "IVF{nlist},PQ{m}")
    # 8: the same shortlists as 16 and as an exact index at 3,700 references, half the search time
    # (docs/results.md#token-recall-at-scale)
    token_nprobe: int = opt(8, "inverted lists an IVF token index visits per query token (fewer: faster votes, "
                               "some lost; docs/results.md#token-recall)")
    # votes count only where the query's matched tokens agree on one placement of the reference (a Hough vote,
    # pair_vit.match.token_places): the votes rank the true reference first for 0.740 of tune's copies, not 0.684
    token_geometry: bool = opt(True, "token recall counts only the votes of query tokens that agree on where the "
                                      "reference sits in the query (--no-token-geometry: every vote counts)")
    # 2: chosen on the tuning benchmark among 0-3 (shortlist R@20 0.976 -> 0.980; docs/results.md#placed-views)
    token_views: int = opt(2, "with --token-geometry: the descriptor also reads each query cropped where its this "
                              "many best-voted references sit (pair_vit.match.placed_views; 0: off)")
    # 64: at the top of both models' throughput on a 2-core CPU; larger batches fall out of cache and run
    # slower (measured: docs/results.md#batch-size)
    batch_size: int = opt(64, "images (descriptor) or pairs (pair ViT) per forward pass")
    chunk_queries: int = opt(32, "queries per pair-scoring chunk (the unit of resuming and of work sharing)")
    amp: bool = opt(True, "bf16 autocast where the hardware has native bf16, else float32 "
                          "(pair_vit.precision; --no-amp: always float32)")
    num_workers: int = opt(1, "image-decoding worker processes for the descriptor (0: decode in the main "
                              "process)")
    background: str = opt("", "folder of background photos (not in the benchmark, e.g. training photos); "
                              "enables score normalisation: similarity - beta * mean similarity of the query "
                              "to its n nearest background photos")
    background_n: int = opt(1, "score normalisation: number of nearest background photos averaged")
    background_beta: float = opt(1.0, "score normalisation: weight of the background term")
    margin: bool = opt(False, "--descriptor-only scores: similarity plus its margin over the query's best other "
                              "shortlisted reference (calibration.similarity_margin; comparable across queries)")
    overwrite: bool = opt(False, "replace an existing output file")
    progress: bool = opt(True, "progress bars")
