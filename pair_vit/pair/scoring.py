"""Stage 2 at inference: score every shortlisted (query, reference) pair with the pair ViT, resumably.

    views = ["full", "center"]                                   # query views, see PAIR_VIEWS
    scored = score_shortlist(model, shortlist, queries, references, views, cache_dir="sub.csv.work/pairs")
    # scored: query_id, reference_id, score (descriptor similarity), logit_full, logit_center, logit

Local verification as the ISC2021 winners did it: the reference is always shown whole, the query as one or
more views (the whole image, halves, the centre, rotations, a mirror image); each view is scored against the
reference and the pair keeps its highest logit (`logit`, higher = more likely a copy). A crop of the query
that lines up with the pasted or cropped reference content can score high where the whole query does not.

Images are decoded once (longest side `load_side`, as in training) into uint8 tensors at the model's half
size; reference tensors are kept in a bounded cache across chunks. A hybrid model (`pair_vit.pair.hybrid`)
keeps each reference's trunk tokens instead (`TokenCache`) and runs each query view through its trunk once:
a pair then costs only the transformer. Work is cut into chunks of
`chunk_queries` queries (by sorted query id, so the layout does not depend on the number of processes);
each finished chunk is written atomically to `cache_dir`, and a rerun skips the chunks already there
(`pair_vit.cache`).
Under `accelerate launch` process r scores the chunks c with c % world == r.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pair_vit import data, precision
from pair_vit.cache import ImageCache, run_chunks
from pair_vit.pair.inputs import normalise_uint8
from pair_vit.pair.localize import fine_size
from pair_vit.pair.model import pair_logits

log = logging.getLogger(__name__)

# Query views: name -> function of a PIL image. Boxes are fractions (left, top, right, bottom).
_BOXES = {"left": (0, 0, .5, 1), "right": (.5, 0, 1, 1), "top": (0, 0, 1, .5), "bottom": (0, .5, 1, 1),
          "center": (.2, .2, .8, .8)}
_TRANSPOSES = {"rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
               "rot270": Image.Transpose.ROTATE_270, "hflip": Image.Transpose.FLIP_LEFT_RIGHT}
PAIR_VIEWS = ("full", *_BOXES, *_TRANSPOSES)
VIEW_GROUPS = {"halves": ("left", "right", "top", "bottom"), "rotations": ("rot90", "rot180", "rot270")}
LOAD_SIDE = 256  # the trainer decodes photos at max(256, 2 x pair height) before editing; so does scoring


def load_side(half_size: Sequence[int]) -> int:
    """Longest side images are decoded at for a model whose halves are `half_size` (h, w), as in training."""
    return max(LOAD_SIDE, 2 * int(half_size[0]))


def expand_views(names: Sequence[str]) -> list[str]:
    """Check view names; "halves" and "rotations" stand for their groups. Order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for view in VIEW_GROUPS.get(name, (name,)):
            if view not in PAIR_VIEWS:
                raise ValueError(f"unknown pair view {view!r}; choose from {list(PAIR_VIEWS)} or "
                                 f"{list(VIEW_GROUPS)}")
            if view not in out:
                out.append(view)
    if not out:
        raise ValueError("at least one pair view is needed (e.g. full)")
    return out


def view_image(image: Image.Image, view: str) -> Image.Image:
    """The `view` of a query image (a crop, rotation or mirror image; "full" is the image itself)."""
    if view in _BOXES:
        left, top, right, bottom = _BOXES[view]
        w, h = image.size
        box = (int(left * w), int(top * h), max(int(left * w) + 1, int(right * w)),
               max(int(top * h) + 1, int(bottom * h)))
        return image.crop(box)
    if view in _TRANSPOSES:
        return image.transpose(_TRANSPOSES[view])
    if view == "full":
        return image
    raise ValueError(f"unknown pair view {view!r}")


def to_uint8(image: Image.Image, half_size: Sequence[int]) -> torch.Tensor:
    """A PIL image resized to the model's half size (h, w) -> (3, h, w) uint8 tensor (normalised later)."""
    h, w = int(half_size[0]), int(half_size[1])
    image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, np.uint8).transpose(2, 0, 1)))


