"""What `CopyDetector.add` computes of each reference for its store (`pair_vit.match.store`), once, so that matching
never decodes a reference again: the pair ViT's side (trunk tokens for the hybrid pair ViT, float16; pixels for the
pixel one), a JPEG thumbnail for people, and SIFT keypoints while the collection verifies with SIFT.

    refs = reference_artefacts(pair_model, settings, ids, vectors, starts, paths, sources, report)  # StoredReference...

References are decoded as rerank decodes them (`pair_vit.pair.scoring.TensorCache`, longest side
`load_side(half_size)`), and their tokens computed by the same function (`trunk_tokens`) in batches of
`STORE_CHUNK` references.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pair_vit import data
from pair_vit.match.store import THUMBNAIL_SIDE, PairLayout, StoredReference

STORE_CHUNK = 256  # references decoded and passed through the trunk at a time


def pair_layout(model) -> PairLayout:
    """What a store keeps of a reference for pair model `model`: trunk tokens (C, Gh, Gw) for a hybrid model,
    else its pixel input (3, h, w)."""
    if hasattr(model, "forward_tokens"):
        return PairLayout("tokens", (model.trunk.feature_info.channels()[-1], *model.grid))
    return PairLayout("pixels", (3, *model.half_size))


def reference_artefacts(model, settings: Any, ids: list[str], vectors: np.ndarray, starts: np.ndarray,
                        paths: dict[str, Path], sources: dict[str, str],
                        report: data.SkipReport) -> Iterator[StoredReference]:
    """One `StoredReference` per readable reference `ids[j]`, its descriptor views `vectors[starts[j]:starts[j+1]]`;
    an unreadable one is recorded in `report` and yields nothing. `settings`: the detector's (batch_size, amp,
    verify, progress)."""
    from tqdm import tqdm

    from pair_vit.match.verify import KeypointCache
    from pair_vit.pair.scoring import TensorCache, load_side, to_uint8, trunk_tokens

    half = model.half_size
    images = TensorCache(paths, half, report, capacity=0, load_side=load_side(half))
    keypoints = KeypointCache(paths, report, capacity=0) if settings.verify != "none" else None
    no_keypoints = [(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float16))]
    tokens = pair_layout(model).kind == "tokens"
    progress = tqdm(total=len(ids), desc="reference artefacts", disable=not settings.progress)
    for start in range(0, len(ids), STORE_CHUNK):
        chunk = range(start, min(start + STORE_CHUNK, len(ids)))
        decoded = {j: images.load(ids[j]) for j in chunk}
        kps = {j: keypoints.get(ids[j]) if keypoints is not None else no_keypoints
               for j in chunk if decoded[j] is not None}
        readable = [j for j in kps if kps[j] is not None]
        pair_side = [to_uint8(decoded[j], half) for j in readable]
        if readable and tokens:
            pair_side = trunk_tokens(model, torch.stack(pair_side), settings.batch_size, settings.amp).to(torch.float16)
        for j, pair in zip(readable, pair_side):
            yield StoredReference(ids[j], sources[ids[j]], vectors[starts[j]:starts[j + 1]], pair.numpy(),
                                  thumbnail(decoded[j]), *kps[j][0])
        progress.update(len(chunk))
    progress.close()


def thumbnail(image) -> bytes:
    """JPEG bytes of a decoded image, longest side at most THUMBNAIL_SIDE (for people; no model reads it)."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
