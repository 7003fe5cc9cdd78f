"""Stage 2 at inference: score every shortlisted (query, reference) pair with the pair ViT, resumably.

    views = ["full", "center"]                                   # query views, see PAIR_VIEWS
    scored = score_shortlist(model, shortlist, queries, references, views, cache_dir="sub.csv.work/pairs")
    # scored: query_id, reference_id, score (descriptor similarity), logit_full, logit_center, logit

Local verification as the ISC2021 winners did it: the reference is always shown whole, the query as one or
more views (the whole image, halves, the centre, rotations, a mirror image); each view is scored against the
reference and the pair keeps its highest logit (`logit`, higher = more likely a copy). A crop of the query
that lines up with the pasted or cropped reference content can score high where the whole query does not.

Images are decoded once (longest side `load_side`, as in training) into uint8 tensors at the model's half
size; reference tensors are kept in a bounded cache across chunks. Work is cut into chunks of
`chunk_queries` queries (by sorted query id, so the layout does not depend on the number of processes);
each finished chunk is written atomically to `cache_dir`, and a rerun skips the chunks already there
(`pair_vit.cache`).
Under `accelerate launch` process r scores the chunks c with c % world == r.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pair_vit import data
from pair_vit.cache import ImageCache, run_chunks
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
                 capacity: int = 20000, load_side: int = LOAD_SIDE):
        super().__init__(paths, report, capacity, load_side)
        self.half_size = tuple(half_size)

    def convert(self, image: Image.Image) -> torch.Tensor:
        return to_uint8(image, self.half_size)


# ----------------------------------------------------------------------------- scoring


def _query_views(cache: TensorCache, query_id: str, views: list[str]) -> torch.Tensor | None:
    """(V, 3, h, w) uint8 views of one query, or None if it cannot be read."""
    image = cache.load(query_id)
    if image is None:
        return None
    return torch.stack([to_uint8(view_image(image, v), cache.half_size) for v in views])


def score_chunk(model, rows: pd.DataFrame, views: list[str], query_cache: TensorCache, ref_cache: TensorCache,
                batch_size: int = 64, amp: bool = True) -> pd.DataFrame:
    """Score the shortlist rows (query_id, reference_id, score) of a few queries against every view.

    Returns the rows whose query and reference could be read, with logit_<view> per view and `logit` (their
    max). Pairs are batched across queries, so small shortlists still fill large batches."""
    q_tensors = {q: _query_views(query_cache, q, views) for q in rows.query_id.unique()}
    r_tensors = {r: ref_cache.get(r) for r in rows.reference_id.unique()}
    keep = rows[[q_tensors[q] is not None and r_tensors[r] is not None
                 for q, r in zip(rows.query_id, rows.reference_id)]].reset_index(drop=True)
    columns = [f"logit_{v}" for v in views]
    if keep.empty:
        return keep.assign(**{c: np.zeros(0, np.float32) for c in columns + ["logit"]})
    refs = torch.stack([r_tensors[r] for r in keep.reference_id])
    logits = np.stack([pair_logits(model, refs, torch.stack([q_tensors[q][v] for q in keep.query_id]),
                                   batch_size, amp) for v in range(len(views))], axis=1)  # (pairs, views)
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
    empty = shortlist.iloc[:0].assign(**{f"logit_{v}": [] for v in views}, logit=[])
    rows, n_rows = run_chunks(shortlist, lambda part: score_chunk(model, part, views, q_cache, r_cache, batch_size,
                                                                  amp),
                              empty, cache_dir, chunk_queries, rank, world, units_per_row=len(views),
                              desc="pair scoring", progress=progress, on_chunk=on_chunk)
    return rows, n_rows * len(views)


def timed_pairs_per_second(model, n: int = 512, batch_size: int = 64, amp: bool = True) -> float:
    """Pair-ViT forward passes per second on random uint8 inputs (no decoding): the model's own ceiling."""
    h, w = model.half_size
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)
    pair_logits(model, x[:batch_size], x[:batch_size], batch_size, amp)  # warm-up
    start = time.perf_counter()
    pair_logits(model, x, x.flip(0), batch_size, amp)
    return n / (time.perf_counter() - start)
