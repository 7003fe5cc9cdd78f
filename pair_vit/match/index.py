"""Stage 1: embed images with the global descriptor and shortlist references for each query with faiss.

    ids, vectors, owner = embed_folder(model, references, batch_size=64)      # one full view per image
    index = ReferenceIndex.build(ids, vectors, factory="Flat", metadata=index_metadata(model))
    index.save("runs/ref_index");  ReferenceIndex.load("runs/ref_index", expected_model_args=..., ...)
    submission = shortlist(model, queries, references, k=50, views="halves")   # query_id,reference_id,score

Descriptors are L2-normalised, so the inner product faiss returns is the cosine similarity: the submission
score is that similarity (higher = more likely a copy), optionally minus a per-query background term
(`normalise_scores`). Unreadable images are skipped and recorded in a `SkipReport`: they get no vector,
hence no rows (never a zero vector, which would sit at the same distance from everything).

Embedding (`embed_folder`, bf16 autocast by default, multi-view queries) lives in `pair_vit.descriptor.views`.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from pair_vit import data
from pair_vit.io import atomic_path, write_text_atomic
from pair_vit.descriptor.views import (REFERENCE_SUBVIEW_PENALTY, SUBVIEW_PENALTY, check_reference_views,  # noqa: F401
                                embed_folder, index_metadata, merge_views, model_args_of, model_fingerprint,
                                model_image_size, plain_json, subview_mask)

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["query_id", "reference_id", "score"]
INDEX_FORMAT = 1
META_FILE = "meta.json"


class IndexMismatchError(ValueError):
    """A saved reference index was built with another descriptor model, weights or dimension."""


# ----------------------------------------------------------------------------- the faiss index


def _faiss():
    import faiss

    return faiss


class ReferenceIndex:
    """Reference descriptors in a faiss index (inner product), with their image ids and provenance.

    `factory` is a faiss `index_factory` string: "Flat" (exact, the default), "IVF{nlist},PQ{m}"
    (compressed, approximate; trained on the first vectors it is built from, needs >= 256 and
    >= nlist of them), "HNSW32" (graph, approximate, no training), ... `metadata` records the model:
    {"model_args": ..., "fingerprint": ...} (`index_metadata(model)`) and the reference views
    ("reference_views", default "full"); `load` checks them.

    A reference may own several rows (views of it, `descriptor.views.REFERENCE_VIEWS`): its first row is the whole
    image, the others sub-views. `len(index)` counts references, `n_rows` vectors.
    """

    def __init__(self, index, ids: list[str], factory: str, metadata: dict[str, Any] | None = None,
                 nprobe: int = 16):
        if index.ntotal != len(ids):
            raise ValueError(f"faiss index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index, self.factory = index, factory
        self.metadata = plain_json(dict(metadata or {}))
        self._ids = np.asarray(ids, dtype=object)  # reference id of every row
        self._id_set = set(ids)
        self._subview = subview_mask(pd.factorize(self._ids)[0]) if len(ids) else np.zeros(0, bool)
        self._rows_per_ref = max((int(c) for c in pd.Series(self._ids).value_counts()), default=1)
        self.nprobe = nprobe

    # --------------------------------------------------------------------- building

    @classmethod
    def build(cls, ids: list[str], vectors: np.ndarray, factory: str = "Flat",
              metadata: dict[str, Any] | None = None, nprobe: int = 16,
              view_owner: np.ndarray | None = None) -> ReferenceIndex:
        """Index `vectors` (M, D) of references `ids`; trains the index first when the factory needs it.
        `view_owner` (M,): index into `ids` of each row (several views per reference, whole image first);
        default one row per id."""
        faiss = _faiss()
        vectors = _check_vectors(vectors)
        if len(ids) == 0 or len(vectors) == 0:
            raise ValueError("cannot build a reference index from an empty reference set: no reference "
                             "images (or none of them could be read)")
        try:
            index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"invalid faiss index factory {factory!r} for dimension {vectors.shape[1]}: "
                             f"{_faiss_message(err)}") from None
        if not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as err:
                raise ValueError(f"cannot train faiss index {factory!r} on {len(vectors)} reference vectors "
                                 f"({_faiss_message(err)}); use fewer IVF lists or factory 'Flat' for small "
                                 f"reference sets") from None
        meta = dict(metadata or {})
        meta.setdefault("embed_dim", int(vectors.shape[1]))
        built = cls(index, [], factory, meta, nprobe)
        built.add(ids, vectors, view_owner)
        return built

    def add(self, ids: Iterable[str], vectors: np.ndarray, view_owner: np.ndarray | None = None) -> None:
        """Append new references (rows as in `build`); an id already in the index (or repeated in `ids`) is
        refused."""
        ids = [str(i) for i in ids]
        vectors = _check_vectors(vectors, self.dim)
        owner = np.arange(len(ids)) if view_owner is None else np.asarray(view_owner, dtype=np.int64)
        if len(owner) != len(vectors) or (len(owner) and (owner.min() < 0 or owner.max() >= len(ids))) \
                or len(np.unique(owner)) != len(ids):
            raise ValueError(f"add: {len(ids)} ids, {len(vectors)} vectors and {len(owner)} view owners "
                             f"do not line up (every id needs at least one row)")
        seen = self._id_set.intersection(ids)
        if seen or len(set(ids)) != len(ids):
            dup = sorted(seen) or sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"reference ids already in the index: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
        if ids:
            self.index.add(vectors)
            self._ids = np.concatenate([self._ids, np.asarray(ids, dtype=object)[owner]])
            self._id_set.update(ids)
            self._subview = np.concatenate([self._subview, subview_mask(owner)])
            self._rows_per_ref = max(self._rows_per_ref, int(np.bincount(owner).max()))

    # --------------------------------------------------------------------- querying

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ids(self) -> list[str]:
        """The reference ids, each once, in insertion order."""
        return list(dict.fromkeys(self._ids))

    @property
    def n_rows(self) -> int:
        return int(self.index.ntotal)

    @property
    def reference_views(self) -> str:
        return str(self.metadata.get("reference_views", "full"))

    def __len__(self) -> int:
        return len(self._id_set)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._id_set

    @property
    def nprobe(self) -> int:
        """IVF lists visited per query (ignored by non-IVF indexes)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)
        try:
            _faiss().extract_index_ivf(self.index).nprobe = self._nprobe
        except (RuntimeError, AttributeError):
            pass  # not an IVF index

    def search(self, query_vectors: np.ndarray, k: int, chunk: int = 4096, progress: bool | str = False,
               subview_penalty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k references of each query vector: (scores (Nq, k') float32, reference ids (Nq, k') object),
        best first. Approximate indexes may find fewer: missing slots hold id None and score -inf.

        With one row per reference, k' = min(k, len(self)). With reference views, the best k x (views per
        reference) rows, a reference possibly several times (`merge_views` keeps its best), sub-view rows
        lowered by `subview_penalty` (a reference whose rows all rank below those is missed, as with k).
        """
        from tqdm import tqdm

        query_vectors = _check_vectors(query_vectors, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k * self._rows_per_ref, self.n_rows)
        scores = np.empty((len(query_vectors), k), np.float32)
        labels = np.empty((len(query_vectors), k), np.int64)
        desc = progress if isinstance(progress, str) else "search"
        for start in tqdm(range(0, len(query_vectors), chunk), desc=desc, disable=not progress, leave=False):
            s, i = self.index.search(query_vectors[start:start + chunk], k)
            scores[start:start + chunk], labels[start:start + chunk] = s, i
        missing = labels < 0
        rows = np.where(missing, 0, labels)
        ref_ids = self._ids[rows] if len(self._ids) else labels.astype(object)
        ref_ids[missing] = None
        if subview_penalty and self._rows_per_ref > 1:
            scores = scores - np.float32(subview_penalty) * self._subview[rows]
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ref_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ref_ids, order, 1)
            missing = np.take_along_axis(missing, order, 1)
        scores[missing] = -np.inf
        return scores, ref_ids

    # --------------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> None:
        """Write the index to `folder` atomically: data files under a fresh name, then `meta.json`, which
        names them, replaced in one rename; a crash leaves the previous saved index intact."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        index_file, ids_file = f"index.{token}.faiss", f"ids.{token}.json"
        with atomic_path(folder / index_file) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_text_atomic(folder / ids_file, json.dumps(list(self._ids)))
        meta = {**self.metadata, "format": INDEX_FORMAT, "factory": self.factory, "embed_dim": self.dim,
                "n": self.n_rows, "n_references": len(self), "nprobe": self.nprobe, "index_file": index_file, "ids_file": ids_file,
                "faiss_version": getattr(faiss, "__version__", "?"),
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(folder / META_FILE, json.dumps(meta, indent=1))
        for old in list(folder.glob("index.*.faiss")) + list(folder.glob("ids.*.json")):
            if old.name not in (index_file, ids_file):
                old.unlink(missing_ok=True)

    @staticmethod
    def read_metadata(folder: str | Path) -> dict[str, Any]:
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no reference index in {folder} ({META_FILE} not found)")
        return json.loads(path.read_text())

    @classmethod
    def load(cls, folder: str | Path, expected_model_args: dict | None = None,
             expected_fingerprint: str | None = None, expected_dim: int | None = None,
             expected_reference_views: str | None = None) -> ReferenceIndex:
        """Read an index saved by `save`; refuse it (IndexMismatchError) if it was built with other
        model args, other weights, another dimension or other reference views than expected."""
        faiss = _faiss()
        folder = Path(folder)
        meta = cls.read_metadata(folder)
        check_compatible(meta, folder, expected_model_args, expected_fingerprint, expected_dim,
                         expected_reference_views)
        index = faiss.read_index(str(folder / meta["index_file"]))
        ids = json.loads((folder / meta["ids_file"]).read_text())
        if index.ntotal != len(ids) or len(ids) != meta["n"]:
            raise ValueError(f"reference index {folder} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, "
                             f"{meta['n']} in {META_FILE}")
        keep = {k: v for k, v in meta.items() if k not in ("format", "factory", "n", "n_references", "nprobe",
                                                           "index_file", "ids_file", "faiss_version", "saved")}
        return cls(index, ids, meta["factory"], keep, nprobe=int(meta.get("nprobe", 16)))


def check_compatible(meta: dict[str, Any], where: Any, expected_model_args: dict | None = None,
                     expected_fingerprint: str | None = None, expected_dim: int | None = None,
                     expected_reference_views: str | None = None) -> None:
    """Raise IndexMismatchError naming what differs between a saved index's metadata and the model (or the
    reference views asked for; an index saved without them holds "full")."""
    views = meta.get("reference_views", "full")
    if expected_reference_views is not None and views != expected_reference_views:
        raise IndexMismatchError(f"reference index {where} holds reference views {views!r}, not the "
                                 f"{expected_reference_views!r} asked for; rebuild it (delete {where}) or "
                                 f"ask for {views!r}")
    hint = f"rebuild it (delete {where}) or use the descriptor checkpoint it was built with"
    if expected_dim is not None and int(meta.get("embed_dim", -1)) != int(expected_dim):
        raise IndexMismatchError(f"reference index {where} holds {meta.get('embed_dim')}-dimensional descriptors "
                                 f"but the model outputs {expected_dim}; {hint}")
    if expected_model_args is not None:
        saved, now = meta.get("model_args") or {}, plain_json(dict(expected_model_args))
        diff = [f"{key}={saved.get(key)!r} in the index, {now.get(key)!r} now"
                for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
        if diff:
            raise IndexMismatchError(f"reference index {where} was built with another descriptor model "
                                     f"({'; '.join(diff)}); {hint}")
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise IndexMismatchError(f"reference index {where} was built with other descriptor weights (fingerprint "
                                 f"{meta.get('fingerprint')} in the index, {expected_fingerprint} now); {hint}")


def _check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    if dim is not None and len(vectors) and vectors.shape[1] != dim:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index holds dimension {dim}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    return vectors


def _faiss_message(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.lower().startswith("error")), lines[-1] if lines else repr(err))


# ----------------------------------------------------------------------------- scores and submissions


def normalise_scores(scores: np.ndarray, query_vectors: np.ndarray, background_index: ReferenceIndex | np.ndarray,
                     n: int = 1, beta: float = 1.0) -> np.ndarray:
    """Subtract `beta` x (mean similarity of each query vector to its `n` nearest background vectors) from
    its row of `scores` (Nq, k): a query that resembles every photo (plain texture, a blank frame) loses,
    making scores comparable across queries. `background_index`: a ReferenceIndex of embeddings of photos
    outside the benchmark (e.g. training photos), or their vectors."""
    if not isinstance(background_index, ReferenceIndex):
        background_index = ReferenceIndex.build([str(i) for i in range(len(background_index))], background_index)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    scores = np.asarray(scores, np.float32)
    if len(scores) == 0:
        return scores.copy()
    bg, _ = background_index.search(query_vectors, n)
    bias = beta * np.where(np.isfinite(bg), bg, np.nan)
    bias = np.nan_to_num(np.nanmean(bias, axis=1), nan=0.0).astype(np.float32)
    return scores - bias[:, None]


def reference_metadata(model: torch.nn.Module, views: str = "full") -> dict[str, Any]:
    """`index_metadata(model)` plus the reference views the index holds."""
    return {**index_metadata(model), "reference_views": check_reference_views(views)}


def empty_submission() -> pd.DataFrame:
    return pd.DataFrame({"query_id": pd.Series([], dtype=object), "reference_id": pd.Series([], dtype=object),
                         "score": pd.Series([], dtype=np.float32)})


def search_views(index: ReferenceIndex, query_ids: list[str], vectors: np.ndarray, view_owner: np.ndarray,
                 k: int, background: ReferenceIndex | None = None, background_n: int = 1,
                 background_beta: float = 1.0, progress: bool | str = False,
                 subview_penalty: float = SUBVIEW_PENALTY,
                 reference_penalty: float = REFERENCE_SUBVIEW_PENALTY) -> pd.DataFrame:
    """Search every view vector, optionally normalise its scores against `background`, lower the scores of
    query sub-views by `subview_penalty` and of reference sub-views (an index with reference views) by
    `reference_penalty` (see `pair_vit.descriptor.views`), merge the views of each query and of each reference by max
    score: submission rows, the k best references per query."""
    if len(query_ids) == 0:
        return empty_submission()
    scores, ref_ids = index.search(vectors, k, progress=progress, subview_penalty=reference_penalty)
    if background is not None:
        scores = normalise_scores(scores, vectors, background, n=background_n, beta=background_beta)
    scores = scores - np.float32(subview_penalty) * subview_mask(view_owner)[:, None]
    return merge_views(scores, ref_ids, view_owner, query_ids, k)


def build_background(model: torch.nn.Module, images: Mapping[str, Path], batch_size: int = 64, amp: bool = True,
                     report: data.SkipReport | None = None, num_workers: int = 0,
                     progress: bool | str = False) -> ReferenceIndex:
    """A Flat index of full-view embeddings of background photos, for `normalise_scores`."""
    ids, vectors, _ = embed_folder(model, images, batch_size, amp, "full", report, num_workers, progress)
    if not ids:
        raise ValueError("no usable background images for score normalisation")
    return ReferenceIndex.build(ids, vectors, "Flat", index_metadata(model))


def shortlist(model: torch.nn.Module, queries: Mapping[str, Path], references: Mapping[str, Path], k: int = 50,
              views: str = "full", *, batch_size: int = 64, amp: bool = True, factory: str = "Flat",
              index: ReferenceIndex | None = None, background: ReferenceIndex | Mapping[str, Path] | None = None,
              background_n: int = 1, background_beta: float = 1.0, num_workers: int = 0,
              report: data.SkipReport | None = None, progress: bool = False,
              subview_penalty: float = SUBVIEW_PENALTY, reference_views: str = "full",
              reference_penalty: float = REFERENCE_SUBVIEW_PENALTY) -> pd.DataFrame:
    """Stage 1 end to end: the k most similar references of every query, as a submission DataFrame
    query_id, reference_id, score (similarity; k rows per query, fewer if fewer references).

    `index`: an existing ReferenceIndex to search (references not in it are embedded and added); else one
    is built with `factory`. `background`: photos (id -> path) or their index, to normalise scores.
    `subview_penalty`: subtracted from the scores of sub-image views before they are merged.
    `reference_views`: the views each reference is embedded as (`descriptor.views.REFERENCE_VIEWS`), their sub-views
    lowered by `reference_penalty`.
    """
    report = report if report is not None else data.SkipReport()
    embed = dict(batch_size=batch_size, amp=amp, report=report, num_workers=num_workers)
    index = update_reference_index(model, references, index, factory=factory, progress=progress,
                                   views=reference_views, **embed)
    if isinstance(background, Mapping):
        background = build_background(model, background, progress=progress and "background", **embed)
    q_ids, q_vectors, owner = embed_folder(model, queries, views=views, progress=progress and "queries", **embed)
    return search_views(index, q_ids, q_vectors, owner, k, background, background_n, background_beta,
                        progress=progress and "search", subview_penalty=subview_penalty,
                        reference_penalty=reference_penalty)


def update_reference_index(model: torch.nn.Module, references: Mapping[str, Path],
                           index: ReferenceIndex | None = None, factory: str = "Flat", batch_size: int = 64,
                           amp: bool = True, report: data.SkipReport | None = None, num_workers: int = 0,
                           progress: bool | str = False, views: str = "full") -> ReferenceIndex:
    """Embed the references not yet in `index` as `views` (`descriptor.views.REFERENCE_VIEWS`) and add them (or build
    a new index from all of them); an `index` holding other reference views is refused."""
    check_reference_views(views)
    if index is not None and index.reference_views != views:
        raise IndexMismatchError(f"the reference index holds reference views {index.reference_views!r}, "
                                 f"not {views!r}")
    todo = {i: p for i, p in references.items() if index is None or i not in index}
    ids, vectors, owner = embed_folder(model, todo, batch_size, amp, views, report, num_workers,
                                       progress and "references")
    if index is None:
        return ReferenceIndex.build(ids, vectors, factory, reference_metadata(model, views), view_owner=owner)
    index.add(ids, vectors, owner)
    if len(index) == 0:
        raise ValueError("the reference set is empty: no reference image could be embedded")
    return index
