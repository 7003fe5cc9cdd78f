"""Cached pipeline stages: a stage's results kept under a key of its inputs, and per-pair work over a
shortlist cut into chunks of queries, resumable and shared between processes.

`stage_dir(folder, key, procs)` gives a stage its folder, emptied first when `key` (a digest of the stage's
inputs: image listings, model fingerprint, settings) changed since the results there were made, so a
restarted run reuses exactly what is still valid.

Both rescoring stages of `scripts/rerank.py` (pair-ViT logits, `pair_vit.pair.scoring`; SIFT verification,
`pair_vit.match.verify`) are expensive per pair, so they run through `run_chunks`: the shortlist's queries, sorted
by id, are cut into chunks of `chunk_queries` (the layout does not depend on the number of processes);
process r of `world` computes the chunks c with c % world == r; each finished chunk is written atomically
to `cache_dir/chunk_<digest of its rows>.csv` and a rerun reads it back instead of computing it again.
Results are also reused pair by pair: a chunk not on disk takes every (query_id, reference_id) pair already
computed in `cache_dir` (by any earlier chunk or shortlist) and computes only the rest, so a changed shortlist
(another descriptor, token recall) costs its new pairs only. The stage's key therefore leaves the shortlist out.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from pair_vit import data
from pair_vit.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


def digest(value: Any) -> str:
    """A short hash of a JSON-able value (dict keys sorted)."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def listing(images: Mapping[str, Path]) -> str:
    """Digest of a folder listing: ids, paths, sizes and modification times (a changed file changes it)."""
    rows = []
    for image_id, path in sorted(images.items()):
        st = Path(path).stat()
        rows.append((image_id, str(path), st.st_size, st.st_mtime_ns))
    return digest(rows)


def stage_dir(folder: Path, key: dict[str, Any], procs) -> Path:
    """`folder` for a stage's cached results computed under `key`; emptied first when the key changed.
    `procs`: a `pair_vit.processes.Processes` (the main process prepares the folder, the others wait)."""
    stamp_text = digest(key)
    if procs.is_main:
        stamp = folder / "key.txt"
        if not stamp.is_file() or stamp.read_text().strip() != stamp_text:
            if folder.exists():
                log.info("inputs changed: dropping cached results in %s", folder)
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_text_atomic(stamp, stamp_text + "\n")
    procs.wait()
    return folder


def save_report(path: Path, report: data.SkipReport) -> None:
    write_text_atomic(path, json.dumps([[str(p), r] for p, r in report.entries]))


def load_report(path: Path, report: data.SkipReport) -> None:
    if path.is_file():
        for p, reason in json.loads(path.read_text()):
            report.add(p, reason)


def chunk_plan(query_ids: Sequence[str], chunk_queries: int) -> list[list[str]]:
    """Sorted unique query ids cut into chunks of `chunk_queries` (the same for any number of processes)."""
    ids = sorted(set(query_ids))
    return [ids[i:i + chunk_queries] for i in range(0, len(ids), chunk_queries)]


KEYS = ["query_id", "reference_id"]


def run_chunks(shortlist: pd.DataFrame, compute: Callable[[pd.DataFrame], pd.DataFrame], empty: pd.DataFrame,
               cache_dir: str | Path | None = None, chunk_queries: int = 32, rank: int = 0, world: int = 1,
               float_format: str = "%.6g", units_per_row: int = 1, desc: str = "scoring",
               progress: bool = False, on_chunk: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, int]:
    """`compute(rows)` over this process's chunks of `shortlist` (rows of whole queries in, rows out).

    Returns (the concatenated outputs, or `empty` if this process has no chunk; the number of rows computed
    by this call, i.e. not read back or reused from `cache_dir`). `empty` gives the output columns; `compute`
    may drop rows (unreadable images) but must keep the others' (query_id, reference_id). `units_per_row`:
    progress units per shortlist row (e.g. pair views). `on_chunk(units)` is called after each chunk."""
    from tqdm import tqdm

    by_query = dict(tuple(shortlist.groupby("query_id", sort=False)))
    mine = [(c, ids) for c, ids in enumerate(chunk_plan(shortlist.query_id, chunk_queries)) if c % world == rank]
    # the stored pairs, read once, when a first chunk is not on disk (a plain resume never needs them)
    known = functools.cache(lambda: stored_pairs(cache_dir, empty, shortlist.columns) if cache_dir else None)
    parts, n_computed = [], 0
    bar = tqdm(total=sum(len(by_query[q]) for _, ids in mine for q in ids) * units_per_row, desc=desc,
               unit="pair", disable=not progress, smoothing=0.1)
    for _, ids in mine:
        rows = pd.concat([by_query[q] for q in ids], ignore_index=True)
        path = Path(cache_dir) / f"chunk_{digest(rows.to_csv(index=False))}.csv" if cache_dir else None
        if path is not None and path.is_file():
            part = pd.read_csv(path, dtype={"query_id": str, "reference_id": str})
        else:
            part, n = _compute_new(rows, compute, known(), empty)
            n_computed += n
            if path is not None:
                with atomic_path(path) as tmp:
                    part.to_csv(tmp, index=False, float_format=float_format)
        parts.append(part)
        bar.update(len(rows) * units_per_row)
        if on_chunk:
            on_chunk(len(part) * units_per_row)
    bar.close()
    parts = [p for p in parts if len(p)]  # a header-only chunk read back from CSV has no dtypes to keep
    return (pd.concat(parts, ignore_index=True) if parts else empty), n_computed


