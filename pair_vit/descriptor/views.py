"""Embedding image folders with the descriptor, optionally as several views per image (multi-view queries).

`embed_folder` decodes images in a DataLoader, embeds them in batches and skips unreadable ones (recorded
in a SkipReport, never given a vector). For queries it can crop each image into several views; each view
is searched separately and `merge_views` keeps the best similarity per (query, reference).

A copy often shows only part of its reference (a crop, or the reference pasted into a collage or onto
another photo), and a global descriptor of the whole query then mostly describes the rest. Embedding
sub-images as extra views lets one of them line up with the reference. Views, as boxes in fractions of
the image (left, top, right, bottom):

    "full"    1 view:  the whole image
    "halves"  5 views: the whole image + left, right, top and bottom halves
    "grid"   14 views: the "halves" views + the 9 cells of a 3x3 grid
    "regions" 5-11 views: the "halves" views + up to 6 rectangles bounded by straight edges that
             `pair_vit.descriptor.regions.propose` finds in the image (collage cells, pasted photos)

Cost: a query costs (number of views) descriptor forward passes and faiss searches, i.e. 5x ("halves") or
14x ("grid") the "full" cost; images are decoded once per query, whatever the number of views. References
are embedded as one of `REFERENCE_VIEWS` (the whole image, or with its halves or grid cells too, for queries
that show only part of a reference: a tight crop); the index then holds several rows per reference, merged
by max after `REFERENCE_SUBVIEW_PENALTY` (see `pair_vit.match.index`). The forward passes are the cost: faiss
search and merging were small beside them at demo scale (measured: docs/results.md#multi-view-embedding-cost).

Each view is searched separately; `merge_views` keeps, for each (query, reference) pair, the highest
similarity over the query's views, then the k best references per query. A sub-image view's similarity is
first lowered by `SUBVIEW_PENALTY`: with 5-11 views per query, the best of the sub-views beats the whole image
by chance more often than a genuine partial copy needs, so the whole image is trusted a little more.

Embedding runs under bf16 autocast by default where the CPU has native bf16 (`amp=True`, see
`pair_vit.precision`; float32 elsewhere); vectors are re-normalised in float32 after the forward pass.
bf16 is much faster where native and barely moves descriptors or shortlists (measured:
docs/results.md#bf16-embedding-vs-float32). `amp=False` (`--no-amp`) gives float32.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from pair_vit import data, precision
from pair_vit.descriptor import regions

log = logging.getLogger(__name__)

_FULL = [(0.0, 0.0, 1.0, 1.0)]
_HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
_GRID = [(c / 3, r / 3, (c + 1) / 3, (r + 1) / 3) for r in range(3) for c in range(3)]

VIEW_BOXES: dict[str, list[tuple[float, float, float, float]]] = {
    "full": _FULL,
    "halves": _FULL + _HALVES,
    "grid": _FULL + _HALVES + _GRID,
}
# Tried, not kept: a middle view (the central part of each side, without the corners a rotation or shear fills
# with black) added to the `regions` queries; no recall gain on dev for one more forward pass per query
# (measured: docs/results.md#middle-query-view-not-kept).
# Image-dependent view sets: their fixed boxes, completed per image by `regions.propose`.
_PROPOSED = {"regions": "halves"}
VIEWS = (*VIEW_BOXES, *_PROPOSED)

# Longest side an image is decoded at, in multiples of the descriptor input size: a half or a grid cell
# still gets about `image_size` pixels across, and JPEGs decode faster at reduced scale.
DECODE_SCALE = {"full": 2, "halves": 2, "grid": 3, "regions": 3}
BOX_DECODE = "regions"  # boxes placed on a query (`embed_boxes`) are cut from a decode as fine as its regions'

# Subtracted from the similarity of every view but the whole image before views are merged, so that a sub-view
# of an unrelated photo beats the whole image's best match less often. Chosen on the tuning benchmark as the
# best descriptor-only uAP (measured: docs/results.md#query-sub-view-penalty).
SUBVIEW_PENALTY = 0.05


# Reference images are embedded as these view sets (fixed boxes only: region proposals are for queries).
# A reference's sub-views catch queries that show only part of it (tight crops, a zoomed-in detail).
REFERENCE_VIEWS = ("full", "halves", "grid")

# Subtracted from the similarity of a reference's sub-views (all but its whole image) before they are merged.
# Chosen on the tuning benchmark by recall@20, the stage's gating figure (measured:
# docs/results.md#reference-views-and-their-penalty).
REFERENCE_SUBVIEW_PENALTY = 0.1


def check_reference_views(views: str) -> str:
    if views not in REFERENCE_VIEWS:
        raise ValueError(f"unknown reference views {views!r}; choose from {list(REFERENCE_VIEWS)}")
    return views


def check_views(views: str) -> str:
    if views not in VIEWS:
        raise ValueError(f"unknown views {views!r}; choose from {list(VIEWS)}")
    return views


def n_views(views: str) -> int:
    """Number of descriptors computed per query image for `views` (at most, for proposed regions)."""
    if check_views(views) in _PROPOSED:
        return n_views(_PROPOSED[views]) + regions.ProposalConfig.max_boxes
    return len(VIEW_BOXES[views])


def view_boxes(width: int, height: int, views: str,
               extra: list[tuple[float, float, float, float]] = ()) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) of the views of a width x height image; never empty.

    `extra`: more boxes in fractions of the image, after the fixed ones (proposed regions).
    """
    boxes = []
    fixed = VIEW_BOXES[_PROPOSED.get(check_views(views), views)]
    for left, top, right, bottom in [*fixed, *extra]:
        x0, y0 = min(int(round(left * width)), width - 1), min(int(round(top * height)), height - 1)
        x1, y1 = max(x0 + 1, int(round(right * width))), max(y0 + 1, int(round(bottom * height)))
        boxes.append((x0, y0, min(x1, width), min(y1, height)))
    return boxes


