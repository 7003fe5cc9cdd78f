"""Peers in the same harness: perceptual hashes a user would pick instead of pair-vit.

pHash (imagehash, 64 bits) and PDQ (Meta's pdqhash, 256 bits). Each produces a matching-track submission:
for every query, the k references at the smallest Hamming distance, with
score = 1 - distance / n_bits in [0, 1] (higher = more likely a copy), comparable across queries.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pair_vit import data

HASH_METHODS = ("phash", "pdq")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def phash_bits(image) -> np.ndarray:
    """64-bit DCT perceptual hash of a PIL image -> bool array (64,)."""
    import imagehash

    return np.asarray(imagehash.phash(image).hash, dtype=bool).reshape(-1)


def pdq_bits(image) -> np.ndarray:
    """256-bit PDQ hash of a PIL image -> bool array (256,)."""
    import pdqhash

    bits, _quality = pdqhash.compute(np.asarray(image))
    return np.asarray(bits, dtype=bool)


HASHERS: dict[str, Callable] = {"phash": phash_bits, "pdq": pdq_bits}


def hash_folder(images: dict[str, Path], method: str, report: data.SkipReport) -> tuple[list[str], np.ndarray]:
    """Hash every loadable image. Returns (ids, packed codes uint8 (N, n_bits/8)); bad files go to `report`."""
    hasher = HASHERS[method]
    ids, codes = [], []
    for path, image in data.load_images(list(images.values()), report):
        ids.append(path.stem)
        codes.append(np.packbits(hasher(image)))
    width = {"phash": 8, "pdq": 32}[method]
    return ids, np.stack(codes) if codes else np.zeros((0, width), np.uint8)


def hamming_topk(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes (Nq, B) and (Nr, B) -> (distances (Nq, k'), reference indices (Nq, k')), k' = min(k, Nr).

    Ties are broken by reference index (stable sort) so the output is deterministic.
    """
    k = min(k, len(references))
    dist = np.empty((len(queries), len(references)), dtype=np.int32)
    for start in range(0, len(queries), 256):  # chunked: (256, Nr, B) bytes at a time
        block = queries[start:start + 256, None, :] ^ references[None, :, :]
        dist[start:start + 256] = _POPCOUNT[block].sum(axis=-1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def hash_submission(queries: dict[str, Path], references: dict[str, Path], method: str = "pdq",
                    k: int = 10, report: data.SkipReport | None = None) -> pd.DataFrame:
    """Submission DataFrame (query_id, reference_id, score) from a perceptual hash, k rows per query."""
    if method not in HASH_METHODS:
        raise ValueError(f"unknown hash method {method!r}; choose from {HASH_METHODS}")
    report = report if report is not None else data.SkipReport()
    ref_ids, ref_codes = hash_folder(references, method, report)
    if not ref_ids:
        raise ValueError("no usable reference images")
    q_ids, q_codes = hash_folder(queries, method, report)
    dist, idx = hamming_topk(q_codes, ref_codes, k)
    n_bits = ref_codes.shape[1] * 8
    return pd.DataFrame({
        "query_id": np.repeat(q_ids, idx.shape[1]),
        "reference_id": np.asarray(ref_ids)[idx.reshape(-1)] if len(q_ids) else [],
        "score": 1.0 - dist.reshape(-1) / n_bits,
    })