class TensorCache(ImageCache):
    """Decoded images as uint8 tensors (3, h, w) at the model's half size `half_size` (h, w)."""

    def __init__(self, paths: Mapping[str, Path], half_size: Sequence[int], report: data.SkipReport,
                 capacity: int = 20000, load_side: int = LOAD_SIDE, keep_decoded: int = 0):
        super().__init__(paths, report, capacity, load_side, keep_decoded)
        self.half_size = tuple(half_size)

    def convert(self, image: Image.Image) -> torch.Tensor:
        return to_uint8(image, self.half_size)


# ----------------------------------------------------------------------------- scoring


def _query_views(cache: TensorCache, query_id: str, views: list[str],
                 fine: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """((V, 3, h, w) uint8 views of one query, its (3, sh, sw) uint8 whole image at size `fine` or None), or None
    if it cannot be read."""
    image = cache.load(query_id)
    if image is None:
        return None
    views_ = torch.stack([to_uint8(view_image(image, v), cache.half_size) for v in views])
    return views_, (to_uint8(image, fine) if fine else None)


class TokenCache:
    """Trunk tokens of a hybrid pair model (`pair_vit.pair.hybrid`) per image id, computed in batches and kept
    for `capacity` images, least recently used dropped: a reference shortlisted by many queries costs one trunk
    pass. Tokens are kept at float16 (C * Gh * Gw halves: Lite0 at 160 px, 112 x 10 x 10, 22 KB), as a saved
    collection stores them (`pair_vit.match.store`), so rerank.py and `CopyDetector` score the same numbers; the
    default capacity bounds the cache to ~0.45 GB, beyond it tokens are recomputed. In memory only: a run never
    reads tokens another model or resolution made. Unreadable images map to None (recorded in the image cache's
    report)."""

    def __init__(self, model, images: TensorCache, capacity: int = 20000, batch_size: int = 64, amp: bool = True):
        self.model, self.images, self.capacity = model, images, capacity
        self.batch_size, self.amp = batch_size, amp
        self._cache: OrderedDict[str, torch.Tensor | None] = OrderedDict()

    def get_many(self, ids: Sequence[str]) -> dict[str, torch.Tensor | None]:
        """id -> (C, Gh, Gw) tokens (or None if unreadable) for every id; missing ones computed as one batch."""
        found = {i: self._cache[i] for i in dict.fromkeys(ids) if i in self._cache}
        pixels = {i: self.images.get(i) for i in dict.fromkeys(ids) if i not in found}
        readable = [i for i, x in pixels.items() if x is not None]
        if readable:
            computed = trunk_tokens(self.model, torch.stack([pixels[i] for i in readable]), self.batch_size, self.amp)
            found.update(zip(readable, computed.to(torch.float16)))
        found.update({i: None for i, x in pixels.items() if x is None})
        for i in found:
            self._cache[i] = found[i]
            self._cache.move_to_end(i)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return found


def trunk_tokens(model, images: torch.Tensor, batch_size: int = 64, amp: bool = True) -> torch.Tensor:
    """(N, 3, h, w) uint8 images at the model's half size -> (N, C, Gh, Gw) trunk tokens on the CPU."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode(), precision.autocast(device, amp):
        for start in range(0, len(images), batch_size):
            x = normalise_uint8(images[start:start + batch_size], model.model_args["mean"], model.model_args["std"])
            out.append(model.tokens(x.to(device)).cpu())
    return torch.cat(out)


def token_logits(model, ref_tokens: torch.Tensor, query_tokens: torch.Tensor, batch_size: int = 256,
                 amp: bool = True) -> np.ndarray:
    """Logits (N,) float32 of pairs of token grids (N, C, Gh, Gw): the transformer alone (higher = more likely
    a copy)."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode(), precision.autocast(device, amp):
        for start in range(0, len(ref_tokens), batch_size):
            part = slice(start, start + batch_size)
            out.append(model.forward_tokens(ref_tokens[part].to(device), query_tokens[part].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _view_tokens(model, q_tensors: dict, views: list[str], readings: Mapping | None, batch_size: int,
                 amp: bool) -> dict[str, torch.Tensor]:
    """query id -> (V, C, Gh, Gw) trunk tokens of its views: the whole query's from `readings` when that is the
    only view and every query has them, else one trunk pass over every view."""
    queries, size = list(q_tensors), tuple(int(x) for x in model.half_size)
    if views == ["full"] and readings is not None and all(size in readings.get(q, {}) for q in queries):
        return {q: readings[q][size][None] for q in queries}
    tokens = trunk_tokens(model, torch.cat([q_tensors[q][0] for q in queries]), batch_size, amp)
    return dict(zip(queries, tokens.view(len(queries), len(views), *tokens.shape[1:])))


def _view_logits(model, keep: pd.DataFrame, views: list[str], q_tensors: dict, refs: dict, batch_size: int,
                 amp: bool, readings: Mapping | None = None) -> np.ndarray:
    """(pairs, views) logits of `keep`'s pairs: from images, or from tokens for a hybrid model (`refs` then
    holds reference tokens and each query view goes through the trunk once, or not at all if `readings` has it)."""
    if hasattr(model, "forward_tokens"):
        q_tokens = _view_tokens(model, q_tensors, views, readings, batch_size, amp)
        ref_side = torch.stack([refs[r] for r in keep.reference_id])
        logits = np.stack([token_logits(model, ref_side, torch.stack([q_tokens[q][v] for q in keep.query_id]),
                                        4 * batch_size, amp) for v in range(len(views))], axis=1)
        if getattr(model, "localize", None) is None:
            return logits
        full = logits[:, views.index("full")] if "full" in views else logits.max(axis=1)
        local = local_logits(model, keep, q_tensors, ref_side, full, batch_size, amp, readings)
        return np.concatenate([logits, local[:, None]], axis=1)
    ref_side = torch.stack([refs[r] for r in keep.reference_id])
    return np.stack([pair_logits(model, ref_side, torch.stack([q_tensors[q][0][v] for q in keep.query_id]),
                                 batch_size, amp) for v in range(len(views))], axis=1)


def local_logits(model, keep: pd.DataFrame, q_tensors: dict, ref_side: torch.Tensor, full: np.ndarray,
                 batch_size: int, amp: bool, readings: Mapping | None = None) -> np.ndarray:
    """(pairs,) logits of each pair's localized query region (`pair_vit.pair.localize`): each query's fine image
    (q_tensors[q][1], uint8 at the localize scale) goes through the trunk once (unless `readings` holds its tokens
    at that size), each found box once more; a pair whose box was not found keeps its whole-query logit `full`
    (pairs,)."""
    device = next(model.parameters()).device
    queries = list(q_tensors)
    position = {q: i for i, q in enumerate(queries)}
    fine = normalise_uint8(torch.stack([q_tensors[q][1] for q in queries]), model.model_args["mean"],
                           model.model_args["std"])
    size = tuple(q_tensors[queries[0]][1].shape[1:])
    if readings is not None and all(size in readings.get(q, {}) for q in queries):
        fine_tokens = torch.stack([readings[q][size] for q in queries])
    else:
        fine_tokens = trunk_tokens(model, torch.stack([q_tensors[q][1] for q in queries]), batch_size, amp)
    query_index = torch.tensor([position[q] for q in keep.query_id], dtype=torch.int64)
    out = []
    with torch.inference_mode(), precision.autocast(device, amp):
        for start in range(0, len(keep), batch_size):
            part = slice(start, start + batch_size)
            logits, _ = model.forward_local(ref_side[part].to(device), fine.to(device), fine_tokens.to(device),
                                            query_index[part].to(device), torch.from_numpy(full[part]).to(device))
            out.append(logits[:, 1].float().cpu())
    return torch.cat(out).numpy()


def score_chunk(model, rows: pd.DataFrame, views: list[str], query_cache: TensorCache,
                ref_cache: TensorCache | TokenCache, batch_size: int = 64, amp: bool = True,
                readings: Mapping[str, Mapping[tuple[int, int], torch.Tensor]] | None = None) -> pd.DataFrame:
    """Score the shortlist rows (query_id, reference_id, score) of a few queries against every view.

    Returns the rows whose query and reference could be read, with logit_<view> per view, logit_local for a
    localizing model (the query's region where the reference was found: `pair_vit.pair.localize`) and `logit`
    (their max). Pairs are batched across queries, so small shortlists still fill large batches. `ref_cache` holds
    reference images, or reference tokens for a hybrid model (a `TokenCache`, or a mapping id -> float16 tokens such
    as a saved collection's). `readings` (query id -> {(h, w): (C, Gh, Gw) trunk tokens of the whole query resized
    to h x w from `query_cache`'s decoding}, e.g. token recall's) saves the trunk passes it holds."""
    settings = getattr(model, "localize", None)
    fine = fine_size(query_cache.half_size, settings) if settings is not None else None
    q_tensors = {q: _query_views(query_cache, q, views, fine) for q in rows.query_id.unique()}
    unique_refs = list(rows.reference_id.unique())
    refs = (ref_cache.get_many(unique_refs) if isinstance(ref_cache, TokenCache)
            else {r: ref_cache.get(r) for r in unique_refs})
    keep = rows[[q_tensors[q] is not None and refs[r] is not None
                 for q, r in zip(rows.query_id, rows.reference_id)]].reset_index(drop=True)
    columns = [f"logit_{v}" for v in views] + ["logit_local"] * (settings is not None)
    if keep.empty:
        return keep.assign(**{c: np.zeros(0, np.float32) for c in columns + ["logit"]})
    q_tensors = {q: q_tensors[q] for q in keep.query_id.unique()}
    logits = _view_logits(model, keep, views, q_tensors, refs, batch_size, amp, readings)  # (pairs, views)
    keep[columns] = logits
    keep["logit"] = logits.max(axis=1)
    return keep


def score_shortlist(model, shortlist: pd.DataFrame, queries: Mapping[str, Path], references: Mapping[str, Path],
                    views: Sequence[str], report: data.SkipReport, cache_dir: str | Path | None = None,
                    chunk_queries: int = 32, batch_size: int = 64, amp: bool = True, rank: int = 0,
                    world: int = 1, progress: bool = False,
                    on_chunk: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, int]:
    """Pair-score this process's chunks of `shortlist` (query_id, reference_id, score; see `pair_vit.cache`).

    Returns (scored rows, see `score_chunk`; number of pairs scored by this call, i.e. not read back from
    `cache_dir`, times the number of views). `on_chunk(n_pairs)` is called after each chunk."""
    views = expand_views(views)
    model = getattr(model, "module", model).eval()
    half = model.half_size
    q_cache = TensorCache(queries, half, report, capacity=0, load_side=load_side(half))
    r_cache = TensorCache(references, half, report, load_side=load_side(half))
    if hasattr(model, "forward_tokens"):  # hybrid: keep reference tokens, not images
        r_cache = TokenCache(model, TensorCache(references, half, report, 0, load_side(half)), batch_size=batch_size,
                             amp=amp)
    local = ["local"] * (getattr(model, "localize", None) is not None)
    empty = shortlist.iloc[:0].assign(**{f"logit_{v}": [] for v in [*views, *local]}, logit=[])
    rows, n_rows = run_chunks(shortlist, lambda part: score_chunk(model, part, views, q_cache, r_cache, batch_size,
                                                                  amp),
                              empty, cache_dir, chunk_queries, rank, world, units_per_row=len(views),
                              desc="pair scoring", progress=progress, on_chunk=on_chunk)
    return rows, n_rows * len(views)


def timed_pairs_per_second(model, n: int = 512, batch_size: int = 64, amp: bool = True) -> float:
    """Pairs scored per second on random inputs (no decoding): the model's own ceiling. A hybrid model is timed
    on cached tokens (the transformer alone, as in reranking once the tokens exist)."""
    h, w = model.half_size
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)
    if hasattr(model, "forward_tokens"):
        tokens = trunk_tokens(model, x[:batch_size], batch_size, amp)
        x = tokens.repeat((n + len(tokens) - 1) // len(tokens), 1, 1, 1)[:n]
        score = lambda a, b: token_logits(model, a, b, 4 * batch_size, amp)  # noqa: E731
    else:
        score = lambda a, b: pair_logits(model, a, b, batch_size, amp)  # noqa: E731
    score(x[:batch_size], x[:batch_size])  # warm-up
    start = time.perf_counter()
    score(x, x.flip(0))
    return n / (time.perf_counter() - start)
