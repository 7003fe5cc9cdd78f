"""Where in a query each candidate reference was found: the pair model's token correspondences, for the page.

    found = correspondences(detector, query_path, ["ref_a", "ref_b"])
    # {"grid": [7, 7], "candidates": {"ref_a": {"similarity": [...49], "pairs": [[qx, qy, rx, ry, s], ...]}}}

The hybrid pair ViT (`pair_vit.pair.hybrid`) reads each image as a Gh x Gw grid of trunk tokens and, before its
transformer, marks the tokens of the query and the reference that are mutual nearest neighbours
(`match_channels`): a copy's mutual neighbours line up, a look-alike's scatter. This module runs the same trunk
on the query's whole view and the same function against each candidate's stored tokens, and returns per candidate:
`similarity`, each query token's cosine similarity to its nearest reference token (Gh * Gw floats, row-major,
higher = that part of the query is found in the reference), and `pairs`, each mutual nearest-neighbour pair as
the query token's centre and the reference token's centre, as fractions of the image's width and height (0..1),
and its similarity. The model also scores other query views (crops, a mirror image); this shows the whole view.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pair_vit import data


def correspondences(detector, query: Path, reference_ids: list[str]) -> dict[str, Any] | None:
    """The correspondences of `query` with each of `reference_ids` (module docstring); None for a pair model
    without a token trunk (the pixel pair ViT), and no entry for a reference not in the collection."""
    import torch

    from pair_vit.pair.hybrid import match_channels
    from pair_vit.pair.scoring import TensorCache, load_side, trunk_tokens

    model = detector.pair
    if not hasattr(model, "forward_tokens"):
        return None
    half = model.half_size
    pixels = TensorCache({"q": query}, half, data.SkipReport(), capacity=0, load_side=load_side(half)).get("q")
    stored = detector.store.pair_inputs(reference_ids, detector.pair_layout)
    ids = [i for i in reference_ids if i in stored]
    if pixels is None or not ids:
        return {"grid": list(model.grid), "candidates": {}}
    s = detector.settings
    query_tokens = trunk_tokens(model, pixels[None], s.batch_size, s.amp).expand(len(ids), -1, -1, -1)
    _, channels = match_channels(torch.stack([stored[i] for i in ids]), query_tokens)  # (R, 5, Gh, Gw): query side
    return {"grid": list(model.grid), "candidates": {ref_id: _candidate(c) for ref_id, c in zip(ids, channels)}}


def _candidate(channels) -> dict[str, Any]:
    """(5, Gh, Gw) query-side channels (similarity, margin, mutual, neighbour x, y in [-1, 1]) -> JSON."""
    gh, gw = channels.shape[1:]
    similarity = channels[0].flatten()
    pairs = []
    for token in (channels[2].flatten() > 0.5).nonzero().flatten().tolist():
        row, col = divmod(token, gw)
        rx, ry = (float(channels[3].flatten()[token]) + 1) / 2, (float(channels[4].flatten()[token]) + 1) / 2
        pairs.append([round((col + 0.5) / gw, 4), round((row + 0.5) / gh, 4), round(rx, 4), round(ry, 4),
                      round(float(similarity[token]), 4)])
    return {"similarity": [round(float(v), 4) for v in similarity], "pairs": pairs}


def reference_thumbnail(detector, ref_id: str) -> bytes | None:
    """JPEG bytes of the thumbnail the store keeps of `ref_id` (`pair_vit.match.store.THUMBNAIL_SIDE`), or None if
    it is not in the collection."""
    return detector.store.thumbnail(ref_id)
