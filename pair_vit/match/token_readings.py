"""The trunk tokens token recall votes with: the references' (for the index) and the queries' (the votes).

    ids, tokens = reference_tokens(pair, paths, report)           # (N, C, Gh, Gw) float16, as the pair stage reads
    readings = query_readings(pair, paths, (1, 2), report)         # id -> {(h, w): (C, h/16, w/16)} per scale
    rows = rows_of(readings)                                       # id -> (Nq, C) unit rows for TokenIndex.vote

The queries are read whole at multiples of the pair model's half size (160 and 320 px by default), decoded as the
pair stage decodes them, which reuses these readings (`pair_vit.pair.scoring.score_chunk`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pair_vit.match.token_recall import unit_rows

if TYPE_CHECKING:
    import torch


def reference_tokens(model, paths: dict[str, Path], report, batch_size: int = 64,
                     amp: bool = True) -> tuple[list[str], np.ndarray]:
    """(ids, (N, C, Gh, Gw) float16 tokens) of the readable references, read as the pair stage reads them."""
    import torch

    from pair_vit.pair.scoring import TensorCache, load_side, trunk_tokens

    half = model.half_size
    images = TensorCache(paths, half, report, capacity=0, load_side=load_side(half))
    ids, out = [], []
    todo = list(paths)
    for start in range(0, len(todo), 256):
        pixels = {i: images.get(i) for i in todo[start:start + 256]}
        readable = [i for i, x in pixels.items() if x is not None]
        if readable:
            ids += readable
            out.append(trunk_tokens(model, torch.stack([pixels[i] for i in readable]), batch_size, amp)
                       .to(torch.float16).numpy())
    channels, grid = model.trunk.feature_info.channels()[-1], model.grid
    return ids, (np.concatenate(out) if out else np.zeros((0, channels, *grid), np.float16))


def query_readings(model, paths: dict[str, Path], scales: Sequence[int], report, batch_size: int = 64,
                   amp: bool = True, images=None,
                   mirror: bool = False) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """id -> {(h, w): (C, Gh, Gw) trunk tokens} of each readable query, read whole at each of `scales` x the pair
    model's half size (h, w), decoded as the pair stage decodes queries (`images`: a `TensorCache` to decode
    with, e.g. one the pair stage shares; `pair_vit.pair.scoring.score_chunk` reuses these readings). `mirror`:
    the tokens of the query's mirror image (left-right) instead, for `TokenRecallSettings.mirror`."""
    import torch

    from pair_vit.pair.scoring import TensorCache, load_side, to_uint8, trunk_tokens

    half = model.half_size
    side = max(load_side(half), half[0] * max(scales))
    if images is None or images.load_side < side:  # a shared decoder too coarse for the largest reading
        images = TensorCache(paths, half, report, capacity=0, load_side=side)
    sizes = [(int(half[0]) * s, int(half[1]) * s) for s in scales]
    out: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    todo = list(paths)
    for start in range(0, len(todo), 64):
        decoded = {i: images.load(i) for i in todo[start:start + 64]}
        readable = [i for i, x in decoded.items() if x is not None]
        if not readable:
            continue
        flip = (lambda x: x.flip(-1)) if mirror else (lambda x: x)
        per_size = [trunk_tokens(model, torch.stack([flip(to_uint8(decoded[i], size)) for i in readable]), batch_size,
                                 amp) for size in sizes]
        out.update((i, {size: tokens[j] for size, tokens in zip(sizes, per_size)}) for j, i in enumerate(readable))
    return out


def rows_of(readings: dict[str, dict]) -> dict[str, np.ndarray]:
    """`query_readings` -> id -> (Nq, C) float32 unit tokens, every size's grid concatenated in order."""
    return {i: np.concatenate([unit_rows(t[None])[0] for t in sizes.values()]) for i, sizes in readings.items()}


def query_rows(model, paths: dict[str, Path], scales: Sequence[int], report, batch_size: int = 64,
               amp: bool = True) -> dict[str, np.ndarray]:
    """id -> (Nq, C) float32 unit tokens of each readable query, read whole at each of `scales` x the pair model's
    half size (Nq = sum of s * s * Gh * Gw), decoded as the pair stage decodes queries."""
    return rows_of(query_readings(model, paths, scales, report, batch_size, amp))