def crop_views(image, views: str) -> list:
    """The views of a PIL image, as PIL images, in `VIEW_BOXES[views]` order (the full image first),
    then for "regions" the proposed rectangles."""
    extra = regions.propose(image) if check_views(views) in _PROPOSED else []
    return [image if box == (0, 0, *image.size) else image.crop(box)
            for box in view_boxes(image.width, image.height, views, extra)]


def subview_mask(view_owner: np.ndarray) -> np.ndarray:
    """(M,) bool: True for every view but the first of its image (`embed_folder` puts the whole image first)."""
    view_owner = np.asarray(view_owner, dtype=np.int64)
    mask = np.ones(len(view_owner), dtype=bool)
    mask[np.unique(view_owner, return_index=True)[1]] = False
    return mask


def merge_views(scores: np.ndarray, ref_ids: np.ndarray, view_owner: np.ndarray, query_ids: list[str],
                k: int) -> pd.DataFrame:
    """Merge per-view search results into a submission: the top `k` references of each query by max score.

    scores, ref_ids: (M, k') results of M view vectors (a missing result has ref id None);
    view_owner: (M,) index into `query_ids` of the query each view belongs to.
    Returns query_id, reference_id, score sorted by query, score descending (ties: reference id).
    """
    scores = np.asarray(scores, dtype=np.float32)
    ref_ids = np.asarray(ref_ids, dtype=object)
    view_owner = np.asarray(view_owner, dtype=np.int64)
    if scores.shape != ref_ids.shape or scores.ndim != 2 or len(view_owner) != len(scores):
        raise ValueError(f"merge_views: scores {scores.shape}, ref_ids {ref_ids.shape} and view_owner "
                         f"{view_owner.shape} do not line up")
    owner = np.repeat(view_owner, scores.shape[1])
    flat = pd.DataFrame({"q": owner, "reference_id": ref_ids.reshape(-1), "score": scores.reshape(-1)})
    flat = flat[flat.reference_id.notna()]
    best = flat.groupby(["q", "reference_id"], sort=False, as_index=False)["score"].max()
    best = best.sort_values(["q", "score", "reference_id"], ascending=[True, False, True], kind="stable")
    best = best.groupby("q", sort=False).head(k)
    qids = np.asarray(query_ids, dtype=object)
    return pd.DataFrame({
        "query_id": qids[best.q.to_numpy()] if len(best) else np.array([], dtype=object),
        "reference_id": best.reference_id.to_numpy(dtype=object),
        "score": best.score.to_numpy(dtype=np.float32),
    }).reset_index(drop=True)