def stored_pairs(cache_dir: str | Path, empty: pd.DataFrame, inputs: Sequence[str]) -> pd.DataFrame | None:
    """Every pair's computed columns (those of `empty` not among the shortlist's `inputs`) from the chunk files
    in `cache_dir`, indexed by (query_id, reference_id); None if there are none."""
    parts = [pd.read_csv(f, dtype={"query_id": str, "reference_id": str})
             for f in sorted(Path(cache_dir).glob("chunk_*.csv"))]
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    known = pd.concat(parts, ignore_index=True).drop_duplicates(KEYS, keep="last")
    return known.set_index(KEYS)[[c for c in empty.columns if c not in inputs]]


def _compute_new(rows: pd.DataFrame, compute: Callable[[pd.DataFrame], pd.DataFrame], known: pd.DataFrame | None,
                 empty: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(`compute` over the rows not in `known`, joined with the known rows' stored columns in `rows`' order;
    the number of rows computed)."""
    if known is None:
        part = compute(rows)
        return part, len(part)
    seen = pd.MultiIndex.from_frame(rows[KEYS]).isin(known.index)
    new = compute(rows[~seen].reset_index(drop=True)) if (~seen).any() else empty
    # the shortlist's own columns (e.g. the descriptor score) come from `rows`, the computed ones from the store
    old = rows[seen].join(known, on=KEYS)
    order = {pair: i for i, pair in enumerate(zip(rows.query_id, rows.reference_id))}
    part = pd.concat([p[list(empty.columns)] for p in (old, new) if len(p)] or [empty], ignore_index=True)
    position = [order[pair] for pair in zip(part.query_id, part.reference_id)]
    return part.iloc[np.argsort(position, kind="stable")].reset_index(drop=True), len(new)


class ImageCache:
    """What a stage keeps of each decoded image (`convert`, defined by subclasses), least recently used dropped
    past `capacity` images.

    `get(id)` returns None for an image that cannot be read (recorded once in `report`, never raised), so a bad
    file costs its own pairs only. Subclasses: `pair_vit.pair.scoring.TensorCache` (uint8 tensors),
    `pair_vit.match.verify.KeypointCache` (SIFT keypoints)."""

    def __init__(self, paths: Mapping[str, Path], report: data.SkipReport, capacity: int = 20000,
                 load_side: int = 256, keep_decoded: int = 0):
        self.paths, self.report = paths, report
        self.capacity, self.load_side = capacity, load_side
        self._cache: OrderedDict[str, Any] = OrderedDict()
        # decoded images `load` keeps for stages that read the same images again (least recently used dropped)
        self.keep_decoded = keep_decoded
        self._decoded: OrderedDict[str, Any] = OrderedDict()

    def load(self, image_id: str):
        """The decoded image (longest side at most `load_side`), or None if it cannot be read (reported once
        while it is kept)."""
        if image_id in self._decoded:
            self._decoded.move_to_end(image_id)
            return self._decoded[image_id]
        try:
            image = data.load_image(self.paths[image_id], max_side=self.load_side)
        except data.ImageLoadError as err:
            self.report.add(err.path, err.reason)
            log.warning("skipping image %s: %s", err.path, err.reason)
            image = None
        if self.keep_decoded:
            self._decoded[image_id] = image
            if len(self._decoded) > self.keep_decoded:
                self._decoded.popitem(last=False)
        return image

    def convert(self, image) -> Any:
        """What the cache keeps of a decoded PIL image."""
        raise NotImplementedError

    def get(self, image_id: str) -> Any:
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        image = self.load(image_id)
        value = None if image is None else self.convert(image)
        self._cache[image_id] = value
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return value