# ----------------------------------------------------------------------------- the descriptor model


def model_args_of(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture arguments a descriptor was built from (what `build_descriptor` takes)."""
    args = getattr(model, "model_args", None)
    if args is None:
        cfg = getattr(model, "cfg", None)
        args = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None
    if args is None:
        raise ValueError(f"{type(model).__name__} has neither .model_args nor a dataclass .cfg")
    return plain_json(dict(args))


def model_image_size(model: torch.nn.Module) -> int:
    return int(model_args_of(model)["image_size"])


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the descriptor's weights (parameter and buffer names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def index_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """What a reference index records about the model that embedded it (see `ReferenceIndex.load`)."""
    args = model_args_of(model)
    return {"model_args": args, "fingerprint": model_fingerprint(model)}


def plain_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists, ...), so saved and live args compare equal."""
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- embedding


class _ViewDataset(torch.utils.data.Dataset):
    """(id, path) -> (id, path, views tensor (V, 3, S, S) or None, skip reason or None); `boxes` (id -> (m, 4)
    fractions of the image) add crops after the views (`embed_folder`)."""

    def __init__(self, items: list[tuple[str, Path]], views: str, image_size: int,
                 boxes: Mapping[str, np.ndarray] | None = None):
        from pair_vit.descriptor.model import preprocess

        self.items, self.views, self.image_size, self.preprocess = items, views, image_size, preprocess
        self.boxes = boxes or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image_id, path = self.items[i]
        try:
            image = data.load_image(path, max_side=DECODE_SCALE[self.views] * self.image_size)
        except data.ImageLoadError as err:
            return image_id, path, None, err.reason
        crops = crop_views(image, self.views)
        kept = _useful_boxes(self.boxes.get(image_id, np.zeros((0, 4), np.float32)))
        if kept and DECODE_SCALE[self.views] != DECODE_SCALE[BOX_DECODE]:  # the boxes' own decode, as embed_boxes'
            try:
                image = data.load_image(path, max_side=DECODE_SCALE[BOX_DECODE] * self.image_size)
            except data.ImageLoadError as err:
                return image_id, path, None, err.reason
        crops += _box_crops(image, kept)
        return image_id, path, torch.stack([self.preprocess(v, self.image_size) for v in crops]), None


def _as_list(batch: list) -> list:
    return batch


def _forward(model: torch.nn.Module, x: torch.Tensor, amp: bool) -> np.ndarray:
    device = next(model.parameters()).device
    with torch.inference_mode(), precision.autocast(device, amp):
        out = model(x.to(device))
    out = torch.nn.functional.normalize(out.float(), dim=1)
    return out.cpu().numpy().astype(np.float32, copy=False)


def embed_folder(model: torch.nn.Module, images: Mapping[str, Path], batch_size: int = 64, amp: bool = True,
                 views: str = "full", report: data.SkipReport | None = None, num_workers: int = 0,
                 progress: bool | str = False,
                 boxes: Mapping[str, np.ndarray] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embed every loadable image of `images` (id -> path) with `views` (see `pair_vit.descriptor.views`).

    Returns (ids, vectors (M, D) float32 L2-normalised, view_owner (M,) int64): `ids` are the embedded
    images in input order, row j of `vectors` is a view of image ids[view_owner[j]] (M == len(ids) for
    views="full"). Unreadable images go to `report` and get no vector. `batch_size` counts views fed to
    the model at once; images are decoded by a DataLoader with `num_workers` worker processes (0: in this
    process) so decoding overlaps the forward passes. `amp`: bf16 autocast. `boxes` (id -> (m, 4) left, top,
    right, bottom in fractions of the image, e.g. where token votes place a copy) add sub-views after an
    image's own, filtered and cropped as `embed_boxes` crops them (from the same decode: one forward pass reads
    both, where `embed_boxes` is a second one).
    """
    from tqdm import tqdm

    check_views(views)
    report = report if report is not None else data.SkipReport()
    per_image = n_views(views)
    loader = torch.utils.data.DataLoader(
        _ViewDataset(list(images.items()), views, model_image_size(model), boxes),
        batch_size=max(1, batch_size // per_image), num_workers=num_workers, collate_fn=_as_list,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    model.eval()
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    desc = progress if isinstance(progress, str) else "embedding"
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            good = []
            for image_id, path, tensor, reason in batch:
                if tensor is None:
                    report.add(path, reason)
                    log.warning("skipping image %s: %s", path, reason)
                else:
                    good.append((image_id, tensor))
            if good:
                chunks.append(_forward(model, torch.cat([t for _, t in good]), amp))
                owners.extend(np.full(len(t), len(ids) + i, dtype=np.int64) for i, (_, t) in enumerate(good))
                ids.extend(image_id for image_id, _ in good)
            bar.update(len(batch))
    if not chunks:
        return _no_vectors(model)
    return ids, np.concatenate(chunks), np.concatenate(owners)


def _no_vectors(model: torch.nn.Module) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`embed_folder`'s result when nothing was embedded: no ids, (0, D) vectors, (0,) owners."""
    dim = int(model_args_of(model).get("embed_dim", 0))
    return [], np.zeros((0, dim), np.float32), np.zeros(0, np.int64)


# A box covering more of the query than this is the whole image again (its full view has it); one narrower or
# shorter than MIN_BOX_SIDE is a few pixels of a collage border.
MAX_BOX_AREA = 0.8
MIN_BOX_SIDE = 0.05


def embed_boxes(model: torch.nn.Module, images: Mapping[str, Path], boxes: Mapping[str, np.ndarray],
                batch_size: int = 64, amp: bool = True,
                report: data.SkipReport | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embed each image of `images` (id -> path) cropped at its `boxes` (id -> (m, 4) left, top, right, bottom in
    fractions of the image, e.g. where token votes place a copy: `pair_vit.match.token_recall.votes_of`).

    Returns `embed_folder`'s (ids, vectors (M, D), view_owner (M,)), without a whole-image view: every vector is a
    sub-view. Boxes that are almost the whole image (area > MAX_BOX_AREA), thinner than MIN_BOX_SIDE or a
    repeat of an earlier box of the image (to 0.01) are dropped; images without a box left are not decoded.
    Unreadable images go to `report`."""
    from pair_vit.descriptor.model import preprocess

    report = report if report is not None else data.SkipReport()
    size = model_image_size(model)
    ids: list[str] = []
    tensors, owners = [], []
    for image_id, path in images.items():
        kept = _useful_boxes(boxes.get(image_id, np.zeros((0, 4), np.float32)))
        if not kept:
            continue
        try:
            image = data.load_image(path, max_side=DECODE_SCALE[BOX_DECODE] * size)
        except data.ImageLoadError as err:
            report.add(path, err.reason)
            log.warning("skipping image %s: %s", path, err.reason)
            continue
        for crop in _box_crops(image, kept):
            tensors.append(preprocess(crop, size))
            owners.append(len(ids))
        ids.append(image_id)
    if not tensors:
        return _no_vectors(model)
    model.eval()
    vectors = np.concatenate([_forward(model, torch.stack(tensors[s:s + batch_size]), amp)
                              for s in range(0, len(tensors), batch_size)])
    return ids, vectors, np.asarray(owners, np.int64)


def _box_crops(image, kept: list[tuple[float, float, float, float]]) -> list:
    """The PIL crops of `image` at `kept` boxes (fractions of the image, `_useful_boxes`), in order."""
    return [image.crop(box) for box in view_boxes(image.width, image.height, "full", kept)[1:]]


def _useful_boxes(boxes: np.ndarray) -> list[tuple[float, float, float, float]]:
    out: list[tuple[float, float, float, float]] = []
    for left, top, right, bottom in np.asarray(boxes, np.float64).reshape(-1, 4):
        width, height = right - left, bottom - top
        box = tuple(round(float(v), 2) for v in (left, top, right, bottom))
        if width * height > MAX_BOX_AREA or min(width, height) < MIN_BOX_SIDE or box in out:
            continue
        out.append(box)
    return out
